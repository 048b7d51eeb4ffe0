"""What the stage tests share: a small run on the tiny models and a local store, a demo subject,
and a training callback that stops a run where a lost worker would."""

from __future__ import annotations

from pathlib import Path

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
from eqdiff.data.prompts import PromptSet
from eqdiff.fixtures.demo_data import write_demo_dataset
from eqdiff.pipeline import stages
from eqdiff.pipeline.skeleton import RunContext

METHOD = "custom-diffusion"
PROMPTS = PromptSet("test", ("a photo of {token} {class_noun}",))


def demo_subject(folder: Path) -> Subject:
    """The first subject of the demo dataset (3 photos, 64 px) drawn under ``folder``."""
    root = write_demo_dataset(folder, size=64, images_per_subject=3)
    return load_dataset(root).subjects[0]


def context(folder: Path, tiny_zoo: dict, *, steps: int = 2,
            run_id: str = "stagetest") -> RunContext:
    """A run of ``METHOD`` on the tiny models at 64 px, checkpointing every step, with its
    store in ``folder``."""
    config = RunConfig(
        model=ModelConfig(base_model=str(tiny_zoo["base"]), local_files_only=True),
        methods=(method_preset(METHOD),),
        train=TrainConfig(resolution=64, steps=steps, num_prior_images=2, checkpoint_every=1),
        sample=SampleConfig(resolution=64, steps=2, images_per_prompt=1),
        eval=EvalConfig(clip_model=str(tiny_zoo["clip"]), clip_pretrained="",
                        dino_model=str(tiny_zoo["dino"])),
        storage=StorageConfig(url=str(folder)))
    return RunContext(run_id, config)


def prepared(ctx: RunContext, subject: Subject) -> RunContext:
    """``ctx`` with the subject ingested, preprocessed and masked, as the flow leaves it
    before training."""
    stages.ingest(ctx, subject, PROMPTS)
    stages.preprocess(ctx, subject.name)
    stages.extract_masks(ctx, subject.name)
    return ctx


class StopAtStep:
    """A training callback that interrupts the run when ``step`` finishes (a lost worker)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_start(self, start_step: int, total_steps: int) -> None:
        pass

    def on_step(self, result, trainer) -> None:
        if result.step == self.step:
            raise KeyboardInterrupt(f"stopped at step {self.step}")

    def on_end(self, trainer) -> None:
        pass
