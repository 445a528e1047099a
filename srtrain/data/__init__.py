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

import atexit
import logging
import math
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf

from srtrain import degrade as degrade_ops
from srtrain.config import Config, ConfigError
from srtrain.data import samples
from srtrain.storage import StorageError

try:  # blocked transposes and flips at memcpy speed for the decoded cache; numpy otherwise
    import cv2
except ImportError:  # pragma: no cover
    cv2 = None

log = logging.getLogger(__name__)
AUTOTUNE = tf.data.AUTOTUNE


def records(
    cfg: Config,
    split: str,
    index: int = 0,
    count: int = 1,
    min_size: int = 0,
    *,
    seed: int | None = None,
    start_pass: int = 0,
    limit: int = 0,
) -> tf.data.Dataset:
    """Records of one split, the part `index` of `count` input pipelines reads.

    A shard source gives every pipeline an equal share of the images whatever the shard count
    (`shards.deal`), reads only that share, and leaves out images with a side below `min_size`
    before they reach tf.data (their sizes are in the shard); with `seed` it reads endless passes
    from `start_pass` on, in a new shard and row-group order each pass (`shards.records`). The
    sample photos' sizes are known only once decoded; they are few, and read once.
    `limit` > 0: only the split's first `limit` images are shared out.
    """
    source = cfg.data.source
    if source == "samples":
        items = samples.read(split)
        ds = tf.data.Dataset.from_tensor_slices(
            {"id": [i for i, _ in items], "image": [b for _, b in items]}
        )
        ds = ds.take(limit) if limit > 0 else ds
        return ds.shard(count, index) if count > 1 else ds
    from srtrain.data import shards  # pyarrow only when used

    return shards.records(
        cfg, split, index, count, min_size, seed=seed, start_pass=start_pass, limit=limit
    )


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
    start_batch: int = 0,
) -> tf.data.Dataset:
    """Endless (lr, hr) batches for input pipeline `index` of `count`; with
    `degradation.on: replica`, (hr, seeds) batches instead, uint8 patches and their int64 seeds,
    which `degrade_batch` turns into the same (lr, hr) inside the train step.

    `seed` (default train.seed) should differ between pipelines so no two of them replay the
    same sample stream. `start_batch`: batches this pipeline delivered before (a resumed run,
    with the interrupted run's seed): the stream continues where it stopped, in the same pass of
    the data; see `_resume_point` for what is exact and what it costs.

    Every pipeline reads an equal share of the images (`records`) and each pass over its share
    reads the shards and row groups in a new order. Shard records are shuffled while still
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
        ds = records(cfg, cfg.data.train_split, index, count)
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
    return ds.prefetch(AUTOTUNE).with_options(_options())


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
        return records(cfg, cfg.data.train_split, index, count, size, seed=seed)
    from srtrain.data import shards

    h, w = shards.image_sizes(cfg, cfg.data.train_split, index, count)
    share = int(np.sum(np.minimum(h, w) >= size))
    if share == 0:
        raise ConfigError(f"data.patch_size: no training image of {cfg.data.source} is that big")
    ds = records(
        cfg, cfg.data.train_split, index, count, size, seed=seed, start_pass=position // share
    )
    return ds.skip(position % share)


# --- decoded-image cache ------------------------------------------------------------------------


@dataclass(frozen=True)
class DecodedCache:
    """A pipeline's share of the training images, decoded: image i is
    pixels[offsets[i] : offsets[i] + heights[i] * widths[i] * 3] in (H, W, 3) order."""

    pixels: np.ndarray  # uint8, flat
    offsets: np.ndarray  # int64
    heights: np.ndarray  # int64
    widths: np.ndarray  # int64


def available_memory() -> int:
    """Bytes this process may still allocate: MemAvailable, capped by the cgroup's limit less
    its usage (cgroup v2 memory.max, or v1 memory.limit_in_bytes)."""
    out = 2**62
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                out = int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2
            where = Path("/sys/fs/cgroup", path.lstrip("/"))
            limit, usage = where / "memory.max", where / "memory.current"
        elif "memory" in controllers.split(","):
            where = Path("/sys/fs/cgroup/memory", path.lstrip("/"))
            limit, usage = where / "memory.limit_in_bytes", where / "memory.usage_in_bytes"
        else:
            continue
        try:
            cap = limit.read_text().strip()
            if cap != "max" and int(cap) < 2**60:
                out = min(out, int(cap) - int(usage.read_text()))
        except (OSError, ValueError):
            pass
    return max(out, 0)


def decoded_cache_bytes(cfg: Config, index: int = 0, count: int = 1) -> tuple[int, int]:
    """(bytes, images) of the decoded cache of input pipeline `index` of `count`: its share of
    the training images big enough for a patch, at height x width x 3 bytes each (from the shard
    columns; no image is read)."""
    from srtrain.data import shards

    h, w = shards.image_sizes(cfg, cfg.data.train_split, index, count)
    keep = np.minimum(h, w) >= cfg.data.patch_size
    return int(np.sum(h[keep] * w[keep] * 3)), int(np.sum(keep))


# Kept free besides the cache: TensorFlow, the model, batches in flight.
MEMORY_MARGIN = 512 * 2**20


def decoded_cache(cfg: Config, index: int = 0, count: int = 1) -> DecodedCache | None:
    """The decoded cache of pipeline `index` of `count`, or None to read shards as usual.

    The memory it needs is checked before filling against `available_memory()` less 10% and
    MEMORY_MARGIN, and against a GB cap: `data.decoded_cache: true` falls back to window decoding
    with a warning when it does not fit; a cap in GB fails with one line (ConfigError).
    """
    option = cfg.data.decoded_cache
    if cfg.data.source == "samples" or option is False:
        return None
    need, n = decoded_cache_bytes(cfg, index, count)
    free = available_memory()
    usable = max(0, int(free * 0.9) - MEMORY_MARGIN)
    cap = usable if option is True else min(usable, int(option * 1e9))
    if need > cap:
        why = (
            f"the cap is {option:g} GB"
            if option is not True and option * 1e9 < usable
            else f"this worker has {usable / 1e9:.3g} GB available "
            f"({free / 1e9:.3g} GB free less a margin)"
        )
        text = (
            f"data.decoded_cache needs {need / 1e9:.3g} GB for {n:,} images, {why}; "
            f"set data.decoded_cache=false or use more workers"
        )
        if option is True:
            log.warning("%s; decoding patch windows instead (pipeline %d/%d)", text, index, count)
            return None
        raise ConfigError(text)
    t0 = time.perf_counter()
    cache = fill_cache(cfg, index, count, need, n)
    log.info(
        "pipeline %d/%d: decoded %d images into %.2f GB in %.1f s",
        index,
        count,
        n,
        need / 1e9,
        time.perf_counter() - t0,
    )
    return cache


def fill_cache(cfg: Config, index: int, count: int, need: int, n: int) -> DecodedCache:
    """Decodes the pipeline's share once (one pass, decodes in parallel on its CPUs)."""
    size = cfg.data.patch_size
    ds = records(cfg, cfg.data.train_split, index, count, size)
    ds = ds.map(lambda r: decode(r["image"]), num_parallel_calls=AUTOTUNE, deterministic=False)
    ds = ds.prefetch(AUTOTUNE).with_options(_options())
    pixels = np.empty(need, np.uint8)
    offsets, heights, widths, at = [], [], [], 0
    for img in ds.as_numpy_iterator():  # (H, W, 3)
        h, w, _ = img.shape
        if at + img.size > need or len(offsets) >= n:
            raise StorageError(f"{cfg.data.source}: an image is bigger than its shard columns say")
        pixels[at : at + img.size] = img.reshape(-1)
        offsets.append(at)
        heights.append(h)
        widths.append(w)
        at += img.size
    return DecodedCache(pixels, *(np.array(v, np.int64) for v in (offsets, heights, widths)))


