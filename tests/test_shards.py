"""Shard builder, manifest, inspect/verify CLI and the streaming reader (local and SeaweedFS S3)."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import tarfile
import time
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
from cli import run_srtrain
from PIL import Image

from srtrain import run
from srtrain.data import __main__ as data_cli
from srtrain.data import builder, manifest, samples, shards
from srtrain.storage import StorageError

# Planted bad files and the reason the manifest must give for each.
PLANTED = {
    "bad/zero.jpg": "empty file",
    "bad/truncated.jpg": "corrupt or truncated",
    "bad/garbage.png": "not an image",
    "bad/tiny.png": "too small",
}
REPO = Path(__file__).resolve().parents[1]


def photo(w: int, h: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    return Image.fromarray(arr).convert(mode)


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def plant_bad_files(root: Path) -> None:
    (root / "bad").mkdir(parents=True, exist_ok=True)
    (root / "bad/zero.jpg").write_bytes(b"")
    (root / "bad/truncated.jpg").write_bytes(encode(photo(300, 300), "JPEG")[:2000])
    (root / "bad/garbage.png").write_bytes(b"this is not a png")
    (root / "bad/tiny.png").write_bytes(encode(photo(100, 80), "PNG"))


def plant_bundled_photos(root: Path, count: int) -> list[str]:
    """Copies the first `count` photos that ship with scikit-image / scikit-learn into
    root/photos, byte for byte (PNG and JPEG, colour and grayscale, 300 to 1,400 pixels a side),
    and three photos too small to train on into root/small; returns the small ones' paths."""
    (root / "photos").mkdir(parents=True, exist_ok=True)
    for name, package, filename in samples.PHOTOS[:count]:
        data = resources.files(package).joinpath(filename).read_bytes()
        (root / "photos" / f"{name}{Path(filename).suffix}").write_bytes(data)
    (root / "small").mkdir(exist_ok=True)
    small = []
    for i, (w, h) in enumerate(((200, 180), (255, 300), (300, 120))):
        (root / "small" / f"{i}.png").write_bytes(encode(photo(w, h, seed=10 + i), "PNG"))
        small.append(f"small/{i}.png")
    return small


def make_source(root: Path) -> Path:
    """A small folder of real and synthetic photos in every format the builder reads, plus
    bad files."""
    root.mkdir(parents=True, exist_ok=True)
    plant_bundled_photos(root, 8)
    (root / "synth").mkdir(exist_ok=True)
    (root / "synth/cmyk.jpg").write_bytes(encode(photo(300, 280, "CMYK", 1), "JPEG"))
    (root / "synth/gray.png").write_bytes(encode(photo(290, 300, "L", 2), "PNG"))
    (root / "synth/pal.bmp").write_bytes(encode(photo(320, 260, "P", 3), "BMP"))
    (root / "synth/rgb.jpg").write_bytes(encode(photo(400, 300, "RGB", 4), "JPEG", quality=95))
    (root / "synth/notes.txt").write_text("not an image extension: ignored")
    plant_bad_files(root)
    return root


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return make_source(tmp_path_factory.mktemp("src"))


@pytest.fixture(scope="module")
def built(source, tmp_path_factory) -> tuple[Path, dict]:
    dest = tmp_path_factory.mktemp("shards")
    m = builder.build(str(source), str(dest), shard_size=256 * 1024, workers=2, progress=False)
    return dest, m


# --- split, ids, sizes --------------------------------------------------------------------------


def test_split_is_a_stable_function_of_the_id():
    ids = [f"{d:02d}/{d * 1000 + i}" for d in range(41) for i in range(250)]
    first = {i: builder.split_of(i, builder.DEFAULT_SPLIT) for i in ids}
    again = {i: builder.split_of(i, builder.DEFAULT_SPLIT) for i in reversed(ids)}
    assert first == again
    counts = {s: sum(v == s for v in first.values()) / len(ids) for s in builder.DEFAULT_SPLIT}
    for name, frac in builder.DEFAULT_SPLIT.items():
        assert abs(counts[name] - frac) < 0.015, counts
    # Adding images never moves the existing ones; another seed gives another split.
    assert builder.split_of("new/1", builder.DEFAULT_SPLIT) in builder.DEFAULT_SPLIT
    other = {i: builder.split_of(i, builder.DEFAULT_SPLIT, seed=1) for i in ids}
    assert other != first


