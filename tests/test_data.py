"""The tf.data pipeline: patch decoding, augmentation, batch degradation, shard reading."""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from srtrain import data
from srtrain import degrade as degrade_ops
from srtrain.config import load_config
from srtrain.data import builder, decoded, ops, shards


def encoded(fmt: str, w: int = 300, h: int = 280, seed: int = 0) -> tuple[bytes, np.ndarray]:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue(), arr


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A local shard dataset of 24 synthetic JPEG/PNG photos in 6 train shards."""
    src = tmp_path_factory.mktemp("photos")
    for i in range(24):
        fmt = "PNG" if i % 4 == 0 else "JPEG"
        data_bytes, _ = encoded(fmt, 260 + 7 * i, 256 + 3 * i, seed=i)
        (src / f"p{i:02d}.{fmt.lower()}").write_bytes(data_bytes)
    dest = tmp_path_factory.mktemp("shards")
    m = builder.build(
        str(src),
        str(dest),
        split={"train": 0.75, "val": 0.25},
        shard_size=60_000,
        workers=1,
        progress=False,
    )
    assert len(m["splits"]["train"]["shards"]) >= 4
    return dest, m


def cfg_for(dest, *extra):
    return load_config(
        None, [f"data.source={dest}", "data.patch_size=64", "data.batch_size=4", *extra]
    )


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_decode_window_equals_decode_then_slice(fmt):
    img, _ = encoded(fmt)
    full = ops.decode(tf.constant(img)).numpy()
    win = ops.decode_window(tf.constant(img), tf.constant(17), tf.constant(40), 64).numpy()
    ref = full[17:81, 40:104]
    # libjpeg's chroma upsampling sees no neighbour beyond the window's last column/row.
    np.testing.assert_array_equal(win[:-1, :-1], ref[:-1, :-1])
    assert np.abs(win.astype(int) - ref).mean() < 0.5


def test_image_shape_from_header_or_columns():
    jpg, _ = encoded("JPEG", 300, 280)
    png, _ = encoded("PNG", 290, 270)
    for blob, hw in ((jpg, (280, 300)), (png, (270, 290))):
        h, w = ops.image_shape({"image": tf.constant(blob)})
        assert (int(h), int(w)) == hw
    h, w = ops.image_shape({"image": tf.constant(b""), "height": 5, "width": 6})
    assert (h, w) == (5, 6)


def test_random_window_is_uniform_over_valid_offsets():
    tops, lefts = [], []
    for i in range(2000):
        t, left = ops.random_window(tf.constant(70), tf.constant(67), 64, tf.constant([i, 7]))
        tops.append(int(t))
        lefts.append(int(left))
    assert sorted(set(tops)) == list(range(7)) and sorted(set(lefts)) == list(range(4))
    counts = np.bincount(tops) / len(tops)
    assert np.all(np.abs(counts - 1 / 7) < 0.03), counts


def test_random_patch_is_a_flip_rot90_of_a_window():
    blob, arr = encoded("PNG", 100, 90)
    patch = ops.random_patch(
        tf.constant(blob), tf.constant(90), tf.constant(100), 64, tf.constant([3, 4], tf.int64)
    ).numpy()
    assert any(
        np.array_equal(patch, c)
        for top in range(90 - 63)
        for left in range(100 - 63)
        for c in dihedral_images(arr[top : top + 64, left : left + 64])
    )


def dihedral_images(arr: np.ndarray) -> list[np.ndarray]:
    """The 8 flips and rotations of a square image: left-right flip or not, then rot90 k."""
    return [np.rot90(f, k) for f in (arr, arr[:, ::-1]) for k in range(4)]


def test_random_dihedral_draws_each_of_the_8_uniformly():
    arr = np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8)
    options = dihedral_images(arr)
    assert len({o.tobytes() for o in options}) == 8
    counts = np.zeros(8)
    n = 800
    for i in range(n):
        out = ops.random_dihedral(tf.constant(arr), tf.constant([i, 11], tf.int64)).numpy()
        counts[[j for j, o in enumerate(options) if np.array_equal(out, o)]] += 1
    assert counts.sum() == n  # every output is one of the 8
    assert np.all(np.abs(counts / n - 1 / 8) < 0.04), counts


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_random_patches_are_transformed_windows_of_one_decode(fmt):
    blob, arr = encoded(fmt, 100, 90, seed=3)
    if fmt == "JPEG":  # compare with this decoder's pixels, not the array before compression
        arr = ops.decode(tf.constant(blob)).numpy()
    out = ops.random_patches(
        tf.constant(blob), tf.constant(90), tf.constant(100), 64, tf.constant([5, 6], tf.int64), 3
    ).numpy()
    assert out.shape == (3, 64, 64, 3)
    for patch in out:
        best = min(
            np.abs(patch.astype(int) - c.astype(int)).mean()
            for top in range(90 - 63)
            for left in range(100 - 63)
            for c in dihedral_images(arr[top : top + 64, left : left + 64])
        )
        # PNG: exact. JPEG: the window decode differs from the whole decode only where chroma
        # upsampling meets the window's edge.
        assert best == 0 if fmt == "PNG" else best < 0.5


@pytest.fixture(scope="module")
def solid_dataset(tmp_path_factory):
    """12 photos, each one solid colour: a patch's colour names the photo it came from."""
    src = tmp_path_factory.mktemp("solid")
    for i in range(12):
        Image.new("RGB", (90 + 5 * i, 80), (20 * i, 250 - 20 * i, 60)).save(src / f"s{i:02d}.png")
    dest = tmp_path_factory.mktemp("solid-shards")
    builder.build(
        str(src),
        str(dest),
        split={"train": 1.0},
        shard_size=2_000,
        min_size=64,
        workers=1,
        progress=False,
    )
    return dest


