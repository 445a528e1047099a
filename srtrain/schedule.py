"""Learning-rate schedules and the epoch-end policy, as pure functions the loop calls.

- `lr_at(step, cfg, base_lr)`: the cosine schedule (`train.schedule: cosine`): linear warmup
  over `train.warmup_steps`, then a half cosine from the base lr down to `train.min_lr` at the
  last planned step. TensorFlow ops, so the optimizer evaluates it on the device from its own
  step counter every step (`CosineSchedule`); no host sync.
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


def lr_at(step, cfg: TrainConfig, base_lr: float | None = None) -> tf.Tensor:
    """The cosine schedule's lr for optimizer step `step` (0-based; int or tensor), float32."""
    base = cfg.lr if base_lr is None else base_lr
    total = cfg.epochs * cfg.steps_per_epoch
    warmup = cfg.warmup_steps
    step = tf.cast(step, tf.float32)
    warm = base * (step + 1.0) / max(warmup, 1)
    progress = tf.clip_by_value((step - warmup) / max(total - warmup - 1, 1), 0.0, 1.0)
    cosine = cfg.min_lr + 0.5 * (base - cfg.min_lr) * (1.0 + tf.cos(math.pi * progress))
    return tf.where(step < warmup, warm, cosine)


class CosineSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """`lr_at` as a Keras schedule: the optimizer calls it with its step inside the train step."""

    def __init__(self, cfg: TrainConfig, base_lr: float):
        self.cfg, self.base_lr = cfg, base_lr

    def __call__(self, step):
        return lr_at(step, self.cfg, self.base_lr)

    def get_config(self) -> dict:
        return {"cfg": dataclasses.asdict(self.cfg), "base_lr": self.base_lr}


def learning_rate(cfg: TrainConfig, base_lr: float) -> float | CosineSchedule:
    """What the optimizer is built with: a float the plateau policy reassigns, or the schedule."""
    return CosineSchedule(cfg, base_lr) if cfg.schedule == "cosine" else base_lr


@dataclass(frozen=True)
class EpochDecision:
    improved: bool  # a new best val PSNR: keep these weights as the best
    lr_reduced: bool  # plateau: state.lr was cut; assign it to the optimizer
    stop: bool  # early stopping
    out_of_time: bool = False  # train.time_limit_minutes: one more epoch would not fit


def epoch_end_policy(
    state: TrainState, row: dict, cfg: TrainConfig
) -> tuple[TrainState, EpochDecision]:
    """The state after epoch `row["epoch"]` validated at `row["val_psnr"]`, and what changed.

    `row["epoch_seconds"]`: the epoch's wall time, training and validation (the same number on
    every worker). With `time_limit_minutes`, stops when one more epoch as long as the longest
    so far would end past the limit.

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
    )
    limit = cfg.time_limit_minutes * 60.0
    out_of_time = bool(limit) and state.train_seconds + state.longest_epoch_seconds > limit
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
