"""The degradation that turns a clean HR patch into the model's LR input, in TensorFlow ops.

HR -> area downsample by `scale` -> Gaussian blur (kernel x kernel, sigma) -> additive Gaussian
noise (sigma on the 0-255 scale) -> clip to [0, 1]: the original project's recipe, with its defaults
(x2, 5x5, sigma 1.0, noise 10) in `DegradationConfig`. Everything is graph ops so it runs inside
tf.data on any worker; randomness is stateless and seeded, so training draws fresh noise per
element (from a per-element seed) and evaluation is deterministic (a fixed seed per image).
"""

from __future__ import annotations

import tensorflow as tf

from srtrain.config import DegradationConfig


def gaussian_kernel(size: int, sigma: float) -> tf.Tensor:
    """A normalised 1-D Gaussian of odd `size` (the 2-D blur is separable)."""
    if sigma <= 0 or size == 1:
        return tf.one_hot(size // 2, size, dtype=tf.float32)
    x = tf.range(size, dtype=tf.float32) - (size - 1) / 2.0
    k = tf.exp(-(x**2) / (2.0 * sigma**2))
    return k / tf.reduce_sum(k)


def area_downsample(hr: tf.Tensor, scale: int) -> tf.Tensor:
    """Mean of each scale x scale block: area interpolation at an integer factor. (.., H, W, C)."""
    batched = hr.shape.rank == 4
    x = hr if batched else hr[None]
    x = tf.nn.avg_pool2d(x, ksize=scale, strides=scale, padding="VALID")  # (B, H/s, W/s, C)
    return x if batched else x[0]


def reflect_pad(x: tf.Tensor, pad: int, axis: int) -> tf.Tensor:
    """tf.pad(mode="REFLECT") along one axis (mirror without repeating the edge), as slices.

    Several times cheaper on CPU than tf.pad's mirror padding, which computes an index per element.
    """

    def take(start: int, stop: int) -> tf.Tensor:
        index = [slice(None)] * x.shape.rank
        index[axis] = slice(start, stop)
        return tf.reverse(x[tuple(index)], [axis])

    return tf.concat([take(1, pad + 1), x, take(-pad - 1, -1)], axis=axis)


def blur(img: tf.Tensor, size: int, sigma: float) -> tf.Tensor:
    """Separable Gaussian blur with reflected borders (OpenCV's default), per channel."""
    if size == 1 or sigma <= 0:
        return img
    batched = img.shape.rank == 4
    x = img if batched else img[None]
    channels = x.shape[-1]
    pad = size // 2
    k = gaussian_kernel(size, sigma)
    kh = tf.tile(tf.reshape(k, [size, 1, 1, 1]), [1, 1, channels, 1])
    kw = tf.tile(tf.reshape(k, [1, size, 1, 1]), [1, 1, channels, 1])
    x = tf.nn.depthwise_conv2d(reflect_pad(x, pad, 1), kh, strides=[1, 1, 1, 1], padding="VALID")
    x = tf.nn.depthwise_conv2d(reflect_pad(x, pad, 2), kw, strides=[1, 1, 1, 1], padding="VALID")
    return x if batched else x[0]


def degrade(hr: tf.Tensor, cfg: DegradationConfig, seed: tf.Tensor) -> tf.Tensor:
    """LR input for an HR image in [0, 1], float32 (H, W, C) or (B, H, W, C).

    `seed` is a stateless-RNG seed (shape [2], int); the same seed gives the same noise.
    """
    hr = tf.convert_to_tensor(hr, tf.float32)
    lr = area_downsample(hr, cfg.scale)
    lr = blur(lr, cfg.blur_kernel, cfg.blur_sigma)
    if cfg.noise_sigma > 0:
        noise = tf.random.stateless_normal(tf.shape(lr), seed=seed, stddev=cfg.noise_sigma / 255.0)
        lr = lr + noise
    return tf.clip_by_value(lr, 0.0, 1.0)


def eval_seed(cfg: DegradationConfig, image_key: tf.Tensor) -> tf.Tensor:
    """A fixed per-image seed for evaluation inputs, from the image's id (a string)."""
    h = tf.strings.to_hash_bucket_fast(image_key, 2**31 - 1)
    return tf.stack([tf.constant(cfg.eval_seed, tf.int64), tf.cast(h, tf.int64)])
