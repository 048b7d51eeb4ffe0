"""Speed levers of the trainer (issue 10) keep results equal to tolerance: frozen weights in
bf16, no host synchronisation in the step, cross-attention capture only where the loss reads."""

import pytest
import torch
from synthetic import RESOLUTION
from synthetic import random_concept_data as make_data

from eqdiff.config import RunConfig, TrainConfig, method_preset
from eqdiff.method.attention import CrossAttentionCapture, cross_attention_sides, install_custom_kv
from eqdiff.method.embeddings import PlaceholderEmbeddings
from eqdiff.method.models import load_sd_components
from eqdiff.method.reference import training_extensions
from eqdiff.method.training import ConceptTrainer, frozen_weight_dtype


def _config(**train) -> RunConfig:
    return RunConfig(train=TrainConfig(steps=3, resolution=RESOLUTION, num_prior_images=4,
                                       learning_rate=1e-3, checkpoint_every=0, **train))


def _trainer(tiny_sd, **train) -> ConceptTrainer:
    components = load_sd_components(tiny_sd, local_files_only=True)
    return ConceptTrainer(components, make_data(), _config(**train),
                          method_preset("eqdiff-no-rra"))


def test_frozen_dtype_follows_precision():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")  # device objects only
    assert frozen_weight_dtype(_config(), cuda) == torch.bfloat16
    assert frozen_weight_dtype(_config(), cpu) is None  # CPU "auto" is fp32: nothing changes
    assert frozen_weight_dtype(_config(precision="bf16"), cpu) == torch.bfloat16
    assert frozen_weight_dtype(_config(precision="fp16"), cuda) is None
    assert frozen_weight_dtype(_config(frozen_weights="as-loaded"), cuda) is None


def test_bf16_frozen_weights_train_like_fp32_frozen_weights(tiny_sd):
    """precision="bf16" runs on the CPU too: frozen weights cast once, trainables stay fp32."""
    cast = _trainer(tiny_sd, precision="bf16")
    kept = _trainer(tiny_sd, precision="bf16", frozen_weights="as-loaded")
    c = cast.components
    assert {p.dtype for p in c.unet.parameters() if not p.requires_grad} == {torch.bfloat16}
    assert {p.dtype for p in c.vae.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in c.text_encoder.parameters()} == {torch.bfloat16}
    table = c.text_encoder.get_input_embeddings().weight  # rows identical in their own dtype
    fp32_table = kept.components.text_encoder.get_input_embeddings().weight
    assert torch.equal(table, fp32_table.to(torch.bfloat16))
    assert {p.dtype for p in cast.trainable_parameters()} == {torch.float32}
    for band, (mean, std) in kept.instance_latents.items():  # set-up encodes stay float32
        assert torch.equal(cast.instance_latents[band][0], mean)
        assert torch.equal(cast.instance_latents[band][1], std)
    initial = {k: v.clone() for k, v in kept.learned_tensors().items()}
    for _ in range(3):
        cast.train_step()
        kept.train_step()
    for a, b in zip(cast.loss_history, kept.loss_history, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=0.05, abs=1e-3), key
    cast_tensors, kept_tensors = cast.learned_tensors(), kept.learned_tensors()
    for name, start in initial.items():
        moved_cast = (cast_tensors[name] - start).flatten()
        moved_kept = (kept_tensors[name] - start).flatten()
        cosine = torch.nn.functional.cosine_similarity(moved_cast, moved_kept, dim=0)
        assert cosine > 0.95, (name, float(cosine))
    cast.remove()
    kept.remove()


