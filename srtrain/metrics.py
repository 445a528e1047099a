"""Image quality metrics and the bicubic baseline every reported figure stands beside.

Protocol `seed` (the original project's): PSNR and SSIM on RGB in [0, 1], whole patch, per image.
SSIM is the Wang et al. Gaussian-window SSIM (11x11, sigma 1.5), as tf.image.ssim computes it.
"""

from __future__ import annotations

import tensorflow as tf


def psnr(a: tf.Tensor, b: tf.Tensor) -> tf.Tensor:
    """Per-image PSNR in dB of (B, H, W, C) images in [0, 1]."""
    return tf.image.psnr(tf.cast(a, tf.float32), tf.cast(b, tf.float32), max_val=1.0)


def ssim(a: tf.Tensor, b: tf.Tensor) -> tf.Tensor:
    """Per-image SSIM (mean over channels) of (B, H, W, C) images in [0, 1]."""
    return tf.image.ssim(tf.cast(a, tf.float32), tf.cast(b, tf.float32), max_val=1.0)


def bicubic_upscale(lr: tf.Tensor, scale: int) -> tf.Tensor:
    """(B, h, w, C) -> (B, scale*h, scale*w, C), clipped to [0, 1]."""
    size = tf.shape(lr)[1:3] * scale
    up = tf.image.resize(tf.cast(lr, tf.float32), size, method="bicubic", antialias=False)
    return tf.clip_by_value(up, 0.0, 1.0)
