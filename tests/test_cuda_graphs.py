"""The CUDA-graph training step (issue 10) trains like the eager step.

The host half of a step draws into persistent buffers; the device half reads only them, which
is what lets it be captured as a CUDA graph. The CPU tests check that structure; the ``gpu``
tests (run on a CUDA machine: ``pytest -m gpu tests/test_cuda_graphs.py``) check that the
captured step gives the eager step's losses and learned tensors, also across a resume.
"""

import pytest
import torch
from synthetic import RESOLUTION
from synthetic import random_concept_data as make_data

from eqdiff.config import RunConfig, TrainConfig, method_preset
from eqdiff.models import load_sd_components
from eqdiff.reference import training_extensions
from eqdiff.training import ConceptTrainer, cuda_graph_mode, train_concept
from eqdiff.zoo import build_tiny_sd


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
