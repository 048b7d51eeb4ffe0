"""Where the heavy stages run: a Ray cluster (local by default) or this process.

GPU requests are derived from what the cluster has — a ``num_gpus`` request a Ray cluster
cannot meet waits forever — and the Prefect API URL reaches every worker through the
``runtime_env`` (prefect-ray does not forward it to remote nodes).

GPU workers are kept between tasks. Ray's default for a task that asks for a GPU is a new
worker process per task (``max_calls=1``), so each training, generation and scoring task would
start an interpreter, import torch and diffusers and load its models again, and the model
caches of :mod:`tasks.resources` would never serve a second task. A kept worker would, though,
run later tasks on whichever GPU its CUDA was first set up for, since Ray assigns each task its
GPU through ``CUDA_VISIBLE_DEVICES`` and CUDA reads that once per process. So Ray is told to
leave that variable alone (``RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES``), and each task
selects its assigned GPU by index (:func:`tasks.resources.device_for_task`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Literal

from eqdiff.config import StorageConfig
from tasks.logs import STAGE_LOGGERS

logger = logging.getLogger(__name__)

ComputeTarget = Literal["ray", "local"]

# Settings a worker needs to talk to the same Prefect API and artifact store as the flow.
# Credentials are not forwarded: workers use their own boto3 credential chain.
FORWARDED_ENV = ("PREFECT_API_URL", "PREFECT_API_KEY", "PREFECT_HOME", "PREFECT_LOGGING_LEVEL",
                 "HF_HOME", "HF_HUB_OFFLINE", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL",
                 "AWS_ENDPOINT_URL_S3", "AWS_EC2_METADATA_DISABLED")
# Set in every worker of our Ray job: tasks choose their GPU themselves (see the module doc),
# and the stages' own log lines (resumes, rejected inputs, fallbacks) reach the Prefect UI
RAY_WORKER_ENV = {"RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES": "1",
                  "PREFECT_LOGGING_EXTRA_LOGGERS": ",".join(STAGE_LOGGERS),
                  "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore"}
DEFAULT_LOST_WORKER_RETRIES = 2


@dataclass(frozen=True)
class ComputePlan:
    """How heavy tasks are placed: the Ray resources each asks for (empty for ``local``), and
    whether a GPU task's worker process is kept for later tasks (``reuse_gpu_workers``)."""

    target: ComputeTarget
    address: str = ""
    gpus_per_task: float = 0.0
    cpus_per_task: float = 1.0
    cluster_gpus: float = 0.0
    cluster_cpus: float = 0.0
    reuse_gpu_workers: bool = True
    nodes: int = 1
    lost_worker_retries: int = DEFAULT_LOST_WORKER_RETRIES

    @property
    def device(self) -> str:
        """The torch device a task should use on its worker."""
        if self.target == "ray":
            return "cuda" if self.gpus_per_task > 0 else "cpu"
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def remote_options(self, *, gpu: bool = True) -> dict:
        """``ray.remote`` options of a task; ``gpu=False`` for a stage that runs no model on a
        GPU (preprocessing, classic masks), which then holds no GPU. ``max_calls=0`` keeps a
        GPU task's worker for later tasks, where Ray would start a new process for each
        (``max_calls=1``).

        Ray re-runs a task whose worker or node was lost up to ``lost_worker_retries`` times
        (its own default is 3, silently); application errors are never retried by Ray
        (``retry_exceptions=False``): those are Prefect's (see :mod:`tasks.stages`)."""
        if self.target != "ray":
            return {}
        options: dict = {"num_cpus": self.cpus_per_task,
                         "max_retries": self.lost_worker_retries, "retry_exceptions": False}
        if self.gpus_per_task and gpu:
            options["num_gpus"] = self.gpus_per_task
            if self.reuse_gpu_workers:
                options["max_calls"] = 0
        return options


def worker_env() -> dict[str, str]:
    """The environment variables forwarded to Ray workers (only those that are set)."""
    return {name: os.environ[name] for name in FORWARDED_ENV if os.environ.get(name)}


def ray_init_kwargs(address: str) -> dict:
    """Arguments for ``ray.init``: a local cluster without the dashboard or token auth, or a
    connection to ``address``; the worker environment travels in ``runtime_env``."""
    kwargs: dict = {"runtime_env": {"env_vars": {**worker_env(), **RAY_WORKER_ENV}},
                    "namespace": "eqdiff",
                    "log_to_driver": True}
    if not address:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        kwargs.update(include_dashboard=False,
                      num_cpus=int(os.environ.get("EQDIFF_RAY_NUM_CPUS", os.cpu_count() or 1)))
    return kwargs


