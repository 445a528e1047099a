"""The training loop: one custom loop under tf.distribute for every mode.

Keras 3 `Model.fit` fails under MultiWorkerMirroredStrategy (DESIGN.md), so the loop is written
out: `strategy.run` over a `tf.function` step with Keras 3 layers and optimizer, the loss averaged
over the global batch, `strategy.reduce` for metrics. `--local` runs call `train_loop` in-process;
Ray Train workers call the same function (srtrain.run wires the `Context`).

Per epoch: `train.steps_per_epoch` steps, then validation of the model AND of bicubic upscaling
on the same LR inputs, the epoch-end policy (srtrain.schedule: best weights, plateau schedule,
early stopping), a checkpoint and a metrics line. With `train.ema_decay` the averaged weights
(srtrain.ema) are the ones validated, kept as best and exported. At the end, the best weights are
evaluated once on the test split (`data.test_split`), which no training decision reads.
"""

from __future__ import annotations

import dataclasses
import json
import logging
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

from srtrain import checkpoints, data, losses, metrics, models, schedule, storage, tensorboard
from srtrain.config import Config
from srtrain.ema import WeightEMA

log = logging.getLogger("srtrain.train")

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


# --- devices, strategy, precision ---------------------------------------------------------------


def split_cpu(replicas: int) -> None:
    """Makes the CPU appear as `replicas` logical devices (debug.cpu_replicas); must run before
    TensorFlow initialises its runtime."""
    cpu = tf.config.list_physical_devices("CPU")[0]
    if len(tf.config.get_logical_device_configuration(cpu) or []) != replicas:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(replicas)]
        )


def pick_strategy() -> tf.distribute.Strategy:
    """MultiWorkerMirrored when TF_CONFIG lists more than one worker, Mirrored when this process
    sees several GPUs (or several logical CPU devices, debug.cpu_replicas), else the default."""
    tf_config = json.loads(os.environ.get("TF_CONFIG", "{}") or "{}")
    workers = tf_config.get("cluster", {}).get("worker", [])
    if len(workers) > 1:
        return tf.distribute.MultiWorkerMirroredStrategy()
    gpus = tf.config.list_logical_devices("GPU")
    if len(gpus) > 1:
        return tf.distribute.MirroredStrategy([d.name for d in gpus])
    cpus = tf.config.list_logical_devices("CPU")
    if not gpus and len(cpus) > 1:
        return tf.distribute.MirroredStrategy([d.name for d in cpus])
    return tf.distribute.get_strategy()


def _cpu_has_fast_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def dtype_policy(precision: str) -> str:
    """Keras dtype policy name for train.precision; "auto" picks bf16 where hardware has it."""
    if precision == "auto":
        gpus = tf.config.list_physical_devices("GPU")
        if gpus:
            details = tf.config.experimental.get_device_details(gpus[0])
            major = (details.get("compute_capability") or (0, 0))[0]
            precision = "bf16" if major >= 8 else "fp16"
        else:
            precision = "bf16" if _cpu_has_fast_bf16() else "fp32"
    return {"fp32": "float32", "bf16": "mixed_bfloat16", "fp16": "mixed_float16"}[precision]


# --- steps --------------------------------------------------------------------------------------


def make_optimizer(lr, policy: str) -> keras.optimizers.Optimizer:
    """Adam; `lr` is a float or a Keras schedule (srtrain.schedule.learning_rate)."""
    opt = keras.optimizers.Adam(learning_rate=lr)
    if policy == "mixed_float16":
        opt = keras.optimizers.LossScaleOptimizer(opt)
    return opt


def prepare_batch(cfg: Config) -> Callable | None:
    """What a replica does to its batch before the forward pass: nothing (None) when tf.data
    delivers (lr, hr); with degradation.on=replica, it turns (hr uint8, seeds) into (lr, hr) with
    the input side's own `data.degrade_batch`, on the replica's device, inside its step."""
    if cfg.degradation.on == "input":
        return None
    return lambda hr, seeds: data.degrade_batch(hr, seeds, cfg)