_SCRATCH = threading.local()


def _put_dihedral(src: np.ndarray, code: int, dst: np.ndarray) -> None:
    """dst = one of the 8 flips and rotations of square src, as `random_dihedral` composes them:
    transpose (code & 4), then reverse the row order (code & 2), then each row (code & 1).
    OpenCV's transpose and flip run blocked, without the GIL, at memcpy speed."""
    if cv2 is None:
        x = src.transpose(1, 0, 2) if code & 4 else src
        x = x[::-1] if code & 2 else x
        np.copyto(dst, x[:, ::-1] if code & 1 else x)
        return
    flip = {1: 1, 2: 0, 3: -1}.get(code & 3)
    if code & 4:
        # A transpose reads its source column-wise: from the cold cache that costs several
        # times a copy, so the window is first copied (row-wise) into a buffer that stays in
        # this thread's CPU cache, and transposed from there.
        scratch = getattr(_SCRATCH, "buf", None)
        if scratch is None or scratch.shape != src.shape:
            scratch = _SCRATCH.buf = np.empty(src.shape, np.uint8)
        np.copyto(scratch, src)
        cv2.transpose(scratch, dst=dst)
        if flip is not None:
            cv2.flip(dst, flip, dst=dst)
    elif flip is not None:
        np.copyto(dst, src)
        cv2.flip(dst, flip, dst=dst)
    else:
        np.copyto(dst, src)


class _Busy:
    """Counts the cache generators now cutting a batch (inside a tf.data thread's Python call)."""

    def __init__(self) -> None:
        self.lock, self.count = threading.Lock(), 0

    def __enter__(self) -> None:
        with self.lock:
            self.count += 1

    def __exit__(self, *exc) -> None:
        with self.lock:
            self.count -= 1


