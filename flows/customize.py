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
import json
import logging
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import UUID

from prefect import flow, get_run_logger
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.futures import PrefectFuture
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from eqdiff.config import EvalConfig, MethodConfig, RunConfig, to_dict
from eqdiff.data.datasets import Dataset, Subject, load_dataset
from eqdiff.data.images import jpeg_thumbnail
from eqdiff.data.masks import LEARNED_EXTRACTORS
from eqdiff.data.prompts import PromptSet
from eqdiff.fixtures import FixtureModels, fixture_dataset, fixture_models
from eqdiff.method.models import check_base_model
from eqdiff.pipeline.skeleton import RunContext
from eqdiff.store import ArtifactStore, StorageError, keys, store_from_config
from eqdiff.store.errors import is_transient
from eqdiff.store.lease import LeaseLostError, default_holder, hold_lease
from flows.compute import ComputePlan, check_topology, plan_compute
from flows.interrupts import crash_open_task_runs, crash_orphaned_runs
from flows.params import CustomizeParams
from tasks import stages as stage_tasks

logger = logging.getLogger(__name__)

DEFAULT_WORKDIR = Path.home() / ".cache" / "eqdiff"
# The flow's default run: the Prefect UI's form starts from it, filled in field by field
DEFAULT_PARAMS = CustomizeParams()


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
    """Wait for ``futures`` (with a progress artifact); failures keep their reason.

    A task whose Ray worker or node was lost after its last retry comes back as a crashed
    state (Ray's error as the reason); its task run, which the dead worker left Running, is
    marked Crashed too, and the other units go on."""
    outcome = Outcome()
    progress = create_progress_artifact(0.0, description=f"{stage}: {len(futures)} item(s)")
    for index, (key, future) in enumerate(futures.items(), start=1):
        future.wait()
        result = future.result(raise_on_failure=False)
        if isinstance(result, BaseException):
            reason = _error_text(result)
            if future.state.is_crashed():
                reason = _crash_reason(result)
                _mark_crashed(future, reason)
            outcome.failed[key] = f"{stage}: {reason}"
            get_run_logger().error("%s %s failed: %s", stage, key, reason)
        else:
            outcome.done[key] = {stage: result}
        update_progress_artifact(progress, 100.0 * index / max(len(futures), 1))
    return outcome


def _crash_reason(error: BaseException) -> str:
    """Why a task came back crashed: its worker or node was lost (Ray's own errors), or it
    raised before Prefect could run it in the worker (Ray wraps that in ``RayTaskError``)."""
    cause = getattr(error, "cause", None)
    if cause is not None:  # RayTaskError: the worker ran and raised
        return f"failed in its Ray worker: {type(cause).__name__}: {_error_text(cause)}"
    return f"lost its worker: {_error_text(error)}"