def clip_global_norm(grads: list, clip_norm: float, loss_scale=1.0) -> list:
    """Scales this replica's gradients so the global gradient (their sum over replicas, what the
    optimizer applies) has an L2 norm of at most `clip_norm`; in replica context.

    The norm is taken of the all-reduced gradient, so every replica computes the same factor.
    That costs one all-reduce more per step with several replicas. `loss_scale`: the fp16 loss
    scale the gradients still carry (the optimizer divides it out later).
    """
    ctx = tf.distribute.get_replica_context()
    total = grads
    if ctx.num_replicas_in_sync > 1:
        total = ctx.all_reduce(tf.distribute.ReduceOp.SUM, grads)
    norm = tf.linalg.global_norm(total) / tf.cast(loss_scale, tf.float32)
    factor = tf.minimum(1.0, clip_norm / tf.maximum(norm, 1e-12))  # non-finite norms stay so
    return [g * tf.cast(factor, g.dtype) for g in grads]


def _summed_over_replicas(grads: list) -> list:
    """The gradients every replica will apply, on every replica, before a loss-scale verdict.

    Keras' LossScaleOptimizer checks the gradients it is handed for inf/NaN and, under
    tf.distribute, takes one replica's verdict for all (keras/src/optimizers/
    loss_scale_optimizer.py, `_tf_apply`), but it is handed each replica's own un-reduced
    gradients: an overflow on another replica reaches the weights through the all-reduce inside
    `apply`, and replicas that disagree around that collective can hang. Summed here, every
    replica checks the same numbers, the ones that are applied. Keras 3's TF optimizer always
    sums over replicas inside `apply` (no flag skips it), hence the `/ n`, exact when n is a
    power of two. Costs a second all-reduce per step; only fp16 with several replicas pays it.
    """
    ctx = tf.distribute.get_replica_context()
    n = ctx.num_replicas_in_sync
    if n == 1:
        return grads
    summed = ctx.all_reduce(tf.distribute.ReduceOp.SUM, grads)
    return [g / n for g in summed]


def make_train_step(
    strategy,
    model,
    optimizer,
    loss_fn,
    global_batch: int,
    jit: bool = False,
    prepare=None,
    clip_norm: float = 0.0,
    ema: WeightEMA | None = None,
):
    """A tf.function taking one distributed batch, (lr, hr) or what `prepare` (see
    `prepare_batch`) turns into (lr, hr); returns the global mean loss as a tensor (reading it is
    a device-to-host copy: the loop reads it only at log boundaries).

    `clip_norm` > 0 clips the global gradient norm (train.grad_clip_norm); `ema` is updated
    after every optimizer step (train.ema_decay)."""
    loss_scaled = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)

    def step_fn(*batch):
        lr, hr = prepare(*batch) if prepare else batch
        with tf.GradientTape() as tape:
            sr = model(lr, training=True)
            per_example = loss_fn(hr, sr)  # (B_replica,)
            loss = tf.nn.compute_average_loss(per_example, global_batch_size=global_batch)
            scaled = optimizer.scale_loss(loss)
        grads = tape.gradient(scaled, model.trainable_variables)
        if loss_scaled:
            grads = _summed_over_replicas(grads)  # one skip-or-apply verdict for all replicas
        if clip_norm:
            grads = clip_global_norm(grads, clip_norm, getattr(optimizer, "dynamic_scale", 1.0))
        optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
        return loss

    @tf.function(jit_compile=jit)
    def train_step(batch):
        per_replica = strategy.run(step_fn, args=batch)
        if ema is not None:
            ema.update(optimizer.iterations)
        return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

    return train_step


def make_eval_step(model, loss_fn, scale: int):
    """Per-image sums for one (lr, hr) batch: model and bicubic loss/PSNR/SSIM."""

    @tf.function
    def eval_step(lr, hr):
        sr = tf.cast(model(lr, training=False), tf.float32)
        bic = metrics.bicubic_upscale(lr, scale)
        return {
            "val_loss": loss_fn(hr, sr),
            "val_psnr": metrics.psnr(sr, hr),
            "val_ssim": metrics.ssim(sr, hr),
            "bicubic_loss": loss_fn(hr, bic),
            "bicubic_psnr": metrics.psnr(bic, hr),
            "bicubic_ssim": metrics.ssim(bic, hr),
        }

    return eval_step


def _allreduce_sum(strategy, values: np.ndarray) -> np.ndarray:
    """Sums a vector over workers (every worker must call this the same number of times)."""
    if strategy.extended._in_multi_worker_mode():
        local_replicas = len(strategy.extended.worker_devices)
        local = tf.constant(values / local_replicas, tf.float64)
        per_replica = strategy.run(lambda: tf.identity(local))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None).numpy()
    return values


