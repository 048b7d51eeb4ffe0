"""What a run would do: every stage of every unit, done or to run, without running anything.

A stage's digest is computed from the dataset and the settings alone (each stage's digest is
a function of the digests of the stages it reads; see
:mod:`eqdiff.pipeline.digests`), and a stage is done when its marker holds that digest. So the
plan reads one marker per stage and nothing else. The flow dispatches only the steps the plan
finds to run; ``eqdiff plan`` and ``eqdiff status`` print the same table.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from eqdiff.config import MethodConfig
from eqdiff.data.datasets import Subject
from eqdiff.data.prompts import PromptSet
from eqdiff.evaluation.metrics import REAL_IMAGES
from eqdiff.pipeline import digests
from eqdiff.pipeline.ingest import IngestedSubject
from eqdiff.pipeline.skeleton import RunContext
from eqdiff.store import ArtifactStore, keys

logger = logging.getLogger(__name__)

SUBJECT_STAGES = ("ingest", "preprocess", "masks")
UNIT_STAGES = ("priors", "train", "generate", "score")
STAGES = SUBJECT_STAGES + UNIT_STAGES
DONE, TO_RUN, NOT_NEEDED = "done", "to run", "—"

MARKER_READERS = 8  # markers read at once (one GET each on S3)


@dataclass(frozen=True)
class Step:
    """One stage of one item: a subject (ingest, preprocess, masks), a class (priors), a
    (subject, method) unit (train, generate, score) or a subject's real photos (score)."""

    stage: str
    item: str
    prefix: str
    digest: str
    done: bool = False
    info: dict = field(default_factory=dict)  # a done step's marker facts


@dataclass
class RunPlan:
    """Every step of a run by (stage, item), and which unit each subject and method maps to."""

    run_id: str
    subjects: list[str]
    methods: list[str]
    classes: dict[str, str]  # subject -> class noun
    steps: dict[tuple[str, str], Step] = field(default_factory=dict)
    priors_for: dict[str, bool] = field(default_factory=dict)  # method -> uses class priors

    def step(self, stage: str, item: str) -> Step | None:
        return self.steps.get((stage, item))

    def units(self) -> list[str]:
        return [f"{s}/{m}" for s in self.subjects for m in self.methods]

    def unit_steps(self, unit: str) -> dict[str, Step | None]:
        """The steps a unit's result depends on, by stage (``None``: the stage is not part of
        this unit, as class priors for a method without prior preservation)."""
        subject, method = unit.split("/", 1)
        found: dict[str, Step | None] = {stage: self.step(stage, subject)
                                         for stage in SUBJECT_STAGES}
        found["priors"] = (self.step("priors", self.classes[subject])
                           if self.priors_for[method] else None)
        found.update({stage: self.step(stage, unit) for stage in ("train", "generate", "score")})
        return found

    def unit_done(self, unit: str) -> bool:
        return all(step is None or step.done for step in self.unit_steps(unit).values())

    @property
    def all_done(self) -> bool:
        """Every unit, and every subject's real-photo scores, are done: nothing to dispatch."""
        return all(step.done for step in self.steps.values())

    def to_run(self) -> list[Step]:
        return [step for step in self.steps.values() if not step.done]

    def table(self, previous: Mapping[str, Any] | None = None) -> list[dict[str, str]]:
        """One row per unit: each stage done / to run, and the unit's outcome in the previous
        run record (``previous``: its ``units``), if there was one."""
        last = dict((previous or {}).get("units", {}))
        rows = []
        for unit in self.units():
            subject, method = unit.split("/", 1)
            row = {"subject": subject, "method": method}
            for stage, step in self.unit_steps(unit).items():
                row[stage] = NOT_NEEDED if step is None else DONE if step.done else TO_RUN
            row["last run"] = last.get(unit, "")
            rows.append(row)
        return rows

    def summary(self) -> str:
        units = self.units()
        done = sum(self.unit_done(u) for u in units)
        return (f"run {self.run_id}: {done} of {len(units)} (subject, method) units done, "
                f"{len(self.to_run())} step(s) to run")


def plan_run(ctx: RunContext, subjects: Sequence[Subject], prompt_sets: Mapping[str, PromptSet],
             prompts: Mapping[str, Sequence[str]], *,
             store: ArtifactStore | None = None) -> RunPlan:
    """The plan of ``ctx``'s run over ``subjects``: every step's digest, checked against its
    marker. ``prompt_sets`` and ``prompts`` (the rendered evaluation prompts) by subject name.
    Reads the subjects' photos (to hash them) and one marker per step."""
    store = store or ctx.store()
    methods: tuple[MethodConfig, ...] = ctx.config.methods
    run_id = ctx.run_id
    plan = RunPlan(run_id, [s.name for s in subjects], [m.name for m in methods],
                   {s.name: s.class_noun for s in subjects},
                   priors_for={m.name: m.prior_preservation for m in methods})
    steps: list[Step] = []
    prior_prefixes = {}
    if any(m.prior_preservation for m in methods):
        for class_noun in sorted({s.class_noun for s in subjects}):
            digest = digests.priors_digest(ctx, class_noun)
            prior_prefixes[class_noun] = keys.prior_prefix(class_noun, digest)
            steps.append(Step("priors", class_noun, prior_prefixes[class_noun], digest))
    eval_hash = digests.evaluation_hash(ctx.config.eval)
    for subject in subjects:
        name = subject.name
        ingest = digests.ingest_digest(IngestedSubject.describe(subject, prompt_sets[name]))
        pre = digests.preprocess_digest(ctx, ingest)
        masks = digests.masks_digest(ctx, pre, ingest)
        steps += [Step("ingest", name, keys.ingest_prefix(run_id, name), ingest),
                  Step("preprocess", name, keys.preprocess_prefix(run_id, name), pre),
                  Step("masks", name, keys.masks_prefix(run_id, name), masks),
                  Step("score", f"{name}/{REAL_IMAGES}",
                       keys.scores_prefix(run_id, name, REAL_IMAGES),
                       digests.scores_digest(eval_hash, pre))]
        for method in methods:
            unit = f"{name}/{method.name}"
            prior = prior_prefixes.get(subject.class_noun) if method.prior_preservation else None
            concept = digests.train_digest(ctx, method, masks, prior)
            samples = digests.samples_digest(ctx, concept, prompts[name])
            steps += [Step("train", unit, keys.concept_prefix(run_id, name, method.name),
                           concept),
                      Step("generate", unit, keys.samples_prefix(run_id, name, method.name),
                           samples),
                      Step("score", unit, keys.scores_prefix(run_id, name, method.name),
                           digests.scores_digest(eval_hash, samples))]
    with ThreadPoolExecutor(MARKER_READERS) as pool:
        markers = list(pool.map(lambda s: store.read_marker(s.prefix), steps))
    for step, marker in zip(steps, markers, strict=True):
        done = marker is not None and marker.config_hash == step.digest
        plan.steps[(step.stage, step.item)] = Step(step.stage, step.item, step.prefix,
                                                   step.digest, done,
                                                   dict(marker.info) if done else {})
    logger.info("%s", plan.summary())
    return plan