def test_patches_per_image_puts_each_photo_once_per_batch(solid_dataset):
    # No record shuffle: 12 photos make 3 groups of 4 per pass, so a repeated colour in a batch
    # could only be two patches of one decode.
    cfg = cfg_for(
        solid_dataset,
        "data.patches_per_image=2",
        "data.shuffle_buffer=1",
        "degradation.noise_sigma=0",
    )
    seen = []
    batches = list(data.train_dataset(cfg, seed=3).take(24))
    for lr, hr in batches:
        assert lr.shape == (4, 32, 32, 3) and hr.shape == (4, 64, 64, 3)
        colours = np.round(hr.numpy()[:, 0, 0, 0] * 255 / 20).astype(int)
        assert len(set(colours)) == 4, colours  # no two siblings in one batch
        seen += list(colours)
    counts = np.bincount(seen, minlength=12)
    # 4 passes x 2 patches each, give or take the batches the batch shuffle moves across the end
    assert counts.sum() == 96 and counts.min() >= 6 and counts.max() <= 10, counts
    again = list(data.train_dataset(cfg, seed=3).take(24))
    for (a, b), (c, d) in zip(batches, again, strict=True):  # reproducible from the seed
        np.testing.assert_array_equal(a.numpy(), c.numpy())
        np.testing.assert_array_equal(b.numpy(), d.numpy())


def test_gaussian_noise_is_standard_normal():
    z = ops.gaussian_noise(tf.constant([200, 101, 3]), tf.constant([1, 2], tf.int64), 2.0)
    z = z.numpy()
    assert z.shape == (200, 101, 3)
    assert abs(z.mean()) < 0.02 and abs(z.std() - 2.0) < 0.02
    assert abs((np.abs(z) > 2.0).mean() - 0.3173) < 0.01  # P(|N(0,1)| > 1)


def test_degrade_batch_matches_degrade_without_noise():
    cfg = load_config(None, ["degradation.noise_sigma=0", "data.channel_shuffle=false"])
    hr = tf.cast(tf.random.stateless_uniform([3, 64, 64, 3], [1, 2]) * 255, tf.uint8)
    lr, hr_f = ops.degrade_batch(hr, tf.constant([[1, 2]] * 3, tf.int64), cfg)
    expect = degrade_ops.degrade(ops.to_float(hr), cfg.degradation, tf.constant([0, 0]))
    np.testing.assert_allclose(lr.numpy(), expect.numpy(), atol=1e-6)
    assert hr_f.dtype == tf.float32 and lr.shape == (3, 32, 32, 3)


