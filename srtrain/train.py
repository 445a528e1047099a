"""The training loop: one custom loop under tf.distribute for every mode.

Keras 3 `Model.fit` fails under MultiWorkerMirroredStrategy, so the loop is written by hand:
`strategy.run` over a `tf.function` step (srtrain.steps) with Keras 3 layers and optimizer, the
loss averaged over the global batch, `strategy.reduce` for metrics. `--local` runs call
`train_loop` in-process; Ray Train workers call the same function (srtrain.run wires the
`Context`).

Per epoch: `train.steps_per_epoch` steps, then validation of the model AND of bicubic upscaling
on the same LR inputs (srtrain.scoring), the epoch-end policy (srtrain.schedule: best weights,
plateau schedule, early stopping), a checkpoint and a metrics line (srtrain.progress). With
`train.ema_decay` the averaged weights (srtrain.ema) are the ones validated, kept as best and
exported. At the end, the best weights are evaluated once on the test split (`data.test_split`),
which no training decision reads.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from srtrain import checkpoints, data, losses, models, schedule, scoring, storage, tensorboard
from srtrain.config import Config
from srtrain.devices import cpu_kernels, dtype_policy, pick_strategy, split_cpu, sum_over_workers
from srtrain.ema import WeightEMA
from srtrain.progress import CHECK_LOSS_EVERY, LossMeter, MetricsLog, TrainingDiverged
from srtrain.progress import progress_line as _progress_line
from srtrain.scoring import make_eval_step, validate
from srtrain.steps import (
    clip_global_norm,
    distributed_train_dataset,
    make_optimizer,
    make_train_step,
    prepare_batch,
)

# What srtrain.run, the tests and bench/ import from here: the loop and its Context, and names
# that moved to the modules above (devices, steps, progress, scoring) and stay importable here.
__all__ = [
    "Context",
    "LossMeter",
    "TrainingDiverged",
    "clip_global_norm",
    "distributed_train_dataset",
    "dtype_policy",
    "evaluate_test_split",
    "make_eval_step",
    "make_optimizer",
    "make_train_step",
    "pick_strategy",
    "prepare_batch",
    "split_cpu",
    "train_loop",
]

# report(metrics, local checkpoint directory or None); every worker calls it at the same points.
ReportFn = Callable[[dict, "Path | None"], None]


@dataclass
class Context:
    """How the loop talks to whoever runs it."""

    run_dir: str  # URI of the run directory (local or s3://)
    rank: int = 0
    world_size: int = 1
    restore_from: Path | None = None  # local checkpoint directory to resume from
    report: ReportFn | None = None
    log_fn: Callable[[str], None] = field(default=print)

    @property
    def chief(self) -> bool:
        return self.rank == 0


def _fail_injection(cfg: Config, ctx: Context, step: int) -> None:
    """debug.fail_at_step: kill one worker process once per run (tests of fault tolerance)."""
    target_rank = 1 if ctx.world_size > 1 else 0
    if step != cfg.debug.fail_at_step or ctx.rank != target_rank:
        return
    marker = storage.join(ctx.run_dir, ".fail-injected")
    if storage.exists(marker, cfg.data.endpoint_url, cfg.data.region):
        return
    storage.write_bytes(marker, f"step {step}\n".encode(), cfg.data.endpoint_url, cfg.data.region)
    ctx.log_fn(f"debug.fail_at_step: killing worker rank {ctx.rank} at step {step}")
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def train_loop(cfg: Config, ctx: Context) -> dict:
    """Trains per `cfg`, reports every epoch through `ctx`, returns the final result dict."""
    if cfg.debug.cpu_replicas > 1:
        split_cpu(cfg.debug.cpu_replicas)
    keras.utils.set_random_seed(cfg.train.seed)
    strategy = pick_strategy()
    replicas = strategy.num_replicas_in_sync
    global_batch = cfg.data.batch_size * replicas
    policy = dtype_policy(cfg.train.precision)
    base_lr = cfg.train.lr * (replicas if cfg.train.lr_scaling == "linear" else 1)
    scale = cfg.degradation.scale

    with strategy.scope():
        model = models.from_config(
            cfg.model, scale, dtype=policy, replicas=replicas, fused_batch_norm=True
        )
        lr_schedule = schedule.learning_rate(cfg.train, base_lr)
        optimizer = make_optimizer(lr_schedule, policy)
        optimizer.build(model.trainable_variables)
        ema = None
        if cfg.train.ema_decay:
            averaged = models.from_config(cfg.model, scale, dtype=policy, replicas=replicas)
            ema = WeightEMA(strategy, model, averaged, cfg.train.ema_decay)
        tail = (
            losses.MseTail(cfg.loss.mse_final_fraction, optimizer.iterations)
            if cfg.loss.mse_final_fraction
            else None
        )
    # What is validated, kept as best, tested and exported: the EMA weights when on.
    eval_model = ema.averaged if ema else model
    loss_fn = losses.build_loss(
        cfg.loss, dtype=policy, endpoint_url=cfg.data.endpoint_url, region=cfg.data.region
    )
    # Built for one replica: the checkpoint's model.keras carries no tf.distribute settings.
    export_model = models.from_config(cfg.model, scale) if ctx.chief else None

    state, best_weights = checkpoints.TrainState(lr=base_lr), None
    if ctx.restore_from is not None:
        with strategy.scope():
            state, best_weights = checkpoints.restore(
                ctx.restore_from, model, optimizer, ema.averaged if ema else None
            )
        ctx.log_fn(f"resumed from {ctx.restore_from} at epoch {state.epoch}, step {state.step}")
    if cfg.train.schedule == "plateau":
        optimizer.learning_rate.assign(state.lr)

    def plan(epochs: int) -> int | None:
        """Ends the cosine, and starts the MSE tail, where a run of `epochs` epochs would;
        returns the tail's first step (None without one)."""
        if isinstance(lr_schedule, schedule.CosineSchedule):
            lr_schedule.plan(epochs)
        return tail.plan(epochs * cfg.train.steps_per_epoch) if tail else None

    planned = schedule.planned_epochs(state, cfg.train)
    mse_start = plan(planned)

    train_iter = iter(distributed_train_dataset(strategy, cfg, global_batch, state.step))
    val_ds = data.eval_dataset(cfg, index=ctx.rank, count=ctx.world_size)
    train_step = make_train_step(
        strategy,
        model,
        optimizer,
        tail.wrap(loss_fn) if tail else loss_fn,
        global_batch,
        cfg.train.jit,
        prepare_batch(cfg),
        clip_norm=cfg.train.grad_clip_norm,
        ema=ema,
    )
    eval_step = make_eval_step(eval_model, loss_fn, scale)
    tb = (
        tensorboard.TensorBoardWriter(ctx.run_dir, cfg, val_ds, images=cfg.train.sample_images)
        if ctx.chief
        else None
    )

    if ctx.chief:
        ctx.log_fn(
            f"training {model.name}: {model.count_params():,} params, {replicas} replica(s) x "
            f"batch {cfg.data.batch_size} = global batch {global_batch}, {policy}"
            + ("" if tf.config.list_logical_devices("GPU") else f" on CPU ({cpu_kernels()})")
            + f", lr {base_lr:g}"
            f" ({cfg.train.schedule}"
            + (f", {cfg.train.warmup_steps} warmup steps" if cfg.train.warmup_steps else "")
            + (f", EMA {cfg.train.ema_decay:g}" if ema else "")
            + (f", grad clip {cfg.train.grad_clip_norm:g}" if cfg.train.grad_clip_norm else "")
            + (f", MSE from step {mse_start:,}" if tail else "")
            + ")"
        )
    metrics_log = MetricsLog(ctx.run_dir, cfg) if ctx.chief else None
    if metrics_log:
        metrics_log.truncate_after(state.epoch)
    steps_per_epoch = cfg.train.steps_per_epoch
    total_steps = cfg.train.epochs * steps_per_epoch
    images_per_sec = 0.0
    stopped_early = False

    first_epoch = state.epoch + 1
    while state.epoch < cfg.train.epochs and not stopped_early:
        epoch = state.epoch + 1
        t0, wait, meter = time.perf_counter(), 0.0, LossMeter()
        while state.step < epoch * steps_per_epoch:
            t_in = time.perf_counter()
            batch = next(train_iter)
            wait += time.perf_counter() - t_in
            state.step += 1
            meter.add(train_step(batch), state.step)
            if state.step % CHECK_LOSS_EVERY == 0:
                _check_loss(meter, state, tb)
            if cfg.debug.fail_at_step:
                _fail_injection(cfg, ctx, state.step)
            every = cfg.train.checkpoint_every_steps
            if every and state.step % every == 0 and state.step < epoch * steps_per_epoch:
                _check_loss(meter, state, tb)  # never checkpoint a diverged model
                _checkpoint(
                    cfg,
                    ctx,
                    export_model,
                    model,
                    optimizer,
                    state,
                    best_weights,
                    {"step": state.step, "epoch": state.epoch, "train_loss": meter.mean()},
                    eval_model,
                )
        _check_loss(meter, state, tb)
        seconds = time.perf_counter() - t0
        images_per_sec = meter.n * global_batch / max(seconds, 1e-9)
        row = {
            "epoch": epoch,
            "step": state.step,
            "train_loss": meter.mean(),
            "lr": float(keras.ops.convert_to_numpy(optimizer.learning_rate)),  # at the epoch end
            "images_per_sec": images_per_sec,
            "input_wait": wait / max(seconds, 1e-9),
            "seconds": seconds,
        }
        row.update(validate(strategy, eval_step, val_ds, cfg.train.val_steps))
        # The mean over workers, so every worker takes the same time-limit decision.
        row["epoch_seconds"] = float(
            sum_over_workers(strategy, np.array([time.perf_counter() - t0]))[0] / ctx.world_size
        )
        state.epoch = epoch

        warm = epoch > first_epoch  # the first epoch of a process also traces and compiles
        state, decision = schedule.epoch_end_policy(state, row, cfg.train, warm)
        if decision.improved:
            best_weights = eval_model.get_weights()
        if decision.lr_reduced:
            optimizer.learning_rate.assign(state.lr)
            row["lr_reduced_to"] = state.lr
        if decision.stop:
            stopped_early = True
            row["stopped_early"] = True
        if decision.out_of_time:
            row["time_limit"] = True
        if (fit := schedule.planned_epochs(state, cfg.train)) != planned:
            # The time limit will end the run at another epoch: the cosine (and MSE tail) follow.
            planned = row["planned_epochs"] = fit
            if not decision.stop and (start := plan(planned)) is not None:
                row["mse_from_step"] = start
        row["best"] = decision.improved
        if ctx.chief:
            ctx.log_fn(_progress_line(row, cfg.train.epochs))
            metrics_log.append(row)
            tb.epoch(row, eval_model)
        _checkpoint(cfg, ctx, export_model, model, optimizer, state, best_weights, row, eval_model)

    if best_weights is not None:
        eval_model.set_weights(best_weights)  # early stopping with restore-best, as the original
    best = state.best_metrics or {}
    result = {
        "val_psnr": best.get("val_psnr"),
        "val_ssim": best.get("val_ssim"),
        "bicubic_psnr": best.get("bicubic_psnr"),
        "bicubic_ssim": best.get("bicubic_ssim"),
        "val_loss": best.get("val_loss"),
        "best_epoch": state.best_epoch,
        "epochs": state.epoch,
        "steps": state.step,
        "planned_steps": total_steps,
        "stopped_early": stopped_early,
        "train_seconds": state.train_seconds,
        "images_per_sec": images_per_sec,
        "replicas": replicas,
        "global_batch": global_batch,
        "precision": policy,
        "protocol": "seed (RGB, [0, 1], whole center crop)",
    }
    # Once, on the chosen weights; every worker takes part (validate all-reduces).
    result.update(evaluate_test_split(cfg, ctx, strategy, eval_step))
    if ctx.chief:
        tb.close()
        _write_samples(cfg, ctx, eval_model, val_ds)
    return result


