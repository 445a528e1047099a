"""What a search leaves for people: results.csv, summary.md, best.yaml and search.png.

Everything is read back from Tune's saved experiment state (`ExperimentAnalysis`, through
tune.trials), so the same report comes out after a complete search, an interrupted one and a
resumed one. search.png is drawn by srtrain.figures, beside the comparison figure.

Ranking rule (declared, as Tune's metric scope "last"): a trial scores its LAST epoch's
validation metric (with `train.ema_decay`, the averaged weights' score), not its best epoch's:
the maximum over many noisy epochs of many trials rewards luck on the validation crops. The best
trial's checkpoint that the ranking names is then evaluated once on the test split
(`data.test_split`), which no ranking, stopping or checkpoint choice reads, and reported beside
bicubic.
"""

from __future__ import annotations

import csv
import dataclasses
import io
from typing import Any

from srtrain import storage
from srtrain.config import Config, to_yaml
from tune import space
from tune.space import SearchSettings
from tune.trials import (
    RANK_SCOPE,
    STOPPED_ASHA,
    STOPPED_PATIENCE,
    TrialRow,
    _fill_checkpoints,
    _finite,
    collect,
    ranked,
)

# The trials' reading and ranking live in tune.trials; these names stay importable from here.
__all__ = ["RANK_SCOPE", "TrialRow", "_fill_checkpoints", "collect", "ranked", "write_outputs"]


def checkpoint_uri(row: dict, search_dir: str) -> str:
    path = row.get("checkpoint_path")
    if not isinstance(path, str) or not path:
        return ""
    return f"s3://{path}" if storage.is_s3(search_dir) and not path.startswith("s3://") else path


# --- outputs ------------------------------------------------------------------------------------


def write_outputs(
    cfg: Config,
    settings: SearchSettings,
    search_dir: str,
    *,
    name: str,
    command: str,
    wall_seconds: float,
) -> tuple[str, bool]:
    """Writes the four outputs into the search directory.

    Returns a few lines for the console, and whether trials are left to run (per Tune's saved
    state: an interrupted search leaves trials PENDING or RUNNING, or fewer than num_samples).
    """
    rows = collect(search_dir, settings, cfg)
    interrupted = len(rows) < settings.num_samples or any(
        r.status not in ("TERMINATED", "ERROR") for r in rows
    )
    best = ranked(rows, settings)
    test = test_scores(best[0], cfg, settings, search_dir) if best else {}
    kw = {"endpoint_url": cfg.data.endpoint_url, "region": cfg.data.region}
    storage.write_bytes(
        storage.join(search_dir, "results.csv"),
        results_csv(rows, settings, search_dir).encode(),
        **kw,
    )
    best_yaml = storage.join(search_dir, "best.yaml")
    if best:
        text = best_config_yaml(
            best[0], cfg, settings, name=name, search_dir=search_dir, path=best_yaml
        )
        storage.write_bytes(best_yaml, text.encode(), **kw)
    storage.write_bytes(storage.join(search_dir, "search.png"), figure(rows, settings), **kw)
    text = summary_md(rows, settings, name=name, command=command, wall_seconds=wall_seconds,
                      interrupted=interrupted, search_dir=search_dir, best_yaml=best_yaml,
                      test=test)  # fmt: skip
    storage.write_bytes(storage.join(search_dir, "summary.md"), text.encode(), **kw)
    return console_lines(rows, settings, wall_seconds, search_dir, test), interrupted


def test_scores(row: TrialRow, cfg: Config, settings: SearchSettings, search_dir: str) -> dict:
    """The ranked checkpoint of `row` on the test split, beside bicubic (seed protocol: RGB,
    center crops of data.val_patch_size, fixed-seed degradation); {"error": why} when it cannot
    be measured (no checkpoint, no test split in the data)."""
    b = row.best(settings.metric, settings.mode) or {}
    ckpt = checkpoint_uri(b, search_dir)
    if not ckpt:
        return {"error": "no checkpoint"}
    trial_cfg = space.trial_config(cfg, row.params, settings)
    split = trial_cfg.data.test_split
    try:
        from srtrain import compare
        from srtrain.upscale import load

        if compare.test_split(trial_cfg) != split:
            return {"error": f"{trial_cfg.data.source} has no split {split!r}"}
        run = compare.Run(row.trial_id, "", trial_cfg, {}, load(ckpt))
        table, _ = compare.evaluate([run], split, progress=False)
    except (ValueError, OSError, storage.StorageError) as e:
        return {"error": str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}
    t, bic = table[row.trial_id], table["bicubic"]
    crop = trial_cfg.data.val_patch_size or trial_cfg.data.patch_size
    return {
        "split": split,
        "images": t["images"],
        "psnr": t["psnr"],
        "ssim": t["ssim"],
        "bicubic_psnr": bic["psnr"],
        "bicubic_ssim": bic["ssim"],
        "protocol": f"seed (RGB, {crop} center crops)",
        "epoch": int(b["epoch"]),
    }


