"""Losses: MAE, the composite VGG19 perceptual loss, and loading VGG19 weights from a local file
and from S3 (SeaweedFS), with one-line errors when they are missing; end to end, a composite-loss
run trains with either source and stops before training when the weights point nowhere."""

import hashlib
import json
import os
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from cli import run_srtrain

from srtrain import losses, storage
from srtrain.config import LossConfig

TINY = [
    "--local",
    "--set",
    "train.epochs=1",
    "--set",
    "train.steps_per_epoch=2",
    "--set",
    "data.patch_size=32",
    "--set",
    "data.val_patch_size=32",
    "--set",
    "data.batch_size=2",
    "--set",
    "model.filters=8",
    "--set",
    "data.val_images=2",
    "--set",
    "train.sample_images=0",
    "--set",
    "loss.kind=composite",
    "--set",
    "loss.alpha=0.01",
    "--set",
    "train.precision=fp32",
]


@pytest.fixture(scope="session")
def vgg_file(tmp_path_factory) -> Path:
    """A randomly initialised VGG19 (no top) weights file, built once (80 MB)."""
    path = tmp_path_factory.mktemp("vgg") / "vgg19_random.weights.h5"
    keras.utils.set_random_seed(0)
    keras.applications.VGG19(include_top=False, weights=None).save_weights(path)
    return path


def composite_cfg(weights, layers=None) -> LossConfig:
    return LossConfig(
        kind="composite",
        alpha=0.5,
        perceptual_layers=layers or {"block2_conv2": 1.0, "block5_conv4": 2.0},
        vgg_weights=str(weights),
    )


def images(seed=0, shape=(2, 32, 32, 3)):
    g = tf.random.Generator.from_seed(seed)
    return g.uniform(shape), g.uniform(shape)


def test_mae_is_per_example():
    hr = tf.zeros((2, 4, 4, 3))
    sr = tf.concat([tf.zeros((1, 4, 4, 3)), tf.fill((1, 4, 4, 3), 0.5)], 0)
    np.testing.assert_allclose(losses.mae(hr, sr).numpy(), [0.0, 0.5])


def test_mse_at_mae_scale_has_mse_direction_and_mae_size():
    hr, sr = images(1)
    with tf.GradientTape(persistent=True) as g:
        g.watch(sr)
        tail = tf.reduce_sum(losses.mse_at_mae_scale(hr, sr))
        mse = tf.reduce_sum(tf.reduce_mean(tf.square(hr - sr), axis=[1, 2, 3]))
        mae = tf.reduce_sum(losses.mae(hr, sr))
    d_tail, d_mse, d_mae = (g.gradient(v, sr).numpy() for v in (tail, mse, mae))
    for i in range(2):  # per image: parallel to MSE's gradient, as large as MAE's on average
        cos = np.sum(d_tail[i] * d_mse[i]) / np.linalg.norm(d_tail[i]) / np.linalg.norm(d_mse[i])
        assert cos == pytest.approx(1.0, abs=1e-5)
        assert np.abs(d_tail[i]).mean() == pytest.approx(np.abs(d_mae[i]).mean(), rel=1e-4)
    # Its value: MSE over twice MAE, per image.
    diff = (hr - sr).numpy()
    want = (diff**2).mean(axis=(1, 2, 3)) / (2 * np.abs(diff).mean(axis=(1, 2, 3)))
    np.testing.assert_allclose(losses.mse_at_mae_scale(hr, sr).numpy(), want, rtol=1e-5)


