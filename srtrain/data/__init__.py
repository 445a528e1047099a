"""Training data: shard datasets (`builder`, `manifest`, `shards`), the bundled sample photos
(`samples`), and the tf.data pipelines (`pipeline`: `train_dataset`, `eval_dataset`,
`degrade_batch`, importable from here).

The pipelines import TensorFlow, the shard builder does not: the pipeline names load on first
use, so `python -m srtrain.data` and the builder's worker processes run without TensorFlow
(seconds of start-up and several hundred MB of memory each).
"""

from __future__ import annotations

_PIPELINE = ("train_dataset", "eval_dataset", "degrade_batch", "AUTOTUNE")


def __getattr__(name: str):
    if name in _PIPELINE:
        from srtrain.data import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_PIPELINE])