def test_line(test: dict) -> str:
    """One sentence on the best trial's test score (or why there is none)."""
    if not test:
        return ""
    if "error" in test:
        return f"Test split: not measured ({test['error']})."
    gain = test["psnr"] - test["bicubic_psnr"]
    return (
        f"Test split {test['split']!r} ({test['images']} images, {test['protocol']}), its epoch "
        f"{test['epoch']} checkpoint: PSNR {test['psnr']:.2f} dB ({gain:+.2f} dB vs bicubic "
        f"{test['bicubic_psnr']:.2f} dB), SSIM {test['ssim']:.3f} (bicubic "
        f"{test['bicubic_ssim']:.3f})."
    )


def results_csv(rows: list[TrialRow], settings: SearchSettings, search_dir: str) -> str:
    keys = list(settings.space)
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(
        [
            "rank",
            "trial_id",
            "status",
            *keys,
            "val_psnr",
            "val_ssim",
            "bicubic_psnr",
            "ranked_epoch",
            "epochs",
            "stopped_early",
            "stopped_by",
            "checkpoint",
        ]
    )
    order = {r.trial_id: i + 1 for i, r in enumerate(ranked(rows, settings))}
    for r in sorted(rows, key=lambda r: order.get(r.trial_id, len(rows) + 1)):
        b = r.best(settings.metric, settings.mode) or {}
        stopped = r.stopped_by(settings.max_epochs)
        writer.writerow(
            [
                order.get(r.trial_id, ""),
                r.trial_id,
                r.status,
                *[r.params.get(k, "") for k in keys],
                _num(b.get("val_psnr"), 3),
                _num(b.get("val_ssim"), 4),
                _num(b.get("bicubic_psnr"), 3),
                int(b["epoch"]) if b else "",
                r.epochs,
                stopped in (STOPPED_ASHA, STOPPED_PATIENCE),
                stopped or r.error,
                checkpoint_uri(b, search_dir),
            ]
        )
    return out.getvalue()


def budget(rows: list[TrialRow], settings: SearchSettings) -> dict[str, int]:
    stopped = [r.stopped_by(settings.max_epochs) for r in rows]
    spent = sum(r.epochs for r in rows)
    full = len(rows) * settings.max_epochs
    return {
        "trials": len(rows),
        "spent": spent,
        "full": full,
        "asha": stopped.count(STOPPED_ASHA),
        "patience": stopped.count(STOPPED_PATIENCE),
        "completed": stopped.count(""),
        "errors": stopped.count("error"),
        "unfinished": stopped.count("unfinished"),
    }


def summary_md(
    rows: list[TrialRow],
    settings: SearchSettings,
    *,
    name: str,
    command: str,
    wall_seconds: float,
    interrupted: bool,
    search_dir: str,
    best_yaml: str,
    test: dict | None = None,
) -> str:
    s, m = settings.scheduler, settings.metric
    b = budget(rows, settings)
    top = ranked(rows, settings)
    lines = [
        f"# Search {name}",
        "",
        f"`{command}`",
        "",
        f"{b['trials']} of {settings.num_samples} trials, {settings.algorithm} (seed "
        f"{settings.seed}) with ASHA on {m} ({settings.mode}): grace period {s.grace_period} "
        f"epoch(s), reduction factor {s.reduction_factor:g}, at most {settings.max_epochs} "
        f"epochs per trial. Trials rank by their last epoch's {m} (scope {RANK_SCOPE!r}), not "
        f"their best epoch's. Wall time {wall_seconds / 60:.1f} min"
        + (
            " (this session; the search was interrupted: continue it with --resume)."
            if interrupted
            else "."
        ),
        "",
        "## Budget",
        "",
        f"- Trial-epochs spent: **{b['spent']}** of {b['full']} had every trial run all "
        f"{settings.max_epochs} epochs ({_pct(b['full'] - b['spent'], b['full'])} saved).",
        f"- ASHA stopped **{b['asha']}** of {b['trials']} trials early; {b['completed']} ran to "
        f"the end, {b['patience']} stopped by their own early stopping, {b['errors']} failed, "
        f"{b['unfinished']} unfinished.",
        "",
        "## Top trials",
        "",
    ]
    if not top:
        lines += ["No trial reported a result yet.", ""]
        return "\n".join(lines)
    keys = list(settings.space)
    lines += [
        "| rank | trial | "
        + " | ".join(f"`{k}`" for k in keys)
        + " | val PSNR | val SSIM | bicubic PSNR | epochs | stopped |",
        "|" + " --- |" * (len(keys) + 7),
    ]
    for i, r in enumerate(top[:5], 1):
        best = r.best(m, settings.mode)
        lines.append(
            f"| {i} | {r.trial_id} | "
            + " | ".join(_fmt_param(r.params.get(k)) for k in keys)
            + f" | {_num(best.get('val_psnr'), 2)} | {_num(best.get('val_ssim'), 3)} | "
            f"{_num(best.get('bicubic_psnr'), 2)} | {r.epochs} | "
            f"{r.stopped_by(settings.max_epochs) or 'no'} |"
        )
    winner = top[0].best(m, settings.mode)
    gain = (winner.get("val_psnr") or 0) - (winner.get("bicubic_psnr") or 0)
    lines += [
        "",
        "## Best",
        "",
        f"Trial {top[0].trial_id}: val PSNR {_num(winner.get('val_psnr'), 2)} dB "
        f"({gain:+.2f} dB vs bicubic {_num(winner.get('bicubic_psnr'), 2)} dB), val SSIM "
        f"{_num(winner.get('val_ssim'), 3)}, at epoch {int(winner['epoch'])} of {top[0].epochs}.",
        test_line(test or {}),
        f"Checkpoint: `{checkpoint_uri(winner, search_dir) or 'none'}`.",
        f"Train it again as a job: `python -m srtrain.run --config {best_yaml}`.",
        "",
        "Figure: search.png (val PSNR per trial over epochs; the ranked PSNR against learning "
        "rate and alpha). Every trial: results.csv.",
        "",
    ]
    return "\n".join(lines)


