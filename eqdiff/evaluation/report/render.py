"""Rendering: ``report.html`` through the Jinja2 templates in ``templates/``, ``summary.md``
through tabulate.

Tables go through pandas :class:`~pandas.io.formats.style.Styler`: values and headers are
HTML-escaped by the Styler, and its output is then marked safe (:class:`markupsafe.Markup`) for
the template, which escapes everything else it is given (autoescape is on for every template).
Missing scores show as "—" with their reason as a tooltip, never dropped; the real-images bound
has no CLIP-T ("n/a").
"""

from __future__ import annotations

import functools
import html
import json
from collections.abc import Mapping, Sequence
from typing import Any

import jinja2
import pandas as pd
from markupsafe import Markup

from eqdiff.evaluation.metrics import REAL_IMAGES
from eqdiff.evaluation.report.differences import (
    BOOTSTRAP_SEED,
    DIFFERENCE_SHOWN,
    RESAMPLES,
    shown_differences,
)
from eqdiff.evaluation.report.grids import ImageLoader, subject_grids
from eqdiff.evaluation.report.tables import (
    CLASS_COLUMNS,
    DATASET_ROW,
    FAILURE_COLUMNS,
    METRICS,
    MISSING,
    PROMPT_COLUMNS,
    PUBLISHED_COLUMNS,
    SUBJECT_COLUMNS,
    SUMMARY_COLUMNS,
    class_wide_table,
    format_value,
    with_subject_counts,
)

SECTION_IDS = ("summary", "published", "differences", "methods", "fidelity-editability",
               "per-class", "per-prompt", "subjects", "grids", "failures", "provenance")
NO_CLIP_T = "no prompt: real images have no CLIP-T"


@functools.cache
def _environment() -> jinja2.Environment:
    return jinja2.Environment(loader=jinja2.PackageLoader("eqdiff.evaluation.report"),
                              autoescape=True, undefined=jinja2.StrictUndefined,
                              trim_blocks=True, lstrip_blocks=True)


def html_table(frame: pd.DataFrame, columns: Mapping[str, str], *, css: str,
               best: Sequence[str] = (), reason_column: str = "") -> Markup:
    """``frame``'s ``columns`` (name → header) as an HTML table with class and id ``css``.

    Numbers are right-aligned (``num``); ``best`` columns get their maximum over our methods
    in bold (``best``); NaN shows as "—" (``missing``) with the row's ``reason_column`` as
    its tooltip; rows of the real-images bound are ``bound``.
    """
    frame = frame.reset_index(drop=True)
    bound = (frame["method"] == REAL_IMAGES if "method" in frame.columns
             else pd.Series(False, index=frame.index))
    reasons = (frame[reason_column].astype("str") if reason_column
               else pd.Series("", index=frame.index))
    shown = frame.loc[:, list(columns)].astype("object")
    classes = pd.DataFrame("", index=frame.index, columns=list(columns), dtype="object")
    titles = classes.copy()
    for column in columns:
        values = frame[column]
        missing = values.isna()
        numeric = pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values)
        cells = pd.Series("num" if numeric else "", index=frame.index, dtype="object")
        if column in best and (~bound).any():
            cells[(values == values[~bound].max()) & ~bound] += " best"
        cells[missing] = "missing"
        titles[column] = reasons.where(missing, "")
        no_prompt = bound & (column == "clip_t")
        cells[no_prompt] = "na"
        titles.loc[no_prompt, column] = NO_CLIP_T
        shown.loc[no_prompt, column] = "n/a"
        cells[bound] += " bound"
        classes[column] = cells.str.strip()
    for table in (shown, classes, titles):
        table.columns = list(columns.values())
    styler = (shown.style.set_uuid(css)
              .format(format_value, escape="html")
              .format_index(escape="html", axis=1)
              .hide(axis="index")
              .set_td_classes(classes)
              .set_tooltips(titles.map(html.escape), as_title_attribute=True)
              .set_table_attributes(f'class="{css}"'))
    return Markup(styler.to_html())


def grids_html(scores: pd.DataFrame, subjects: pd.DataFrame, load_image: ImageLoader | None, *,
               thumb_px: int = 96) -> Markup:
    """Per subject, its real images, then a methods × prompts grid of thumbnails (the lowest
    seed of each prompt); failed methods show their reason."""
    grids = (None if load_image is None
             else subject_grids(scores, subjects, load_image, thumb_px=thumb_px))
    return Markup(_environment().get_template("grids.html.j2").render(
        grids=grids, thumb_px=thumb_px, missing=MISSING))


