"""Residual reference attention on the tiny offline SD: processor, bank, extension, concept."""

import pytest
import torch
from synthetic import RESOLUTION
from synthetic import random_concept_data as make_data

from eqdiff.config import RunConfig, TrainConfig, method_preset, with_overrides
from eqdiff.method.concept import ConceptError, apply_concept, load_concept, save_concept
from eqdiff.method.models import load_sd_components
from eqdiff.method.reference import (
    RRA_PREFIX,
    ReferenceBank,
    RRAExtension,
    RRAProcessor,
    augment_prior_images,
    frozen_reference_unet,
    install_reference_writers,
    install_rra,
    load_rra_tensors,
    reference_indices,
    rra_layer_names,
    rra_layers_of,
    rra_learned_tensors,
    rra_parameters,
    straight_through_unit_clamp,
    training_extensions,
    unit_clamp,
)
from eqdiff.method.training import (
    ConceptTrainer,
    CrossAttentionLossExtension,
    CustomKVExtension,
    TrainingCallback,
    train_concept,
)


def config(steps=2) -> RunConfig:
    return RunConfig(train=TrainConfig(steps=steps, resolution=RESOLUTION, num_prior_images=2,
                                       learning_rate=1e-3, checkpoint_every=2))


def _inputs(batch=1, seed=0):
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, 4, 32, 32, generator=gen)
    states = torch.randn(batch, 77, 32, generator=gen)
    timesteps = torch.tensor([10, 500, 900, 3][:batch])
    return latents, timesteps, states


def _rra_unet(tiny_sd):
    """(main UNet, reference UNet, bank, RRA handle) with RRA on the default mid + up blocks."""
    unet = load_sd_components(tiny_sd, local_files_only=True).unet.requires_grad_(False)
    bank = ReferenceBank()
    names = rra_layer_names(unet, ("mid", "up"))
    reference = frozen_reference_unet(unet)
    install_reference_writers(reference, bank, names)
    return unet, reference, bank, install_rra(unet, bank, names)