TEST_KEYS = ("test_psnr", "test_ssim", "test_bicubic_psnr", "test_bicubic_ssim")


def evaluate_test_split(cfg: Config, ctx: Context, strategy, eval_step) -> dict:
    """test_psnr/_ssim and bicubic's on the whole test split (data.test_split), seed protocol:
    RGB on [0, 1], center crops of data.val_patch_size, LR degraded with a fixed seed per image.
    A source without that split gives None for each, and one log line."""
    split = cfg.data.test_split
    crop = cfg.data.val_patch_size or cfg.data.patch_size
    out = dict.fromkeys(TEST_KEYS)
    out.update(test_split=split, test_images=0, test_protocol=f"seed (RGB, {crop} center crops)")
    whole = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, val_images=0))
    try:
        test_ds = data.eval_dataset(whole, split=split, index=ctx.rank, count=ctx.world_size)
    except (ValueError, storage.StorageError) as e:  # a source without that split
        if ctx.chief:
            ctx.log_fn(f"no test metrics: {cfg.data.source} has no split {split!r} ({e})")
        return out
    m = validate(strategy, eval_step, test_ds)
    if not m["val_images"]:
        if ctx.chief:
            ctx.log_fn(f"no test metrics: no image of {cfg.data.source}:{split} fits a {crop} crop")
        return out
    out.update(
        test_psnr=m["val_psnr"],
        test_ssim=m["val_ssim"],
        test_bicubic_psnr=m["bicubic_psnr"],
        test_bicubic_ssim=m["bicubic_ssim"],
        test_images=m["val_images"],
    )
    return out