def _mark_crashed(future: PrefectFuture, reason: str) -> None:
    """Record in Prefect that a task run's worker died (it cannot say so itself)."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound, PrefectHTTPStatusError
    from prefect.states import Crashed

    with get_client(sync_client=True) as client:
        try:
            client.set_task_run_state(future.task_run_id, Crashed(message=reason), force=True)
        except (ObjectNotFound, PrefectHTTPStatusError) as error:
            # the worker died before the server heard of its task run: nothing is left Running
            if getattr(getattr(error, "response", None), "status_code", 404) != 404:
                raise


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

@flow(name="prepare-subjects", validate_parameters=False, on_crashed=[crash_open_task_runs])
def prepare_subjects(ctx: RunContext, subjects: list[Subject], prompt_sets: dict[str, PromptSet],
                     plan: ComputePlan) -> Outcome:
    """Ingest, preprocess then mask every subject; ``done`` holds the subjects ready to train.

    Ingest runs here, in the flow's own process, which has just read the dataset: it is the
    only step that opens dataset files. Everything after it reads the store's copy, on
    whichever node Ray places it."""
    outcome = Outcome()
    ingested = Outcome()
    for s in subjects:
        state = stage_tasks.ingest(ctx, s, prompt_sets[s.name], return_state=True)
        result = state.result(raise_on_failure=False)
        if isinstance(result, BaseException):
            ingested.failed[s.name] = f"ingest: {_error_text(result)}"
            get_run_logger().error("ingest %s failed: %s", s.name, _error_text(result))
        else:
            ingested.done[s.name] = {"ingest": result}
    outcome.merge(ingested)
    prepared = _settle({name: _submit(stage_tasks.preprocess, plan, gpu=False, ctx=ctx,
                                      subject=name)
                        for name in ingested.done}, "preprocess")
    outcome.merge(prepared)
    masked = _settle({name: _submit(stage_tasks.extract_masks, plan,
                                    gpu=masks_run_a_model(ctx.config), ctx=ctx, subject=name)
                      for name in prepared.done}, "masks")
    outcome.merge(masked)
    outcome.done = {k: v for k, v in outcome.done.items() if k in masked.done}
    return outcome


@flow(name="train-concepts", validate_parameters=False, on_crashed=[crash_open_task_runs])
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


@flow(name="generate-images", validate_parameters=False, on_crashed=[crash_open_task_runs])
def generate_images(ctx: RunContext, pairs: list[tuple[Subject, str]],
                    prompts: dict[str, list[str]], plan: ComputePlan) -> Outcome:
    """Images for every trained (subject, method), ``images_per_prompt`` per prompt."""
    futures = {f"{s.name}/{m}": _submit(stage_tasks.generate_samples, plan, ctx=ctx,
                                        subject=s.name, method=m, prompts=prompts[s.name])
               for s, m in pairs}
    outcome = Outcome()
    outcome.merge(_settle(futures, "generate"))
    return outcome


@flow(name="evaluate", validate_parameters=False, on_crashed=[crash_open_task_runs])
def evaluate(ctx: RunContext, methods_by_subject: dict[str, tuple[Subject, list[str]]],
             plan: ComputePlan) -> Outcome:
    """CLIP-I, CLIP-T and DINO per subject (real-image features once per subject)."""
    futures = {name: _submit(stage_tasks.score_subject, plan, ctx=ctx, subject=name,
                             methods=methods)
               for name, (_, methods) in methods_by_subject.items()}
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


def _flow_run_name() -> str:
    """A customize run's flow run is named after its run id (found again by it)."""
    params = flow_run.get_parameters().get("params", DEFAULT_PARAMS)
    if isinstance(params, dict):
        params = CustomizeParams(**params)
    return params.derived_run_id()


@flow(name="customize-dataset", flow_run_name=_flow_run_name, on_crashed=[crash_open_task_runs])
def customize_dataset(params: CustomizeParams = DEFAULT_PARAMS) -> dict:
    """Customize every subject of a dataset with every method, then evaluate and report."""
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
    check_base_model(base_model, local_files_only=config.model.local_files_only)
    store = store_from_config(config.storage)
    store.check()
    for problem in dataset.problems:
        log.warning("dataset: %s", problem.message)
    subjects, unknown = select_subjects(dataset, params.subjects)
    plan = plan_compute(params.compute, params.ray_address, params.gpus_per_subject,
                        reuse_gpu_workers=params.reuse_gpu_workers,
                        expect_gpus=params.expect_gpus,
                        lost_worker_retries=params.lost_worker_retries)
    check_topology(plan, config.storage)
    ctx = RunContext(run_id, config)
    log.info("run %s: %d subjects × %d methods on %s", run_id, len(subjects),
             len(config.methods), plan.target)
    holder = default_holder(f"flow run {flow_run.get_id()}")
    with hold_lease(store, keys.run_lease(run_id), holder) as lease:
        crash_orphaned_runs(run_id, UUID(flow_run.get_id()), holder)
        run = run_stages(ctx, dataset, subjects, params, plan)
        run.failed.update(unknown)
        if lease.lost:
            raise LeaseLostError(f"run {run_id}: this run lost its lease on "
                                 f"{keys.run_lease(run_id)} (it stalled past the lease's "
                                 "expiry and another run may have taken over); its run record "
                                 "is not written: check that run, then rerun this one")
        record = run_record(run_id, params, config, dataset, run, base_model, metric_models,
                            [s.name for s in subjects] + list(unknown))
        record["record_at"] = save_run_record(store, run_id, record, DEFAULT_WORKDIR)
        report = None
        if run.done and record["record_at"] == store.location(keys.run_record(run_id)):
            built = stage_tasks.build_report(ctx, return_state=True)
            report = built.result(raise_on_failure=False)
            if isinstance(report, BaseException):
                log.error("run %s: the report could not be built: %s", run_id,
                          _error_text(report))
                report = None
    try:
        publish_artifacts(store, run_id, record, report)
    except StorageError as error:  # the store is down: the summary goes to Prefect without scores
        log.error("run %s: scores could not be read for the Prefect artifacts: %s", run_id,
                  _error_text(error))
        publish_artifacts(None, run_id, record, report)
    log.info("run %s finished: %d of %d units done%s", run_id,
             sum(v == "done" for v in record["units"].values()), len(record["units"]),
             f"; report: {report['location']}" if report else "")
    return {**record, "report": report}


