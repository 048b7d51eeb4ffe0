"""Empty and near-empty masks are never kept: the chain passes over them for the configured
fallback and then the full mask, records why per image, and no written mask is all zero."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from eqdiff.config import MaskConfig
from eqdiff.data.masks import (
    AlphaMask,
    GrabCutMask,
    MaskInput,
    ProvidedMasks,
    decode_mask_png,
    extract_mask,
    write_subject_masks,
)
from eqdiff.method.training import ConceptData

SIZE = 100  # 10 000 pixels: 30 of them cover 0.3 %


@dataclass(frozen=True)
class PixelsMask:
    """A test extractor whose mask sets the first ``pixels`` pixels (row-major)."""

    pixels: int
    name: str = "pixels"
    cacheable: bool = False

    def settings(self) -> dict[str, Any]:
        return {"pixels": self.pixels}

    def extract(self, item: MaskInput) -> np.ndarray:
        width, height = item.image.size
        mask = np.zeros(height * width, dtype=bool)
        mask[:self.pixels] = True
        return mask.reshape(height, width)


def _square(name: str = "03") -> tuple[MaskInput, np.ndarray]:
    """A bright square (20 % of the image) on a dark background, with its alpha."""
    truth = np.zeros((SIZE, SIZE), dtype=bool)
    truth[30:70, 25:75] = True
    image = Image.fromarray(np.where(truth[..., None], 200, 40).astype(np.uint8).repeat(3, 2))
    alpha = Image.fromarray(truth.astype(np.uint8) * 255)
    return MaskInput(image, f"sha-{name}", name, alpha=alpha), truth


def test_an_empty_mask_falls_back_to_the_fallback_extractor(
        caplog: pytest.LogCaptureFixture) -> None:
    item, truth = _square()
    with caplog.at_level(logging.WARNING, logger="eqdiff.data.masks.chain"):
        result = extract_mask(item, PixelsMask(0), fallback=AlphaMask())
    assert (result.extractor, result.requested) == ("alpha", "pixels")
    np.testing.assert_array_equal(result.mask, truth)
    assert result.fallback_reasons == ("pixels mask is empty",)
    assert result.warnings == ("03: pixels mask is empty: used the alpha mask",)
    assert [r.getMessage() for r in caplog.records] == list(result.warnings)
    record = result.record()
    assert record["extractor"] == "alpha" and record["fallback_reasons"] == [
        "pixels mask is empty"]


def test_a_near_empty_mask_whose_fallback_is_empty_too_gives_the_full_mask() -> None:
    item, _ = _square()
    result = extract_mask(item, PixelsMask(30), fallback=PixelsMask(0, name="blank"))
    assert result.extractor == "full" and result.mask.all() and result.coverage == 1.0
    assert result.fallback_reasons == ("pixels mask covers 0.3 % (< 2 %)", "blank mask is empty")
    assert result.warnings == (
        "03: pixels mask covers 0.3 % (< 2 %); blank mask is empty: used the full mask",)


def test_the_coverage_floor_is_the_configured_one() -> None:
    item, _ = _square()
    three_percent = PixelsMask(300)
    kept = extract_mask(item, three_percent)  # default floor: MaskConfig().min_coverage
    assert MaskConfig().min_coverage == 0.02
    assert kept.extractor == "pixels" and kept.warnings == () and kept.fallback_reasons == ()
    raised = extract_mask(item, three_percent, min_coverage=0.05)
    assert raised.extractor == "full"
    assert raised.warnings == ("03: pixels mask covers 3 % (< 5 %): used the full mask",)
    # without a floor a speck is kept, but an empty mask still falls back
    assert extract_mask(item, PixelsMask(1), min_coverage=0).extractor == "pixels"
    assert extract_mask(item, PixelsMask(0), min_coverage=0).extractor == "full"
    with pytest.raises(ValueError, match="masks.min_coverage"):
        MaskConfig(min_coverage=1.0)
    with pytest.raises(ValueError, match="masks.min_coverage"):
        MaskConfig(min_coverage=-0.1)


def test_an_empty_provided_mask_falls_back(tmp_path: Path) -> None:
    item, truth = _square("00")
    folder = tmp_path / "masks"
    folder.mkdir()
    Image.new("L", (SIZE, SIZE), 0).save(folder / "00.png")
    result = extract_mask(item, ProvidedMasks(folder), fallback=GrabCutMask())
    assert result.extractor == "grabcut"
    assert result.mask[truth].mean() > 0.9 and result.coverage < 0.5  # GrabCut found the square
    assert result.warnings == ("00: provided mask is empty: used the grabcut mask",)
    missing = extract_mask(_square("01")[0], ProvidedMasks(folder))  # no file: unavailable
    assert missing.extractor == "full"
    assert missing.warnings == (f"01: provided unavailable (no provided mask in {folder}): "
                                "used the full mask",)


def test_no_written_mask_is_empty_and_the_record_counts_the_fallbacks(tmp_path: Path) -> None:
    folder = tmp_path / "user_masks"
    folder.mkdir()
    items, truths = zip(*(_square(name) for name in ("00", "01", "02")), strict=True)
    Image.fromarray(truths[0].astype(np.uint8) * 255).save(folder / "00.png")  # a good mask
    Image.new("L", (SIZE, SIZE), 0).save(folder / "01.png")  # empty
    speck = np.zeros((SIZE, SIZE), dtype=np.uint8)
    speck[:5, :10] = 255  # 0.5 %
    Image.fromarray(speck).save(folder / "02.png")
    out = tmp_path / "out"
    written = write_subject_masks("square", items, out, ProvidedMasks(folder),
                                  fallback=PixelsMask(0, name="blank"), preview_tile=32)

    for file in ("00.png", "01.png", "02.png"):
        mask, metadata = decode_mask_png((out / file).read_bytes())
        assert mask.any(), file
        assert metadata["extractor"] == written.masks[file]["extractor"]
    np.testing.assert_array_equal(decode_mask_png((out / "00.png").read_bytes())[0], truths[0])
    record = json.loads((out / "masks.json").read_text())
    assert record == written.to_dict() and record["fallbacks"] == written.fallbacks == 2
    by_file = record["masks"]
    assert [by_file[f]["extractor"] for f in ("00.png", "01.png", "02.png")] == [
        "provided", "full", "full"]
    assert by_file["00.png"]["fallback_reasons"] == [] and by_file["00.png"]["warnings"] == []
    assert by_file["01.png"]["fallback_reasons"] == ["provided mask is empty",
                                                     "blank mask is empty"]
    assert by_file["02.png"]["warnings"] == [
        "02: provided mask covers 0.5 % (< 2 %); blank mask is empty: used the full mask"]
    assert decode_mask_png((out / "01.png").read_bytes())[1]["fallback_reasons"] == [
        "provided mask is empty", "blank mask is empty"]


def test_training_data_refuses_an_empty_mask() -> None:
    images = torch.zeros(3, 3, 8, 8)
    masks = torch.ones(3, 1, 8, 8)
    masks[1] = 0
    masks[2] = 0.4  # nothing above training's 0.5 threshold
    with pytest.raises(ValueError, match=r"ball: the masks of images \[1, 2\] are empty"):
        ConceptData("ball", "ball", images, masks, torch.zeros(0, 3, 8, 8))
    masks[1:] = 1
    ConceptData("ball", "ball", images, masks, torch.zeros(0, 3, 8, 8))
