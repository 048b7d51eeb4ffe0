"""``customize_dataset``: the whole DAG over a dataset, as a parent flow with stage subflows.

    prepare subjects (preprocess → masks, per subject)
    class priors (once per class) ─┐
    train concepts (per subject × method, on Ray with one GPU each when the cluster has GPUs)
    generate images → score → report

Every stage skips work whose completion marker exists in the store, so a rerun of a finished
run costs seconds and an interrupted one continues (training from its last checkpoint). A
subject that fails is recorded with its reason and the others go on.
"""

from __future__ import annotations

import base64
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.futures import PrefectFuture
from prefect.task_runners import ThreadPoolTaskRunner

from eqdiff.config import EvalConfig, MethodConfig, RunConfig, to_dict
from eqdiff.data.datasets import Dataset, Subject, load_dataset
from eqdiff.data.images import jpeg_thumbnail
from eqdiff.data.masks import LEARNED_EXTRACTORS
from eqdiff.fixtures import FixtureModels, fixture_dataset, fixture_models
from eqdiff.pipeline.skeleton import RunContext
from eqdiff.store import ArtifactStore, keys, store_from_config
from flows.compute import ComputePlan, plan_compute
from flows.params import CustomizeParams
from tasks import stages as stage_tasks

logger = logging.getLogger(__name__)

DEFAULT_WORKDIR = Path.home() / ".cache" / "eqdiff"


@dataclass
class Outcome:
    """What a stage subflow finished (records by key) and what failed (reasons by key).

    Keys are subject names, class nouns, or ``subject/method``.
    """

    done: dict[str, dict] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)

    def merge(self, other: Outcome) -> None:
        for key, records in other.done.items():
            self.done.setdefault(key, {}).update(records)
        self.failed.update(other.failed)


def _error_text(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:500]


def _settle(futures: dict[str, PrefectFuture], stage: str) -> Outcome:
    """Wait for ``futures`` (with a progress artifact); failures keep their reason."""
    outcome = Outcome()
    progress = create_progress_artifact(0.0, description=f"{stage}: {len(futures)} item(s)")
    for index, (key, future) in enumerate(futures.items(), start=1):
        result = future.result(raise_on_failure=False)
        if isinstance(result, BaseException):
            outcome.failed[key] = f"{stage}: {_error_text(result)}"
            get_run_logger().error("%s %s failed: %s", stage, key, _error_text(result))
        else:
            outcome.done[key] = {stage: result}
        update_progress_artifact(progress, 100.0 * index / max(len(futures), 1))
    return outcome


def _submit(task: Any, plan: ComputePlan, *, gpu: bool = True, **parameters: Any
            ) -> PrefectFuture:
    """Submit ``task``; on Ray it asks for the plan's GPUs only when ``gpu`` (it runs a model)."""
    if plan.target == "ray":
        from prefect_ray.context import remote_options

        with remote_options(**plan.remote_options(gpu=gpu)):
            return task.submit(**parameters)
    return task.submit(**parameters)


def masks_run_a_model(config: RunConfig) -> bool:
    """Whether the mask stage runs a learned extractor (and so wants a GPU); GrabCut, alpha,
    provided and full masks are CPU work."""
    return config.masks.extractor in LEARNED_EXTRACTORS


def _task_runner(plan: ComputePlan) -> Any:
    if plan.target == "ray":
        from prefect_ray.task_runners import RayTaskRunner

        return RayTaskRunner(address=plan.address or None)
    return ThreadPoolTaskRunner(max_workers=1)


# --------------------------------------------------------------------------- stage subflows
# Parameters are our own frozen records: Prefect must pass them through, not re-validate them.

@flow(name="prepare-subjects", validate_parameters=False)
def prepare_subjects(ctx: RunContext, subjects: list[Subject], plan: ComputePlan) -> Outcome:
    """Preprocess then mask every subject; ``done`` holds the subjects ready to train."""
    outcome = Outcome()
    prepared = _settle({s.name: _submit(stage_tasks.preprocess, plan, gpu=False, ctx=ctx,
                                         subject=s)
                        for s in subjects}, "preprocess")
    outcome.merge(prepared)
    masked = _settle({s.name: _submit(stage_tasks.extract_masks, plan,
                                       gpu=masks_run_a_model(ctx.config), ctx=ctx, subject=s)
                      for s in subjects if s.name in prepared.done}, "masks")
    outcome.merge(masked)
    outcome.done = {k: v for k, v in outcome.done.items() if k in masked.done}
    return outcome


