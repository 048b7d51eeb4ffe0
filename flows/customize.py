"""``customize_dataset``: the whole DAG over a dataset, as one flow whose task runs are the
steps of its units.

    plan (every step's digest against its marker: done or to run)
    ingest (in the flow's process) → preprocess → masks            per subject
    class priors                                                    per class
    train → generate                                                per (subject, method)
    score (real photos and every generated method)                  per subject
    report

Only steps the plan finds to run are dispatched, each as soon as what it reads is done: a
subject is generated and scored while others still train, and a finished run starts no Ray
instance. An interrupted run continues (training from its last checkpoint). A subject that
fails is recorded with its reason and the others go on.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import time
from pathlib import Path
from typing import Any
from uuid import UUID

from prefect import flow, get_run_logger
from prefect.artifacts import (
    create_markdown_artifact,
    create_table_artifact,
)
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from eqdiff.config import RunConfig, to_dict
from eqdiff.data.datasets import Subject
from eqdiff.data.images import jpeg_thumbnail
from eqdiff.data.masks import LEARNED_EXTRACTORS
from eqdiff.evaluation.metrics import REAL_IMAGES
from eqdiff.pipeline.plan import RunPlan
from eqdiff.pipeline.skeleton import RunContext
from eqdiff.store import ArtifactStore, StorageError, keys
from eqdiff.store.errors import is_transient
from eqdiff.store.lease import LeaseLostError, default_holder, hold_lease
from flows.compute import ComputePlan, check_topology, plan_compute
from flows.interrupts import crash_open_task_runs, crash_orphaned_runs
from flows.params import CustomizeParams
from flows.preflight import (
    DEFAULT_WORKDIR,
    RunSetup,
    prepare_run,
    previous_record,
)
from flows.schedule import Dispatcher, Job, Outcome, error_text

logger = logging.getLogger(__name__)

# The flow's default run: the Prefect UI's form starts from it, filled in field by field
DEFAULT_PARAMS = CustomizeParams()


def masks_run_a_model(config: RunConfig) -> bool:
    """Whether the mask stage runs a learned extractor (and so wants a GPU); GrabCut, alpha,
    provided and full masks are CPU work."""
    return config.masks.extractor in LEARNED_EXTRACTORS


def _task_runner(plan: ComputePlan) -> Any:
    if plan.target == "ray":
        from prefect_ray.task_runners import RayTaskRunner

        return RayTaskRunner(address=plan.address or None)
    return ThreadPoolTaskRunner(max_workers=1)


# --------------------------------------------------------------------------- the parent flow

def _flow_run_name() -> str:
    """A customize run's flow run is named after its run id (found again by it)."""
    params = flow_run.get_parameters().get("params", DEFAULT_PARAMS)
    if isinstance(params, dict):
        params = CustomizeParams(**params)
    return params.derived_run_id()


@flow(name="customize-dataset", flow_run_name=_flow_run_name, on_crashed=[crash_open_task_runs])
def customize_dataset(params: CustomizeParams = DEFAULT_PARAMS) -> dict:
    """Customize every subject of a dataset with every method, then evaluate and report.

    The run's plan comes first: steps whose markers are done are not dispatched at all, so a
    finished run starts no Ray instance; the rest run as soon as what they need is done."""
    log = get_run_logger()
    setup = prepare_run(params)
    ctx, store, run_id = setup.ctx, setup.store, setup.ctx.run_id
    for problem in setup.dataset.problems:
        log.warning("dataset: %s", problem.message)
    holder = default_holder(f"flow run {flow_run.get_id()}")
    with hold_lease(store, keys.run_lease(run_id), holder) as lease:
        crash_orphaned_runs(run_id, UUID(flow_run.get_id()), holder)
        run_plan = setup.plan()
        publish_plan(run_plan, previous_record(store, run_id))
        log.info("%s", run_plan.summary())
        run = run_steps(setup, run_plan, compute_for(params, ctx) if run_plan.to_run() else None)
        if lease.lost:
            raise LeaseLostError(f"run {run_id}: this run lost its lease on "
                                 f"{keys.run_lease(run_id)} (it stalled past the lease's "
                                 "expiry and another run may have taken over); its run record "
                                 "is not written: check that run, then rerun this one")
        record = run_record(setup, run)
        record["record_at"] = save_run_record(store, run_id, record, DEFAULT_WORKDIR)
        report = None
        if run.done and record["record_at"] == store.location(keys.run_record(run_id)):
            report = build_report(ctx)
            if isinstance(report, BaseException):
                log.error("run %s: the report could not be built: %s", run_id,
                          error_text(report))
                report = None
    try:
        publish_artifacts(store, run_id, record, report)
    except StorageError as error:  # the store is down: the summary goes to Prefect without scores
        log.error("run %s: scores could not be read for the Prefect artifacts: %s", run_id,
                  error_text(error))
        publish_artifacts(None, run_id, record, report)
    log.info("run %s finished: %d of %d units done%s", run_id,
             sum(v == "done" for v in record["units"].values()), len(record["units"]),
             f"; report: {report['location']}" if report else "")
    return {**record, "report": report}


