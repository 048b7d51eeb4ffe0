"""Deployments of ``customize_dataset``, declared in ``deployments/prefect.yaml``.

Two ways to make them runnable from the Prefect UI or ``prefect deployment run``:

- :func:`deploy_all` registers them on a process work pool (``prefect deploy`` with the YAML);
  a worker started with ``prefect worker start --pool eqdiff-process`` runs their flow runs
  from this checkout (the YAML's pull step sets the working directory to the project root).
- :func:`serve_all` serves the same declarations from this process (``prefect.serve``): no
  work pool and no worker, the simplest way on one machine.

Both talk to the Prefect API at ``PREFECT_API_URL`` (``flows.server.ensure_server`` starts a
local one).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

logger = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PREFECT_FILE = PROJECT_ROOT / "deployments" / "prefect.yaml"
WORK_POOL = "eqdiff-process"


def declarations(prefect_file: Path = PREFECT_FILE) -> list[dict[str, Any]]:
    """The ``deployments`` entries of a prefect.yaml, as written."""
    data = yaml.safe_load(Path(prefect_file).read_text("utf-8")) or {}
    entries = data.get("deployments") or []
    if not entries:
        raise ValueError(f"{prefect_file} declares no deployments")
    return entries


def ensure_work_pool(name: str = WORK_POOL) -> bool:
    """Create the process work pool ``name`` unless it exists; True when it was created."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(name)
            return False
        except ObjectNotFound:
            pass
        try:
            client.create_work_pool(WorkPoolCreate(
                name=name, type=ProcessWorker.type,
                base_job_template=ProcessWorker.get_default_base_job_template()))
        except ObjectAlreadyExists:  # a worker started meanwhile created it
            return False
    logger.info("created the process work pool %r", name)
    return True


def deploy_all(work_pool: str = WORK_POOL, prefect_file: Path = PREFECT_FILE,
               *, timeout: float = 300.0) -> list[str]:
    """Register every deployment of ``prefect_file`` on ``work_pool`` (created if missing).

    Runs ``prefect deploy --all`` from the project root, so entrypoints resolve and the build
    step records the checkout for the workers' pull step. A ``work_pool`` other than the one
    declared replaces it in a temporary copy of the file. Returns ``flow/deployment`` names.
    """
    entries = declarations(prefect_file)
    ensure_work_pool(work_pool)
    with tempfile.TemporaryDirectory(prefix="eqdiff-deploy-") as scratch:
        if any((e.get("work_pool") or {}).get("name") != work_pool for e in entries):
            data = yaml.safe_load(Path(prefect_file).read_text("utf-8"))
            for entry in data["deployments"]:
                entry.setdefault("work_pool", {})["name"] = work_pool
            prefect_file = Path(scratch) / "prefect.yaml"
            prefect_file.write_text(yaml.safe_dump(data, sort_keys=False), "utf-8")
        command = [sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all",
                   "--prefect-file", str(prefect_file)]
        result = subprocess.run(command, cwd=PROJECT_ROOT, env=os.environ.copy(),
                                capture_output=True, text=True, timeout=timeout, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"prefect deploy failed ({result.returncode}):\n"
                           f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    names = [f"{flow_name(e)}/{e['name']}" for e in entries]
    logger.info("deployed %s on work pool %r; start a worker with: prefect worker start "
                "--pool %s --type process", ", ".join(names), work_pool, work_pool)
    return names


def flow_name(entry: dict[str, Any]) -> str:
    """The Prefect flow name behind a declaration's entrypoint (``customize-dataset``), read
    from the source without importing the flow's module."""
    from prefect.flows import load_flow_arguments_from_entrypoint

    return load_flow_arguments_from_entrypoint(entry["entrypoint"], {"name"})["name"]


def _schedule(spec: dict[str, Any]) -> Any:
    """A prefect.yaml schedule entry (``cron`` or ``interval`` seconds) as a Prefect schedule."""
    from prefect.schedules import Cron, Interval

    common = {"active": spec.get("active", True), "parameters": spec.get("parameters") or {}}
    if "cron" in spec:
        return Cron(spec["cron"], timezone=spec.get("timezone"), **common)
    if "interval" in spec:
        return Interval(float(spec["interval"]), timezone=spec.get("timezone"), **common)
    raise ValueError(f"schedule must have 'cron' or 'interval', got {spec}")


def _concurrency_limit(spec: int | dict[str, Any] | None) -> Any:
    """A prefect.yaml ``concurrency_limit`` (a number, or ``limit`` and ``collision_strategy``)
    as ``to_deployment`` takes it."""
    if not isinstance(spec, dict):
        return spec
    from prefect.client.schemas.objects import ConcurrencyLimitConfig

    return ConcurrencyLimitConfig(**spec)


def runner_deployments(prefect_file: Path = PREFECT_FILE) -> list[Any]:
    """The declared deployments as ``flow.to_deployment(...)`` objects, for ``prefect.serve``.

    Entrypoints are module paths (``flows.customize.customize_dataset``), and the served
    deployments keep them so: a flow loaded from a file path lives in a module named after the
    file (``customize``), which Ray workers on other nodes cannot import when the flow's
    objects travel with a task."""
    from prefect.flows import load_flow_from_entrypoint
    from prefect.types.entrypoint import EntrypointType

    deployments = []
    for entry in declarations(prefect_file):
        flow = load_flow_from_entrypoint(entry["entrypoint"])
        deployments.append(flow.to_deployment(
            name=entry["name"], description=entry.get("description"),
            entrypoint_type=EntrypointType.MODULE_PATH,
            tags=entry.get("tags"), parameters=entry.get("parameters") or {},
            paused=entry.get("paused"),
            concurrency_limit=_concurrency_limit(entry.get("concurrency_limit")),
            schedules=[_schedule(s) for s in entry.get("schedules") or []]))
    return deployments


def serve_all(prefect_file: Path = PREFECT_FILE, *, limit: int | None = None) -> None:
    """Serve every declared deployment from this process until interrupted.

    Flow runs start in the project root (as with the worker's pull step), so relative storage
    (``./artifacts``) lands in the project. ``limit`` caps concurrent flow runs.
    """
    from prefect import serve

    from tasks.logs import STAGE_LOGGERS

    os.chdir(PROJECT_ROOT)
    # the flow runs' processes inherit these: the stages' lines (training progress, resumes,
    # fallbacks) reach their task runs' pages, as in runs started by `eqdiff run`
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", ",".join(STAGE_LOGGERS))
    os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
    deployments = runner_deployments(prefect_file)
    _drop_work_pool_deployments([f"{d.flow_name}/{d.name}" for d in deployments])
    serve(*deployments, limit=limit)


def _drop_work_pool_deployments(names: list[str]) -> None:
    """Remove same-named deployments that ``deploy_all`` bound to a work pool.

    Serving a deployment updates it in place but keeps the worker's pull steps, whose
    working directory then no longer resolves: runs crash. A served deployment replaces them.
    """
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        for name in names:
            try:
                existing = client.read_deployment_by_name(name)
            except ObjectNotFound:
                continue
            if existing.work_pool_name:
                logger.warning("replacing deployment %s (work pool %s) with a served one", name,
                               existing.work_pool_name)
                client.delete_deployment(existing.id)