@flow(name="train-concepts", validate_parameters=False)
def train_concepts(ctx: RunContext, subjects: list[Subject], plan: ComputePlan) -> Outcome:
    """Class priors once per class, then one concept per (subject, method)."""
    methods: tuple[MethodConfig, ...] = ctx.config.methods
    classes = sorted({s.class_noun for s in subjects}) if any(
        m.prior_preservation for m in methods) else []
    priors = _settle({c: _submit(stage_tasks.class_priors, plan, ctx=ctx, class_noun=c)
                      for c in classes}, "class priors")
    outcome = Outcome()
    futures = {}
    for subject in subjects:
        prior = priors.done.get(subject.class_noun, {}).get("class priors")
        for method in methods:
            key = f"{subject.name}/{method.name}"
            if method.prior_preservation and prior is None:
                outcome.failed[key] = priors.failed[subject.class_noun]
                continue
            futures[key] = _submit(stage_tasks.train_concept, plan, ctx=ctx, subject=subject.name,
                                   class_noun=subject.class_noun, method=method,
                                   prior_prefix=prior["prefix"] if prior else None)
    outcome.merge(_settle(futures, "train"))
    return outcome


@flow(name="generate-images", validate_parameters=False)
def generate_images(ctx: RunContext, pairs: list[tuple[Subject, str]],
                    prompts: dict[str, list[str]], plan: ComputePlan) -> Outcome:
    """Images for every trained (subject, method), ``images_per_prompt`` per prompt."""
    futures = {f"{s.name}/{m}": _submit(stage_tasks.generate_samples, plan, ctx=ctx, subject=s,
                                        method=m, prompts=prompts[s.name]) for s, m in pairs}
    outcome = Outcome()
    outcome.merge(_settle(futures, "generate"))
    return outcome


@flow(name="evaluate", validate_parameters=False)
def evaluate(ctx: RunContext, methods_by_subject: dict[str, tuple[Subject, list[str]]],
             plan: ComputePlan) -> Outcome:
    """CLIP-I, CLIP-T and DINO per subject (real-image features once per subject)."""
    futures = {name: _submit(stage_tasks.score_subject, plan, ctx=ctx, subject=subject,
                             methods=methods)
               for name, (subject, methods) in methods_by_subject.items()}
    outcome = Outcome()
    outcome.merge(_settle(futures, "score"))
    return outcome


# --------------------------------------------------------------------------- the parent flow

def resolve_dataset(params: CustomizeParams, workdir: Path) -> Dataset:
    """The dataset folder, or a built-in one (``toyworld``, ``demo``) drawn into ``workdir``."""
    return load_dataset(fixture_dataset(params.dataset, workdir) or params.dataset)


def resolve_models(params: CustomizeParams, workdir: Path) -> FixtureModels | None:
    """The built-in offline models ``params.base_model`` names (``toy``, ``tiny``), if any."""
    return fixture_models(params.base_model, workdir)


def select_subjects(dataset: Dataset, wanted: Iterable[str]
                    ) -> tuple[list[Subject], dict[str, str]]:
    """The requested subjects, and reasons for names the dataset does not have (not fatal)."""
    wanted = list(wanted)
    if not wanted:
        return list(dataset.subjects), {}
    known = {s.name: s for s in dataset.subjects}
    unknown = {name: f"no subject {name!r} in {dataset.root}" for name in wanted
               if name not in known}
    return [known[name] for name in wanted if name in known], unknown