def test_parse_split_and_size():
    assert builder.parse_split("train=2,val=1,test=1") == {"train": 0.5, "val": 0.25, "test": 0.25}
    for bad in ("train", "train=x", "=0.5", "train=-1", "train=0"):
        with pytest.raises(builder.BuildError, match="--split"):
            builder.parse_split(bad)
    assert builder.parse_size("128MB") == 128 * 2**20
    assert builder.parse_size("64KiB") == 64 * 2**10
    assert builder.parse_size("1000") == 1000
    with pytest.raises(builder.BuildError, match="--shard-size"):
        builder.parse_size("big")


def test_image_ids():
    assert builder.image_id("iaprtc12/images/17/17975.jpg") == "17/17975"
    assert builder.image_id("./images/00/25.jpg") == "00/25"
    assert builder.image_id("bsd200/100075.png") == "bsd200/100075"


# --- sources and the builder ------------------------------------------------------------------


def test_archive_is_read_without_extracting(tmp_path):
    arc = tmp_path / "iaprtc12.tgz"
    with tarfile.open(arc, "w:gz") as tar:
        members = {
            "iaprtc12/images/00/1.jpg": encode(photo(320, 300, seed=1), "JPEG"),
            "iaprtc12/images/17/17975.jpg": encode(photo(320, 300, seed=2), "JPEG")[:1500],
            "iaprtc12/images/19/19579.jpg": b"",
            "iaprtc12/annotations_complete_eng/00/1.eng": b"<DOC>a photo</DOC>",
        }
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    read = dict(builder.iter_archive(str(arc)))
    assert sorted(read) == sorted(n for n in members if n.endswith(".jpg"))
    m = builder.build(str(arc), str(tmp_path / "out"), progress=False, workers=1)
    assert m["images"] == 1
    assert {s["path"]: s["reason"].split(" (")[0] for s in m["skipped"]} == {
        "iaprtc12/images/17/17975.jpg": "corrupt or truncated",
        "iaprtc12/images/19/19579.jpg": "empty file",
    }
    ids = [
        r[0]
        for s in m["splits"].values()
        for sh in s["shards"]
        for r in shards.read_shard(str(tmp_path / "out" / sh["name"]))
    ]
    assert ids == ["00/1"]


def test_manifest_lists_shards_counts_and_every_planted_file(built, source):
    dest, m = built
    assert json.loads((dest / "manifest.json").read_text()) == m
    reasons = {s["path"]: s["reason"] for s in m["skipped"]}
    for path, why in PLANTED.items():
        assert reasons[path].startswith(why), reasons
    assert "synth/notes.txt" not in reasons
    kept = sum(s["images"] for s in m["splits"].values())
    assert kept == m["images"]
    n_inputs = sum(1 for p in source.rglob("*") if p.suffix in (".png", ".jpg", ".bmp"))
    assert kept + len(m["skipped"]) == n_inputs
    for s in m["splits"].values():
        for sh in s["shards"]:
            assert (dest / sh["name"]).stat().st_size == sh["bytes"]
    assert len(m["splits"]["train"]["shards"]) >= 2


def test_shards_keep_the_original_bytes(built, source):
    dest, m = built
    rows = [
        r
        for s in m["splits"].values()
        for sh in s["shards"]
        for r in shards.read_shard(
            str(dest / sh["name"]), columns=("id", "path", "image", "height", "width")
        )
    ]
    assert len({r[0] for r in rows}) == len(rows)
    for _id, path, data, h, w in rows:
        assert data == (source / path).read_bytes()
        assert Image.open(io.BytesIO(data)).size == (w, h)