def _check_loss(meter: LossMeter, state, tb) -> None:
    try:
        meter.check(state.lr)
    except TrainingDiverged:
        if tb is not None:
            tb.close()
        raise


def _checkpoint(
    cfg, ctx, export_model, model, optimizer, state, best_weights, row, eval_model=None
) -> None:
    """Every worker calls this at the same points (Ray's report is a barrier); rank 0 writes.

    The exported model holds `eval_model`'s weights (the EMA's when on); the raw ones then go
    alongside for resuming."""
    ckpt_dir = None
    if ctx.chief:
        eval_model = eval_model or model
        export_model.set_weights(eval_model.get_weights())
        raw = model.get_weights() if eval_model is not model else None
        ckpt_dir = Path(tempfile.mkdtemp(prefix="srtrain-ckpt-"))
        checkpoints.save(ckpt_dir, cfg, export_model, optimizer, state, best_weights, raw)
    if ctx.report is not None:
        ctx.report({k: v for k, v in row.items() if _scalar(v)}, ckpt_dir)
    if ckpt_dir is not None:
        shutil.rmtree(ckpt_dir, ignore_errors=True)


def _scalar(v) -> bool:
    return isinstance(v, (int, float, bool)) and not (isinstance(v, float) and math.isnan(v))


def _write_samples(cfg: Config, ctx: Context, model, val_ds) -> None:
    """samples.png: LR (nearest-upscaled) | bicubic | model | HR, one validation image a row."""
    n = cfg.train.sample_images
    if n <= 0:
        return
    grid = None
    for _, lr, hr in val_ds.unbatch().take(n).batch(n):
        rows = scoring.side_by_side(model, lr, hr, cfg.degradation.scale)  # (N, H, 4W, 3)
        grid = tf.reshape(rows, (-1, *rows.shape[2:]))  # (N*H, 4W, 3)
    if grid is None:
        return
    grid = tf.image.convert_image_dtype(grid, tf.uint8, saturate=True)
    storage.write_bytes(
        storage.join(ctx.run_dir, "samples.png"),
        tf.io.encode_png(grid).numpy(),
        cfg.data.endpoint_url,
        cfg.data.region,
    )