@flow(name="customize-dataset")
def customize_dataset(params: CustomizeParams | None = None) -> dict:
    """Customize every subject of a dataset with every method, then evaluate and report."""
    params = params or CustomizeParams()
    log = get_run_logger()
    workdir = DEFAULT_WORKDIR
    run_id = params.derived_run_id()
    offline = resolve_models(params, workdir)
    base_model = offline.base if offline else params.base_model
    metric_models = offline.metric_models if offline else {}
    dataset = resolve_dataset(params, workdir)
    eval_models = (EvalConfig(clip_model=offline.clip, clip_pretrained="",
                              dino_model=offline.dino) if offline else None)
    config = params.run_config(base_model=base_model, eval_models=eval_models,
                               resolution=offline.resolution if offline else None)
    store = store_from_config(config.storage)
    store.check()
    for problem in dataset.problems:
        log.warning("dataset: %s", problem.message)
    subjects, unknown = select_subjects(dataset, params.subjects)
    plan = plan_compute(params.compute, params.ray_address, params.gpus_per_subject,
                        reuse_gpu_workers=params.reuse_gpu_workers)
    ctx = RunContext(run_id, config)
    log.info("run %s: %d subjects × %d methods on %s", run_id, len(subjects),
             len(config.methods), plan.target)
    runner = _task_runner(plan)
    run = Outcome(failed=dict(unknown))
    prepared = prepare_subjects.with_options(task_runner=runner)(ctx, subjects, plan)
    run.merge(prepared)
    ready = [s for s in subjects if s.name in prepared.done]
    trained = train_concepts.with_options(task_runner=runner)(ctx, ready, plan)
    run.merge(trained)
    pairs = [(s, m.name) for s in ready for m in config.methods
             if f"{s.name}/{m.name}" in trained.done]
    prompts = {s.name: evaluation_prompts(dataset, s, params, config) for s in ready}
    generated = generate_images.with_options(task_runner=runner)(ctx, pairs, prompts, plan)
    run.merge(generated)
    by_subject: dict[str, tuple[Subject, list[str]]] = {}
    for subject, method in pairs:
        if f"{subject.name}/{method}" in generated.done:
            by_subject.setdefault(subject.name, (subject, []))[1].append(method)
    scored = evaluate.with_options(task_runner=runner)(ctx, by_subject, plan)
    for name, reason in scored.failed.items():  # a subject's scoring failure fails its pairs
        for method in by_subject[name][1]:
            run.failed[f"{name}/{method}"] = reason
    run.merge(scored)
    record = run_record(run_id, params, config, dataset, run, base_model, metric_models)
    store.put_json(keys.run_record(run_id), record)
    report = stage_tasks.build_report(ctx) if run.done else None
    publish_artifacts(store, run_id, record, report)
    log.info("run %s finished: %d done, %d failed%s", run_id,
             sum(v == "done" for v in record["status"].values()), len(run.failed),
             f"; report: {report['url']}" if report else "")
    return {**record, "report": report}


def evaluation_prompts(dataset: Dataset, subject: Subject, params: CustomizeParams,
                       config: RunConfig) -> list[str]:
    """The subject's prompts with the placeholder token (the first ``max_prompts``)."""
    prompt_set = (dataset.prompt_set(params.prompt_set) if params.prompt_set
                  else dataset.prompts_for(subject))
    prompts = prompt_set.render(config.train.placeholder_token, subject.class_noun)
    return prompts[:params.max_prompts] if params.max_prompts else prompts


def run_record(run_id: str, params: CustomizeParams, config: RunConfig, dataset: Dataset,
               run: Outcome, base_model: str, metric_models: dict[str, str]) -> dict:
    """``run.json``: parameters, resolved config, per-item status with failure reasons."""
    status = {key: f"failed: {reason}" for key, reason in run.failed.items()}
    for key in run.done:
        status.setdefault(key, "done")
    return {"run_id": run_id, "params": params.model_dump(mode="json"),
            "config": to_dict(config), "base_model": base_model,
            "metric_models": metric_models, "dataset": str(dataset.root),
            "status": dict(sorted(status.items())), "failures": dict(sorted(run.failed.items())),
            "records": run.done, "dataset_problems": [p.message for p in dataset.problems]}


def publish_artifacts(store: ArtifactStore, run_id: str, record: dict,
                      report: dict | None) -> None:
    """Prefect artifacts: the summary score table, and a markdown note with the report link,
    failures and a few thumbnails."""
    from eqdiff.evaluation.report import method_table, subject_table
    from eqdiff.evaluation.scores import load_run_scores

    scores, failures = load_run_scores(store, run_id, record)
    if len(scores):
        methods = method_table(subject_table(scores, failures)).round(4)
        create_table_artifact(key=f"scores-{_artifact_slug(run_id)}",
                              table=methods.to_dict(orient="records"),
                              description=f"Mean scores per method, run {run_id}")
    lines = [f"# EqDiff run `{run_id}`", ""]
    if report:
        lines += [f"**Report:** [{report['report']}]({report['url']})", ""]
    failed = {k: v for k, v in record["status"].items() if v.startswith("failed")}
    lines += [f"**{len(record['status']) - len(failed)}** items done, **{len(failed)}** failed.",
              ""]
    if failed:
        lines += ["| item | reason |", "|---|---|"]
        lines += [f"| {k} | {v.removeprefix('failed: ')} |" for k, v in failed.items()]
        lines.append("")
    thumbnails = list(scores[scores["seed"] >= 0]["image_key"])[:6] if len(scores) else []
    for key in thumbnails:
        lines.append(f"![{key}]({_thumbnail_uri(store.get_bytes(key))})")
    create_markdown_artifact(key=f"report-{_artifact_slug(run_id)}", markdown="\n".join(lines),
                             description=f"EqDiff run {run_id}")


def _artifact_slug(run_id: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]+", "-", run_id.lower()).strip("-") or "run"


def _thumbnail_uri(data: bytes, size: int = 96) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(jpeg_thumbnail(data, size)).decode()
