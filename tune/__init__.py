"""Hyperparameter search for srtrain with Ray Tune: `python -m tune.search`.

A search job is a training job (srtrain/config.py) plus a `search:` section (tune/space.py); every
trial is a Ray Train run of the same training function (tune/search.py); the search directory gets
results.csv, summary.md, best.yaml and search.png (tune/report.py).
"""
