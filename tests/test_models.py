"""Both U-Nets: the original parameter counts, what each flag changes, fully convolutional."""

from collections import Counter

import numpy as np
import pytest

from srtrain import models
from srtrain.config import from_dict

# The original notebook reported 1,887,619 for the Advanced U-Net; ours has bias-free convs
# before BatchNorm. Exact counts: without BatchNorm the Advanced U-Net has BASE_PARAMS.
BASE_PARAMS, ADVANCED_PARAMS = 1_883_267, 1_887_107


def test_parameter_counts_match_the_original():
    base = models.from_config(from_dict({}).model, scale=2)
    adv = models.from_config(from_dict({"model": {"arch": "advanced"}}).model, scale=2)
    assert base.count_params() == BASE_PARAMS
    assert adv.count_params() == ADVANCED_PARAMS


@pytest.mark.parametrize(
    ("flag", "changed"),
    [
        ("leaky_relu", {"LeakyReLU", "ReLU"}),
        ("strided_conv", {"MaxPooling2D"}),
        ("conv_transpose", {"Conv2DTranspose", "UpSampling2D", "Conv2D"}),
        ("batch_norm", {"BatchNormalization"}),
        ("residual", {"Add"}),
    ],
)
def test_each_flag_changes_only_the_layers_it_names(flag, changed):
    base = Counter(type(layer).__name__ for layer in models.build_unet(filters=8).layers)
    flagged = Counter(
        type(layer).__name__ for layer in models.build_unet(filters=8, **{flag: True}).layers
    )
    differing = {t for t in base.keys() | flagged.keys() if base[t] != flagged[t]}
    assert differing == changed


def test_batch_norm_convs_have_no_bias():
    m = models.build_unet(filters=8, batch_norm=True)
    assert m.get_layer("enc1_conv1").use_bias is False
    assert models.build_unet(filters=8).get_layer("enc1_conv1").use_bias is True


@pytest.mark.parametrize("arch", ["base", "advanced"])
@pytest.mark.parametrize(("h", "w"), [(24, 40), (36, 16)])
def test_output_is_twice_the_input_for_multiples_of_4(arch, h, w):
    cfg = from_dict({"model": {"arch": arch, "filters": 8}})
    model = models.from_config(cfg.model, scale=2)
    out = model(np.random.rand(2, h, w, 3).astype("float32"))
    assert out.shape == (2, 2 * h, 2 * w, 3)
    assert float(np.min(out)) >= 0 and float(np.max(out)) <= 1  # sigmoid


def test_mixed_precision_keeps_the_output_float32():
    m = models.build_unet(filters=8, dtype="mixed_bfloat16")
    assert m.get_layer("enc1_conv1").compute_dtype == "bfloat16"
    assert m(np.zeros((1, 8, 8, 3), "float32")).dtype == "float32"


def test_bn_momentum_reaches_every_batch_norm_layer_and_keeps_the_parameter_count():
    default = models.from_config(from_dict({"model": {"arch": "advanced"}}).model, scale=2)
    fast = models.from_config(
        from_dict({"model": {"arch": "advanced", "bn_momentum": 0.9}}).model, scale=2
    )
    bns = [layer for layer in fast.layers if type(layer).__name__ == "BatchNormalization"]
    assert bns and all(layer.momentum == 0.9 for layer in bns)
    assert all(
        layer.momentum == 0.99
        for layer in default.layers
        if type(layer).__name__ == "BatchNormalization"
    )
    assert fast.count_params() == default.count_params()


@pytest.mark.parametrize("arch", ["base", "advanced"])
def test_the_1x1_conv_before_the_upsample_is_the_original_order_with_the_same_weights(arch):
    """The model computes conv(1x1) -> upsample -> sigmoid; the original upsample -> conv(1x1)
    -> sigmoid is the same function, so weights trained in either order serve the other (the
    weight list is the same: checkpoints saved before the change restore)."""
    import keras

    model = models.from_config(from_dict({"model": {"arch": arch, "filters": 8}}).model, scale=2)
    rng = np.random.default_rng(0)
    model.set_weights(
        [
            (
                rng.uniform(0.5, 1.5, w.shape)
                if "variance" in w.path
                else rng.normal(0, 0.3, w.shape)
            )
            for w in model.weights
        ]
    )
    d1 = model.get_layer("out").input
    x = keras.layers.UpSampling2D(2, interpolation="bilinear")(d1)
    original = keras.Model(
        model.input, keras.layers.Conv2D(3, 1, activation="sigmoid", name="out")(x)
    )
    original.set_weights(model.get_weights())
    lr = rng.random((2, 20, 28, 3)).astype("float32")
    np.testing.assert_allclose(np.asarray(model(lr)), np.asarray(original(lr)), atol=1e-5)
    assert float(np.std(np.asarray(model(lr)))) > 0.01  # not a constant output


