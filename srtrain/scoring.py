"""Model-vs-bicubic scores: the one place every reported PSNR/SSIM (and loss) is computed.

Training's validation and its test split (srtrain.train), the comparison of runs
(srtrain.compare) and the evaluation of checkpoints on whole images (srtrain.evaluate) all run
`upscale` (each model, bicubic, optionally the nearest-upscaled input, on the same LR batch) and
`score` (each of those against the HR batch, per image, under a protocol of
srtrain.metrics.PROTOCOLS); `Totals` sums the per-image scores over batches into means.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import tensorflow as tf

from srtrain import devices, metrics

BICUBIC, INPUT = "bicubic", "input (nearest)"

# {method: {"loss" (with a loss function), "psnr", "ssim": per-image values, (B,)}}
Scores = dict[str, dict[str, tf.Tensor]]


def upscale(
    models: Mapping[str, Callable], lr: tf.Tensor, scale: int, *, nearest: bool = False
) -> dict[str, tf.Tensor]:
    """{method: (B, H, W, C) float32} for one (B, h, w, C) LR batch: each model (a callable on
    the batch), bicubic, and with `nearest` the LR input upscaled by nearest neighbour."""
    out = {name: tf.cast(run(lr), tf.float32) for name, run in models.items()}
    out[BICUBIC] = metrics.bicubic_upscale(lr, scale)
    if nearest:
        out[INPUT] = tf.image.resize(lr, tf.shape(lr)[1:3] * scale, method="nearest")
    return out


def score(
    outputs: Mapping[str, tf.Tensor],
    hr: tf.Tensor,
    *,
    loss_fn: Callable | None = None,
    protocol: str = "seed",
    scale: int = 0,
) -> Scores:
    """Per-image scores of each output against `hr` (B, H, W, C) in [0, 1].

    `seed`: RGB PSNR/SSIM in TF ops (traceable: the train loop's eval step is a tf.function),
    and `loss_fn(hr, sr)` when given. `standard`: Y-channel PSNR/SSIM with `scale` border pixels
    cropped, in numpy, one image at a time (srtrain.evaluate; eager only)."""
    if protocol == "standard":
        hr = np.asarray(hr)
        out = {}
        for name, sr in outputs.items():
            pairs = [
                metrics.standard_metrics(s, h, scale)
                for s, h in zip(np.asarray(sr), hr, strict=True)
            ]
            out[name] = {
                "psnr": np.array([p for p, _ in pairs]),
                "ssim": np.array([s for _, s in pairs]),
            }
        return out
    if protocol != "seed":
        raise ValueError(f"protocol {protocol!r}: expected one of {', '.join(metrics.PROTOCOLS)}")
    out = {}
    for name, sr in outputs.items():
        out[name] = {"loss": loss_fn(hr, sr)} if loss_fn else {}
        out[name].update(psnr=metrics.psnr(sr, hr), ssim=metrics.ssim(sr, hr))
    return out


def make_eval_step(model, loss_fn, scale: int) -> Callable:
    """The train loop's validation step, a tf.function: (lr, hr) -> `score` of the model (as
    "val") and bicubic, with the training loss, and the model's "spread": each output image's
    standard deviation over its pixels, averaged over channels (near 0: one colour everywhere,
    whatever the input)."""

    @tf.function
    def eval_step(lr, hr):
        outputs = upscale({"val": lambda x: model(x, training=False)}, lr, scale)
        scores = score(outputs, hr, loss_fn=loss_fn)
        sr = tf.cast(outputs["val"], tf.float32)  # (B, H, W, C)
        scores["val"]["spread"] = tf.reduce_mean(tf.math.reduce_std(sr, axis=[1, 2]), axis=-1)
        return scores

    return eval_step


class Totals:
    """Sums of per-image scores over batches, in float64, and the number of images.

    `layout` ({method: score names}) fixes the methods and their order up front, so every worker
    sums the same vector even when its shard is empty."""

    def __init__(self, layout: Mapping[str, tuple[str, ...]] | None = None):
        self.sums = {name: dict.fromkeys(keys, 0.0) for name, keys in (layout or {}).items()}
        self.images = 0

    def add(self, scores: Scores, images: int) -> None:
        for name, per_image in scores.items():
            sums = self.sums.setdefault(name, {})
            for key, values in per_image.items():
                sums[key] = sums.get(key, 0.0) + float(tf.reduce_sum(values))
        self.images += images

    def means(self) -> dict[str, dict[str, float]]:
        n = max(self.images, 1)
        return {name: {k: v / n for k, v in s.items()} for name, s in self.sums.items()}

    def vector(self) -> np.ndarray:
        """The sums, then the image count: what workers add up (srtrain.devices)."""
        flat = [v for s in self.sums.values() for v in s.values()]
        return np.array([*flat, self.images], np.float64)

    def set_vector(self, vector: np.ndarray) -> None:
        values = iter(vector[:-1])
        self.sums = {name: {k: float(next(values)) for k in s} for name, s in self.sums.items()}
        self.images = int(vector[-1])


# The train loop's rows: val_loss, val_psnr, val_ssim, val_spread, bicubic_loss, bicubic_psnr,
# bicubic_ssim.
EVAL_LAYOUT = {"val": ("loss", "psnr", "ssim", "spread"), BICUBIC: ("loss", "psnr", "ssim")}


def validate(strategy, eval_step, val_ds, max_batches: int = 0) -> dict:
    """Means of `make_eval_step`'s scores over this worker's shard of (id, lr, hr) batches,
    combined over workers: {"val_psnr": ..., "bicubic_psnr": ..., ..., "val_images": n}."""
    totals = Totals(EVAL_LAYOUT)
    for i, (_, lr, hr) in enumerate(val_ds):
        if max_batches and i >= max_batches:
            break
        totals.add(eval_step(lr, hr), int(lr.shape[0]))
    totals.set_vector(devices.sum_over_workers(strategy, totals.vector()))
    result = {f"{name}_{k}": v for name, m in totals.means().items() for k, v in m.items()}
    result["val_images"] = totals.images
    return result


def side_by_side(model, lr: tf.Tensor, hr: tf.Tensor, scale: int) -> tf.Tensor:
    """(N, H, 4W, C): LR nearest-upscaled | bicubic | model | HR per image, clipped to [0, 1]
    (samples.png and TensorBoard's val/samples)."""
    out = upscale({"model": lambda x: model(x, training=False)}, lr, scale, nearest=True)
    grid = tf.concat([out[INPUT], out[BICUBIC], out["model"], tf.cast(hr, tf.float32)], axis=2)
    return tf.clip_by_value(grid, 0.0, 1.0)
