"""tune.search: search jobs validate (bad spaces exit 2 naming the key), trial configs follow the
sampled values, and one tiny real search (4 trials of a few steps, 1 worker each, 2 at a time) is
interrupted with Ctrl-C, resumed without rerunning finished trials, stops trials with ASHA and
leaves results.csv, summary.md, best.yaml (which srtrain.run trains) and search.png."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from srtrain.config import ConfigError, apply_overrides, load_config, read_yaml
from tune import space
from tune.search import concurrent_trials, load_search_job

REPO = Path(__file__).resolve().parents[1]

# The default search (tune/tune-samples.yaml) shrunk to seconds: 4 trials of 3 steps on tiny
# patches, 2 at a time, over a 3-key space.
TINY_JOB = apply_overrides(
    read_yaml(space.DEFAULT_JOB_FILE),
    [
        "data.patch_size=32",
        "data.val_patch_size=64",
        "data.batch_size=4",
        "model.filters=8",
        "train.epochs=4",
        "train.steps_per_epoch=3",
        "train.warmup_steps=0",  # the default search warms up over 100 steps; this one has 12
        "train.sample_images=1",
        "train.precision=fp32",
        "search.seed=30",
        "search.num_samples=4",
        "search.max_concurrent_trials=2",
        "search.scheduler.grace_period=1",
    ],
)
# Twelve steps train little, so the trials' scores must differ by design for ASHA to have a call to
# make: search.seed 30 samples (lr, batch_norm) = (3e-2, F), (3e-2, F), (1e-5, F), (3e-2, T). The
# third trial, barely trained, reaches the first rung after a strong one recorded its score there.
TINY_JOB["search"]["space"] = {
    "train.lr": {"choice": [3.0e-2, 1.0e-5]},
    "loss.alpha": {"choice": [0.0]},
    "model.batch_norm": {"choice": [False, True]},
}
WEAK_LR = 1.0e-5


def cli(*args, timeout=120, cwd=REPO):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    cmd = [sys.executable, "-m", "tune.search", *args]
    return subprocess.run(
        cmd, cwd=cwd, env=env, check=False, capture_output=True, text=True, timeout=timeout
    )


def write_job(path: Path, job: dict) -> Path:
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return path


# --- job files and validation (no Ray) -----------------------------------------------------------


def test_the_embedded_default_is_jobs_tune_samples():
    # One file: the package's, which jobs/ links to in git (a copy could drift apart from it;
    # a copy made by following the link, as .ci/run's, holds the same bytes).
    job = REPO / "jobs" / "tune-samples.yaml"
    assert job.resolve() == space.DEFAULT_JOB_FILE.resolve() or (
        job.read_bytes() == space.DEFAULT_JOB_FILE.read_bytes()
    )
    assert load_search_job(None) == load_search_job(REPO / "jobs" / "tune-samples.yaml")
    _, s = load_search_job(None)
    assert s.num_samples >= 8 and s.space["loss.alpha"].args == (0.0,)  # runs without VGG weights
    assert {
        f"model.{f}"
        for f in ("leaky_relu", "strided_conv", "conv_transpose", "batch_norm", "residual")
    } <= set(s.space)


@pytest.mark.parametrize("name", ["tune-samples.yaml", "tune-iaprtc12.yaml"])
def test_job_files_start_with_their_command_and_validate(name):
    first = (REPO / "jobs" / name).read_text().splitlines()[0]
    assert first.startswith(f"# python -m tune.search --config jobs/{name}")
    _, s = load_search_job(REPO / "jobs" / name)
    assert s.metric == "val_psnr" and s.mode == "max" and s.max_epochs >= s.scheduler.grace_period


def test_the_cluster_search_uses_gpus_and_searches_alpha():
    cfg, s = load_search_job(REPO / "jobs" / "tune-iaprtc12.yaml")
    assert (cfg.scaling.num_workers, cfg.scaling.gpus_per_worker) == (2, 1)
    assert cfg.data.source.startswith("s3://") and cfg.run.storage.startswith("s3://")
    assert 0.0 in s.space["loss.alpha"].args and max(s.space["loss.alpha"].args) > 0


def test_a_sampled_alpha_decides_the_loss_kind():
    cfg, s = load_search_job(REPO / "jobs" / "tune-iaprtc12.yaml")
    mae = space.trial_config(cfg, {"loss.alpha": 0.0, "train.lr": 1e-3}, s)
    assert (mae.loss.kind, mae.loss.alpha, mae.train.lr) == ("mae", 0.0, 1e-3)
    comp = space.trial_config(
        cfg,
        {"loss.alpha": 0.02, "loss.perceptual_layers": "block2_conv2", "model.batch_norm": False},
        s,
    )
    assert (comp.loss.kind, comp.loss.alpha) == ("composite", 0.02)
    assert comp.loss.perceptual_layers == {"block2_conv2": 1.0}
    assert comp.model.batch_norm is False and comp.model.residual is True  # arch default kept
    assert comp.train.epochs == s.max_epochs


def test_a_mapping_choice_survives_the_search_algorithms_scalars():
    encoded = space.encode_choice({"block2_conv2": 0.5, "block5_conv4": 1.0})
    assert isinstance(encoded, str)
    assert space.decode_value("loss.perceptual_layers", encoded) == {
        "block2_conv2": 0.5,
        "block5_conv4": 1.0,
    }


def test_set_overrides_reach_the_search_section():
    cfg, s = load_search_job(
        None,
        ["search.num_samples=3", "train.epochs=5", "search.space.train.lr={uniform: [1e-4, 2e-4]}"],
    )
    assert s.num_samples == 3 and s.max_epochs == 5 and cfg.train.epochs == 5
    assert s.space["train.lr"] == space.Distribution("uniform", (1e-4, 2e-4))


BAD_SPACES = [
    ({"train.lrr": {"loguniform": [1e-4, 1e-2]}}, "search.space.train.lrr: unknown config key"),
    ({"run.storage": {"choice": ["a", "b"]}}, "search.space.run.storage: not searchable"),
    ({"train.lr": {"loguniform": [1e-2, 1e-4]}}, "search.space.train.lr: low 0.01 >= high"),
    ({"train.lr": {"loguniform": [0, 1e-2]}}, "search.space.train.lr: loguniform low 0"),
    ({"train.lr": {"normal": [0, 1]}}, "search.space.train.lr: got"),
    ({"model.filters": {"uniform": [8, 32]}}, "search.space.model.filters: 8.0 is not a valid"),
    ({"model.residual": {"choice": ["yes"]}}, "search.space.model.residual: 'yes' is not a valid"),
    ({"loss.alpha": {"choice": [-1.0]}}, "search.space.loss.alpha: -1.0 is not a valid"),
    (
        {"loss.perceptual_layers": {"choice": ["block9_conv1"]}},
        "search.space.loss.perceptual_layers: 'block9_conv1' is not a valid",
    ),
]


@pytest.mark.parametrize(("bad", "message"), BAD_SPACES)
def test_bad_search_spaces_name_the_key(bad, message):
    job = {**TINY_JOB, "search": {**TINY_JOB["search"], "space": bad}}
    with pytest.raises(ConfigError, match="^" + message.replace(".", r"\.").replace("[", r"\[")):
        space.parse_search(job["search"], load_config(None, []))


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"scheduler": {"grace_period": 9}}, "search.scheduler.grace_period: got 9"),
        (
            {"scheduler": {"reduction_factor": 1}},
            r"search.scheduler.reduction_factor: got 1\.0, allowed: a number > 1$",
        ),
        ({"metric": "psnr"}, "search.metric: got 'psnr'"),
        ({"algorithm": "grid"}, "search.algorithm: got 'grid'"),
        ({"num_samples": 0}, "search.num_samples: got 0"),
        ({"tune": 1}, "search.tune: unknown key"),
        ({"max_epochs": 4}, "search.max_epochs: unknown key"),  # scheduler.max_epochs sets it
        # Typed as in a training job: a value of the wrong type gets the type named.
        ({"max_concurrent_trials": 1.5}, "search.max_concurrent_trials: got 1.5, expected int$"),
    ],
)
def test_bad_search_settings_name_the_key(tmp_path, section, message):
    job = {**TINY_JOB, "search": {**TINY_JOB["search"], **section}}
    with pytest.raises(ConfigError, match="^" + message):
        load_search_job(write_job(tmp_path / "job.yaml", job))


@pytest.mark.parametrize(
    ("args", "key"),
    [
        (["--set", "search.space.model.dropout={choice: [0.1]}"], "search.space.model.dropout"),
        (["--set", "search.space.train.lr={loguniform: [1e-2, 1e-3]}"], "search.space.train.lr"),
        (["--config", "jobs/samples-base.yaml"], "search: missing"),
        (["--num-samples", "0"], "search.num_samples"),
    ],
)
def test_the_cli_exits_2_with_one_line_naming_the_key(tmp_path, args, key):
    p = cli(*args, "--output", str(tmp_path))
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tune.search: error: ") and key in lines[0]
    assert "Traceback" not in p.stderr and not any(tmp_path.iterdir())


def test_an_existing_search_name_without_resume_exits_2_naming_it(tmp_path):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "tuner.pkl").write_bytes(b"old")
    p = cli("--output", str(tmp_path), "--name", "s")
    assert p.returncode == 2, p.stderr[-2000:]
    assert p.stderr.strip() == (
        f"tune.search: error: search 's' already exists in {tmp_path}: --resume continues it, "
        "or choose another --name"
    )
    assert (tmp_path / "s" / "tuner.pkl").read_bytes() == b"old"


def test_concurrent_trials_fit_the_cluster_and_honour_the_job():
    assert concurrent_trials({"CPU": 1}, {"CPU": 2.0}, 0) == 2
    assert concurrent_trials({"CPU": 1}, {"CPU": 8.0}, 3) == 3
    assert concurrent_trials({"CPU": 12, "GPU": 2}, {"CPU": 64.0, "GPU": 8.0}, 0) == 4
    assert concurrent_trials({"CPU": 12, "GPU": 2}, {"CPU": 30.0, "GPU": 8.0}, 4) == 2
    need_2_gpus = r"^scaling: a trial needs 2 CPU, 2 GPU .* has 2 CPU, 1 GPU$"
    with pytest.raises(ConfigError, match=need_2_gpus):
        concurrent_trials({"CPU": 2, "GPU": 2}, {"CPU": 2.0, "GPU": 1.0}, 0)


@pytest.mark.parametrize("algorithm", ["optuna", "hyperopt"])
def test_seeded_search_algorithms_sample_valid_trial_configs(algorithm):
    import dataclasses

    from tune.search import make_searcher

    if algorithm == "hyperopt":
        pytest.importorskip("hyperopt")
    cfg, s = load_search_job(REPO / "jobs" / "tune-iaprtc12.yaml")
    s = dataclasses.replace(s, algorithm=algorithm)
    samples = []
    for _ in range(2):  # the same seed samples the same trials
        searcher = make_searcher(s)
        assert searcher.set_search_properties("val_psnr", "max", space.param_space(s))
        samples.append([space.flat_params(searcher.suggest(f"t{i}")) for i in range(3)])
    assert samples[0] == samples[1]
    for params in samples[0]:
        trial = space.trial_config(cfg, params, s)
        assert trial.loss.kind == ("composite" if params["loss.alpha"] > 0 else "mae")
        assert 1e-4 <= trial.train.lr <= 2e-3


# --- one real search, interrupted and resumed -------------------------------------------------


def test_the_recipe_options_are_searchable():
    overrides = [
        "search.space.train.schedule={choice: [plateau, cosine]}",
        "search.space.train.ema_decay={choice: [0.0, 0.99]}",
        "search.space.train.grad_clip_norm={choice: [0.0, 1.0]}",
        "search.space.model.bn_momentum={uniform: [0.8, 0.99]}",
    ]
    cfg, settings = load_search_job(None, overrides)
    params = {
        "train.schedule": "cosine",
        "train.ema_decay": 0.99,
        "train.grad_clip_norm": 1.0,
        "model.bn_momentum": 0.9,
    }
    trial = space.trial_config(cfg, params, settings)
    assert (trial.train.schedule, trial.train.ema_decay) == ("cosine", 0.99)
    assert (trial.train.grad_clip_norm, trial.model.bn_momentum) == (1.0, 0.9)


def test_a_trial_whose_tune_results_were_lost_keeps_its_checkpoints(tmp_path):
    from tune.report import _fill_checkpoints

    cfg, _ = load_search_job(None)
    (tmp_path / "checkpoint_b").mkdir()
    (tmp_path / "checkpoint_b" / "model.keras").write_bytes(b"x")
    snapshot = {
        "checkpoint_results": [
            {"checkpoint_dir_name": "checkpoint_a", "metrics": {"epoch": 1}},  # deleted since
            {"checkpoint_dir_name": "checkpoint_b", "metrics": {"epoch": 2}},
        ]
    }
    (tmp_path / "checkpoint_manager_snapshot.json").write_text(json.dumps(snapshot))
    history = {1: {"epoch": 1, "checkpoint_path": float("nan")}, 2: {"epoch": 2}}
    _fill_checkpoints(history, str(tmp_path), cfg)
    assert history[2]["checkpoint_path"] == str(tmp_path / "checkpoint_b")
    assert not isinstance(history[1]["checkpoint_path"], str)


def test_trials_rank_by_their_last_epoch_not_their_best():
    from tune.report import TrialRow, ranked

    _, settings = load_search_job(None)
    lucky = TrialRow(
        "lucky",
        "TERMINATED",
        {},
        [
            {"epoch": 1, "val_psnr": 27.0, "checkpoint_path": "a"},
            {"epoch": 2, "val_psnr": 24.0, "checkpoint_path": "b"},
        ],
    )
    steady = TrialRow(
        "steady",
        "TERMINATED",
        {},
        [
            {"epoch": 1, "val_psnr": 25.0, "checkpoint_path": "c"},
            {"epoch": 2, "val_psnr": 25.5, "checkpoint_path": "d"},
        ],
    )
    assert [r.trial_id for r in ranked([lucky, steady], settings)] == ["steady", "lucky"]
    assert lucky.best("val_psnr", "max")["checkpoint_path"] == "b"


@pytest.mark.parametrize("resumable", [True, False])
def test_asha_rungs_survive_a_restored_search(tmp_path, resumable):
    """Tune restores a search's scheduler from the copy pickled at the start (tuner.pkl): only the
    rungs written beside it let the resumed search stop a trial the earlier scores condemn."""
    import pickle
    from types import SimpleNamespace

    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    from tune.asha import ResumableASHA

    asha = dict(time_attr="epoch", max_t=4, grace_period=1, reduction_factor=2)
    state = tmp_path / "asha-rungs.json"
    first = ResumableASHA(state_uri=str(state), **asha) if resumable else ASHAScheduler(**asha)
    first.set_search_properties("val_psnr", "max")
    tuner_pkl = pickle.dumps(first)
    a, b, c = (SimpleNamespace(trial_id=t) for t in "abc")
    for t in (a, b):
        first.on_trial_add(None, t)
    assert first.on_trial_result(None, a, {"epoch": 1, "val_psnr": 30.0}) == TrialScheduler.CONTINUE
    assert first.on_trial_result(None, b, {"epoch": 1, "val_psnr": 29.0}) == TrialScheduler.STOP

    restored = pickle.loads(tuner_pkl)  # Ctrl-C, then --resume
    restored.on_trial_add(None, c)
    decision = restored.on_trial_result(None, c, {"epoch": 1, "val_psnr": 25.0})
    assert decision == (TrialScheduler.STOP if resumable else TrialScheduler.CONTINUE)
    if resumable:
        rungs = dict((m, r) for m, r in json.loads(state.read_text())["rungs"])
        assert rungs[1] == {"a": 30.0, "b": 29.0, "c": 25.0}


def test_the_summary_reports_the_best_trials_test_score_beside_bicubic(tmp_path):
    from untrained import save_checkpoint

    from srtrain import models
    from tune.report import TrialRow, ranked, summary_md, test_scores

    cfg, settings = load_search_job(None, ["data.val_patch_size=64"])
    ckpt = tmp_path / "ckpt"
    save_checkpoint(ckpt, cfg, models.build_unet(filters=4))
    params = {
        "model.filters": 4,
        **{
            f"model.{f}": False
            for f in ("leaky_relu", "strided_conv", "conv_transpose", "batch_norm", "residual")
        },
    }
    row = TrialRow(
        "t1",
        "TERMINATED",
        params,
        [{"epoch": 1, "val_psnr": 20.0, "bicubic_psnr": 23.0, "checkpoint_path": str(ckpt)}],
    )
    test = test_scores(row, cfg, settings, str(tmp_path))
    assert test["split"] == "test" and test["images"] == 2 and test["epoch"] == 1
    assert 15 < test["bicubic_psnr"] < 40 and test["psnr"] < test["bicubic_psnr"]  # untrained
    text = summary_md(
        [row],
        settings,
        name="s",
        command="c",
        wall_seconds=1.0,
        interrupted=False,
        search_dir=str(tmp_path),
        best_yaml="b.yaml",
        test=test,
    )
    assert "Trials rank by their last epoch's val_psnr (scope 'last')" in text
    assert (
        "Test split 'test' (2 images, seed (RGB, 64 center crops)), its epoch 1 checkpoint: "
        f"PSNR {test['psnr']:.2f} dB" in text
    )
    assert f"vs bicubic {test['bicubic_psnr']:.2f} dB" in text
    assert ranked([row], settings) == [row]
    missing = TrialRow("t2", "TERMINATED", params, [{"epoch": 1, "val_psnr": 20.0}])
    assert test_scores(missing, cfg, settings, str(tmp_path)) == {"error": "no checkpoint"}


def _statuses(search_dir: Path) -> dict[str, str]:
    from ray.tune import ExperimentAnalysis

    return {t.trial_id: t.status for t in ExperimentAnalysis(str(search_dir)).trials}


@pytest.fixture(scope="module")
def search(tmp_path_factory):
    """Runs the tiny search, Ctrl-C's it once a trial has finished, resumes it to the end."""
    root = tmp_path_factory.mktemp("tune")
    job = write_job(root / "tiny.yaml", TINY_JOB)
    args = ["--config", str(job), "--output", str(root / "out"), "--name", "s"]
    search_dir = root / "out" / "s"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    log = (root / "first.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tune.search", *args],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        # Two trials run at a time: a third run directory means at least one trial ended.
        deadline = time.time() + 420
        while time.time() < deadline and proc.poll() is None:
            runs = search_dir / "runs"
            started = list(runs.iterdir()) if runs.is_dir() else []
            if len(started) >= 3 and list(runs.glob("*/metrics.jsonl")):
                break
            time.sleep(2)
        assert proc.poll() is None, (root / "first.log").read_text()[-3000:]
        proc.send_signal(signal.SIGINT)
        first_rc = proc.wait(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
    before = _statuses(search_dir)
    finished = {t for t, s in before.items() if s == "TERMINATED"}
    metrics_before = {t: (search_dir / "runs" / t / "metrics.jsonl").read_text() for t in finished}
    resumed = cli(*args, "--resume", timeout=600)
    return {
        "dir": search_dir,
        "first_rc": first_rc,
        "first_log": (root / "first.log").read_text(),
        "before": before,
        "finished": finished,
        "metrics_before": metrics_before,
        "resumed": resumed,
        "after": _statuses(search_dir),
    }


@pytest.mark.slow
@pytest.mark.ray
def test_an_interrupted_search_resumes_without_rerunning_finished_trials(search):
    assert search["first_rc"] == 130, search["first_log"][-3000:]
    assert "--resume --name s" in search["first_log"]
    # Ctrl-C came after at least one trial finished and before the last one did.
    assert search["finished"]
    assert len(search["before"]) < 4 or set(search["before"].values()) != {"TERMINATED"}
    r = search["resumed"]
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    after = search["after"]
    assert len(after) == 4 and set(after.values()) == {"TERMINATED"}
    assert search["finished"] <= set(after)
    for trial, text in search["metrics_before"].items():  # finished trials never ran again
        assert (search["dir"] / "runs" / trial / "metrics.jsonl").read_text() == text


@pytest.mark.slow
@pytest.mark.ray
def test_asha_stops_weak_trials_and_results_csv_accounts_for_them(search):
    rows = list(csv.DictReader((search["dir"] / "results.csv").open()))
    assert len(rows) == 4 and {r["status"] for r in rows} == {"TERMINATED"}
    assert {
        "train.lr",
        "loss.alpha",
        "model.batch_norm",
        "val_psnr",
        "val_ssim",
        "bicubic_psnr",
        "epochs",
        "stopped_early",
        "checkpoint",
    } <= set(rows[0])
    epochs = [int(r["epochs"]) for r in rows]
    stopped = [r for r in rows if r["stopped_by"] == "ASHA"]
    weak = [r for r in rows if float(r["train.lr"]) == WEAK_LR and r["model.batch_norm"] == "False"]
    assert weak, rows  # the sampled configurations are the ones the space's comment names
    assert weak[0] in stopped and all(int(r["epochs"]) < 4 for r in stopped)
    # Every trial's first-rung score is on disk after the resume, not the rungs as they were at it.
    from tune.asha import STATE_FILE

    rungs = dict((m, r) for m, r in json.loads((search["dir"] / STATE_FILE).read_text())["rungs"])
    assert set(rungs[1.0]) == {r["trial_id"] for r in rows}
    assert max(epochs) == 4  # the rung leaders run to the end
    assert rows[0]["rank"] == "1" and float(rows[0]["val_psnr"]) == max(
        float(r["val_psnr"]) for r in rows
    )
    for r in rows:
        assert 5 < float(r["bicubic_psnr"]) < 40
        assert Path(r["checkpoint"], "model.keras").exists()  # every trial keeps its best
        run = search["dir"] / "runs" / r["trial_id"]
        lines = (run / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(x)["epoch"] for x in lines] == list(range(1, int(r["epochs"]) + 1))
    summary = (search["dir"] / "summary.md").read_text()
    spent = sum(epochs)
    assert f"Trial-epochs spent: **{spent}** of 16" in summary
    assert f"ASHA stopped **{len(stopped)}** of 4 trials early" in summary
    assert "Test split 'test' (2 images" in summary and "vs bicubic" in summary
    assert (search["dir"] / "search.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
@pytest.mark.ray
def test_best_yaml_is_a_training_job_that_trains(search, tmp_path):
    best = search["dir"] / "best.yaml"
    assert best.read_text().startswith(f"# python -m srtrain.run --config {best}")
    assert "search" not in yaml.safe_load(best.read_text())
    cfg = load_config(best)
    top = next(csv.DictReader((search["dir"] / "results.csv").open()))
    assert cfg.train.lr == pytest.approx(float(top["train.lr"]))
    assert cfg.model.batch_norm == (top["model.batch_norm"] == "True")
    assert (cfg.model.filters, cfg.run.name) == (8, "")
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "srtrain.run",
            "--local",
            "--config",
            str(best),
            "--set",
            "train.epochs=1",
            "--set",
            "train.steps_per_epoch=1",
            "--output",
            str(tmp_path),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert "epoch 1/1" in p.stdout