def _randomise(handle, scale=0.1, seed=1):
    """Trained-looking RRA weights; the gate bias 0.5 keeps gates inside (0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for processor in handle.installed.values():
            for param in processor.parameters():
                param.add_(torch.randn(param.shape, generator=gen) * scale)
            processor.to_out.bias[-1] = 0.5


def test_layer_names_follow_the_configured_blocks(tiny_sd):
    unet = load_sd_components(tiny_sd, local_files_only=True).unet
    names = rra_layer_names(unet, ("mid", "up"))
    assert names and all(n.endswith("attn1.processor") for n in names)
    assert {n.split(".")[0] for n in names} == {"mid_block", "up_blocks"}
    assert all(n.startswith("down_blocks.") for n in rra_layer_names(unet, ("down",)))
    with pytest.raises(ValueError, match="no self-attention layers"):
        rra_layer_names(unet, ())


def test_fresh_rra_is_the_plain_unet_and_uninstall_restores(tiny_sd):
    unet, reference, bank, handle = _rra_unet(tiny_sd)
    handle.remove()
    originals = dict(unet.attn_processors)
    latents, timesteps, states = _inputs()
    with torch.no_grad():
        plain = unet(latents, timesteps, states).sample
        handle = install_rra(unet, bank, rra_layer_names(unet, ("mid", "up")))
        assert len(handle.installed) == 3
        reference(torch.randn_like(latents), timesteps, states)
        assert len(bank) == 3
        with_rra = unet(latents, timesteps, states).sample
        bank.clear()
    assert torch.equal(with_rra, plain)  # zero-initialised gate: bit-identical
    handle.remove()
    assert dict(unet.attn_processors) == originals  # the very same processor objects
    with torch.no_grad():
        assert torch.equal(unet(latents, timesteps, states).sample, plain)


def test_trained_rra_changes_the_output_and_needs_the_bank(tiny_sd):
    unet, reference, bank, handle = _rra_unet(tiny_sd)
    _randomise(handle)
    latents, timesteps, states = _inputs()
    with torch.no_grad():
        plain = reference(latents, timesteps, states).sample  # also fills the bank
        assert not torch.allclose(unet(latents, timesteps, states).sample, plain, atol=1e-4)
        bank.clear()
        with pytest.raises(RuntimeError, match="no entry"):
            unet(latents, timesteps, states)


def test_one_reference_broadcasts_like_a_repeated_one(tiny_sd):
    unet, reference, bank, handle = _rra_unet(tiny_sd)
    _randomise(handle)
    latents, timesteps, states = _inputs(batch=2)
    ref_latent = torch.randn(1, 4, 32, 32)
    t = torch.tensor([400])
    with torch.no_grad():
        reference(ref_latent, t, states[:1])
        entries = [bank.read(name) for name in bank.names()]
        assert all(e.shape[0] == 1 for e in entries)
        broadcast = unet(latents, t.expand(2), states).sample
        bank.clear()
        reference(ref_latent.expand(2, -1, -1, -1), t.expand(2), states[:1].expand(2, -1, -1))
        repeated = unet(latents, t.expand(2), states).sample
        bank.clear()
    assert torch.allclose(broadcast, repeated, atol=1e-5)


def test_unit_clamp_has_clamp_values_and_gradient_on_the_closed_interval():
    gate = torch.tensor([-0.5, 0.0, 0.3, 1.0, 1.5], requires_grad=True)
    clamped = unit_clamp(gate)
    assert torch.equal(clamped, gate.detach().clamp(0, 1))
    clamped.sum().backward()
    assert gate.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]


def test_straight_through_clamp_has_clamp_values_and_gradient_everywhere():
    gate = torch.tensor([-0.5, 0.0, 0.3, 1.0, 1.7, -1e-8], requires_grad=True)
    clamped = straight_through_unit_clamp(gate)
    assert torch.equal(clamped, gate.detach().clamp(0, 1))
    clamped.sum().backward()
    assert gate.grad.tolist() == [1.0] * 6


@pytest.mark.parametrize("gate_gradient", ["inside", "straight-through"])
def test_a_closed_gate_learns_only_with_the_straight_through_gradient(tiny_sd, gate_gradient):
    """rra.gate_gradient (docs/method.md §5): with the gate below 0 at every position, the
    layer's output is the plain one either way; "inside" gives its RRA tensors no gradient
    (the layer is dead), "straight-through" still reaches W'_o, W'_k and W'_v via the gate."""
    unet = load_sd_components(tiny_sd, local_files_only=True).unet.requires_grad_(False)
    bank = ReferenceBank()
    names = rra_layer_names(unet, ("mid", "up"))
    reference = frozen_reference_unet(unet)
    install_reference_writers(reference, bank, names)
    handle = install_rra(unet, bank, names, gate_gradient=gate_gradient)
    _randomise(handle)
    closed = names[0]
    with torch.no_grad():
        handle.installed[closed].to_out.bias[-1] = -50.0  # m < 0 everywhere: clamped to 0
    latents, timesteps, states = _inputs()
    with torch.no_grad():
        reference(torch.randn_like(latents), timesteps, states)
    unet(latents, timesteps, states).sample.square().mean().backward()
    for name, processor in handle.installed.items():
        grads = {pname: p.grad for pname, p in processor.named_parameters()}
        alive = {pname: g is not None and bool(g.abs().sum() > 0) for pname, g in grads.items()}
        if name == closed and gate_gradient == "inside":
            assert not any(alive.values()), alive
        else:
            assert all(alive.values()), (name, alive)


def test_gradients_reach_rra_and_nothing_frozen(tiny_sd):
    unet, reference, bank, handle = _rra_unet(tiny_sd)
    latents, timesteps, states = _inputs()

    def backward():
        for param in rra_parameters(handle):
            param.grad = None
        with torch.no_grad():
            reference(torch.randn_like(latents), timesteps, states)
        unet(latents, timesteps, states).sample.square().mean().backward()
        bank.clear()

    backward()  # fresh: only the zero-initialised projection can get a gradient, and must
    for processor in handle.installed.values():
        assert processor.to_out.weight.grad.abs().sum() > 0  # the gate at 0 is not dead
        assert processor.to_k.weight.grad.abs().sum() == 0
    _randomise(handle)
    backward()
    for param in rra_parameters(handle):
        assert param.grad is not None and param.grad.abs().sum() > 0
    base = [name for name, p in unet.named_parameters()
            if p.grad is not None and ".processor." not in name]
    assert base == []
    assert all(p.grad is None for p in reference.parameters())
    assert not any(p.requires_grad for p in reference.parameters())


