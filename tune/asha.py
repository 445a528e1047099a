"""ASHA whose rung records survive `tune.search --resume`.

Ray Tune does not save a scheduler's state with the experiment: `Tuner.restore` rebuilds it from
the copy pickled when the search started, so every score recorded at a rung is lost and a resumed
search compares its remaining trials only with each other (it prunes fewer trials than the same
search run without a break, and may prune none). `ResumableASHA` writes its rungs to one small
JSON object in the search directory after every decision (local or s3://, atomically) and reads
them back at its first call after a restart, so a resumed search judges each trial against every
score the search had recorded.

The object sits in a subdirectory (`scheduler/asha-rungs.json`): a resumed Tune copies every
`*.json` and `*.pkl` at the top of the search directory into its staging directory and uploads
them back at each experiment checkpoint, which would put the rungs as they were at the restart
over the newer ones.
"""

from __future__ import annotations

import json

from ray.tune.schedulers import ASHAScheduler

from srtrain import storage

STATE_FILE = "scheduler/asha-rungs.json"


class ResumableASHA(ASHAScheduler):
    """`ASHAScheduler` (one bracket) plus its rungs at `state_uri`. The rungs are `_Bracket._rungs`
    of Ray Tune: `[(milestone, {trial_id: signed score}), ...]`; nothing else needs saving (a
    restored trial is added again and keeps its id)."""

    def __init__(self, *, state_uri: str, endpoint_url: str = "", region: str = "", **kwargs):
        super().__init__(brackets=1, **kwargs)
        self._state = (state_uri, endpoint_url, region)
        self._loaded = False  # pickled False into tuner.pkl, so a restored copy loads once

    def _rungs(self) -> list:
        return self._brackets[0]._rungs

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        uri, endpoint_url, region = self._state
        if not storage.exists(uri, endpoint_url, region):
            return  # a new search: nothing recorded yet
        saved = json.loads(storage.read_bytes(uri, endpoint_url, region))
        by_milestone = {float(m): recorded for m, recorded in saved["rungs"]}
        for milestone, recorded in self._rungs():
            recorded.update(by_milestone.get(float(milestone), {}))

    def _save(self) -> None:
        uri, endpoint_url, region = self._state
        rungs = [[m, recorded] for m, recorded in self._rungs()]
        storage.write_bytes(uri, json.dumps({"rungs": rungs}).encode(), endpoint_url, region)

    def on_trial_add(self, tune_controller, trial) -> None:
        self._load()
        super().on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        self._load()
        action = super().on_trial_result(tune_controller, trial, result)
        self._save()
        return action

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        self._load()
        super().on_trial_complete(tune_controller, trial, result)
        self._save()
