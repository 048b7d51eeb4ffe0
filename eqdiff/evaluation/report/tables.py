"""The protocol's tables (docs/evaluation.md), pure pandas.

Input is the tidy score table of :mod:`eqdiff.evaluation.metrics` (one row per image, columns
:data:`~eqdiff.evaluation.metrics.SCORE_COLUMNS`) and the recorded failures (``subject, method,
reason``):

- :func:`subject_table` — per (method, subject), the mean over its images, which is the mean over
  all (generated, real) pairs; a subject with any unscored image gets NaN, never a partial mean;
- :func:`method_table` — per method, the mean over subjects, with how many subjects it covers;
- :func:`prompt_table` and :func:`class_table` — the per-prompt and per-class breakdowns;
- :func:`failure_table` — every (subject, method) left out of the means, with its reason;
- :func:`load_published` — the published DreamBench numbers, shown apart from ours;
  :func:`published_for` — them, or why not, for a run's dataset (only DreamBench gets them).

The ``*_COLUMNS`` mappings name the columns each displayed table shows and their labels.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

import pandas as pd

from eqdiff.evaluation.metrics import REAL_IMAGES, SCORE_COLUMNS

DATASET_ROW = "(dataset)"  # the "method" of a failures row about the dataset, not a training
DREAMBENCH_LAYOUT = "dreambench"  # eqdiff.data.datasets.Dataset.layout of DreamBench's layout

METRICS = ("dino", "clip_i", "clip_t")
METRIC_LABELS = {"dino": "DINO", "clip_i": "CLIP-I", "clip_t": "CLIP-T"}
FAILURE_COLUMNS = ("subject", "method", "reason")
MISSING = "—"

SUMMARY_COLUMNS = {"method": "method", "subjects": "subjects scored", "n_images": "images",
                   "dino": "DINO", "clip_i": "CLIP-I", "clip_t": "CLIP-T"}
PUBLISHED_COLUMNS = {"method": "method", "dino": "DINO", "clip_i": "CLIP-I", "clip_t": "CLIP-T",
                     "source": "source"}
SUBJECT_COLUMNS = {"subject": "subject", "class": "class", "kind": "kind", "method": "method",
                   "n_images": "images", "dino": "DINO", "clip_i": "CLIP-I", "clip_t": "CLIP-T",
                   "reason": "reason if missing"}
PROMPT_COLUMNS = {"kind": "kind", "prompt_index": "#", "prompt": "prompt", "method": "method",
                  "n_subjects": "subjects", **METRIC_LABELS}
CLASS_COLUMNS = {"method": "method", "class": "class", "n_subjects": "subjects",
                 **METRIC_LABELS}


def format_value(value: Any) -> str:
    """A table value as shown: floats to 3 decimals, NaN as :data:`MISSING`."""
    if isinstance(value, float):
        return MISSING if pd.isna(value) else f"{value:.3f}"
    return str(value)


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
    failures = failures[failures["method"] != DATASET_ROW]  # about the data, not a method
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


def with_subject_counts(methods: pd.DataFrame) -> pd.DataFrame:
    """``methods`` with a ``subjects`` column reading "scored / all"."""
    return methods.assign(subjects=[f"{s} / {n}" for s, n in
                                    zip(methods["n_scored"], methods["n_subjects"], strict=True)])


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


def class_wide_table(classes: pd.DataFrame) -> pd.DataFrame:
    """:func:`class_table` with one row per class and one column per (metric, method), named
    like "DINO · method"."""
    pivot = classes.pivot_table(index="class", columns="method", values=list(METRICS),
                                sort=False)
    wide = pivot.reset_index()
    wide.columns = ["class"] + [f"{METRIC_LABELS[m]} · {method}" for m, method in pivot.columns]
    return wide


def failure_table(subjects: pd.DataFrame, failures: pd.DataFrame | None = None) -> pd.DataFrame:
    """Every (subject, method) whose scores are incomplete, with the reason, then the dataset's
    problems (``failures`` rows whose method is ``DATASET_ROW``)."""
    bad = subjects[~_scored(subjects)].loc[:, list(FAILURE_COLUMNS)]
    failures = check_failures(failures)
    dataset = failures[failures["method"] == DATASET_ROW]
    if dataset.empty:
        return bad.reset_index(drop=True)
    return pd.concat([bad, dataset], ignore_index=True)


def load_published() -> tuple[pd.DataFrame, str]:
    """The published DreamBench numbers (docs/evaluation.md) and the note that must go with
    them, from the package's ``published_dreambench.json``."""
    data = json.loads(resources.files("eqdiff.evaluation").joinpath("published_dreambench.json")
                      .read_text("utf-8"))
    table = pd.DataFrame(data["rows"]).astype({m: "float64" for m in METRICS})
    return table, data["note"]


def published_for(dataset_layout: str) -> tuple[pd.DataFrame | None, str]:
    """The published DreamBench numbers and their note when the run's dataset is DreamBench;
    otherwise ``None`` and a sentence saying why they are not shown.

    The rule: the run record says the dataset was loaded with DreamBench's layout
    (``dataset_layout`` is :data:`DREAMBENCH_LAYOUT`, i.e. it has DreamBench's
    ``prompts_and_classes.txt`` index, see :func:`eqdiff.data.datasets.load_dataset`). Plain
    datasets, the toy world among them, and run records that do not name the layout get none:
    the published numbers would not be comparable with their scores.
    """
    if dataset_layout == DREAMBENCH_LAYOUT:
        return load_published()
    why = (f"it was loaded with the {dataset_layout} layout" if dataset_layout
           else "the run record does not say it was loaded with DreamBench's layout")
    return None, ("Published DreamBench numbers are not shown: this run's dataset is not "
                  f"DreamBench ({why}), so they would not be comparable.")