def validate(strategy, eval_step, val_ds, max_batches: int = 0) -> dict:
    """Means over this worker's validation shard, combined over workers."""
    keys = ("val_loss", "val_psnr", "val_ssim", "bicubic_loss", "bicubic_psnr", "bicubic_ssim")
    sums = np.zeros(len(keys) + 1)
    for i, (_, lr, hr) in enumerate(val_ds):
        if max_batches and i >= max_batches:
            break
        out = eval_step(lr, hr)
        sums[:-1] += [float(tf.reduce_sum(out[k])) for k in keys]
        sums[-1] += int(lr.shape[0])
    sums = _allreduce_sum(strategy, sums)
    n = max(sums[-1], 1)
    result = {k: float(sums[i] / n) for i, k in enumerate(keys)}
    result["val_images"] = int(sums[-1])
    return result


def distributed_train_dataset(strategy, cfg: Config, global_batch: int, start_step: int = 0):
    """The training pipeline, one per worker, batched per replica, sharded over workers.

    Seeds differ per input pipeline, so no two workers draw the same samples. A resumed run
    (`start_step` > 0) keeps the seeds and continues each pipeline's stream after the batches it
    delivered before (each step takes one batch per replica the pipeline feeds).
    """
    seed_base = cfg.train.seed * 1_000_003

    def dataset_fn(input_context: tf.distribute.InputContext):
        pipelines = input_context.num_input_pipelines
        return data.train_dataset(
            cfg,
            index=input_context.input_pipeline_id,
            count=pipelines,
            seed=seed_base + 7919 * input_context.input_pipeline_id,
            batch_size=input_context.get_per_replica_batch_size(global_batch),
            start_batch=start_step * input_context.num_replicas_in_sync // pipelines,
        )

    return strategy.distribute_datasets_from_function(dataset_fn)


# --- the loop -----------------------------------------------------------------------------------

# Steps between looks at the loss: each look is a device-to-host copy that drains the pipeline.
# A diverged run is also caught at every checkpoint and epoch end, so it stops within an epoch.
CHECK_LOSS_EVERY = 20


class TrainingDiverged(RuntimeError):
    """The training loss became inf/NaN; the message is the one line a user sees."""


class LossMeter:
    """Sums the per-step losses on the device; `mean()` is the one host read, at log points.

    Every worker computes the same globally reduced loss, so every worker stops at the same step
    when it becomes non-finite (Ray's report is a barrier: they must stop together).
    """

    def __init__(self):
        self.total, self.n, self.recent = None, 0, []

    def add(self, loss: tf.Tensor, step: int) -> None:
        # Starts from the first loss, not a host constant: the sum stays on the loss's device
        # (a GPU), where adding is queued and nothing waits for it.
        loss = tf.cast(loss, tf.float32)
        self.total = loss if self.total is None else self.total + loss
        self.n += 1
        self.recent.append((step, loss))

    def mean(self) -> float:
        return float(self.total) / self.n if self.n else 0.0

    def check(self, lr: float) -> None:
        """Raises TrainingDiverged naming the first step whose loss is not finite."""
        if math.isfinite(self.mean()):
            self.recent.clear()
            return
        bad = [(s, float(v)) for s, v in self.recent if not math.isfinite(float(v))]
        step, loss = bad[0] if bad else (self.recent[-1][0], float(self.total))
        raise TrainingDiverged(
            f"training diverged: the loss is {loss} at step {step}; "
            f"lower train.lr (it is {lr:g}) and start again"
        )


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
        model = models.from_config(cfg.model, scale, dtype=policy, replicas=replicas)
        optimizer = make_optimizer(schedule.learning_rate(cfg.train, base_lr), policy)
        optimizer.build(model.trainable_variables)
        ema = None
        if cfg.train.ema_decay:
            averaged = models.from_config(cfg.model, scale, dtype=policy, replicas=replicas)
            ema = WeightEMA(strategy, model, averaged, cfg.train.ema_decay)
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

    train_iter = iter(distributed_train_dataset(strategy, cfg, global_batch, state.step))
    val_ds = data.eval_dataset(cfg, index=ctx.rank, count=ctx.world_size)
    train_step = make_train_step(
        strategy,
        model,
        optimizer,
        loss_fn,
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
            f"batch {cfg.data.batch_size} = global batch {global_batch}, {policy}, lr {base_lr:g}"
            f" ({cfg.train.schedule}"
            + (f", {cfg.train.warmup_steps} warmup steps" if cfg.train.warmup_steps else "")
            + (f", EMA {cfg.train.ema_decay:g}" if ema else "")
            + (f", grad clip {cfg.train.grad_clip_norm:g}" if cfg.train.grad_clip_norm else "")
            + ")"
        )
    metrics_log = MetricsLog(ctx.run_dir, cfg) if ctx.chief else None
    if metrics_log:
        metrics_log.truncate_after(state.epoch)
    steps_per_epoch = cfg.train.steps_per_epoch
    total_steps = cfg.train.epochs * steps_per_epoch
    images_per_sec = 0.0
    stopped_early = False

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
            _allreduce_sum(strategy, np.array([time.perf_counter() - t0]))[0] / ctx.world_size
        )
        state.epoch = epoch

        state, decision = schedule.epoch_end_policy(state, row, cfg.train)
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


