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

import tensorflow as tf

from srtrain import degrade as degrade_ops
from srtrain.config import Config
from srtrain.data import samples

log = logging.getLogger(__name__)
AUTOTUNE = tf.data.AUTOTUNE


def records(cfg: Config, split: str, index: int = 0, count: int = 1) -> tf.data.Dataset:
    """Records of one split, the part `index` of `count` input pipelines reads."""
    source = cfg.data.source
    if source == "samples":
        items = samples.read(split)
        ds = tf.data.Dataset.from_tensor_slices(
            {"id": [i for i, _ in items], "image": [b for _, b in items]}
        )
        return ds.shard(count, index) if count > 1 else ds
    from srtrain.data import shards  # noqa: PLC0415 (pulls in pyarrow only when used)

    return shards.records(cfg, split, index, count)


def decode(image: tf.Tensor) -> tf.Tensor:
    """Encoded bytes -> (H, W, 3) uint8; grayscale, gray+alpha and RGBA become RGB."""
    img = tf.io.decode_image(image, channels=3, expand_animations=False)
    img.set_shape([None, None, 3])
    return img


def element_seeds(seed: int) -> tf.data.Dataset:
    """An endless stream of [2]-int64 stateless seeds, one per training element."""
    return tf.data.Dataset.random(seed=seed).batch(2, drop_remainder=True)


def random_crop_augment(img: tf.Tensor, size: int, seed: tf.Tensor) -> tf.Tensor:
    """Random size x size crop, random left-right flip, random rot90: (H, W, 3) -> (size, size, 3)."""
    s1, s2, s3 = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
    crop = tf.image.stateless_random_crop(img, [size, size, 3], seed=s1)
    crop = tf.image.stateless_random_flip_left_right(crop, seed=s2)
    k = tf.random.stateless_uniform([], seed=s3, minval=0, maxval=4, dtype=tf.int32)
    return tf.image.rot90(crop, k)


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


def train_dataset(cfg: Config, index: int = 0, count: int = 1, seed: int | None = None,
                  batch_size: int | None = None) -> tf.data.Dataset:
    """Endless (lr, hr) batches for input pipeline `index` of `count`.

    `seed` (default train.seed) should differ between pipelines and between resumptions so no
    two of them replay the same sample stream.
    """
    size, g = cfg.data.patch_size, cfg.degradation
    seed = cfg.train.seed if seed is None else seed
    ds = records(cfg, cfg.data.train_split, index, count)
    ds = ds.map(lambda r: decode(r["image"]), num_parallel_calls=AUTOTUNE)
    ds = ds.filter(lambda img: big_enough(img, size))
    if cfg.data.source == "samples":
        ds = ds.cache()  # a few decoded photos; decoding them again every epoch is waste
    ds = ds.repeat().shuffle(cfg.data.shuffle_buffer, seed=seed)
    ds = tf.data.Dataset.zip((ds, element_seeds(seed)))

    def make_pair(img, s):
        s_crop, s_noise = tf.unstack(tf.random.experimental.stateless_split(s, 2))
        hr = to_float(random_crop_augment(img, size, s_crop))
        return degrade_ops.degrade(hr, g, s_noise), hr  # (h, w, 3), (H, W, 3)

    ds = ds.map(make_pair, num_parallel_calls=AUTOTUNE, deterministic=True)
    return ds.batch(batch_size or cfg.data.batch_size, drop_remainder=True).prefetch(AUTOTUNE)


def eval_dataset(cfg: Config, split: str | None = None, index: int = 0, count: int = 1,
                 batch_size: int | None = None) -> tf.data.Dataset:
    """Deterministic (id, lr, hr) batches of center crops, for validation and testing."""
    split = split or cfg.data.val_split
    size = cfg.data.val_patch_size or cfg.data.patch_size
    ds = records(cfg, split)
    if cfg.data.val_images:
        ds = ds.take(cfg.data.val_images)
    ds = ds.shard(count, index) if count > 1 else ds
    ds = ds.map(lambda r: (r["id"], decode(r["image"])), num_parallel_calls=AUTOTUNE)
    ds = ds.filter(lambda _, img: big_enough(img, size))

    def make_pair(key, img):
        hr = to_float(center_crop(img, size))
        lr = degrade_ops.degrade(hr, cfg.degradation, degrade_ops.eval_seed(cfg.degradation, key))
        return key, lr, hr

    ds = ds.map(make_pair, num_parallel_calls=AUTOTUNE, deterministic=True)
    return ds.batch(batch_size or cfg.data.batch_size).prefetch(AUTOTUNE)
