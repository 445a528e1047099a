"""TensorBoard logs of a run: event files under RUN/tensorboard/{model,bicubic} whose scalars are
the epoch rows of metrics.jsonl, plus a validation image record.

Read back with core TF (tf.compat.v1.train.summary_iterator), since the tensorboard package is
not a dependency of training.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from srtrain import tensorboard, train
from srtrain.config import load_config

EPOCHS = 2
TINY = [
    "data.patch_size=16",
    "data.val_patch_size=32",
    "data.batch_size=2",
    "data.val_images=2",
    "model.filters=4",
    f"train.epochs={EPOCHS}",
    "train.steps_per_epoch=2",
    "train.precision=fp32",
    "train.sample_images=2",
    "train.early_stop_patience=0",
]
MODEL_TAGS = {
    "train/loss": "train_loss",
    "train/lr": "lr",
    "train/images_per_sec": "images_per_sec",
    "train/input_wait": "input_wait",
    "val/loss": "val_loss",
    "val/psnr": "val_psnr",
    "val/ssim": "val_ssim",
}
BICUBIC_TAGS = {"val/loss": "bicubic_loss", "val/psnr": "bicubic_psnr", "val/ssim": "bicubic_ssim"}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """One tiny in-process run on the bundled samples (what `srtrain.run --local` calls)."""
    run = tmp_path_factory.mktemp("run")
    ctx = train.Context(run_dir=str(run), log_fn=lambda line: None)
    train.train_loop(load_config(None, TINY), ctx)
    return run


def events(logdir: Path) -> list[tf.compat.v1.Event]:
    files = sorted(logdir.glob("events.out.tfevents.*"))
    assert files, f"no event file under {logdir}"
    return [e for f in files for e in tf.compat.v1.train.summary_iterator(str(f))]


def scalars(logdir: Path) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} of the one-value records under one writer's directory."""
    out: dict[str, dict[int, float]] = {}
    for e in events(logdir):
        for v in e.summary.value:
            if v.metadata.plugin_data.plugin_name == "scalars":
                out.setdefault(v.tag, {})[e.step] = float(tf.make_ndarray(v.tensor))
    return out


def test_scalars_match_metrics_jsonl(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(1, EPOCHS + 1))
    for writer, tags in (("model", MODEL_TAGS), ("bicubic", BICUBIC_TAGS)):
        got = scalars(run_dir / "tensorboard" / writer)
        assert set(got) == set(tags), writer
        for tag, key in tags.items():
            want = {r["epoch"]: r[key] for r in rows}
            assert got[tag].keys() == want.keys(), (writer, tag)
            for step, value in want.items():
                # written as float32
                assert got[tag][step] == pytest.approx(value, rel=1e-6, abs=1e-6), (writer, tag)
    # The two writers share tags, so TensorBoard draws model and bicubic on one chart, and the
    # values differ (the bicubic writer is not a copy of the model's).
    model = scalars(run_dir / "tensorboard" / "model")["val/psnr"]
    bicubic = scalars(run_dir / "tensorboard" / "bicubic")["val/psnr"]
    assert model != bicubic


def test_validation_images_each_epoch(run_dir):
    records = [
        (e.step, v)
        for e in events(run_dir / "tensorboard" / "model")
        for v in e.summary.value
        if v.tag == "val/samples"
    ]
    assert [step for step, _ in records] == list(range(1, EPOCHS + 1))
    for _, v in records:
        assert v.metadata.plugin_data.plugin_name == "images"
        # TensorBoard's image format: [width, height, png, png, ...]
        width, height, *pngs = tf.make_ndarray(v.tensor).tolist()
        assert len(pngs) == 2  # train.sample_images
        for png in pngs:
            img = tf.io.decode_png(png).numpy()
            # one row: LR nearest-upscaled | bicubic | model | HR, each 32x32
            assert img.shape == (int(height), int(width), 3) == (32, 4 * 32, 3)
            assert img.std() > 0


def test_read_scalars_helper_agrees(run_dir):
    got = tensorboard.read_scalars(run_dir / "tensorboard")
    direct = scalars(run_dir / "tensorboard" / "bicubic")["val/psnr"]
    assert dict(got["bicubic/val/psnr"]) == direct
    assert np.isfinite([v for _, v in got["model/train/loss"]]).all()
