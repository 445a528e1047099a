"""Metrics: both protocols against scikit-image on fixed images, Y conversion, and the standard
protocol's bicubic baseline on Set5 against the published 33.66 dB and on Set14 (those two
skip without ../shared/datasets)."""

from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from srtrain import metrics
from srtrain.upscale import read_image

DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"


def fixed_pair(seed=0, shape=(48, 40, 3)):
    rng = np.random.default_rng(seed)
    a = rng.random(shape).astype(np.float32)
    b = np.clip(a + rng.normal(0, 0.05, shape), 0, 1).astype(np.float32)
    return a, b


def sk_ssim(a, b, data_range, channel_axis=None):
    return structural_similarity(
        a,
        b,
        data_range=data_range,
        channel_axis=channel_axis,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
    )


def test_seed_protocol_matches_scikit_image():
    a, b = fixed_pair()
    p, s = metrics.seed_metrics(b, a)
    assert p == pytest.approx(peak_signal_noise_ratio(a, b, data_range=1.0), abs=1e-3)
    assert s == pytest.approx(sk_ssim(a, b, 1.0, channel_axis=-1), abs=1e-4)
    # the batched tf versions the train loop uses agree
    assert float(metrics.psnr(b[None], a[None])[0]) == pytest.approx(p, abs=1e-4)


def test_y_channel_is_matlab_rgb2ycbcr():
    rgb = np.array([[[0, 0, 0], [255, 255, 255], [255, 0, 0]]], np.float64)
    y = metrics.to_y(rgb)
    assert y[0, 0] == pytest.approx(16.0) and y[0, 1] == pytest.approx(235.0)
    assert y[0, 2] == pytest.approx(16 + 65.481)
    # scikit-image's rgb2ycbcr is the same BT.601 studio-range transform
    from skimage.color import rgb2ycbcr

    a, _ = fixed_pair(1)
    assert np.allclose(metrics.to_y(a * 255), rgb2ycbcr(a)[..., 0], atol=1e-6)


def test_grayscale_is_its_own_y():
    g = np.random.default_rng(2).integers(0, 256, (20, 20)).astype(np.float64)
    assert metrics.is_gray(np.stack([g] * 3, -1)) and not metrics.is_gray(fixed_pair()[0])
    assert np.allclose(metrics.to_y(np.stack([g] * 3, -1), gray=True), g)
    assert np.array_equal(metrics.to_y(g), g)


def test_standard_protocol_matches_scikit_image_on_y_with_border_crop():
    a, b = fixed_pair(3)
    p, s = metrics.standard_metrics(b, a, scale=2)
    ya, yb = (metrics.to_y(metrics.quantize(x))[2:-2, 2:-2] for x in (a, b))
    assert p == pytest.approx(peak_signal_noise_ratio(ya, yb, data_range=255), abs=1e-6)
    assert s == pytest.approx(sk_ssim(ya, yb, 255), abs=1e-4)
    # the border crop matters: a defect only in the border does not count
    c = a.copy()
    c[:2] = 1 - c[:2]
    assert metrics.standard_metrics(c, a, scale=2)[0] == np.inf
    assert metrics.seed_metrics(c, a)[0] < 20


def test_bicubic_downscale_is_8bit_and_modcropped():
    hr = metrics.modcrop(fixed_pair(4, (51, 38, 3))[0], 2)
    assert hr.shape == (50, 38, 3)
    lr = metrics.bicubic_downscale(hr, 2)
    assert lr.shape == (25, 19, 3)
    assert np.allclose(lr * 255, np.round(lr * 255), atol=1e-4)


def bicubic_standard_psnr(name: str) -> list[float]:
    """Standard-protocol PSNR of bicubic x2 on every image of a research set in ../shared."""
    folder = DATASETS / name
    if not folder.is_dir():
        pytest.skip(f"{name.capitalize()} is not in {DATASETS} (not redistributed)")
    values = []
    for f in sorted(folder.glob("*.png")):
        hr = metrics.modcrop(read_image(f)[0], 2)
        lr = metrics.bicubic_downscale(hr, 2)
        up = metrics.bicubic_upscale(tf.constant(lr[None]), 2)[0].numpy()
        values.append(metrics.standard_metrics(up, hr, 2)[0])
    return values


@pytest.mark.published
def test_set5_bicubic_baseline_matches_the_literature():
    values = bicubic_standard_psnr("set5")
    assert len(values) == 5
    assert np.mean(values) == pytest.approx(33.66, abs=0.05)


@pytest.mark.published
def test_set14_bicubic_baseline_is_the_readmes():
    values = bicubic_standard_psnr("set14")
    assert len(values) == 14
    # README's figure; the literature reports 30.23 dB.
    assert np.mean(values) == pytest.approx(30.14, abs=0.02)