def test_rebuild_gives_identical_shards(built, source, tmp_path):
    dest, _ = built
    builder.build(str(source), str(tmp_path), shard_size=256 * 1024, workers=1, progress=False)
    for p in dest.iterdir():
        assert (tmp_path / p.name).read_bytes() == p.read_bytes(), p.name


def test_train_scales_copy_train_photos_only_and_keep_the_splits(built, source, tmp_path):
    dest, plain = built
    m = builder.build(
        str(source), str(tmp_path), shard_size=256 * 1024, workers=2, progress=False,
        train_scales=(0.8, 0.5), min_size=plain["min_size"],
    )  # fmt: skip

    def by_split(root: Path, manifest: dict) -> dict[str, dict[str, dict]]:
        cols = ("id", "height", "width", "format", "image")
        return {
            split: {
                r[0]: dict(zip(cols, r, strict=True))
                for sh in s["shards"]
                for r in shards.read_shard(str(root / sh["name"]), columns=cols)
            }
            for split, s in manifest["splits"].items()
        }

    rows, before = by_split(tmp_path, m), by_split(dest, plain)
    # Validation and test are what they were; train gains copies of its own photos only.
    for split in ("val", "test"):
        assert rows[split].keys() == before[split].keys()
    copies = {i: r for i, r in rows["train"].items() if "@" in i}
    assert rows["train"].keys() - copies.keys() == before["train"].keys()
    assert m["train_scales"] == [0.8, 0.5] and m["train_copies"] == len(copies) > 0
    from PIL import Image

    for copy_id, r in copies.items():
        photo_id, factor = copy_id.rsplit("@", 1)
        photo = before["train"][photo_id]
        f = float(factor.rstrip("x"))
        assert (r["width"], r["height"]) == (round(photo["width"] * f), round(photo["height"] * f))
        assert min(r["width"], r["height"]) >= m["min_size"] and r["format"] == "png"
        with Image.open(io.BytesIO(r["image"])) as im:
            assert im.size == (r["width"], r["height"])
    # Every train photo has a copy at each factor that keeps both its sides >= min_size.
    expected = {
        f"{i}@{f:g}x"
        for i, r in before["train"].items()
        for f in (0.8, 0.5)
        if min(round(r["width"] * f), round(r["height"] * f)) >= m["min_size"]
    }
    assert copies.keys() == expected
    assert any(i.endswith("@0.5x") for i in expected) and len(expected) < 2 * len(before["train"])
    assert "downscaled copies" in manifest.describe(m, str(tmp_path))


def test_train_scales_errors_are_one_line(source, tmp_path):
    with pytest.raises(builder.BuildError, match="between 0 and 1"):
        builder.build(str(source), str(tmp_path), progress=False, train_scales=(1.5,))
    with pytest.raises(builder.BuildError, match="has none"):
        builder.build(
            str(source), str(tmp_path), progress=False, train_scales=(0.5,), split={"a": 1.0}
        )
    with pytest.raises(builder.BuildError, match="expected factors"):
        builder.parse_scales("0.8,big")


def test_glob_source(source, tmp_path):
    m = builder.build(str(source / "synth" / "*.jpg"), str(tmp_path), progress=False, workers=1)
    assert m["images"] == 2 and not m["skipped"]


BUILD_WITHOUT_TENSORFLOW = """
import sys
from srtrain.data import __main__ as cli
code = cli.main(sys.argv[1:])
print("tensorflow" in sys.modules, code)
"""


