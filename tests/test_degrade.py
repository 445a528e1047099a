"""Degradation ops: shapes, range, blur kernel, noise level, determinism; alone and in tf.data."""

import numpy as np
import pytest
import tensorflow as tf

from srtrain import degrade
from srtrain.config import DegradationConfig


def test_gaussian_kernel_sums_to_one_and_is_symmetric():
    k = degrade.gaussian_kernel(5, 1.0).numpy()
    assert k.shape == (5,)
    assert k.sum() == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(k, k[::-1])
    k2 = np.outer(k, k)  # the separable 2-D kernel
    assert k2.sum() == pytest.approx(1.0, abs=1e-6)
    # OpenCV's getGaussianKernel(5, 1.0) for reference
    np.testing.assert_allclose(
        k, [0.05448868, 0.24420134, 0.40261995, 0.24420134, 0.05448868], atol=1e-6
    )


def test_area_downsample_is_block_mean():
    x = tf.reshape(tf.range(16, dtype=tf.float32), [4, 4, 1])
    y = degrade.area_downsample(x, 2).numpy()[..., 0]
    np.testing.assert_allclose(y, [[2.5, 4.5], [10.5, 12.5]])


def test_shapes_and_range():
    cfg = DegradationConfig()
    hr = tf.random.uniform([2, 64, 48, 3], seed=1)
    lr = degrade.degrade(hr, cfg, tf.constant([1, 2], tf.int64))
    assert lr.shape == (2, 32, 24, 3)
    assert float(tf.reduce_min(lr)) >= 0.0 and float(tf.reduce_max(lr)) <= 1.0
    single = degrade.degrade(hr[0], DegradationConfig(scale=4), tf.constant([1, 2], tf.int64))
    assert single.shape == (16, 12, 3)


def test_noise_std_matches_sigma():
    cfg = DegradationConfig(blur_sigma=0.0, noise_sigma=10.0)
    hr = tf.fill([256, 256, 3], 0.5)  # flat grey: no clipping, blur does nothing
    lr = degrade.degrade(hr, cfg, tf.constant([3, 4], tf.int64))
    std = float(tf.math.reduce_std(lr - 0.5)) * 255
    assert abs(std - 10.0) < 1.0  # within 10%


def test_blur_preserves_flat_images_and_smooths_edges():
    flat = tf.fill([16, 16, 3], 0.3)
    np.testing.assert_allclose(degrade.blur(flat, 5, 1.0).numpy(), 0.3, atol=1e-6)
    edge = tf.concat([tf.zeros([16, 8, 1]), tf.ones([16, 8, 1])], axis=1)
    b = degrade.blur(edge, 5, 1.0).numpy()[8, :, 0]
    assert 0 < b[7] < 0.5 < b[8] < 1


def test_same_seed_same_lr_and_fresh_noise_otherwise():
    cfg = DegradationConfig()
    hr = tf.random.uniform([32, 32, 3], seed=2)
    a = degrade.degrade(hr, cfg, degrade.eval_seed(cfg, tf.constant("img/1")))
    b = degrade.degrade(hr, cfg, degrade.eval_seed(cfg, tf.constant("img/1")))
    c = degrade.degrade(hr, cfg, degrade.eval_seed(cfg, tf.constant("img/2")))
    np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert not np.allclose(a.numpy(), c.numpy())


def test_inside_a_tf_data_pipeline():
    cfg = DegradationConfig()
    ds = tf.data.Dataset.from_tensor_slices(tf.random.uniform([4, 32, 32, 3], seed=3))
    ds = ds.map(lambda hr: degrade.degrade(hr, cfg, tf.constant([5, 6], tf.int64)))
    out = list(ds)
    assert len(out) == 4 and out[0].shape == (16, 16, 3)


@pytest.mark.parametrize("pad", [1, 2, 3])
def test_reflect_pad_equals_tf_pad_reflect(pad):
    x = tf.random.stateless_uniform([2, 9, 7, 3], [4, 5])
    for axis in (1, 2):
        paddings = [[0, 0]] * 4
        paddings[axis] = [pad, pad]
        expect = tf.pad(x, paddings, mode="REFLECT")
        np.testing.assert_array_equal(degrade.reflect_pad(x, pad, axis).numpy(), expect.numpy())
