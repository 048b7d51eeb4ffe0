"""CUDA graphs (issue 10): the graphed training step trains like the eager step, and graphed
sampling draws the eager images.

The host half of a training step draws into persistent buffers; the device half reads only
them, which is what lets it be captured as a CUDA graph. The CPU tests check that structure;
the ``gpu`` tests (run on a CUDA machine: ``pytest -m gpu tests/method/test_cuda_graphs.py``) check
that the captured step gives the eager step's losses and learned tensors, also across a
resume, and that replayed UNet calls give the eager images.
"""

import contextlib
import io
from dataclasses import replace

import pytest
import torch
from synthetic import RESOLUTION, random_concept, random_reference_image
from synthetic import random_concept_data as make_data

from eqdiff.config import RunConfig, SampleConfig, TrainConfig, method_preset
from eqdiff.fixtures.zoo import build_tiny_sd
from eqdiff.method.models import load_sd_components
from eqdiff.method.reference import training_extensions
from eqdiff.method.sampling import ConceptGenerator, plan_requests
from eqdiff.method.training import ConceptTrainer, cuda_graph_mode, train_concept


def _config(steps: int, graphs: str = "auto", **train) -> RunConfig:
    return RunConfig(train=TrainConfig(steps=steps, resolution=RESOLUTION, num_prior_images=4,
                                       learning_rate=1e-3, checkpoint_every=0,
                                       cuda_graphs=graphs, **train))


def _trainer(folder: str, method_name: str, config: RunConfig, device: str) -> ConceptTrainer:
    method = method_preset(method_name)
    components = load_sd_components(folder, local_files_only=True)
    return ConceptTrainer(components, make_data(), config, method, device=device,
                          extensions=training_extensions(config.rra, method))


def test_graphs_are_off_off_cuda_and_the_setting_is_checked():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")  # device objects only
    assert cuda_graph_mode(_config(2, "on"), cpu) == "off"
    assert cuda_graph_mode(_config(2, "auto"), cuda) == "auto"
    assert cuda_graph_mode(_config(2, "off"), cuda) == "off"
    with pytest.raises(ValueError, match="train.cuda_graphs"):
        _config(2, "always")
    with pytest.raises(ValueError, match="sample.cuda_graphs"):
        SampleConfig(cuda_graphs="always")


def test_sampling_without_cuda_never_captures(tiny_sd):
    generator = ConceptGenerator(load_sd_components(tiny_sd, local_files_only=True),
                                 SampleConfig(steps=2, resolution=RESOLUTION, cuda_graphs="on"))
    assert generator.graph_mode == "off"
    generator.generate(None, plan_requests("ball", ["a ball"], 1, base_seed=0))
    assert generator._graphs == {}


def test_the_device_half_reads_the_same_buffers_every_step(tiny_sd):
    """A captured graph replays on fixed memory: every step's draws land in the same buffers,
    the RRA reference rows among them."""
    trainer = _trainer(tiny_sd, "eqdiff", _config(4), "cpu")
    try:
        seen = []
        for _ in range(3):
            trainer.train_step()
            seen.append({name: t.data_ptr() for name, t in trainer._inputs.items()})
        assert seen[0] == seen[1] == seen[2]
        assert "eqdiff_rra.reference_rows" in seen[0]
        assert set(seen[0]) >= {"instance_indices", "band_slots", "latent_eps", "noise",
                                "timesteps", "prior_indices"}
    finally:
        trainer.remove()


def test_draws_depend_only_on_the_generator_and_step(tiny_sd):
    """The host half alone decides a step's randomness: two trainers with one seed draw alike."""
    first = _trainer(tiny_sd, "eqdiff", _config(4), "cpu")
    second = _trainer(tiny_sd, "eqdiff", _config(4), "cpu")
    try:
        a, b = first.draw(), second.draw()
        assert a.bands == b.bands and a.tensors.keys() == b.tensors.keys()
        for name in a.tensors:
            assert torch.equal(a.tensors[name], b.tensors[name]), name
    finally:
        first.remove()
        second.remove()


def _reload_midway_replays_the_same_steps(folder: str, device: str, graphs: str) -> None:
    """Load a step-5 state back into a trainer that went on to step 8 (and, with graphs,
    captured its step): the three steps after it repeat the same losses."""
    trainer = _trainer(folder, "eqdiff", _config(12, graphs), device)
    try:
        for _ in range(5):
            trainer.train_step()
        saved = io.BytesIO()  # as the checkpointer does: the state dict aliases live tensors
        torch.save(trainer.state_dict(), saved)
        first = [trainer.train_step() for _ in range(3)]
        saved.seek(0)
        trainer.load_state_dict(torch.load(saved, map_location="cpu", weights_only=True))
        again = [trainer.train_step() for _ in range(3)]
        assert [r.step for r in again] == [6, 7, 8]
        torch.testing.assert_close([r.losses["loss"] for r in again],
                                   [r.losses["loss"] for r in first], rtol=1e-4, atol=1e-6)
    finally:
        trainer.remove()