_BUSY, _EXITING = _Busy(), threading.Event()


@atexit.register
def _stop_cache_generators() -> None:
    # A tf.data thread that is inside a generator when the interpreter finalises is killed with
    # pthread_exit, which aborts the process ("terminate called without an active exception",
    # exit code 134). Cache generators run non-stop, so end them first: each finishes its batch
    # and ends its stream.
    _EXITING.set()
    deadline = time.monotonic() + 10
    while _BUSY.count and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)  # the calls that end the streams


def _aligned_empty(shape: tuple[int, ...]) -> np.ndarray:
    """An uninitialised uint8 array at a 64-byte aligned address: TensorFlow takes it over as a
    tensor without copying (from_generator copies any other; that copy cost as much as cutting
    the patches)."""
    n = int(np.prod(shape))
    raw = np.empty(n + 64, np.uint8)
    at = -raw.ctypes.data % 64
    return raw[at : at + n].reshape(shape)


def cache_batch(cache: DecodedCache, size: int, batch: int, seed: int, n: int) -> np.ndarray:
    """Batch `n` of patches cut from the cache: (batch, size, size, 3) uint8.

    Each patch: a uniformly random image, a uniformly random size x size window of it, one of
    the 8 flips and rotations uniformly; all drawn from Philox keyed by (seed, n) alone, so any
    batch can be made again, and in any order.
    """
    rng = np.random.Generator(np.random.Philox(key=[seed % 2**64, n % 2**64]))
    image = rng.integers(0, len(cache.offsets), batch)
    h, w = cache.heights[image], cache.widths[image]
    u = rng.random((2, batch))  # floor(u * n) is uniform on 0..n-1
    top = np.minimum((u[0] * (h - size + 1)).astype(np.int64), h - size)
    left = np.minimum((u[1] * (w - size + 1)).astype(np.int64), w - size)
    code = rng.integers(0, 8, batch)
    out = _aligned_empty((batch, size, size, 3))
    for j in range(batch):
        i = image[j]
        img = cache.pixels[cache.offsets[i] : cache.offsets[i] + h[j] * w[j] * 3]
        img = img.reshape(h[j], w[j], 3)
        _put_dihedral(img[top[j] : top[j] + size, left[j] : left[j] + size], code[j], out[j])
    return out


def cached_batches(
    cache: DecodedCache, size: int, batch: int, seed: int, start_batch: int = 0
) -> tf.data.Dataset:
    """Endless (hr uint8 (B, S, S, 3), seeds (B, 2) int64) batches cut from a decoded cache:
    what the other training branches give the degradation, batch n from (seed, n) alone.

    A few Python generators (one per CPU, up to 4) make interleaved batches in parallel; the
    copies inside run without the GIL. One tf.data element per batch, never per patch.
    """
    workers = max(1, min(4, len(os.sched_getaffinity(0))))

    @tf.autograph.experimental.do_not_convert  # a Python generator: nothing to convert
    def stream(j: tf.Tensor) -> tf.data.Dataset:
        def gen(j: int):
            n = start_batch + int(j)
            while not _EXITING.is_set():
                with _BUSY:
                    hr = cache_batch(cache, size, batch, seed, n)
                yield n, hr
                n += workers

        spec = (
            tf.TensorSpec([], tf.int64),
            tf.TensorSpec([batch, size, size, 3], tf.uint8),
        )
        return tf.data.Dataset.from_generator(gen, output_signature=spec, args=(j,))

    ds = tf.data.Dataset.range(workers).interleave(
        stream,
        cycle_length=workers,
        block_length=1,
        num_parallel_calls=workers,
        deterministic=True,
    )

    def with_seeds(n, hr):
        # The noise seeds of batch n: unrelated to the crop draws (Philox vs fold_in).
        return hr, tf.random.experimental.stateless_split(element_seed(seed, n), batch)

    return ds.map(with_seeds)


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
        ds = records(cfg, split)
        ds = ds.filter(lambda r: tf.reduce_all(tf.stack(image_shape(r)) >= size))
        ds = ds.take(cfg.data.val_images) if cfg.data.val_images else ds
        ds = ds.shard(count, index) if count > 1 else ds
    else:
        ds = records(cfg, split, index, count, min_size=size, limit=cfg.data.val_images)

    def make_pair(r):
        # Full decode (not decode_and_crop_jpeg): evaluation pixels match any other decoder's,
        # and validation is not the hot path.
        hr = to_float(center_crop(decode(r["image"]), size))
        key = r["id"]
        lr = degrade_ops.degrade(hr, cfg.degradation, degrade_ops.eval_seed(cfg.degradation, key))
        return key, lr, hr

    ds = ds.map(make_pair, num_parallel_calls=AUTOTUNE, deterministic=True)
    return ds.batch(batch_size or cfg.data.batch_size).prefetch(AUTOTUNE).with_options(_options())