def test_channel_shuffle_draws_each_of_the_6_orders_and_degrades_the_shuffled_patch():
    cfg = load_config(None, ["data.channel_shuffle=true"])
    plain = load_config(None, ["data.channel_shuffle=false"])
    # Every patch's channels hold distinct constants, so the order each got can be read back.
    hr = tf.cast(tf.constant([[[[10, 120, 240]]]]), tf.uint8) * tf.ones([600, 8, 8, 1], tf.uint8)
    seeds = tf.constant([[5, 6]] * 600, tf.int64)
    lr, hr_f = ops.degrade_batch(hr, seeds, cfg)
    orders = np.rint(hr_f.numpy() * 255).astype(int)
    assert (orders == orders[:, :1, :1]).all()  # one order per patch, for all its pixels
    counts = {}
    for order in map(tuple, orders[:, 0, 0]):
        assert sorted(order) == [10, 120, 240]
        counts[order] = counts.get(order, 0) + 1
    assert len(counts) == 6 and min(counts.values()) >= 70, counts  # 100 expected each
    # The LR is the degradation of the shuffled patch, with the same noise as without shuffling.
    shuffled_uint8 = tf.cast(tf.round(hr_f * 255), tf.uint8)
    lr_plain, _ = ops.degrade_batch(shuffled_uint8, seeds, plain)
    np.testing.assert_allclose(lr.numpy(), lr_plain.numpy(), atol=1e-6)
    # The orders come from the seeds: the same seeds give them again, others give others.
    _, again = ops.degrade_batch(hr, seeds, cfg)
    np.testing.assert_array_equal(again.numpy(), hr_f.numpy())
    _, other = ops.degrade_batch(hr, seeds + 1, cfg)
    assert (other.numpy()[:, 0, 0] != hr_f.numpy()[:, 0, 0]).any(axis=1).mean() > 0.5


def test_train_dataset_from_shards(dataset):
    dest, _ = dataset
    cfg = cfg_for(dest)
    batches = list(data.train_dataset(cfg, seed=5).take(3))
    for lr, hr in batches:
        assert lr.shape == (4, 32, 32, 3) and hr.shape == (4, 64, 64, 3)
        assert (
            lr.dtype == tf.float32
            and 0 <= float(tf.reduce_min(lr)) <= float(tf.reduce_max(lr)) <= 1
        )
    again = list(data.train_dataset(cfg, seed=5).take(3))
    for (a, b), (c, d) in zip(batches, again, strict=True):  # reproducible from the seed
        np.testing.assert_array_equal(a.numpy(), c.numpy())
        np.testing.assert_array_equal(b.numpy(), d.numpy())


def test_eval_dataset_is_deterministic_and_complete(dataset):
    dest, m = dataset
    cfg = cfg_for(dest, "data.val_patch_size=128")
    ids = [k for k, _, _ in data.eval_dataset(cfg).unbatch().as_numpy_iterator()]
    assert len(ids) == m["splits"]["val"]["images"]
    a = [x.numpy() for _, x, _ in data.eval_dataset(cfg)]
    b = [x.numpy() for _, x, _ in data.eval_dataset(cfg)]
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)


def test_pipelines_read_disjoint_equal_shares_and_say_so(dataset, caplog):
    dest, m = dataset
    cfg = cfg_for(dest)
    for count in (2, 3, 5):
        seen = []
        with caplog.at_level(logging.INFO, logger="srtrain.data"):
            for i in range(count):
                ids = shards.records(cfg, "train", i, count).map(lambda r: r["id"])
                seen.append([x.decode() for x in ids.as_numpy_iterator()])
        flat = [x for part in seen for x in part]
        assert sorted(flat) == sorted(set(flat)) and len(flat) == m["splits"]["train"]["images"]
        assert max(map(len, seen)) - min(map(len, seen)) <= 1, [len(p) for p in seen]
    lines = [r.getMessage() for r in caplog.records if " reads " in r.getMessage()]
    assert lines[0].startswith("pipeline 0/2 reads 8 of 16 train images: train-00000.parquet[0:1]")


def test_records_leave_out_images_below_min_size(dataset):
    dest, m = dataset
    cfg = cfg_for(dest)
    rows = [
        r
        for sh in m["splits"]["train"]["shards"]
        for r in shards.read_shard(f"{dest}/{sh['name']}")
    ]
    expect = {i for i, _, h, w in rows if min(h, w) >= 300}
    assert 0 < len(expect) < len(rows)
    got = shards.records(cfg, "train", min_size=300).map(lambda r: r["id"]).as_numpy_iterator()
    assert {x.decode() for x in got} == expect


def test_unknown_split_is_a_config_error(dataset):
    from srtrain.config import ConfigError

    dest, _ = dataset
    with pytest.raises(ConfigError, match="has splits train, val"):
        shards.records(cfg_for(dest), "test")


