"""The preprocessing stage: validation, normalisation, manifests, and the mask stage after it."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from eqdiff.data.datasets import Subject, load_dataset
from eqdiff.data.masks import (
    GrabCutMask,
    MaskCache,
    ProvidedMasks,
    decode_mask_png,
    mask_iou,
    write_subject_masks,
)
from eqdiff.data.preprocess import (
    SubjectManifest,
    default_min_side,
    mask_inputs,
    preprocess_subject,
    preprocess_subjects,
)
from eqdiff.fixtures.demo_data import write_demo_dataset


def _photo(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))


@pytest.fixture
def subjects(tmp_path: Path) -> tuple[Subject, Subject]:
    """A good subject (one wide RGBA photo among them) and one with mostly bad files."""
    good, bad = tmp_path / "good", tmp_path / "bad"
    good.mkdir()
    bad.mkdir()
    _photo(80, 80, 0).save(good / "00.jpg")
    _photo(90, 85, 1).save(good / "01.png")
    wide = np.dstack([np.asarray(_photo(120, 60, 2)), np.full((60, 120), 255, np.uint8)])
    Image.fromarray(wide, "RGBA").save(good / "02.png")
    _photo(80, 80, 3).save(bad / "00.png")
    (bad / "01.png").write_bytes((bad / "00.png").read_bytes())  # duplicate
    buffer = io.BytesIO()
    _photo(80, 80, 4).save(buffer, format="JPEG")
    (bad / "02.jpg").write_bytes(buffer.getvalue()[:300])  # truncated
    _photo(10, 10, 5).save(bad / "03.png")  # too small
    (bad / "04.jpg").write_text("not a picture")
    return (Subject("good", "toy", "object", tuple(sorted(good.iterdir()))),
            Subject("bad", "dog", "live", tuple(sorted(bad.iterdir()))))


def test_bad_subject_fails_with_reasons_while_the_good_one_goes_on(
        subjects: tuple[Subject, Subject], tmp_path: Path) -> None:
    good, bad = preprocess_subjects(subjects, tmp_path / "out", resolution=64)
    assert good.status == "ok" and good.reason == "" and len(good.images) == 3
    assert bad.status == "failed"
    assert bad.reason == "only 1 usable image(s), need at least 3; 4 rejected"
    reasons = {Path(r.source).name: r.reason for r in bad.rejected}
    assert reasons["01.png"] == "duplicate of 00.png (same sha256)"
    assert "truncated" in reasons["02.jpg"]
    assert "too small: 10x10" in reasons["03.png"]
    assert "not an image" in reasons["04.jpg"]
    with pytest.raises(ValueError, match="would be overwritten"):
        preprocess_subject(subjects[0], tmp_path / "good", resolution=64)


def test_manifest_records_hashes_sizes_and_changes(subjects: tuple[Subject, Subject],
                                                   tmp_path: Path) -> None:
    out = tmp_path / "processed"
    manifest = preprocess_subject(subjects[0], out, resolution=64)
    assert SubjectManifest.read(out) == manifest  # JSON round trip
    by_name = {entry.name: entry for entry in manifest.images}
    for entry in manifest.images:
        data = (out / entry.file).read_bytes()
        assert entry.sha256 == hashlib.sha256(data).hexdigest()
        assert entry.source_sha256 == hashlib.sha256(Path(entry.source).read_bytes()).hexdigest()
        with Image.open(out / entry.file) as image:
            assert image.size == (64, 64) and image.mode == "RGB"
    assert by_name["00"].changes["resized_from"] == [80, 80]
    assert by_name["01"].changes["crop_box"] == [2, 0, 87, 85]  # 90x85: nearly square, cropped
    wide = by_name["02"]
    assert wide.source_size == (120, 60) and wide.changes["padding"] == [0, 30, 0, 30]
    assert wide.changes["mode_conversion"].startswith("RGBA->RGB")
    assert wide.alpha_file == "alpha/02.png" and (out / "alpha" / "02.png").is_file()
    notes = json.loads((out / "manifest.json").read_text())["images"][2]["changes"]["notes"]
    assert any("padded" in note for note in notes)


def test_min_side_defaults_to_a_quarter_of_the_resolution(subjects: tuple[Subject, Subject],
                                                          tmp_path: Path) -> None:
    assert default_min_side(512) == 128 and default_min_side(64) == 32
    manifest = preprocess_subject(subjects[0], tmp_path / "hi", resolution=512)
    assert manifest.status == "failed" and len(manifest.rejected) == 3
    assert all("too small" in r.reason for r in manifest.rejected)


def test_provided_masks_follow_the_normalisation(subjects: tuple[Subject, Subject],
                                                 tmp_path: Path) -> None:
    out = tmp_path / "processed"
    manifest = preprocess_subject(subjects[0], out, resolution=64)
    source_mask = np.zeros((60, 120), dtype=np.uint8)
    source_mask[:, :60] = 255  # left half of the wide source photo
    masks = tmp_path / "user_masks"
    masks.mkdir()
    Image.fromarray(source_mask).save(masks / "02.png")
    item = next(i for i in mask_inputs(manifest, out) if i.name == "02")
    assert item.alpha is not None and item.fit is not None and item.class_noun == "toy"
    mask = ProvidedMasks(masks).extract(item)
    expected = np.zeros((64, 64), dtype=bool)
    expected[16:48, :32] = True  # padded by 30/120 of the side at top and bottom
    assert mask_iou(mask, expected) > 0.95


def test_demo_dataset_through_preprocessing_and_grabcut(tmp_path: Path) -> None:
    """The stages end to end on the demo data, scored against its ground-truth masks."""
    dataset = load_dataset(write_demo_dataset(tmp_path / "demo", size=96,
                                              images_per_subject=3, seed=1))
    cache = MaskCache.in_folder(tmp_path / "store")
    ious = []
    for manifest in preprocess_subjects(dataset.subjects, tmp_path / "pre", resolution=96):
        folder = tmp_path / "pre" / manifest.subject
        subject = dataset.subject(manifest.subject)
        written = write_subject_masks(manifest.subject, mask_inputs(manifest, folder),
                                      tmp_path / "masks" / manifest.subject, GrabCutMask(),
                                      cache=cache, preview_tile=96)
        assert {r["extractor"] for r in written.masks.values()} == {"grabcut"}
        for file in written.masks:
            mask, _ = decode_mask_png((tmp_path / "masks" / manifest.subject / file).read_bytes())
            truth = np.asarray(Image.open(subject.mask_dir / file)) > 0
            ious.append(mask_iou(mask, truth))
        rerun = write_subject_masks(manifest.subject, mask_inputs(manifest, folder),
                                    tmp_path / "again", GrabCutMask(), cache=cache)
        assert all(r["cache_hit"] for r in rerun.masks.values())
    assert len(ious) == 9 and np.mean(ious) > 0.85
