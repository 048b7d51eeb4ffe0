"""DreamBooth-LoRA's UNet LoRA on the tiny offline SD (docs/method.md §8): the adapter's
install and removal, training and resume, the concept file, diffusers' own LoRA file.

The preset's loss on fixed draws, and that it moves its LoRA matrices and nothing else (token,
UNet, VAE, text encoder bit-identical), are checked with every preset in test_wiring.py.
"""

import pytest
import torch
from diffusers import StableDiffusionPipeline
from peft.tuners.tuners_utils import BaseTunerLayer
from synthetic import RESOLUTION
from synthetic import random_concept_data as make_data

from eqdiff.config import RunConfig, SampleConfig, TrainConfig, method_preset, with_overrides
from eqdiff.method.attention import attention_modules
from eqdiff.method.concept import apply_concept, load_concept, save_concept
from eqdiff.method.lora import (
    LORA_PREFIX,
    install_unet_lora,
    lora_init_generator,
    lora_parameters,
    write_diffusers_lora,
)
from eqdiff.method.models import load_sd_components
from eqdiff.method.reference import training_extensions
from eqdiff.method.sampling import ConceptGenerator
from eqdiff.method.training import ConceptTrainer, train_concept

RANK = 4


def load(tiny_sd):
    return load_sd_components(tiny_sd, local_files_only=True)


def config(steps=4, **train) -> RunConfig:
    return RunConfig(train=TrainConfig(steps=steps, resolution=RESOLUTION, num_prior_images=4,
                                       learning_rate=1e-2, checkpoint_every=2, **train))


def unet_out(unet, seed=0):
    """The UNet's noise prediction on fixed random inputs (two rows, two timesteps)."""
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, 4, 32, 32, generator=gen)
    states = torch.randn(2, 77, 32, generator=gen)
    with torch.no_grad():
        return unet(latents.to(unet.dtype), torch.tensor([10, 500]),
                    states.to(unet.dtype)).sample.float()


def lora_layers(module) -> list[str]:
    return [name for name, layer in module.named_modules() if isinstance(layer, BaseTunerLayer)]


def snapshot(unet):
    """Everything removing an adapter must give back: weights, module types, gradient flags
    and the instance's own attributes."""
    return ({name: tensor.clone() for name, tensor in unet.state_dict().items()},
            {name: type(module) for name, module in unet.named_modules()},
            {name: param.requires_grad for name, param in unet.named_parameters()},
            dict(vars(unet)))


def assert_restored(unet, before) -> None:
    weights, types, flags, attributes = before
    now = snapshot(unet)
    assert now[0].keys() == weights.keys()
    for name, tensor in weights.items():
        assert torch.equal(now[0][name], tensor), name
    assert now[1] == types and now[2] == flags
    assert now[3].keys() == attributes.keys()
    assert all(now[3][key] is value for key, value in attributes.items())
    assert lora_layers(unet) == []


# --------------------------------------------------------------------------- the adapter


def test_a_fresh_lora_changes_nothing_until_trained_and_removing_it_restores_the_unet(tiny_sd):
    unet = load(tiny_sd).unet.requires_grad_(False)
    before, base = snapshot(unet), unet_out(unet)
    handle = install_unet_lora(unet, RANK, lora_init_generator(0))
    params = lora_parameters(handle)
    wrapped = {f"{name.removesuffix('.processor')}.{projection}"
               for name in attention_modules(unet) for projection in ("to_q", "to_k", "to_v",
                                                                      "to_out.0")}
    assert set(lora_layers(unet)) == wrapped  # every projection of every attention layer
    assert len(params) == 2 * len(wrapped)
    assert all(name.startswith(LORA_PREFIX) for name in params)
    assert {p.dtype for p in params.values()} == {torch.float32}
    assert all(p.requires_grad for p in params.values())
    assert [n for n, p in unet.named_parameters() if p.requires_grad] == [
        n for n, p in unet.named_parameters() if ".lora_" in n]
    for name, param in params.items():  # gaussian init: A random, B zero
        assert bool((param != 0).any()) == name.endswith("lora_A.weight"), name
        assert param.shape[0 if name.endswith("lora_A.weight") else 1] == RANK
    assert torch.equal(unet_out(unet), base)  # B = 0: the base model's output, bit for bit
    with torch.no_grad():
        for name, param in params.items():
            if name.endswith("lora_B.weight"):
                param.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    adapted = unet_out(unet)
    assert not torch.allclose(adapted, base, atol=1e-4)  # the adapter is in the forward
    with pytest.raises(ValueError, match="already holds a LoRA"):
        install_unet_lora(unet, RANK, lora_init_generator(0))
    assert torch.equal(unet_out(unet), adapted)  # a refused second install leaves the first
    handle.remove()
    assert_restored(unet, before)
    assert torch.equal(unet_out(unet), base)


