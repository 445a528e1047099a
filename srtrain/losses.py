"""Training losses. Each returns a per-example loss (B,); the train step averages over the global
batch so every replica count gives the same gradient.

- `mae`: mean absolute error over pixels, the original project's base loss.
- `loss.mse_final_fraction` > 0 (`MseTail`): the run's last steps train on MSE instead, rescaled
  per example to MAE's gradient size (`mse_at_mae_scale`).
- `composite`: MAE + alpha x perceptual, where perceptual = sum over `loss.perceptual_layers` of
  weight x MAE between VGG19 features of output and target (Keras' vgg19 preprocessing on 0-255),
  as the original project did with block2_conv2 or block5_conv4 alone.

VGG19 weights (`loss.vgg_weights`):
- `imagenet`: Keras downloads and caches them (~80 MB; needs internet on the worker).
- a local file: `.weights.h5` (saved by `model.save_weights`) or Keras' own `.h5`
  (vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5).
- `s3://bucket/key.weights.h5`: for air-gapped clusters. Each worker downloads it once into
  `$SRTRAIN_CACHE/vgg19/` (`storage.cache_dir`) and checks its SHA-256, given either as a
  `#sha256=<hex>` suffix on the URI or by a sibling object `<key>.sha256` (the first word of
  `sha256sum` output). A cached copy whose checksum matches is not downloaded again.
Missing or unreadable weights raise `VGGWeightsError` (one line saying how to provide them) when
the loss is built, which the train loop does before its first step.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import keras
import tensorflow as tf

from srtrain import storage
from srtrain.config import LossConfig

LossFn = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]

HOW_TO = (
    "set loss.vgg_weights to 'imagenet' (needs internet), a local VGG19 weights file, or an "
    "s3:// object with a '#sha256=<hex>' suffix or a sibling '<object>.sha256'"
)


class VGGWeightsError(RuntimeError):
    """VGG19 weights for the perceptual loss are missing, unreadable or fail their checksum."""


def mae(hr: tf.Tensor, sr: tf.Tensor) -> tf.Tensor:
    """(B, H, W, C) x2 -> (B,) mean absolute error per image."""
    diff = tf.abs(tf.cast(hr, tf.float32) - tf.cast(sr, tf.float32))
    return tf.reduce_mean(diff, axis=[1, 2, 3])


def mse_at_mae_scale(hr: tf.Tensor, sr: tf.Tensor) -> tf.Tensor:
    """(B,) mean squared error per image divided by twice its mean absolute error, the divisor
    held constant: the gradient of MSE (what PSNR scores) at the size of MAE's, per pixel the
    error over the image's mean error instead of its sign."""
    diff = tf.cast(hr, tf.float32) - tf.cast(sr, tf.float32)
    mse = tf.reduce_mean(tf.square(diff), axis=[1, 2, 3])
    scale = tf.stop_gradient(tf.reduce_mean(tf.abs(diff), axis=[1, 2, 3]))
    return mse / (2.0 * tf.maximum(scale, 1e-6))


class MseTail:
    """`loss.mse_final_fraction`: the loss switches from MAE to `mse_at_mae_scale` at a step
    held in a variable (built in the strategy's scope), compared with the optimizer's step inside
    the train step, so `plan` can move it when the run's planned length changes, no retracing."""

    def __init__(self, fraction: float, iterations: tf.Variable):
        self.fraction, self.iterations = fraction, iterations
        self.start = tf.Variable(float("inf"), trainable=False, name="mse_start_step")

    def plan(self, total_steps: int) -> int:
        """Starts MSE at the last `fraction` of `total_steps`; returns that step."""
        start = round(total_steps * (1.0 - self.fraction))
        self.start.assign(float(start))
        return start

    def wrap(self, loss_fn: LossFn) -> LossFn:
        def loss(hr: tf.Tensor, sr: tf.Tensor) -> tf.Tensor:
            late = tf.cast(self.iterations, tf.float32) >= self.start
            return tf.where(late, mse_at_mae_scale(hr, sr), loss_fn(hr, sr))

        return loss


# --- VGG19 weights ------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fail(spec: str, why: str) -> VGGWeightsError:
    return VGGWeightsError(f"loss.vgg_weights={spec}: {why}; {HOW_TO}")


