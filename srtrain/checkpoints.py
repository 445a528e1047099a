"""Checkpoints: what they hold, how they are written and found again.

A checkpoint is a directory:
  model.keras      the model in float32, loadable with plain `keras.saving.load_model` (inference
                   needs nothing of srtrain); with `train.ema_decay` the averaged weights
  train_weights.npz  with `train.ema_decay` only: the raw trained weights a resumed run continues
  optimizer.npz    the optimizer's variables, in `optimizer.variables` order
  best.npz         the best-on-val weights so far (early stopping restores them at the end)
  state.json       epoch, step, learning rate, plateau and early-stopping state, best metrics
  config.yaml      the resolved job config

`save()` writes one into a local directory. In Ray mode, Ray persists that directory to run
storage; in local mode `LocalCheckpoints` does, keeping the best (by val PSNR) and the latest K and
writing `checkpoints/index.json` last, so a checkpoint is listed only once all its files are in
place: a crash leaves a checkpoint complete or unlisted, never partial.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import keras
import numpy as np
import pyarrow.fs as pafs

from srtrain import storage
from srtrain.config import Config, to_yaml

MODEL_FILE = "model.keras"


@dataclass
class TrainState:
    """Everything besides variables that a resumed run needs to continue where it stopped."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps taken (global: one step = one global batch)
    lr: float = 0.0
    best_psnr: float = float("-inf")
    best_epoch: int = 0
    plateau_wait: int = 0
    early_stop_wait: int = 0
    # Wall seconds of the epochs completed (training and validation), the longest epoch, and
    # the longest warm one (not the first of a process, which also traces and compiles).
    train_seconds: float = 0.0
    longest_epoch_seconds: float = 0.0
    warm_epoch_seconds: float = 0.0
    # The best-on-val metrics so far, written into result.json at the end.
    best_metrics: dict = field(default_factory=dict)


def save(
    directory: str | Path,
    cfg: Config,
    export_model: keras.Model,
    optimizer: keras.optimizers.Optimizer,
    state: TrainState,
    best_weights: list | None = None,
    train_weights: list | None = None,
) -> Path:
    """`export_model` is what inference gets (the EMA weights when on); `train_weights`, when
    they differ from it, the raw weights training continues from."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    export_model.save(directory / MODEL_FILE)
    if train_weights is not None:
        np.savez(
            directory / "train_weights.npz", **{f"w{i:04d}": w for i, w in enumerate(train_weights)}
        )
    arrays = {f"v{i:04d}": np.asarray(v.numpy()) for i, v in enumerate(optimizer.variables)}
    np.savez(directory / "optimizer.npz", **arrays)
    if best_weights is not None:
        np.savez(directory / "best.npz", **{f"w{i:04d}": w for i, w in enumerate(best_weights)})
    state_dict = asdict(state)
    state_dict["best_psnr"] = None if state.best_psnr == float("-inf") else state.best_psnr
    (directory / "state.json").write_text(json.dumps(state_dict, indent=2))
    (directory / "config.yaml").write_text(to_yaml(cfg))
    return directory


def load_state(directory: str | Path) -> TrainState:
    data = json.loads((Path(directory) / "state.json").read_text())
    if data.get("best_psnr") is None:
        data["best_psnr"] = float("-inf")
    return TrainState(**data)


def restore(
    directory: str | Path,
    model: keras.Model,
    optimizer: keras.optimizers.Optimizer,
    averaged: keras.Model | None = None,
) -> tuple[TrainState, list | None]:
    """Loads weights and optimizer state into already built objects (under their strategy);
    returns the training state and the best weights so far (None if not saved).

    `averaged` (train.ema_decay): the EMA model, restored from model.keras, while `model` gets
    train_weights.npz when the checkpoint has it (saved with the EMA on), else model.keras."""
    directory = Path(directory)
    saved = keras.saving.load_model(directory / MODEL_FILE, compile=False).get_weights()
    raw = directory / "train_weights.npz"
    if raw.exists():
        with np.load(raw) as data:
            model.set_weights([data[k] for k in sorted(data.files)])
    else:
        model.set_weights(saved)
    if averaged is not None:
        averaged.set_weights(saved)
    with np.load(directory / "optimizer.npz") as data:
        arrays = [data[k] for k in sorted(data.files)]
    if len(arrays) != len(optimizer.variables):
        raise ValueError(
            f"{directory}: optimizer state has {len(arrays)} variables, the model needs "
            f"{len(optimizer.variables)} (was it saved from another architecture?)"
        )
    for var, value in zip(optimizer.variables, arrays, strict=True):
        var.assign(value)
    best = None
    if (directory / "best.npz").exists():
        with np.load(directory / "best.npz") as data:
            best = [data[k] for k in sorted(data.files)]
    return load_state(directory), best


def load_model(path: str) -> keras.Model:
    """The inference model of a checkpoint directory (or its model.keras), local or s3://."""
    if storage.is_s3(path):
        local = Path(tempfile.mkdtemp(prefix="srtrain-ckpt-"))
        uri = path if path.endswith(".keras") else storage.join(path, MODEL_FILE)
        (local / MODEL_FILE).write_bytes(storage.read_bytes(uri))
        return keras.saving.load_model(local / MODEL_FILE, compile=False)
    p = Path(path)
    if p.is_dir():
        p = p / MODEL_FILE
    if not p.exists():
        raise FileNotFoundError(f"{path}: no {MODEL_FILE} here (expected a checkpoint directory)")
    return keras.saving.load_model(p, compile=False)


