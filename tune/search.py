"""Hyperparameter search: `python -m tune.search [--config jobs/tune-X.yaml] [--num-samples N]
[--resume] [--output DIR_OR_URI] [--name NAME] [--set k=v ...]`.

With no arguments it runs the embedded default search (tune/tune-samples.yaml, which
jobs/tune-samples.yaml links to) on the bundled sample photos, on a local Ray runtime; under
`ray job submit` (RAY_ADDRESS set) it joins that cluster. Ray Tune samples the `search.space`,
ASHA stops weak trials after each epoch, and every trial is a Ray Train run of the training function
`python -m srtrain.run` uses (srtrain.run.build_trainer), with the job's scaling. The search
directory `<run.storage>/<name>/` (local or s3://) holds Tune's state, one run directory per
trial under runs/ (metrics.jsonl, checkpoints), and results.csv, summary.md, best.yaml and
search.png. A search stopped by Ctrl-C or a lost driver continues with `--resume` (Tune's
restore: finished trials are kept, unfinished ones continue from their last epoch checkpoint;
ASHA's rungs come back from scheduler/asha-rungs.json, tune/asha.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys
import time
from pathlib import Path

# One line per trial event instead of Tune's periodic status tables.
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "1")

from srtrain import cli, storage
from srtrain.config import Config, ConfigError, from_dict, to_dict
from tune import report, space
from tune.space import SearchSettings, load_search_job

PROG = "tune.search"
TRIAL_MEMORY = 1 << 20
__all__ = ["SearchSettings", "load_search_job", "main"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    flags = {
        "--config": "search job YAML (default: the embedded samples search, "
        "jobs/tune-samples.yaml)",
        "--num-samples": {
            "type": int,
            "metavar": "N",
            "help": "number of trials (sets search.num_samples)",
        },
        "--set": "override a config value, e.g. --set train.epochs=4 or "
        "--set search.space.train.lr='{loguniform: [1e-4, 1e-2]}' (repeatable)",
        "--output": "where search directories go: a local directory or "
        "s3://bucket/prefix (sets run.storage; default ./runs)",
        "--name": "search directory name (default <job>-<UTC time>)",
        "--resume": "continue the search of this name "
        "(default: the newest search of this job under the output)",
    }
    return cli.parser(PROG, __doc__, flags).parse_args(argv)


def resolve_job(args: argparse.Namespace) -> tuple[Config, SearchSettings]:
    samples = [f"search.num_samples={args.num_samples}"] if args.num_samples is not None else []
    return load_search_job(args.config, [*cli.overrides(args), *samples])


def search_name(cfg: Config, args: argparse.Namespace) -> str:
    job = cli.job_name(args.config, "tune-samples")
    name = cli.choose_name(cfg, args.name, job, args.resume)
    if name is None:
        raise ConfigError(
            f"--resume: no search of job {job!r} under {cfg.run.storage} "
            "(pass --name NAME of the search to continue)"
        )
    return name


# --- resources ----------------------------------------------------------------------------------


def trial_resources(cfg: Config) -> dict[str, float]:
    """What one trial's Ray Train workers hold; the trial function itself holds nothing."""
    s = cfg.scaling
    need = {"CPU": s.num_workers * s.cpus_per_worker, "GPU": s.num_workers * s.gpus_per_worker}
    return {k: v for k, v in need.items() if v > 0}


def cluster_capacity() -> dict[str, float]:
    """The cluster's resources now, or what its autoscaler may grow to, whichever is larger."""
    import ray

    have = dict(ray.cluster_resources())
    try:  # the autoscaler's node-group maxima (KubeRay, cluster launcher); None on a local runtime
        from ray._private.state import state

        grow = state.get_max_resources_from_cluster_config() or {}
    except Exception:
        grow = {}
    return {k: max(float(have.get(k, 0)), float(grow.get(k, 0))) for k in {*have, *grow}}