def test_trainable_copies_start_from_the_float32_weights_under_a_bf16_cast(tiny_sd):
    """Custom Diffusion's K/V copies and RRA's W'_k, W'_v start from the pretrained weights as
    loaded (float32), bit for bit, although the frozen UNet is cast to bf16 before they are
    installed (docs/method.md §3, §5)."""
    loaded = {name: p.detach().clone() for name, p in
              load_sd_components(tiny_sd, local_files_only=True).unet.named_parameters()}
    config = _config(precision="bf16")  # the frozen weights are cast to bf16, on the CPU too
    method = method_preset("eqdiff")
    trainer = ConceptTrainer(load_sd_components(tiny_sd, local_files_only=True), make_data(),
                             config, method, extensions=training_extensions(config.rra, method))
    try:
        assert trainer.frozen_dtype == torch.bfloat16
        cast = dict(trainer.components.unet.named_parameters())
        copies = {name: tensor for name, tensor in trainer.learned_tensors().items()
                  if name.startswith(("eqdiff_kv.", "eqdiff_rra."))
                  and name.endswith((".to_k.weight", ".to_v.weight"))}
    finally:
        trainer.remove()
    kinds = {name.split(".")[0] for name in copies}
    assert kinds == {"eqdiff_kv", "eqdiff_rra"}
    rounded = 0
    for name, tensor in copies.items():
        source = name.split(".", 1)[1]  # eqdiff_kv.<layer>.to_k.weight -> <layer>.to_k.weight
        assert cast[source].dtype == torch.bfloat16
        assert tensor.dtype == torch.float32 and torch.equal(tensor, loaded[source]), name
        rounded += not torch.equal(cast[source].float(), loaded[source])
    assert rounded == len(copies)  # the cast weights differ: copying them would fail above


def test_loss_history_is_converted_lazily_and_equals_the_step_results(tiny_sd):
    trainer = _trainer(tiny_sd)
    results = [trainer.train_step() for _ in range(3)]
    assert len(trainer._pending_losses) == 3  # nothing read yet: no per-step transfer
    history = trainer.loss_history
    assert trainer._pending_losses == []
    assert history == [r.losses for r in results]
    assert set(history[0]) == {"loss", "loss/inst", "loss/prior", "loss/xattn"}
    trainer.train_step()
    assert len(trainer.loss_history) == 4 and trainer.loss_history[:3] == history
    trainer.remove()


def test_band_mixes_are_built_once_per_band_tuple():
    embeddings = PlaceholderEmbeddings(torch.randn(8), frequency_decomposed=True)
    mix = embeddings.mix_for_bands(["low", "full"])
    assert torch.equal(mix, torch.tensor([[1.0, 0.0], [1.0, 1.0]]))
    assert embeddings.mix_for_bands(("low", "full")) is mix
    with pytest.raises(ValueError, match="unknown band"):
        embeddings.mix_for_bands(["mid"])
    single = PlaceholderEmbeddings(torch.randn(8), frequency_decomposed=False)
    assert torch.equal(single.mix_for_bands(["full", "full"]), torch.ones(2, 1))


@pytest.mark.parametrize("latent_side", [32, 20, 7])
def test_cross_attention_sides_match_a_real_forward(tiny_sd, latent_side):
    unet = load_sd_components(tiny_sd, local_files_only=True).unet
    seen: dict[str, int] = {}
    modules = {n: m for n, m in unet.named_modules() if n.endswith("attn2")}
    hooks = [m.register_forward_pre_hook(
        lambda _m, args, name=n: seen.__setitem__(f"{name}.processor", args[0].shape[1]))
        for n, m in modules.items()]
    with torch.no_grad():
        unet(torch.randn(1, 4, latent_side, latent_side), torch.tensor([5]),
             torch.randn(1, 77, unet.config.cross_attention_dim))
    for hook in hooks:
        hook.remove()
    sides = cross_attention_sides(unet, latent_side)
    assert {name: side * side for name, side in sides.items()} == seen


def test_capture_only_at_the_loss_grid_gives_the_same_maps(tiny_sd):
    unet = load_sd_components(tiny_sd, local_files_only=True).unet
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 32, 32, generator=gen)  # every tiny cross-attention is 16×16
    states = torch.randn(2, 77, unet.config.cross_attention_dim, generator=gen)
    token = torch.zeros(2, 77, dtype=torch.bool)
    token[:, 4] = True
    results = {}
    for only_side in (None, 16, 8):
        capture = CrossAttentionCapture(only_side)
        handle = install_custom_kv(unet, train_kv=True, capture=capture)
        capture.begin(token)
        with torch.no_grad():
            out = unet(latents, torch.tensor([10, 500]), states).sample
        results[only_side] = (out, capture._maps)
        handle.remove()
    (full_out, full_maps), (only_out, only_maps) = results[None], results[16]
    assert torch.equal(only_out, full_out)
    assert len(only_maps) == len(full_maps) == 4
    assert all(torch.equal(a, b) for a, b in zip(only_maps, full_maps, strict=True))
    skipped_out, skipped_maps = results[8]  # no 8×8 layer here: SDPA everywhere
    assert skipped_maps == []
    assert torch.allclose(skipped_out, full_out, atol=1e-5)