def test_missing_shard_fails_fast(dataset, tmp_path):
    from srtrain.storage import StorageError

    dest, m = dataset
    for p in dest.iterdir():
        (tmp_path / p.name).write_bytes(p.read_bytes())
    victim = m["splits"]["train"]["shards"][1]["name"]
    (tmp_path / victim).unlink()
    with pytest.raises(StorageError, match=rf"{victim}: shard listed in the manifest is missing"):
        data.train_dataset(cfg_for(tmp_path))


def test_samples_pipeline_still_works():
    cfg = load_config(None, ["data.patch_size=64", "data.batch_size=2"])
    lr, hr = next(iter(data.train_dataset(cfg)))
    assert lr.shape == (2, 32, 32, 3) and hr.shape == (2, 64, 64, 3)


# --- worker shares, passes, resume ----------------------------------------------------------------


@pytest.fixture(scope="module")
def coded_dataset(tmp_path_factory):
    """12 PNG photos in 3 equal shards of 2-image row groups; a pixel tells its photo (red) and
    its position in it (green = row, blue = column). Side - 63 is a multiple of 4 (4 a), so the
    quarter of the range a crop offset falls in is uniform on 0..3."""
    src = tmp_path_factory.mktemp("coded")
    for i in range(12):
        a_h, a_w = 1 + i % 4, 1 + i // 4
        h, w = 63 + 4 * a_h, 63 + 4 * a_w
        arr = np.zeros((h, w, 3), np.uint8)
        arr[..., 0] = 10 + 20 * i
        arr[..., 1] = np.arange(h)[:, None]
        arr[..., 2] = np.arange(w)[None, :]
        Image.fromarray(arr).save(src / f"c{i:02d}.png")
    dest = tmp_path_factory.mktemp("coded-shards")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(builder, "ROW_GROUP", 2)
        size = max(p.stat().st_size for p in src.iterdir())
        m = builder.build(
            str(src),
            str(dest),
            split={"train": 1.0},
            shard_size=4 * size - size // 2,  # 4 photos a shard
            min_size=64,
            workers=1,
            progress=False,
        )
    assert [s["images"] for s in m["splits"]["train"]["shards"]] == [4, 4, 4]
    return dest


def coded_cfg(dest, *extra):
    return cfg_for(dest, "degradation.noise_sigma=0", "data.batch_size=64", *extra)


def test_three_shards_two_pipelines_read_equal_shares(coded_dataset):
    # Whole shards dealt round robin would give 8 and 4 photos.
    cfg = coded_cfg(coded_dataset)
    seen = [
        sorted(
            x.decode()
            for x in shards.records(cfg, "train", i, 2).map(lambda r: r["id"]).as_numpy_iterator()
        )
        for i in range(2)
    ]
    assert [len(s) for s in seen] == [6, 6] and not set(seen[0]) & set(seen[1])


def test_every_pass_reads_the_share_once_in_a_new_order(coded_dataset):
    cfg = coded_cfg(coded_dataset)

    def read_ids() -> list[str]:
        ds = shards.records(cfg, "train", seed=3).take(36).map(lambda r: r["id"])
        return [x.decode() for x in ds.as_numpy_iterator()]

    ids = read_ids()
    passes = [ids[0:12], ids[12:24], ids[24:36]]
    assert all(sorted(p) == sorted(passes[0]) and len(set(p)) == 12 for p in passes)
    assert len({tuple(p) for p in passes}) == 3  # shard and row-group order differ per pass
    assert read_ids() == ids  # from the seed


def test_resume_continues_the_stream_where_it_stopped(coded_dataset):
    # Without the record shuffle the continuation is exact: same records, same seeds.
    cfg = coded_cfg(coded_dataset, "data.shuffle_buffer=1", "data.batch_size=5")
    whole = [hr.numpy() for _, hr in data.train_dataset(cfg, seed=9).take(8)]
    rest = [hr.numpy() for _, hr in data.train_dataset(cfg, seed=9, start_batch=6).take(2)]
    # 6 batches of 5 = 30 records: pass 2, offset 6 of 12
    for a, b in zip(whole[6:], rest, strict=True):
        np.testing.assert_array_equal(a, b)


def test_validation_reads_only_each_workers_part(dataset, monkeypatch):
    dest, m = dataset
    read = []
    real = shards.read_shard_blocks

    def spy(*args, **kwargs):
        for block in real(*args, **kwargs):
            read.extend(block[0])  # ids
            yield block

    monkeypatch.setattr(shards, "read_shard_blocks", spy)
    for cap in (0, 5):
        cfg = cfg_for(dest, "data.val_patch_size=64", f"data.val_images={cap}")
        parts = []
        for i in range(2):
            read.clear()
            ids = [
                k.decode()
                for k, _, _ in data.eval_dataset(cfg, index=i, count=2)
                .unbatch()
                .as_numpy_iterator()
            ]
            assert sorted(read) == sorted(ids)  # read nothing but its part
            parts.append(ids)
        assert not set(parts[0]) & set(parts[1])
        assert len(parts[0]) + len(parts[1]) == (cap or m["splits"]["val"]["images"])