def test_mse_tail_switches_at_its_planned_step_without_retracing():
    hr, sr = images(2)
    step = tf.Variable(0, dtype=tf.int64)
    tail = losses.MseTail(0.25, step)
    traces = []

    @tf.function
    def loss(hr, sr):
        traces.append(1)
        return tail.wrap(losses.mae)(hr, sr)

    mae, late = losses.mae(hr, sr).numpy(), losses.mse_at_mae_scale(hr, sr).numpy()
    assert not np.allclose(mae, late)
    np.testing.assert_allclose(loss(hr, sr).numpy(), mae)  # unplanned: MAE throughout
    assert tail.plan(400) == 300
    for at, want in [(299, mae), (300, late), (1000, late)]:
        step.assign(at)
        np.testing.assert_allclose(loss(hr, sr).numpy(), want, rtol=1e-6)
    assert tail.plan(800) == 600  # the time limit moved the run's end: MSE starts later
    step.assign(300)
    np.testing.assert_allclose(loss(hr, sr).numpy(), mae, rtol=1e-6)
    assert len(traces) == 1


def test_composite_is_mae_plus_alpha_times_weighted_vgg_feature_mae(vgg_file):
    cfg = composite_cfg(vgg_file)
    loss = losses.build_loss(cfg)
    hr, sr = images()
    vgg = keras.applications.VGG19(include_top=False, weights=None)
    vgg.load_weights(vgg_file)
    feat = keras.Model(
        vgg.input, [vgg.get_layer("block2_conv2").output, vgg.get_layer("block5_conv4").output]
    )
    caffe = lambda x: (x * 255.0)[..., ::-1] - [103.939, 116.779, 123.68]  # noqa: E731 (vgg19 preprocessing)
    fh, fs = feat(caffe(hr)), feat(caffe(sr))
    perceptual = sum(
        w * tf.reduce_mean(tf.abs(a - b), [1, 2, 3])
        for w, a, b in zip((1.0, 2.0), fh, fs, strict=True)
    )
    expected = losses.mae(hr, sr) + 0.5 * perceptual
    out = loss(hr, sr)
    assert out.shape == (2,)
    np.testing.assert_allclose(out.numpy(), expected.numpy(), rtol=1e-4)
    assert float(tf.reduce_max(loss(hr, hr))) == 0.0


def test_vgg_is_frozen_under_the_precision_policy_and_passes_gradients(vgg_file):
    features = losses.vgg_features(["block2_conv2"], str(vgg_file), "mixed_bfloat16")
    assert keras.config.dtype_policy().name == "float32"  # the global policy is restored
    assert features.trainable_variables == []
    assert features.get_layer("block2_conv2").dtype_policy.name == "mixed_bfloat16"
    loss = losses.perceptual(features, [1.0])
    hr, sr = images(1)
    sr = tf.Variable(sr)
    with tf.GradientTape() as tape:
        value = tf.reduce_sum(loss(hr, sr))
    assert float(tf.reduce_sum(tf.abs(tape.gradient(value, sr)))) > 0


def test_missing_or_unreadable_weights_fail_with_one_line(tmp_path):
    for bad in (tmp_path / "nope.weights.h5", tmp_path / "junk.weights.h5"):
        if bad.name.startswith("junk"):
            bad.write_bytes(b"not hdf5")
        with pytest.raises(losses.VGGWeightsError) as e:
            losses.build_loss(composite_cfg(bad))
        msg = str(e.value)
        assert "\n" not in msg and str(bad) in msg and "loss.vgg_weights" in msg
        assert "imagenet" in msg and "s3://" in msg  # says how to provide them


@pytest.mark.s3
def test_weights_from_s3_are_checksummed_and_cached(vgg_file, s3, s3_env, monkeypatch, tmp_path):
    for k, v in s3_env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("SRTRAIN_CACHE", str(tmp_path / "cache"))
    data = vgg_file.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    uri = f"s3://{s3.bucket}/models/vgg19.weights.h5"
    storage.write_bytes(uri, data)
    # no checksum anywhere: refused
    with pytest.raises(losses.VGGWeightsError, match="no checksum"):
        losses.fetch_weights(uri)
    # a wrong #sha256= suffix: refused
    with pytest.raises(losses.VGGWeightsError, match="checksum mismatch"):
        losses.fetch_weights(f"{uri}#sha256={'0' * 64}")
    # a sibling .sha256 (sha256sum output) works, and the file lands in the cache
    storage.write_bytes(uri + ".sha256", f"{digest}  vgg19.weights.h5\n".encode())
    local = Path(losses.fetch_weights(uri))
    assert local.is_relative_to(tmp_path / "cache") and local.read_bytes() == data
    # downloaded once: with the object gone, the cached copy still serves (suffix form)
    fs, path = storage.resolve(uri)
    fs.delete_file(path)
    assert losses.fetch_weights(f"{uri}#sha256={digest}") == str(local)
    loss = losses.build_loss(composite_cfg(f"{uri}#sha256={digest}"))
    hr, sr = images(2)
    assert loss(hr, sr).shape == (2,)
    # a missing object without a cached copy: one line
    with pytest.raises(losses.VGGWeightsError, match="cannot download"):
        losses.fetch_weights(f"s3://{s3.bucket}/models/missing.weights.h5#sha256={digest}")


