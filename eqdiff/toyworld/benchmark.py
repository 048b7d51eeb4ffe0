"""Reading the toy benchmark: scores by method and by what the prompt changed.

The toy benchmark is the normal dataset run (``customize_dataset`` on the ``toyworld`` dataset
with the ``toy`` base model), repeated with several seeds. Its prompts either move the subject
to a new context or render it in a new style (:func:`eqdiff.toyworld.dataset.prompt_change`),
so the tables here split every metric by that, and give the spread over seeds: the standard
deviation of the per-seed means.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from eqdiff.toyworld.dataset import prompt_change  # noqa: E402

METRICS = ("dino", "clip_i", "clip_t")
METHOD_ORDER = ("eqdiff", "eqdiff-no-fdte", "eqdiff-no-mgdp", "eqdiff-no-rra",
                "custom-diffusion", "textual-inversion")


def with_change(scores: pd.DataFrame) -> pd.DataFrame:
    """``scores`` with a ``change`` column: ``context`` or ``style`` (``same`` otherwise)."""
    frame = scores.copy()
    frame["change"] = [prompt_change(p)[0] for p in frame["prompt"]]
    return frame


def summarise(scores: pd.DataFrame, *, seed_column: str = "bench_seed") -> pd.DataFrame:
    """Mean and spread over seeds per method × change × metric.

    ``scores`` holds the score rows of every seed's run, with the seed in ``seed_column``.
    Returns one row per (method, change) — ``change`` includes ``all`` — with ``<metric>`` (the
    mean of the per-seed means), ``<metric>_sd`` (their standard deviation; 0 for one seed),
    ``seeds`` and ``images``.
    """
    frame = with_change(scores)
    frame = pd.concat([frame, frame.assign(change="all")], ignore_index=True)
    per_seed = (frame.groupby(["method", "change", seed_column])[list(METRICS)].mean()
                .reset_index())
    grouped = per_seed.groupby(["method", "change"])
    table = grouped[list(METRICS)].mean()
    spread = grouped[list(METRICS)].std(ddof=1).fillna(0.0).add_suffix("_sd")
    table = table.join(spread)
    table["seeds"] = grouped[seed_column].nunique()
    table["images"] = frame.groupby(["method", "change"]).size()
    table = table.reset_index()
    order = {m: i for i, m in enumerate(METHOD_ORDER)}
    table["_order"] = table["method"].map(lambda m: order.get(m, len(order)))
    return (table.sort_values(["change", "_order", "method"]).drop(columns="_order")
            .reset_index(drop=True))


def markdown_table(summary: pd.DataFrame) -> str:
    """One markdown table per change kind: methods as rows, ``mean ± sd`` per metric."""
    parts = []
    for change in ("all", "context", "style"):
        rows = summary[summary["change"] == change]
        if rows.empty:
            continue
        parts.append(f"**{change} prompts**\n")
        parts.append("| method | DINO | CLIP-I | CLIP-T | seeds | images |")
        parts.append("|---|---|---|---|---|---|")
        for _, row in rows.iterrows():
            cells = [f"{row[m]:.3f} ± {row[m + '_sd']:.3f}" for m in METRICS]
            parts.append(f"| {row['method']} | " + " | ".join(cells)
                         + f" | {row['seeds']} | {row['images']} |")
        parts.append("")
    return "\n".join(parts)


def plot_summary(summary: pd.DataFrame, path: str | Path) -> Path:
    """Per metric, bars of each method for context and style prompts (error bars: seed sd)."""
    rows = summary[summary["change"].isin(["context", "style"])]
    methods = [m for m in METHOD_ORDER if m in set(rows["method"])]
    methods += sorted(set(rows["method"]) - set(methods))
    figure, axes = plt.subplots(1, len(METRICS), figsize=(4.2 * len(METRICS), 3.4))
    width = 0.38
    for axis, metric in zip(axes, METRICS, strict=True):
        for offset, change in ((-width / 2, "context"), (width / 2, "style")):
            part = rows[rows["change"] == change].set_index("method").reindex(methods)
            axis.bar([i + offset for i in range(len(methods))], part[metric], width,
                     yerr=part[metric + "_sd"], capsize=2, label=f"{change} prompts")
        axis.set_xticks(range(len(methods)), methods, rotation=35, ha="right", fontsize=8)
        axis.set_title({"dino": "DINO-style", "clip_i": "CLIP-I", "clip_t": "CLIP-T"}[metric])
        axis.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return Path(path)
