"""Regional torch.compile (issue 10): compiled blocks train and sample like eager ones.

The fast tests compile with the "aot_eager" backend: dynamo traces every block — our attention
processors, the reference bank's writes and reads, the attention-map captures — and
AOTAutograd builds their backward, without inductor's code generation (minutes on two cores).
The ``slow`` test runs the real setting (``train.compile="regional"``, inductor) end to end;
the ``gpu`` test runs it under a captured CUDA graph.
"""

import copy
from dataclasses import replace

import pytest
import torch
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.resnet import ResnetBlock2D
from synthetic import RESOLUTION, random_concept, random_reference_image
from synthetic import random_concept_data as make_data
from torch._dynamo.backends.debugging import aot_eager
from torch._dynamo.utils import counters

from eqdiff.config import (
    RunConfig,
    SampleConfig,
    TrainConfig,
    config_hash,
    method_preset,
    with_overrides,
)
from eqdiff.fixtures.zoo import build_tiny_sd
from eqdiff.method.compilation import (
    RECOMPILE_LIMIT,
    CompiledRegions,
    compile_regions,
    compiled_calls,
)
from eqdiff.method.identity import training_hash
from eqdiff.method.models import load_sd_components
from eqdiff.method.reference import training_extensions
from eqdiff.method.sampling import ConceptGenerator, plan_requests
from eqdiff.method.training import ConceptTrainer


def _config(steps: int, **train) -> RunConfig:
    return RunConfig(train=TrainConfig(steps=steps, resolution=RESOLUTION, num_prior_images=4,
                                       learning_rate=1e-3, checkpoint_every=0, **train))


def _trainer(folder: str, config: RunConfig, device: str = "cpu") -> ConceptTrainer:
    method = method_preset("eqdiff")
    components = load_sd_components(folder, local_files_only=True)
    return ConceptTrainer(components, make_data(), config, method, device=device,
                          extensions=training_extensions(config.rra, method))


def _train(trainer: ConceptTrainer, steps: int, *, captured: bool = False):
    try:
        for _ in range(steps):
            trainer.train_step()
        assert trainer.graph_captured == captured
        return trainer.loss_history, trainer.learned_tensors()
    finally:
        trainer.remove()


def _extension_networks(trainer: ConceptTrainer) -> list[torch.nn.Module]:
    """The networks the trainer's extensions run (RRA's reference UNet)."""
    return [network for extension in trainer.extensions for network in extension.networks()]


def _own_forwards(*networks) -> int:
    return sum("forward" in vars(module) for network in networks
               for module in network.modules())


def _assert_same_training(got, want, rtol: float, atol: float) -> None:
    """Losses to ``rtol``/``atol``; learned tensors to ``rtol`` and 10 × ``atol``: an element
    whose gradient is about 0 takes AdamW steps of ±lr either way on a rounding difference."""
    losses, tensors = got
    want_losses, want_tensors = want
    assert [h.keys() for h in losses] == [h.keys() for h in want_losses]
    for key in want_losses[0]:
        torch.testing.assert_close([h[key] for h in losses], [h[key] for h in want_losses],
                                   rtol=rtol, atol=atol, msg=lambda m, k=key: f"{k}: {m}")
    assert tensors.keys() == want_tensors.keys()
    for name in tensors:
        torch.testing.assert_close(tensors[name], want_tensors[name], rtol=rtol,
                                   atol=10 * atol, msg=lambda m, n=name: f"{n}: {m}")


def test_the_settings_are_checked_and_change_no_hash():
    """Compiling changes speed, not results: a concept trained either way is the same work
    (reused by a rerun), and so is a sample set."""
    with pytest.raises(ValueError, match="train.compile"):
        TrainConfig(compile="max-autotune")
    with pytest.raises(ValueError, match="sample.compile"):
        SampleConfig(compile="on")
    plain = RunConfig()
    compiled = with_overrides(plain, {"train.compile": "regional",
                                      "sample.compile": "regional"})
    assert (compiled.train.compile, compiled.sample.compile) == ("regional", "regional")
    method = method_preset("eqdiff")
    assert training_hash(compiled, method) == training_hash(plain, method)
    assert config_hash(compiled.sample) == config_hash(plain.sample)


