"""The evaluation report: pandas tables in, files out (docs/evaluation.md).

Input is the tidy score table of :mod:`eqdiff.evaluation.metrics` (one row per image, columns
:data:`~eqdiff.evaluation.metrics.SCORE_COLUMNS`), the recorded failures (``subject, method,
reason``) and a provenance mapping.

- :mod:`.tables` — the protocol's tables (per subject, per method, per prompt, per class,
  failures) and the published numbers (for DreamBench runs only); pure pandas;
- :mod:`.differences` — paired differences between methods per score, with bootstrap
  intervals over subjects and a plain-words reading of each;
- :mod:`.plots` — the per-method bars and the fidelity-vs-editability scatter;
- :mod:`.grids` — thumbnail grids of generated and real images;
- :mod:`.render` — ``report.html`` through the Jinja2 templates in ``templates/`` (tables via
  pandas Styler; everything autoescaped) and ``summary.md``;
- :mod:`.write` — :func:`write_report`, which writes ``results.parquet`` + ``results.csv``,
  ``summary.csv``, ``subjects.csv``, ``per_prompt.csv``, ``per_class.csv``,
  ``differences.csv``, ``summary.md``, ``plots/*.png`` and a self-contained ``report.html``
  (plots and thumbnails embedded as base64).

Missing scores are shown as "—" with their reason, never dropped.
"""

from eqdiff.evaluation.report.differences import (
    DIFFERENCE_COLUMNS,
    bootstrap_interval,
    difference_table,
)
from eqdiff.evaluation.report.grids import ImageLoader
from eqdiff.evaluation.report.plots import plot_fidelity_editability, plot_methods
from eqdiff.evaluation.report.render import (
    SECTION_IDS,
    grids_html,
    render_html,
    render_markdown,
)
from eqdiff.evaluation.report.tables import (
    DREAMBENCH_LAYOUT,
    FAILURE_COLUMNS,
    METRIC_LABELS,
    METRICS,
    MISSING,
    PUBLISHED_COLUMNS,
    SUBJECT_COLUMNS,
    SUMMARY_COLUMNS,
    check_failures,
    check_scores,
    class_table,
    failure_table,
    load_published,
    method_order,
    method_table,
    prompt_table,
    published_for,
    subject_table,
)
from eqdiff.evaluation.report.write import write_report

__all__ = [
    "DIFFERENCE_COLUMNS",
    "DREAMBENCH_LAYOUT",
    "FAILURE_COLUMNS",
    "METRICS",
    "METRIC_LABELS",
    "MISSING",
    "PUBLISHED_COLUMNS",
    "SECTION_IDS",
    "SUBJECT_COLUMNS",
    "SUMMARY_COLUMNS",
    "ImageLoader",
    "bootstrap_interval",
    "check_failures",
    "check_scores",
    "class_table",
    "difference_table",
    "failure_table",
    "grids_html",
    "load_published",
    "method_order",
    "method_table",
    "plot_fidelity_editability",
    "plot_methods",
    "prompt_table",
    "published_for",
    "render_html",
    "render_markdown",
    "subject_table",
    "write_report",
]