def test_the_builder_runs_without_loading_tensorflow(source, tmp_path):
    # TensorFlow is only for the pipelines: the builder (and `--help`) start in a fraction of a
    # second and hundreds of MB less, and so do its worker processes.
    script = [sys.executable, "-c", BUILD_WITHOUT_TENSORFLOW]
    args = ["build", str(source / "synth" / "*.jpg"), str(tmp_path / "out"), "--workers", "2"]
    p = subprocess.run([*script, *args], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.split()[-2:] == ["False", "0"]
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["images"] == 2


def test_missing_source_is_one_line(tmp_path):
    with pytest.raises(builder.BuildError, match="no such folder, archive or glob"):
        builder.build(str(tmp_path / "nothing"), str(tmp_path / "out"), progress=False)


# --- inspect / verify / manifest errors --------------------------------------------------------


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """`python -m srtrain.data ARGS` in this process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = data_cli.main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_inspect_and_verify_cli(built, tmp_path, capsys):
    dest, m = built
    code, out, _ = cli(capsys, "inspect", str(dest))
    assert code == 0
    for path in PLANTED:
        assert path in out
    n_train = m["splits"]["train"]["images"]
    assert re.search(rf"^\s+train\s+{n_train} images\s+\d+ shards", out, re.M), out
    code, out, _ = cli(capsys, "verify", str(dest))
    assert code == 0 and "verify OK" in out
    # A corrupted copy fails verification and names the shard.
    bad = tmp_path / "bad"
    bad.mkdir()
    for p in dest.iterdir():
        (bad / p.name).write_bytes(p.read_bytes())
    victim = m["splits"]["train"]["shards"][0]["name"]
    data = bytearray((bad / victim).read_bytes())
    data[100] ^= 0xFF
    (bad / victim).write_bytes(bytes(data))
    code, _, err = cli(capsys, "verify", str(bad))
    assert code == 1
    assert f"{bad / victim}: checksum mismatch" in err


def test_missing_manifest_is_one_line(tmp_path, capsys):
    with pytest.raises(StorageError, match=r"manifest.json: not found: no shard dataset here"):
        manifest.load_manifest(str(tmp_path))
    code, _, err = cli(capsys, "inspect", str(tmp_path))
    assert code == 1
    assert err.strip() == (
        f"error: {tmp_path}/manifest.json: not found: no shard dataset here "
        f"(build one with `python -m srtrain.data build SRC {tmp_path}`)"
    )
    code, _, err = cli(capsys, "build", str(tmp_path / "nothing"), str(tmp_path / "out"))
    assert code == 2 and "no such folder, archive or glob" in err


def test_deal_gives_equal_contiguous_shares_whatever_the_shard_count():
    counts = [64, 64, 64]  # 3 shards for 2 pipelines: whole shards would be 2:1
    assert shards.deal(counts, 0, 2) == [(0, 0, 64), (1, 0, 32)]
    assert shards.deal(counts, 1, 2) == [(1, 32, 64), (2, 0, 64)]
    for counts in ([5], [3, 40, 7, 1], [32] * 9 + [17]):
        for count in (1, 2, 3, 8):
            parts = [shards.deal(counts, i, count) for i in range(count)]
            sizes = [sum(hi - lo for _, lo, hi in p) for p in parts]
            assert sum(sizes) == sum(counts) and max(sizes) - min(sizes) <= 1
            rows = [(s, r) for p in parts for s, lo, hi in p for r in range(lo, hi)]
            assert len(set(rows)) == len(rows) == sum(counts)
    assert shards.deal([10, 10], 1, 2, limit=6) == [(0, 3, 6)]


# --- S3 (SeaweedFS) -----------------------------------------------------------------------------


@pytest.mark.s3
def test_build_inspect_verify_read_on_s3(s3, s3_env, source, monkeypatch, tmp_path, capsys):
    for k, v in s3_env.items():
        monkeypatch.setenv(k, v)
    dest = f"s3://{s3.bucket}/datasets/planted"
    args = ("--shard-size", "256KB", "--no-progress", "--workers", "1")
    code, out, err = cli(capsys, "build", str(source), dest, *args)
    assert code == 0, err
    code, out, err = cli(capsys, "inspect", dest)
    assert code == 0, err
    for path in PLANTED:
        assert path in out
    code, out, err = cli(capsys, "verify", dest)
    assert code == 0 and "verify OK" in out
    monkeypatch.setenv("SRTRAIN_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("SRTRAIN_CACHE_DIR", raising=False)
    m = manifest.load_manifest(dest)
    sh = m["splits"]["train"]["shards"][0]
    rows = list(shards.read_shard(f"{dest}/{sh['name']}", cache_key=sh["sha256"]))
    assert len(rows) == sh["images"]
    cached = tmp_path / "cache" / "shards" / f"{sh['sha256']}.parquet"
    assert cached.exists() and cached.stat().st_size == sh["bytes"]
    assert list(shards.read_shard(f"{dest}/{sh['name']}", cache_key=sh["sha256"])) == rows
    # Uncached: in memory when the manifest gives the size, else through a spool file that is
    # gone after the pass.
    assert list(shards.read_shard(f"{dest}/{sh['name']}", size=sh["bytes"])) == rows
    assert not (tmp_path / "cache" / "shards" / "spool").exists()
    assert list(shards.read_shard(f"{dest}/{sh['name']}")) == rows
    assert not list((tmp_path / "cache" / "shards" / "spool").iterdir())


@pytest.mark.s3
def test_shares_sizes_and_decoded_cache_from_s3(s3, s3_env, monkeypatch, tmp_path):
    from srtrain.config import load_config
    from srtrain.data import decoded

    for k, v in s3_env.items():
        monkeypatch.setenv(k, v)
    src = tmp_path / "src"
    src.mkdir()
    for i in range(10):
        photo(70 + 3 * i, 66 + i, seed=i).save(src / f"p{i}.png")
    dest = f"s3://{s3.bucket}/datasets/shares"
    with monkeypatch.context() as mp:
        mp.setattr(builder, "ROW_GROUP", 2)
        builder.build(
            str(src),
            dest,
            split={"train": 1.0},
            shard_size=40_000,
            min_size=64,
            workers=1,
            progress=False,
        )
    for cache in ("false", "true"):
        cfg = load_config(
            None, [f"data.source={dest}", "data.patch_size=64", f"data.cache={cache}"]
        )
        parts = [shards.image_sizes(cfg, "train", i, 3) for i in range(3)]
        assert [len(h) for h, _ in parts] in ([4, 3, 3], [3, 3, 4], [3, 4, 3])
        sides = sorted((int(h), int(w)) for hs, ws in parts for h, w in zip(hs, ws, strict=True))
        assert sides == sorted((66 + i, 70 + 3 * i) for i in range(10))
        ids = [r["id"] for r in shards.records(cfg, "train", 1, 3).as_numpy_iterator()]
        assert len(ids) == len(parts[1][0])
    cfg = load_config(None, [f"data.source={dest}", "data.patch_size=64", "data.decoded_cache=1"])
    cache = decoded.decoded_cache(cfg, 0, 2)
    need, n = decoded.decoded_cache_bytes(cfg, 0, 2)
    assert cache.pixels.size == need and len(cache.offsets) == n == 5


@pytest.mark.s3
@pytest.mark.parametrize("problem", ["missing bucket", "bad credentials", "missing manifest"])
def test_training_job_fails_fast_with_one_line(s3, s3_env, problem, tmp_path, monkeypatch, capsys):
    for k, v in s3_env.items():
        monkeypatch.setenv(k, v)
    source = f"s3://{s3.bucket}/datasets/nothing-here"
    if problem == "missing bucket":
        source = "s3://no-such-bucket/iaprtc12"
    elif problem == "bad credentials":
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
        source = f"s3://{s3.bucket}/datasets/planted"
    capsys.readouterr()
    t0 = time.monotonic()
    code = run.main(
        [
            "--local",
            "--set",
            f"data.source={source}",
            "--set",
            "train.epochs=1",
            "--set",
            "train.steps_per_epoch=1",
            "--output",
            str(tmp_path / "runs"),
        ]
    )
    assert time.monotonic() - t0 < 60
    assert code != 0
    err = capsys.readouterr().err.strip().splitlines()
    expected = {
        "missing bucket": "s3://no-such-bucket: the bucket does not exist",
        "bad credentials": f"s3://{s3.bucket}: access denied",
        "missing manifest": f"{source}/manifest.json: not found",
    }[problem]
    assert expected in err[-1], err
    assert len(err) == 1, err


# --- end to end: a 2-worker Ray training run streaming shards from S3 ---------------------------

LOG_SETUP = """\
import logging, sys
logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(name)s: %(message)s")
logging.getLogger("srtrain.data").setLevel(logging.INFO)
"""


@pytest.mark.s3
@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize("gpu_path", [False, True], ids=["streamed", "decoded-cache+replica"])
def test_two_ray_workers_train_from_s3_on_equal_shares(s3, s3_env, tmp_path, monkeypatch, gpu_path):
    src = tmp_path / "src"
    small = plant_bundled_photos(src, 12)
    plant_bad_files(src)
    for k, v in s3_env.items():
        monkeypatch.setenv(k, v)
    dest = f"s3://{s3.bucket}/datasets/ray-e2e"
    m = builder.build(
        str(src),
        dest,
        split={"train": 0.6, "val": 0.4},
        shard_size=200_000,
        workers=1,
        progress=False,
    )
    reasons = {s["path"]: s["reason"] for s in m["skipped"]}
    for path, why in PLANTED.items():
        assert reasons[path].startswith(why)
    assert all(reasons[path].startswith("too small") for path in small)
    assert len(m["splits"]["train"]["shards"]) >= 2

    # Ray workers inherit the environment: S3 settings, and INFO logs of srtrain.data on stderr.
    (tmp_path / "logsetup").mkdir()
    (tmp_path / "logsetup" / "sitecustomize.py").write_text(LOG_SETUP)
    env = {
        **s3_env,
        "PYTHONPATH": os.pathsep.join([str(tmp_path / "logsetup"), str(REPO)]),
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "RAY_DEDUP_LOGS": "0",  # the two workers' lines differ only in digits: keep both
    }
    sets = [
        "scaling.num_workers=2",
        f"data.source={dest}",
        "data.patch_size=64",
        "data.batch_size=2",
        "data.val_images=4",
        "model.filters=8",
        "train.epochs=1",
        "train.steps_per_epoch=3",
    ]
    if gpu_path:  # what the GPU jobs run: decoded once per worker, degraded in the train step
        sets += ["data.decoded_cache=true", "degradation.on=replica"]
    p = run_srtrain(
        *[a for s in sets for a in ("--set", s)],
        "--output",
        str(tmp_path / "runs"),
        "--name",
        "e2e",
        env=env,
    )
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-4000:]
    reads = {}
    for line in out.splitlines():
        hit = re.search(r"pipeline (\d)/2 reads (\d+) of (\d+) train images: (\S+)", line)
        if hit:
            reads[int(hit.group(1))] = (int(hit.group(2)), hit.group(4).split(","))
    assert set(reads) == {0, 1}, out[-4000:]
    total = m["splits"]["train"]["images"]
    assert sorted(n for n, _ in reads.values()) == [total // 2, total - total // 2]
    train_shards = {s["name"] for s in m["splits"]["train"]["shards"]}
    assert {p.split("[")[0] for _, parts in reads.values() for p in parts} == train_shards
    assert (tmp_path / "runs" / "e2e" / "result.json").exists()
    decoded = re.findall(r"pipeline (\d)/2: decoded (\d+) images", out)
    if gpu_path:
        assert sorted(int(i) for i, _ in decoded) == [0, 1], out[-4000:]
        assert sum(int(n) for _, n in decoded) == total  # each image in exactly one cache
    else:
        assert not decoded
