"""An untidy dataset: GIFs, stray files, deep-colour PNGs, blank photos, odd folder names."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from eqdiff.data.datasets import load_dataset
from eqdiff.data.images import (
    ImageError,
    list_images,
    load_image,
    normalise_image,
    scan_folder,
    to_rgb,
)
from eqdiff.data.names import slugify_subject_name, subject_name_for_folder
from eqdiff.data.preprocess import preprocess_subject


def _noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))


def _photos(folder: Path, count: int, seed: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(count):
        _noise(48, 48, seed + k).save(folder / f"{k:02d}.png")


# --------------------------------------------------------------------------- GIF and stray files

def test_animated_gif_loads_its_first_frame_and_says_so(tmp_path: Path) -> None:
    first = np.zeros((40, 48, 3), dtype=np.uint8)
    first[:, :24] = (255, 0, 0)
    first[:, 24:] = (0, 0, 255)
    later = [Image.new("RGB", (48, 40), (0, 255, 0)), Image.new("RGB", (48, 40), (9, 9, 9))]
    path = tmp_path / "wave.gif"
    Image.fromarray(first).save(path, save_all=True, append_images=later)
    loaded = load_image(path)
    assert loaded.frames == 3 and loaded.source_format == "GIF"
    pixels = np.asarray(loaded.image)
    assert tuple(pixels[20, 5]) == (255, 0, 0) and tuple(pixels[20, 40]) == (0, 0, 255)
    changes = normalise_image(loaded, 32).changes
    assert "first of 3 frames used (animated or multi-page file)" in changes.describe()
    assert changes.to_dict()["frames"] == 3


def test_still_gif_is_an_ordinary_image(tmp_path: Path) -> None:
    path = tmp_path / "still.gif"
    _noise(40, 40).convert("P").save(path)
    loaded = load_image(path)
    assert loaded.frames == 1
    assert not any("frames" in note for note in normalise_image(loaded, 32).changes.describe())


def test_folder_scan_reports_what_is_not_an_image(tmp_path: Path) -> None:
    for name in ("b.GIF", "a.jpg", "notes.txt", "IMG_1.heic", "README", ".DS_Store", "._a.jpg"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "masks").mkdir()
    images, others = scan_folder(tmp_path)
    assert [p.name for p in images] == ["a.jpg", "b.GIF"] == [p.name for p in list_images(tmp_path)]
    reasons = {path.name: reason for path, reason in others}
    assert set(reasons) == {"IMG_1.heic", "README", "notes.txt"}  # hidden files: silently
    assert reasons["IMG_1.heic"].startswith("not an accepted image type (.heic); accepted: ")
    assert ".gif" in reasons["notes.txt"] and "(no suffix)" in reasons["README"]


# --------------------------------------------------------------------------- bit depth

def test_16_bit_gray_gradient_becomes_the_same_8_bit_gradient(tmp_path: Path) -> None:
    steps = np.arange(256, dtype=np.uint16) * 257  # 0, 257, ..., 65535
    path = tmp_path / "gradient16.png"
    Image.fromarray(np.tile(steps, (40, 1))).save(path)
    with Image.open(path) as opened:
        assert opened.mode.startswith("I")  # really stored as 16-bit
    loaded = load_image(path)
    np.testing.assert_array_equal(np.asarray(loaded.image)[7, :, 0], np.arange(256))
    assert "1/257" in loaded.mode_conversion


def test_16_bit_values_between_the_steps_round_to_the_nearest_level(tmp_path: Path) -> None:
    values = np.linspace(0, 65535, 300).astype(np.uint16)
    path = tmp_path / "fine16.tif"
    Image.fromarray(np.tile(values, (40, 1))).save(path)
    expected = np.rint(values / 257).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(load_image(path).image)[0, :, 1], expected)


def test_dark_16_bit_data_stays_dark_when_the_depth_is_known() -> None:
    dark = Image.fromarray(np.arange(256, dtype=np.int32).reshape(16, 16), "I")
    rgb, _, how = to_rgb(dark, full_scale=65535)
    assert np.asarray(rgb).max() == 1 and "1/257" in how  # not taken for 8-bit data
    as_is, _, _ = to_rgb(dark)  # depth unknown: values within 0..255 are kept
    assert np.asarray(as_is).max() == 255


def test_32_bit_integer_tiff_is_scaled_by_its_depth(tmp_path: Path) -> None:
    step = (2 ** 31 - 1) // 255  # signed 32-bit: 2**31-1 is white
    path = tmp_path / "gradient32.tif"
    Image.fromarray(np.tile(np.arange(256, dtype=np.int32) * step, (40, 1))).save(path)
    loaded = load_image(path)
    assert loaded.source_mode == "I" and "bit depth" in loaded.mode_conversion
    np.testing.assert_array_equal(np.asarray(loaded.image)[0, :, 0], np.arange(256))


# --------------------------------------------------------------------------- blank images

@pytest.mark.parametrize("pixels", [
    np.full((64, 64, 3), 30, np.uint8),  # a single colour
    np.random.default_rng(0).integers(120, 123, (64, 64, 3), dtype=np.uint8),  # sensor noise
])
def test_blank_or_nearly_uniform_images_are_rejected(tmp_path: Path, pixels: np.ndarray) -> None:
    path = tmp_path / "blank.png"
    Image.fromarray(pixels).save(path)
    with pytest.raises(ImageError, match="blank or nearly uniform image"):
        load_image(path)
    assert load_image(path, min_std=0).image.size == (64, 64)  # the check can be turned off


def test_blank_photo_is_listed_as_rejected_by_preprocessing(tmp_path: Path) -> None:
    root = tmp_path / "data"
    _photos(root / "mug", 3)
    Image.new("RGB", (64, 64), (250, 250, 250)).save(root / "mug" / "03.png")
    (root / "subjects.csv").write_text("subject,class\nmug,cup\n")
    manifest = preprocess_subject(load_dataset(root).subject("mug"), tmp_path / "out",
                                  resolution=32)
    assert manifest.status == "ok" and len(manifest.images) == 3
    [rejected] = manifest.rejected
    assert rejected.source.endswith("03.png")
    assert rejected.reason.startswith("blank or nearly uniform image")


# --------------------------------------------------------------------------- folder names

@pytest.mark.parametrize("text,slug", [("café cup ☕", "cafe_cup"),
                                       ("Crème Brûlée", "creme_brulee"),
                                       ("  my  dog!! ", "my_dog"),
                                       ("Ｆｕｌｌ width", "full_width")])
def test_slugs(text: str, slug: str) -> None:
    assert slugify_subject_name(text) == slug


def test_valid_folder_names_are_kept_as_they_are() -> None:
    assert subject_name_for_folder("Wolf_Plushie-2.b") == "Wolf_Plushie-2.b"
    assert subject_name_for_folder("wolf plushie") == "wolf_plushie"
    with pytest.raises(ValueError, match="no ASCII letters or digits"):
        slugify_subject_name("☕ ☕")


def test_untidy_plain_dataset_loads_what_it_can(tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "subjects.csv").write_text(
        "subject,class,folder\n"
        "café cup ☕,cup,\n"        # slugged to cafe_cup
        "teddy,teddy bear,My Teddy (2019)\n"  # explicit folder
        "Red Car,car,\n"           # red_car ...
        "red car,car,\n"           # ... red_car again: a collision
        "../etc,dog,\n"            # a folder name that leads elsewhere
        "☕,cup,\n"                # nothing to make a name of
        "rex,dog,\n", encoding="utf-8")
    _photos(tmp_path / "café cup ☕", 3)
    (tmp_path / "café cup ☕" / "notes.txt").write_text("bought in Lyon")
    (tmp_path / "café cup ☕" / "IMG_2.heic").write_bytes(b"heic")
    (tmp_path / "café cup ☕" / ".DS_Store").write_bytes(b"mac")
    (tmp_path / "café cup ☕" / "masks").mkdir()
    (tmp_path / "café cup ☕" / "extra").mkdir()
    _photos(tmp_path / "My Teddy (2019)", 3, seed=10)
    _photos(tmp_path / "Red Car", 3, seed=20)
    _photos(tmp_path / "red car", 3, seed=30)
    _photos(tmp_path / "☕", 3, seed=40)
    _photos(tmp_path / "rex", 3, seed=50)
    with caplog.at_level(logging.INFO, logger="eqdiff.data.datasets"):
        dataset = load_dataset(tmp_path)

    assert [s.name for s in dataset.subjects] == ["cafe_cup", "rex", "teddy"]
    cup = dataset.subject("cafe_cup")
    assert cup.folder == "café cup ☕" and cup.class_noun == "cup"
    assert [p.name for p in cup.image_paths] == ["00.png", "01.png", "02.png"]
    assert all(p.parent == tmp_path / "café cup ☕" for p in cup.image_paths)
    assert cup.mask_dir == tmp_path / "café cup ☕" / "masks"
    teddy = dataset.subject("teddy")
    assert teddy.folder == "My Teddy (2019)" and len(teddy.image_paths) == 3
    assert dataset.subject("rex").folder == "rex"

    problems = {(p.kind, p.subject): p.message for p in dataset.problems}
    ignored = [p.message for p in dataset.problems if p.kind == "ignored_file"]
    assert len(ignored) == 3
    assert any("notes.txt is ignored: not an accepted image type (.txt)" in m for m in ignored)
    assert any("IMG_2.heic" in m for m in ignored) and any("extra/" in m for m in ignored)
    assert not any("DS_Store" in p.message for p in dataset.problems)
    assert "'Red Car', 'red car'" in problems[("name_collision", "red_car")]
    assert "'folder' column" in problems[("name_collision", "red_car")]
    assert "single folder name" in problems[("invalid_folder", "../etc")]
    assert ":6:" in problems[("invalid_folder", "../etc")]
    assert "no ASCII letters" in problems[("invalid_folder", "☕")]
    assert ("unlisted_folder", "Red Car") not in problems  # listed, though unusable
    assert {kind for kind, _ in problems} == {"ignored_file", "name_collision", "invalid_folder"}
    assert "folder 'café cup ☕' is subject 'cafe_cup'" in caplog.text


def test_yaml_folder_key_and_decomposed_accents_on_disk(tmp_path: Path) -> None:
    (tmp_path / "subjects.yaml").write_text(
        "subjects:\n"
        "  - {subject: cup, class: cup, folder: \"Café\"}\n"
        "  - {subject: Thé, class: teapot}\n", encoding="utf-8")
    _photos(tmp_path / "Cafe\u0301", 3)  # "Café" as macOS writes it (e + combining accent)
    _photos(tmp_path / "The\u0301", 3, seed=5)
    dataset = load_dataset(tmp_path)
    assert dataset.problems == ()
    assert [(s.name, len(s.image_paths)) for s in dataset.subjects] == [("cup", 3), ("the", 3)]


def test_unlisted_odd_folder_is_reported_not_fatal(tmp_path: Path) -> None:
    (tmp_path / "subjects.csv").write_text("subject,class\nrex,dog\n")
    _photos(tmp_path / "rex", 3)
    _photos(tmp_path / "día de playa 🏖", 3)
    dataset = load_dataset(tmp_path)
    assert [s.name for s in dataset.subjects] == ["rex"]
    assert [(p.kind, p.subject) for p in dataset.problems] == [("unlisted_folder",
                                                                "día de playa 🏖")]


def test_explicit_subject_name_must_be_valid_when_a_folder_is_given(tmp_path: Path) -> None:
    (tmp_path / "subjects.csv").write_text("subject,class,folder\nmy cup,cup,cup\n")
    with pytest.raises(ValueError, match=r"subjects.csv:2: invalid subject name 'my cup'"):
        load_dataset(tmp_path)