def concurrent_trials(need: dict[str, float], capacity: dict[str, float], configured: int) -> int:
    """How many trials run at once so their workers never oversubscribe the cluster; the job's
    search.max_concurrent_trials (0: no limit of its own) caps it further."""
    fits = min(int(capacity.get(k, 0) // v) for k, v in need.items())
    if fits < 1:
        wanted = ", ".join(f"{v:g} {k}" for k, v in need.items())
        has = ", ".join(f"{capacity.get(k, 0):g} {k}" for k in need)
        raise ConfigError(
            f"scaling: a trial needs {wanted} (num_workers x per-worker resources) "
            f"but the cluster has {has}"
        )
    return min(fits, configured) if configured else fits


# --- trials -------------------------------------------------------------------------------------


def run_trial(params: dict, *, base: dict, settings: SearchSettings, runs_root: str) -> None:
    """One Tune trial: a Ray Train run of the sampled config, reporting every epoch to Tune.

    It runs in Tune's trial actor (no CPU of its own) and launches the trial's Train workers.
    The Train run is named after the trial, so a trial Tune restarts (after --resume) continues
    from its latest epoch checkpoint instead of starting over.
    """
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from srtrain import run

    trial_id = ray.tune.get_context().get_trial_id()
    cfg = space.trial_config(from_dict(base), space.flat_params(params), settings)
    # Set directly, not as "--set" text: YAML would read a trial id like 13540770 as a number.
    run_cfg = dataclasses.replace(cfg.run, storage=runs_root, name=trial_id)
    cfg = dataclasses.replace(cfg, run=run_cfg)
    run_dir = storage.join(runs_root, trial_id)
    run.write_run_files(cfg, run_dir, ["--config", storage.join(run_dir, "config.yaml")])
    result = run.build_trainer(cfg, run_dir, trial_id, callbacks=[TuneReportCallback()]).fit()
    if result.error:
        raise result.error


def _trial_dirname(trial) -> str:
    return trial.trial_id


def make_searcher(settings: SearchSettings):
    if settings.algorithm == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(seed=settings.seed)
    if settings.algorithm == "hyperopt":
        try:
            from ray.tune.search.hyperopt import HyperOptSearch

            return HyperOptSearch(random_state_seed=settings.seed)
        except (ImportError, AssertionError):
            raise ConfigError(
                "search.algorithm: hyperopt is not installed (pip install hyperopt, or use optuna)"
            ) from None
    from ray.tune.search import BasicVariantGenerator

    return BasicVariantGenerator(random_state=settings.seed)


def make_scheduler(settings: SearchSettings, search_dir: str, cfg: Config):
    from tune.asha import STATE_FILE, ResumableASHA

    # `epoch` (not Tune's training_iteration) survives a trial restarted from its checkpoint; the
    # rungs survive `--resume` in the search directory.
    return ResumableASHA(
        state_uri=storage.join(search_dir, STATE_FILE),
        endpoint_url=cfg.data.endpoint_url,
        region=cfg.data.region,
        time_attr="epoch",
        max_t=settings.max_epochs,
        grace_period=settings.scheduler.grace_period,
        reduction_factor=settings.scheduler.reduction_factor,
    )


def build_tuner(
    cfg: Config,
    settings: SearchSettings,
    search_dir: str,
    *,
    name: str,
    concurrent: int,
    resume: bool,
):
    import ray.tune

    trainable = ray.tune.with_resources(
        ray.tune.with_parameters(
            run_trial,
            base=to_dict(cfg),
            settings=settings,
            runs_root=storage.join(search_dir, "runs"),
        ),
        # The trial only drives its Train run and the workers hold the CPUs and GPUs. Tune cannot
        # schedule an empty request, so the trial holds 1 MiB of Ray's logical memory instead.
        {"CPU": 0, "memory": TRIAL_MEMORY},
    )
    fs, path = storage.resolve(search_dir, cfg.data.endpoint_url, cfg.data.region)
    fs = fs if storage.is_s3(search_dir) else None
    if resume and ray.tune.Tuner.can_restore(path, storage_filesystem=fs):
        return ray.tune.Tuner.restore(
            path,
            trainable=trainable,
            resume_unfinished=True,
            resume_errored=True,
            storage_filesystem=fs,
        )
    return ray.tune.Tuner(
        trainable,
        param_space=space.param_space(settings),
        tune_config=ray.tune.TuneConfig(
            metric=settings.metric,
            mode=settings.mode,
            search_alg=make_searcher(settings),
            scheduler=make_scheduler(settings, search_dir, cfg),
            num_samples=settings.num_samples,
            max_concurrent_trials=concurrent,
            trial_dirname_creator=_trial_dirname,
        ),
        run_config=ray.tune.RunConfig(
            name=name,
            storage_path=str(Path(path).parent) if fs is None else path.rsplit("/", 1)[0],
            storage_filesystem=fs,
            failure_config=ray.tune.FailureConfig(max_failures=0),
            verbose=1,
        ),
    )


# --- entry point --------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    return cli.exit_code(PROG, lambda: search(args, argv))


def search(args: argparse.Namespace, argv: list[str]) -> int:
    """Resolves, checks and runs one search, then writes its report; errors a user can act on
    go up to cli.exit_code."""
    cfg, settings = resolve_job(args)
    if settings.algorithm == "hyperopt":
        make_searcher(settings)  # fail before Ray starts when hyperopt is missing
    storage.check_writable(cfg.run.storage, cfg.data.endpoint_url, cfg.data.region)
    name = search_name(cfg, args)
    search_dir = cli.absolute(storage.join(cfg.run.storage, name))
    exists = cli.claim(cfg, "search", name, search_dir, args.resume)
    resuming = args.resume and storage.exists(
        storage.join(search_dir, "tuner.pkl"), cfg.data.endpoint_url, cfg.data.region
    )
    if exists and not resuming:
        # Stopped before Tune saved its state (a Kubernetes retry of an early failure).
        print(f"--resume: search {name!r} holds no Tune state yet; starting it", flush=True)

    cli.start_ray(own_dashboard=True)
    need = trial_resources(cfg)
    capacity = cluster_capacity()
    concurrent = concurrent_trials(need, capacity, settings.max_concurrent_trials)
    tuner = build_tuner(
        cfg,
        settings,
        search_dir,
        name=name,
        concurrent=concurrent,
        resume=resuming,
    )
    each = ", ".join(f"{v:g} {k}" for k, v in need.items())
    print(
        f"search {name}: {settings.num_samples} trials of up to {settings.max_epochs} epochs, "
        f"{settings.algorithm} (seed {settings.seed}) + ASHA on {settings.metric}; "
        f"{concurrent} at a time ({each} each, cluster {_fmt(capacity, need)}); "
        f"outputs in {search_dir}",
        flush=True,
    )
    command = " ".join(["python", "-m", PROG, *argv])
    t0 = time.time()
    interrupted = False
    try:
        tuner.fit()  # Ctrl-C: Tune saves its state and returns with trials left
    except KeyboardInterrupt:
        interrupted = True
    wall = time.time() - t0
    try:
        summary, unfinished = report.write_outputs(
            cfg, settings, search_dir, name=name, command=command, wall_seconds=wall
        )
    except (storage.StorageError, ValueError) as e:
        raise cli.Failed(f"cannot write the search report: {e}") from None
    print(summary, flush=True)
    if interrupted or unfinished:
        raise cli.Interrupted(f"continue with: python -m {PROG} {_resume_args(args, name)}")
    return 0


def _resume_args(args: argparse.Namespace, name: str) -> str:
    parts = ["--config", args.config] if args.config else []
    for o in args.overrides:
        parts += ["--set", o]
    if args.num_samples is not None:
        parts += ["--num-samples", str(args.num_samples)]
    if args.output:
        parts += ["--output", args.output]
    return shlex.join([*parts, "--resume", "--name", name])


def _fmt(capacity: dict[str, float], need: dict[str, float]) -> str:
    return ", ".join(f"{capacity.get(k, 0):g} {k}" for k in need)


if __name__ == "__main__":
    # Import ourselves by name so Tune pickles run_trial as tune.search.run_trial, not __main__'s.
    from tune.search import main as _main

    sys.exit(_main())
