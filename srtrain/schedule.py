"""Learning-rate schedules and the epoch-end policy, as pure functions the loop calls.

- `lr_at(step, cfg, base_lr, total)`: the cosine schedule (`train.schedule: cosine`): linear
  warmup over `train.warmup_steps`, then a half cosine from the base lr down to `train.min_lr` at
  the last planned step. TensorFlow ops, so the optimizer evaluates it on the device from its own
  step counter every step (`CosineSchedule`); no host sync.
- `planned_epochs(state, cfg)`: the epochs the run will train: `train.epochs`, or fewer when
  `train.time_limit_minutes` will stop it first. The cosine schedule is re-planned to end there
  (`CosineSchedule.plan`), so a run the time limit cuts short still decays to `min_lr`.
- `epoch_end_policy(state, row, cfg)`: what the loop decides after validating an epoch: a new
  best (val PSNR), the plateau schedule's lr cut (`train.schedule: plateau`, the original's
  ReduceLROnPlateau) and early stopping. Returns the next state; touches nothing else.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import keras
import tensorflow as tf

from srtrain.checkpoints import TrainState
from srtrain.config import TrainConfig

# A val PSNR counts as better only by more than this (dB): float noise is no improvement.
MIN_DELTA = 1e-4


def lr_at(step, cfg: TrainConfig, base_lr: float | None = None, total=None) -> tf.Tensor:
    """The cosine schedule's lr for optimizer step `step` (0-based; int or tensor), float32,
    when the run trains `total` steps (int or tensor; default: epochs x steps_per_epoch)."""
    base = cfg.lr if base_lr is None else base_lr
    total = cfg.epochs * cfg.steps_per_epoch if total is None else total
    warmup = cfg.warmup_steps
    step = tf.cast(step, tf.float32)
    warm = base * (step + 1.0) / max(warmup, 1)
    decay_steps = tf.maximum(tf.cast(total, tf.float32) - warmup - 1.0, 1.0)
    progress = tf.clip_by_value((step - warmup) / decay_steps, 0.0, 1.0)
    cosine = cfg.min_lr + 0.5 * (base - cfg.min_lr) * (1.0 + tf.cos(math.pi * progress))
    return tf.where(step < warmup, warm, cosine)


class CosineSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """`lr_at` as a Keras schedule: the optimizer calls it with its step inside the train step.
    Its planned total is a variable (built in the strategy's scope), so `plan` moves the end of
    the cosine without retracing the step."""

    def __init__(self, cfg: TrainConfig, base_lr: float):
        self.cfg, self.base_lr = cfg, base_lr
        self.total = tf.Variable(
            float(cfg.epochs * cfg.steps_per_epoch), trainable=False, name="lr_total_steps"
        )

    def plan(self, epochs: int) -> None:
        self.total.assign(float(epochs * self.cfg.steps_per_epoch))

    def __call__(self, step):
        return lr_at(step, self.cfg, self.base_lr, self.total)

    def get_config(self) -> dict:
        return {"cfg": dataclasses.asdict(self.cfg), "base_lr": self.base_lr}


def learning_rate(cfg: TrainConfig, base_lr: float) -> float | CosineSchedule:
    """What the optimizer is built with: a float the plateau policy reassigns, or the schedule."""
    return CosineSchedule(cfg, base_lr) if cfg.schedule == "cosine" else base_lr


def epoch_estimate(state: TrainState) -> float:
    """What the next epoch will take (s): the longest warm epoch so far, else the longest (the
    first epoch of a process also traces, compiles and fills caches); 0 before any epoch."""
    return state.warm_epoch_seconds or state.longest_epoch_seconds


def planned_epochs(state: TrainState, cfg: TrainConfig) -> int:
    """`cfg.epochs`, or the last epoch the time limit lets the run end, by the rule that stops
    it (one more epoch as long as `epoch_estimate` must fit). Before any epoch has a time,
    `cfg.epochs`."""
    limit, estimate = cfg.time_limit_minutes * 60.0, epoch_estimate(state)
    if not limit or not estimate:
        return cfg.epochs
    fit = math.floor(max(limit - state.train_seconds, 0.0) / estimate)
    return max(state.epoch, min(cfg.epochs, state.epoch + fit))


@dataclass(frozen=True)
class EpochDecision:
    improved: bool  # a new best val PSNR: keep these weights as the best
    lr_reduced: bool  # plateau: state.lr was cut; assign it to the optimizer
    stop: bool  # early stopping
    out_of_time: bool = False  # train.time_limit_minutes: one more epoch would not fit


def epoch_end_policy(
    state: TrainState, row: dict, cfg: TrainConfig, warm: bool = True
) -> tuple[TrainState, EpochDecision]:
    """The state after epoch `row["epoch"]` validated at `row["val_psnr"]`, and what changed.

    `row["epoch_seconds"]`: the epoch's wall time, training and validation (the same number on
    every worker); `warm`: false for the first epoch of a process. With `time_limit_minutes`,
    stops when one more epoch (`epoch_estimate`) would end past the limit.

    Plateau: after `plateau_patience` epochs without a better val PSNR, lr x `plateau_factor`
    (not below `min_lr`). Cosine: lr follows `lr_at`, validation only picks the best and stops.
    """
    improved = row["val_psnr"] > state.best_psnr + MIN_DELTA
    lr_reduced = stop = False
    seconds = float(row.get("epoch_seconds", 0.0))
    state = dataclasses.replace(
        state,
        train_seconds=state.train_seconds + seconds,
        longest_epoch_seconds=max(state.longest_epoch_seconds, seconds),
        warm_epoch_seconds=max(state.warm_epoch_seconds, seconds if warm else 0.0),
    )
    limit = cfg.time_limit_minutes * 60.0
    out_of_time = bool(limit) and state.train_seconds + epoch_estimate(state) > limit
    if improved:
        state = dataclasses.replace(
            state,
            best_psnr=row["val_psnr"],
            best_epoch=row["epoch"],
            best_metrics=dict(row),
            plateau_wait=0,
            early_stop_wait=0,
        )
    else:
        state = dataclasses.replace(
            state, plateau_wait=state.plateau_wait + 1, early_stop_wait=state.early_stop_wait + 1
        )
        if (
            cfg.schedule == "plateau"
            and state.plateau_wait >= cfg.plateau_patience
            and state.lr > cfg.min_lr
        ):
            state = dataclasses.replace(
                state, lr=max(state.lr * cfg.plateau_factor, cfg.min_lr), plateau_wait=0
            )
            lr_reduced = True
        stop = bool(cfg.early_stop_patience) and state.early_stop_wait >= cfg.early_stop_patience
    return state, EpochDecision(improved, lr_reduced, stop or out_of_time, out_of_time)