def test_reference_unet_shares_weights_except_cross_attention_kv(tiny_sd):
    unet = load_sd_components(tiny_sd, local_files_only=True).unet
    shared = dict(frozen_reference_unet(unet).named_parameters())
    copied = dict(frozen_reference_unet(unet, share_weights=False).named_parameters())
    for name, param in unet.named_parameters():
        private = ".attn2.to_k." in name or ".attn2.to_v." in name
        assert (shared[name].data_ptr() == param.data_ptr()) != private, name
        assert copied[name].data_ptr() != param.data_ptr()
        assert torch.equal(shared[name], param) and torch.equal(copied[name], param)
    kv = next(n for n in shared if ".attn2.to_k." in n)
    with torch.no_grad():
        dict(unet.named_parameters())[kv].add_(1.0)  # a concept's K/V written into the base
    assert not torch.equal(shared[kv], dict(unet.named_parameters())[kv])


def test_reference_choice_is_another_photo_and_stateless():
    indices = torch.tensor([0, 1, 2, 2, 1, 0])
    other = reference_indices(indices, 3, step=4, seed=0, choice="other")
    assert bool((other != indices).all()) and bool(((other >= 0) & (other < 3)).all())
    assert torch.equal(other, reference_indices(indices, 3, step=4, seed=0, choice="other"))
    draws = {tuple(reference_indices(indices, 3, step=s, seed=0, choice="other").tolist())
             for s in range(8)}
    assert len(draws) > 1  # varies over steps
    assert torch.equal(reference_indices(indices, 3, step=4, seed=0, choice="same"), indices)
    assert torch.equal(reference_indices(indices[:2] * 0, 1, step=0, seed=0, choice="other"),
                       indices[:2] * 0)


def test_prior_reference_is_an_augmented_copy():
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    augmented = augment_prior_images(images)
    assert augmented.shape == images.shape
    assert not torch.allclose(augmented, images)
    flat = torch.full((1, 3, 64, 64), 0.25)
    assert torch.allclose(augment_prior_images(flat), flat, atol=1e-6)


class BankWatch(TrainingCallback):
    def __init__(self, extension):
        self.extension, self.sizes = extension, []

    def on_step(self, result, trainer):
        self.sizes.append(len(self.extension.bank))


def test_eqdiff_trains_with_rra_and_round_trips_the_concept(tiny_sd, tmp_path):
    method = method_preset("eqdiff")
    cfg = config(steps=2)
    with pytest.raises(ValueError, match="residual reference attention"):
        train_concept(load_sd_components(tiny_sd, local_files_only=True), make_data(n_prior=2), cfg,
                      method)
    components = load_sd_components(tiny_sd, local_files_only=True)
    unet_before = {k: v.clone() for k, v in components.unet.state_dict().items()}
    processors_before = {k: type(v) for k, v in components.unet.attn_processors.items()}
    [extension] = training_extensions(cfg.rra, method)
    watch = BankWatch(extension)
    trained = train_concept(components, make_data(n_prior=2), cfg, method, extensions=[extension],
                            callbacks=[watch])
    assert watch.sizes == [0, 0]  # the bank is emptied after every step
    assert all("loss/rra" in h for h in trained.loss_history)
    rra = {k: v for k, v in trained.tensors.items() if k.startswith(RRA_PREFIX)}
    assert len(rra_layers_of(rra)) == 3
    assert any(bool(v.abs().sum() > 0) for k, v in rra.items() if k.endswith("to_out.weight"))
    assert {k: type(v) for k, v in components.unet.attn_processors.items()} == processors_before
    for key, value in components.unet.state_dict().items():
        assert torch.equal(value, unet_before[key]), key

    folder = save_concept(tmp_path / "c", trained.tensors, trained.metadata, base_model=tiny_sd)
    concept = load_concept(folder)
    assert concept.tensors_with_prefix(RRA_PREFIX).keys() == rra.keys()
    unet = load_sd_components(tiny_sd, local_files_only=True).unet
    handle = install_rra(unet, ReferenceBank(), rra_layers_of(concept.tensors))
    load_rra_tensors(handle, concept.tensors)
    for name, tensor in rra_learned_tensors(handle).items():
        assert torch.equal(tensor, rra[name]), name
    with pytest.raises(ValueError, match="do not match"):
        load_rra_tensors(handle, {k: v for k, v in rra.items() if "mid_block" not in k})
    pipeline = load_sd_components(tiny_sd, local_files_only=True)
    with pytest.raises(ConceptError, match="residual-reference-attention"):
        apply_concept(pipeline, concept, base_model=tiny_sd)


