"""Properties of the frequency decomposition and band sampling (docs/method.md §2)."""

import math

import pytest
import torch

from eqdiff.config import FrequencyConfig
from eqdiff.method.frequency import (
    Band,
    apply_bands,
    band_filter,
    filter_images,
    frequency_band,
    sample_bands,
)

SHAPES = ("box", "gaussian", "butterworth")


def random_images(batch: int = 2, size: int = 32, scale: float = 1.0, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(batch, 3, size, size, generator=generator) * 2 - 1) * scale


def cosine_image(size: int, cycles: int, amplitude: float = 0.5) -> torch.Tensor:
    """A (1, 3, size, size) gray image with `cycles` periods along the width."""
    x = torch.arange(size, dtype=torch.float64)
    row = amplitude * torch.cos(2 * math.pi * cycles * x / size)
    return row.expand(1, 3, size, size).to(torch.float32)


@pytest.mark.parametrize("shape", SHAPES)
def test_low_pass_keeps_a_constant_image_and_high_pass_removes_it(shape):
    image = torch.full((1, 3, 32, 32), 0.37)
    config = FrequencyConfig(filter_shape=shape)
    torch.testing.assert_close(frequency_band(image, "low", config), image)
    torch.testing.assert_close(frequency_band(image, "high", config), torch.zeros_like(image))


@pytest.mark.parametrize("shape", SHAPES)
def test_low_plus_high_with_the_same_cutoff_reconstructs_the_image(shape):
    gray = random_images(scale=0.5).mean(dim=1, keepdim=True).double()
    low_mask = band_filter(32, 32, cutoff=0.3, kind="low", shape=shape, dtype=torch.float64)
    high_mask = band_filter(32, 32, cutoff=0.3, kind="high", shape=shape, dtype=torch.float64)
    low = filter_images(gray, low_mask).real
    high = filter_images(gray, high_mask).real
    torch.testing.assert_close(low + high, gray, rtol=0, atol=1e-12)
    # Neither band alone is the image: the split is not trivial.
    assert (low - gray).abs().max() > 0.05
    assert (high - gray).abs().max() > 0.05


def test_box_low_pass_keeps_frequencies_below_the_cutoff_and_removes_the_rest():
    # 50/256 at 64 px is 6.25 bins: 6 cycles pass untouched, 7 cycles are removed.
    config = FrequencyConfig()
    kept = cosine_image(64, 6)
    removed = cosine_image(64, 7)
    torch.testing.assert_close(frequency_band(kept, "low", config), kept, rtol=0, atol=1e-5)
    assert frequency_band(removed, "low", config).abs().max() < 1e-5


def test_box_high_pass_removes_frequencies_below_the_cutoff():
    # 5/256 at 256 px is 2.5 bins: 2 cycles are removed, 3 cycles pass.
    config = FrequencyConfig()
    assert frequency_band(cosine_image(256, 2), "high", config).abs().max() < 1e-5
    kept = cosine_image(256, 3)
    torch.testing.assert_close(frequency_band(kept, "high", config), kept, rtol=0, atol=1e-5)


def test_box_filter_at_512_keeps_exactly_the_released_squares():
    low = band_filter(512, 512, cutoff=50 / 256, kind="low", shape="box")
    assert set(low.unique().tolist()) == {0.0, 1.0}
    assert int(low.sum()) == 99 * 99  # |u|, |v| < 50 bins: -49..49 on each axis
    centre = 256  # index of the zero frequency after fftshift
    assert low[centre + 49, centre - 49] == 1 and low[centre - 49, centre + 49] == 1
    assert low[centre + 50, centre] == 0 and low[centre, centre - 50] == 0
    high = band_filter(512, 512, cutoff=5 / 256, kind="high", shape="box")
    assert int((high == 0).sum()) == 9 * 9  # removes |u|, |v| < 5 bins
    assert high[centre, centre] == 0 and high[centre + 4, centre - 4] == 0
    assert high[centre + 5, centre] == 1


@pytest.mark.parametrize("shape", ("gaussian", "butterworth"))
def test_smooth_filters_have_half_gain_at_the_cutoff_and_high_is_one_minus_low(shape):
    low = band_filter(64, 64, cutoff=0.25, kind="low", shape=shape, order=3)
    high = band_filter(64, 64, cutoff=0.25, kind="high", shape=shape, order=3)
    centre = 32
    assert low[centre, centre] == 1  # DC passes
    assert low[centre, centre + 8].item() == pytest.approx(0.5)  # 8 bins = 0.25 of 32
    assert low[centre - 8, centre].item() == pytest.approx(0.5)
    assert low[centre, centre + 4] > 0.5 > low[centre, centre + 12]
    torch.testing.assert_close(high, 1 - low)


@pytest.mark.parametrize("shape", SHAPES)
def test_filter_scales_with_resolution(shape):
    """Bin 2k at 128 px is the same normalised frequency as bin k at 64 px."""
    small = band_filter(64, 64, cutoff=50 / 256, kind="low", shape=shape)
    large = band_filter(128, 128, cutoff=50 / 256, kind="low", shape=shape)
    torch.testing.assert_close(large[::2, ::2], small)  # index 2i holds bin 2(i - 32)
    assert small.mean().item() == pytest.approx(large.mean().item(), abs=0.01)


def test_band_filter_returns_a_fresh_tensor():
    first = band_filter(16, 16, cutoff=0.5, kind="low", shape="box")
    first.zero_()
    assert band_filter(16, 16, cutoff=0.5, kind="low", shape="box").sum() > 0