def test_loading_a_state_midway_replays_the_same_steps(tiny_sd):
    _reload_midway_replays_the_same_steps(tiny_sd, "cpu", "off")


class _NoStream:
    def wait_stream(self, other) -> None:
        pass


def _cpu_stand_ins_for_cuda(monkeypatch, graph_error: str) -> None:
    """Let the CUDA-graph code path run on the CPU: streams and syncs do nothing, and every
    capture fails at its start the way a capture of an unsupported operation does."""
    def failing_capture(*args, **kwargs):
        raise RuntimeError(graph_error)

    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: _NoStream())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: _NoStream())
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", object)
    monkeypatch.setattr(torch.cuda, "graph", failing_capture)


def test_a_failed_capture_warns_and_trains_on_eagerly(tiny_sd, monkeypatch, caplog):
    """"auto": the warm-up steps, the failed capture and the eager steps after it give the
    losses of a run that never tried; "on": the failure is raised."""
    steps = 6
    eager = _trainer(tiny_sd, "eqdiff", _config(steps), "cpu")
    try:
        for _ in range(steps):
            eager.train_step()
        want = eager.loss_history
    finally:
        eager.remove()
    _cpu_stand_ins_for_cuda(monkeypatch, "operation not permitted when stream is capturing")
    tried = _trainer(tiny_sd, "eqdiff", _config(steps), "cpu")
    tried.graphed.mode = "auto"
    try:
        for _ in range(steps):
            tried.train_step()
        assert tried.graphed.mode == "off" and not tried.graph_captured
        assert tried.loss_history == want
    finally:
        tried.remove()
    assert "CUDA graph capture failed" in caplog.text
    strict = _trainer(tiny_sd, "eqdiff", _config(steps), "cpu")
    strict.graphed.mode = "on"
    try:
        with pytest.raises(RuntimeError, match="not permitted"):
            for _ in range(steps):
                strict.train_step()
    finally:
        strict.remove()


class ReplayOnCopies:
    """CPU stand-in for :class:`eqdiff.method.sampling.CapturedCall` with a graph's memory
    semantics: ``fn`` runs on the call's own copies of the inputs, and every call's results land in
    the
    tensors the first call returned (a replay overwrites its outputs)."""

    def __init__(self, fn, inputs):
        self.fn = fn
        self.inputs = [tensor.clone() for tensor in inputs]
        self.outputs = fn(*self.inputs)

    def __call__(self, *inputs):
        for static, value in zip(self.inputs, inputs, strict=True):
            static.copy_(value)
        fresh = self.fn(*self.inputs)
        for output, value in zip(*(x if isinstance(x, list) else [x]
                                   for x in (self.outputs, fresh)), strict=True):
            output.copy_(value)
        return self.outputs


def test_replayed_calls_on_static_memory_draw_the_eager_images(tiny_sd, tmp_path,
                                                                monkeypatch):
    """The sampling loop's graph plumbing, on the CPU: UNet calls that read copied inputs and
    overwrite their outputs give the eager images, also for the batches that reuse the first
    batch's reference banks (kept as clones) and for the partial last batch."""
    sample = SampleConfig(steps=3, resolution=RESOLUTION, batch_size=4)
    eager = ConceptGenerator(load_sd_components(tiny_sd, local_files_only=True), sample)
    replayed = ConceptGenerator(load_sd_components(tiny_sd, local_files_only=True), sample)
    monkeypatch.setattr("eqdiff.method.sampling.CapturedCall", ReplayOnCopies)
    replayed.graph_mode = "on"
    concept = random_concept(tiny_sd, tmp_path / "rra", rra=True)
    requests = plan_requests("ball", ["a <eqd> ball", "a <eqd> ball in the snow"], 5,
                             base_seed=0)
    reference = random_reference_image()
    want = eager.generate(concept, requests, reference_image=reference)
    got = replayed.generate(concept, requests, reference_image=reference)
    assert torch.equal(torch.stack([g.image for g in got]), torch.stack([g.image for g in want]))


def test_sampling_after_a_failed_capture_draws_the_eager_images(tiny_sd, monkeypatch, caplog):
    sample = SampleConfig(steps=2, resolution=RESOLUTION, batch_size=2)
    eager = ConceptGenerator(load_sd_components(tiny_sd, local_files_only=True), sample)
    tried = ConceptGenerator(load_sd_components(tiny_sd, local_files_only=True), sample)

    def failing_capture(fn, inputs):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr("eqdiff.method.sampling.CapturedCall", failing_capture)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    tried.graph_mode = "auto"
    requests = plan_requests("ball", ["a ball", "a ball in the snow"], 2, base_seed=0)
    got = tried.generate(None, requests)
    assert tried.graph_mode == "off" and "CUDA graph capture failed" in caplog.text
    want = eager.generate(None, requests)
    assert torch.equal(torch.stack([g.image for g in got]), torch.stack([g.image for g in want]))