class LocalCheckpoints:
    """Checkpoint persistence for runs without Ray: run_dir/checkpoints/<name>/ + index.json."""

    def __init__(self, run_dir: str, keep_latest: int, endpoint_url: str = "", region: str = ""):
        self.root = storage.join(run_dir, "checkpoints")
        self.keep_latest = keep_latest
        self.endpoint_url, self.region = endpoint_url, region
        self.fs, self.root_path = storage.resolve(self.root, endpoint_url, region)
        self.index = self._read_index()

    def _read_index(self) -> dict:
        uri = storage.join(self.root, "index.json")
        if not storage.exists(uri, self.endpoint_url, self.region):
            return {"checkpoints": [], "best": None}
        return json.loads(storage.read_bytes(uri, self.endpoint_url, self.region))

    def latest(self) -> str | None:
        items = self.index["checkpoints"]
        return storage.join(self.root, items[-1]["name"]) if items else None

    def best(self) -> str | None:
        return storage.join(self.root, self.index["best"]) if self.index["best"] else None

    def download(self, uri: str) -> Path:
        """A local copy of a persisted checkpoint (the directory itself when local)."""
        if not storage.is_s3(uri):
            return Path(uri)
        local = Path(tempfile.mkdtemp(prefix="srtrain-restore-"))
        _, src = storage.resolve(uri, self.endpoint_url, self.region)
        pafs.copy_files(
            src,
            str(local),
            source_filesystem=self.fs,
            destination_filesystem=pafs.LocalFileSystem(),
        )
        return local

    def persist(self, local_dir: Path, state: TrainState, metrics: dict) -> str:
        name = f"checkpoint_{state.step:08d}"
        dest = storage.join(self.root, name)
        _, dest_path = storage.resolve(dest, self.endpoint_url, self.region)
        if storage.is_s3(dest):
            pafs.copy_files(
                str(local_dir),
                dest_path,
                source_filesystem=pafs.LocalFileSystem(),
                destination_filesystem=self.fs,
            )
        else:
            tmp = Path(self.root_path) / f".tmp-{name}"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(local_dir, tmp)
            shutil.rmtree(dest_path, ignore_errors=True)
            tmp.rename(dest_path)  # atomic on one filesystem
        items = [c for c in self.index["checkpoints"] if c["name"] != name]
        items.append(
            {
                "name": name,
                "epoch": state.epoch,
                "step": state.step,
                "val_psnr": metrics.get("val_psnr"),
            }
        )
        psnr_of = {c["name"]: c["val_psnr"] for c in items if c["val_psnr"] is not None}
        best = max(psnr_of, key=psnr_of.get) if psnr_of else None
        keep = {c["name"] for c in items[-self.keep_latest :]} | ({best} if best else set())
        dropped = [c["name"] for c in items if c["name"] not in keep]
        self.index = {"checkpoints": [c for c in items if c["name"] in keep], "best": best}
        storage.write_bytes(
            storage.join(self.root, "index.json"),
            json.dumps(self.index, indent=2).encode(),
            self.endpoint_url,
            self.region,
        )
        for old in dropped:  # only after the index no longer lists them
            _, p = storage.resolve(storage.join(self.root, old), self.endpoint_url, self.region)
            try:
                self.fs.delete_dir(p)
            except (OSError, FileNotFoundError):
                pass
        return dest