run_cli = run_srtrain


@pytest.mark.slow
def test_composite_run_with_weights_pointing_nowhere_stops_before_training(tmp_path):
    p = run_cli(
        *TINY,
        "--set",
        f"loss.vgg_weights={tmp_path}/missing.h5",
        "--output",
        str(tmp_path),
        "--name",
        "bad",
    )
    assert p.returncode != 0
    errors = [line for line in p.stderr.splitlines() if line.startswith("srtrain.run:")]
    assert len(errors) == 1 and "missing.h5" in errors[0] and "loss.vgg_weights" in errors[0]
    assert not (tmp_path / "bad" / "metrics.jsonl").exists()  # stopped before training


@pytest.mark.slow
@pytest.mark.s3
def test_composite_run_trains_with_weights_from_s3(vgg_file, s3, s3_env, tmp_path):
    # (the local-file path is the same code after fetch_weights, tested above)
    digest = hashlib.sha256(vgg_file.read_bytes()).hexdigest()
    uri = f"s3://{s3.bucket}/staged/vgg19.weights.h5"
    old = {k: os.environ.get(k) for k in s3_env}
    os.environ.update(s3_env)
    try:
        storage.write_bytes(uri, vgg_file.read_bytes())
        storage.write_bytes(uri + ".sha256", digest.encode())
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    p = run_cli(
        *TINY,
        "--set",
        f"loss.vgg_weights={uri}",
        "--output",
        str(tmp_path),
        "--name",
        "s3",
        env={**s3_env, "SRTRAIN_CACHE": str(tmp_path / "cache")},
    )
    assert p.returncode == 0, p.stderr[-2000:]
    assert list((tmp_path / "cache").rglob("vgg19.weights.h5"))


def test_a_run_trains_on_mse_from_its_planned_step(tmp_path):
    """Two in-process runs from one seed, MAE throughout and `loss.mse_final_fraction: 1/3` of 6
    steps: the same first two epochs (steps 0-3), another third epoch (steps 4-5, on MSE)."""
    from srtrain import train
    from srtrain.config import load_config

    tiny = [
        "data.patch_size=16", "data.val_patch_size=32", "data.batch_size=2",
        "data.val_images=2", "model.filters=4", "train.epochs=3", "train.steps_per_epoch=2",
        "train.precision=fp32", "train.sample_images=0", "train.early_stop_patience=0",
    ]  # fmt: skip
    losses_by_epoch, lines = {}, []
    for name, extra in [("mae", []), ("tail", ["loss.mse_final_fraction=0.3333"])]:
        run = tmp_path / name
        ctx = train.Context(run_dir=str(run), log_fn=lines.append)
        train.train_loop(load_config(None, [*tiny, *extra]), ctx)
        rows = (run / "metrics.jsonl").read_text().splitlines()
        losses_by_epoch[name] = [json.loads(r)["train_loss"] for r in rows]
    mae, tail = losses_by_epoch["mae"], losses_by_epoch["tail"]
    assert mae[:2] == tail[:2]
    assert abs(mae[2] - tail[2]) > 1e-6
    assert sum("MSE from step 4" in line for line in lines) == 1
