"""TensorBoard logs of a training run: scalars every epoch and a few validation images.

    tensorboard --logdir RUN_DIR/tensorboard      (or --logdir runs/ for every run)

Two event directories, so TensorBoard draws the model and bicubic on the same charts:
RUN_DIR/tensorboard/model and RUN_DIR/tensorboard/bicubic, both with the tags val/psnr, val/ssim,
val/loss; the model's also has train/loss, train/lr, train/images_per_sec, train/input_wait and
the image val/samples (rows: LR nearest-upscaled | bicubic | model | HR).

tf.summary cannot write to s3:// without tensorflow-io, so for an s3:// run directory events are
written to a local temporary directory and every changed event file is uploaded after each epoch
through srtrain.storage (TensorBoard reads s3:// logdirs only with tensorflow-io too; sync them
down first, e.g. `aws s3 sync s3://.../RUN/tensorboard tb/`).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import tensorflow as tf
from tensorflow.core.framework import summary_pb2

from srtrain import scoring, storage


def _metadata(plugin: str) -> bytes:
    return summary_pb2.SummaryMetadata(
        plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name=plugin)
    ).SerializeToString()


# tf.summary.scalar/image live in the tensorboard package, which training does not need: write
# the same records with core TF's tf.summary.write (TensorBoard's own plugin formats).
def scalar(tag: str, value: float, step: int) -> None:
    tf.summary.write(
        tag, tf.constant(float(value), tf.float32), step=step, metadata=_metadata("scalars")
    )


def image(tag: str, images: tf.Tensor, step: int) -> None:
    """(N, H, W, 3) in [0, 1] -> TensorBoard's image record: [width, height, png, png, ...]."""
    pngs = tf.map_fn(
        tf.io.encode_png,
        tf.image.convert_image_dtype(images, tf.uint8, saturate=True),
        fn_output_signature=tf.string,
    )
    dims = tf.strings.as_string(tf.shape(images)[2:0:-1])  # [width, height]
    tf.summary.write(tag, tf.concat([dims, pngs], axis=0), step=step, metadata=_metadata("images"))


class TensorBoardWriter:
    """Rank 0 only: `tb = TensorBoardWriter(run_dir, cfg, val_ds)`, `tb.epoch(row, model)` after
    each validation, `tb.close()` at the end."""

    def __init__(self, run_dir: str, cfg, val_ds: tf.data.Dataset | None = None, images: int = 3):
        self.run_dir = run_dir
        self.kw = {"endpoint_url": cfg.data.endpoint_url, "region": cfg.data.region}
        self.scale = cfg.degradation.scale
        self.remote = storage.is_s3(run_dir)
        root = storage.join(run_dir, "tensorboard")
        self.local = Path(tempfile.mkdtemp(prefix="srtrain-tb-")) if self.remote else Path(root)
        self.writers = {
            name: tf.summary.create_file_writer(str(self.local / name))
            for name in ("model", "bicubic")
        }
        self.uploaded: dict[Path, int] = {}
        self.samples = None  # (lr, hr) of the first `images` validation images, read once
        if val_ds is not None and images > 0:
            for _, lr, hr in val_ds.unbatch().take(images).batch(images):
                self.samples = (lr, hr)

    def epoch(self, row: dict, model=None) -> None:
        """Writes one epoch's metrics row (srtrain.train's) and, given the model, sample images."""
        step = int(row["epoch"])
        with self.writers["model"].as_default():
            for tag, key in (
                ("train/loss", "train_loss"),
                ("train/lr", "lr"),
                ("train/images_per_sec", "images_per_sec"),
                ("train/input_wait", "input_wait"),
                ("val/loss", "val_loss"),
                ("val/psnr", "val_psnr"),
                ("val/ssim", "val_ssim"),
            ):
                if row.get(key) is not None:
                    scalar(tag, row[key], step)
            if model is not None and self.samples is not None:
                image("val/samples", self.sample_grid(model), step)
        with self.writers["bicubic"].as_default():
            for tag, key in (
                ("val/loss", "bicubic_loss"),
                ("val/psnr", "bicubic_psnr"),
                ("val/ssim", "bicubic_ssim"),
            ):
                if row.get(key) is not None:
                    scalar(tag, row[key], step)
        self.flush()

    def sample_grid(self, model) -> tf.Tensor:
        """(N, H, 4W, 3): LR nearest-upscaled | bicubic | model | HR per validation image."""
        lr, hr = self.samples
        return scoring.side_by_side(model, lr, hr, self.scale)

    def flush(self) -> None:
        for w in self.writers.values():
            w.flush()
        if not self.remote:
            return
        for path in sorted(self.local.rglob("*")):
            size = path.stat().st_size if path.is_file() else -1
            if size < 0 or self.uploaded.get(path) == size:
                continue
            rel = path.relative_to(self.local).as_posix()
            uri = storage.join(self.run_dir, "tensorboard", *rel.split("/"))
            storage.write_bytes(uri, path.read_bytes(), **self.kw)
            self.uploaded[path] = size

    def close(self) -> None:
        self.flush()
        for w in self.writers.values():
            w.close()


def read_scalars(logdir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """{"<writer>/<tag>": [(step, value), ...]} of the scalars under a local logdir (for tests;
    needs no tensorboard package)."""
    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(Path(logdir).rglob("events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for v in event.summary.value:
                value = (
                    tf.make_ndarray(v.tensor) if v.HasField("tensor") else np.array(v.simple_value)
                )
                if value.size == 1:
                    key = f"{path.parent.name}/{v.tag}"
                    out.setdefault(key, []).append((event.step, float(value.reshape(-1)[0])))
    return out
