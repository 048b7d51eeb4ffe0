"""Image loading, validation, mode conversion, EXIF orientation, hashing and squaring."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from eqdiff.data.images import (
    ImageError,
    file_sha256,
    fit_mask,
    list_images,
    load_image,
    normalise_image,
    pil_to_tensor,
    plan_square_fit,
    tensor_to_pil,
    to_rgb,
)


def _noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


# --------------------------------------------------------------------------- bad files

def _bad_files(tmp: Path) -> dict[str, tuple[Path, str]]:
    """name → (file, words the error must contain)."""
    jpeg = _encoded(_noise(96, 80), "JPEG")
    png = _encoded(_noise(96, 80), "PNG")
    corrupt_png = png[:60] + bytes(b ^ 0x5A for b in png[60:])  # valid header, garbage body
    return {
        "zero-byte": (_write(tmp / "empty.jpg", b""), "empty file"),
        "text named .jpg": (_write(tmp / "notes.jpg", b"this is not an image\n" * 20),
                            "not an image"),
        "random bytes": (_write(tmp / "random.png", np.random.default_rng(1).bytes(4000)),
                         "not an image"),
        "truncated JPEG": (_write(tmp / "cut.jpg", jpeg[: len(jpeg) // 2]), "truncated"),
        "truncated PNG": (_write(tmp / "cut.png", png[: len(png) // 2]), "truncated"),
        "JPEG cut inside its header": (_write(tmp / "stub.jpg", jpeg[:300]), "truncated"),
        "corrupt PNG data": (_write(tmp / "garbled.png", corrupt_png), "corrupt"),
        "too small": (_write(tmp / "tiny.png", _encoded(_noise(20, 40), "PNG")), "too small"),
    }


@pytest.mark.parametrize("case", ["zero-byte", "text named .jpg", "random bytes",
                                  "truncated JPEG", "truncated PNG",
                                  "JPEG cut inside its header", "corrupt PNG data",
                                  "too small"])
def test_bad_images_raise_a_clear_error_naming_the_file(tmp_path: Path, case: str) -> None:
    path, reason = _bad_files(tmp_path)[case]
    with pytest.raises(ImageError) as caught:
        load_image(path, min_side=32)
    error = caught.value
    assert isinstance(error, ValueError)
    assert error.path == path
    assert path.name in str(error)
    assert reason in error.reason
    assert error.reason.count(path.name) == 0  # the reason is not wrapped twice


def test_missing_file_is_an_image_error(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="cannot read file"):
        load_image(tmp_path / "absent.png")


def test_truncated_images_are_not_loaded_leniently(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    path, _ = _bad_files(tmp_path)["truncated JPEG"]
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    with pytest.raises(ImageError):
        load_image(path)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # loading did not flip it
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # as another library might
    with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES"):
        load_image(path)


# --------------------------------------------------------------------------- modes

def _checked_load(tmp_path: Path, image: Image.Image, fmt: str, suffix: str):
    path = tmp_path / f"input{suffix}"
    image.save(path, format=fmt)
    loaded = load_image(path, min_side=8, min_std=0)  # flat colours: no blank check here
    assert loaded.image.mode == "RGB"
    assert np.asarray(loaded.image).dtype == np.uint8
    assert loaded.image.size == image.size
    return loaded


def test_rgba_is_composited_on_white_and_alpha_kept(tmp_path: Path) -> None:
    rgba = np.zeros((16, 16, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[:, 8:, 3] = 255  # right half opaque red, left half fully transparent
    loaded = _checked_load(tmp_path, Image.fromarray(rgba, "RGBA"), "PNG", ".png")
    pixels = np.asarray(loaded.image)
    assert tuple(pixels[0, 0]) == (255, 255, 255)
    assert tuple(pixels[0, 15]) == (200, 0, 0)
    assert loaded.alpha is not None
    np.testing.assert_array_equal(np.asarray(loaded.alpha), rgba[..., 3])
    assert loaded.source_mode == "RGBA" and "alpha kept" in loaded.mode_conversion


def test_palette_with_transparency_keeps_its_alpha(tmp_path: Path) -> None:
    palette_image = Image.new("P", (16, 16), 1)
    palette_image.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    palette_image.paste(0, (0, 0, 8, 16))
    palette_image.info["transparency"] = 0
    loaded = _checked_load(tmp_path, palette_image, "PNG", ".png")
    assert loaded.source_mode == "P"
    pixels = np.asarray(loaded.image)
    assert tuple(pixels[3, 3]) == (255, 255, 255)  # transparent index → white
    assert tuple(pixels[3, 12]) == (10, 200, 30)
    assert loaded.alpha is not None
    assert np.asarray(loaded.alpha)[3, 3] == 0 and np.asarray(loaded.alpha)[3, 12] == 255


def test_palette_without_transparency_has_no_alpha(tmp_path: Path) -> None:
    loaded = _checked_load(tmp_path, _noise(16, 16).convert("P"), "PNG", ".png")
    assert loaded.alpha is None and loaded.mode_conversion.startswith("P->RGB")


def test_cmyk_converts(tmp_path: Path) -> None:
    loaded = _checked_load(tmp_path, Image.new("CMYK", (16, 16), (0, 255, 0, 0)), "TIFF",
                           ".tif")
    assert loaded.source_mode == "CMYK"
    assert tuple(np.asarray(loaded.image)[5, 5]) == (255, 0, 255)  # full magenta ink


def test_16_bit_grayscale_is_scaled(tmp_path: Path) -> None:
    values = np.array([[0, 257 * 100], [65535, 257 * 17]], dtype=np.uint16).repeat(8, 0)
    values = values.repeat(8, 1)
    loaded = _checked_load(tmp_path, Image.fromarray(values), "PNG", ".png")
    assert loaded.source_mode.startswith("I")
    pixels = np.asarray(loaded.image)[::8, ::8, 0]
    np.testing.assert_array_equal(pixels, [[0, 100], [255, 17]])


def test_32_bit_integer_in_16_bit_range_is_scaled() -> None:
    values = np.full((8, 8), 257 * 40, dtype=np.int32)
    values[0, 0] = 65535
    rgb, alpha, how = to_rgb(Image.fromarray(values, "I"))
    assert alpha is None and "1/257" in how
    assert np.asarray(rgb)[1, 1, 0] == 40 and np.asarray(rgb)[0, 0, 0] == 255


def test_float_image_in_unit_range_is_scaled(tmp_path: Path) -> None:
    values = np.full((8, 8), 0.2, dtype=np.float32)
    values[0, 0] = 1.0
    loaded = _checked_load(tmp_path, Image.fromarray(values, "F"), "TIFF", ".tif")
    assert loaded.source_mode == "F"
    assert np.asarray(loaded.image)[1, 1, 0] == 51 and np.asarray(loaded.image)[0, 0, 0] == 255


@pytest.mark.parametrize("mode,value,expected", [("L", 77, (77, 77, 77)),
                                                 ("1", 1, (255, 255, 255)),
                                                 ("1", 0, (0, 0, 0))])
def test_grayscale_and_bilevel_convert(tmp_path: Path, mode: str, value: int,
                                       expected: tuple[int, int, int]) -> None:
    loaded = _checked_load(tmp_path, Image.new(mode, (16, 16), value), "PNG", ".png")
    assert tuple(np.asarray(loaded.image)[4, 4]) == expected
    assert loaded.alpha is None and loaded.source_mode == mode


def test_gray_with_alpha_keeps_alpha(tmp_path: Path) -> None:
    gray_alpha = Image.new("LA", (16, 16), (40, 255))
    gray_alpha.paste((40, 0), (0, 0, 16, 4))
    loaded = _checked_load(tmp_path, gray_alpha, "PNG", ".png")
    assert tuple(np.asarray(loaded.image)[0, 0]) == (255, 255, 255)
    assert tuple(np.asarray(loaded.image)[8, 8]) == (40, 40, 40)
    assert loaded.alpha is not None and np.asarray(loaded.alpha)[0, 0] == 0


def test_rgb_is_left_alone(tmp_path: Path) -> None:
    original = _noise(16, 16)
    loaded = _checked_load(tmp_path, original, "PNG", ".png")
    assert loaded.mode_conversion == "" and loaded.alpha is None
    np.testing.assert_array_equal(np.asarray(loaded.image), np.asarray(original))


# --------------------------------------------------------------------------- EXIF, hashing

def test_exif_orientation_6_rotates_the_image(tmp_path: Path) -> None:
    stored = np.zeros((40, 80, 3), dtype=np.uint8)
    stored[:, :40] = (255, 0, 0)  # left half red
    stored[:, 40:] = (0, 0, 255)  # right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    path = tmp_path / "rotated.jpg"
    Image.fromarray(stored).save(path, exif=exif, quality=95)
    loaded = load_image(path, min_side=8)
    assert loaded.source_size == (80, 40)
    assert loaded.image.size == (40, 80)
    assert loaded.exif_orientation == 6
    pixels = np.asarray(loaded.image).astype(int)
    assert pixels[10, 20, 0] > 200 and pixels[10, 20, 2] < 60  # top: the stored left (red)
    assert pixels[70, 20, 2] > 200 and pixels[70, 20, 0] < 60  # bottom: the stored right (blue)
    changes = normalise_image(loaded, 32).changes
    assert "EXIF orientation 6 applied" in changes.describe()


def test_hash_is_the_sha256_of_the_file_bytes_and_stable(tmp_path: Path) -> None:
    data = _encoded(_noise(40, 40), "PNG")
    first, copy = _write(tmp_path / "a.png", data), _write(tmp_path / "b.png", data)
    expected = hashlib.sha256(data).hexdigest()
    assert load_image(first).sha256 == expected == file_sha256(first)
    assert load_image(copy).sha256 == expected  # content, not name
    assert load_image(first).sha256 == expected  # stable across loads
    other = _write(tmp_path / "c.png", _encoded(_noise(40, 40, seed=5), "PNG"))
    assert load_image(other).sha256 != expected


def test_list_images_filters_by_suffix_and_sorts(tmp_path: Path) -> None:
    for name in ("b.JPG", "a.png", ".hidden.png", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "masks").mkdir()
    assert [p.name for p in list_images(tmp_path)] == ["a.png", "b.JPG"]


# --------------------------------------------------------------------------- squaring

def test_square_image_is_only_resized(tmp_path: Path) -> None:
    path = tmp_path / "square.png"
    _noise(100, 100).save(path)
    result = normalise_image(load_image(path), 64)
    assert result.image.size == (64, 64)
    assert result.changes.crop_box is None and result.changes.padding is None
    assert result.changes.resized_from == (100, 100)
    assert result.changes.describe() == ["resized from 100x100 to 64x64"]


def test_nearly_square_image_is_centre_cropped() -> None:
    fit = plan_square_fit((100, 105), 64)
    assert fit.crop_box == (0, 2, 100, 102) and not fit.padded


def test_elongated_image_is_padded_so_the_subject_survives(tmp_path: Path) -> None:
    wide = np.full((100, 200, 3), 128, dtype=np.uint8)
    wide[40:60, 0:20] = (255, 0, 0)  # a "subject" touching the left border
    wide[40:60, 180:200] = (0, 255, 0)  # and one touching the right border
    rgba = np.dstack([wide, np.full((100, 200), 255, dtype=np.uint8)])
    path = tmp_path / "wide.png"
    Image.fromarray(rgba, "RGBA").save(path)
    result = normalise_image(load_image(path), 100)
    assert result.fit.padding == (0, 50, 0, 50) and result.fit.crop_box == (0, 0, 200, 100)
    assert result.changes.padding == (0, 50, 0, 50) and result.changes.pad_mode == "edge"
    pixels = np.asarray(result.image).astype(int)
    assert pixels[50, 4, 0] > 200 and pixels[50, 4, 1] < 60  # red kept at the left
    assert pixels[50, 95, 1] > 200 and pixels[50, 95, 0] < 60  # green kept at the right
    assert result.alpha is not None
    alpha = np.asarray(result.alpha)
    assert alpha[:20].max() == 0 and alpha[30:70].min() == 255  # padding is background


def test_constant_padding_is_white_and_masks_replay_the_fit() -> None:
    fit = plan_square_fit((60, 30), 60, pad_mode="constant")
    mask = Image.new("L", (60, 30), 255)
    replayed = np.asarray(fit_mask(mask, fit))
    assert replayed.shape == (60, 60)
    assert replayed[:15].max() == 0 and replayed[15:45].min() == 255 and replayed[45:].max() == 0
    with pytest.raises(ValueError, match="planned for 60x30"):
        fit_mask(Image.new("L", (30, 60)), fit)


@pytest.mark.parametrize("kwargs,message", [({"resolution": 0}, "resolution"),
                                            ({"max_crop_ratio": 0.5}, "max_crop_ratio"),
                                            ({"pad_mode": "wrap"}, "pad_mode")])
def test_bad_fit_settings_are_rejected(kwargs: dict, message: str) -> None:
    settings = {"resolution": 64, **kwargs}
    with pytest.raises(ValueError, match=message):
        plan_square_fit((10, 20), **settings)


def test_tensor_round_trip() -> None:
    image = _noise(12, 10)
    tensor = pil_to_tensor(image)
    assert tensor.shape == (3, 10, 12) and tensor.dtype == torch.float32
    assert tensor.min() >= -1 and tensor.max() <= 1
    np.testing.assert_array_equal(np.asarray(tensor_to_pil(tensor)), np.asarray(image))
    clipped = tensor_to_pil(torch.full((3, 2, 2), 3.0))
    assert np.asarray(clipped).min() == 255
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        tensor_to_pil(torch.zeros(1, 3, 2, 2))