def build_report(ctx: RunContext) -> dict | BaseException:
    """The run's report (its key and location): the stored one when it was built from the
    scores and failures the store holds now, else built again by the report task."""
    from eqdiff.evaluation.scores import current_report

    key = current_report(ctx.store(), ctx.run_id)
    if key is not None:
        get_run_logger().info("run %s: the stored report is up to date", ctx.run_id)
        return {"prefix": keys.report_prefix(ctx.run_id), "skipped": True, "report": key,
                "location": ctx.store().location(key)}
    from tasks import stages as stage_tasks

    return stage_tasks.build_report(ctx, return_state=True).result(raise_on_failure=False)


def compute_for(params: CustomizeParams, ctx: RunContext) -> ComputePlan:
    """Where the run's tasks go (starting or joining Ray for ``compute: ray``), checked
    against the store (a local folder cannot serve a cluster of several nodes)."""
    plan = plan_compute(params.compute, params.ray_address, params.gpus_per_subject,
                        reuse_gpu_workers=params.reuse_gpu_workers,
                        expect_gpus=params.expect_gpus,
                        lost_worker_retries=params.lost_worker_retries)
    check_topology(plan, ctx.config.storage)
    return plan


def run_steps(setup: RunSetup, run_plan: RunPlan, plan: ComputePlan | None) -> Outcome:
    """Ingest what the plan finds new (here, where the dataset is read), then dispatch every
    other step it finds to run, each as soon as what it needs is done; steps already done
    are recorded from their markers and not dispatched. ``plan`` is ``None`` when the plan
    finds nothing to run (no Ray is started for it)."""
    ctx, config = setup.ctx, setup.ctx.config
    run = Outcome()
    for step in run_plan.steps.values():
        if step.done:  # the real photos' scores belong to the subject, not to a unit
            key = step.item.split("/")[0] if step.item.endswith(f"/{REAL_IMAGES}") else step.item
            run.record(key, step.stage, {"prefix": step.prefix, "skipped": True, **step.info})
    failed_ingest = set()
    for subject in setup.subjects:
        if run_plan.step("ingest", subject.name).done:
            continue
        from tasks import stages as stage_tasks  # work to do: the tasks and their model code

        state = stage_tasks.ingest(ctx, subject, setup.prompt_sets[subject.name],
                                   return_state=True)
        result = state.result(raise_on_failure=False)
        if isinstance(result, BaseException):
            run.failed[subject.name] = f"ingest: {error_text(result)}"
            failed_ingest.add(subject.name)
            get_run_logger().error("ingest %s failed: %s", subject.name, error_text(result))
        else:
            run.record(subject.name, "ingest", result)
    jobs = unit_jobs(setup, run_plan, [s for s in setup.subjects
                                       if s.name not in failed_ingest])
    if jobs:
        run.merge(Dispatcher(plan, lambda: _task_runner(plan)).run(jobs))
    for subject in failed_ingest:
        for method in config.methods:
            run.failed[f"{subject}/{method.name}"] = run.failed[subject]
    return run


def unit_jobs(setup: RunSetup, run_plan: RunPlan, subjects: list[Subject]) -> list[Job]:
    """The jobs for every step the plan finds to run, each needing the jobs of the steps it
    reads that are to run too (a done step needs no job)."""
    from tasks import stages as stage_tasks

    ctx, config = setup.ctx, setup.ctx.config
    jobs: list[Job] = []
    names: dict[tuple[str, str], str] = {}

    def add(stage: str, item: str, keys_: tuple[str, ...], task: Any, parameters: dict,
            needs: list[tuple[str, str]], *, gpu: bool = True) -> None:
        names[(stage, item)] = f"{stage} · {item.replace('/', ' · ')}"
        jobs.append(Job(names[(stage, item)], stage, keys_, task,
                        lambda _results, p=parameters: p,
                        tuple(names[n] for n in needs if n in names), gpu=gpu))

    def to_run(stage: str, item: str) -> bool:
        step = run_plan.step(stage, item)
        return step is not None and not step.done

    for class_noun in sorted({s.class_noun for s in subjects}):
        if to_run("priors", class_noun):
            add("priors", class_noun, (class_noun,), stage_tasks.class_priors,
                {"ctx": ctx, "class_noun": class_noun}, [])
    for subject in subjects:
        name = subject.name
        if to_run("preprocess", name):
            add("preprocess", name, (name,), stage_tasks.preprocess,
                {"ctx": ctx, "subject": name}, [("ingest", name)], gpu=False)
        if to_run("masks", name):
            add("masks", name, (name,), stage_tasks.extract_masks, {"ctx": ctx, "subject": name},
                [("preprocess", name)], gpu=masks_run_a_model(config))
        for method in config.methods:
            unit = f"{name}/{method.name}"
            prior = run_plan.step("priors", subject.class_noun)
            uses_prior = method.prior_preservation and prior is not None
            if to_run("train", unit):
                add("train", unit, (unit,), stage_tasks.train_concept,
                    {"ctx": ctx, "subject": name, "class_noun": subject.class_noun,
                     "method": method, "prior_prefix": prior.prefix if uses_prior else None},
                    [("masks", name)] + ([("priors", subject.class_noun)] if uses_prior else []))
            if to_run("generate", unit):
                add("generate", unit, (unit,), stage_tasks.generate_samples,
                    {"ctx": ctx, "subject": name, "method": method.name,
                     "prompts": setup.prompts[name]}, [("train", unit)])
        units = tuple(f"{name}/{m.name}" for m in config.methods)
        if any(to_run("score", f"{name}/{m}") for m in [REAL_IMAGES, *run_plan.methods]):
            # the real photos' scores need the photos; each method's, its samples
            photos = [names[n] for n in [("preprocess", name)] if n in names]
            samples = [names[n] for n in (("generate", unit) for unit in units) if n in names]
            jobs.append(Job(f"score · {name}", "score", (name, *units),
                            stage_tasks.score_subject, _scoring(ctx, name, config, run_plan),
                            tuple(photos), tuple(samples)))
    return jobs


