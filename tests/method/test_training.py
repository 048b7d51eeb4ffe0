"""Customization training on the tiny offline SD: embeddings, K/V, resume, concept files."""

import logging

import pytest
import torch
from diffusers import StableDiffusionPipeline
from synthetic import RESOLUTION
from synthetic import random_concept_data as make_data

from eqdiff.config import (
    METHOD_PRESETS,
    FrequencyConfig,
    RunConfig,
    TrainConfig,
    method_preset,
    with_overrides,
)
from eqdiff.fixtures.zoo import build_tiny_sd
from eqdiff.method.attention import (
    CrossAttentionCapture,
    cross_attention_names,
    install_custom_kv,
    install_processors,
)
from eqdiff.method.concept import ConceptError, apply_concept, load_concept, save_concept
from eqdiff.method.embeddings import (
    PlaceholderEmbeddings,
    add_placeholder_token,
    install_placeholder_embeddings,
)
from eqdiff.method.models import load_sd_components
from eqdiff.method.training import (
    EXTENSION_SWITCHES,
    ConceptTrainer,
    LogProgress,
    ProgressBar,
    StepResult,
    adapter_extensions,
    builtin_extensions,
    check_extensions,
    train_concept,
)


def load(tiny_sd):
    return load_sd_components(tiny_sd, local_files_only=True)




def config(steps=4, **train) -> RunConfig:
    return RunConfig(train=TrainConfig(steps=steps, resolution=RESOLUTION, num_prior_images=4,
                                       learning_rate=1e-3, checkpoint_every=2, **train))


NO_RRA_METHODS = ["eqdiff-no-rra", "custom-diffusion", "textual-inversion", "dreambooth-lora"]


def test_placeholder_gets_lf_hf_or_both_as_drawn(tiny_sd):
    c = load(tiny_sd)
    token_id, initial = add_placeholder_token(c.tokenizer, c.text_encoder, "<eqd>", "ktn")
    embeddings = PlaceholderEmbeddings(initial, frequency_decomposed=True)
    with torch.no_grad():
        embeddings.vectors.copy_(torch.randn_like(embeddings.vectors))
    table = c.text_encoder.get_input_embeddings()
    install_placeholder_embeddings(c.text_encoder, token_id, embeddings)
    ids = c.tokenizer(["photo of a <eqd> ball"] * 3, padding="max_length",
                      return_tensors="pt").input_ids
    position = (ids[0] == token_id).nonzero().item()
    with torch.no_grad(), embeddings.mixing(embeddings.mix_for_bands(["low", "high", "full"])):
        injected = table(ids)  # the hook on this instance's embedding module injects
        encoded = c.text_encoder(ids)[0]
    assert not torch.equal(encoded[0], encoded[1])
    lf, hf = embeddings.vectors.detach()
    assert torch.equal(injected[0, position], lf)
    assert torch.equal(injected[1, position], hf)
    assert torch.allclose(injected[2, position], lf + hf)
    others = torch.ones(ids.shape[1], dtype=torch.bool)
    others[position] = False
    assert torch.equal(injected[:, others], table.weight[ids][:, others])


@pytest.mark.parametrize("band_init", ["each-full", "half"])
def test_band_vectors_start_each_at_the_initializer_or_at_half_of_it(tiny_sd, band_init):
    """frequency.band_init (docs/method.md §3): S_LF and S_HF start each at the initializer's
    embedding e ("each-full": the full-band token S_LF + S_HF starts at 2e) or each at e / 2
    ("half": it starts at e). A single vector starts at e either way."""
    config = RunConfig(frequency=FrequencyConfig(band_init=band_init),
                       train=TrainConfig(steps=1, resolution=RESOLUTION, num_prior_images=4))
    for name in ("eqdiff-no-rra", "custom-diffusion"):
        method = method_preset(name)
        trainer = ConceptTrainer(load(tiny_sd), make_data(), config, method)
        try:
            row = trainer.components.text_encoder.get_input_embeddings().weight[trainer.token_id]
            initial = row.detach().float()
            vectors = trainer.embeddings.vectors.detach()
            inference = trainer.embeddings.inference_vector()
        finally:
            trainer.remove()
        assert vectors.shape[0] == (2 if method.fdte else 1)
        start = initial / 2 if band_init == "half" and method.fdte else initial
        for vector in vectors:
            assert torch.equal(vector, start), name
        scale = 2 if band_init == "each-full" and method.fdte else 1
        torch.testing.assert_close(inference, scale * initial)


