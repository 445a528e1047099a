"""The decoded-image cache (`data.decoded_cache`): a training pipeline's share of a shard dataset,
decoded once into memory, and the endless batches of random patches cut from it.

Every patch of batch n is drawn from (seed, n) alone, so any batch can be made again in any
order; a resumed run continues at its batch. The memory it needs is checked before filling.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf

from srtrain.config import Config, ConfigError
from srtrain.data import shards
from srtrain.data.ops import dataset_options, decode, element_seed
from srtrain.storage import StorageError

try:  # blocked transposes and flips at memcpy speed; numpy otherwise
    import cv2
except ImportError:  # pragma: no cover
    cv2 = None

log = logging.getLogger("srtrain.data")


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
            log.warning(
                "%s; decoding patch windows instead (pipeline %d/%d; data.patches_per_image=2"
                " halves the decodes)",
                text,
                index,
                count,
            )
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
    ds = shards.records(cfg, cfg.data.train_split, index, count, size)
    ds = ds.map(
        lambda r: decode(r["image"]), num_parallel_calls=tf.data.AUTOTUNE, deterministic=False
    )
    ds = ds.prefetch(tf.data.AUTOTUNE).with_options(dataset_options())
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
        # times a copy (bench/README.md), so the window is first copied (row-wise) into a
        # buffer that stays in this thread's CPU cache, and transposed from there.
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
    tensor without copying (from_generator copies any other: bench/README.md)."""
    n = int(np.prod(shape))
    raw = np.empty(n + 64, np.uint8)
    at = -raw.ctypes.data % 64
    return raw[at : at + n].reshape(shape)


class BatchBuffers:
    """Aligned batch buffers, each handed out again once nothing holds the array last made in it.

    TensorFlow takes a generator's array over without copying and lets go of it when the batch
    is spent; a fresh buffer for every batch costs the kernel's page faults and zeroing, about as
    much CPU as cutting the batch (bench/README.md). Up to `most` buffers are kept; while all are
    in use, `take` returns a fresh one. A buffer is only added while all kept ones are held, so
    the pool keeps the most batches the pipeline held at once (at most `most`), memory it used
    at that moment anyway. For one thread.
    """

    def __init__(self, shape: tuple[int, ...], most: int = 8) -> None:
        self.shape, self.most = shape, most
        self.slots: list[tuple[np.ndarray, weakref.ref]] = []  # (memory, the array handed out)

    def take(self) -> np.ndarray:
        for i, (memory, handed) in enumerate(self.slots):
            if handed() is None:
                out = memory.view()  # a new array over the same memory
                self.slots[i] = (memory, weakref.ref(out))
                return out
        memory = _aligned_empty(self.shape)
        out = memory.view()
        if len(self.slots) < self.most:
            self.slots.append((memory, weakref.ref(out)))
        return out


def cache_batch(
    cache: DecodedCache,
    size: int,
    batch: int,
    seed: int,
    n: int,
    buffers: BatchBuffers | None = None,
) -> np.ndarray:
    """Batch `n` of patches cut from the cache: (batch, size, size, 3) uint8, in a buffer of
    `buffers` when given.

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
    out = buffers.take() if buffers is not None else _aligned_empty((batch, size, size, 3))
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
            buffers = BatchBuffers((batch, size, size, 3))
            while not _EXITING.is_set():
                with _BUSY:
                    hr = cache_batch(cache, size, batch, seed, n, buffers)
                yield n, hr
                del hr  # only TensorFlow holds the batch now: its buffer returns when it is spent
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
