"""The stages run directly on a local folder store: no Prefect, no Ray, tiny offline models.

What matters about a stage: it writes its outputs and a marker last, a rerun skips it and loads
nothing, a changed input redoes exactly the stages it reaches, a stage whose input is not done
says which, and a bad subject fails without leaving a marker.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from eqdiff.config import (
    EvalConfig,
    ModelConfig,
    RunConfig,
    SampleConfig,
    StorageConfig,
    TrainConfig,
    method_preset,
)
from eqdiff.data.datasets import Subject, load_dataset
from eqdiff.fixtures.demo_data import write_demo_dataset
from eqdiff.pipeline import stages
from eqdiff.pipeline.skeleton import RunContext
from eqdiff.store.keys import MARKER_NAME

METHOD = "custom-diffusion"


def never_called():
    raise AssertionError("a finished stage must not load a model")


@pytest.fixture(scope="module")
def subject(tmp_path_factory) -> Subject:
    root = write_demo_dataset(tmp_path_factory.mktemp("data"), size=64, images_per_subject=3)
    return load_dataset(root).subjects[0]


def context(folder: Path, tiny_zoo: dict, **train) -> RunContext:
    config = RunConfig(
        model=ModelConfig(base_model=str(tiny_zoo["base"]), local_files_only=True),
        methods=(method_preset(METHOD),),
        train=TrainConfig(resolution=64, steps=2, num_prior_images=2, checkpoint_every=1,
                          **train),
        sample=SampleConfig(resolution=64, steps=2, images_per_prompt=1),
        eval=EvalConfig(clip_model=str(tiny_zoo["clip"]), clip_pretrained="",
                        dino_model=str(tiny_zoo["dino"])),
        storage=StorageConfig(url=str(folder)))
    return RunContext("stagetest", config)


def scorers_of(ctx: RunContext):
    from eqdiff.evaluation.metrics import CLIPScorer, DINOScorer

    made = []

    def make():
        evaluation = ctx.config.eval
        made.append(1)
        return (CLIPScorer(evaluation.clip_model, evaluation.clip_pretrained, device="cpu"),
                DINOScorer(evaluation.dino_model, device="cpu"))

    return make, made


def generator_of(ctx: RunContext):
    from eqdiff.method.sampling import ConceptGenerator

    def make():
        return ConceptGenerator.from_pretrained(ctx.base_model, ctx.config.sample,
                                                ctx.config.rra, device="cpu",
                                                local_files_only=True)

    return make


def run_all(ctx: RunContext, subject: Subject, prompts: list[str]) -> dict:
    """Every stage once, in the flow's order; what each returned."""
    method = ctx.config.method(METHOD)
    done = {"preprocess": stages.preprocess(ctx, subject),
            "masks": stages.extract_masks(ctx, subject),
            "priors": stages.class_priors(ctx, subject.class_noun)}
    done["train"] = stages.train(ctx, subject.name, subject.class_noun, method,
                                 prior_prefix=done["priors"].prefix)
    done["generate"] = stages.generate(ctx, generator_of(ctx), subject, METHOD, prompts)
    make_scorers, made = scorers_of(ctx)
    done["score"] = stages.score(ctx, make_scorers, subject, [METHOD])
    done["scorers_loaded"] = len(made)
    return done


def test_stages_write_markers_then_skip_and_redo_only_what_a_change_reaches(
        tmp_path, tiny_zoo, subject):
    ctx = context(tmp_path / "store", tiny_zoo)
    prompts = [f"a photo of {ctx.config.train.placeholder_token} {subject.class_noun}"]
    first = run_all(ctx, subject, prompts)
    assert not any(first[name].skipped for name in ("preprocess", "masks", "priors", "train",
                                                    "generate", "score"))
    assert first["preprocess"].info["images"] == 3
    store = ctx.store()
    for name in ("preprocess", "masks", "priors", "train", "generate"):
        record = store.read_marker(first[name].prefix)
        assert record is not None and record.outputs, name
        assert all(o.key.startswith(first[name].prefix + "/") for o in record.outputs)
        assert not any(o.key.endswith(MARKER_NAME) for o in record.outputs)

    # a rerun: everything skipped, no model loaded, same facts back
    again = stages.generate(ctx, never_called, subject, METHOD, prompts)
    assert again.skipped
    rerun = run_all(ctx, subject, prompts)
    assert all(rerun[name].skipped for name in ("preprocess", "masks", "priors", "train",
                                                "generate", "score"))
    assert rerun["preprocess"].info == first["preprocess"].info
    assert rerun["scorers_loaded"] == 0

    # other prompts: everything up to the concept stays, generation and scoring are redone
    other = run_all(ctx, subject, [*prompts, f"{prompts[0]} on the beach"])
    assert all(other[n].skipped for n in ("preprocess", "masks", "priors", "train"))
    assert not other["generate"].skipped and other["generate"].info["images"] == 2
    assert other["score"].info["scored"] == [METHOD]  # the real photos' scores stay