def test_mixed_precision_upsamples_without_a_clip():
    """Under a mixed policy Keras clips a float32 resize to the 16-bit range before casting (and
    differentiates the clip); the decoder's upsamples run in float32 so only a cast remains."""
    import tensorflow as tf

    m = models.build_unet(filters=8, dtype="mixed_bfloat16")
    assert m.get_layer("dec1_up").compute_dtype == "float32"
    assert m.get_layer("dec1_concat").compute_dtype == "bfloat16"
    graph = tf.function(m).get_concrete_function(tf.TensorSpec((1, 16, 16, 3))).graph
    ops = {op.type for op in graph.get_operations()}
    assert "ResizeBilinear" in ops
    assert not ops & {"ClipByValue", "Minimum", "Maximum"}


def _advanced_pair(dtype=None, **kw):
    """The Advanced U-Net as srtrain trains it (fused BatchNorm) and as it saves it (Keras'),
    with the same random weights (moving statistics away from their initial values)."""
    flags = dict(leaky_relu=True, strided_conv=True, conv_transpose=True, residual=True)
    plain = models.build_unet(filters=8, batch_norm=True, dtype=dtype, **flags, **kw)
    fused = models.build_unet(
        filters=8, batch_norm=True, dtype=dtype, fused_batch_norm=True, **flags, **kw
    )
    rng = np.random.default_rng(3)
    weights = [
        rng.uniform(0.5, 1.5, w.shape) if "variance" in w.path else rng.normal(0, 0.3, w.shape)
        for w in plain.weights
    ]
    plain.set_weights(weights)
    fused.set_weights(weights)
    return plain, fused


def test_the_fused_batch_norm_trains_like_keras():
    """Same training-mode outputs, gradients and moving-statistics updates as Keras' layer;
    the same inference; and the BatchNorm layers really are the fused kind."""
    import tensorflow as tf

    plain, fused = _advanced_pair()
    bns = [layer for layer in fused.layers if "_bn" in layer.name]
    assert len(bns) == 10 and all(isinstance(b, models.FusedBatchNormalization) for b in bns)
    assert not any(isinstance(b, models.FusedBatchNormalization) for b in plain.layers)
    lr = tf.constant(np.random.default_rng(4).random((4, 16, 24, 3)), tf.float32)
    hr = tf.constant(np.random.default_rng(5).random((4, 32, 48, 3)), tf.float32)

    def train_call(model):
        with tf.GradientTape() as tape:
            out = model(lr, training=True)
            loss = tf.reduce_mean(tf.abs(out - hr))
        return out, tape.gradient(loss, model.trainable_variables)

    out_p, grads_p = train_call(plain)
    out_f, grads_f = tf.function(train_call)(fused)  # the kernel as a train step runs it
    np.testing.assert_allclose(out_f.numpy(), out_p.numpy(), atol=2e-5)
    for gp, gf in zip(grads_p, grads_f, strict=True):
        np.testing.assert_allclose(gf.numpy(), gp.numpy(), atol=2e-5, rtol=1e-3)
    moving = [i for i, w in enumerate(plain.weights) if "moving" in w.path]
    assert len(moving) == 20
    for i in moving:
        np.testing.assert_allclose(
            fused.weights[i].numpy(), plain.weights[i].numpy(), atol=1e-5, rtol=1e-5
        )
    before = plain.weights[moving[1]].numpy()
    plain(lr, training=True)
    assert float(np.max(np.abs(plain.weights[moving[1]].numpy() - before))) > 1e-4  # they moved
    fused.set_weights(plain.get_weights())
    np.testing.assert_allclose(fused(lr).numpy(), plain(lr).numpy(), atol=1e-6)  # inference


def test_the_fused_batch_norm_in_bfloat16_stays_close_and_keeps_the_dtypes():
    import tensorflow as tf

    plain, fused = _advanced_pair(dtype="mixed_bfloat16")
    lr = tf.constant(np.random.default_rng(6).random((2, 16, 16, 3)), tf.float32)
    bn = fused.get_layer("enc1_conv1_bn")
    assert bn.compute_dtype == "bfloat16" and bn.moving_mean.dtype == "float32"
    out_p, out_f = plain(lr, training=True), tf.function(fused)(lr, training=True)
    assert out_f.dtype == tf.float32
    assert float(np.max(np.abs(out_f.numpy() - out_p.numpy()))) < 0.03  # bf16 rounding
    assert float(np.std(out_f.numpy())) > 0.01


def test_synchronised_batch_norm_keeps_keras_layer():
    """With sync_batch_norm the layers stay Keras' (the statistics need an all-reduce between
    the reduction and the normalisation); with one replica they are the fused kind."""
    cfg = from_dict({"model": {"arch": "advanced", "filters": 8}}).model
    synced = models.from_config(cfg, 2, replicas=2, fused_batch_norm=True)
    bns = [layer for layer in synced.layers if "_bn" in layer.name]
    assert bns and all(type(b).__name__ == "BatchNormalization" and b.synchronized for b in bns)
    one = models.from_config(cfg, 2, replicas=1, fused_batch_norm=True)
    assert all(isinstance(b, models.FusedBatchNormalization) for b in one.layers if "_bn" in b.name)
