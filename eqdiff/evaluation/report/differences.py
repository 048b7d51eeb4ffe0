"""Paired differences between methods, with bootstrap intervals (docs/evaluation.md).

Every method of a run generates the same image slots — (subject, prompt index, k) — from the
same initial noise: an image's seed hashes the sampling seed, the subject, the prompt index and
k, never the method. So two methods are compared slot by slot: a score row of method A is
paired with the row of method B that has the same ``subject``, ``prompt_index`` and ``seed``
(within a run the seed stands for k). The order of the rows does not matter.

**The unit is the subject.** The paired differences of one subject are averaged into one
value, and the interval resamples subjects:

- every image of a (subject, method) comes from one trained concept, so a subject's images are
  not independent of each other; treating images, or (subject, k) groups, as units would
  count one training many times over and make the interval too narrow;
- k is no shared factor across prompts (image k of prompt 0 and image k of prompt 1 start from
  different noise), so (subject, k) groups are arbitrary slices, not replicates;
- a run has one sampling seed, so there are no seed replicates to resample either.

As in the protocol's tables, missing scores are not averaged away: a subject with any slot
scored by both methods but missing the score on one side gets no difference for that metric
and is left out of that comparison (the ``n_subjects`` column says how many remain). Slots
only one of the two methods has are not compared. The "real images" bound is no method and
takes part in no pair.

The interval is a percentile bootstrap of the mean over subjects: :data:`RESAMPLES` resamples
of the subjects with replacement, drawn from a generator seeded with :data:`BOOTSTRAP_SEED`
(numpy only), so rebuilding a report gives the same intervals. It needs at least 2 subjects.
A reading claims a difference only when the interval excludes zero.
"""

from __future__ import annotations

from itertools import combinations
from typing import Any

import numpy as np
import pandas as pd

from eqdiff.evaluation.metrics import REAL_IMAGES
from eqdiff.evaluation.report.tables import METRIC_LABELS, METRICS, check_scores, method_order

SLOT = ("subject", "prompt_index", "seed")  # what pairs a row of one method with another's
RESAMPLES = 2000
BOOTSTRAP_SEED = 0
CONFIDENCE = 0.95
MIN_UNITS = 2  # subjects an interval needs

DIFFERENCE_COLUMNS = ("method_a", "method_b", "metric", "n_subjects", "difference", "low",
                      "high", "reading")
DIFFERENCE_SHOWN = {"method_a": "method A", "method_b": "method B", "score": "score",
                    "n_subjects": "subjects", "shown_difference": "A − B",
                    "interval": f"{CONFIDENCE:.0%} interval"}


def signed(value: float) -> str:
    """``+0.031`` / ``−0.004`` (a true minus sign), to 3 decimals; ``+0.000`` for a value that
    rounds to zero from below."""
    return f"{round(value, 3) + 0.0:+.3f}".replace("-", "\N{MINUS SIGN}")


