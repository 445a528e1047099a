"""tf.data input pipelines: records -> decode -> crop/augment -> degrade -> batch.

A source yields records {"id": string, "image": encoded JPEG/PNG/BMP bytes}: the bundled sample
photos (`samples`) or a shard dataset (`shards.records`). Training pipelines repeat forever with
random crops, left-right flips and rot90, and draw every random number from a per-element
stateless seed, so a run is reproducible from `train.seed` and fresh noise is drawn for every
element. Evaluation pipelines take center crops and degrade each image with a fixed seed from its
id, so the same image always gives the same LR. Everything after reading bytes is TensorFlow ops
(no py_function): `ops` holds them, `decoded` the decoded-image cache.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from srtrain import degrade as degrade_ops
from srtrain.config import Config, ConfigError
from srtrain.data import samples, shards
from srtrain.data.decoded import cached_batches, decoded_cache
from srtrain.data.ops import (
    big_enough,
    center_crop,
    dataset_options,
    decode,
    degrade_batch,
    element_seed,
    image_shape,
    random_crop_augment,
    random_patch,
    random_patches,
    to_float,
)

AUTOTUNE = tf.data.AUTOTUNE


def _sample_records(split: str, index: int = 0, count: int = 1) -> tf.data.Dataset:
    """Records of a split of the bundled sample photos, the part `index` of `count` reads."""
    items = samples.read(split)
    ds = tf.data.Dataset.from_tensor_slices(
        {"id": [i for i, _ in items], "image": [b for _, b in items]}
    )
    return ds.shard(count, index) if count > 1 else ds


def train_dataset(
    cfg: Config,
    index: int = 0,
    count: int = 1,
    seed: int | None = None,
    batch_size: int | None = None,
    start_batch: int = 0,
) -> tf.data.Dataset:
    """Endless (lr, hr) batches for input pipeline `index` of `count`; with
    `degradation.on: replica`, (hr, seeds) batches instead, uint8 patches and their int64 seeds,
    which `degrade_batch` turns into the same (lr, hr) inside the train step.

    `seed` (default train.seed) should differ between pipelines so no two of them replay the
    same sample stream. `start_batch`: batches this pipeline delivered before (a resumed run,
    with the interrupted run's seed): the stream continues where it stopped, in the same pass of
    the data; see `_resumed_records` for what is exact and what it costs.

    Every pipeline reads an equal share of the images (`shards.records`) and each pass over its
    share reads the shards and row groups in a new order. Shard records are shuffled while still
    encoded and only the random patch is decoded; degradation runs once per batch. With
    `data.patches_per_image` k > 1, each group of batch_size photos is decoded once and gives k
    batches (each photo once per batch), shuffled among a few batches so that siblings are
    usually not consecutive. With `data.decoded_cache` the share is decoded once into memory
    and patches are cut from it (`cached_batches`).
    """
    size = cfg.data.patch_size
    batch = batch_size or cfg.data.batch_size
    seed = cfg.train.seed if seed is None else seed
    k = cfg.data.patches_per_image
    if cfg.data.source == "samples":
        # A few photos: decode them once and keep them decoded.
        ds = _sample_records(cfg.data.train_split, index, count)
        ds = ds.map(lambda r: decode(r["image"]), num_parallel_calls=AUTOTUNE)
        ds = ds.filter(lambda img: big_enough(img, size)).cache()
        ds = ds.repeat().shuffle(cfg.data.shuffle_buffer, seed=seed)
        ds = ds.enumerate(start_batch * batch)

        def patch(i, img):
            s = element_seed(seed, i)
            return random_crop_augment(img, size, s), s

        ds = ds.map(patch, num_parallel_calls=AUTOTUNE, deterministic=True)
        ds = ds.batch(batch, drop_remainder=True)
    elif cfg.data.decoded_cache is not False and (cache := decoded_cache(cfg, index, count)):
        ds = cached_batches(cache, size, batch, seed, start_batch)
    elif k == 1:
        ds = _resumed_records(cfg, index, count, seed, start_batch * batch)
        ds = ds.shuffle(cfg.data.shuffle_buffer, seed=seed).enumerate(start_batch * batch)

        def patch(i, r):
            s = element_seed(seed, i)
            h, w = image_shape(r)
            return random_patch(r["image"], h, w, size, s), s

        ds = ds.map(patch, num_parallel_calls=AUTOTUNE, deterministic=True)  # (size, size, 3)
        ds = ds.batch(batch, drop_remainder=True)
    else:
        groups = start_batch // k  # groups of `batch` records already turned into patches
        ds = _resumed_records(cfg, index, count, seed, groups * batch)
        ds = ds.shuffle(cfg.data.shuffle_buffer, seed=seed)
        ds = ds.batch(batch, drop_remainder=True).enumerate(groups)

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
    return ds.prefetch(AUTOTUNE).with_options(dataset_options())


def _resumed_records(
    cfg: Config, index: int, count: int, seed: int, position: int
) -> tf.data.Dataset:
    """Endless training records of a shard source, from record `position` of the stream on.

    A pass is the pipeline's share once, so `position` falls in pass position // share at
    offset position % share: reading starts at that pass (in that pass's order) and skips the
    records before the offset, reading their bytes but decoding nothing (at most one pass of the
    share is read for nothing). The images the interrupted pass had not reached come next; the
    exact order differs from an uninterrupted run only within the shuffle buffer (its content is
    not restored; with a buffer of 1 the continuation is exact) and, with patches_per_image k > 1,
    within the shuffle of 4 k batches after the patches.
    """
    size = cfg.data.patch_size
    if position <= 0:
        return shards.records(cfg, cfg.data.train_split, index, count, size, seed=seed)
    h, w = shards.image_sizes(cfg, cfg.data.train_split, index, count)
    share = int(np.sum(np.minimum(h, w) >= size))
    if share == 0:
        raise ConfigError(f"data.patch_size: no training image of {cfg.data.source} is that big")
    ds = shards.records(
        cfg, cfg.data.train_split, index, count, size, seed=seed, start_pass=position // share
    )
    return ds.skip(position % share)


def eval_dataset(
    cfg: Config,
    split: str | None = None,
    index: int = 0,
    count: int = 1,
    batch_size: int | None = None,
) -> tf.data.Dataset:
    """Deterministic (id, lr, hr) batches of center crops, for validation and testing.

    Pipeline `index` of `count` reads only its part of the split (of the first
    `data.val_images` images when that is set): parts are disjoint and together the whole.
    """
    split = split or cfg.data.val_split
    size = cfg.data.val_patch_size or cfg.data.patch_size
    if cfg.data.source == "samples":
        ds = _sample_records(split)
        ds = ds.filter(lambda r: tf.reduce_all(tf.stack(image_shape(r)) >= size))
        ds = ds.take(cfg.data.val_images) if cfg.data.val_images else ds
        ds = ds.shard(count, index) if count > 1 else ds
    else:
        ds = shards.records(cfg, split, index, count, min_size=size, limit=cfg.data.val_images)

    def make_pair(r):
        # Full decode (not decode_and_crop_jpeg): evaluation pixels match any other decoder's,
        # and validation is not the hot path.
        hr = to_float(center_crop(decode(r["image"]), size))
        key = r["id"]
        lr = degrade_ops.degrade(hr, cfg.degradation, degrade_ops.eval_seed(cfg.degradation, key))
        return key, lr, hr

    ds = ds.map(make_pair, num_parallel_calls=AUTOTUNE, deterministic=True)
    return (
        ds.batch(batch_size or cfg.data.batch_size)
        .prefetch(AUTOTUNE)
        .with_options(dataset_options())
    )
