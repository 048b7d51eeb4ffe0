"""The evaluation report: pandas tables in, files out.

Input is the tidy score table of :mod:`eqdiff.evaluation.metrics` (one row per image, columns
:data:`~eqdiff.evaluation.metrics.SCORE_COLUMNS`), the recorded failures (``subject, method,
reason``) and a
provenance mapping. The protocol's tables (EVALUATION.md) are built here:

- :func:`subject_table` — per (method, subject), the mean over its images, which is the mean over
  all (generated, real) pairs; a subject with any unscored image gets NaN, never a partial mean;
- :func:`method_table` — per method, the mean over subjects, with how many subjects it covers;
- :func:`prompt_table` and :func:`class_table` — the per-prompt and per-class breakdowns.

:func:`write_report` writes ``results.parquet`` + ``results.csv`` (the tidy table),
``summary.csv``, ``subjects.csv``, ``per_prompt.csv``, ``per_class.csv``, ``summary.md``,
``plots/*.png`` and a self-contained ``report.html`` (plots and thumbnails embedded as base64).
Images come through a ``load_image(key) -> bytes`` callable, so this module knows nothing about
where they are stored. Missing scores are shown as "—" with their reason, never dropped.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import matplotlib
import pandas as pd
from matplotlib.figure import Figure
from PIL import Image

from eqdiff.evaluation.metrics import REAL_IMAGES, SCORE_COLUMNS

logger = logging.getLogger(__name__)

METRICS = ("dino", "clip_i", "clip_t")
METRIC_LABELS = {"dino": "DINO", "clip_i": "CLIP-I", "clip_t": "CLIP-T"}
FAILURE_COLUMNS = ("subject", "method", "reason")
SECTION_IDS = ("summary", "published", "methods", "fidelity-editability", "per-class",
               "per-prompt", "subjects", "grids", "failures", "provenance")
MISSING = "—"
ImageLoader = Callable[[str], bytes]


# --------------------------------------------------------------------------- tables

def check_scores(scores: pd.DataFrame) -> pd.DataFrame:
    """``scores`` with exactly the score columns, in order; ``ValueError`` names missing ones."""
    missing = [c for c in SCORE_COLUMNS if c not in scores.columns]
    if missing:
        raise ValueError(f"score table lacks column(s) {missing}; expected {list(SCORE_COLUMNS)}")
    return scores.loc[:, list(SCORE_COLUMNS)].reset_index(drop=True)


def check_failures(failures: pd.DataFrame | None) -> pd.DataFrame:
    """The failures table (``subject, method, reason``); an empty one for ``None``."""
    if failures is None:
        return pd.DataFrame({c: pd.Series(dtype="str") for c in FAILURE_COLUMNS})
    missing = [c for c in FAILURE_COLUMNS if c not in failures.columns]
    if missing:
        raise ValueError(f"failure table lacks column(s) {missing}; expected "
                         f"{list(FAILURE_COLUMNS)}")
    return failures.loc[:, list(FAILURE_COLUMNS)].astype("str").reset_index(drop=True)


def method_order(scores: pd.DataFrame, failures: pd.DataFrame | None = None) -> list[str]:
    """Methods in display order: the real-images bound first, then by first appearance."""
    seen = list(dict.fromkeys(list(scores["method"]) + (
        list(failures["method"]) if failures is not None else [])))
    return [m for m in seen if m == REAL_IMAGES] + [m for m in seen if m != REAL_IMAGES]


def _expected_metrics(method: str) -> list[str]:
    return ["dino", "clip_i"] if method == REAL_IMAGES else list(METRICS)


def subject_table(scores: pd.DataFrame, failures: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per (method, subject): ``n_images``, the mean of each metric and a ``reason`` when missing.

    A subject whose images are not all scored gets NaN for that metric (no partial means); a
    failed (subject, method) without any rows appears with NaN scores and its recorded reason.
    """
    scores, failures = check_scores(scores), check_failures(failures)
    keys = ["method", "subject", "class", "kind"]
    grouped = scores.groupby(keys, sort=False, dropna=False)
    table = grouped[list(METRICS)].agg(lambda col: col.mean(skipna=False)).reset_index()
    table.insert(4, "n_images", grouped.size().to_numpy())
    reasons = {(f.subject, f.method): f.reason for f in failures.itertuples()}
    table["reason"] = [reasons.get((row.subject, row.method), "") for row in table.itertuples()]
    for i, row in table.iterrows():
        gaps = [m for m in _expected_metrics(row["method"]) if pd.isna(row[m])]
        if gaps and not row["reason"]:
            rows = scores[(scores["method"] == row["method"])
                          & (scores["subject"] == row["subject"])]
            unscored = int(rows[gaps].isna().any(axis=1).sum())
            table.loc[i, "reason"] = (f"{unscored} of {len(rows)} image(s) have no "
                                      f"{'/'.join(METRIC_LABELS[g] for g in gaps)} score")
    known = set(zip(table["subject"], table["method"], strict=True))
    classes = scores.drop_duplicates("subject").set_index("subject")[["class", "kind"]]
    extra = [{"method": f.method, "subject": f.subject,
              "class": classes["class"].get(f.subject, ""),
              "kind": classes["kind"].get(f.subject, ""), "n_images": 0,
              **dict.fromkeys(METRICS, float("nan")), "reason": f.reason}
             for f in failures.itertuples() if (f.subject, f.method) not in known]
    if extra:
        table = pd.concat([table, pd.DataFrame(extra)], ignore_index=True)
    order = {m: i for i, m in enumerate(method_order(scores, failures))}
    return (table.assign(_order=table["method"].map(order))
            .sort_values(["_order", "subject"], kind="stable")
            .drop(columns="_order").reset_index(drop=True))