def test_regions_are_compiled_per_instance_and_removed(tiny_sd):
    unet = load_sd_components(tiny_sd, local_files_only=True).unet
    blocks = [m for m in unet.modules() if isinstance(m, (ResnetBlock2D, BasicTransformerBlock))]
    class_forwards = (ResnetBlock2D.forward, BasicTransformerBlock.forward)
    regions = compile_regions(unet)
    assert len(regions) == len(blocks) == _own_forwards(unet)
    assert all(block.forward.__self__ is block for block in blocks)
    assert (ResnetBlock2D.forward, BasicTransformerBlock.forward) == class_forwards
    copied = copy.deepcopy(unet)  # a copy's blocks call the copy, not the original
    assert all(module.forward.__self__ is module for module in copied.modules()
               if "forward" in vars(module))
    with pytest.raises(ValueError, match="compiled twice"):
        compile_regions(unet)
    regions.remove()
    assert _own_forwards(unet) == 0 and len(regions) == 0
    with pytest.raises(ValueError, match="no blocks to compile"):
        compile_regions(torch.nn.Linear(2, 2))


def test_compiled_calls_keep_more_variants_than_dynamos_default():
    """SD-1.5 has dozens of variants of one block class; outside the scope dynamo keeps 8
    and runs the rest eagerly."""
    def double(x):
        return x * 2

    def triple(x):
        return x * 3

    counters.clear()
    with compiled_calls(CompiledRegions(), "train.compile"):
        compiled = torch.compile(double, dynamic=False, backend="eager")
        for n in range(1, 13):
            compiled(torch.ones(n))
    assert counters["stats"]["unique_graphs"] == 12 <= RECOMPILE_LIMIT
    counters.clear()
    default = torch.compile(triple, dynamic=False, backend="eager")
    for n in range(1, 13):
        default(torch.ones(n))
    assert counters["stats"]["unique_graphs"] == torch._dynamo.config.recompile_limit == 8


def test_the_trainer_compiles_every_network_it_runs_and_restores_them(tiny_sd):
    trainer = _trainer(tiny_sd, _config(2, compile="regional"))
    (reference,) = _extension_networks(trainer)
    networks = (trainer.components.unet, trainer.components.text_encoder, reference)
    assert all(_own_forwards(network) for network in networks)
    assert len(trainer.compiled) == _own_forwards(*networks)
    trainer.remove()
    assert _own_forwards(*networks) == 0


def test_compiled_blocks_train_like_eager_blocks(tiny_sd):
    """EqDiff (RRA with its bank and loss captures, K/V copies, the placeholder through the
    text encoder), 3 steps: the same losses, parts included, and learned tensors."""
    config = _config(3)
    want = _train(_trainer(tiny_sd, config), 3)
    trainer = _trainer(tiny_sd, config)
    (reference,) = _extension_networks(trainer)
    trainer.compiled = compile_regions(trainer.components.unet, trainer.components.text_encoder,
                                       reference, backend="aot_eager")
    counters.clear()
    got = _train(trainer, 3)
    assert counters["stats"]["unique_graphs"] >= 3  # compiled code ran (not eager fallback)
    _assert_same_training(got, want, rtol=1e-4, atol=1e-5)


def test_a_later_trainer_in_the_same_process_runs_the_compiled_blocks_without_compiling(
        tiny_sd):
    """A kept Ray worker's next subject (new weights, same shapes) reuses the blocks compiled
    for the first: dynamo traces nothing again, and the compiled code runs."""
    runs = []

    def counting_backend(graph, example_inputs):
        compiled = aot_eager(graph, example_inputs)

        def run(*args):
            runs.append(1)
            return compiled(*args)
        return run

    for subject in ("first", "next"):
        trainer = _trainer(tiny_sd, _config(2))
        (reference,) = _extension_networks(trainer)
        trainer.compiled = compile_regions(trainer.components.unet,
                                           trainer.components.text_encoder, reference,
                                           backend=counting_backend)
        counters.clear()
        before = len(runs)
        _train(trainer, 2)
        traced = counters["stats"]["unique_graphs"]
        assert len(runs) > before, subject  # compiled code ran, not an eager fallback
        assert (traced > 0) if subject == "first" else (traced == 0), (subject, traced)


def test_a_failed_compile_names_the_setting_to_turn_off(tiny_sd):
    def failing_backend(graph, example_inputs):
        raise RuntimeError("no C++ compiler")

    trainer = _trainer(tiny_sd, _config(2))
    trainer.compiled = compile_regions(trainer.components.unet, backend=failing_backend)
    try:
        with pytest.raises(RuntimeError, match=r"set train\.compile=off") as raised:
            trainer.train_step()
        assert "no C++ compiler" in str(raised.value.__cause__)
    finally:
        trainer.remove()


