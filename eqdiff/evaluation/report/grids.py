"""Thumbnail grids: per subject, its real images and a methods × prompts matrix of generated
images (the lowest seed of each prompt). Data only; ``templates/grids.html.j2`` draws them.

Images come through a ``load_image(key) -> bytes`` callable, so this module knows nothing about
where they are stored; an image that cannot be loaded becomes a visible empty cell.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Callable
from dataclasses import dataclass

import pandas as pd

from eqdiff.data.images import jpeg_thumbnail
from eqdiff.evaluation.metrics import REAL_IMAGES
from eqdiff.evaluation.report.tables import format_value

logger = logging.getLogger(__name__)

ImageLoader = Callable[[str], bytes]


@dataclass(frozen=True)
class Thumbnail:
    """One image: its store key, a tooltip, and a base64 JPEG ("" when it could not load)."""

    key: str
    tip: str
    data: str


@dataclass(frozen=True)
class GridRow:
    """One method's row: a cell per prompt (``None``: not generated). No cells at all means
    the method has no images of this subject; ``reason`` says why."""

    method: str
    cells: tuple[Thumbnail | None, ...]
    reason: str


@dataclass(frozen=True)
class SubjectGrid:
    """One subject: its real images, the prompts (index, text) and one row per method."""

    subject: str
    class_noun: str
    kind: str
    real: tuple[Thumbnail, ...]
    prompts: tuple[tuple[int, str], ...]
    rows: tuple[GridRow, ...]


def thumbnail(load_image: ImageLoader, key: str, tip: str, size: int) -> Thumbnail:
    """The image ``key`` scaled to fit ``size`` px, as base64 JPEG; a load or decode failure is
    logged and gives an empty ``data``."""
    try:
        jpeg = jpeg_thumbnail(load_image(key), size)
    except Exception as error:  # any loader or decoder failure becomes a visible empty cell
        logger.warning("report: cannot show image %s: %s", key, error)
        return Thumbnail(key, tip, "")
    return Thumbnail(key, tip, base64.b64encode(jpeg).decode("ascii"))


def _tip(method: str, pick: pd.Series) -> str:
    return (f"{method} | {pick['prompt']} | seed {pick['seed']} | "
            f"DINO {format_value(pick['dino'])} CLIP-I {format_value(pick['clip_i'])} "
            f"CLIP-T {format_value(pick['clip_t'])}")


def subject_grids(scores: pd.DataFrame, subjects: pd.DataFrame, load_image: ImageLoader, *,
                  thumb_px: int = 96) -> list[SubjectGrid]:
    """A :class:`SubjectGrid` per subject of the subject table, in its order; methods without
    images (failed) keep their row, with the subject table's reason."""
    grids = []
    for subject in subjects["subject"].drop_duplicates():
        rows = scores[scores["subject"] == subject]
        generated = rows[rows["method"] != REAL_IMAGES]
        prompts = (generated.sort_values("prompt_index").drop_duplicates("prompt_index")
                   .loc[:, ["prompt_index", "prompt"]])
        real = tuple(thumbnail(load_image, key, "real image", thumb_px)
                     for key in rows.loc[rows["method"] == REAL_IMAGES, "image_key"])
        lines = []
        listed = subjects[(subjects["subject"] == subject)
                          & (subjects["method"] != REAL_IMAGES)]
        for method, reason in zip(listed["method"], listed["reason"], strict=True):
            mine = generated[generated["method"] == method]
            cells: list[Thumbnail | None] = []
            for index in ([] if mine.empty else prompts["prompt_index"]):
                chosen = mine[mine["prompt_index"] == index].sort_values("seed").head(1)
                if chosen.empty:
                    cells.append(None)
                    continue
                pick = chosen.iloc[0]
                cells.append(thumbnail(load_image, pick["image_key"], _tip(method, pick),
                                       thumb_px))
            lines.append(GridRow(method, tuple(cells), reason))
        info = subjects[subjects["subject"] == subject].iloc[0]
        grids.append(SubjectGrid(
            subject=subject, class_noun=info["class"], kind=info["kind"], real=real,
            prompts=tuple(zip(prompts["prompt_index"], prompts["prompt"], strict=True)),
            rows=tuple(lines)))
    return grids