def _scored(subjects: pd.DataFrame) -> pd.Series:
    """True where a subject row has every metric its method should have."""
    return pd.Series([not any(pd.isna(row[m]) for m in _expected_metrics(row["method"]))
                      for _, row in subjects.iterrows()], index=subjects.index, dtype=bool)


def method_table(subjects: pd.DataFrame) -> pd.DataFrame:
    """Per method: the mean over fully scored subjects, their standard deviation over subjects,
    ``n_subjects`` (all, failed included) and ``n_scored``."""
    subjects = subjects.assign(_scored=_scored(subjects))
    rows = []
    for method, group in subjects.groupby("method", sort=False):
        good = group[group["_scored"]]
        row: dict[str, Any] = {"method": method, "n_subjects": len(group),
                               "n_scored": len(good), "n_images": int(good["n_images"].sum())}
        for metric in METRICS:
            row[metric] = good[metric].mean() if len(good) else float("nan")
            row[f"{metric}_sd"] = good[metric].std(ddof=0) if len(good) else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)


def _template(prompt: str, class_noun: str) -> str:
    return prompt.replace(class_noun, "{class}") if class_noun else prompt


def prompt_table(scores: pd.DataFrame) -> pd.DataFrame:
    """Per (method, kind, prompt_index): the mean over subjects of each subject's mean for that
    prompt; ``prompt`` shows the template with the class noun as ``{class}``."""
    scores = check_scores(scores)
    scores = scores[scores["method"] != REAL_IMAGES]
    per_subject = (scores.assign(template=[_template(p, c) for p, c in
                                           zip(scores["prompt"], scores["class"], strict=True)])
                   .groupby(["method", "kind", "prompt_index", "subject"], sort=False)
                   .agg(prompt=("template", "first"),
                        **{m: (m, lambda col: col.mean(skipna=False)) for m in METRICS})
                   .reset_index())
    table = (per_subject.groupby(["method", "kind", "prompt_index"], sort=False)
             .agg(prompt=("prompt", "first"), n_subjects=("subject", "nunique"),
                  **{m: (m, "mean") for m in METRICS}).reset_index())
    return table.sort_values(["kind", "prompt_index"], kind="stable").reset_index(drop=True)


def class_table(subjects: pd.DataFrame) -> pd.DataFrame:
    """Per (method, class): the mean over that class's fully scored subjects."""
    good = subjects[_scored(subjects)]
    return (good.groupby(["method", "class"], sort=False)
            .agg(n_subjects=("subject", "nunique"), **{m: (m, "mean") for m in METRICS})
            .reset_index())


def failure_table(subjects: pd.DataFrame) -> pd.DataFrame:
    """Every (subject, method) whose scores are incomplete, with the reason."""
    bad = subjects[~_scored(subjects)]
    return bad.loc[:, list(FAILURE_COLUMNS)].reset_index(drop=True)


def load_published() -> tuple[pd.DataFrame, str]:
    """The published DreamBench numbers (EVALUATION.md) and the note that must go with them."""
    data = json.loads(resources.files("eqdiff.evaluation").joinpath("published_dreambench.json")
                      .read_text("utf-8"))
    table = pd.DataFrame(data["rows"]).astype({m: "float64" for m in METRICS})
    return table, data["note"]


