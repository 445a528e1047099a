"""srtrain.scoring, the one evaluation core: per-image scores of each method under both
protocols, the train loop's eval step and validation, and the sums behind every mean."""

import numpy as np
import pytest
import tensorflow as tf

from srtrain import losses, metrics, scoring


def _batch(seed=0, n=2, size=16, scale=2):
    rng = np.random.default_rng(seed)
    hr = rng.random((n, size, size, 3)).astype(np.float32)
    lr = tf.image.resize(hr, (size // scale, size // scale), method="area").numpy()
    return lr, hr


def test_upscale_gives_each_model_bicubic_and_the_nearest_input():
    lr, _ = _batch()
    out = scoring.upscale({"double": lambda x: 2 * x[:, :, :, :1]}, lr, 2, nearest=True)
    assert list(out) == ["double", scoring.BICUBIC, scoring.INPUT]
    assert out["double"].dtype == tf.float32
    assert np.array_equal(out[scoring.INPUT][0, :2, :2, 0], np.full((2, 2), lr[0, 0, 0, 0]))
    assert np.array_equal(out[scoring.BICUBIC], metrics.bicubic_upscale(lr, 2))


def test_seed_scores_are_the_metrics_per_image_and_standard_the_literatures():
    lr, hr = _batch()
    outputs = scoring.upscale({}, lr, 2)
    seed = scoring.score(outputs, hr, loss_fn=losses.mae)[scoring.BICUBIC]
    bic = outputs[scoring.BICUBIC]
    assert list(seed) == ["loss", "psnr", "ssim"]
    assert np.array_equal(seed["psnr"], metrics.psnr(bic, hr))
    assert np.array_equal(seed["ssim"], metrics.ssim(bic, hr))
    assert np.array_equal(seed["loss"], losses.mae(hr, bic))
    assert 10 < float(seed["psnr"][1]) < 40
    std = scoring.score(outputs, hr, protocol="standard", scale=2)[scoring.BICUBIC]
    assert list(std) == ["psnr", "ssim"]
    for i in range(2):
        expected = metrics.standard_metrics(bic[i].numpy(), hr[i], 2)
        assert (std["psnr"][i], std["ssim"][i]) == expected
    with pytest.raises(ValueError, match="protocol 'y'"):
        scoring.score(outputs, hr, protocol="y")


def test_validation_means_every_image_once_and_keeps_the_row_order():
    lr, hr = _batch(n=3)
    ds = tf.data.Dataset.from_tensor_slices((["a", "b", "c"], lr, hr)).batch(2)
    step = scoring.make_eval_step(lambda x, training: tf.image.resize(x, (16, 16)), losses.mae, 2)
    out = scoring.validate(tf.distribute.get_strategy(), step, ds)
    assert list(out) == [
        "val_loss",
        "val_psnr",
        "val_ssim",
        "val_spread",
        "bicubic_loss",
        "bicubic_psnr",
        "bicubic_ssim",
        "val_images",
    ]
    assert out["val_images"] == 3
    bic_psnr = metrics.psnr(metrics.bicubic_upscale(lr, 2), hr).numpy()
    assert out["bicubic_psnr"] == pytest.approx(float(np.mean(bic_psnr.astype(np.float64))))
    first = scoring.validate(tf.distribute.get_strategy(), step, ds, max_batches=1)
    assert first["val_images"] == 2
    sr = tf.image.resize(lr, (16, 16)).numpy()
    expected = np.mean(np.std(sr, axis=(1, 2)))
    assert out["val_spread"] == pytest.approx(expected, rel=1e-4) and expected > 0.05


def test_validation_spread_finds_a_model_whose_output_ignores_its_input():
    """A network whose ReLUs all died outputs sigmoid(bias) everywhere, one colour (often
    saturated, each channel at 0 or 1, as lr 0.5 leaves the Base U-Net): its spread is 0."""
    lr, hr = _batch(n=3)
    ds = tf.data.Dataset.from_tensor_slices((["a", "b", "c"], lr, hr)).batch(2)
    colour = tf.constant([1.0, 0.0, 1.0])
    dead = scoring.make_eval_step(
        lambda x, training: tf.ones((tf.shape(x)[0], 16, 16, 1)) * colour, losses.mae, 2
    )
    out = scoring.validate(tf.distribute.get_strategy(), dead, ds)
    assert out["val_spread"] < 1e-6 and out["val_images"] == 3


def test_totals_sum_a_fixed_layout_even_with_no_batch():
    totals = scoring.Totals({"m": ("psnr",)})
    assert totals.vector().tolist() == [0.0, 0.0]
    assert totals.means() == {"m": {"psnr": 0.0}}
    totals.add({"m": {"psnr": tf.constant([20.0, 30.0])}}, 2)
    totals.add({"m": {"psnr": tf.constant([40.0])}}, 1)
    assert totals.means() == {"m": {"psnr": 30.0}}
    totals.set_vector(np.array([180.0, 6.0]))  # as if a second worker had the same three
    assert totals.means() == {"m": {"psnr": 30.0}} and totals.images == 6
