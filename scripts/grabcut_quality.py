"""Measure the GrabCut mask extractor: IoU on the synthetic demo objects, overlays on real photos.

    .venv/bin/python scripts/grabcut_quality.py [--real ../shared/data/dreambench-mini]
        [--figure docs/figures/grabcut_dreambench_mini.png]

The synthetic score uses drawn objects with known masks (eqdiff.fixtures.demo_data); the real
photos have no ground truth, so they are shown as an overlay grid (one row per subject) to judge by
eye.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np

from eqdiff.data.datasets import load_dataset
from eqdiff.data.images import load_image, normalise_image
from eqdiff.data.masks import GrabCutMask, MaskInput, mask_coverage, mask_iou, overlay, overlay_grid
from eqdiff.fixtures.demo_data import PAINTERS, render_demo_image

logger = logging.getLogger("grabcut_quality")


def synthetic_iou(size: int, images_per_subject: int) -> list[float]:
    """IoU of GrabCut against the ground truth of drawn demo objects."""
    grabcut, scores = GrabCutMask(), []
    for k in range(images_per_subject):
        for index, subject in enumerate(PAINTERS):
            image, truth = render_demo_image(subject, size, np.random.default_rng([100 + k, index]))
            predicted = grabcut.extract(MaskInput(image, "", f"{subject}_{k}"))
            scores.append(mask_iou(predicted, np.asarray(truth) > 0))
    return scores


def real_overlays(dataset_path: Path, figure: Path, resolution: int) -> None:
    """GrabCut overlays for every photo of every subject, one row per subject."""
    dataset = load_dataset(dataset_path)
    rows = []
    for subject in dataset.subjects:
        row = []
        for path in subject.image_paths:
            loaded = load_image(path)
            image = normalise_image(loaded, resolution).image
            mask = GrabCutMask().extract(MaskInput(image, loaded.sha256, path.stem,
                                                   subject.class_noun))
            logger.info("%s/%s coverage %.1f%%", subject.name, path.name,
                        100 * mask_coverage(mask))
            row.append(overlay(image, mask, label=f"{subject.name}/{path.stem} "
                                                  f"{mask_coverage(mask):.0%}"))
        rows.append(row)
    figure.parent.mkdir(parents=True, exist_ok=True)
    overlay_grid(rows, tile=192).save(figure, optimize=True)
    logger.info("wrote %s", figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real", type=Path, default=Path("../shared/data/dreambench-mini"))
    parser.add_argument("--figure", type=Path,
                        default=Path("docs/figures/grabcut_dreambench_mini.png"))
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--images-per-subject", type=int, default=10)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for size in (64, 128, 256):
        scores = synthetic_iou(size, args.images_per_subject)
        logger.info("synthetic %d px, %d images: IoU mean %.3f, min %.3f, median %.3f", size,
                    len(scores), np.mean(scores), np.min(scores), np.median(scores))
    if args.real.is_dir():
        real_overlays(args.real, args.figure, args.resolution)
    else:
        logger.info("no real photos at %s: overlay grid skipped", args.real)


if __name__ == "__main__":
    main()