def _scoring(ctx: RunContext, subject: str, config: RunConfig, run_plan: RunPlan):
    """A subject's scoring parameters: the methods whose samples exist (done before, or
    generated by this run), once every generation of the subject has finished."""
    def parameters(results: dict[str, dict]) -> dict:
        methods = [m.name for m in config.methods
                   if run_plan.step("generate", f"{subject}/{m.name}").done
                   or f"generate · {subject} · {m.name}" in results]
        return {"ctx": ctx, "subject": subject, "methods": methods}
    return parameters


def run_record(setup: RunSetup, run: Outcome) -> dict:
    """``run.json``: parameters, resolved config, per-item status with failure reasons, and
    ``units``: every requested (subject, method) with its outcome (a unit fails with its
    subject when the subject failed before training)."""
    config = setup.ctx.config
    status = {key: f"failed: {reason}" for key, reason in run.failed.items()}
    for key in run.done:
        status.setdefault(key, "done")
    units = {}
    for subject in setup.subjects:
        for method in config.methods:
            key = f"{subject.name}/{method.name}"
            units[key] = status.get(key) or status.get(subject.name) or "failed: not run"
    return {"run_id": setup.ctx.run_id, "params": setup.params.model_dump(mode="json"),
            "config": to_dict(config), "base_model": setup.ctx.base_model,
            "metric_models": setup.metric_models, "dataset": str(setup.dataset.root),
            "dataset_layout": setup.dataset.layout,
            "status": dict(sorted(status.items())), "failures": dict(sorted(run.failed.items())),
            "records": run.done, "units": units,
            "dataset_problems": [{"kind": p.kind, "subject": p.subject, "message": p.message}
                                 for p in setup.dataset.problems] + photo_problems(run)}


def photo_problems(run: Outcome) -> list[dict]:
    """The photos preprocessing rejected (with why) and the masks that fell back to another
    extractor or warned, of every subject, as dataset problems: shown with the run, not only
    in a log."""
    problems = []
    for subject, records in sorted(run.done.items()):
        for entry in records.get("preprocess", {}).get("rejected", []):
            problems.append({"kind": "rejected_photo", "subject": subject,
                             "message": f"{subject}: photo {entry}"})
        for warning in records.get("masks", {}).get("warnings", []):
            problems.append({"kind": "mask_warning", "subject": subject,
                             "message": f"{subject}: mask {warning}"})
    return problems


def publish_plan(run_plan: RunPlan, previous: dict) -> None:
    """The plan as a Prefect table artifact: per (subject, method), each stage done or to run,
    and the unit's outcome in the previous run of this id."""
    create_table_artifact(key=f"plan-{_artifact_slug(run_plan.run_id)}",
                          table=run_plan.table(previous),
                          description=f"Plan of run {run_plan.run_id}: {run_plan.summary()}")


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
                           run_id, error_text(error), attempt, attempts - 1, delay)
            time.sleep(delay)
    fallback = workdir / "run-records" / f"{_artifact_slug(run_id)}-{int(time.time())}.json"
    fallback.parent.mkdir(parents=True, exist_ok=True)
    fallback.write_text(json.dumps({**record, "record_at": str(fallback)}, indent=2))
    logger.error("run %s: the run record could not be written to %s (%s); it is at %s",
                 run_id, store.location(key), error_text(failure), fallback)
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
