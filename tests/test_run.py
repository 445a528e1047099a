"""End to end: `python -m srtrain.run` for a few steps in --local and Ray mode, what a run leaves,
and one-line errors with exit code 2 for bad configs."""

import json
from pathlib import Path

import numpy as np
import pytest
from cli import run_srtrain, set_args

TINY = set_args(
    "data.patch_size=32",
    "data.val_patch_size=64",
    "data.batch_size=4",
    "model.filters=16",
    "train.epochs=3",
    "train.steps_per_epoch=20",
    "train.lr=3e-3",
    "train.precision=fp32",
    "train.sample_images=2",
)


run_cli = run_srtrain


def check_run_dir(run_dir: Path, epochs: int) -> dict:
    assert (run_dir / "config.yaml").read_text().startswith("data:")
    assert "srtrain.run" in (run_dir / "command.txt").read_text()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(1, epochs + 1))
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]  # it learns
    # and its output follows its input: never flat, and clearly not by the end (20 steps of
    # shuffled colours can leave the first epoch's spread near 0.005)
    assert all(r["val_spread"] > 1e-3 for r in rows) and rows[-1]["val_spread"] > 0.01
    result = json.loads((run_dir / "result.json").read_text())
    for key in (
        "val_psnr",
        "val_ssim",
        "bicubic_psnr",
        "bicubic_ssim",
        "epochs",
        "steps",
        "images_per_sec",
        "checkpoint",
    ):
        assert result[key] is not None, key
    assert result["steps"] == epochs * 20 and result["epochs"] == epochs
    assert 5 < result["bicubic_psnr"] < 40 and 0 < result["val_ssim"] <= 1
    # the samples' test split, tested once on the best weights
    assert result["test_split"] == "test" and result["test_images"] == 2
    assert 5 < result["test_bicubic_psnr"] < 40 and 0 < result["test_ssim"] <= 1
    assert Path(result["checkpoint"], "model.keras").exists()
    png = (run_dir / "samples.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    return result


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["base", "advanced"])
def test_local_mode_trains_and_leaves_a_complete_run(tmp_path, arch):
    p = run_cli(
        "--local", *TINY, "--set", f"model.arch={arch}", "--output", str(tmp_path), "--name", "r"
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert "epoch 3/3" in p.stdout and "bicubic" in p.stdout
    assert "done: test_psnr" in p.stdout and "2 images of split 'test'" in p.stdout
    result = check_run_dir(tmp_path / "r", 3)
    # the best checkpoint's model loads with plain Keras and predicts like it was trained
    import keras

    model = keras.saving.load_model(Path(result["checkpoint"], "model.keras"), compile=False)
    x = np.random.default_rng(0).random((1, 16, 16, 3), "float32")
    assert model(x).shape == (1, 32, 32, 3)
    # built-in layers only (the model that trained had srtrain's fused BatchNorm)
    assert all(type(layer).__module__.startswith("keras.") for layer in model.layers)


def check_name_taken(p, run: str) -> None:
    """The second start of a run name without --resume: exit 2, one line naming the run."""
    assert p.returncode == 2, p.stdout[-2000:] + p.stderr[-2000:]
    errors = [line for line in p.stderr.splitlines() if line.startswith("srtrain.run:")]
    assert len(errors) == 1 and f"run '{run}' already exists" in errors[0], p.stderr[-2000:]
    assert "--resume continues it" in errors[0] and "Traceback" not in p.stderr


@pytest.mark.slow
@pytest.mark.parametrize(
    "quality",
    [[], ["train.schedule=cosine", "train.warmup_steps=5", "train.ema_decay=0.9"]],
    ids=["plateau", "cosine-ema"],
)
def test_local_resume_continues_from_the_last_checkpoint(tmp_path, quality):
    extra = [a for o in quality for a in ("--set", o)]
    p = run_cli(
        "--local",
        *TINY,
        *extra,
        "--set",
        "train.epochs=1",
        "--output",
        str(tmp_path),
        "--name",
        "r",
    )
    assert p.returncode == 0, p.stderr[-3000:]
    config = (tmp_path / "r" / "config.yaml").read_bytes()
    index = (tmp_path / "r" / "checkpoints" / "index.json").read_bytes()
    # the same name again without --resume: refused, nothing of the run touched
    p = run_cli(
        "--local", *TINY, "--set", "train.epochs=2", "--output", str(tmp_path), "--name", "r"
    )
    check_name_taken(p, "r")
    assert (tmp_path / "r" / "checkpoints" / "index.json").read_bytes() == index
    # the job's own run.local: true means what --local means (the run started with --local),
    # also where RAY_ADDRESS names a cluster (here none: joining it would fail)
    assert "local: true" in config.decode()
    p = run_cli(
        *TINY,
        *extra,
        "--set",
        "train.epochs=2",
        "--set",
        "run.local=true",
        "--output",
        str(tmp_path),
        "--name",
        "r",
        "--resume",
        env={"RAY_ADDRESS": "127.0.0.1:9"},
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert "local (no Ray) although RAY_ADDRESS is set" in p.stdout
    assert "resumed from" in p.stdout and "at epoch 1, step 20" in p.stdout
    result = json.loads((tmp_path / "r" / "result.json").read_text())
    assert result["steps"] == 40 and result["epochs"] == 2
    rows = (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["epoch"] for r in rows] == [1, 2]
    if quality:  # the schedule continues from the restored step, the EMA from its average
        from srtrain import schedule
        from srtrain.config import load_config

        cfg = load_config(None, [*TINY[1::2], *quality, "train.epochs=2"])
        assert json.loads(rows[1])["lr"] == pytest.approx(float(schedule.lr_at(40, cfg.train)))
        assert (
            tmp_path / "r" / "checkpoints" / "checkpoint_00000040" / "train_weights.npz"
        ).exists()
    # the wall time of the first run's epoch carries over into the resumed run's count
    first = json.loads(
        (tmp_path / "r" / "checkpoints" / "checkpoint_00000020" / "state.json").read_text()
    )
    assert first["train_seconds"] > 0
    assert result["train_seconds"] > first["train_seconds"]
    # the run keeps the config it started with; command.txt lists both commands that ran it
    assert (tmp_path / "r" / "config.yaml").read_bytes() == config
    commands = (tmp_path / "r" / "command.txt").read_text().splitlines()
    assert len(commands) == 2 and commands[1].endswith("--resume")


@pytest.mark.slow
def test_the_time_limit_ends_the_run_at_an_epoch_end_and_tests_it(tmp_path):
    p = run_cli(
        "--local", *TINY, "--set", "train.epochs=5", "--set", "train.time_limit_minutes=0.001",
        "--output", str(tmp_path), "--name", "r",
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    assert "epoch 1/5" in p.stdout and "time limit: another epoch would not fit" in p.stdout
    assert "epoch 2/5" not in p.stdout and "done: test_psnr" in p.stdout
    result = json.loads((tmp_path / "r" / "result.json").read_text())
    assert result["epochs"] == 1 and result["stopped_early"] and result["train_seconds"] > 0.06
    assert result["test_psnr"] is not None


# Tiny enough to fail fast: the Ray-mode tests pay Ray's start-up for each command.
SMALL = [
    "--set", "data.patch_size=32", "--set", "data.val_patch_size=32", "--set", "data.batch_size=2",
    "--set", "model.filters=8", "--set", "train.precision=fp32", "--set", "train.sample_images=0",
    "--set", "train.steps_per_epoch=3",
]  # fmt: skip


@pytest.mark.slow
@pytest.mark.ray
def test_ray_run_name_is_new_unless_resumed(tmp_path):
    args = [*SMALL, "--output", str(tmp_path), "--name", "r"]
    p = run_cli(*args, "--set", "train.epochs=1")
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    config = (tmp_path / "r" / "config.yaml").read_bytes()
    check_name_taken(run_cli(*args, "--set", "train.epochs=2"), "r")
    p = run_cli(*args, "--set", "train.epochs=2", "--resume")
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert "at epoch 1, step 3" in p.stdout + p.stderr  # continued from the checkpoint
    result = json.loads((tmp_path / "r" / "result.json").read_text())
    assert result["steps"] == 6 and result["epochs"] == 2
    assert (tmp_path / "r" / "config.yaml").read_bytes() == config


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["local", pytest.param("ray", marks=pytest.mark.ray)])
def test_a_diverging_run_stops_within_an_epoch_with_one_line(tmp_path, mode):
    p = run_cli(
        *(["--local"] if mode == "local" else []),
        *SMALL,
        "--set",
        "train.epochs=3",
        "--set",
        "train.lr=1e6",
        # Leaky ReLUs keep the blown-up activations alive until they overflow: with plain ReLUs
        # the first step can as well kill every unit, and a dead net's loss stays finite.
        "--set",
        "model.leaky_relu=true",
        "--set",
        "train.checkpoint_every_steps=1",
        "--output",
        str(tmp_path),
        "--name",
        "d",
    )
    assert p.returncode == 1, p.stdout[-2000:] + p.stderr[-3000:]
    errors = [line for line in p.stderr.splitlines() if line.startswith("srtrain.run:")]
    assert len(errors) == 1, p.stderr[-3000:]
    assert "training diverged" in errors[0] and "lower train.lr (it is 1e+06)" in errors[0]
    # Ray's own placement-group cleaner (a detached actor) can print a traceback of its
    # state-API poll while the local runtime shuts down on a loaded machine; that is Ray's, not
    # ours: every other line must be traceback-free.
    ours = [
        line for line in (p.stdout + p.stderr).splitlines() if "PlacementGroupCleaner" not in line
    ]
    assert not any("Traceback" in line for line in ours), "\n".join(ours)[-3000:]
    assert "epoch 1/3" not in p.stdout + p.stderr  # stopped inside the first epoch
    bad_step = int(errors[0].split(" at step ")[1].split(";")[0])
    assert 1 < bad_step <= 3
    # the checkpoints written before the loss went bad are kept
    states = list((tmp_path / "d").rglob("checkpoint_*/state.json"))
    assert states, sorted(str(x) for x in (tmp_path / "d").rglob("*"))
    assert all(json.loads(x.read_text())["step"] < bad_step for x in states)


def test_a_run_whose_relus_all_died_says_so_each_epoch(tmp_path):
    """lr 0.5 kills every ReLU of the Base U-Net in its first Adam step: the loss stays finite
    and flat, the output one colour; each epoch's line says `flat output`, the run finishes."""
    p = run_cli(
        "--local",
        *TINY,
        *set_args("train.epochs=2", "train.lr=0.5", "train.warmup_steps=0"),
        "--output",
        str(tmp_path),
        "--name",
        "dead",
    )
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    epochs = [line for line in p.stdout.splitlines() if line.startswith("epoch ")]
    assert len(epochs) == 2 and all("flat output" in line for line in epochs), p.stdout
    rows = [json.loads(x) for x in (tmp_path / "dead" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["val_spread"] < 1e-3 for r in rows)


def test_loss_meter_names_the_first_non_finite_step():
    import tensorflow as tf

    from srtrain.train import LossMeter, TrainingDiverged

    meter = LossMeter()
    for step, loss in [(1, 0.5), (2, 0.25)]:
        meter.add(tf.constant(loss), step)
    meter.check(lr=1e-3)
    assert meter.mean() == pytest.approx(0.375)
    for step, loss in [(3, 0.5), (4, float("inf")), (5, float("nan"))]:
        meter.add(tf.constant(loss), step)
    with pytest.raises(
        TrainingDiverged, match=r"loss is inf at step 4; lower train.lr \(it is 0.001"
    ):
        meter.check(lr=1e-3)


def test_summary_line_without_a_finite_validation_psnr():
    from srtrain.run import summary_line

    result = {"val_psnr": None, "bicubic_psnr": None, "val_ssim": None, "bicubic_ssim": None}
    line = summary_line({**result, "steps": 3, "wall_seconds": 2.0, "checkpoint": None})
    assert "no epoch gave a finite validation PSNR" in line and "3 steps" in line


@pytest.mark.slow
@pytest.mark.ray
def test_ray_mode_one_worker_default_output(tmp_path):
    # no --output: ./runs relative to where the user stands, although Ray workers run elsewhere
    p = run_cli(*TINY, "--name", "r", cwd=tmp_path)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    result = check_run_dir(tmp_path / "runs" / "r", 3)
    assert str(tmp_path / "runs" / "r") in result["checkpoint"]
    # one progress line per epoch, not drowned in Ray Train's per-report INFO lines
    out = p.stdout + p.stderr
    assert out.count("epoch 3/3") == 1 and "Reporting training result" not in out
    # the Ray worker trains on oneDNN's CPU kernels (srtrain's default, even on AVX2-only CPUs)
    assert "float32 on CPU (oneDNN)" in out


def test_misspelled_key_exits_2_naming_it(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text("train:\n  epohcs: 3\n")
    p = run_cli("--config", str(job), "--output", str(tmp_path))
    assert p.returncode == 2
    assert "train.epohcs: unknown key" in p.stderr
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--set", "train.lr=-1"], "train.lr"),
        (["--set", "train.epochs=many"], "train.epochs"),
        (["--set", "data.patch_size=90"], "data.patch_size"),
        (["--set", "scaling.num_workers=0"], "scaling.num_workers"),
        (["--set", "loss.alpha=-1"], "loss.alpha"),
        (["--config", "does/not/exist.yaml"], "not found"),
    ],
)
def test_bad_configs_exit_2_with_one_line(tmp_path, args, needle):
    p = run_cli(*args, "--output", str(tmp_path))
    assert p.returncode == 2, p.stderr
    assert needle in p.stderr and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_invalid_yaml_exits_2(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text("train: {epochs: 3\n")
    p = run_cli("--config", str(job), "--output", str(tmp_path))
    assert p.returncode == 2 and "invalid YAML" in p.stderr


def test_progress_line_flags_input_bound_epochs():
    from srtrain.train import _progress_line

    row = {
        "epoch": 2,
        "step": 40,
        "train_loss": 0.05,
        "val_psnr": 24.0,
        "bicubic_psnr": 23.0,
        "val_ssim": 0.6,
        "bicubic_ssim": 0.5,
        "lr": 5e-4,
        "images_per_sec": 60.0,
        "input_wait": 0.05,
    }
    assert "input-bound" not in _progress_line(row, 5)
    line = _progress_line({**row, "input_wait": 0.3}, 5)
    assert "input-bound: 30% of step time waiting for data" in line
    assert "data.patches_per_image=2" in line and "\n" not in line
    for option in ("degradation.on=replica", "data.decoded_cache", "scaling.cpus_per_worker"):
        assert option in line
    replanned = _progress_line({**row, "planned_epochs": 4, "mse_from_step": 3000}, 5)
    assert replanned.endswith("4 epochs fit, the lr schedule now ends there (MSE from step 3,000)")


def test_progress_line_flags_a_model_with_a_flat_output():
    from srtrain.train import _progress_line

    row = {
        "epoch": 3,
        "step": 60,
        "train_loss": 0.21,
        "val_psnr": 11.0,
        "bicubic_psnr": 23.0,
        "val_ssim": 0.1,
        "bicubic_ssim": 0.5,
        "lr": 0.5,
        "images_per_sec": 60.0,
        "input_wait": 0.0,
        "val_spread": 0.18,
    }
    assert "flat output" not in _progress_line(row, 5)
    line = _progress_line({**row, "val_spread": 2e-5}, 5)
    assert "flat output" in line and "lower train.lr" in line and "\n" not in line