def bootstrap_interval(units: np.ndarray, *, resamples: int = RESAMPLES,
                       seed: int = BOOTSTRAP_SEED,
                       confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``units`` (1-D, at least :data:`MIN_UNITS`
    values, no NaN): resample the units with replacement ``resamples`` times."""
    units = np.asarray(units, dtype="float64")
    if units.ndim != 1 or len(units) < MIN_UNITS or np.isnan(units).any():
        raise ValueError(f"a bootstrap interval needs a 1-D array of at least {MIN_UNITS} values "
                         f"without NaN, got {units!r}")
    rng = np.random.default_rng(seed)
    means = units[rng.integers(0, len(units), size=(resamples, len(units)))].mean(axis=1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def reading(method_a: str, method_b: str, metric: str, n_subjects: int, difference: float,
            low: float, high: float) -> str:
    """One comparison in plain words; a difference is claimed only when the interval excludes
    zero."""
    label = METRIC_LABELS[metric]
    if n_subjects == 0:
        return (f"{method_a} vs {method_b} on {label}: no subject has scores of both, "
                "nothing to compare.")
    if n_subjects < MIN_UNITS:
        return (f"{method_a} vs {method_b} on {label}: {signed(difference)} from "
                f"{n_subjects} subject; "
                f"an interval needs at least {MIN_UNITS} subjects, so it cannot be computed "
                "and no difference is claimed.")
    numbers = f"{signed(difference)} [{signed(low)}, {signed(high)}], {n_subjects} subjects"
    if low > 0:
        return f"{method_a} scores higher than {method_b} on {label}: {numbers}."
    if high < 0:
        return f"{method_a} scores lower than {method_b} on {label}: {numbers}."
    return f"no difference shown between {method_a} and {method_b} on {label}: {numbers}."


def _slots(scores: pd.DataFrame) -> pd.DataFrame:
    """The generated rows indexed by :data:`SLOT`, one column per (metric, method), and a
    ``present`` column per method (True where that method has the slot)."""
    generated = scores[scores["method"] != REAL_IMAGES]
    duplicated = generated.duplicated(["method", *SLOT], keep=False)
    if duplicated.any():
        first = generated[duplicated].iloc[0]
        raise ValueError(f"score table has {int(duplicated.sum())} rows sharing a (method, "
                         f"subject, prompt_index, seed), e.g. {first['method']!r}, "
                         f"{first['subject']!r}, {first['prompt_index']}, {first['seed']}")
    return (generated.assign(present=True)
            .pivot(index=list(SLOT), columns="method", values=[*METRICS, "present"]))


def _compare(wide: pd.DataFrame, method_a: str, method_b: str, metric: str, *,
             resamples: int, bootstrap_seed: int) -> dict[str, Any]:
    both = wide[("present", method_a)].notna() & wide[("present", method_b)].notna()
    paired = (wide.loc[both, (metric, method_a)] - wide.loc[both, (metric, method_b)])
    per_subject = (paired.astype("float64").groupby(level="subject")
                   .agg(lambda column: column.mean(skipna=False)).dropna().sort_index())
    units = per_subject.to_numpy()
    difference = float(units.mean()) if len(units) else float("nan")
    low, high = (bootstrap_interval(units, resamples=resamples, seed=bootstrap_seed)
                 if len(units) >= MIN_UNITS else (float("nan"), float("nan")))
    return {"method_a": method_a, "method_b": method_b, "metric": metric,
            "n_subjects": len(units), "difference": difference, "low": low, "high": high,
            "reading": reading(method_a, method_b, metric, len(units), difference, low, high)}


def difference_table(scores: pd.DataFrame, *, resamples: int = RESAMPLES,
                     bootstrap_seed: int = BOOTSTRAP_SEED) -> pd.DataFrame:
    """Per pair of methods (A before B in display order) and metric: ``n_subjects``, the mean
    over subjects of A − B (``difference``), its bootstrap interval (``low``, ``high``; NaN
    with fewer than :data:`MIN_UNITS` subjects) and the ``reading`` (columns
    :data:`DIFFERENCE_COLUMNS`). Empty when the run has fewer than two methods.

    A ``ValueError`` names a (method, slot) that has more than one row: then nothing says which
    row to pair."""
    scores = check_scores(scores)
    methods = [m for m in method_order(scores) if m != REAL_IMAGES]
    if len(methods) < 2:
        return pd.DataFrame({c: pd.Series(dtype="object") for c in DIFFERENCE_COLUMNS})
    wide = _slots(scores)
    rows = [_compare(wide, a, b, metric, resamples=resamples, bootstrap_seed=bootstrap_seed)
            for a, b in combinations(methods, 2) for metric in METRICS]
    return pd.DataFrame(rows, columns=list(DIFFERENCE_COLUMNS))


def shown_differences(differences: pd.DataFrame) -> pd.DataFrame:
    """:func:`difference_table` as displayed (columns :data:`DIFFERENCE_SHOWN`): signed
    numbers, the interval as "[low, high]", NaN where there is none and ``why`` saying so."""
    rows = differences.reset_index(drop=True)
    return rows.assign(
        score=[METRIC_LABELS[m] for m in rows["metric"]],
        shown_difference=[float("nan") if pd.isna(d) else signed(d) for d in rows["difference"]],
        interval=[float("nan") if pd.isna(low) else f"[{signed(low)}, {signed(high)}]"
                  for low, high in zip(rows["low"], rows["high"], strict=True)],
        why=["no subject has scores of both" if n == 0
             else f"an interval needs at least {MIN_UNITS} subjects" if n < MIN_UNITS else ""
             for n in rows["n_subjects"]])