def test_compiled_blocks_sample_like_eager_blocks(tiny_sd, tmp_path):
    """An RRA concept over a full and a partial batch: the reference UNet, the concept's UNet
    and the VAE decoder compiled draw the eager images."""
    sample = SampleConfig(steps=3, resolution=RESOLUTION, batch_size=3)
    eager = ConceptGenerator(load_sd_components(tiny_sd, local_files_only=True), sample)
    compiled = ConceptGenerator(load_sd_components(tiny_sd, local_files_only=True), sample)
    compiled.compiled = compile_regions(compiled.components.unet, compiled.reference_unet,
                                        compiled.components.vae.decoder, backend="aot_eager")
    concept = random_concept(tiny_sd, tmp_path / "rra", rra=True)
    requests = plan_requests("ball", ["a <eqd> ball", "a <eqd> ball in the snow"], 2,
                             base_seed=0)
    reference = random_reference_image()
    want = eager.generate(concept, requests, reference_image=reference)
    counters.clear()
    got = compiled.generate(concept, requests, reference_image=reference)
    assert counters["stats"]["unique_graphs"] >= 3
    torch.testing.assert_close(torch.stack([g.image for g in got]),
                               torch.stack([g.image for g in want]), atol=1e-5, rtol=0)


def test_the_generator_compiles_its_networks_when_asked(tiny_sd):
    components = load_sd_components(tiny_sd, local_files_only=True)
    generator = ConceptGenerator(components, SampleConfig(compile="regional"))
    assert _own_forwards(components.unet) and _own_forwards(generator.reference_unet)
    assert _own_forwards(components.vae.decoder) and not _own_forwards(components.vae.encoder)
    assert ConceptGenerator(load_sd_components(tiny_sd, local_files_only=True),
                            SampleConfig()).compiled is None


@pytest.mark.slow
def test_inductor_compiled_training_matches_eager(tiny_sd):
    """The real setting: inductor's generated kernels (C++ on the CPU), 2 steps."""
    want = _train(_trainer(tiny_sd, _config(2)), 2)
    got = _train(_trainer(tiny_sd, _config(2, compile="regional")), 2)
    _assert_same_training(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
def test_compiled_graphed_steps_train_like_eager_steps(tmp_path):
    """Inductor's Triton kernels inside the captured training step. In fp32: under bf16
    autocast, fused kernels keep intermediates that eager code rounds to bf16, and the two
    runs would differ by more than a broken block might."""
    if not torch.cuda.is_available():
        pytest.fail("the gpu tests need a CUDA device (run them with -m gpu on a GPU machine)")
    folder = str(build_tiny_sd(tmp_path / "tiny-sd"))
    steps = 5  # 3 eager warm-up steps (the compile happens in the first), capture, replay
    want = _train(_trainer(folder, _config(steps, cuda_graphs="off", precision="fp32"),
                           "cuda"), steps)
    trainer = _trainer(folder, _config(steps, cuda_graphs="on", compile="regional",
                                       precision="fp32"), "cuda")
    got = _train(trainer, steps, captured=True)
    _assert_same_training(got, want, rtol=1e-3, atol=1e-4)


@pytest.mark.gpu
def test_compiled_sampling_draws_the_eager_images(tmp_path):
    """Compiled blocks inside the replayed UNet calls draw the eager images."""
    if not torch.cuda.is_available():
        pytest.fail("the gpu tests need a CUDA device (run them with -m gpu on a GPU machine)")
    folder = str(build_tiny_sd(tmp_path / "tiny-sd"))
    sample = SampleConfig(steps=3, resolution=RESOLUTION, batch_size=4)

    def generator(**settings):
        components = load_sd_components(folder, local_files_only=True)
        return ConceptGenerator(components, replace(sample, **settings), device="cuda",
                                dtype=torch.float32)  # fp16 fused kernels round less often

    concept = random_concept(folder, tmp_path / "rra", rra=True)
    requests = plan_requests("ball", ["a <eqd> ball"], 4, base_seed=0)
    reference = random_reference_image()
    want = generator().generate(concept, requests, reference_image=reference)
    got = generator(compile="regional", cuda_graphs="on").generate(
        concept, requests, reference_image=reference)
    torch.testing.assert_close(torch.stack([g.image for g in got]),
                               torch.stack([g.image for g in want]), atol=1e-3, rtol=0)