def test_initializer_word_of_several_tokens_is_averaged(tiny_sd):
    c = load(tiny_sd)
    parts = c.tokenizer.encode("ktn", add_special_tokens=False)
    assert len(parts) == 2
    table_before = c.text_encoder.get_input_embeddings().weight.detach().clone()
    token_id, initial = add_placeholder_token(c.tokenizer, c.text_encoder, "<eqd>", "ktn")
    assert torch.allclose(initial, table_before[parts].mean(0))
    table_after = c.text_encoder.get_input_embeddings().weight
    assert torch.equal(table_after[: table_before.shape[0]], table_before)
    with pytest.raises(ValueError, match="already a token"):
        add_placeholder_token(c.tokenizer, c.text_encoder, "<eqd>", "ktn")


def _unet_out(unet, seed=0):
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, 4, 32, 32, generator=gen)
    states = torch.randn(2, 77, 32, generator=gen)
    with torch.no_grad():
        return unet(latents, torch.tensor([10, 500]), states).sample


def test_kv_install_matches_and_uninstall_restores_exactly(tiny_sd):
    unet = load(tiny_sd).unet
    before = _unet_out(unet)
    capture = CrossAttentionCapture()
    handle = install_custom_kv(unet, train_kv=True, capture=capture)
    assert len(handle.installed) == len([n for n in unet.attn_processors if "attn2" in n])
    assert torch.allclose(_unet_out(unet), before, atol=1e-5)
    capture.begin(torch.zeros(2, 77, dtype=torch.bool).index_fill_(1, torch.tensor([4]), True))
    assert torch.allclose(_unet_out(unet), before, atol=1e-5)  # explicit-probability path
    maps = capture.maps_at(16)
    assert maps.shape == (2, 16, 16) and bool((maps > 0).all())
    handle.remove()
    assert torch.equal(_unet_out(unet), before)
    assert not any("CustomKV" in type(p).__name__ for p in unet.attn_processors.values())


