"""The figures people read results from: compare.png (srtrain.compare: one test patch as LR,
bicubic, every model and HR side by side) and search.png (tune.report: val PSNR per trial over
epochs, the ranked score against the searched hyperparameters).

The callers gather the numbers; the functions here only draw them (matplotlib, Agg backend).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def side_by_side(panels: list[tuple[str, np.ndarray, np.ndarray | None]], path: Path) -> Path:
    """One row of images, each (title, (H, W, 3) in [0, 1], reference or None); a panel with a
    reference gets its seed-protocol PSNR against it in the title."""
    from srtrain import metrics

    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.8))
    for ax, (title, img, ref) in zip(np.atleast_1d(axes), panels, strict=True):
        ax.imshow(np.clip(img, 0, 1), interpolation="nearest")
        if ref is not None:
            p, _ = metrics.seed_metrics(img, ref)
            title = f"{title}\n{p:.2f} dB"  # noqa: PLW2901
        ax.set_title(title, fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


@dataclass
class Curve:
    """One trial's val PSNR over epochs."""

    label: str
    epochs: list[float]
    psnr: list[float]
    winner: bool = False
    dashed: bool = False  # stopped by ASHA


@dataclass
class Scatter:
    """The ranked score of each trial against one searched key: (value, score, marker label)."""

    key: str
    label: str
    points: list[tuple[float, float, str]]


def search(
    curves: list[Curve],
    bicubic: float | None,
    scatters: list[Scatter],
    metric: str,
    markers: dict[str, str],
) -> bytes:
    """search.png: val PSNR per trial over epochs (bicubic's mean as a line), then one panel per
    searched key with the ranked (last-epoch) score against its value, a marker per way the
    trial ended (`markers`: {stop label: marker}; the label "" means it ran to the end)."""
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()
    fig, axes = plt.subplots(1, 1 + len(scatters), figsize=(16, 4.6))
    ax = axes[0]
    for c in curves:
        ax.plot(
            c.epochs,
            c.psnr,
            marker="o",
            ms=3,
            lw=2.5 if c.winner else 1,
            ls="--" if c.dashed else "-",
            alpha=1 if c.winner else 0.7,
            label=c.label + (" (best)" if c.winner else ""),
        )
    if bicubic is not None:
        ax.axhline(bicubic, color="gray", ls=":", label="bicubic")
    ax.set(
        xlabel="epoch", ylabel="val PSNR (dB)", title="val PSNR per trial (dashed: stopped by ASHA)"
    )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=7, ncol=2)
    for ax, s in zip(axes[1:], scatters, strict=True):
        pts = s.points
        if not pts:
            ax.text(
                0.5, 0.5, f"{s.key} not searched", ha="center", va="center", transform=ax.transAxes
            )
        for stop, marker in markers.items():
            sel = [p for p in pts if p[2] == stop]
            if sel:
                ax.scatter(
                    [p[0] for p in sel],
                    [p[1] for p in sel],
                    marker=marker,
                    label=stop or "ran to the end",
                )
        positive = [p[0] for p in pts if p[0] > 0]
        if s.key == "train.lr" and positive:
            ax.set_xscale("log")
        elif positive:
            ax.set_xscale("symlog", linthresh=min(positive))
        ax.set(
            xlabel=s.label + (" (0: MAE only)" if s.key == "loss.alpha" else ""),
            ylabel=f"last-epoch {metric}",
            title=f"last-epoch {metric} vs {s.label}",
        )
        if pts:
            ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()
