"""Train a U-Net: `python -m srtrain.run [--config jobs/X.yaml] [--set k=v ...] [--local]`.

With no arguments it trains the embedded default (Base U-Net, MAE, bundled sample photos) through
a local Ray runtime with one Ray Train worker. `--local` (or `run.local: true` in the job) runs the
same loop in this process without Ray. Under `ray job submit` (RAY_ADDRESS set) it joins that
cluster. Everything a run leaves (config.yaml, command.txt, metrics.jsonl, result.json,
samples.png, checkpoints) goes to `<run.storage>/<run.name>/`, a local directory or
s3://bucket/prefix.

A run name means one run: an existing one is an error unless `--resume` continues it (from its
newest checkpoint, in the mode that trained it). A resumed run keeps its config.yaml; command.txt
gains one line per command that ran it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shlex
import signal
import sys
import tempfile
import time
from pathlib import Path

from srtrain import cli, storage
from srtrain.config import Config, ConfigError, load_config, to_dict, to_yaml

PROG = "srtrain.run"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    flags = {
        "--config": "job YAML (default: the embedded samples job)",
        "--set": "override a config value, e.g. --set train.lr=1e-3 (repeatable)",
        "--local": {
            "action": "store_true",
            "help": "run in this process without Ray (one GPU, several GPUs or the CPU); "
            "sets run.local",
        },
        "--output": "run storage: a local directory or s3://bucket/prefix "
        "(sets run.storage; default ./runs)",
        "--name": "run name (sets run.name; default <job>-<UTC time>); must be new unless --resume",
        "--resume": "continue the run of this name (default: the newest run of this job) "
        "from its latest checkpoint; starts it if it does not exist yet",
    }
    return cli.parser(PROG, __doc__, flags).parse_args(argv)


def resolve_config(args: argparse.Namespace) -> Config:
    overrides = cli.overrides(args) + ([cli.as_string("run.name", args.name)] if args.name else [])
    overrides += ["run.local=true"] if args.local else []
    cfg = load_config(args.config, overrides)
    # Ray workers run in their own working directory: a relative path must mean ours.
    return dataclasses.replace(
        cfg, run=dataclasses.replace(cfg.run, storage=cli.absolute(cfg.run.storage))
    )


def run_name(cfg: Config, args: argparse.Namespace) -> str:
    job = cli.job_name(args.config, "samples-base")
    return cli.choose_name(cfg, cfg.run.name, job, args.resume) or cli.new_name(job)


def write_run_files(cfg: Config, run_dir: str, argv: list[str], resuming: bool = False) -> None:
    """config.yaml and command.txt. A resumed run keeps the config.yaml it started with (each
    checkpoint holds the config that wrote it) and adds its command line to command.txt."""
    kw = {"endpoint_url": cfg.data.endpoint_url, "region": cfg.data.region}
    command = shlex.join([sys.executable, "-m", PROG, *argv]) + "\n"
    config_uri, commands_uri = (
        storage.join(run_dir, "config.yaml"),
        storage.join(run_dir, "command.txt"),
    )
    if not (resuming and storage.exists(config_uri, **kw)):
        storage.write_bytes(config_uri, to_yaml(cfg).encode(), **kw)
    before = b""
    if resuming and storage.exists(commands_uri, **kw):
        before = storage.read_bytes(commands_uri, **kw)
    storage.write_bytes(commands_uri, before + command.encode(), **kw)


def check_run_name(cfg: Config, name: str, run_dir: str, resume: bool) -> bool:
    """The one meaning of a run name (cli.claim), and a run continues from its newest checkpoint
    in the mode that wrote it. Returns whether there is a run to continue."""
    kw = {"endpoint_url": cfg.data.endpoint_url, "region": cfg.data.region}
    if not cli.claim(cfg, "run", name, run_dir, resume):
        return False
    # one process (run.local) keeps checkpoints/index.json, Ray its checkpoint_manager_snapshot.json
    by_ray = storage.exists(storage.join(run_dir, "checkpoint_manager_snapshot.json"), **kw)
    by_local = storage.exists(storage.join(run_dir, "checkpoints", "index.json"), **kw)
    if cfg.run.local and by_ray and not by_local:
        raise ConfigError(
            f"run {name!r} was trained by Ray: resume it without --local (run.local false)"
        )
    if not cfg.run.local and by_local and not by_ray:
        raise ConfigError(
            f"run {name!r} was trained in one process: resume it with --local (run.local true)"
        )
    return True


def write_result(cfg: Config, run_dir: str, result: dict) -> None:
    storage.write_bytes(
        storage.join(run_dir, "result.json"),
        (json.dumps(result, indent=2) + "\n").encode(),
        cfg.data.endpoint_url,
        cfg.data.region,
    )


# --- local mode ---------------------------------------------------------------------------------


def run_local(cfg: Config, run_dir: str, resume: bool) -> dict:
    from srtrain import checkpoints, train

    ckpts = checkpoints.LocalCheckpoints(
        run_dir, cfg.train.keep_checkpoints, cfg.data.endpoint_url, cfg.data.region
    )
    restore = None
    if resume and ckpts.latest():
        restore = ckpts.download(ckpts.latest())

    def report(metrics: dict, ckpt_dir: Path | None) -> None:
        if ckpt_dir is not None:
            ckpts.persist(ckpt_dir, checkpoints.load_state(ckpt_dir), metrics)

    ctx = train.Context(run_dir=run_dir, restore_from=restore, report=report)
    try:
        result = train.train_loop(cfg, ctx)
    except train.TrainingDiverged as e:
        raise cli.Failed(str(e)) from None
    result["checkpoint"] = ckpts.best() or ckpts.latest()
    result["latest_checkpoint"] = ckpts.latest()
    return result


# --- Ray mode -----------------------------------------------------------------------------------


def _ray_worker(config: dict) -> None:
    """Runs on every Ray Train worker."""
    import ray.train

    from srtrain import train
    from srtrain.config import from_dict

    cfg = from_dict(config["cfg"])
    tctx = ray.train.get_context()
    restore = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        restore = Path(tempfile.mkdtemp(prefix="srtrain-restore-"))
        checkpoint.to_directory(str(restore))

    def report(metrics: dict, ckpt_dir: Path | None) -> None:
        ckpt = ray.train.Checkpoint.from_directory(str(ckpt_dir)) if ckpt_dir else None
        ray.train.report(metrics, checkpoint=ckpt)

    # Ray Train patches print() into a logger that also tees to stdout (every line twice), and
    # logs each report with all its metrics at INFO, on a logger named after its source file that
    # only the root's level governs; write progress lines straight to the stream instead and keep
    # the rest at WARNING (srtrain's logger has its own handler and level).
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    logging.getLogger().setLevel(logging.WARNING)
    setup_logging()

    def log_line(text: str) -> None:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()

    ctx = train.Context(
        run_dir=config["run_dir"],
        rank=tctx.get_world_rank(),
        world_size=tctx.get_world_size(),
        restore_from=restore,
        report=report,
        log_fn=log_line,
    )
    try:
        result = train.train_loop(cfg, ctx)
    except train.TrainingDiverged as e:
        # Every worker sees the same reduced loss and stops at the same step. Returning (not
        # raising) keeps Ray from retrying a run that would diverge again, and keeps worker
        # tracebacks off the console: the driver finds the message in result.json.
        result = {"error": str(e)}
    if ctx.chief:
        write_result(cfg, config["run_dir"], result)  # the driver adds the checkpoint path


def build_trainer(cfg: Config, run_dir: str, name: str, **run_config_kw):
    """The TensorflowTrainer for a job: scaling, storage (local or S3), failures, checkpoints.

    tune.search reuses it for every trial (extra RunConfig arguments such as callbacks pass
    through `run_config_kw`).
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.tensorflow import TensorflowTrainer

    s = cfg.scaling
    storage_fs, storage_path = None, str(Path(cfg.run.storage).resolve())
    if storage.is_s3(cfg.run.storage):
        storage_fs, storage_path = storage.resolve(
            cfg.run.storage, cfg.data.endpoint_url, cfg.data.region
        )
    return TensorflowTrainer(
        train_loop_per_worker=_ray_worker,
        train_loop_config={"cfg": to_dict(cfg), "run_dir": run_dir},
        scaling_config=ScalingConfig(
            num_workers=s.num_workers,
            use_gpu=s.gpus_per_worker > 0,
            resources_per_worker={"CPU": s.cpus_per_worker, "GPU": s.gpus_per_worker},
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            failure_config=FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=cfg.train.keep_checkpoints + 1,
                checkpoint_score_attribute="val_psnr",
                checkpoint_score_order="max",
            ),
            **run_config_kw,
        ),
    )


