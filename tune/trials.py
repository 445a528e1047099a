"""A search's trials read back from Tune's saved experiment state (`ExperimentAnalysis`) and
each trial's run directory, and ranked: what tune.report writes its outputs from.

Ranking rule (declared, as Tune's metric scope "last"): a trial scores its LAST epoch's
validation metric, not its best epoch's (see tune.report).
"""

from __future__ import annotations

import json
import math
import numbers
from dataclasses import dataclass, field
from typing import Any

from srtrain import storage
from srtrain.config import Config
from tune import space
from tune.space import SearchSettings

RANK_SCOPE = "last"  # Tune's metric scope: the last reported epoch, not "all" (the max)
STOPPED_ASHA = "ASHA"
STOPPED_PATIENCE = "early stopping"


@dataclass
class TrialRow:
    trial_id: str
    status: str  # Tune's: TERMINATED, ERROR, RUNNING, PENDING, PAUSED
    params: dict[str, Any]  # dotted key -> sampled value
    history: list[dict] = field(default_factory=list)  # one row per epoch, in order
    error: str = ""

    @property
    def epochs(self) -> int:
        return int(self.history[-1]["epoch"]) if self.history else 0

    def best(self, metric: str, mode: str) -> dict | None:
        """The epoch row that scores this trial under RANK_SCOPE: its last reported epoch.

        (`mode` is Tune's; with scope "last" it does not choose among epochs.) Epochs a stopped
        trial trained after Tune stopped listening have no checkpoint in Tune's records (and ASHA
        never ranked them): the row is chosen among the epochs Tune saw."""
        rows = [r for r in self.history if _finite(r.get(metric))]
        rows = [r for r in rows if isinstance(r.get("checkpoint_path"), str)] or rows
        return rows[-1] if rows else None

    def stopped_by(self, max_epochs: int) -> str:
        """Why the trial ended before max_epochs: ASHA, its own early stopping, "" (it ran all
        its epochs), "error" or "unfinished" (the search was interrupted)."""
        if self.status == "ERROR":
            return "error"
        if self.status != "TERMINATED":
            return "unfinished"
        if self.epochs >= max_epochs:
            return ""
        if self.history and _true(self.history[-1].get("stopped_early")):
            return STOPPED_PATIENCE
        return STOPPED_ASHA


def collect(search_dir: str, settings: SearchSettings, cfg: Config) -> list[TrialRow]:
    """One TrialRow per trial Tune knows, read from the search directory.

    A trial's history is its run's metrics.jsonl (every epoch it trained: a trial ASHA stops may
    finish one more epoch before Tune's stop reaches it) joined with what Tune received (which adds
    each epoch's checkpoint path).
    """
    from ray.tune import ExperimentAnalysis

    fs, path = storage.resolve(search_dir, cfg.data.endpoint_url, cfg.data.region)
    analysis = ExperimentAnalysis(path, storage_filesystem=fs)
    frames = analysis.trial_dataframes
    rows = []
    for trial in analysis.trials:
        params = space.flat_params(trial.config or {})
        history = _run_metrics(storage.join(search_dir, "runs", trial.trial_id), cfg)
        frame = frames.get(trial.trial_id)
        if frame is not None and "epoch" in getattr(frame, "columns", ()):
            for rec in frame.to_dict("records"):
                if _finite(rec.get("epoch")):  # a resumed trial repeats epochs: keep the last
                    history[int(rec["epoch"])] = {**history.get(int(rec["epoch"]), {}), **rec}
        _fill_checkpoints(history, storage.join(search_dir, "runs", trial.trial_id), cfg)
        error = ""
        if trial.status == "ERROR":
            try:
                err = trial.get_error()
                error = str(err).strip().splitlines()[-1] if err else "failed"
            except Exception:
                error = "failed"
        rows.append(
            TrialRow(
                trial.trial_id, trial.status, params, [history[e] for e in sorted(history)], error
            )
        )
    return rows


def _fill_checkpoints(history: dict[int, dict], run_dir: str, cfg: Config) -> None:
    """Epochs without a checkpoint path in Tune's records (a trial whose Tune results were lost
    to an interrupt) get the path from the Train run's own checkpoint list, where it still is."""
    if all(isinstance(r.get("checkpoint_path"), str) for r in history.values()):
        return
    uri = storage.join(run_dir, "checkpoint_manager_snapshot.json")
    kw = {"endpoint_url": cfg.data.endpoint_url, "region": cfg.data.region}
    if not storage.exists(uri, **kw):
        return
    try:
        snapshot = json.loads(storage.read_bytes(uri, **kw))
    except ValueError:
        return
    for item in snapshot.get("checkpoint_results", []):
        epoch, name = (item.get("metrics") or {}).get("epoch"), item.get("checkpoint_dir_name")
        if not (_finite(epoch) and name and int(epoch) in history):
            continue
        row = history[int(epoch)]
        if not isinstance(row.get("checkpoint_path"), str):
            path = storage.join(run_dir, name)
            if storage.exists(storage.join(path, "model.keras"), **kw):
                row["checkpoint_path"] = path.removeprefix("s3://")


def _run_metrics(run_dir: str, cfg: Config) -> dict[int, dict]:
    uri = storage.join(run_dir, "metrics.jsonl")
    kw = {"endpoint_url": cfg.data.endpoint_url, "region": cfg.data.region}
    if not storage.exists(uri, **kw):
        return {}
    rows = [
        json.loads(line)
        for line in storage.read_bytes(uri, **kw).decode().splitlines()
        if line.strip()
    ]
    return {int(r["epoch"]): r for r in rows if _finite(r.get("epoch"))}


def ranked(rows: list[TrialRow], settings: SearchSettings) -> list[TrialRow]:
    """Trials with a result, best first."""
    scored = [r for r in rows if r.best(settings.metric, settings.mode)]
    sign = -1 if settings.mode == "max" else 1
    return sorted(
        scored, key=lambda r: sign * r.best(settings.metric, settings.mode)[settings.metric]
    )


def _finite(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def _true(v: Any) -> bool:
    return v is True or (hasattr(v, "item") and v.item() is True)
