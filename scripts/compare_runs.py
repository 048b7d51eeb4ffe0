"""Compare two finished runs in two local stores: are their results the same, bit for bit?

    .venv/bin/python scripts/compare_runs.py STORE_A STORE_B [--run demo]

Compared: every ``scores.parquet`` (each float column by its bits, the other columns as
values), every tensor of every ``concept.safetensors`` (dtype and ``torch.equal``), and the
bytes of every preprocessed photo, mask and generated sample. Timings, paths and markers are
not compared. Exits 1 and lists what differs, or 0 with the counts.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import load_file

logger = logging.getLogger("compare_runs")


def compare_scores(old: Path, new: Path) -> tuple[int, list[str]]:
    differences, rows = [], 0
    for path in sorted(old.glob("scores/*/*/scores.parquet")):
        name = path.relative_to(old)
        a, b = pd.read_parquet(path), pd.read_parquet(new / name)
        if list(a.columns) != list(b.columns) or len(a) != len(b):
            differences.append(f"{name}: columns or rows differ")
            continue
        for column in a.columns:
            if a[column].dtype.kind == "f":
                same = bool((a[column].to_numpy().view("u8") ==
                             b[column].to_numpy().view("u8")).all())
            else:
                same = a[column].equals(b[column])
            if not same:
                differences.append(f"{name}: column {column} differs")
        rows += len(a)
    return rows, differences


def compare_concepts(old: Path, new: Path) -> tuple[int, list[str]]:
    differences, tensors = [], 0
    for path in sorted(old.glob("concepts/*/*/concept.safetensors")):
        name = path.relative_to(old)
        a, b = load_file(path), load_file(new / name)
        if a.keys() != b.keys():
            differences.append(f"{name}: tensor names differ")
            continue
        for key in a:
            tensors += 1
            if a[key].dtype != b[key].dtype or not torch.equal(a[key], b[key]):
                differences.append(f"{name}: {key} differs")
    return tensors, differences


def compare_images(old: Path, new: Path) -> tuple[int, list[str]]:
    files = sorted(p for folder in ("subjects", "samples") for p in (old / folder).rglob("*")
                   if p.is_file() and p.suffix == ".png")
    differences = [str(p.relative_to(old)) + ": bytes differ" for p in files
                   if p.read_bytes() != (new / p.relative_to(old)).read_bytes()]
    return len(files), differences


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old", type=Path)
    parser.add_argument("new", type=Path)
    parser.add_argument("--run", default="demo")
    args = parser.parse_args()
    old, new = (store / "runs" / args.run for store in (args.old, args.new))
    differences = []
    for what, compare in (("score rows", compare_scores), ("concept tensors", compare_concepts),
                          ("photos, masks and samples", compare_images)):
        count, found = compare(old, new)
        logger.info("%s: %d compared, %d differ", what, count, len(found))
        differences += found
    for line in differences:
        logger.error("%s", line)
    return 1 if differences else 0


if __name__ == "__main__":
    sys.exit(main())
