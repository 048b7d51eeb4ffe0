"""The report's figures, drawn with matplotlib's object API (no pyplot, no GUI backend).

Each plot is saved as a PNG file under ``plots/`` and returned as base64, to be embedded in the
self-contained ``report.html``.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib
import pandas as pd
from matplotlib.figure import Figure

from eqdiff.evaluation.metrics import REAL_IMAGES
from eqdiff.evaluation.report.tables import METRIC_LABELS, METRICS


def _png(figure: Figure, path: Path) -> str:
    """Save ``figure`` to ``path`` and return it as base64 PNG."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    path.write_bytes(buffer.getvalue())
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _colors(methods: Sequence[str]) -> dict[str, Any]:
    palette = matplotlib.colormaps["tab10"]
    ours = [m for m in methods if m != REAL_IMAGES]
    colors: dict[str, Any] = {m: palette(i % 10) for i, m in enumerate(ours)}
    colors[REAL_IMAGES] = (0.55, 0.55, 0.55, 1.0)
    return colors


def plot_methods(methods: pd.DataFrame, path: Path) -> str:
    """Bars per method for each metric, ±1 s.d. over subjects; returns base64 PNG."""
    colors = _colors(list(methods["method"]))
    figure = Figure(figsize=(11, 3.4))
    axes = figure.subplots(1, 3)
    for ax, metric in zip(axes, METRICS, strict=True):
        shown = methods[methods[metric].notna()]
        ax.bar(range(len(shown)), shown[metric], yerr=shown[f"{metric}_sd"], capsize=3,
               color=[colors[m] for m in shown["method"]],
               hatch=["//" if m == REAL_IMAGES else "" for m in shown["method"]])
        ax.set_xticks(range(len(shown)), shown["method"], rotation=30, ha="right", fontsize=8)
        ax.set_title(METRIC_LABELS[metric])
        ax.grid(axis="y", alpha=0.3)
    figure.suptitle("Mean over subjects (error bars: ±1 s.d. over subjects)", fontsize=9)
    return _png(figure, path)


def plot_fidelity_editability(methods: pd.DataFrame, subjects: pd.DataFrame, path: Path) -> str:
    """DINO and CLIP-I (fidelity) against CLIP-T (editability): one large point per method,
    faint points per subject; the real-images bound as a dashed line. Returns base64 PNG."""
    colors = _colors(list(methods["method"]))
    figure = Figure(figsize=(11, 4.2))
    axes = figure.subplots(1, 2)
    for ax, metric in zip(axes, ("dino", "clip_i"), strict=True):
        for method in methods["method"]:
            color = colors[method]
            if method == REAL_IMAGES:
                bound = methods.loc[methods["method"] == method, metric].iloc[0]
                if pd.notna(bound):
                    ax.axhline(bound, color=color, linestyle="--", linewidth=1,
                               label=f"real images ({bound:.3f})")
                continue
            points = subjects[subjects["method"] == method]
            ax.scatter(points["clip_t"], points[metric], color=color, alpha=0.25, s=14,
                       linewidths=0)
            row = methods[methods["method"] == method].iloc[0]
            ax.scatter([row["clip_t"]], [row[metric]], color=color, s=90, edgecolors="black",
                       label=method, zorder=3)
        ax.set_xlabel("CLIP-T (editability)")
        ax.set_ylabel(f"{METRIC_LABELS[metric]} (fidelity)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    figure.suptitle("Fidelity vs editability: large points = method means, faint = subjects",
                    fontsize=9)
    return _png(figure, path)