def test_rra_without_loss_and_without_prior(tiny_sd):
    method = with_overrides(method_preset("eqdiff"), {"rra_loss": False,
                                                      "prior_preservation": False})
    cfg = config(steps=1)
    extension = RRAExtension(cfg.rra, method)
    trained = train_concept(load_sd_components(tiny_sd, local_files_only=True),
                            make_data(n_prior=2), cfg, method, extensions=[extension])
    assert "loss/rra" not in trained.loss_history[0]
    assert extension.handle is None and extension.reference_unet is None
    assert any(k.startswith(RRA_PREFIX) for k in trained.tensors)


def test_the_trainer_runs_its_own_extensions_then_the_callers(tiny_sd):
    """The mask loss, the K/V copies, then RRA — installed, asked for parameters, loss terms
    and learned tensors in that order (the optimizer's parameter order is in a checkpoint)."""
    method = method_preset("eqdiff")
    cfg = config(steps=1)
    [rra] = training_extensions(cfg.rra, method)
    trainer = ConceptTrainer(load_sd_components(tiny_sd, local_files_only=True),
                             make_data(n_prior=2), cfg, method, extensions=[rra])
    try:
        mask_loss, kv, last = trainer.extensions
        assert isinstance(mask_loss, CrossAttentionLossExtension)
        assert isinstance(kv, CustomKVExtension) and kv.train_kv and last is rra
        expected = [trainer.embeddings.vectors, *kv.parameters(), *rra.parameters()]
        assert [id(p) for p in trainer.optimizer.param_groups[0]["params"]] == [
            id(p) for p in expected]
        assert trainer.train_step().loss_names == ("loss", "loss/inst", "loss/prior",
                                                   "loss/xattn", "loss/rra")
        prefixes = [name.split(".")[0] for name in trainer.learned_tensors()]
        assert prefixes == sorted(prefixes, key=["eqdiff_token", "eqdiff_kv",
                                                 "eqdiff_rra"].index)
    finally:
        trainer.remove()


@pytest.mark.slow
def test_rra_resume_equals_uninterrupted_run(tiny_sd, tmp_path):
    method = method_preset("eqdiff")
    cfg = config(steps=4)

    def run(**kwargs):
        return train_concept(load_sd_components(tiny_sd, local_files_only=True),
                             make_data(n_prior=2), cfg, method,
                             extensions=training_extensions(cfg.rra, method), **kwargs)

    straight = run()
    run(checkpoint_dir=tmp_path, stop_after=2)
    resumed = run(checkpoint_dir=tmp_path)
    for name in straight.tensors:
        assert torch.equal(resumed.tensors[name], straight.tensors[name]), name
    assert resumed.loss_history == straight.loss_history


def test_processor_refuses_cross_attention_use(tiny_sd):
    unet = load_sd_components(tiny_sd, local_files_only=True).unet
    name = rra_layer_names(unet, ("mid",))[0]
    attn = dict(unet.named_modules())[name.removesuffix(".processor")]
    processor = RRAProcessor(attn, name, ReferenceBank())
    with pytest.raises(ValueError, match="plain self-attention"):
        processor(attn, torch.randn(1, 4, 64), encoder_hidden_states=torch.randn(1, 77, 32))
