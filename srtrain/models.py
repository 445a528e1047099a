"""The two U-Nets of the original project, as one builder with five independent flags.

`build_unet(...)` returns a fully convolutional Keras 3 functional model mapping an LR image
(B, h, w, 3) in [0, 1], with h and w multiples of 4, to the HR estimate (B, scale*h, scale*w, 3).

- Base (all flags off, 1,883,267 params at 64 filters): two 3x3 ReLU convs per level at
  F / 2F / 4F filters, max-pooling down, bilinear upsampling up, concatenated skips, a final
  bilinear x`scale` upsample and a 1x1 conv + sigmoid (computed in the order 1x1 conv,
  upsample, sigmoid: the same function, faster; see the end of `build_unet`).
- Advanced (all on, 1,887,107 params, 2,560 of them BatchNorm moving statistics): LeakyReLU(0.1)
  (`leaky_relu`), the first conv of each lower level with stride 2 instead of max-pooling
  (`strided_conv`), a stride-2 Conv2DTranspose replacing upsample + first decoder conv
  (`conv_transpose`), bias-free convs + BatchNormalization (`batch_norm`), and an identity
  shortcut around the bottleneck's second conv (`residual`).
  Each replacement keeps the parameter count, so the two archs differ only by BatchNorm.

A model built for training (`fused_batch_norm=True`, what srtrain.train builds) trains its
BatchNorm layers with TensorFlow's fused kernel (`FusedBatchNormalization`, same weights, same
inference); every other model, the saved `model.keras` included, uses only built-in layers, so
it loads with plain `keras.saving.load_model`.
"""

from __future__ import annotations

import keras
import tensorflow as tf
from keras import layers

from srtrain.config import ModelConfig