def _lede(methods: pd.DataFrame) -> str:
    ours = methods[methods["method"] != REAL_IMAGES]
    subjects = int(ours["n_subjects"].max()) if len(ours) else 0
    images = int(ours["n_images"].sum()) if len(ours) else 0
    return (f"{len(ours)} method(s) on {subjects} subject(s), {images} scored images. "
            "Per subject: mean over all (generated, real) pairs; then mean over subjects.")


def _provenance(provenance: Mapping[str, Any]) -> list[tuple[str, str, bool]]:
    """(key, text, is_json) per entry; dicts and lists as indented JSON."""
    return [(str(key), json.dumps(value, indent=2, sort_keys=True), True)
            if isinstance(value, (dict, list)) else (str(key), str(value), False)
            for key, value in provenance.items()]


def render_html(*, title: str, methods: pd.DataFrame, subjects: pd.DataFrame,
                prompts: pd.DataFrame, classes: pd.DataFrame, failures: pd.DataFrame,
                differences: pd.DataFrame, published: pd.DataFrame | None,
                published_note: str, provenance: Mapping[str, Any], plots: Mapping[str, str],
                grids: str) -> str:
    """The self-contained HTML document (sections with the ids in :data:`SECTION_IDS`).

    ``differences`` is :func:`~eqdiff.evaluation.report.differences.difference_table`;
    ``published`` is ``None`` when the run's dataset gets no published numbers, and
    ``published_note`` then says why. ``plots`` holds base64 PNGs under ``methods`` and
    ``fidelity_editability``; ``grids`` is the HTML of :func:`grids_html`.
    """
    wide = class_wide_table(classes)
    tables = {
        "summary": html_table(with_subject_counts(methods), SUMMARY_COLUMNS, css="summary",
                              best=METRICS),
        "per_class": html_table(wide, {c: c for c in wide.columns}, css="per-class"),
        "per_prompt": html_table(prompts, PROMPT_COLUMNS, css="per-prompt"),
        "subjects": html_table(subjects, SUBJECT_COLUMNS, css="subjects",
                               reason_column="reason"),
        "failures": html_table(failures, {c: c for c in FAILURE_COLUMNS}, css="failures"),
    }
    if len(differences):
        tables["differences"] = html_table(shown_differences(differences), DIFFERENCE_SHOWN,
                                           css="differences", reason_column="why")
    if published is not None:
        tables["published"] = html_table(published, PUBLISHED_COLUMNS, css="published")
    return _environment().get_template("report.html.j2").render(
        title=title, lede=_lede(methods),
        n_failures=int((failures["method"] != DATASET_ROW).sum()),
        n_dataset_problems=int((failures["method"] == DATASET_ROW).sum()),
        n_prompts=len(prompts),
        tables=tables, published_note=published_note, readings=list(differences["reading"]),
        resamples=RESAMPLES, bootstrap_seed=BOOTSTRAP_SEED, plots=plots, grids=Markup(grids),
        provenance=_provenance(provenance))


def _markdown(frame: pd.DataFrame, columns: Mapping[str, str]) -> str:
    shown = frame.loc[:, list(columns)].rename(columns=dict(columns))
    shown = shown.astype("object").map(format_value)
    return shown.to_markdown(index=False, disable_numparse=True)


def render_markdown(*, title: str, methods: pd.DataFrame, classes: pd.DataFrame,
                    failures: pd.DataFrame, differences: pd.DataFrame,
                    published: pd.DataFrame | None, published_note: str,
                    provenance: Mapping[str, Any]) -> str:
    """``summary.md``: our table, the differences between methods, the published one
    (labelled) or why it is not shown, per class, failures."""
    lines = [f"# {title}", "", "## Results (this run)", "",
             _markdown(with_subject_counts(methods), SUMMARY_COLUMNS), "",
             "## Differences between methods", ""]
    lines += ([f"- {r}" for r in differences["reading"]] if len(differences)
              else ["Fewer than two methods: nothing to compare."])
    lines += ["", "## Published numbers (others' runs)", "", f"> {published_note}", ""]
    if published is not None:
        lines += [_markdown(published, PUBLISHED_COLUMNS), ""]
    lines += ["## Per class", "", _markdown(classes, CLASS_COLUMNS), "", "## Failures", ""]
    lines += ([_markdown(failures, {c: c for c in FAILURE_COLUMNS})] if len(failures)
              else ["None."])
    lines += ["", "## Provenance", ""]
    for key, value in provenance.items():
        shown = json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else value
        lines.append(f"- **{key}**: {shown}")
    return "\n".join(lines) + "\n"
