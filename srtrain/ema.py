"""An exponential moving average of a model's weights (`train.ema_decay`).

The shadow weights are the (non-trainable) variables of a second copy of the model, built under
the same strategy, so validating, testing and exporting the average needs no weight swapping:
evaluate `ema.averaged`. Every weight is averaged, BatchNorm moving statistics included, so the
averaged model's statistics match its averaged weights.

`update(step)` runs inside the train step's tf.function after `strategy.run`, in cross-replica
context: `strategy.extended.update` updates each replica's copy of a shadow variable from the
same replica's copy of the weight, so mirrored copies stay identical with no communication.
"""

from __future__ import annotations

import keras
import tensorflow as tf


def _decayed(shadow: tf.Variable, weight: tf.Variable, decay: tf.Tensor):
    # shadow <- decay * shadow + (1 - decay) * weight
    return shadow.assign_sub((1.0 - decay) * (shadow - tf.cast(weight, shadow.dtype)))


class WeightEMA:
    def __init__(self, strategy, model: keras.Model, averaged: keras.Model, decay: float):
        """`averaged`: a second instance of `model`'s architecture, built under `strategy`."""
        if len(averaged.weights) != len(model.weights):
            raise ValueError("WeightEMA: the averaged model does not match the trained one")
        self.strategy, self.model, self.averaged, self.decay = strategy, model, averaged, decay
        averaged.trainable = False
        self.reset()

    def reset(self) -> None:
        """Shadow weights := the model's current weights."""
        self.averaged.set_weights(self.model.get_weights())

    def decay_at(self, step) -> tf.Tensor:
        """min(decay, (1 + step) / (10 + step)): a short memory while the weights move fast."""
        step = tf.cast(step, tf.float32)
        return tf.minimum(self.decay, (1.0 + step) / (10.0 + step))

    def update(self, step) -> None:
        """One EMA step after optimizer step `step`; call in cross-replica context."""
        decay = self.decay_at(step)
        for shadow, weight in zip(self.averaged.weights, self.model.weights, strict=True):
            self.strategy.extended.update(
                shadow.value, _decayed, args=(weight.value, decay), group=False
            )
