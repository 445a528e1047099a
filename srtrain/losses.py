"""Training losses. Each returns a per-example loss (B,); the train step averages over the global
batch so every replica count gives the same gradient.

- `mae`: mean absolute error over pixels, the original project's base loss.
"""

from __future__ import annotations

from collections.abc import Callable

import tensorflow as tf

from srtrain.config import LossConfig

LossFn = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]


def mae(hr: tf.Tensor, sr: tf.Tensor) -> tf.Tensor:
    """(B, H, W, C) x2 -> (B,) mean absolute error per image."""
    diff = tf.abs(tf.cast(hr, tf.float32) - tf.cast(sr, tf.float32))
    return tf.reduce_mean(diff, axis=[1, 2, 3])


def build_loss(cfg: LossConfig, dtype: str | None = None) -> LossFn:
    """The per-example loss a LossConfig describes; builds any network it needs once."""
    if cfg.kind == "mae":
        return mae
    raise ValueError(f"loss.kind: {cfg.kind!r} is not available in this build")
