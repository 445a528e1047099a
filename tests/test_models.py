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
