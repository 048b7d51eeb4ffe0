"""``write_report``: every report file of one evaluation, written into one folder."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from eqdiff.evaluation.report.differences import difference_table
from eqdiff.evaluation.report.grids import ImageLoader
from eqdiff.evaluation.report.plots import plot_fidelity_editability, plot_methods
from eqdiff.evaluation.report.render import grids_html, render_html, render_markdown
from eqdiff.evaluation.report.tables import (
    check_scores,
    class_table,
    failure_table,
    method_table,
    prompt_table,
    published_for,
    subject_table,
)

logger = logging.getLogger(__name__)


def write_report(scores: pd.DataFrame, out: str | Path, *,
                 failures: pd.DataFrame | None = None,
                 provenance: Mapping[str, Any] | None = None,
                 load_image: ImageLoader | None = None, title: str = "EqDiff evaluation",
                 thumb_px: int = 96, dataset_layout: str = "") -> list[Path]:
    """Write every report file into the folder ``out``; returns the paths written.

    ``results.parquet`` + ``results.csv`` (the tidy score table), ``subjects.csv``,
    ``summary.csv``, ``per_prompt.csv``, ``per_class.csv``, ``differences.csv`` (paired
    differences between methods with bootstrap intervals), ``summary.md``, ``report.html``
    and ``plots/methods.png`` + ``plots/fidelity_editability.png``. ``dataset_layout`` is the
    layout the run's dataset was loaded with: only DreamBench's gets the published numbers
    (:func:`~eqdiff.evaluation.report.tables.published_for`).
    """
    out = Path(out)
    (out / "plots").mkdir(parents=True, exist_ok=True)
    scores = check_scores(scores)
    subjects = subject_table(scores, failures)
    methods = method_table(subjects)
    prompts = prompt_table(scores)
    classes = class_table(subjects)
    problems = failure_table(subjects, failures)
    differences = difference_table(scores)
    published, note = published_for(dataset_layout)
    provenance = dict(provenance or {})
    plots = {"methods": plot_methods(methods, out / "plots" / "methods.png"),
             "fidelity_editability": plot_fidelity_editability(
                 methods, subjects, out / "plots" / "fidelity_editability.png")}
    files = {"results.parquet": None, "results.csv": None, "subjects.csv": subjects,
             "summary.csv": methods, "per_prompt.csv": prompts, "per_class.csv": classes,
             "differences.csv": differences}
    scores.to_parquet(out / "results.parquet", index=False)
    scores.to_csv(out / "results.csv", index=False)
    for name, frame in files.items():
        if frame is not None:
            frame.to_csv(out / name, index=False)
    (out / "summary.md").write_text(render_markdown(
        title=title, methods=methods, classes=classes, failures=problems,
        differences=differences, published=published, published_note=note,
        provenance=provenance), "utf-8")
    (out / "report.html").write_text(render_html(
        title=title, methods=methods, subjects=subjects, prompts=prompts, classes=classes,
        failures=problems, differences=differences, published=published, published_note=note,
        provenance=provenance, plots=plots,
        grids=grids_html(scores, subjects, load_image, thumb_px=thumb_px)), "utf-8")
    written = [out / name for name in files] + [out / "summary.md", out / "report.html",
                                                out / "plots" / "methods.png",
                                                out / "plots" / "fidelity_editability.png"]
    logger.info("report written to %s (%d files)", out, len(written))
    return written
