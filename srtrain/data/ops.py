"""The TensorFlow ops of the input pipelines, each usable on its own and inside a tf.data map:
decoding (whole, or only a window of a JPEG), random crops and the 8 flips and rotations from
stateless seeds, center crops, and the training degradation of a whole batch.
"""

from __future__ import annotations

import math

import tensorflow as tf

from srtrain import degrade as degrade_ops
from srtrain.config import Config


def decode(image: tf.Tensor) -> tf.Tensor:
    """Encoded bytes -> (H, W, 3) uint8; grayscale, gray+alpha, RGBA and CMYK become RGB."""
    img = tf.io.decode_image(image, channels=3, expand_animations=False)
    img.set_shape([None, None, 3])
    return img


def image_shape(record: dict) -> tuple[tf.Tensor, tf.Tensor]:
    """(height, width) of a record: from the shard columns, else the JPEG header, else decoding."""
    if "height" in record:
        return record["height"], record["width"]

    def decoded_shape():
        return tf.shape(decode(record["image"]))[:2]

    hw = tf.cond(
        tf.io.is_jpeg(record["image"]),
        lambda: tf.image.extract_jpeg_shape(record["image"])[:2],
        decoded_shape,
    )
    return hw[0], hw[1]


def decode_window(
    image: tf.Tensor,
    top: tf.Tensor,
    left: tf.Tensor,
    height: int | tf.Tensor,
    width: int | tf.Tensor | None = None,
) -> tf.Tensor:
    """The height x width (default square) window at (top, left) of an encoded image, uint8.

    JPEG decodes only the rows and columns it needs (tf.io.decode_and_crop_jpeg); other formats
    decode whole and are sliced. Both give the same pixels, except that JPEG chroma upsampling
    sees no neighbour past the window's last column and row (a few levels there, at most).
    """
    width = height if width is None else width

    def jpeg():
        window = tf.stack([top, left, height, width])
        return tf.io.decode_and_crop_jpeg(image, window, channels=3)

    def other():
        return decode(image)[top : top + height, left : left + width]

    static = [n if isinstance(n, int) else None for n in (height, width)]
    return tf.ensure_shape(tf.cond(tf.io.is_jpeg(image), jpeg, other), [*static, 3])


def element_seed(seed: int, index: tf.Tensor) -> tf.Tensor:
    """The [2]-int64 stateless seed of training element `index` (from Dataset.enumerate):
    stateless_fold_in, so neighbouring elements get unrelated random streams."""
    return tf.random.experimental.stateless_fold_in(tf.constant([seed, 0], tf.int64), index)


def random_crop_augment(img: tf.Tensor, size: int, seed: tf.Tensor) -> tf.Tensor:
    """Random size x size crop, flip and rot90 of a decoded image: (H, W, 3) -> (size, size, 3)."""
    s_crop, s_d4 = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    crop = tf.image.stateless_random_crop(img, [size, size, 3], seed=s_crop)
    return random_dihedral(crop, s_d4)