def test_lora_matrices_stay_float32_when_the_frozen_unet_is_bf16(tiny_sd):
    """precision bf16 holds the frozen UNet in bf16; the LoRA matrices are float32 and train
    under autocast."""
    trainer = ConceptTrainer(load(tiny_sd), make_data(), config(precision="bf16"),
                             method_preset("dreambooth-lora"))
    try:
        params = trainer.extensions[-1].parameters()
        assert trainer.components.unet.conv_in.weight.dtype == torch.bfloat16
        assert {p.dtype for p in params} == {torch.float32}
        before = trainer.learned_tensors()
        trainer.train_step()
        trainer.train_step()
        after = trainer.learned_tensors()
        assert all(torch.isfinite(torch.tensor(v)) for v in trainer.loss_history[-1].values())
        assert {t.dtype for t in after.values()} == {torch.float32}
        assert any(not torch.equal(after[n], before[n]) for n in after if n.startswith(LORA_PREFIX))
    finally:
        trainer.remove()


@pytest.mark.parametrize("base_method", ["custom-diffusion", "eqdiff"])
def test_lora_trains_together_with_the_kv_and_rra_processors(tiny_sd, base_method):
    """With K/V copies or RRA on too, the LoRA wraps the layers' projections only (not the
    processors' own copies, nor RRA's reference UNet), every extension keeps training, and
    the UNet comes back as it was."""
    method = with_overrides(method_preset(base_method), {"name": "lora-mix", "unet_lora": True})
    cfg = config()
    components = load(tiny_sd)
    before = snapshot(components.unet.requires_grad_(False))
    trainer = ConceptTrainer(components, make_data(), cfg, method,
                             extensions=training_extensions(cfg.rra, method))
    try:
        unet = components.unet
        assert all(name.endswith(("to_q", "to_k", "to_v", "to_out.0")) and
                   ".processor." not in name for name in lora_layers(unet))
        for extension in trainer.extensions:
            assert lora_layers(getattr(extension, "reference_unet", None) or torch.nn.Module()
                               ) == []
        optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
        assert optimized == {id(p) for module in (unet, trainer.embeddings)
                             for p in module.parameters() if p.requires_grad}
        learned_before = trainer.learned_tensors()
        for _ in range(3):
            trainer.train_step()
        learned_after = trainer.learned_tensors()
    finally:
        trainer.remove()
    prefixes = {name.split(".")[0] for name in learned_after if name != "eqdiff_token.vectors"}
    assert prefixes == {"eqdiff_lora", "eqdiff_kv"} | ({"eqdiff_rra"} if method.rra else set())
    for prefix in prefixes:  # every extension's tensors move
        assert any(not torch.equal(tensor, learned_before[name])
                   for name, tensor in learned_after.items() if name.startswith(prefix)), prefix
    assert_restored(components.unet, before)


# --------------------------------------------------------------------------- resume


