"""The concept generator on the tiny offline SD: equality with diffusers, batching, RRA,
concept switching, seeds and PNG metadata, and the whole EqDiff method end to end."""

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from synthetic import random_concept as _concept
from synthetic import random_reference_image

from eqdiff.config import RunConfig, SampleConfig, TrainConfig, method_preset
from eqdiff.method.concept import ConceptError, load_concept, save_concept
from eqdiff.method.models import load_sd_components
from eqdiff.method.reference import RRAProcessor, training_extensions
from eqdiff.method.sampling import (
    ConceptGenerator,
    ImageRequest,
    image_seed,
    make_scheduler,
    plan_requests,
    read_png_metadata,
)
from eqdiff.method.training import ConceptData, train_concept

RESOLUTION = 64
SAMPLE = SampleConfig(steps=2, resolution=RESOLUTION, batch_size=4)



@pytest.fixture(scope="module")
def generator(tiny_sd):
    return ConceptGenerator(load_sd_components(tiny_sd, local_files_only=True), SAMPLE)


def _stack(generated):
    return torch.stack([g.image for g in generated])


PROMPTS = ["a <eqd> ball on the beach", "a watercolor painting of a <eqd> ball"]


def test_without_rra_it_equals_the_diffusers_pipeline(generator):
    requests = plan_requests("ball", PROMPTS, 2, base_seed=0)
    ours = _stack(generator.generate(None, requests))
    c = generator.components
    pipe = StableDiffusionPipeline(
        vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer, unet=c.unet,
        scheduler=DDIMScheduler.from_config(c.noise_scheduler.config), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    theirs = pipe([r.prompt for r in requests], num_inference_steps=SAMPLE.steps,
                  guidance_scale=SAMPLE.guidance_scale, height=RESOLUTION, width=RESOLUTION,
                  generator=[torch.Generator().manual_seed(r.seed) for r in requests],
                  output_type="pt").images
    assert torch.allclose(ours, theirs.float(), atol=1e-5)


def test_rra_images_do_not_depend_on_batching_and_bank_is_per_step(generator, tiny_sd,
                                                                     tmp_path):
    concept = _concept(tiny_sd, tmp_path / "rra", rra=True)
    requests = plan_requests("ball", PROMPTS, 2, base_seed=0)
    calls = []
    hook = generator.reference_unet.register_forward_hook(
        lambda module, args, output: calls.append(args[0].shape[0]))
    try:
        four = generator.generate(concept, requests, reference_image=random_reference_image(),
                                  batch_size=4)
    finally:
        hook.remove()
    assert calls == [1] * SAMPLE.steps  # one reference row, once per step, for 4 images × CFG
    assert len(generator.bank) == 0
    calls.clear()
    hook = generator.reference_unet.register_forward_hook(
        lambda module, args, output: calls.append(args[0].shape[0]))
    try:  # four batches of one: the banks of the first serve the other three
        one = generator.generate(concept, requests, reference_image=random_reference_image(),
                                 batch_size=1)
    finally:
        hook.remove()
    assert calls == [1] * SAMPLE.steps
    assert len(generator.bank) == 0
    assert torch.allclose(_stack(four), _stack(one), atol=1e-5)
    assert [g.record["seed"] for g in four] == [r.seed for r in requests]
    assert all(g.record["concept_hash"] == concept.content_hash and g.record["rra"]
               for g in four)
    without = generator.generate(concept, requests[:1], reference_image=random_reference_image(9))
    assert not torch.allclose(without[0].image, four[0].image, atol=1e-4)  # RRA is in play


def test_switching_concepts_restores_the_base_model(generator, tiny_sd, tmp_path):
    c = generator.components
    unet_before = {k: v.clone() for k, v in c.unet.state_dict().items()}
    processors_before = dict(c.unet.attn_processors)
    requests = [ImageRequest(PROMPTS[0], seed=5)]
    base = _stack(generator.generate(None, requests))
    rra = _concept(tiny_sd, tmp_path / "a", rra=True, seed=1)
    plain = _concept(tiny_sd, tmp_path / "b", rra=False, seed=2)
    first = _stack(generator.generate(rra, requests, reference_image=random_reference_image()))
    other = _stack(generator.generate(plain, requests))
    again = _stack(generator.generate(rra, requests, reference_image=random_reference_image()))
    assert torch.equal(first, again)
    assert not torch.allclose(first, other) and not torch.allclose(other, base)
    assert torch.equal(_stack(generator.generate(None, requests)), base)
    assert dict(c.unet.attn_processors) == processors_before
    assert not any(isinstance(p, RRAProcessor) for p in c.unet.attn_processors.values())
    for key, value in c.unet.state_dict().items():
        assert torch.equal(value, unet_before[key]), key


def test_concept_from_another_base_model_is_refused(generator, tiny_sd, tmp_path):
    concept = _concept(tiny_sd, tmp_path / "c", rra=True, base_model="someone/other-sd")
    with pytest.raises(ConceptError, match="trained on base model"):
        generator.generate(concept, [ImageRequest("a <eqd> ball", 1)],
                           reference_image=random_reference_image())
    assert not any(isinstance(p, RRAProcessor)
                   for p in generator.components.unet.attn_processors.values())
    with pytest.raises(ValueError, match="reference_image"):
        generator.generate(_concept(tiny_sd, tmp_path / "d", rra=True),
                           [ImageRequest("a <eqd> ball", 1)])


def test_seeds_are_per_slot_and_method_independent():
    requests = plan_requests("dog", ["a", "b"], 3, base_seed=7)
    seeds = [r.seed for r in requests]
    assert len(set(seeds)) == 6 and all(0 <= s < 2**63 for s in seeds)
    assert seeds == [r.seed for r in plan_requests("dog", ["x", "y"], 3, base_seed=7)]
    assert seeds[4] == image_seed(7, "dog", 1, 1)
    assert image_seed(7, "cat", 0, 0) != image_seed(7, "dog", 0, 0)
    assert image_seed(8, "dog", 0, 0) != image_seed(7, "dog", 0, 0)


@pytest.mark.parametrize("name", ["ddim", "pndm", "euler", "euler-ancestral", "dpm-solver++",
                                  "unipc", "ddpm"])
def test_every_named_scheduler_builds_on_the_base_schedule(generator, name):
    scheduler = make_scheduler(name, generator.components.noise_scheduler.config)
    assert scheduler.config.num_train_timesteps == 1000
    assert scheduler.config.beta_schedule == "scaled_linear"


def test_another_scheduler_draws(tiny_sd):
    sample = SampleConfig(scheduler="euler-ancestral", steps=2, resolution=RESOLUTION)
    gen = ConceptGenerator(load_sd_components(tiny_sd, local_files_only=True), sample)
    requests = [ImageRequest(PROMPTS[0], seed=1), ImageRequest(PROMPTS[1], seed=2)]
    both = _stack(gen.generate(None, requests, batch_size=2))
    single = _stack(gen.generate(None, requests, batch_size=1))
    assert torch.allclose(both, single, atol=1e-5)  # ancestral noise is per image too


def test_eqdiff_end_to_end_train_concept_images(tiny_sd, tmp_path):
    """The full method on CPU: train (with RRA) → concept file → images with metadata."""
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(3, 3, RESOLUTION, RESOLUTION, generator=gen) * 2 - 1
    masks = torch.zeros(3, 1, RESOLUTION, RESOLUTION)
    masks[:, :, 16:48, 12:40] = 1
    data = ConceptData("ball", "ball", images, masks,
                       torch.rand(2, 3, RESOLUTION, RESOLUTION, generator=gen) * 2 - 1)
    cfg = RunConfig(train=TrainConfig(steps=1, resolution=RESOLUTION, num_prior_images=2),
                    sample=SAMPLE)
    method = method_preset("eqdiff")
    trained = train_concept(load_sd_components(tiny_sd, local_files_only=True), data, cfg,
                            method, extensions=training_extensions(cfg.rra, method))
    concept = load_concept(save_concept(tmp_path / "concept", trained.tensors,
                                        trained.metadata, base_model=tiny_sd))
    generator = ConceptGenerator(load_sd_components(tiny_sd, local_files_only=True),
                                 cfg.sample, cfg.rra)
    requests = plan_requests("ball", PROMPTS, 1, base_seed=cfg.sample.seed)
    generated = generator.generate(concept, requests, reference_image=images[0])
    assert len(generated) == 2
    for item in generated:
        assert item.image.shape == (3, RESOLUTION, RESOLUTION)
        assert bool(torch.isfinite(item.image).all())
        path = item.save(tmp_path / "images" / f"{item.record['prompt_index']}.png")
        meta = read_png_metadata(path)
        assert meta["prompt"] == item.record["prompt"] and meta["seed"] == item.record["seed"]
        assert meta["concept_hash"] == concept.content_hash and meta["method"] == "eqdiff"