def _progress_line(row: dict, epochs: int) -> str:
    line = (
        f"epoch {row['epoch']}/{epochs}  step {row['step']}  loss {row['train_loss']:.4f}  "
        f"val_psnr {row['val_psnr']:.2f} dB (bicubic {row['bicubic_psnr']:.2f})  "
        f"val_ssim {row['val_ssim']:.3f} (bicubic {row['bicubic_ssim']:.3f})  "
        f"lr {row['lr']:.1e}  {row['images_per_sec']:.1f} img/s"
    )
    if row["input_wait"] > 0.10:
        line += (
            f"  input-bound: {row['input_wait']:.0%} of step time waiting for data"
            " (degradation.on=replica and data.decoded_cache=true on GPUs; more"
            " scaling.cpus_per_worker; or data.patches_per_image=2)"
        )
    if "lr_reduced_to" in row:
        line += f"  (lr -> {row['lr_reduced_to']:.1e})"
    if row.get("time_limit"):
        line += "  time limit: another epoch would not fit"
    elif row.get("stopped_early"):
        line += "  early stop"
    return line


class MetricsLog:
    """metrics.jsonl in the run directory, rewritten whole (object storage has no append)."""

    def __init__(self, run_dir: str, cfg: Config):
        self.uri = storage.join(run_dir, "metrics.jsonl")
        self.kw = {"endpoint_url": cfg.data.endpoint_url, "region": cfg.data.region}
        self.rows: list[dict] = []
        if storage.exists(self.uri, **self.kw):
            text = storage.read_bytes(self.uri, **self.kw).decode()
            self.rows = [json.loads(line) for line in text.splitlines() if line.strip()]

    def truncate_after(self, epoch: int) -> None:
        self.rows = [r for r in self.rows if r["epoch"] <= epoch]

    def append(self, row: dict) -> None:
        self.rows.append(row)
        text = "".join(json.dumps(r) + "\n" for r in self.rows)
        storage.write_bytes(self.uri, text.encode(), **self.kw)


def _write_samples(cfg: Config, ctx: Context, model, val_ds) -> None:
    """samples.png: LR (nearest-upscaled) | bicubic | model | HR, one validation image a row."""
    n = cfg.train.sample_images
    if n <= 0:
        return
    rows = []
    for _, lr, hr in val_ds.unbatch().take(n).batch(n):
        size = tf.shape(hr)[1:3]
        lr_up = tf.image.resize(lr, size, method="nearest")
        bic = metrics.bicubic_upscale(lr, cfg.degradation.scale)
        sr = tf.cast(model(lr, training=False), tf.float32)
        rows = [tf.concat([lr_up[i], bic[i], sr[i], hr[i]], axis=1) for i in range(lr.shape[0])]
    if not rows:
        return
    grid = tf.image.convert_image_dtype(tf.concat(rows, axis=0), tf.uint8, saturate=True)
    storage.write_bytes(
        storage.join(ctx.run_dir, "samples.png"),
        tf.io.encode_png(grid).numpy(),
        cfg.data.endpoint_url,
        cfg.data.region,
    )