def run_ray(cfg: Config, run_dir: str, name: str) -> dict:
    cli.start_ray()
    signal.signal(signal.SIGTERM, _interrupt)  # ray.init installed its own (a bare sys.exit)
    result = build_trainer(cfg, run_dir, name).fit()
    if result.error:
        raise result.error
    kw = {"endpoint_url": cfg.data.endpoint_url, "region": cfg.data.region}
    out = json.loads(storage.read_bytes(storage.join(run_dir, "result.json"), **kw))
    if out.get("error"):
        raise cli.Failed(out["error"])
    best = result.best_checkpoints or []
    scored = [(m.get("val_psnr"), c) for c, m in best if m.get("val_psnr") is not None]
    if scored:
        out["checkpoint"] = _uri(cfg, max(scored, key=lambda t: t[0])[1].path)
    out["latest_checkpoint"] = _uri(cfg, result.checkpoint.path) if result.checkpoint else None
    return out


def _uri(cfg: Config, path: str) -> str:
    return f"s3://{path}" if storage.is_s3(cfg.run.storage) else path


# --- entry point --------------------------------------------------------------------------------


def setup_logging() -> None:
    """srtrain's own INFO lines (which shards a worker reads, ...) on stdout, in every process."""
    logger = logging.getLogger("srtrain")
    if not any(getattr(h, "_srtrain", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        handler._srtrain = True
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def _vgg_error() -> type[Exception]:
    from srtrain.losses import VGGWeightsError

    return VGGWeightsError


def _interrupt(signum, frame) -> None:
    # SIGTERM (kubectl delete, a scheduler's stop) takes the same path as Ctrl-C: Ray aborts the
    # run and shuts down what it started; the checkpoints written so far stay for --resume.
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    signal.signal(signal.SIGTERM, _interrupt)
    setup_logging()
    args = parse_args(argv)
    return cli.exit_code(PROG, lambda: run_job(args, argv))


def run_job(args: argparse.Namespace, argv: list[str]) -> int:
    """Resolves, checks and trains one run; errors a user can act on go up to cli.exit_code."""
    cfg = resolve_config(args)
    storage.check_writable(cfg.run.storage, cfg.data.endpoint_url, cfg.data.region)
    name = run_name(cfg, args)
    run_dir = storage.join(cfg.run.storage, name)
    resuming = check_run_name(cfg, name, run_dir, args.resume)
    if cfg.loss.kind == "composite":  # fail before any work when VGG weights are missing
        from srtrain import losses

        try:
            losses.fetch_weights(cfg.loss.vgg_weights, cfg.data.endpoint_url, cfg.data.region)
        except losses.VGGWeightsError as e:
            raise cli.Failed(str(e)) from None
    write_run_files(cfg, run_dir, argv, resuming)
    mode = "local (no Ray)" if cfg.run.local else f"Ray, {cfg.scaling.num_workers} worker(s)"
    if cfg.run.local and os.environ.get("RAY_ADDRESS"):
        mode += " although RAY_ADDRESS is set (--set run.local=false trains on that cluster)"
    print(f"run {name}: {mode}; outputs in {run_dir}", flush=True)
    t0 = time.time()
    try:
        if cfg.run.local:
            result = run_local(cfg, run_dir, resuming)
        else:
            result = run_ray(cfg, run_dir, name)
    except KeyboardInterrupt:
        raise cli.Interrupted(f"continue with --resume --name {name}") from None
    except (cli.Failed, storage.StorageError, ConfigError, _vgg_error()) as e:
        raise cli.Failed(str(e)) from None  # exit 1, not 2: the job was valid, its run failed
    except Exception as e:  # a worker's error reaches us wrapped; show its last line
        msg = str(e).strip().splitlines()
        failed = cli.Failed(f"training failed: {msg[-1] if msg else type(e).__name__}")
        if os.environ.get("SRTRAIN_DEBUG"):
            print(f"{PROG}: error: {failed}", file=sys.stderr)
            raise
        raise failed from None
    result["wall_seconds"] = round(time.time() - t0, 1)
    write_result(cfg, run_dir, result)
    print(summary_line(result), flush=True)
    return 0


def _test_part(result: dict) -> str:
    if result.get("test_psnr") is not None:
        gain = result["test_psnr"] - result["test_bicubic_psnr"]
        return (
            f"test_psnr {result['test_psnr']:.2f} dB vs bicubic "
            f"{result['test_bicubic_psnr']:.2f} dB ({gain:+.2f} dB), test_ssim "
            f"{result['test_ssim']:.3f} vs {result['test_bicubic_ssim']:.3f} "
            f"({result['test_images']} images of split {result['test_split']!r}, "
            f"{result['test_protocol']}, best-on-val weights); "
        )
    if result.get("test_split"):
        return f"no test split {result['test_split']!r} in this data; "
    return ""


def summary_line(result: dict) -> str:
    """The run's last line: the test split first (no training decision read it), then val."""
    tail = (
        f"{result['steps']} steps in {result['wall_seconds']:.0f} s; "
        f"checkpoint {result.get('checkpoint')}"
    )
    test = _test_part(result)
    if result.get("val_psnr") is None:  # no epoch had a finite validation PSNR
        return f"done: {test}no epoch gave a finite validation PSNR; {tail}"
    gain = result["val_psnr"] - (result["bicubic_psnr"] or 0)
    return (
        f"done: {test}val_psnr {result['val_psnr']:.2f} dB vs bicubic "
        f"{result['bicubic_psnr']:.2f} dB ({gain:+.2f} dB), val_ssim {result['val_ssim']:.3f} vs "
        f"{result['bicubic_ssim']:.3f}; {tail}"
    )


if __name__ == "__main__":
    sys.exit(main())
