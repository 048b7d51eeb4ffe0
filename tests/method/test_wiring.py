"""The trainer's and the sampler's wiring, seen from inside the real tiny UNet (docs/method.md
§2–5).

Spies are forward hooks on the UNet *instances* (the trained one, RRA's reference copy, the
sampler's) and a wrapper around one trainer's ``draw`` (an attribute of that instance): they
record what each UNet is called with, and every expectation is rebuilt here from the data, the
step's draws and the method description, not from the trainer's own set-up tensors:

- which band's latents meet which mix of the learned vectors (FDTE, §2–3);
- where the instance rows are noised and where their loss is taken, MGDP on and off (§4);
- prior rows: colour images, noised everywhere, class prompt, plain MSE (§2, §4);
- RRA's reference in training: the drawn photo, noised at max(t − 2, 0) with the row's ε (§5);
- RRA's reference at inference: the clean VAE mean at the current t (§5);
- every preset, on fixed draws: the loss falls, the trainable tensors move and nothing else.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from synthetic import random_concept, random_reference_image

from eqdiff.config import (
    METHOD_PRESETS,
    FrequencyConfig,
    LossConfig,
    MaskConfig,
    RRAConfig,
    RunConfig,
    SampleConfig,
    TrainConfig,
    method_preset,
)
from eqdiff.method.embeddings import add_placeholder_token
from eqdiff.method.frequency import Band, frequency_band
from eqdiff.method.losses import latent_masks
from eqdiff.method.models import load_sd_components
from eqdiff.method.reference import (
    REFERENCE_ROWS,
    augment_prior_images,
    training_extensions,
)
from eqdiff.method.sampling import ConceptGenerator, ImageRequest
from eqdiff.method.training import ConceptData, ConceptTrainer, StepDraws

RESOLUTION = 64  # the tiny VAE halves it: 32×32 latents
# what each band is conditioned on, as rows (S_LF, S_HF) of the learned vectors (§2, §3)
DOCUMENTED_MIX = {Band.LOW: (1.0, 0.0), Band.HIGH: (0.0, 1.0), Band.FULL: (1.0, 1.0)}
ONLY_FULL = FrequencyConfig(p_low=0.0, p_high=0.0, p_full=1.0)
ATOL = 1e-5


# --------------------------------------------------------------------------- set-up


def _config(*, frequency: FrequencyConfig = FrequencyConfig(), **train: object) -> RunConfig:
    """Tiny runs; a light dilation so the 32×32 latent masks keep a background; no weight
    decay, so a tensor moves only when a gradient reaches it."""
    settings = {"steps": 100, "resolution": RESOLUTION, "num_prior_images": 2,
                "learning_rate": 1e-3, "weight_decay": 0.0, **train}
    return RunConfig(frequency=frequency,
                     masks=MaskConfig(dilation_iterations=1, dilation_kernel=3),
                     train=TrainConfig(**settings))


def _data() -> ConceptData:
    """Three random photos, each with its own square subject mask, and two class images."""
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(3, 3, RESOLUTION, RESOLUTION, generator=gen) * 2 - 1
    masks = torch.zeros(3, 1, RESOLUTION, RESOLUTION)
    for i, (top, left) in enumerate([(4, 4), (28, 20), (12, 36)]):
        masks[i, :, top:top + 24, left:left + 24] = 1
    prior = torch.rand(2, 3, RESOLUTION, RESOLUTION, generator=gen) * 2 - 1
    return ConceptData("ball", "ball", images, masks, prior)


def _trainer(tiny_sd: str, method_name: str, cfg: RunConfig,
             data: ConceptData | None = None) -> ConceptTrainer:
    method = method_preset(method_name)
    return ConceptTrainer(load_sd_components(tiny_sd, local_files_only=True), data or _data(),
                          cfg, method, extensions=training_extensions(cfg.rra, method))


class UNetSpy:
    """Forward hooks on one UNet instance: each call's (sample, timestep, encoder states) and
    its output, detached copies."""

    NAMES = ("sample", "timestep", "encoder_hidden_states")

    def __init__(self, unet: torch.nn.Module) -> None:
        self.inputs: list[dict[str, torch.Tensor]] = []
        self.outputs: list[torch.Tensor] = []
        self._hooks = [unet.register_forward_pre_hook(self._before, with_kwargs=True),
                       unet.register_forward_hook(self._after)]

    def _before(self, _module, args, kwargs) -> None:
        values = dict(zip(self.NAMES, args, strict=False))
        values.update({name: kwargs[name] for name in self.NAMES if name in kwargs})
        self.inputs.append({name: torch.as_tensor(value).detach().clone()
                            for name, value in values.items()})

    def _after(self, _module, _args, output) -> None:
        self.outputs.append(output.sample.detach().clone())

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()


def _record_draws(trainer: ConceptTrainer) -> list[StepDraws]:
    """Wrap this trainer's ``draw``: every step's draws, in order."""
    seen: list[StepDraws] = []
    draw = trainer.draw

    def recording() -> StepDraws:
        seen.append(draw())
        return seen[-1]

    trainer.draw = recording
    return seen


@torch.no_grad()
def _vae_distribution(vae, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dist = vae.encode(images).latent_dist
    return dist.mean * vae.config.scaling_factor, dist.std * vae.config.scaling_factor


def _noised(z0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, scheduler) -> torch.Tensor:
    """√ᾱ_t · z_0 + √(1 − ᾱ_t) · ε, per row."""
    alpha = scheduler.alphas_cumprod[t].to(z0.dtype).reshape(-1, 1, 1, 1)
    return alpha.sqrt() * z0 + (1 - alpha).sqrt() * eps


def _latent_masks(data: ConceptData, cfg: RunConfig) -> torch.Tensor:
    return latent_masks(data.masks, RESOLUTION // 2, iterations=cfg.masks.dilation_iterations,
                        kernel=cfg.masks.dilation_kernel)


@torch.no_grad()
def _instance_prompt_with(trainer: ConceptTrainer, mix: tuple[float, float]) -> torch.Tensor:
    """The instance prompt encoded with the placeholder vector mix[0]·S_LF + mix[1]·S_HF."""
    with trainer.embeddings.mixing(torch.tensor([mix])):
        return trainer.components.text_encoder(trainer.instance_ids)[0][0]


@torch.no_grad()
def _class_prompt(trainer: ConceptTrainer, class_noun: str) -> torch.Tensor:
    tokenizer = trainer.components.tokenizer
    ids = tokenizer(class_noun, padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    return trainer.components.text_encoder(ids)[0][0]


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, atol=ATOL, rtol=0)


# --------------------------------------------------------------------------- FDTE


def test_each_band_latent_meets_its_embedding_mix(tiny_sd):
    """Low-band latents are conditioned on S_LF, high-band on S_HF, full-band on S_LF + S_HF,
    row by row, whatever bands a step draws (docs/method.md §2–3)."""
    cfg = _config(instance_batch=4,
                  frequency=FrequencyConfig(p_low=1 / 3, p_high=1 / 3, p_full=1 / 3))
    data = _data()
    trainer = _trainer(tiny_sd, "eqdiff-no-rra", cfg, data)
    try:
        with torch.no_grad():  # S_LF ≠ S_HF, so the three mixes give three different prompts
            trainer.embeddings.vectors.add_(
                torch.randn(trainer.embeddings.vectors.shape,
                            generator=torch.Generator().manual_seed(1)))
        draws = _record_draws(trainer)
        spy = UNetSpy(trainer.components.unet)
        vae, scheduler = trainer.components.vae, trainer.components.noise_scheduler
        band_latents = {Band.FULL: _vae_distribution(vae, data.images)}
        for band in (Band.LOW, Band.HIGH):
            band_latents[band] = _vae_distribution(vae, frequency_band(data.images, band,
                                                                       cfg.frequency))
        masks = _latent_masks(data, cfg)
        seen = set()
        for step in range(3):
            prompts = {band: _instance_prompt_with(trainer, mix)
                       for band, mix in DOCUMENTED_MIX.items()}  # the vectors of this step
            trainer.train_step()
            d, called = draws[step].tensors, spy.inputs[step]
            for row, drawn in enumerate(draws[step].bands):
                image, t = d["instance_indices"][row], d["timesteps"][row:row + 1]
                noise, mask = d["noise"][row:row + 1], masks[image]
                latent_of = {}
                for band, (mean, std) in band_latents.items():
                    z0 = mean[image:image + 1] + std[image:image + 1] * d["latent_eps"][row]
                    latent_of[band] = mask * _noised(z0, noise, t, scheduler) + (1 - mask) * z0
                latent_bands = [b for b, z in latent_of.items()
                                if _close(called["sample"][row:row + 1], z)]
                prompt_bands = [b for b, states in prompts.items()
                                if _close(called["encoder_hidden_states"][row], states)]
                assert latent_bands == [drawn], (step, row, drawn, latent_bands)
                assert prompt_bands == [drawn], (step, row, drawn, prompt_bands)
                seen.add(drawn)
        assert seen == set(Band)  # every band was checked
        spy.remove()
    finally:
        trainer.remove()


@pytest.mark.parametrize("band", [Band.LOW, Band.HIGH])
def test_a_step_of_one_band_trains_only_that_bands_vector(tiny_sd, band):
    """Steps whose rows are all low (high) band update S_LF (S_HF) and leave the other vector
    bit-identical (docs/method.md §3: the drawn bands decide which vectors get a gradient)."""
    only = FrequencyConfig(p_low=float(band is Band.LOW), p_high=float(band is Band.HIGH),
                           p_full=0.0)
    trainer = _trainer(tiny_sd, "eqdiff-no-rra", _config(frequency=only))
    try:
        before = trainer.learned_tensors()["eqdiff_token.vectors"]
        trainer.train_step()
        trainer.train_step()
        after = trainer.learned_tensors()["eqdiff_token.vectors"]
    finally:
        trainer.remove()
    trained = 0 if band is Band.LOW else 1  # rows: S_LF, S_HF
    assert not torch.equal(after[trained], before[trained])
    assert torch.equal(after[1 - trained], before[1 - trained])


# --------------------------------------------------------------------------- MGDP


@pytest.mark.parametrize(("method_name", "parts", "normalisation"), [
    ("eqdiff", "noising-and-loss", "released"), ("eqdiff-no-mgdp", "noising-and-loss", "released"),
    ("eqdiff", "noising-and-loss", "per-element"), ("eqdiff", "loss-only", "released"),
    ("eqdiff", "noising-only", "released"), ("custom-diffusion", "noising-and-loss", "released")])
def test_mgdp_noises_and_learns_the_subject_only_and_is_off_without_it(tiny_sd, method_name,
                                                                      parts, normalisation):
    """MGDP: inside the row's own (dilated) subject mask the latent is noised and the loss is
    taken; the background stays the clean latent and is not in the loss. Without MGDP the
    whole latent is noised and the loss is the plain MSE. Its halves (``mgdp_parts``) each turn
    on alone. The EqDiff loss is the mean squared error over the loss's elements, times the
    latent channels C with the released normalisation (the squared error divided by the mask's
    area alone); the baselines' is the plain MSE whatever the normalisation (docs/method.md
    §4)."""
    cfg = dataclasses.replace(_config(frequency=ONLY_FULL),
                              losses=LossConfig(instance_normalisation=normalisation))
    data = _data()
    method = dataclasses.replace(method_preset(method_name), mgdp_parts=parts)
    method = dataclasses.replace(method, recipe=dataclasses.replace(method.recipe, hflip=False))
    trainer = ConceptTrainer(load_sd_components(tiny_sd, local_files_only=True), data, cfg,
                             method, extensions=training_extensions(cfg.rra, method))
    try:
        draws = _record_draws(trainer)
        spy = UNetSpy(trainer.components.unet)
        trainer.train_step()
        spy.remove()
        d, called, pred = draws[0].tensors, spy.inputs[0], spy.outputs[0]
        bi = trainer.train.instance_batch
        mean, std = _vae_distribution(trainer.components.vae, data.images)
        image = d["instance_indices"]
        assert len(set(image.tolist())) > 1  # rows of different photos: different masks
        z0 = mean[image] + std[image] * d["latent_eps"][:bi]
        noise = d["noise"][:bi]
        noisy = _noised(z0, noise, d["timesteps"][:bi], trainer.components.noise_scheduler)
        subject = _latent_masks(data, cfg)[image].expand_as(z0).bool()
        background = ~subject
        assert bool(subject.any()) and bool(background.any())
        seen = called["sample"][:bi]
        assert torch.allclose(seen[subject], noisy[subject], atol=ATOL, rtol=0)
        assert not torch.allclose(noisy[background], z0[background], atol=1e-3)
        error = (pred[:bi] - noise).square()
        masked = torch.stack([error[row][subject[row]].mean() for row in range(bi)]).mean()
        plain = error.mean()
        assert not torch.isclose(masked, plain, rtol=1e-3)
        logged = trainer.loss_history[0]["loss/inst"]
        masked_noising = method.mgdp and parts != "loss-only"
        masked_loss = method.mgdp and parts != "noising-only"
        background_seen = z0 if masked_noising else noisy
        assert torch.allclose(seen[background], background_seen[background], atol=ATOL, rtol=0)
        assert z0.shape[1] == 4
        channels = (z0.shape[1] if normalisation == "released" and method.instance_loss == "eqdiff"
                    else 1)
        expected = channels * (masked if masked_loss else plain).item()
        assert logged == pytest.approx(expected, rel=1e-5)
    finally:
        trainer.remove()


# --------------------------------------------------------------------------- priors


def test_prior_rows_are_unfiltered_unmasked_and_use_the_class_prompt(tiny_sd):
    """With FDTE and MGDP on and every instance row band-filtered, the prior rows still show
    their colour class image, noised everywhere, with the class prompt and plain MSE
    (docs/method.md §2, §4)."""
    cfg = _config(frequency=FrequencyConfig(p_low=0.5, p_high=0.5, p_full=0.0))
    data = _data()
    trainer = _trainer(tiny_sd, "eqdiff-no-rra", cfg, data)
    try:
        draws = _record_draws(trainer)
        spy = UNetSpy(trainer.components.unet)
        trainer.train_step()
        spy.remove()
        d, called, pred = draws[0].tensors, spy.inputs[0], spy.outputs[0]
        bi = trainer.train.instance_batch
        assert Band.FULL not in draws[0].bands and trainer.prior_batch == 2
        mean, std = _vae_distribution(trainer.components.vae, data.prior_images)
        prior = d["prior_indices"]
        z0 = mean[prior] + std[prior] * d["latent_eps"][bi:]
        noise = d["noise"][bi:]
        expected = _noised(z0, noise, d["timesteps"][bi:], trainer.components.noise_scheduler)
        assert torch.allclose(called["sample"][bi:], expected, atol=ATOL, rtol=0)
        class_states = _class_prompt(trainer, data.class_noun)
        for row in range(bi, bi + trainer.prior_batch):
            assert torch.allclose(called["encoder_hidden_states"][row], class_states,
                                  atol=ATOL, rtol=0)
        assert trainer.loss_history[0]["loss/prior"] == pytest.approx(
            F.mse_loss(pred[bi:], noise).item(), rel=1e-5)
    finally:
        trainer.remove()


# --------------------------------------------------------------------------- RRA


def test_training_reference_is_the_drawn_photo_noised_at_t_minus_gap_with_the_rows_noise(
        tiny_sd):
    """The reference UNet sees, per instance row, the VAE mean of the drawn other photo and,
    per prior row, of the augmented class image, each noised with that row's ε (the main
    UNet's target) at max(t − gap, 0) (docs/method.md §5)."""
    cfg = _config()
    data = _data()
    trainer = _trainer(tiny_sd, "eqdiff", cfg, data)
    try:
        rra = trainer.extensions[-1]
        draws = _record_draws(trainer)
        main, reference = UNetSpy(trainer.components.unet), UNetSpy(rra.reference_unet)
        trainer.train_step()
        main.remove()
        reference.remove()
        d = draws[0].tensors
        bi = trainer.train.instance_batch
        assert len(reference.inputs) == len(main.inputs) == 1
        t = main.inputs[0]["timestep"]
        assert torch.equal(t, d["timesteps"]) and bool((t >= cfg.rra.timestep_gap).any())
        t_ref = (t - cfg.rra.timestep_gap).clamp_min(0)
        assert cfg.rra.timestep_gap == 2
        assert torch.equal(reference.inputs[0]["timestep"], t_ref)
        photos = d[REFERENCE_ROWS]
        assert bool((photos != d["instance_indices"]).all())  # another photo of the subject
        vae = trainer.components.vae
        instance_refs = _vae_distribution(vae, data.images)[0][photos]
        prior_refs = _vae_distribution(
            vae, augment_prior_images(data.prior_images))[0][d["prior_indices"]]
        z0 = torch.cat([instance_refs, prior_refs])
        expected = _noised(z0, d["noise"], t_ref, trainer.components.noise_scheduler)
        seen = reference.inputs[0]["sample"]
        assert torch.allclose(seen, expected, atol=ATOL, rtol=0)
        # the gap matters for these draws, and so does ε
        assert not torch.allclose(
            seen, _noised(z0, d["noise"], t, trainer.components.noise_scheduler), atol=1e-4)
        assert seen[:bi].shape == (bi, 4, RESOLUTION // 2, RESOLUTION // 2)
    finally:
        trainer.remove()


@pytest.mark.parametrize("reference_prompt", ["initial-row", "learned"])
def test_training_reference_prompt_is_the_initial_row_or_the_rows_own(tiny_sd,
                                                                      reference_prompt):
    """rra.reference_prompt (docs/method.md §5): "initial-row" conditions the reference UNet's
    instance rows on the instance prompt with the placeholder's initial embedding (as a fresh
    text encoder given the initializer's embedding encodes it) and its prior rows on the class
    prompt; "learned" on each row's own prompt states, those the main UNet gets."""
    cfg = dataclasses.replace(_config(frequency=ONLY_FULL),
                              rra=RRAConfig(reference_prompt=reference_prompt))
    trainer = _trainer(tiny_sd, "eqdiff", cfg)
    try:
        with torch.no_grad():  # the learned vectors away from the initial embedding
            trainer.embeddings.vectors.add_(torch.randn(
                trainer.embeddings.vectors.shape, generator=torch.Generator().manual_seed(2)))
        rra = trainer.extensions[-1]
        main, reference = UNetSpy(trainer.components.unet), UNetSpy(rra.reference_unet)
        trainer.train_step()
        main.remove()
        reference.remove()
        bi, bp = trainer.train.instance_batch, trainer.prior_batch
        initializer = trainer.train.initializer_token
    finally:
        trainer.remove()
    seen = reference.inputs[0]["encoder_hidden_states"]
    own = main.inputs[0]["encoder_hidden_states"]
    assert seen.shape[0] == bi + bp and bp > 0
    if reference_prompt == "learned":
        assert torch.allclose(seen, own, atol=ATOL, rtol=0)
        return
    fresh = load_sd_components(tiny_sd, local_files_only=True)
    add_placeholder_token(fresh.tokenizer, fresh.text_encoder, cfg.train.placeholder_token,
                          initializer)
    with torch.no_grad():
        initial = _encode(fresh, f"photo of a {cfg.train.placeholder_token} ball")
        class_prompt = _encode(fresh, "ball")
    for row in range(bi):
        assert torch.allclose(seen[row], initial, atol=ATOL, rtol=0)
        assert not torch.allclose(own[row], initial, atol=1e-3)
    for row in range(bi, bi + bp):
        assert torch.allclose(seen[row], class_prompt, atol=ATOL, rtol=0)


def _encode(components, prompt: str) -> torch.Tensor:
    tokenizer = components.tokenizer
    ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    return components.text_encoder(ids)[0][0]


@pytest.mark.parametrize("form", ["released", "per-layer"])
def test_rra_loss_reads_the_layers_and_takes_the_form_of_losses_rra_loss_form(tiny_sd, form):
    """losses.rra_loss_form (docs/method.md §6), rebuilt from the recorded RRA attention: the
    "released" loss reads the 16×16 up-block layers only, pools heads and layers, and is
    MSE(s·M, M) over every query; "per-layer" also reads the mid layer (16×16 here, side <= 16)
    and averages (m − 1)² over in-mask queries, per head and layer."""
    cfg = dataclasses.replace(_config(), losses=LossConfig(rra_loss_form=form))
    data = _data()
    trainer = _trainer(tiny_sd, "eqdiff", cfg, data)
    try:
        rra = trainer.extensions[-1]
        readers = sorted(name for name, processor in rra.handle.installed.items()
                         if processor.capture is not None)
        recorded: list[torch.Tensor] = []
        record = rra.capture.record

        def recording(probs: torch.Tensor) -> None:
            recorded.append(probs.detach().clone())
            record(probs)

        rra.capture.record = recording
        draws = _record_draws(trainer)
        trainer.train_step()
        logged = trainer.loss_history[0]["loss/rra"]
        bi = trainer.train.instance_batch
    finally:
        trainer.remove()
    up = [name for name in readers if name.startswith("up_blocks.")]
    if form == "released":
        assert readers == up and len(up) == 2
    else:
        assert len(readers) == 3 and any(name.startswith("mid_block.") for name in readers)
    assert len(recorded) == len(readers)
    assert {tuple(p.shape[-2:]) for p in recorded} == {(256, 256)}  # 16×16 queries and keys
    d = draws[0].tensors
    # the masks' squares lie on the 4-pixel cells of the 16×16 grid: a cell is in or out
    queries = F.avg_pool2d(data.masks[d["instance_indices"]], 4).flatten(1)  # (Bi, 256)
    keys = F.avg_pool2d(data.masks[d[REFERENCE_ROWS]], 4).flatten(1)
    assert set(queries.unique().tolist()) == set(keys.unique().tolist()) == {0.0, 1.0}
    if form == "released":
        pooled = torch.cat([p[:bi] for p in recorded], dim=1).mean(dim=1)
        mass = (pooled * keys[:, None, :]).sum(-1)
        expected = ((mass * queries - queries) ** 2).mean()
    else:
        per_layer = []
        for probs in recorded:
            mass = (probs[:bi] * keys[:, None, None, :]).sum(-1)  # (Bi, heads, Nq)
            error = ((mass - 1) ** 2 * queries[:, None]).sum(dim=(1, 2))
            per_layer.append((error / (probs.shape[1] * queries.sum(1))).mean())
        expected = torch.stack(per_layer).mean()
    assert logged == pytest.approx(expected.item(), rel=1e-4)


def test_inference_reference_is_the_clean_vae_mean_at_the_current_t(tiny_sd, tmp_path):
    """At every denoising step the reference UNet gets the reference photo's VAE mean, not
    noised, at the step's t, with the plain class caption (docs/method.md §5)."""
    sample = SampleConfig(steps=3, resolution=RESOLUTION, batch_size=2)
    generator = ConceptGenerator(load_sd_components(tiny_sd, local_files_only=True), sample)
    concept = random_concept(tiny_sd, tmp_path / "concept", rra=True)
    photo = random_reference_image()
    main, reference = UNetSpy(generator.components.unet), UNetSpy(generator.reference_unet)
    try:
        generator.generate(concept, [ImageRequest("a <eqd> ball", seed=1),
                                     ImageRequest("a <eqd> ball", seed=2)],
                           reference_image=photo)
    finally:
        main.remove()
        reference.remove()
    clean = _vae_distribution(generator.components.vae, photo[None])[0]
    tokenizer = generator.components.tokenizer
    ids = tokenizer("a ball", padding="max_length", max_length=tokenizer.model_max_length,
                    return_tensors="pt").input_ids
    with torch.no_grad():
        caption = generator.components.text_encoder(ids)[0]
    assert len(reference.inputs) == len(main.inputs) == sample.steps
    timesteps = [int(call["timestep"]) for call in main.inputs]
    assert len(set(timesteps)) == sample.steps
    for ref_call, main_call in zip(reference.inputs, main.inputs, strict=True):
        assert torch.allclose(ref_call["sample"], clean, atol=1e-6, rtol=0)
        assert torch.equal(ref_call["timestep"], main_call["timestep"])
        assert torch.allclose(ref_call["encoder_hidden_states"], caption, atol=ATOL, rtol=0)


# --------------------------------------------------------------------------- every preset

FIXED_DRAW_STEPS = 4


@dataclass
class FixedDrawRun:
    """A few steps of one preset, every step on the same draws."""

    method_name: str
    draws: StepDraws
    losses: list[float]
    learned_before: dict[str, torch.Tensor]
    learned_after: dict[str, torch.Tensor]
    optimized: set[int]  # ids of the tensors the optimizer updates
    requires_grad: set[int]  # ids of every tensor of the run that requires a gradient
    frozen_before: dict[str, torch.Tensor]
    frozen_after: dict[str, torch.Tensor]


def _frozen_state(components) -> dict[str, torch.Tensor]:
    return {f"{part}.{name}": tensor.detach().clone()
            for part in ("unet", "text_encoder", "vae")
            for name, tensor in getattr(components, part).state_dict().items()}


@pytest.fixture(scope="module", params=sorted(METHOD_PRESETS))
def fixed_draw_run(request, tiny_sd) -> FixedDrawRun:
    """The preset trained for a few steps on one fixed step's draws (the same photos, bands,
    noise, timesteps and references every step), with a large learning rate."""
    cfg = _config(learning_rate=1e-2)
    method = method_preset(request.param)
    components = load_sd_components(tiny_sd, local_files_only=True)
    frozen_before = _frozen_state(components)
    trainer = ConceptTrainer(components, _data(), cfg, method,
                             extensions=training_extensions(cfg.rra, method))
    try:
        learned_before = trainer.learned_tensors()
        fixed = trainer.draw()
        trainer.draw = lambda: fixed
        for _ in range(FIXED_DRAW_STEPS):
            trainer.train_step()
        modules = [components.unet, components.text_encoder, components.vae, trainer.embeddings,
                   *(network for extension in trainer.extensions
                     for network in extension.networks())]
        requires_grad = {id(p) for module in modules for p in module.parameters()
                         if p.requires_grad}
        optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
        run = FixedDrawRun(request.param, fixed, [h["loss"] for h in trainer.loss_history],
                           learned_before, trainer.learned_tensors(), optimized, requires_grad,
                           frozen_before, {})
    finally:
        trainer.remove()
    run.frozen_after = _frozen_state(components)
    return run


def test_every_preset_lowers_its_loss_on_fixed_draws(fixed_draw_run):
    losses = fixed_draw_run.losses
    assert len(losses) == FIXED_DRAW_STEPS
    assert losses[-1] < losses[0], (fixed_draw_run.method_name, losses)


def test_every_preset_moves_its_trainable_tensors_and_nothing_else(fixed_draw_run):
    run = fixed_draw_run
    method = method_preset(run.method_name)
    assert run.optimized == run.requires_grad  # nothing else could receive a gradient
    prefixes = {name.split(".")[0] for name in run.learned_after}
    assert prefixes == {"eqdiff_token"} | ({"eqdiff_kv"} if method.train_kv else set()) | (
        {"eqdiff_rra"} if method.rra else set()) | ({"eqdiff_lora"} if method.unet_lora else set())
    assert run.learned_after.keys() == run.learned_before.keys()
    # Every trainable tensor moves, the RRA layers' included. On these draws the first update
    # closes one layer's gate at every position (m < 0) in `eqdiff` and `eqdiff-no-fdte`; the
    # default straight-through gate gradient (rra.gate_gradient, docs/method.md §5) still
    # reaches that layer's W'_k and W'_v through the gate (with "inside" they would freeze:
    # tests/method/test_rra.py checks the two modes).
    for name, after in run.learned_after.items():
        if name != "eqdiff_token.vectors":
            assert not torch.equal(after, run.learned_before[name]), name
    # S_LF moves when a low or full row was drawn, S_HF when a high or full row was; a vector
    # no drawn band uses gets no gradient and stays bit-identical (no weight decay here), and
    # a method that does not train the token keeps its initializer's vector
    vectors_before = run.learned_before["eqdiff_token.vectors"]
    vectors_after = run.learned_after["eqdiff_token.vectors"]
    assert vectors_after.shape[0] == (2 if method.fdte else 1)
    for row in range(vectors_after.shape[0]):
        used = any(DOCUMENTED_MIX[band][row] for band in run.draws.bands) and method.train_token
        assert used == (not torch.equal(vectors_after[row], vectors_before[row])), (row, used)
    # the base model, back without its processors and adapters: bit-identical, the
    # placeholder's table row included (it keeps the initializer's embedding)
    assert run.frozen_after.keys() == run.frozen_before.keys()
    for name, before in run.frozen_before.items():
        after = run.frozen_after[name]
        if name.endswith("embeddings.token_embedding.weight"):
            assert torch.equal(after[:before.shape[0]], before)
            assert torch.equal(after[before.shape[0]:], vectors_before[:1])
        else:
            assert torch.equal(after, before), name