@pytest.mark.parametrize("kwargs", [
    {"cutoff": 0.0, "kind": "low", "shape": "box"},
    {"cutoff": float("nan"), "kind": "low", "shape": "box"},
    {"cutoff": 0.2, "kind": "band", "shape": "box"},
    {"cutoff": 0.2, "kind": "low", "shape": "disk"},
    {"cutoff": 0.2, "kind": "low", "shape": "butterworth", "order": 0},
])
def test_band_filter_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        band_filter(16, 16, **kwargs)


def test_real_output_is_clamped_to_the_pixel_range():
    # A ±1 checkerboard (period 8 px) whose harmonics an ideal box removes overshoots ±1.
    index = torch.arange(32)
    board = ((index[:, None] // 4 + index[None, :] // 4) % 2 * 2 - 1).float()
    images = board.expand(1, 3, 32, 32)
    config = FrequencyConfig(low_cutoff=0.6, high_cutoff=0.1)
    unclamped = filter_images(images.mean(dim=1), band_filter(
        32, 32, cutoff=0.6, kind="low", shape="box")).real
    assert unclamped.abs().max() > 1.05  # the clamp has something to do
    low = frequency_band(images, "low", config)
    assert low.min() == -1 and low.max() == 1
    high = frequency_band(random_images(), "high", config)
    assert high.min() >= -1 and high.max() <= 1


def test_abs_output_is_non_negative_and_folds_the_real_output():
    images = random_images()
    real = frequency_band(images, "high", FrequencyConfig(band_output="real"))
    folded = frequency_band(images, "high", FrequencyConfig(band_output="abs"))
    assert real.min() < 0  # the high band of an image has negative values
    assert folded.min() >= 0
    torch.testing.assert_close(folded, real.abs(), rtol=0, atol=1e-5)


def test_grayscale_bands_have_three_identical_channels_from_the_channel_mean():
    images = random_images()
    config = FrequencyConfig()
    out = frequency_band(images, "low", config)
    assert out.shape == images.shape
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 0], out[:, 2])
    gray = images.mean(dim=1, keepdim=True).repeat(1, 3, 1, 1)
    torch.testing.assert_close(out, frequency_band(gray, "low", config))


def test_grayscale_off_filters_each_colour_channel():
    images = random_images()
    config = FrequencyConfig(grayscale_bands=False)
    out = frequency_band(images, "low", config)
    assert not torch.allclose(out[:, 0], out[:, 1])
    for channel in range(3):
        alone = images[:, channel : channel + 1].repeat(1, 3, 1, 1)
        torch.testing.assert_close(out[:, channel], frequency_band(alone, "low", config)[:, 0])


def test_dtype_and_device_are_preserved():
    images = random_images()
    config = FrequencyConfig()
    reference = frequency_band(images, "low", config)
    for dtype in (torch.bfloat16, torch.float16, torch.float64):
        out = frequency_band(images.to(dtype), "high", config)
        assert out.dtype == dtype and out.device == images.device
        low = frequency_band(images.to(dtype), "low", config)
        torch.testing.assert_close(low.float(), reference, rtol=0, atol=0.02)


def test_frequency_band_rejects_full_and_malformed_input():
    config = FrequencyConfig()
    with pytest.raises(ValueError):
        frequency_band(random_images(), "full", config)
    with pytest.raises(ValueError):
        frequency_band(random_images()[0], "low", config)
    with pytest.raises(ValueError):
        frequency_band(torch.zeros(1, 3, 8, 8, dtype=torch.int64), "low", config)


def test_sampled_band_frequencies_match_the_probabilities():
    config = FrequencyConfig()
    draws = sample_bands(20_000, config, torch.Generator().manual_seed(0))
    counts = {band: draws.count(band) / len(draws) for band in Band}
    assert counts[Band.LOW] == pytest.approx(config.p_low, abs=0.01)
    assert counts[Band.HIGH] == pytest.approx(config.p_high, abs=0.01)
    assert counts[Band.FULL] == pytest.approx(config.p_full, abs=0.01)

    skewed = FrequencyConfig(p_low=0.3, p_high=0.7, p_full=0.0)
    draws = sample_bands(5_000, skewed, torch.Generator().manual_seed(1))
    assert Band.FULL not in draws
    assert draws.count(Band.LOW) / len(draws) == pytest.approx(0.3, abs=0.03)


def test_band_sampling_is_reproducible_and_resumable():
    config = FrequencyConfig()
    first = sample_bands(64, config, torch.Generator().manual_seed(7))
    assert first == sample_bands(64, config, torch.Generator().manual_seed(7))
    assert first != sample_bands(64, config, torch.Generator().manual_seed(8))
    generator = torch.Generator().manual_seed(7)
    sample_bands(8, config, generator)
    state = generator.get_state()
    continued = sample_bands(16, config, generator)
    generator.set_state(state)
    assert sample_bands(16, config, generator) == continued


def test_apply_bands_filters_each_sample_in_its_own_band():
    images = random_images(batch=4)
    original = images.clone()
    config = FrequencyConfig()
    bands = [Band.FULL, "low", Band.HIGH, Band.LOW]
    out = apply_bands(images, bands, config)
    assert torch.equal(images, original)  # input untouched
    assert torch.equal(out[0], images[0])  # full band: the RGB image itself
    torch.testing.assert_close(out[1:2], frequency_band(images[1:2], "low", config))
    torch.testing.assert_close(out[2:3], frequency_band(images[2:3], "high", config))
    torch.testing.assert_close(out[3:4], frequency_band(images[3:4], "low", config))
    with pytest.raises(ValueError):
        apply_bands(images, bands[:3], config)
    with pytest.raises(ValueError):
        apply_bands(images, ["low", "mid", "high", "full"], config)