def random_dihedral(img: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """One of the 8 flips and rotations of a square (S, S, C) image, uniformly at random.

    The same distribution as a random left-right flip followed by a random rot90 (the original
    project's augmentation), for less work (bench/README.md): each of the 8 is a transpose, a
    reversal of the row order (a gather, a copy per row) and a reversal of each row, each taken
    or not.
    """
    transpose, flip_rows, flip_cols = tf.unstack(
        tf.random.stateless_uniform([3], seed, minval=0, maxval=2, dtype=tf.int32) > 0
    )
    x = tf.cond(transpose, lambda: tf.transpose(img, [1, 0, 2]), lambda: img)
    x = tf.cond(flip_rows, lambda: tf.gather(x, tf.range(tf.shape(x)[0] - 1, -1, -1)), lambda: x)
    x = tf.cond(flip_cols, lambda: tf.reverse(x, [1]), lambda: x)
    return tf.ensure_shape(x, img.shape)


def random_window(
    height: tf.Tensor, width: tf.Tensor, size: int, seed: tf.Tensor
) -> tuple[tf.Tensor, tf.Tensor]:
    """A uniformly random (top, left) of a size x size window, as stateless_random_crop draws."""
    limits = tf.stack([height - size + 1, width - size + 1])
    u = tf.random.stateless_uniform([2], seed)  # [0, 1): floor(u * n) is uniform on 0..n-1
    top_left = tf.minimum(tf.cast(u * tf.cast(limits, tf.float32), tf.int32), limits - 1)
    return top_left[0], top_left[1]


def random_patch(
    image: tf.Tensor, height: tf.Tensor, width: tf.Tensor, size: int, seed: tf.Tensor
) -> tf.Tensor:
    """Encoded image -> random size x size patch, randomly flipped and rotated, uint8.

    Decodes only the patch of a JPEG; the patch distribution is the same as decoding the whole
    image and calling `random_crop_augment`.
    """
    s_win, s_d4 = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    top, left = random_window(height, width, size, s_win)
    return random_dihedral(decode_window(image, top, left, size), s_d4)


def random_patches(
    image: tf.Tensor, height: tf.Tensor, width: tf.Tensor, size: int, seed: tf.Tensor, k: int
) -> tf.Tensor:
    """k independent `random_patch`es of one encoded image, from one decode: (k, size, size, 3).

    A JPEG decodes only the smallest window holding all k patches. Each patch has the same
    distribution as `random_patch`; patches of one image are correlated (they may overlap).
    """
    seeds = tf.random.experimental.stateless_split(seed, 2 * k)
    windows = tf.stack([tf.stack(random_window(height, width, size, seeds[i])) for i in range(k)])
    top, left = tf.unstack(tf.reduce_min(windows, axis=0))
    bottom, right = tf.unstack(tf.reduce_max(windows, axis=0) + size)
    box = decode_window(image, top, left, bottom - top, right - left)
    out = []
    for i in range(k):
        t, s = windows[i, 0] - top, windows[i, 1] - left
        out.append(random_dihedral(box[t : t + size, s : s + size], seeds[k + i]))
    return tf.stack(out)


def center_crop(img: tf.Tensor, size: int) -> tf.Tensor:
    """(H, W, C) -> (size, size, C) from the middle of the image."""
    h, w = tf.shape(img)[0], tf.shape(img)[1]
    top, left = (h - size) // 2, (w - size) // 2
    out = img[top : top + size, left : left + size]
    return tf.ensure_shape(out, [size, size, img.shape[-1]])


def big_enough(img: tf.Tensor, size: int) -> tf.Tensor:
    return tf.logical_and(tf.shape(img)[0] >= size, tf.shape(img)[1] >= size)


def to_float(img: tf.Tensor) -> tf.Tensor:
    return tf.image.convert_image_dtype(img, tf.float32)  # uint8 -> [0, 1]


def gaussian_noise(shape: tf.Tensor, seed: tf.Tensor, stddev: float) -> tf.Tensor:
    """N(0, stddev^2) noise by Box-Muller over stateless uniforms, exactly Gaussian.

    Used instead of tf.random.stateless_normal, which costs about twice as much (bench/README.md).
    Both outputs of each Box-Muller pair come from one cos: sin(t) = cos(t - pi/2).
    """
    n = tf.reduce_prod(shape)
    u = tf.random.stateless_uniform(tf.stack([2, (n + 1) // 2]), seed)  # [0, 1)
    # log of 1 - u, in (0, 1]: finite. (Not log1p(-u): Grappler fuses that chain into a
    # scalar per-element op, several times slower than the vectorised log.)
    radius = tf.sqrt((-2.0 * stddev**2) * tf.math.log(1.0 - u[0]))
    phase = (2.0 * math.pi) * u[1] - tf.constant([[0.0], [math.pi / 2]])  # (2, n/2)
    z = radius * tf.cos(phase)
    return tf.reshape(tf.reshape(z, [-1])[:n], shape)


def degrade_batch(hr: tf.Tensor, seeds: tf.Tensor, cfg: Config) -> tuple[tf.Tensor, tf.Tensor]:
    """(B, H, W, 3) uint8 patches -> (lr, hr) float batches, one op call for the whole batch.

    Runs at the end of `train_dataset` (degradation.on: input) or, unchanged, inside the train
    step on the replica's device (replica): either way the same seeds give the same LR.

    The same degradation as `srtrain.degrade.degrade` (area down, blur, Gaussian noise, clip);
    the noise of a batch comes from its first element's seed, so every element still gets
    fresh independent noise and the batch is reproducible. With `data.channel_shuffle` the HR
    patches first get their random channel orders, from the same seed.
    """
    g = cfg.degradation
    if cfg.data.channel_shuffle:
        hr = random_channel_order(hr, tf.random.experimental.stateless_fold_in(seeds[0], 1))
    hr = to_float(hr)  # (B, H, W, 3)
    lr = degrade_ops.blur(degrade_ops.area_downsample(hr, g.scale), g.blur_kernel, g.blur_sigma)
    if g.noise_sigma > 0:
        lr = lr + gaussian_noise(tf.shape(lr), seeds[0], g.noise_sigma / 255.0)
    return tf.clip_by_value(lr, 0.0, 1.0), hr  # (B, H/s, W/s, 3), (B, H, W, 3)


def random_channel_order(images: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """(B, H, W, C) -> each image with its C channels in one of the C! orders, uniformly."""
    shape = tf.shape(images)
    keys = tf.random.stateless_uniform(tf.stack([shape[0], shape[3]]), seed)  # (B, C)
    return tf.gather(images, tf.argsort(keys, axis=1), axis=3, batch_dims=1)


def dataset_options() -> tf.data.Options:
    """The tf.data options of every pipeline: one thread per op."""
    # Many small ops run in parallel across elements; splitting each op over threads as well
    # costs more in synchronisation than it gains (bench/README.md).
    opts = tf.data.Options()
    opts.threading.max_intra_op_parallelism = 1
    return opts