# --------------------------------------------------------------------------- formatting

def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return MISSING if pd.isna(value) else f"{value:.3f}"
    return str(value)


def _esc(value: Any) -> str:
    return html.escape(_fmt(value))


def _html_table(frame: pd.DataFrame, columns: Mapping[str, str], *, css: str = "",
                best: Sequence[str] = (), reason_column: str = "") -> str:
    """An HTML table of ``frame``; ``best`` columns get their maximum (over our methods) in
    bold; NaN shows as "—" with the row's reason as a tooltip."""
    ours = frame[frame["method"] != REAL_IMAGES] if "method" in frame.columns else frame
    maxima = {c: ours[c].max() for c in best if len(ours)}
    head = "".join(f"<th>{html.escape(label)}</th>" for label in columns.values())
    body = []
    for _, row in frame.iterrows():
        cells = []
        reason = str(row.get(reason_column, "")) if reason_column else ""
        for column in columns:
            value = row[column]
            if column == "clip_t" and row.get("method") == REAL_IMAGES:
                cells.append('<td class="na" title="no prompt: real images have no CLIP-T">'
                             "n/a</td>")
            elif isinstance(value, float) and pd.isna(value):
                tip = f' title="{html.escape(reason)}"' if reason else ""
                cells.append(f'<td class="missing"{tip}>{MISSING}</td>')
            elif column in maxima and value == maxima[column] and row.get("method") != REAL_IMAGES:
                cells.append(f'<td class="num best">{_esc(value)}</td>')
            else:
                cls = ' class="num"' if isinstance(value, float) else ""
                cells.append(f"<td{cls}>{_esc(value)}</td>")
        row_css = ' class="bound"' if row.get("method") == REAL_IMAGES else ""
        body.append(f"<tr{row_css}>{''.join(cells)}</tr>")
    return (f'<table class="{css}"><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table>")


def _markdown(frame: pd.DataFrame, columns: Mapping[str, str]) -> str:
    shown = frame.loc[:, list(columns)].rename(columns=dict(columns))
    shown = shown.astype("object").map(_fmt)
    return shown.to_markdown(index=False, disable_numparse=True)


SUMMARY_COLUMNS = {"method": "method", "subjects": "subjects scored", "n_images": "images",
                   "dino": "DINO", "clip_i": "CLIP-I", "clip_t": "CLIP-T"}
PUBLISHED_COLUMNS = {"method": "method", "dino": "DINO", "clip_i": "CLIP-I", "clip_t": "CLIP-T",
                     "source": "source"}


def _with_subject_counts(methods: pd.DataFrame) -> pd.DataFrame:
    """``methods`` with a ``subjects`` column reading "scored / all"."""
    return methods.assign(subjects=[f"{s} / {n}" for s, n in
                                    zip(methods["n_scored"], methods["n_subjects"], strict=True)])


SUBJECT_COLUMNS = {"subject": "subject", "class": "class", "kind": "kind", "method": "method",
                   "n_images": "images", "dino": "DINO", "clip_i": "CLIP-I", "clip_t": "CLIP-T",
                   "reason": "reason if missing"}


# --------------------------------------------------------------------------- plots

def _png(figure: Figure, path: Path) -> str:
    """Save ``figure`` to ``path`` and return it as base64 PNG (no pyplot, no GUI backend)."""
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


# --------------------------------------------------------------------------- grids

def _thumbnail(load_image: ImageLoader, key: str, size: int) -> str:
    """A base64 JPEG thumbnail, or "" when the image cannot be loaded (logged)."""
    try:
        with Image.open(io.BytesIO(load_image(key))) as image:
            thumb = image.convert("RGB")
            thumb.thumbnail((size, size), Image.Resampling.BICUBIC)
    except Exception as error:  # any loader or decoder failure becomes a visible empty cell
        logger.warning("report: cannot show image %s: %s", key, error)
        return ""
    buffer = io.BytesIO()
    thumb.save(buffer, format="JPEG", quality=80)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _cell(load_image: ImageLoader, key: str, tip: str, size: int) -> str:
    data = _thumbnail(load_image, key, size)
    if not data:
        return f'<td class="noimg" title="{html.escape(key)}">image missing</td>'
    return (f'<td><img src="data:image/jpeg;base64,{data}" width="{size}" '
            f'alt="{html.escape(tip)}" title="{html.escape(tip)}"></td>')


def grids_html(scores: pd.DataFrame, subjects: pd.DataFrame, load_image: ImageLoader | None, *,
               thumb_px: int = 96) -> str:
    """Per subject, its real images, then a methods × prompts grid of thumbnails (the lowest
    seed of each prompt); failed methods show their reason."""
    if load_image is None:
        return "<p>No image loader was given: grids omitted.</p>"
    parts = []
    for subject in subjects["subject"].drop_duplicates():
        rows = scores[scores["subject"] == subject]
        generated = rows[rows["method"] != REAL_IMAGES]
        prompts = (generated.sort_values("prompt_index").drop_duplicates("prompt_index")
                   .loc[:, ["prompt_index", "prompt"]])
        head = "".join(f'<th class="prompt" title="{html.escape(p)}">{i}. {html.escape(p)}</th>'
                       for i, p in zip(prompts["prompt_index"], prompts["prompt"], strict=True))
        lines = []
        real = rows[rows["method"] == REAL_IMAGES]
        strip = "".join(f"<table><tr>{_cell(load_image, k, 'real image', thumb_px)}</tr></table>"
                        for k in real["image_key"])
        references = (f'<div class="refs"><span>real images</span>{strip}</div>' if len(real)
                      else "")
        for _, info in subjects[(subjects["subject"] == subject)
                                & (subjects["method"] != REAL_IMAGES)].iterrows():
            method = info["method"]
            mine = generated[generated["method"] == method]
            if mine.empty:
                lines.append(f'<tr><th>{html.escape(method)}</th><td class="missing" colspan='
                             f'"{max(len(prompts), 1)}">{MISSING} {html.escape(info["reason"])}'
                             "</td></tr>")
                continue
            cells = []
            for index in prompts["prompt_index"]:
                chosen = mine[mine["prompt_index"] == index].sort_values("seed").head(1)
                if chosen.empty:
                    cells.append('<td class="noimg">not generated</td>')
                    continue
                pick = chosen.iloc[0]
                tip = (f"{method} | {pick['prompt']} | seed {pick['seed']} | "
                       f"DINO {_fmt(pick['dino'])} CLIP-I {_fmt(pick['clip_i'])} "
                       f"CLIP-T {_fmt(pick['clip_t'])}")
                cells.append(_cell(load_image, pick["image_key"], tip, thumb_px))
            lines.append(f"<tr><th>{html.escape(method)}</th>{''.join(cells)}</tr>")
        info = subjects[subjects["subject"] == subject].iloc[0]
        parts.append(f'<h3 id="grid-{html.escape(subject)}">{html.escape(subject)} '
                     f'<small>({html.escape(info["class"])}, {html.escape(info["kind"])})'
                     f'</small></h3>{references}<div class="scroll"><table class="grid">'
                     f"<thead><tr><th></th>{head}</tr></thead><tbody>{''.join(lines)}</tbody></table></div>")
    return "".join(parts)


# --------------------------------------------------------------------------- documents

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;
color:#1d1d1f;max-width:1400px}
h1{margin:0 0 4px;font-size:26px}h2{border-bottom:1px solid #ddd;padding-bottom:4px;
margin-top:32px}
.lede{color:#444;margin:4px 0 16px}
.alert{background:#fff3cd;border:1px solid #e0c36a;padding:8px 12px;border-radius:6px;
margin:12px 0}
.ok{background:#e8f5e9;border:1px solid #9ccc9c;padding:8px 12px;border-radius:6px;margin:12px 0}
.side{display:flex;gap:28px;flex-wrap:wrap;align-items:flex-start}
.side>section{flex:1 1 460px;min-width:420px}
table{border-collapse:collapse;font-size:13px;margin:6px 0}
th,td{border:1px solid #ddd;padding:4px 8px;text-align:left}
thead th{background:#f4f4f6}
td.num{text-align:right;font-variant-numeric:tabular-nums}
td.best{font-weight:700}
td.missing{color:#b00020;text-align:center;background:#fdecee}
td.na{color:#999;text-align:center}
tr.bound td,tr.bound th{color:#666;font-style:italic}
table.published{color:#555;background:#fafafa}
table.published caption,.note{font-size:12px;color:#8a5a00;text-align:left}
.label{display:inline-block;font-size:11px;font-weight:700;padding:1px 6px;border-radius:4px;
vertical-align:middle}
.label.ours{background:#1f77b4;color:white}.label.theirs{background:#999;color:white}
img{display:block}
.scroll{overflow-x:auto;border:1px solid #eee}
table.grid td,table.grid th{padding:2px;vertical-align:top}
table.grid th.prompt{font-size:10px;font-weight:400;width:96px;max-width:96px;min-width:96px}
.refs{display:flex;gap:4px;align-items:center;margin:4px 0}
.refs span{font-style:italic;color:#666;font-size:13px;width:120px}
.refs table{margin:0}
td.noimg{font-size:10px;color:#999;width:96px;text-align:center}
dl.prov{display:grid;grid-template-columns:max-content auto;gap:4px 16px;font-size:13px}
dl.prov dt{font-weight:600}dl.prov dd{margin:0}
pre{background:#f6f8fa;padding:8px;font-size:12px;overflow-x:auto}
"""


def _provenance_html(provenance: Mapping[str, Any]) -> str:
    items = []
    for key, value in provenance.items():
        if isinstance(value, (dict, list)):
            shown = f"<pre>{html.escape(json.dumps(value, indent=2, sort_keys=True))}</pre>"
        else:
            shown = html.escape(str(value))
        items.append(f"<dt>{html.escape(str(key))}</dt><dd>{shown}</dd>")
    return f'<dl class="prov">{"".join(items)}</dl>'


def _headline(methods: pd.DataFrame, failures: pd.DataFrame) -> str:
    ours = methods[methods["method"] != REAL_IMAGES]
    subjects = int(ours["n_subjects"].max()) if len(ours) else 0
    text = (f"{len(ours)} method(s) on {subjects} subject(s), "
            f"{int(ours['n_images'].sum()) if len(ours) else 0} scored images. "
            "Per subject: mean over all (generated, real) pairs; then mean over subjects.")
    if len(failures):
        alert = (f'<div class="alert"><b>{len(failures)} (subject, method) pair(s) have no or '
                 'incomplete scores</b> and are left out of the means: see '
                 '<a href="#failures">Failures</a>.</div>')
    else:
        alert = '<div class="ok">Every (subject, method) pair was scored.</div>'
    return f'<p class="lede">{html.escape(text)}</p>{alert}'


def render_html(*, title: str, methods: pd.DataFrame, subjects: pd.DataFrame,
                prompts: pd.DataFrame, classes: pd.DataFrame, failures: pd.DataFrame,
                published: pd.DataFrame, published_note: str, provenance: Mapping[str, Any],
                plots: Mapping[str, str], grids: str) -> str:
    """The self-contained HTML document (sections with the ids in :data:`SECTION_IDS`)."""
    metric_cols = {m: METRIC_LABELS[m] for m in METRICS}
    class_pivot = classes.pivot_table(index="class", columns="method", values=list(METRICS),
                                      sort=False)
    class_rows = class_pivot.reset_index()
    class_rows.columns = ["class"] + [f"{METRIC_LABELS[m]} · {meth}"
                                      for m, meth in class_pivot.columns]
    prompt_cols = {"kind": "kind", "prompt_index": "#", "prompt": "prompt", "method": "method",
                   "n_subjects": "subjects", **metric_cols}
    failures_html = (_html_table(failures, {c: c for c in FAILURE_COLUMNS}, css="failures")
                     if len(failures) else "<p>No failed subjects.</p>")
    sections = [
        '<div class="side">',
        '<section id="summary"><h2>Results <span class="label ours">this run</span></h2>',
        _html_table(_with_subject_counts(methods), SUMMARY_COLUMNS, css="summary", best=METRICS),
        '<p class="note">Bold: best of our methods. "subjects scored" counts subjects with '
        'every score; failed ones are listed under Failures, never averaged as zeros.</p>'
        "</section>",
        '<section id="published"><h2>Published numbers <span class="label theirs">others\' '
        "runs</span></h2>",
        f'<p class="note">{html.escape(published_note)}</p>',
        _html_table(published, PUBLISHED_COLUMNS, css="published"),
        "</section></div>",
        '<section id="methods"><h2>Per-method scores</h2>',
        f'<img alt="per-method bars" src="data:image/png;base64,{plots["methods"]}"></section>',
        '<section id="fidelity-editability"><h2>Fidelity vs editability</h2>',
        f'<img alt="fidelity against editability" '
        f'src="data:image/png;base64,{plots["fidelity_editability"]}"></section>',
        '<section id="per-class"><h2>Per class</h2>',
        _html_table(class_rows, {c: c for c in class_rows.columns}, css="per-class"),
        "</section>",
        '<section id="per-prompt"><h2>Per prompt</h2><details><summary>'
        f"{len(prompts)} rows (mean over subjects)</summary>",
        _html_table(prompts, prompt_cols, css="per-prompt"), "</details></section>",
        '<section id="subjects"><h2>Per subject</h2>',
        _html_table(subjects, SUBJECT_COLUMNS, css="subjects", reason_column="reason"),
        "</section>",
        '<section id="grids"><h2>Image grids</h2><p class="note">Rows: methods; columns: '
        "prompts (lowest seed of each); hover for scores.</p>", grids, "</section>",
        '<section id="failures"><h2>Failures</h2>', failures_html, "</section>",
        '<section id="provenance"><h2>Provenance</h2>', _provenance_html(provenance),
        "</section>",
    ]
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
            f"<h1>{html.escape(title)}</h1>{_headline(methods, failures)}"
            f"{''.join(sections)}</body></html>")


def render_markdown(*, title: str, methods: pd.DataFrame, classes: pd.DataFrame,
                    failures: pd.DataFrame, published: pd.DataFrame, published_note: str,
                    provenance: Mapping[str, Any]) -> str:
    """``summary.md``: our table, the published one (labelled), per class, failures."""
    lines = [f"# {title}", "", "## Results (this run)", "",
             _markdown(_with_subject_counts(methods), SUMMARY_COLUMNS), "",
             "## Published numbers (others' runs)", "", f"> {published_note}", "",
             _markdown(published, PUBLISHED_COLUMNS), "", "## Per class", "",
             _markdown(classes, {"method": "method", "class": "class",
                                 "n_subjects": "subjects",
                                 **{m: METRIC_LABELS[m] for m in METRICS}}), "",
             "## Failures", ""]
    lines += ([_markdown(failures, {c: c for c in FAILURE_COLUMNS})] if len(failures)
              else ["None."])
    lines += ["", "## Provenance", ""]
    for key, value in provenance.items():
        shown = json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else value
        lines.append(f"- **{key}**: {shown}")
    return "\n".join(lines) + "\n"


def write_report(scores: pd.DataFrame, out: str | Path, *,
                 failures: pd.DataFrame | None = None,
                 provenance: Mapping[str, Any] | None = None,
                 load_image: ImageLoader | None = None, title: str = "EqDiff evaluation",
                 thumb_px: int = 96) -> list[Path]:
    """Write every report file into the folder ``out``; returns the paths written."""
    out = Path(out)
    (out / "plots").mkdir(parents=True, exist_ok=True)
    scores = check_scores(scores)
    subjects = subject_table(scores, failures)
    methods = method_table(subjects)
    prompts = prompt_table(scores)
    classes = class_table(subjects)
    problems = failure_table(subjects)
    published, note = load_published()
    provenance = dict(provenance or {})
    plots = {"methods": plot_methods(methods, out / "plots" / "methods.png"),
             "fidelity_editability": plot_fidelity_editability(
                 methods, subjects, out / "plots" / "fidelity_editability.png")}
    files = {"results.parquet": None, "results.csv": None, "subjects.csv": subjects,
             "summary.csv": methods, "per_prompt.csv": prompts, "per_class.csv": classes}
    scores.to_parquet(out / "results.parquet", index=False)
    scores.to_csv(out / "results.csv", index=False)
    for name, frame in files.items():
        if frame is not None:
            frame.to_csv(out / name, index=False)
    (out / "summary.md").write_text(render_markdown(
        title=title, methods=methods, classes=classes, failures=problems, published=published,
        published_note=note, provenance=provenance), "utf-8")
    (out / "report.html").write_text(render_html(
        title=title, methods=methods, subjects=subjects, prompts=prompts, classes=classes,
        failures=problems, published=published, published_note=note, provenance=provenance,
        plots=plots, grids=grids_html(scores, subjects, load_image, thumb_px=thumb_px)), "utf-8")
    written = [out / name for name in files] + [out / "summary.md", out / "report.html",
                                                out / "plots" / "methods.png",
                                                out / "plots" / "fidelity_editability.png"]
    logger.info("report written to %s (%d files)", out, len(written))
    return written
