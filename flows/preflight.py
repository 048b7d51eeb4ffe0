"""A run's pre-flight: its dataset, subjects, base model and store resolved and checked before
any work, and the plan of what it would do.

Prefect-free on purpose: ``eqdiff run`` checks a run here before it starts (or finds) the
Prefect server, and Prefect fixes its settings (the server's address) when first imported.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from eqdiff.config import EvalConfig, RunConfig
from eqdiff.data.datasets import Dataset, Subject, load_dataset
from eqdiff.data.prompts import PromptSet
from eqdiff.fixtures import FixtureModels, fixture_dataset, fixture_models
from eqdiff.method.models import check_base_model
from eqdiff.pipeline.plan import RunPlan, plan_run
from eqdiff.pipeline.skeleton import RunContext
from eqdiff.store import ArtifactStore, keys, store_from_config
from eqdiff.store.errors import ArtifactNotFoundError
from flows.params import CustomizeParams

DEFAULT_WORKDIR = Path.home() / ".cache" / "eqdiff"


def resolve_dataset(params: CustomizeParams, workdir: Path) -> Dataset:
    """The dataset folder, or a built-in one (``toyworld``, ``demo``) drawn into ``workdir``."""
    return load_dataset(fixture_dataset(params.dataset, workdir) or params.dataset)


def resolve_models(params: CustomizeParams, workdir: Path) -> FixtureModels | None:
    """The built-in offline models ``params.base_model`` names (``toy``, ``tiny``), if any."""
    return fixture_models(params.base_model, workdir)


def select_subjects(dataset: Dataset, wanted: Iterable[str]) -> list[Subject]:
    """The requested subjects (all when none are named). A name the dataset does not have is
    refused before any work, listed against the known names (a typo costs seconds, not a
    run)."""
    wanted = list(dict.fromkeys(wanted))
    if not wanted:
        return list(dataset.subjects)
    known = {s.name: s for s in dataset.subjects}
    unknown = [name for name in wanted if name not in known]
    if unknown:
        guesses = [f"{name!r} (did you mean {close[0]!r}?)" if close else repr(name)
                   for name in unknown
                   for close in [difflib.get_close_matches(name, list(known), n=1)]]
        raise ValueError(f"no subject {', '.join(guesses)} in {dataset.root}; its subjects: "
                         f"{', '.join(sorted(known)) or 'none'}")
    return [known[name] for name in wanted]


@dataclass(frozen=True)
class RunSetup:
    """A run's inputs resolved and checked: settings, dataset, subjects, prompts, store."""

    ctx: RunContext
    params: CustomizeParams
    dataset: Dataset
    subjects: list[Subject]
    prompt_sets: dict[str, PromptSet]
    prompts: dict[str, list[str]]
    store: ArtifactStore
    metric_models: dict[str, str]

    def plan(self) -> RunPlan:
        return plan_run(self.ctx, self.subjects, self.prompt_sets, self.prompts,
                        store=self.store)


def prepare_run(params: CustomizeParams, workdir: Path = DEFAULT_WORKDIR) -> RunSetup:
    """The pre-flight of a run: dataset, subjects, base model and store, each checked before
    any work, the quickest first (an unusable one raises, with one line saying what to fix)."""
    dataset = resolve_dataset(params, workdir)
    subjects = select_subjects(dataset, params.subjects)
    offline = resolve_models(params, workdir)
    base_model = offline.base if offline else params.base_model
    eval_models = (EvalConfig(clip_model=offline.clip, clip_pretrained="",
                              dino_model=offline.dino) if offline else None)
    config = params.run_config(base_model=base_model, eval_models=eval_models,
                               resolution=offline.resolution if offline else None)
    check_base_model(base_model, local_files_only=config.model.local_files_only,
                     resolution=config.train.resolution)
    store = store_from_config(config.storage)
    store.check()
    prompt_sets = {s.name: subject_prompt_set(dataset, s, params) for s in subjects}
    prompts = {s.name: evaluation_prompts(dataset, s, params, config) for s in subjects}
    return RunSetup(RunContext(params.derived_run_id(), config), params, dataset, subjects,
                    prompt_sets, prompts, store, offline.metric_models if offline else {})


def subject_prompt_set(dataset: Dataset, subject: Subject, params: CustomizeParams) -> PromptSet:
    """The prompt set a subject is evaluated on: the run's, or the subject's own."""
    return (dataset.prompt_set(params.prompt_set) if params.prompt_set
            else dataset.prompts_for(subject))


def evaluation_prompts(dataset: Dataset, subject: Subject, params: CustomizeParams,
                       config: RunConfig) -> list[str]:
    """The subject's prompts with the placeholder token (the first ``max_prompts``)."""
    prompt_set = subject_prompt_set(dataset, subject, params)
    prompts = prompt_set.render(config.train.placeholder_token, subject.class_noun)
    return prompts[:params.max_prompts] if params.max_prompts else prompts


def previous_record(store: ArtifactStore, run_id: str) -> dict:
    """The run record a previous run of ``run_id`` left, or ``{}``."""
    try:
        return store.get_json(keys.run_record(run_id))
    except ArtifactNotFoundError:
        return {}