def fetch_weights(spec: str, endpoint_url: str = "", region: str = "") -> str:
    """'imagenet' or the local path of a weights file, downloading and checking s3:// objects."""
    if spec == "imagenet":
        return spec
    if not storage.is_s3(spec):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise _fail(spec, "no such file")
        return str(path)
    uri, _, fragment = spec.partition("#")
    expected = fragment[len("sha256=") :].strip().lower() if fragment.startswith("sha256=") else ""
    try:
        if not expected:
            sidecar = uri + ".sha256"
            if not storage.exists(sidecar, endpoint_url, region):
                raise _fail(spec, f"no checksum (neither a #sha256= suffix nor {sidecar})")
            words = storage.read_bytes(sidecar, endpoint_url, region).decode().split()
            expected = words[0].lower() if words else ""
        if len(expected) != 64 or any(c not in "0123456789abcdef" for c in expected):
            raise _fail(spec, f"malformed SHA-256 {expected!r}")
        # Named by the checksum, so a changed object is a different file, never a stale one.
        local = storage.cache_dir("vgg19") / expected / Path(uri).name
        if local.is_file() and _sha256(local) == expected:
            return str(local)
        data = storage.read_bytes(uri, endpoint_url, region)
    except storage.StorageError as e:
        raise _fail(spec, f"cannot download ({e})") from None
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise _fail(spec, f"checksum mismatch (got {actual[:12]}..., expected {expected[:12]}...)")
    local.parent.mkdir(parents=True, exist_ok=True)
    # Several workers on one node may download at once: write aside, then rename atomically.
    fd, tmp = tempfile.mkstemp(dir=local.parent, prefix=".part-")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, local)
    return str(local)


# --- the perceptual term ------------------------------------------------------------------------


def vgg_features(
    layers: list[str], weights: str, dtype: str | None = None, label: str = ""
) -> keras.Model:
    """A frozen VGG19 (no top) mapping preprocessed images to the named layers' outputs, built
    under the dtype policy `dtype` (e.g. "mixed_bfloat16"); `weights` as `fetch_weights` returns,
    `label` the user's spelling of it for error messages."""
    previous = keras.config.dtype_policy()
    try:
        if dtype:
            keras.config.set_dtype_policy(dtype)
        try:
            vgg = keras.applications.VGG19(
                include_top=False, weights=None, input_shape=(None, None, 3)
            )
        finally:
            keras.config.set_dtype_policy(previous)
        if weights == "imagenet":
            path = keras.utils.get_file(
                "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5",
                "https://storage.googleapis.com/tensorflow/keras-applications/vgg19/"
                "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5",
                cache_subdir="models",
                file_hash="253f8cb515780f3b799900260a226db6",
            )
        else:
            path = weights
        vgg.load_weights(path)
    except VGGWeightsError:
        raise
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise _fail(label or weights, f"cannot load VGG19 weights ({reason[:200]})") from None
    vgg.trainable = False
    outputs = [vgg.get_layer(name).output for name in layers]
    return keras.Model(vgg.input, outputs, name="vgg19_features")


def preprocess(img: tf.Tensor) -> tf.Tensor:
    """[0, 1] RGB -> Keras vgg19 input (0-255, BGR, ImageNet mean subtracted)."""
    return keras.applications.vgg19.preprocess_input(tf.cast(img, tf.float32) * 255.0)


def perceptual(features: keras.Model, layer_weights: list[float]) -> LossFn:
    """Per-example sum_l w_l x mean|VGG_l(sr) - VGG_l(hr)|."""

    def loss(hr: tf.Tensor, sr: tf.Tensor) -> tf.Tensor:
        # A one-layer model returns a tensor, not a list.
        f_hr = tf.nest.flatten(features(preprocess(hr), training=False))
        f_sr = tf.nest.flatten(features(preprocess(sr), training=False))
        total = 0.0
        for w, a, b in zip(layer_weights, f_hr, f_sr, strict=True):
            diff = tf.abs(tf.cast(tf.stop_gradient(a), tf.float32) - tf.cast(b, tf.float32))
            total += w * tf.reduce_mean(diff, axis=[1, 2, 3])  # (B,)
        return total

    return loss


def build_loss(
    cfg: LossConfig, dtype: str | None = None, endpoint_url: str = "", region: str = ""
) -> LossFn:
    """The per-example loss a LossConfig describes; builds any network it needs once.

    `endpoint_url`/`region` locate an s3:// `vgg_weights` (default: AWS_ENDPOINT_URL)."""
    if cfg.kind == "mae":
        return mae
    if cfg.kind == "composite":
        layers = list(cfg.perceptual_layers)
        path = fetch_weights(cfg.vgg_weights, endpoint_url, region)
        features = vgg_features(layers, path, dtype, label=cfg.vgg_weights)
        term = perceptual(features, [cfg.perceptual_layers[n] for n in layers])
        alpha = float(cfg.alpha)

        def composite(hr: tf.Tensor, sr: tf.Tensor) -> tf.Tensor:
            return mae(hr, sr) + alpha * term(hr, sr)

        return composite
    raise ValueError(f"loss.kind: {cfg.kind!r} is not available in this build")