def test_resumed_lora_run_equals_the_uninterrupted_run(tiny_sd, tmp_path):
    method = method_preset("dreambooth-lora")
    straight = train_concept(load(tiny_sd), make_data(), config(steps=4), method)
    interrupted = train_concept(load(tiny_sd), make_data(), config(steps=4), method,
                                checkpoint_dir=tmp_path, stop_after=2)
    resumed = train_concept(load(tiny_sd), make_data(), config(steps=4), method,
                            checkpoint_dir=tmp_path)
    assert resumed.metadata["resumed_from_step"] == 2
    lora = sorted(name for name in straight.tensors if name.startswith(LORA_PREFIX))
    assert lora and resumed.tensors.keys() == straight.tensors.keys()
    assert any(not torch.equal(interrupted.tensors[n], straight.tensors[n]) for n in lora)
    for name, tensor in straight.tensors.items():
        assert torch.equal(resumed.tensors[name], tensor), name
    assert resumed.loss_history == straight.loss_history


# --------------------------------------------------------------------------- concept files


@pytest.fixture(scope="module")
def trained_lora(tiny_sd, tmp_path_factory):
    """A few dreambooth-lora steps: the saved concept and the trained UNet's output (with its
    LoRA, before the trainer is removed)."""
    trainer = ConceptTrainer(load(tiny_sd), make_data(), config(), method_preset("dreambooth-lora"))
    try:
        for _ in range(3):
            trainer.train_step()
        trained_out = unet_out(trainer.components.unet)
        tensors = trainer.learned_tensors()
    finally:
        trainer.remove()
    record = {"subject": "ball", "class_noun": "ball", "placeholder_token": "<eqd>",
              "method": {"name": "dreambooth-lora"}}
    folder = save_concept(tmp_path_factory.mktemp("lora") / "concept", tensors, record,
                          base_model=tiny_sd)
    return folder, tensors, trained_out


def test_applied_concept_is_the_trained_lora_and_its_removal_restores_the_pipeline(
        tiny_sd, trained_lora):
    folder, tensors, trained_out = trained_lora
    concept = load_concept(folder)
    assert concept.tensors_with_prefix(LORA_PREFIX).keys() == {
        n for n in tensors if n.startswith(LORA_PREFIX)}
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, local_files_only=True)
    before, base = snapshot(pipe.unet), unet_out(pipe.unet)
    assert not torch.allclose(trained_out, base, atol=1e-4)  # the training moved the output
    handle = apply_concept(pipe, concept, base_model=tiny_sd)
    assert lora_layers(pipe.unet)
    assert torch.allclose(unet_out(pipe.unet), trained_out, atol=1e-5, rtol=0)
    handle.remove()
    assert_restored(pipe.unet, before)
    assert torch.equal(unet_out(pipe.unet), base)


def test_the_sampler_applies_the_lora_for_one_call(tiny_sd, trained_lora):
    folder, _, trained_out = trained_lora
    generator = ConceptGenerator(load(tiny_sd), SampleConfig(steps=2, resolution=RESOLUTION))
    unet = generator.components.unet
    before, base = snapshot(unet), unet_out(unet)
    with generator.applied(load_concept(folder)):
        assert torch.allclose(unet_out(unet), trained_out, atol=1e-5, rtol=0)
        assert lora_layers(generator.reference_unet) == []
    assert_restored(unet, before)
    assert torch.equal(unet_out(unet), base)


def test_diffusers_lora_file_loads_into_a_plain_pipeline_as_the_concept_does(
        tiny_sd, trained_lora, tmp_path, no_network):
    folder, tensors, trained_out = trained_lora
    path = write_diffusers_lora(load_concept(folder).tensors, tmp_path / "export")
    assert path == tmp_path / "export" / "pytorch_lora_weights.safetensors" and path.is_file()
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, local_files_only=True)
    pipe.load_lora_weights(tmp_path / "export")  # diffusers' own loader, nothing of ours
    assert torch.allclose(unet_out(pipe.unet), trained_out, atol=1e-5, rtol=0)
    assert no_network == []
    with pytest.raises(ValueError, match="no UNet LoRA"):
        write_diffusers_lora({"eqdiff_token.vectors": tensors["eqdiff_token.vectors"]},
                             tmp_path / "none")
