"""Paired differences between methods: pairing by image slot, bootstrap intervals over
subjects, the plain-words readings, and their place in the report files."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from eqdiff.evaluation.metrics import REAL_IMAGES, SCORE_COLUMNS
from eqdiff.evaluation.report import bootstrap_interval, difference_table, write_report

SUBJECTS = [f"s{i:02d}" for i in range(10)]
A, B = "eqdiff", "custom-diffusion"


def _slot_rows(method: str, subject: str, base: dict[str, float],
               shift: dict[str, float]) -> list[dict[str, object]]:
    rows = []
    for prompt_index in range(2):
        for k in range(2):
            seed = 1000 * SUBJECTS.index(subject) + 10 * prompt_index + k
            rng = np.random.default_rng(seed)  # the same slot gets the same base in every method
            value = {m: base[m] + rng.uniform(-0.25, 0.25) + shift[m] for m in base}
            rows.append({"run": "r1", "subject": subject, "class": "toy", "kind": "object",
                         "method": method, "prompt": f"a toy in scene {prompt_index}",
                         "prompt_index": prompt_index, "seed": seed,
                         "image_key": f"samples/{subject}/{method}/{prompt_index:02d}_{k}.png",
                         **value})
    return rows


def _table(subjects: list[str] = SUBJECTS) -> pd.DataFrame:
    """Per slot, a base score that varies widely between slots (±0.25); against B, method A is
    +0.030 on DINO (±0.005 by subject), −0.020 on CLIP-I (±0.002) and ±0.010 on CLIP-T by
    subject, i.e. no difference on average."""
    base = {"dino": 0.5, "clip_i": 0.7, "clip_t": 0.3}
    rows = []
    for i, subject in enumerate(subjects):
        sign = 1 if i % 2 == 0 else -1
        rows += _slot_rows(A, subject, base, {"dino": 0.030 + sign * 0.005,
                                              "clip_i": -0.020 + sign * 0.002,
                                              "clip_t": sign * 0.010})
        rows += _slot_rows(B, subject, base, dict.fromkeys(base, 0.0))
        rows += [{"run": "r1", "subject": subject, "class": "toy", "kind": "object",
                  "method": REAL_IMAGES, "prompt": "", "prompt_index": -1, "seed": -1,
                  "image_key": f"real/{subject}/{j}.png", "dino": 0.9, "clip_i": 0.9,
                  "clip_t": math.nan} for j in range(2)]
    return pd.DataFrame(rows, columns=list(SCORE_COLUMNS))


def _by_metric(table: pd.DataFrame) -> pd.DataFrame:
    return difference_table(table).set_index("metric")


def test_a_clear_difference_is_claimed_and_no_difference_is_not() -> None:
    result = difference_table(_table())
    assert list(zip(result["method_a"], result["method_b"], strict=True)) == [(A, B)] * 3
    assert REAL_IMAGES not in set(result["method_a"]) | set(result["method_b"])
    rows = result.set_index("metric")
    assert rows["n_subjects"].tolist() == [10, 10, 10]

    dino = rows.loc["dino"]
    assert dino["difference"] == pytest.approx(0.030)
    assert 0 < dino["low"] < 0.030 < dino["high"]
    # paired by slot: the ±0.25 spread between slots cancels, only the ±0.005 remains
    assert dino["high"] - dino["low"] < 0.01
    assert dino["reading"].startswith(f"{A} scores higher than {B} on DINO: +0.030 [+0.0")
    assert dino["reading"].endswith("10 subjects.")

    clip_i = rows.loc["clip_i"]
    assert clip_i["high"] < 0
    assert clip_i["reading"].startswith(f"{A} scores lower than {B} on CLIP-I: \u22120.020 [")

    clip_t = rows.loc["clip_t"]
    assert clip_t["difference"] == pytest.approx(0.0, abs=1e-12)
    assert clip_t["low"] < 0 < clip_t["high"]
    assert clip_t["reading"].startswith(
        f"no difference shown between {A} and {B} on CLIP-T: +0.000 [\u22120.0")
    assert "higher" not in clip_t["reading"] and "lower" not in clip_t["reading"]


def test_pairing_is_by_slot_not_by_row_order() -> None:
    table = _table()
    rng = np.random.default_rng(7)
    # rows shuffled across subjects, prompts and seeds; methods keep their order of appearance
    shuffled = (table.iloc[rng.permutation(len(table))]
                .assign(_order=lambda t: t["method"].map({REAL_IMAGES: 0, A: 1, B: 2}))
                .sort_values("_order", kind="stable").drop(columns="_order"))
    assert not np.array_equal(shuffled[shuffled["method"] == A]["seed"].to_numpy(),
                              table[table["method"] == A]["seed"].to_numpy())
    pd.testing.assert_frame_equal(difference_table(shuffled), difference_table(table))

    # pairing by row position instead of slot would see the ±0.25 spread between slots
    mismatched = table.copy()
    b_rows = mismatched["method"] == B
    mismatched.loc[b_rows, ["dino", "clip_i", "clip_t"]] = (
        mismatched.loc[b_rows, ["dino", "clip_i", "clip_t"]].to_numpy()[::-1])
    wrong = _by_metric(mismatched).loc["dino"]
    assert wrong["high"] - wrong["low"] > 0.05


def test_slots_of_one_method_only_are_not_compared() -> None:
    table = _table()
    extra = table[(table["method"] == A) & (table["subject"] == "s00")].assign(
        seed=lambda t: t["seed"] + 500, dino=5.0)  # slots B never generated, absurd scores
    rows = _by_metric(pd.concat([table, extra], ignore_index=True))
    assert rows.loc["dino", "difference"] == pytest.approx(0.030)


def test_a_subject_with_a_missing_score_leaves_only_that_comparison() -> None:
    table = _table()
    table.loc[(table["method"] == B) & (table["subject"] == "s03"), "dino"] = math.nan
    table.loc[(table["method"] == B) & (table["subject"] == "s03")
              & (table["prompt_index"] == 0), "dino"] = 0.5  # still one NaN slot left
    rows = _by_metric(table)
    assert rows.loc["dino", "n_subjects"] == 9  # no partial mean for s03
    assert rows.loc["clip_t", "n_subjects"] == 10


def test_too_few_subjects_give_no_interval() -> None:
    rows = _by_metric(_table(SUBJECTS[:1]))
    one = rows.loc["dino"]
    assert one["n_subjects"] == 1 and one["difference"] == pytest.approx(0.035)
    assert math.isnan(one["low"]) and math.isnan(one["high"])
    assert "cannot be computed" in one["reading"] and "[" not in one["reading"]
    assert "higher" not in one["reading"]

    table = _table(SUBJECTS[:2])
    table = table[~((table["method"] == B) & (table["subject"] == "s00"))].copy()
    table.loc[(table["method"] == A) & (table["subject"] == "s01"), "seed"] += 500
    none = _by_metric(table).loc["dino"]  # A and B share no slot
    assert none["n_subjects"] == 0 and math.isnan(none["difference"])
    assert "nothing to compare" in none["reading"]

    with pytest.raises(ValueError, match="at least 2"):
        bootstrap_interval(np.array([0.1]))


def test_one_method_has_nothing_to_compare() -> None:
    table = _table()
    assert difference_table(table[table["method"] != B]).empty


def test_the_interval_is_reproducible_and_matches_the_normal_one_for_many_units() -> None:
    units = np.random.default_rng(3).normal(0.1, 0.05, size=400)
    low, high = bootstrap_interval(units)
    assert (low, high) == bootstrap_interval(units)  # fixed seed: a rebuilt report agrees
    half = 1.96 * units.std(ddof=1) / math.sqrt(len(units))
    assert low == pytest.approx(units.mean() - half, abs=0.15 * half)
    assert high == pytest.approx(units.mean() + half, abs=0.15 * half)


def test_differences_go_to_the_report_and_a_csv(tmp_path: Path) -> None:
    table = _table()
    written = write_report(table, tmp_path)
    assert tmp_path / "differences.csv" in written
    stored = pd.read_csv(tmp_path / "differences.csv")
    expected = difference_table(table)
    assert stored["reading"].tolist() == expected["reading"].tolist()
    assert stored["low"].to_numpy() == pytest.approx(expected["low"].to_numpy())
    page = (tmp_path / "report.html").read_text("utf-8")
    assert 'id="differences"' in page and "Differences between methods" in page
    for line in expected["reading"]:
        assert f"<li>{line}</li>" in page
    assert expected["reading"].iloc[0] in (tmp_path / "summary.md").read_text("utf-8")


def test_too_few_subjects_show_a_reason_instead_of_an_interval(tmp_path: Path) -> None:
    write_report(_table(SUBJECTS[:1]), tmp_path)
    page = (tmp_path / "report.html").read_text("utf-8")
    assert 'title="an interval needs at least 2 subjects"' in page
    assert "cannot be computed" in page


def test_two_rows_for_one_slot_are_refused() -> None:
    table = _table()
    with pytest.raises(ValueError, match="rows sharing a"):
        difference_table(pd.concat([table, table.iloc[[0]]], ignore_index=True))