class Passthrough:
    """A processor that runs the one it replaced."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, *args, **kwargs):
        return self.inner(*args, **kwargs)


def test_installed_processors_replace_only_the_named_layers_until_removed(tiny_sd):
    unet = load(tiny_sd).unet
    before = dict(unet.attn_processors)
    names = cross_attention_names(unet)[:2]
    seen = []

    def make(name, module, current):
        seen.append((name, module, current))
        return Passthrough(current)

    handle = install_processors(unet, names, make)
    modules = dict(unet.named_modules())
    assert seen == [(n, modules[n.removesuffix(".processor")], before[n]) for n in names]
    now = unet.attn_processors
    assert {n for n in before if now[n] is not before[n]} == set(names)
    assert all(handle.installed[n] is now[n] and now[n].inner is before[n] for n in names)
    handle.remove()
    assert dict(unet.attn_processors) == before  # the very same processor objects
    with pytest.raises(ValueError, match="no attention layers"):
        install_processors(unet, ["down_blocks.9.attn1.processor"], make)
    assert dict(unet.attn_processors) == before


@pytest.mark.parametrize("method", sorted(METHOD_PRESETS))
def test_the_trainers_own_extensions_provide_every_switch_but_rra(method):
    preset = method_preset(method)
    own = builtin_extensions(preset, RunConfig().losses) + adapter_extensions(preset)
    provided = set().union(*(extension.provides for extension in own))
    assert provided == {s for s in EXTENSION_SWITCHES if getattr(preset, s)} - {"rra", "rra_loss"}
    if preset.rra:
        with pytest.raises(ValueError, match="residual reference attention"):
            check_extensions(preset, own)
    else:
        check_extensions(preset, own)


@pytest.mark.parametrize("method", NO_RRA_METHODS + ["eqdiff-no-fdte", "eqdiff-no-mgdp"])
def test_every_method_trains_and_freezes_the_rest(tiny_sd, method):
    preset = method_preset(method)
    if preset.rra:  # these ablations keep RRA, which needs its extension
        with pytest.raises(ValueError, match="residual reference attention"):
            train_concept(load(tiny_sd), make_data(), config(steps=1), preset)
        preset = with_overrides(preset, {"rra": False, "rra_loss": False})
    c = load(tiny_sd)
    frozen_before = {k: v.clone() for k, v in c.unet.state_dict().items()}
    text_before = {k: v.clone() for k, v in c.text_encoder.state_dict().items()}
    trained = train_concept(c, make_data(), config(steps=3), preset)
    names = set(trained.tensors)
    assert "eqdiff_token.vectors" in names
    assert trained.tensors["eqdiff_token.vectors"].shape[0] == (2 if preset.fdte else 1)
    assert any(n.startswith("eqdiff_kv.") for n in names) == preset.train_kv
    assert any(n.startswith("eqdiff_lora.") for n in names) == preset.unet_lora
    assert {k: v for k, v in c.unet.state_dict().items() if k in frozen_before}.keys() == (
        frozen_before.keys())
    for key, value in c.unet.state_dict().items():
        assert torch.equal(value, frozen_before[key]), key
    for key, value in c.text_encoder.state_dict().items():
        if key.endswith("token_embedding.weight"):
            # every row that existed before is bit-identical; the placeholder row was not trained
            assert torch.equal(value[: text_before[key].shape[0]], text_before[key])
        else:
            assert torch.equal(value, text_before[key]), key
    assert len(trained.loss_history) == 3
    if preset.xattn_loss:
        assert "loss/xattn" in trained.loss_history[0]
    if preset.prior_preservation:
        assert "loss/prior" in trained.loss_history[0]


def test_resume_equals_uninterrupted_run(tiny_sd, tmp_path):
    method = method_preset("eqdiff-no-rra")
    straight = train_concept(load(tiny_sd), make_data(), config(steps=5), method)
    interrupted = train_concept(load(tiny_sd), make_data(), config(steps=5), method,
                                checkpoint_dir=tmp_path, stop_after=3)
    assert interrupted.metadata["steps"] == 3
    resumed = train_concept(load(tiny_sd), make_data(), config(steps=5), method,
                            checkpoint_dir=tmp_path)
    assert resumed.metadata["resumed_from_step"] == 3
    assert resumed.tensors.keys() == straight.tensors.keys()
    for name in straight.tensors:
        assert torch.equal(resumed.tensors[name], straight.tensors[name]), name
    assert resumed.loss_history == straight.loss_history


def test_checkpoint_from_another_config_is_refused(tiny_sd, tmp_path):
    method = method_preset("custom-diffusion")
    train_concept(load(tiny_sd), make_data(), config(steps=4), method, checkpoint_dir=tmp_path,
                  stop_after=2)
    with pytest.raises(ValueError, match="another configuration"):
        train_concept(load(tiny_sd), make_data(), config(steps=4, seed=9), method,
                      checkpoint_dir=tmp_path)


def _images(pipe, seed=7):
    return pipe("a <eqd> ball on the beach", num_inference_steps=3, height=RESOLUTION,
                width=RESOLUTION, generator=torch.Generator().manual_seed(seed),
                output_type="pt").images


def test_concept_file_round_trip_gives_the_same_images(tiny_sd, tmp_path):
    trained = train_concept(load(tiny_sd), make_data(), config(steps=2),
                            method_preset("custom-diffusion"))
    folder = save_concept(tmp_path / "concept", trained.tensors, trained.metadata,
                          base_model=tiny_sd)
    concept = load_concept(folder)
    for name, tensor in trained.tensors.items():
        assert torch.equal(concept.tensors[name], tensor)

    plain = StableDiffusionPipeline.from_pretrained(tiny_sd, local_files_only=True)
    baseline = _images(plain)
    handle = apply_concept(plain, concept, base_model=tiny_sd)
    first = _images(plain)
    assert not torch.equal(first, baseline)  # the concept changes what is drawn
    other = StableDiffusionPipeline.from_pretrained(tiny_sd, local_files_only=True)
    apply_concept(other, load_concept(folder / "concept.safetensors"), base_model=tiny_sd)
    assert torch.equal(_images(other), first)
    handle.remove()
    unet_now = plain.unet.state_dict()
    for key, value in other.unet.state_dict().items():
        if "attn2.to_k" in key or "attn2.to_v" in key:
            continue
        assert torch.equal(unet_now[key], value)
    fresh = StableDiffusionPipeline.from_pretrained(tiny_sd, local_files_only=True)
    for key, value in fresh.unet.state_dict().items():
        assert torch.equal(unet_now[key], value), key  # pretrained K/V restored


def test_concept_from_another_base_model_is_refused(tiny_sd, tmp_path):
    trained = train_concept(load(tiny_sd), make_data(), config(steps=1),
                            method_preset("textual-inversion"))
    folder = save_concept(tmp_path / "c", trained.tensors, trained.metadata, base_model=tiny_sd)
    other = str(build_tiny_sd(tmp_path / "other-sd", seed=5))
    pipe = StableDiffusionPipeline.from_pretrained(other, local_files_only=True)
    with pytest.raises(ConceptError, match="trained on base model"):
        apply_concept(pipe, load_concept(folder), base_model=other)


def test_concept_loading_refuses_pickles_and_tampering(tiny_sd, tmp_path):
    trained = train_concept(load(tiny_sd), make_data(), config(steps=1),
                            method_preset("textual-inversion"))
    folder = save_concept(tmp_path / "c", trained.tensors, trained.metadata, base_model=tiny_sd)
    with pytest.raises(ConceptError, match="only .safetensors"):
        load_concept(folder / "concept.pt")
    tampered = dict(trained.tensors)
    tampered["eqdiff_token.vectors"] = tampered["eqdiff_token.vectors"] + 1
    from safetensors.torch import save_file

    save_file(tampered, folder / "concept.safetensors")
    with pytest.raises(ConceptError, match="does not match the hash"):
        load_concept(folder)


@pytest.mark.slow
def test_training_lowers_the_loss_on_fixed_draws(tiny_sd):
    """Loss on a fixed set of (timestep, noise) draws falls after training (no RRA)."""
    method = method_preset("custom-diffusion")
    trained = train_concept(load(tiny_sd), make_data(n_prior=2), config(steps=60), method)
    first = sum(h["loss/inst"] for h in trained.loss_history[:15]) / 15
    last = sum(h["loss/inst"] for h in trained.loss_history[-15:]) / 15
    assert last < first


def test_progress_bar_follows_the_steps_of_a_resumed_run(tiny_sd, tmp_path):
    method = method_preset("textual-inversion")
    train_concept(load(tiny_sd), make_data(), config(steps=4), method, checkpoint_dir=tmp_path,
                  stop_after=2)
    bar = ProgressBar("ball", loss_every=1)
    train_concept(load(tiny_sd), make_data(), config(steps=4), method, checkpoint_dir=tmp_path,
                  callbacks=[bar])
    assert (bar._bar.initial, bar._bar.n, bar._bar.total) == (2, 4, 4)
    assert "loss" in bar._bar.postfix


class _DeviceLoss:
    """Stands in for a step's loss tensor on the device; counts its reads (each a sync)."""

    def __init__(self, value: float) -> None:
        self.value = value
        self.reads = 0

    def tolist(self) -> list[float]:
        self.reads += 1
        return [self.value]


