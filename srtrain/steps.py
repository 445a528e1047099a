"""The step functions of the training loop (srtrain.train): the optimizer, the distributed
train step (`strategy.run` over a `tf.function`, the loss averaged over the global batch) with
its gradient clipping and fp16 loss-scale handling, and the sharded training pipeline it reads.
"""

from __future__ import annotations

from collections.abc import Callable

import keras
import tensorflow as tf

from srtrain import data
from srtrain.config import Config
from srtrain.ema import WeightEMA


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
