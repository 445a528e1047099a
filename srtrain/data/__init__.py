"""tf.data input pipelines: records -> decode -> crop/augment -> degrade -> batch.

A source yields records {"id": string, "image": encoded JPEG/PNG/BMP bytes}; `records()` picks
the source named by `data.source`. Training pipelines repeat forever with random crops, left-right
flips and rot90, and draw every random number from a per-element stateless seed, so a run is
reproducible from `train.seed` and fresh noise is drawn for every element. Evaluation pipelines
take center crops and degrade each image with a fixed seed from its id, so the same image always
gives the same LR. Everything after reading bytes is TensorFlow ops (no py_function).

Each function is usable on its own (tests call them one by one) and inside a pipeline.
"""

from __future__ import annotations

import logging
import math

import tensorflow as tf

from srtrain import degrade as degrade_ops
from srtrain.config import Config
from srtrain.data import samples

log = logging.getLogger(__name__)
AUTOTUNE = tf.data.AUTOTUNE


def records(
    cfg: Config, split: str, index: int = 0, count: int = 1, min_size: int = 0
) -> tf.data.Dataset:
    """Records of one split, the part `index` of `count` input pipelines reads.

    A shard source leaves out images with a side below `min_size` before they reach tf.data
    (their sizes are in the shard); the sample photos' sizes are known only once decoded.
    """
    source = cfg.data.source
    if source == "samples":
        items = samples.read(split)
        ds = tf.data.Dataset.from_tensor_slices(
            {"id": [i for i, _ in items], "image": [b for _, b in items]}
        )
        return ds.shard(count, index) if count > 1 else ds
    from srtrain.data import shards  # pyarrow only when used

    return shards.records(cfg, split, index, count, min_size)


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
    project's augmentation), at about 60% of the cost: each of the 8 is a transpose, a reversal of
    the row order and a reversal of each row, each taken or not; the row order is reversed with
    a gather (a copy per row) instead of tf.reverse (an index per element).
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

    About twice as cheap on CPU as tf.random.stateless_normal, whose per-element transform is
    the single most expensive op of the training pipeline (measured: bench/pipeline.py). Both
    outputs of each Box-Muller pair come from one cos: sin(t) = cos(t - pi/2).
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
    fresh independent noise and the batch is reproducible.
    """
    g = cfg.degradation
    hr = to_float(hr)  # (B, H, W, 3)
    lr = degrade_ops.blur(degrade_ops.area_downsample(hr, g.scale), g.blur_kernel, g.blur_sigma)
    if g.noise_sigma > 0:
        lr = lr + gaussian_noise(tf.shape(lr), seeds[0], g.noise_sigma / 255.0)
    return tf.clip_by_value(lr, 0.0, 1.0), hr  # (B, H/s, W/s, 3), (B, H, W, 3)


def _options() -> tf.data.Options:
    # Many small ops run in parallel across elements; splitting each op over threads as well
    # costs more in synchronisation than it gains (measured: bench/pipeline.py).
    opts = tf.data.Options()
    opts.threading.max_intra_op_parallelism = 1
    return opts


def train_dataset(
    cfg: Config,
    index: int = 0,
    count: int = 1,
    seed: int | None = None,
    batch_size: int | None = None,
) -> tf.data.Dataset:
    """Endless (lr, hr) batches for input pipeline `index` of `count`; with
    `degradation.on: replica`, (hr, seeds) batches instead, uint8 patches and their int64 seeds,
    which `degrade_batch` turns into the same (lr, hr) inside the train step.

    `seed` (default train.seed) should differ between pipelines and between resumptions so no
    two of them replay the same sample stream. Shard records are shuffled while still encoded
    and only the random patch is decoded; degradation runs once per batch. With
    `data.patches_per_image` k > 1, each group of batch_size photos is decoded once and gives k
    batches (each photo once per batch), shuffled among a few batches so that siblings are
    usually not consecutive.
    """
    size = cfg.data.patch_size
    batch = batch_size or cfg.data.batch_size
    seed = cfg.train.seed if seed is None else seed
    k = cfg.data.patches_per_image
    ds = records(cfg, cfg.data.train_split, index, count, min_size=size)
    if cfg.data.source == "samples":
        # A few photos: decode them once and keep them decoded.
        ds = ds.map(lambda r: decode(r["image"]), num_parallel_calls=AUTOTUNE)
        ds = ds.filter(lambda img: big_enough(img, size)).cache()
        ds = ds.repeat().shuffle(cfg.data.shuffle_buffer, seed=seed).enumerate()

        def patch(i, img):
            s = element_seed(seed, i)
            return random_crop_augment(img, size, s), s

        ds = ds.map(patch, num_parallel_calls=AUTOTUNE, deterministic=True)
        ds = ds.batch(batch, drop_remainder=True)
    elif k == 1:
        ds = ds.repeat().shuffle(cfg.data.shuffle_buffer, seed=seed).enumerate()

        def patch(i, r):
            s = element_seed(seed, i)
            h, w = image_shape(r)
            return random_patch(r["image"], h, w, size, s), s

        ds = ds.map(patch, num_parallel_calls=AUTOTUNE, deterministic=True)  # (size, size, 3)
        ds = ds.batch(batch, drop_remainder=True)
    else:
        ds = ds.repeat().shuffle(cfg.data.shuffle_buffer, seed=seed)
        ds = ds.batch(batch, drop_remainder=True).enumerate()

        def patch_batches(n, r):  # `batch` records -> k batches of patches, (k, batch, ...)
            s_patch, s_noise = tf.unstack(
                tf.random.experimental.stateless_split(element_seed(seed, n), 2)
            )
            seeds = tf.random.experimental.stateless_split(s_patch, batch)
            hr = []
            for i in range(batch):
                h, w = image_shape({key: value[i] for key, value in r.items()})
                hr.append(random_patches(r["image"][i], h, w, size, seeds[i], k))
            noise_seeds = tf.random.experimental.stateless_split(s_noise, k * batch)
            return tf.stack(hr, axis=1), tf.reshape(noise_seeds, [k, batch, 2])

        ds = ds.map(patch_batches, num_parallel_calls=AUTOTUNE, deterministic=True).unbatch()
        ds = ds.shuffle(4 * k, seed=seed + 1)
    # (hr, seeds): (B, size, size, 3) uint8, (B, 2) int64
    if cfg.degradation.on == "input":
        ds = ds.map(
            lambda hr, s: degrade_batch(hr, s, cfg), num_parallel_calls=AUTOTUNE, deterministic=True
        )
    # else degradation.on == "replica": the train step runs degrade_batch on its device
    return ds.prefetch(AUTOTUNE).with_options(_options())


def eval_dataset(
    cfg: Config,
    split: str | None = None,
    index: int = 0,
    count: int = 1,
    batch_size: int | None = None,
) -> tf.data.Dataset:
    """Deterministic (id, lr, hr) batches of center crops, for validation and testing."""
    split = split or cfg.data.val_split
    size = cfg.data.val_patch_size or cfg.data.patch_size
    ds = records(cfg, split, min_size=size)
    if cfg.data.source == "samples":
        ds = ds.filter(lambda r: tf.reduce_all(tf.stack(image_shape(r)) >= size))
    if cfg.data.val_images:
        ds = ds.take(cfg.data.val_images)
    ds = ds.shard(count, index) if count > 1 else ds

    def make_pair(r):
        # Full decode (not decode_and_crop_jpeg): evaluation pixels match any other decoder's,
        # and validation is not the hot path.
        hr = to_float(center_crop(decode(r["image"]), size))
        key = r["id"]
        lr = degrade_ops.degrade(hr, cfg.degradation, degrade_ops.eval_seed(cfg.degradation, key))
        return key, lr, hr

    ds = ds.map(make_pair, num_parallel_calls=AUTOTUNE, deterministic=True)
    return ds.batch(batch_size or cfg.data.batch_size).prefetch(AUTOTUNE).with_options(_options())