@keras.saving.register_keras_serializable(package="srtrain")
class FusedBatchNormalization(layers.BatchNormalization):
    """Keras' BatchNormalization whose training-mode call runs TensorFlow's fused kernel
    (FusedBatchNormV3: one pass for the statistics and the normalisation, one for the gradient,
    on the input's own dtype with float32 statistics; CPU and GPU kernels for float32, float16
    and bfloat16). The weights, the moving-statistics update and inference are Keras' own.

    Keras computes the same thing in separate ops, casting 16-bit inputs to float32 first: with
    this layer the Advanced U-Net's bf16 train step ran 1.26-1.32x faster on the CPU measured
    (fp32 1.09-1.13x; bench/README.md, `bench/step_time.py --fused-bn`). The outputs agree to
    float rounding (about 1e-6 in float32; in bfloat16 the kernel's float32 sums run in another
    order, so some activations round to the neighbouring bf16 value). Falls back
    to Keras' call where the kernel does not apply: synchronised statistics (they need an
    all-reduce between the reduction and the normalisation), inference, renorm, masks, inputs
    that are not 4-D channels-last, epsilon below the kernel's floor.
    """

    def call(self, inputs, training=None, mask=None):
        if not (
            training
            and self.trainable
            and not self.synchronized
            and not self.renorm
            and mask is None
            and len(inputs.shape) == 4
            and self.axis in (-1, 3)
            and self.epsilon >= 1.001e-5  # cuDNN's minimum
        ):
            return super().call(inputs, training=training, mask=mask)
        channels = inputs.shape[-1]
        gamma = tf.cast(self.gamma, tf.float32) if self.scale else tf.ones([channels])
        beta = tf.cast(self.beta, tf.float32) if self.center else tf.zeros([channels])
        y, mean, variance = tf.compat.v1.nn.fused_batch_norm(
            inputs, gamma, beta, epsilon=self.epsilon, data_format="NHWC", is_training=True
        )
        # The kernel returns the batch variance with Bessel's correction; Keras averages the
        # biased one into the moving variance.
        n = tf.cast(tf.size(inputs, out_type=tf.int64) // channels, tf.float32)
        variance = variance * (n - 1.0) / tf.maximum(n, 1.0)
        m = self.momentum
        self.moving_mean.assign(self.moving_mean * m + mean * (1.0 - m))
        self.moving_variance.assign(self.moving_variance * m + variance * (1.0 - m))
        return tf.cast(y, self.compute_dtype)


def _act(x, leaky_relu: bool, name: str):
    return (
        layers.LeakyReLU(negative_slope=0.1, name=name)(x)
        if leaky_relu
        else layers.ReLU(name=name)(x)
    )


def _conv(
    x,
    filters: int,
    name: str,
    *,
    strides: int = 1,
    transpose: bool = False,
    leaky_relu: bool,
    batch_norm: bool,
    bn_momentum: float = 0.99,
    sync_batch_norm: bool = False,
    fused_batch_norm: bool = False,
    activate: bool = True,
    dtype=None,
):
    conv = layers.Conv2DTranspose if transpose else layers.Conv2D
    x = conv(
        filters, 3, strides=strides, padding="same", use_bias=not batch_norm, name=name, dtype=dtype
    )(x)
    if batch_norm:
        norm = FusedBatchNormalization if fused_batch_norm else layers.BatchNormalization
        x = norm(
            momentum=bn_momentum, name=f"{name}_bn", synchronized=sync_batch_norm, dtype=dtype
        )(x)
    return _act(x, leaky_relu, f"{name}_act") if activate else x


def build_unet(
    *,
    filters: int = 64,
    scale: int = 2,
    leaky_relu: bool = False,
    strided_conv: bool = False,
    conv_transpose: bool = False,
    batch_norm: bool = False,
    residual: bool = False,
    bn_momentum: float = 0.99,
    sync_batch_norm: bool = False,
    fused_batch_norm: bool = False,
    dtype: str | None = None,
    name: str = "unet",
) -> keras.Model:
    """The U-Net; `dtype` is a Keras dtype policy name (e.g. "mixed_bfloat16"); the last layer
    always computes in float32 so outputs and losses stay in full precision. `bn_momentum` is
    the BatchNormalization momentum (with `batch_norm`; no parameters depend on it).

    `sync_batch_norm` computes BatchNorm's batch statistics over all replicas of a
    tf.distribute strategy (TensorFlow backend), so training with N replicas x batch b
    normalises like one replica x N*b, and the moving statistics, updated from the same numbers
    on every replica, stay identical. It adds no weights: a model built without it loads them.

    `fused_batch_norm` trains the BatchNorm layers with TensorFlow's fused kernel
    (`FusedBatchNormalization`; not with `sync_batch_norm`, which keeps Keras' call): for the
    model that trains. The same weights and inference; models that are saved are built without
    it, so they hold built-in layers only.
    """
    f1, f2, f3 = filters, 2 * filters, 4 * filters
    kw = dict(
        leaky_relu=leaky_relu,
        batch_norm=batch_norm,
        bn_momentum=bn_momentum,
        sync_batch_norm=sync_batch_norm,
        fused_batch_norm=fused_batch_norm and not sync_batch_norm,
        dtype=dtype,
    )
    inp = keras.Input((None, None, 3), name="lr")

    e1 = _conv(inp, f1, "enc1_conv1", **kw)
    e1 = _conv(e1, f1, "enc1_conv2", **kw)  # (B, h, w, F)

    def down(x, f, level):
        if strided_conv:
            return _conv(x, f, f"enc{level}_conv1", strides=2, **kw)
        x = layers.MaxPooling2D(2, name=f"enc{level}_pool", dtype=dtype)(x)
        return _conv(x, f, f"enc{level}_conv1", **kw)

    e2 = down(e1, f2, 2)
    e2 = _conv(e2, f2, "enc2_conv2", **kw)  # (B, h/2, w/2, 2F)

    b1 = down(e2, f3, 3)
    if residual:
        b2 = _conv(b1, f3, "enc3_conv2", activate=False, **kw)
        b2 = layers.Add(name="bottleneck_add", dtype=dtype)([b1, b2])
        b = _act(b2, leaky_relu, "enc3_conv2_act")
    else:
        b = _conv(b1, f3, "enc3_conv2", **kw)  # (B, h/4, w/4, 4F)

    def up(x, skip, f, level):
        if conv_transpose:
            x = _conv(x, f, f"dec{level}_up", strides=2, transpose=True, **kw)
            x = layers.Concatenate(name=f"dec{level}_concat", dtype=dtype)([x, skip])
        else:
            # float32 whatever the policy: TensorFlow resizes in float32 anyway, and under a
            # mixed policy Keras then clips the result to the 16-bit range before casting it
            # (and differentiates the clip); here the concat's plain cast does it. The same
            # numbers, a bf16 train step about 1.1x faster on CPU.
            x = layers.UpSampling2D(
                2, interpolation="bilinear", name=f"dec{level}_up", dtype="float32"
            )(x)
            x = layers.Concatenate(name=f"dec{level}_concat", dtype=dtype)([x, skip])
            x = _conv(x, f, f"dec{level}_conv1", **kw)
        return _conv(x, f, f"dec{level}_conv2", **kw)

    d2 = up(b, e2, f2, 2)  # (B, h/2, w/2, 2F)
    d1 = up(d2, e1, f1, 1)  # (B, h, w, F)

    # The 1x1 conv runs before the bilinear upsample: both are linear and bilinear weights sum
    # to one, so up(conv(x)) == conv(up(x)) with the bias too; upsampling 3 channels instead of
    # F makes a bf16 train step about 1.4x faster on CPU. The sigmoid comes last.
    x = layers.Conv2D(3, 1, name="out", dtype="float32")(d1)  # (B, h, w, 3)
    x = layers.UpSampling2D(scale, interpolation="bilinear", name="final_up", dtype="float32")(x)
    out = layers.Activation("sigmoid", name="out_sigmoid", dtype="float32")(x)  # (B, sH, sW, 3)
    return keras.Model(inp, out, name=name)


def from_config(
    cfg: ModelConfig,
    scale: int,
    dtype: str | None = None,
    replicas: int = 1,
    fused_batch_norm: bool = False,
) -> keras.Model:
    """The U-Net a (resolved) ModelConfig describes, for training on `replicas` replicas:
    synchronised BatchNorm when there are several, unless model.sync_batch_norm is false;
    `fused_batch_norm` for the model that trains (see `build_unet`)."""
    sync = cfg.sync_batch_norm is not False and replicas > 1
    return build_unet(
        filters=cfg.filters,
        scale=scale,
        leaky_relu=bool(cfg.leaky_relu),
        strided_conv=bool(cfg.strided_conv),
        conv_transpose=bool(cfg.conv_transpose),
        batch_norm=bool(cfg.batch_norm),
        residual=bool(cfg.residual),
        bn_momentum=cfg.bn_momentum,
        sync_batch_norm=bool(sync),
        fused_batch_norm=fused_batch_norm,
        dtype=dtype,
        name=f"unet_{cfg.arch}",
    )
