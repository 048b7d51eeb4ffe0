"""The toy world: rendering, captions, held-out subjects and the benchmark dataset."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from eqdiff.data.datasets import load_dataset
from eqdiff.fixtures.toyworld.base_model import denoising_loss, latent_loss_weights, min_snr_weights
from eqdiff.fixtures.toyworld.dataset import prompt_change, prompt_templates, write_toy_dataset
from eqdiff.fixtures.toyworld.world import (
    CONTEXTS,
    NOVEL_PATTERNS,
    NOVEL_SUBJECTS,
    STYLES,
    ObjectSpec,
    SceneSpec,
    caption,
    is_novel,
    random_object,
    random_scene,
    render,
)
from eqdiff.fixtures.zoo import SD_SCHEDULE


def _pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def test_render_is_deterministic_and_masks_cover_the_object() -> None:
    obj = ObjectSpec("ball", "red", "striped", "white")
    scene = SceneSpec(context="plain", style="photo", x=0.5, y=0.5, size=0.3, seed=7)
    first, mask = render(obj, scene)
    second, _ = render(obj, scene)
    assert first.size == mask.size == (32, 32) and first.mode == "RGB" and mask.mode == "L"
    assert np.array_equal(_pixels(first), _pixels(second))
    coverage = (np.asarray(mask) > 0).mean()
    assert abs(coverage - np.pi * 0.3 ** 2) < 0.05  # a disc of radius 0.3 of the side
    inside = _pixels(first)[np.asarray(mask) > 0]
    assert inside[:, 0].mean() > inside[:, 2].mean() + 40  # red body, white stripes


def test_context_changes_the_background_and_not_the_object() -> None:
    obj = ObjectSpec("cube", "blue")
    base = SceneSpec(context="plain", style="photo", seed=3)
    plain, mask = render(obj, base)
    snow, snow_mask = render(obj, SceneSpec(context="snow", style="photo", seed=3))
    assert np.array_equal(np.asarray(mask), np.asarray(snow_mask))
    core = np.asarray(mask.resize((32, 32))) > 0
    eroded = core & np.roll(core, 2, 0) & np.roll(core, -2, 0) & np.roll(core, 2, 1) \
        & np.roll(core, -2, 1)
    object_change = np.abs(_pixels(plain) - _pixels(snow))[eroded].mean()
    background_change = np.abs(_pixels(plain) - _pixels(snow))[~core].mean()
    assert object_change < 12 < background_change


@pytest.mark.parametrize("style", [s for s in STYLES if s != "photo"])
def test_styles_change_the_image(style: str) -> None:
    obj = ObjectSpec("star", "yellow", "dotted", "blue")
    photo, _ = render(obj, SceneSpec(style="photo", seed=1))
    styled, _ = render(obj, SceneSpec(style=style, seed=1))
    assert np.abs(_pixels(photo) - _pixels(styled)).mean() > 10


def test_watercolor_is_a_low_frequency_change_and_pixel_art_a_high_one() -> None:
    obj = ObjectSpec("ring", "green", "checkered", "white")

    def high_energy(image) -> float:
        grey = _pixels(image.convert("L")).astype(np.float64)
        spectrum = np.abs(np.fft.fftshift(np.fft.fft2(grey - grey.mean())))
        yy, xx = np.mgrid[-16:16, -16:16]
        return float(spectrum[np.hypot(yy, xx) > 8].sum() / spectrum.sum())

    scene = SceneSpec(context="plain", seed=2)
    photo = high_energy(render(obj, scene)[0])
    assert high_energy(render(obj, SceneSpec(context="plain", style="watercolor", seed=2))[0]) \
        < photo
    assert high_energy(render(obj, SceneSpec(context="plain", style="pixel art", seed=2))[0]) \
        > high_energy(render(obj, SceneSpec(context="plain", style="watercolor", seed=2))[0])


def test_captions_name_the_attributes() -> None:
    obj = ObjectSpec("cone", "orange", "dotted", "black")
    assert caption(obj, SceneSpec(context="beach", style="sketch")) == \
        "a pencil sketch of an orange cone with black dots on the beach"
    split = ObjectSpec("star", "red", "split", "blue")
    assert caption(split, SceneSpec(style="pixel art")) == \
        "a pixel art image of a red star with a blue half"
    # the pattern colour is named: swapped colours give different captions
    assert caption(ObjectSpec("ball", "red", "striped", "blue"), SceneSpec()) != \
        caption(ObjectSpec("ball", "blue", "striped", "red"), SceneSpec())
    assert caption(ObjectSpec("cup", "red"), SceneSpec()) == "a photo of a red cup"
    assert caption(obj, SceneSpec(context="city", style="neon"), describe="<eqd> cone") == \
        "a neon drawing of a <eqd> cone in the city"


def test_bad_specs_are_refused_with_the_known_values() -> None:
    with pytest.raises(ValueError, match="unknown class 'dog'"):
        ObjectSpec("dog", "red")
    with pytest.raises(ValueError, match="pattern colour other than"):
        ObjectSpec("ball", "red", "striped", "red")
    with pytest.raises(ValueError, match="unknown context 'moon'.*beach"):
        SceneSpec(context="moon")
    with pytest.raises(ValueError, match="size must be >= 16"):
        render(ObjectSpec("ball", "red"), SceneSpec(), size=8)


def test_training_draws_never_contain_the_novel_subjects() -> None:
    rng = np.random.default_rng(0)
    objects = [random_object(rng) for _ in range(3000)]
    assert not any(is_novel(o) for o in objects)
    assert not {o.pattern for o in objects} & set(NOVEL_PATTERNS)
    for subject in NOVEL_SUBJECTS.values():
        assert is_novel(subject)
        assert (subject.shape, subject.colour) not in {(o.shape, o.colour) for o in objects}
    every = {random_object(rng, allow_novel=True).pattern for _ in range(500)}
    assert set(NOVEL_PATTERNS) <= every
    scenes = [random_scene(rng) for _ in range(300)]
    assert {s.context for s in scenes} == set(CONTEXTS)
    assert {s.style for s in scenes} == set(STYLES)


def test_toy_dataset_loads_with_masks_and_the_prompt_set(tmp_path: Path) -> None:
    root = write_toy_dataset(tmp_path / "toy", subjects=["zigzag_ring", "split_star"],
                             images_per_subject=4, seed=1)
    dataset = load_dataset(root)
    assert sorted(s.name for s in dataset.subjects) == ["split_star", "zigzag_ring"]
    ring = dataset.subject("zigzag_ring")
    assert ring.class_noun == "ring" and len(ring.image_paths) == 4
    assert ring.mask_dir is not None and len(list(ring.mask_dir.glob("*.png"))) == 4
    prompts = dataset.prompts_for(ring).render("<eqd>", "ring")
    assert prompts == [t.format(token="<eqd>", class_noun="ring") for t in prompt_templates()]
    kinds = [prompt_change(p)[0] for p in prompts]
    assert kinds.count("context") == len(CONTEXTS) - 1
    assert kinds.count("style") == len(STYLES) - 1
    again = write_toy_dataset(tmp_path / "again", subjects=["zigzag_ring", "split_star"],
                              images_per_subject=4, seed=1)
    for a, b in zip(sorted(root.rglob("*.png")), sorted(again.rglob("*.png")), strict=True):
        assert a.read_bytes() == b.read_bytes()
    with pytest.raises(ValueError, match="unknown toy subjects"):
        write_toy_dataset(tmp_path / "bad", subjects=["../etc"])


def test_prompt_change_reads_the_requested_context_and_style() -> None:
    assert prompt_change("a photo of a <eqd> cup in the snow") == ("context", "snow", "photo")
    assert prompt_change("a pixel art image of a cup") == ("style", "plain", "pixel art")
    assert prompt_change("a photo of a cup") == ("same", "plain", "photo")


# --------------------------------------------------------------------------- base-model loss

def test_latent_loss_weights_follow_the_object_mask() -> None:
    masks = np.zeros((1, 4, 4), dtype=np.uint8)
    masks[0, :2, :2] = 255  # the top-left latent pixel is all object
    masks[0, 2, 2:] = 255  # the bottom-right one is half object
    weights = latent_loss_weights(masks, 2, object_weight=2.0)
    assert weights.shape == (1, 1, 2, 2)
    torch.testing.assert_close(weights[0, 0], torch.tensor([[3.0, 1.0], [1.0, 2.0]]))


def test_min_snr_weights_cap_the_easy_timesteps() -> None:
    alphas = DDPMScheduler(**SD_SCHEDULE).alphas_cumprod
    t = torch.arange(0, 1000, 37)
    weights = min_snr_weights(alphas, t, gamma=5.0)
    snr = alphas[t] / (1 - alphas[t])
    torch.testing.assert_close(weights[snr <= 5], torch.ones(int((snr <= 5).sum())))
    torch.testing.assert_close(weights[snr > 5], 5.0 / snr[snr > 5])
    assert (weights[snr > 5] < 1).all() and (snr > 5).any() and (snr <= 5).any()
    assert torch.equal(min_snr_weights(alphas, t, gamma=0.0), torch.ones(len(t)))


def test_denoising_loss_with_uniform_weights_is_the_plain_mse() -> None:
    generator = torch.Generator().manual_seed(0)
    prediction, noise = torch.randn(3, 4, 8, 8, generator=generator), torch.randn(3, 4, 8, 8)
    ones = torch.ones(3, 1, 8, 8)
    torch.testing.assert_close(denoising_loss(prediction, noise, ones, torch.ones(3)),
                               F.mse_loss(prediction, noise))
    # weight on a region where the error is zero lowers the loss; sample weights scale it
    prediction[:, :, :4] = noise[:, :, :4]
    weighted = ones.clone()
    weighted[:, :, :4] = 3.0
    assert denoising_loss(prediction, noise, weighted, torch.ones(3)) < \
        denoising_loss(prediction, noise, ones, torch.ones(3))
    torch.testing.assert_close(denoising_loss(prediction, noise, ones, torch.full((3,), 0.5)),
                               0.5 * denoising_loss(prediction, noise, ones, torch.ones(3)))