def best_config_yaml(
    row: TrialRow, cfg: Config, settings: SearchSettings, *, name: str, search_dir: str, path: str
) -> str:
    """The best trial's complete training job, with the base job's storage and no run name."""
    trial_cfg = space.trial_config(cfg, row.params, settings)
    trial_cfg = dataclasses.replace(
        trial_cfg, run=dataclasses.replace(trial_cfg.run, storage=cfg.run.storage, name="")
    )
    b = row.best(settings.metric, settings.mode)
    header = [
        f"# python -m srtrain.run --config {path}",
        f"# The best trial ({row.trial_id}) of search {name}: val PSNR "
        f"{_num(b.get('val_psnr'), 2)} dB (bicubic {_num(b.get('bicubic_psnr'), 2)}), val SSIM "
        f"{_num(b.get('val_ssim'), 3)} at epoch {int(b['epoch'])}.",
        f"# Its checkpoint: {checkpoint_uri(b, search_dir) or 'none'}",
        "# Sampled: " + ", ".join(f"{k}={_fmt_param(v)}" for k, v in row.params.items()),
    ]
    return "\n".join(header) + "\n" + to_yaml(trial_cfg)


def figure(rows: list[TrialRow], settings: SearchSettings) -> bytes:
    """search.png: val PSNR over epochs per trial; the ranked (last-epoch) score against lr and
    against alpha (drawn by srtrain.figures)."""
    from srtrain import figures

    top = ranked(rows, settings)
    winner = top[0].trial_id if top else None
    curves, bicubic = [], []
    for r in rows:
        hist = [h for h in r.history if _finite(h.get("val_psnr"))]
        bicubic += [h["bicubic_psnr"] for h in r.history if _finite(h.get("bicubic_psnr"))]
        if hist:
            curves.append(
                figures.Curve(
                    r.trial_id.split("_")[-1],
                    [h["epoch"] for h in hist],
                    [h["val_psnr"] for h in hist],
                    winner=r.trial_id == winner,
                    dashed=r.stopped_by(settings.max_epochs) == STOPPED_ASHA,
                )
            )
    scatters = []
    for key, label in (("train.lr", "learning rate"), ("loss.alpha", "perceptual weight alpha")):
        pts = [
            (
                _number(r.params.get(key)),
                r.best(settings.metric, settings.mode)[settings.metric],
                r.stopped_by(settings.max_epochs),
            )
            for r in top
        ]
        scatters.append(figures.Scatter(key, label, [p for p in pts if p[0] is not None]))
    markers = {STOPPED_ASHA: "x", "": "o", STOPPED_PATIENCE: "s"}
    mean_bicubic = sum(bicubic) / len(bicubic) if bicubic else None
    return figures.search(curves, mean_bicubic, scatters, settings.metric, markers)


def console_lines(
    rows: list[TrialRow],
    settings: SearchSettings,
    wall_seconds: float,
    search_dir: str,
    test: dict | None = None,
) -> str:
    b = budget(rows, settings)
    top = ranked(rows, settings)
    lines = [
        f"done: {b['trials']} trials in {wall_seconds / 60:.1f} min; trial-epochs "
        f"{b['spent']} of {b['full']} ({_pct(b['full'] - b['spent'], b['full'])} saved); "
        f"ASHA stopped {b['asha']} early"
    ]
    if top:
        w = top[0].best(settings.metric, settings.mode)
        lines.append(
            f"best {top[0].trial_id}: val_psnr {_num(w.get('val_psnr'), 2)} dB vs "
            f"bicubic {_num(w.get('bicubic_psnr'), 2)} dB, val_ssim "
            f"{_num(w.get('val_ssim'), 3)}; "
            + ", ".join(f"{k}={_fmt_param(v)}" for k, v in top[0].params.items())
        )
        if test:
            lines.append(test_line(test))
    lines.append(
        f"outputs: {storage.join(search_dir, 'summary.md')}, results.csv, best.yaml, search.png"
    )
    return "\n".join(lines)


# --- formatting ---------------------------------------------------------------------------------


def _number(v: Any) -> float | None:
    return float(v) if _finite(v) else None


def _num(v: Any, digits: int) -> str:
    return f"{v:.{digits}f}" if _finite(v) else ""


def _pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:.0f}%" if whole else "0%"


def _fmt_param(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)
