"""What a training run tells its user while it runs: the loss meter that catches divergence, the
one-line progress report per epoch, and metrics.jsonl in the run directory."""

from __future__ import annotations

import json
import math

import tensorflow as tf

from srtrain import storage
from srtrain.config import Config

# Steps between looks at the loss: each look is a device-to-host copy that drains the pipeline.
# A diverged run is also caught at every checkpoint and epoch end, so it stops within an epoch.
CHECK_LOSS_EVERY = 20

# A model whose validation images have a mean standard deviation (over pixels, per channel)
# below this paints (nearly) one colour whatever its input: typically every ReLU died after too
# large a step. Photos are far above it (about 0.2 on [0, 1]); so is a freshly initialised U-Net.
FLAT_OUTPUT = 1e-3


class TrainingDiverged(RuntimeError):
    """The training loss became inf/NaN; the message is the one line a user sees."""


class LossMeter:
    """Sums the per-step losses on the device; `mean()` is the one host read, at log points.

    Every worker computes the same globally reduced loss, so every worker stops at the same step
    when it becomes non-finite (Ray's report is a barrier: they must stop together).
    """

    def __init__(self):
        self.total, self.n, self.recent = None, 0, []

    def add(self, loss: tf.Tensor, step: int) -> None:
        # Starts from the first loss, not a host constant: the sum stays on the loss's device
        # (a GPU), where adding is queued and nothing waits for it.
        loss = tf.cast(loss, tf.float32)
        self.total = loss if self.total is None else self.total + loss
        self.n += 1
        self.recent.append((step, loss))

    def mean(self) -> float:
        return float(self.total) / self.n if self.n else 0.0

    def check(self, lr: float) -> None:
        """Raises TrainingDiverged naming the first step whose loss is not finite."""
        if math.isfinite(self.mean()):
            self.recent.clear()
            return
        bad = [(s, float(v)) for s, v in self.recent if not math.isfinite(float(v))]
        step, loss = bad[0] if bad else (self.recent[-1][0], float(self.total))
        raise TrainingDiverged(
            f"training diverged: the loss is {loss} at step {step}; "
            f"lower train.lr (it is {lr:g}) and start again"
        )


def progress_line(row: dict, epochs: int) -> str:
    """The epoch's line: loss, validation beside bicubic, lr, speed, and what went wrong."""
    line = (
        f"epoch {row['epoch']}/{epochs}  step {row['step']}  loss {row['train_loss']:.4f}  "
        f"val_psnr {row['val_psnr']:.2f} dB (bicubic {row['bicubic_psnr']:.2f})  "
        f"val_ssim {row['val_ssim']:.3f} (bicubic {row['bicubic_ssim']:.3f})  "
        f"lr {row['lr']:.1e}  {row['images_per_sec']:.1f} img/s"
    )
    if row["input_wait"] > 0.10:
        line += (
            f"  input-bound: {row['input_wait']:.0%} of step time waiting for data"
            " (degradation.on=replica and data.decoded_cache=true on GPUs; more"
            " scaling.cpus_per_worker; or data.patches_per_image=2)"
        )
    if row.get("val_spread", 1.0) < FLAT_OUTPUT:
        line += (
            f"  flat output: the model paints one colour whatever the input (spread"
            f" {row['val_spread']:.1e}; dead ReLUs?): lower train.lr and start again"
        )
    if "lr_reduced_to" in row:
        line += f"  (lr -> {row['lr_reduced_to']:.1e})"
    if "planned_epochs" in row and not row.get("time_limit"):
        line += f"  time limit: {row['planned_epochs']} epochs fit, the lr schedule now ends there"
        if "mse_from_step" in row:
            line += f" (MSE from step {row['mse_from_step']:,})"
    if row.get("time_limit"):
        line += "  time limit: another epoch would not fit"
    elif row.get("stopped_early"):
        line += "  early stop"
    return line


class MetricsLog:
    """metrics.jsonl in the run directory, rewritten whole (object storage has no append)."""

    def __init__(self, run_dir: str, cfg: Config):
        self.uri = storage.join(run_dir, "metrics.jsonl")
        self.kw = {"endpoint_url": cfg.data.endpoint_url, "region": cfg.data.region}
        self.rows: list[dict] = []
        if storage.exists(self.uri, **self.kw):
            text = storage.read_bytes(self.uri, **self.kw).decode()
            self.rows = [json.loads(line) for line in text.splitlines() if line.strip()]

    def truncate_after(self, epoch: int) -> None:
        self.rows = [r for r in self.rows if r["epoch"] <= epoch]

    def append(self, row: dict) -> None:
        self.rows.append(row)
        text = "".join(json.dumps(r) + "\n" for r in self.rows)
        storage.write_bytes(self.uri, text.encode(), **self.kw)
