"""What a search leaves for people: results.csv, summary.md, best.yaml and search.png.

Everything is read back from Tune's saved experiment state (`ExperimentAnalysis`), so the same
report comes out after a complete search, an interrupted one and a resumed one.

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
import json
import math
import numbers
from dataclasses import dataclass, field
from typing import Any

from srtrain import storage
from srtrain.config import Config, to_yaml
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
    text = summary_md(
        rows,
        settings,
        name=name,
        command=command,
        wall_seconds=wall_seconds,
        interrupted=interrupted,
        search_dir=search_dir,
        best_yaml=best_yaml,
        test=test,
    )
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
    against alpha."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    top = ranked(rows, settings)
    winner = top[0].trial_id if top else None
    ax = axes[0]
    bicubic = []
    for r in rows:
        xs = [h["epoch"] for h in r.history if _finite(h.get("val_psnr"))]
        ys = [h["val_psnr"] for h in r.history if _finite(h.get("val_psnr"))]
        bicubic += [h["bicubic_psnr"] for h in r.history if _finite(h.get("bicubic_psnr"))]
        if not xs:
            continue
        stopped = r.stopped_by(settings.max_epochs) == STOPPED_ASHA
        ax.plot(
            xs,
            ys,
            marker="o",
            ms=3,
            lw=2.5 if r.trial_id == winner else 1,
            ls="--" if stopped else "-",
            alpha=1 if r.trial_id == winner else 0.7,
            label=r.trial_id.split("_")[-1] + (" (best)" if r.trial_id == winner else ""),
        )
    if bicubic:
        ax.axhline(sum(bicubic) / len(bicubic), color="gray", ls=":", label="bicubic")
    ax.set(
        xlabel="epoch", ylabel="val PSNR (dB)", title="val PSNR per trial (dashed: stopped by ASHA)"
    )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=7, ncol=2)
    for ax, key, label in (
        (axes[1], "train.lr", "learning rate"),
        (axes[2], "loss.alpha", "perceptual weight alpha"),
    ):
        pts = [
            (
                _number(r.params.get(key)),
                r.best(settings.metric, settings.mode)[settings.metric],
                r.stopped_by(settings.max_epochs),
            )
            for r in top
        ]
        pts = [p for p in pts if p[0] is not None]
        if not pts:
            ax.text(
                0.5, 0.5, f"{key} not searched", ha="center", va="center", transform=ax.transAxes
            )
        for stop, marker in ((STOPPED_ASHA, "x"), ("", "o"), (STOPPED_PATIENCE, "s")):
            sel = [p for p in pts if p[2] == stop]
            if sel:
                ax.scatter(
                    [p[0] for p in sel],
                    [p[1] for p in sel],
                    marker=marker,
                    label=stop or "ran to the end",
                )
        positive = [p[0] for p in pts if p[0] > 0]
        if key == "train.lr" and positive:
            ax.set_xscale("log")
        elif positive:
            ax.set_xscale("symlog", linthresh=min(positive))
        ax.set(
            xlabel=label + (" (0: MAE only)" if key == "loss.alpha" else ""),
            ylabel=f"last-epoch {settings.metric}",
            title=f"last-epoch {settings.metric} vs {label}",
        )
        if pts:
            ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


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


def _finite(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def _true(v: Any) -> bool:
    return v is True or (hasattr(v, "item") and v.item() is True)


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