def _log_steps(start: int, total: int, seconds_per_step, caplog
               ) -> tuple[list[int], int, list[str]]:
    """A :class:`LogProgress` (a line every 10 steps or 30 s) over fake steps on a fake clock:
    (the steps logged, the loss reads, the lines)."""
    now = [0.0]
    progress = LogProgress("training ball/eqdiff", every_steps=10, every_s=30.0,
                           clock=lambda: now[0])
    caplog.clear()
    progress.on_start(start, total)
    losses = []
    for step in range(start + 1, total + 1):
        now[0] += seconds_per_step(step)
        losses.append(_DeviceLoss(1.0 / step))
        progress.on_step(StepResult(step, total, ("loss",), losses[-1], ()), trainer=None)
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("eqdiff")]
    logged = [step for step, loss in enumerate(losses, start=start + 1) if loss.reads]
    return logged, sum(loss.reads for loss in losses), lines


def test_log_progress_logs_every_n_steps_or_t_seconds_and_reads_the_loss_only_then(caplog):
    caplog.set_level(logging.INFO, logger="eqdiff")
    # 1 s a step up to step 15 (the step count decides), then 10 s a step (the clock decides)
    logged, reads, lines = _log_steps(0, 40, lambda s: 1.0 if s <= 15 else 10.0, caplog)
    assert logged == [1, 11, 18, 21, 24, 27, 30, 33, 36, 39, 40]  # and the first and the last
    assert reads == len(logged) == len(lines)
    assert lines[1] == "training ball/eqdiff: step 11/40 loss 0.0909, 1.00 steps/s, ETA 29s"
    assert lines[-1] == "training ball/eqdiff: step 40/40 loss 0.0250, 0.15 steps/s, ETA 0s"
    # a resumed run starts counting (and measuring speed) from its checkpoint's step
    logged, _, lines = _log_steps(100, 250, lambda s: 2.0, caplog)
    assert logged[:3] == [101, 111, 121] and logged[-1] == 250
    assert lines[0].startswith("training ball/eqdiff: step 101/250 loss 0.0099, 0.50 steps/s, "
                               "ETA 4m58s")