def gpu_request(requested: float, cluster_gpus: float, *, expect_gpus: bool = False) -> float:
    """The GPUs one task asks for: ``requested`` when the cluster has that many, else none.

    A fraction packs tasks onto a GPU (0.5: two subjects train side by side on each GPU),
    for models that leave most of a card idle; Ray then shares the device between them.
    ``expect_gpus`` asks for them although none is up now: an autoscaling cluster starts its
    GPU nodes only for tasks that request GPUs.
    """
    if requested < 0:
        raise ValueError(f"GPUs per task must be >= 0, got {requested}")
    if expect_gpus:
        return requested
    return requested if cluster_gpus >= requested > 0 else 0.0


def plan_compute(target: ComputeTarget, address: str = "", gpus_per_task: float = 1.0, *,
                 reuse_gpu_workers: bool = True, expect_gpus: bool = False,
                 lost_worker_retries: int = DEFAULT_LOST_WORKER_RETRIES) -> ComputePlan:
    """Start or join Ray (for ``ray``) and size task requests to the cluster.

    ``address`` defaults to ``RAY_ADDRESS``; empty starts a local Ray instance. A task asks for
    ``gpus_per_task`` GPUs (a fraction shares a GPU, see :func:`gpu_request`) only when the
    cluster has at least that many, else for none (CPU). ``reuse_gpu_workers=False`` gives
    every GPU task a new worker process (Ray's default), which hands all of its GPU memory
    back when the task ends, at the price of imports and model loads per task.
    ``expect_gpus`` requests the GPUs even when none is up (autoscaling clusters);
    ``lost_worker_retries`` bounds Ray's re-runs of a task whose worker or node died.
    """
    if lost_worker_retries < 0:
        raise ValueError(f"lost_worker_retries must be >= 0, got {lost_worker_retries}")
    if target == "local":
        return ComputePlan("local")
    if target != "ray":
        raise ValueError(f"compute target must be 'ray' or 'local', got {target!r}")
    import ray

    address = address or os.environ.get("RAY_ADDRESS", "")
    if not ray.is_initialized():
        ray.init(address or None, **ray_init_kwargs(address))
    resources = ray.cluster_resources()
    gpus, cpus = float(resources.get("GPU", 0)), float(resources.get("CPU", 0))
    nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
    per_task = gpu_request(gpus_per_task, gpus, expect_gpus=expect_gpus)
    if gpus_per_task and not per_task:
        logger.info("the Ray cluster has no GPU: tasks run on CPU (on an autoscaling cluster, "
                    "set expect_gpus to request GPUs that are not up yet)")
    elif per_task > gpus:
        logger.info("no GPU is up yet: GPU tasks wait for the autoscaler to start a GPU node")
    plan = ComputePlan("ray", address, gpus_per_task=per_task, cpus_per_task=1.0,
                       cluster_gpus=gpus, cluster_cpus=cpus, reuse_gpu_workers=reuse_gpu_workers,
                       nodes=nodes, lost_worker_retries=lost_worker_retries)
    logger.info("compute: Ray %s with %d node(s), %g CPU, %g GPU; %g GPU per task%s",
                address or "(local)", nodes, cpus, gpus, per_task,
                ("" if not per_task else ", GPU workers kept between tasks"
                 if reuse_gpu_workers else ", a new worker per GPU task"))
    return plan


class TopologyError(RuntimeError):
    """The run's settings cannot work on this cluster; refused before any work starts."""


def check_topology(plan: ComputePlan, storage: StorageConfig) -> None:
    """Refuse a local-folder store on a Ray cluster of more than one node, unless the folder
    is declared shared: every node would write its own copy and no stage would find another's
    outputs.

    The dataset needs no such check: it is read only by the ingest stage, in the flow's own
    process, where it was just loaded; workers read the store's copy.
    """
    if plan.target != "ray" or plan.nodes <= 1 or storage.shared:
        return
    if storage.url.startswith("s3://"):
        return
    raise TopologyError(
        f"the Ray cluster {plan.address or '(local)'} has {plan.nodes} nodes, but the artifact "
        f"store is the local folder {storage.url!r}: each node would write its own copy. Use an "
        f"S3 store (storage_url: s3://bucket/prefix, plus s3_endpoint_url for MinIO or another "
        f"S3 service), or, if that folder is on a filesystem every node mounts at the same "
        f"path, declare it with storage_shared: true")