def run_stages(ctx: RunContext, dataset: Dataset, subjects: list[Subject],
               params: CustomizeParams, plan: ComputePlan) -> Outcome:
    """The stage subflows in order, each given the units the previous one finished."""
    config = ctx.config
    runner = _task_runner(plan)
    run = Outcome()
    prompt_sets = {s.name: subject_prompt_set(dataset, s, params) for s in subjects}
    prepared = prepare_subjects.with_options(task_runner=runner)(ctx, subjects, prompt_sets,
                                                                 plan)
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
    return run


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


def run_record(run_id: str, params: CustomizeParams, config: RunConfig, dataset: Dataset,
               run: Outcome, base_model: str, metric_models: dict[str, str],
               subjects: list[str]) -> dict:
    """``run.json``: parameters, resolved config, per-item status with failure reasons, and
    ``units``: every requested (subject, method) with its outcome (a unit fails with its
    subject when the subject failed before training)."""
    status = {key: f"failed: {reason}" for key, reason in run.failed.items()}
    for key in run.done:
        status.setdefault(key, "done")
    units = {}
    for subject in subjects:
        for method in config.methods:
            key = f"{subject}/{method.name}"
            units[key] = status.get(key) or status.get(subject) or "failed: not run"
    return {"run_id": run_id, "params": params.model_dump(mode="json"),
            "config": to_dict(config), "base_model": base_model,
            "metric_models": metric_models, "dataset": str(dataset.root),
            "status": dict(sorted(status.items())), "failures": dict(sorted(run.failed.items())),
            "records": run.done, "units": units,
            "dataset_problems": [{"kind": p.kind, "subject": p.subject, "message": p.message}
                                 for p in dataset.problems]}


def save_run_record(store: ArtifactStore, run_id: str, record: dict, workdir: Path, *,
                    attempts: int = 4, first_delay_s: float = 2.0) -> str:
    """Write ``run.json`` and return where it is. Transient store trouble is retried with
    backoff; when the store still cannot take it (down, full, read-only), the record goes to a
    local file instead, named in an error, so a run's outcome is never lost."""
    key = keys.run_record(run_id)
    for attempt in range(1, attempts + 1):
        try:
            store.put_json(key, record)
            return store.location(key)
        except StorageError as error:
            if not is_transient(error) or attempt == attempts:
                failure = error
                break
            delay = first_delay_s * 2 ** (attempt - 1)
            logger.warning("run %s: writing the run record failed (%s); retry %d/%d in %.0f s",
                           run_id, _error_text(error), attempt, attempts - 1, delay)
            time.sleep(delay)
    fallback = workdir / "run-records" / f"{_artifact_slug(run_id)}-{int(time.time())}.json"
    fallback.parent.mkdir(parents=True, exist_ok=True)
    fallback.write_text(json.dumps({**record, "record_at": str(fallback)}, indent=2))
    logger.error("run %s: the run record could not be written to %s (%s); it is at %s",
                 run_id, store.location(key), _error_text(failure), fallback)
    return str(fallback)


def publish_artifacts(store: ArtifactStore | None, run_id: str, record: dict,
                      report: dict | None) -> None:
    """Prefect artifacts: the summary score table, and a markdown note with the report link,
    failures and a few thumbnails (without a store: the note alone, from the record)."""
    from eqdiff.evaluation.report import method_table, subject_table
    from eqdiff.evaluation.scores import load_run_scores

    scores, failures = (load_run_scores(store, run_id, record) if store is not None
                        else ([], {}))
    if len(scores):
        methods = method_table(subject_table(scores, failures)).round(4)
        create_table_artifact(key=f"scores-{_artifact_slug(run_id)}",
                              table=methods.to_dict(orient="records"),
                              description=f"Mean scores per method, run {run_id}")
    lines = [f"# EqDiff run `{run_id}`", "", f"Run record: `{record['record_at']}`", ""]
    if report:
        lines += [f"**Report:** `{report['location']}`", "",
                  "A store address, with no credentials in it. A link a browser can open, valid "
                  f"for one hour: `eqdiff report --store {store.url if store else '…'} --run-id "
                  f"{run_id} "
                  "--link 3600`", ""]
    failed = {k: v for k, v in record["status"].items() if v.startswith("failed")}
    units = record["units"]
    done = sum(v == "done" for v in units.values())
    lines += [f"**{done}** of **{len(units)}** (subject, method) units done.", ""]
    if record["dataset_problems"]:
        lines += ["**Dataset problems** (not fatal; these subjects or files were left out):", ""]
        lines += [f"- {p['message']}" for p in record["dataset_problems"]]
        lines.append("")
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