# ---------------------------------------------------------------------------- on CUDA

@pytest.fixture(scope="module")
def tiny_sd_cuda(tmp_path_factory) -> str:
    if not torch.cuda.is_available():
        pytest.fail("the gpu tests need a CUDA device (run them with -m gpu on a GPU machine)")
    return str(build_tiny_sd(tmp_path_factory.mktemp("tiny-sd-cuda")))


def _run(folder: str, method_name: str, graphs: str, steps: int):
    trainer = _trainer(folder, method_name, _config(steps, graphs), "cuda")
    try:
        for _ in range(steps):
            trainer.train_step()
        return trainer.graph_captured, trainer.loss_history, trainer.learned_tensors()
    finally:
        trainer.remove()


@pytest.mark.gpu
@pytest.mark.parametrize("method_name", ["eqdiff", "custom-diffusion", "textual-inversion"])
def test_graphed_steps_train_like_eager_steps(tiny_sd_cuda, method_name):
    eager_captured, eager_losses, eager_tensors = _run(tiny_sd_cuda, method_name, "off", 10)
    captured, losses, tensors = _run(tiny_sd_cuda, method_name, "on", 10)
    assert captured and not eager_captured
    assert [h.keys() for h in losses] == [h.keys() for h in eager_losses]
    torch.testing.assert_close([h["loss"] for h in losses], [h["loss"] for h in eager_losses],
                               rtol=1e-3, atol=1e-5)
    assert tensors.keys() == eager_tensors.keys()
    for name in tensors:
        torch.testing.assert_close(tensors[name], eager_tensors[name], rtol=1e-3, atol=1e-4,
                                   msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.gpu
def test_graphed_resume_equals_an_uninterrupted_graphed_run(tiny_sd_cuda, tmp_path):
    method = method_preset("eqdiff")
    config = _config(10, "on")

    def train(**kwargs):
        components = load_sd_components(tiny_sd_cuda, local_files_only=True)
        return train_concept(components, make_data(), config, method, device="cuda",
                             extensions=training_extensions(config.rra, method), **kwargs)

    whole = train()
    train(checkpoint_dir=tmp_path, stop_after=5)
    resumed = train(checkpoint_dir=tmp_path)
    assert resumed.metadata["resumed_from_step"] == 5
    torch.testing.assert_close([h["loss"] for h in resumed.loss_history],
                               [h["loss"] for h in whole.loss_history], rtol=1e-3, atol=1e-5)
    for name, tensor in whole.tensors.items():
        torch.testing.assert_close(resumed.tensors[name], tensor, rtol=1e-3, atol=1e-4)


@pytest.mark.gpu
def test_loading_a_state_into_a_graphed_trainer_replays_the_same_steps(tiny_sd_cuda):
    """The loaded optimizer state is new memory: the trainer drops its graph and captures
    again, instead of replaying updates into the old state."""
    _reload_midway_replays_the_same_steps(tiny_sd_cuda, "cuda", "on")


@pytest.mark.gpu
def test_graphed_sampling_draws_the_eager_images(tiny_sd_cuda, tmp_path):
    """Base model, a K/V concept and an RRA concept over a full and a partial batch (the
    second batch reuses the first's reference banks): replayed graphs give the eager images."""
    sample = SampleConfig(steps=3, resolution=RESOLUTION, batch_size=4)

    def generator(mode):
        components = load_sd_components(tiny_sd_cuda, local_files_only=True)
        return ConceptGenerator(components, replace(sample, cuda_graphs=mode), device="cuda",
                                dtype=torch.float16)

    eager, graphed = generator("off"), generator("on")  # "on": a failed capture raises
    requests = plan_requests("ball", ["a <eqd> ball", "a <eqd> ball in the snow"], 3,
                             base_seed=0)
    reference = random_reference_image()
    concepts = [(None, None), (random_concept(tiny_sd_cuda, tmp_path / "kv", rra=False), None),
                (random_concept(tiny_sd_cuda, tmp_path / "rra", rra=True), reference)]
    for concept, image in concepts:
        want = eager.generate(concept, requests, reference_image=image)
        got = graphed.generate(concept, requests, reference_image=image)
        assert graphed._graphs == {}  # dropped with the concept
        torch.testing.assert_close(torch.stack([g.image for g in got]),
                                   torch.stack([g.image for g in want]), atol=2e-3, rtol=0)