# --- decoded-image cache ------------------------------------------------------------------------


def patch_stats(hr: np.ndarray) -> tuple[int, int, int]:
    """(photo, crop cell 0..15, dihedral 0..7) of a uint8 patch of a `coded_dataset` photo."""
    photo = (int(hr[0, 0, 0]) - 10) // 20
    a_h, a_w = 1 + photo % 4, 1 + photo // 4
    y, x = hr[..., 1].astype(int), hr[..., 2].astype(int)
    top, left = y.min(), x.min()
    corner = 2 * int(y[0, 0] != top) + int(x[0, 0] != left)
    along_rows = int(y[0, 1] == y[0, 0])  # the first row runs along the photo's row
    return photo, 4 * (top // a_h) + left // a_w, 2 * corner + along_rows


def histograms(batches) -> list[np.ndarray]:
    stats = np.array([patch_stats(p) for hr in batches for p in hr])
    return [np.bincount(stats[:, j], minlength=n) for j, n in enumerate((12, 16, 8))]


def chi2_uniform(counts: np.ndarray) -> float:
    expect = counts.sum() / len(counts)
    return float(((counts - expect) ** 2 / expect).sum())


def chi2_same(a: np.ndarray, b: np.ndarray) -> float:
    """Chi-square statistic of homogeneity of two histograms (equal totals)."""
    both = a + b
    ok = both > 0
    return float(((a[ok] - b[ok]) ** 2 / both[ok]).sum())


# p = 0.001 points of chi-square with 11, 15 and 7 degrees of freedom
BOUNDS = (31.3, 37.7, 24.3)


def test_decoded_cache_draws_patches_like_window_decoding(coded_dataset, monkeypatch):
    cfg = coded_cfg(coded_dataset, "data.shuffle_buffer=12")
    cached = coded_cfg(coded_dataset, "data.decoded_cache=true")
    n = 24  # batches of 64
    plain = histograms(
        (hr.numpy() * 255).round().astype(np.uint8)
        for _, hr in data.train_dataset(cfg, seed=1).take(n)
    )
    fast = histograms(
        (hr.numpy() * 255).round().astype(np.uint8)
        for _, hr in data.train_dataset(cached, seed=1).take(n)
    )
    for p, f, bound in zip(plain, fast, BOUNDS, strict=True):
        assert p.sum() == f.sum() == 64 * n
        assert chi2_uniform(p) < bound and chi2_uniform(f) < bound, (p, f)
        assert chi2_same(p, f) < bound, (p, f)
    # The same check on a cache whose batches all come from one seed fails.
    real = decoded.cache_batch

    def stuck_batch(c, s, b, seed, n, buffers=None):
        return real(c, s, b, seed, 0, buffers)

    monkeypatch.setattr(decoded, "cache_batch", stuck_batch)
    stuck = histograms(
        hr.numpy()
        for hr, _ in decoded.cached_batches(decoded.decoded_cache(cached), 64, 64, 1).take(n)
    )
    assert all(chi2_uniform(h) > bound for h, bound in zip(stuck, BOUNDS, strict=True))


def test_decoded_cache_is_reproducible_and_resumable(coded_dataset):
    cache = decoded.decoded_cache(coded_cfg(coded_dataset, "data.decoded_cache=true"))
    assert len(cache.offsets) == 12 and cache.pixels.size == int(
        (cache.heights * cache.widths * 3).sum()
    )
    whole = list(decoded.cached_batches(cache, 64, 8, 5).take(6).as_numpy_iterator())
    rest = list(decoded.cached_batches(cache, 64, 8, 5, start_batch=4).take(2).as_numpy_iterator())
    for (a, s), (b, t) in zip(whole[4:], rest, strict=True):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(s, t)
    hr, seeds = whole[0]
    assert hr.dtype == np.uint8 and hr.shape == (8, 64, 64, 3) and seeds.shape == (8, 2)
    photos = [
        cache.pixels[o : o + h * w * 3].reshape(h, w, 3)
        for o, h, w in zip(cache.offsets, cache.heights, cache.widths, strict=True)
    ]
    for patch in hr:  # a flip/rotation of a window of the photo its pixels name
        img = next(p for p in photos if p[0, 0, 0] == patch[0, 0, 0])
        top, left = int(patch[..., 1].min()), int(patch[..., 2].min())
        window = img[top : top + 64, left : left + 64]
        assert any(np.array_equal(patch, c) for c in dihedral_images(window))
    assert len({tuple(s) for _, ss in whole for s in ss}) == 48  # fresh noise seed per patch


def test_batch_buffers_come_back_only_when_let_go():
    buffers = decoded.BatchBuffers((2, 4, 4, 3), most=2)
    a = buffers.take()
    assert a.ctypes.data % 64 == 0 and a.shape == (2, 4, 4, 3) and a.dtype == np.uint8
    b = buffers.take()
    assert b.ctypes.data != a.ctypes.data  # a is still held
    at = a.ctypes.data
    del a
    c = buffers.take()
    assert c.ctypes.data == at  # a's memory, handed out again
    d = buffers.take()  # both kept buffers held: a fresh one, not kept
    assert d.ctypes.data not in (b.ctypes.data, c.ctypes.data) and len(buffers.slots) == 2


def test_decoded_cache_batches_held_stay_intact(coded_dataset):
    # Holding every batch (more than the buffers a generator keeps) while the pipeline runs on:
    # no batch may be cut into a buffer a held one still uses.
    cache = decoded.decoded_cache(coded_cfg(coded_dataset, "data.decoded_cache=true"))
    held = list(decoded.cached_batches(cache, 32, 4, 3).take(40))
    for n, (hr, _) in enumerate(held):
        np.testing.assert_array_equal(hr.numpy(), decoded.cache_batch(cache, 32, 4, 3, n))


def test_decoded_cache_memory_check(coded_dataset, monkeypatch, caplog):
    from srtrain.config import ConfigError

    need, n = decoded.decoded_cache_bytes(coded_cfg(coded_dataset))
    sides = [(63 + 4 * (1 + i % 4), 63 + 4 * (1 + i // 4)) for i in range(12)]
    assert (need, n) == (sum(3 * h * w for h, w in sides), 12)
    with pytest.raises(ConfigError) as e:
        data.train_dataset(coded_cfg(coded_dataset, "data.decoded_cache=1e-6"))
    assert str(e.value) == (
        f"data.decoded_cache needs {need / 1e9:.3g} GB for 12 images, the cap is 1e-06 GB; "
        "set data.decoded_cache=false or use more workers"
    )
    monkeypatch.setattr(decoded, "available_memory", lambda: 2**20)
    with pytest.raises(ConfigError, match="this worker has 0 GB available"):
        data.train_dataset(coded_cfg(coded_dataset, "data.decoded_cache=5"))
    with caplog.at_level(logging.WARNING, logger="srtrain.data"):
        _, hr = next(iter(data.train_dataset(coded_cfg(coded_dataset, "data.decoded_cache=true"))))
    assert hr.shape == (64, 64, 64, 3)  # window decoding instead
    assert any("decoding patch windows instead" in r.getMessage() for r in caplog.records)


def test_decoded_cache_option_parses():
    from srtrain.config import ConfigError

    assert load_config(None, ["data.decoded_cache=true"]).data.decoded_cache is True
    assert load_config(None, ["data.decoded_cache=2"]).data.decoded_cache == 2.0
    assert load_config(None).data.decoded_cache is False
    for bad in ("0", "-1", "lots"):
        with pytest.raises(ConfigError, match=r"^data\.decoded_cache: got"):
            load_config(None, [f"data.decoded_cache={bad}"])


def test_cache_dihedral_matches_the_numpy_definition(monkeypatch):
    src = np.random.default_rng(1).integers(0, 255, (20, 30, 3), dtype=np.uint8)[2:18, 5:21]
    fast = []
    for code in range(8):
        dst = np.empty((16, 16, 3), np.uint8)
        decoded._put_dihedral(src, code, dst)
        fast.append(dst)
    monkeypatch.setattr(decoded, "cv2", None)
    for code in range(8):
        dst = np.empty((16, 16, 3), np.uint8)
        decoded._put_dihedral(src, code, dst)
        np.testing.assert_array_equal(dst, fast[code])
    assert len({f.tobytes() for f in fast}) == 8
    assert {f.tobytes() for f in fast} == {c.tobytes() for c in dihedral_images(src)}
