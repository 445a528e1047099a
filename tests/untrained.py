"""An untrained checkpoint as srtrain writes them: random weights are enough for the tests of
what reads checkpoints (evaluation, upscaling, comparison, the search's test scores)."""

from __future__ import annotations

from pathlib import Path

from srtrain import checkpoints, models
from srtrain.config import Config
from srtrain.train import make_optimizer


def save_checkpoint(path: Path, cfg: Config, model=None):
    """Saves `model` (default: a fresh one of `cfg.model`) with a built Adam at `path`; returns
    the model."""
    model = model or models.from_config(cfg.model, 2)
    opt = make_optimizer(1e-3, "float32")
    opt.build(model.trainable_variables)
    checkpoints.save(path, cfg, model, opt, checkpoints.TrainState())
    return model
