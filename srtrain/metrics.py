"""Image quality metrics and the bicubic baseline every reported figure stands beside.

Protocol `seed` (the original project's): PSNR and SSIM on RGB in [0, 1], whole patch, per image.
SSIM is the Wang et al. Gaussian-window SSIM (11x11, sigma 1.5), as tf.image.ssim computes it.

Protocol `standard` (the SR literature's): see `standard_metrics` below. The tf functions take
batches, the numpy ones single images; srtrain.scoring applies them (to every model, bicubic
and the input) for the train loop, srtrain.compare and srtrain.evaluate alike.
"""

from __future__ import annotations

import numpy as np
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


# --- the SR literature's protocol (`standard`) ---------------------------------------------------
#
# As in the papers' MATLAB code and BasicSR (`test_y_channel`, `crop_border`): images are 8-bit,
# metrics are computed on the Y channel of ITU-R BT.601 in studio range (MATLAB rgb2ycbcr: Y in
# [16, 235]) on the 0-255 scale, with `scale` pixels cropped at every border. A grayscale HR image
# is its own Y: we use full-range luma (0.299 R + 0.587 G + 0.114 B) for both images, which is the
# gray value itself on a gray image (the model's RGB output is reduced the same way).

PROTOCOLS = {
    "seed": "RGB PSNR/SSIM on [0, 1], whole image, LR = the run's degradation with a fixed seed "
    "per image (the original project's protocol)",
    "standard": "Y-channel PSNR/SSIM (ITU-R BT.601, 16-235 as MATLAB rgb2ycbcr), 8-bit images, "
    "`scale` border pixels cropped, LR = bicubic downscaling with antialiasing "
    "(the SR literature's protocol)",
}

_Y_STUDIO = np.array([65.481, 128.553, 24.966]) / 255.0
_Y_FULL = np.array([0.299, 0.587, 0.114])


def quantize(img: np.ndarray) -> np.ndarray:
    """[0, 1] float -> float64 on the 0-255 scale, rounded as an 8-bit file would store it."""
    return np.round(np.clip(np.asarray(img, np.float64), 0.0, 1.0) * 255.0)


def is_gray(img: np.ndarray) -> bool:
    """One channel, or three identical ones (a grayscale photo decoded as RGB)."""
    img = np.asarray(img)
    if img.ndim == 2 or img.shape[-1] == 1:
        return True
    return bool(
        np.array_equal(img[..., 0], img[..., 1]) and np.array_equal(img[..., 1], img[..., 2])
    )


def to_y(img255: np.ndarray, gray: bool = False) -> np.ndarray:
    """(H, W, 3) or (H, W[, 1]) on the 0-255 scale -> (H, W) luma on the 0-255 scale.

    Colour: BT.601 studio-range Y (16-235), as MATLAB rgb2ycbcr. `gray`: full-range luma, which
    is the image itself for a grayscale image.
    """
    img = np.asarray(img255, np.float64)
    if img.ndim == 2:
        return img
    if img.shape[-1] == 1:
        return img[..., 0]
    return img @ _Y_FULL if gray else 16.0 + img @ _Y_STUDIO


def crop_border(img: np.ndarray, n: int) -> np.ndarray:
    return img[n:-n, n:-n] if n > 0 else img


def psnr_255(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two arrays on the 0-255 scale (inf when equal)."""
    mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10.0 * np.log10(255.0**2 / mse))


def ssim_255(a: np.ndarray, b: np.ndarray) -> float:
    """Gaussian-window SSIM (11x11, sigma 1.5, valid region) of (H, W[, C]) arrays on 0-255."""
    a = np.asarray(a, np.float32)
    b = np.asarray(b, np.float32)
    if a.ndim == 2:
        a, b = a[..., None], b[..., None]
    return float(tf.image.ssim(a[None], b[None], max_val=255.0)[0])


def standard_metrics(sr: np.ndarray, hr: np.ndarray, scale: int) -> tuple[float, float]:
    """(PSNR, SSIM) under the `standard` protocol of one (H, W, 3) image pair in [0, 1]."""
    gray = is_gray(quantize(hr))
    ys = [crop_border(to_y(quantize(x), gray), scale) for x in (sr, hr)]
    return psnr_255(*ys), ssim_255(*ys)


def seed_metrics(sr: np.ndarray, hr: np.ndarray) -> tuple[float, float]:
    """(PSNR, SSIM) under the `seed` protocol: RGB on [0, 1], no rounding, no border crop."""
    a = tf.constant(np.asarray(sr, np.float32)[None])
    b = tf.constant(np.asarray(hr, np.float32)[None])
    return float(psnr(a, b)[0]), float(ssim(a, b)[0])


def bicubic_downscale(hr: np.ndarray, scale: int) -> np.ndarray:
    """(H, W, C) in [0, 1] -> (H/scale, W/scale, C), 8-bit rounded, as MATLAB imresize makes the
    literature's LR inputs (bicubic with an antialiasing kernel; 33.68 dB on Set5 x2 against the
    published 33.66). H and W must be multiples of `scale` (see `modcrop`)."""
    h, w = hr.shape[0] // scale, hr.shape[1] // scale
    lr = tf.image.resize(np.asarray(hr, np.float32)[None], (h, w), method="bicubic", antialias=True)
    return (quantize(lr[0].numpy()) / 255.0).astype(np.float32)


def modcrop(img: np.ndarray, multiple: int) -> np.ndarray:
    """Crops the bottom/right so height and width are multiples of `multiple`."""
    h, w = img.shape[0] // multiple * multiple, img.shape[1] // multiple * multiple
    return img[:h, :w]
