"""What a task needs from the process it runs in: its device, and models kept loaded.

Ray keeps worker processes between tasks (GPU workers too, see :mod:`flows.compute`), so a
model cached here stays loaded across the many generation and scoring requests that one
worker serves: each worker loads the base model and the metric models once, not once per
(subject, method). Each cache holds one entry: a request for another model replaces (and
drops) the old one. A task ends by handing back the GPU memory its work left cached
(:func:`task_device`), so an idle worker holds its cached models and nothing else.
"""

from __future__ import annotations

import gc
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache

from eqdiff.config import EvalConfig, RRAConfig, SampleConfig


def cuda_index(gpu_id: int | str, visible: str | None) -> int:
    """The CUDA device index of the GPU Ray calls ``gpu_id``, in a process whose
    ``CUDA_VISIBLE_DEVICES`` is ``visible``: its place in that list, or the id itself when
    the list is unset (all GPUs visible)."""
    if visible is None or not visible.strip():
        return int(gpu_id)
    listed = [entry.strip() for entry in visible.split(",")]
    if str(gpu_id) not in listed:
        raise RuntimeError(f"Ray assigned GPU {gpu_id}, which this worker cannot see "
                           f"(CUDA_VISIBLE_DEVICES={visible})")
    return listed.index(str(gpu_id))


class VisibleDevices:
    """The ``CUDA_VISIBLE_DEVICES`` under which this process first used CUDA.

    CUDA reads the variable once per process. A kept Ray worker whose tasks were assigned
    their GPUs through it (Ray started without ``RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES``,
    e.g. by someone else's ``ray.init``) would run a task given another GPU on the first one;
    :meth:`check` refuses that instead.
    """

    UNSET = "<unset>"

    def __init__(self) -> None:
        self.first: str | None = None

    def check(self, current: str | None) -> None:
        current = self.UNSET if current is None else current
        if self.first is None:
            self.first = current
        elif current != self.first:
            raise RuntimeError(
                f"this Ray worker set up CUDA with CUDA_VISIBLE_DEVICES={self.first} and "
                f"cannot switch to {current}: start Ray through eqdiff (its workers get "
                "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES=1) or turn reuse_gpu_workers off")


_visible_devices = VisibleDevices()


def _ray_gpu_ids() -> list | None:
    """The GPUs Ray assigned to the running task; None outside a Ray task."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None
    context = ray.get_runtime_context()
    if context.get_task_id() is None:  # the driver (the local task runner) is not a Ray task
        return None
    return list(context.get_accelerator_ids().get("GPU", []))


def choose_device(cuda_available: bool, gpu_ids: list | None, visible: str | None) -> str:
    """A task's device: ``cuda:N`` for the GPU Ray assigned it (``gpu_ids``, N from
    :func:`cuda_index`); ``cpu`` for a Ray task given no GPU, whatever the node has; ``cuda``
    outside Ray (``gpu_ids`` None) when there is a GPU; else ``cpu``."""
    if not cuda_available:
        return "cpu"
    if gpu_ids is None:
        return "cuda"
    if not gpu_ids:
        return "cpu"
    return f"cuda:{cuda_index(gpu_ids[0], visible)}"


def device_for_task() -> str:
    """This task's device (:func:`choose_device`), made torch's current CUDA device."""
    import torch

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    device = choose_device(torch.cuda.is_available(), _ray_gpu_ids(), visible)
    if device.startswith("cuda:"):
        _visible_devices.check(visible)
        torch.cuda.set_device(device)
    return device


def release_cached_memory() -> None:
    """Hand the GPU memory that torch's allocator keeps cached back to the driver (models
    still referenced, such as the caches below, stay)."""
    import torch

    gc.collect()  # trainers and graphs in reference cycles go now, not at some later task
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


@contextmanager
def task_device() -> Iterator[str]:
    """:func:`device_for_task` for the body of a task, and :func:`release_cached_memory` when
    it ends (also when it fails)."""
    device = device_for_task()
    try:
        yield device
    finally:
        release_cached_memory()


def _dtype(device: str):  # torch dtype
    import torch

    return torch.bfloat16 if device == "cuda" else None


@lru_cache(maxsize=1)
def _generator(base_model: str, sample: SampleConfig, rra: RRAConfig, device: str,
               local_files_only: bool):  # ConceptGenerator
    from eqdiff.method.sampling import ConceptGenerator

    return ConceptGenerator.from_pretrained(base_model, sample, rra, device=device,
                                            dtype=_dtype(device),
                                            local_files_only=local_files_only)


def concept_generator(base_model: str, sample: SampleConfig, rra: RRAConfig, *,
                      local_files_only: bool):  # ConceptGenerator
    """This process's generator for the base model (loaded on first use; a different model
    replaces the cached one)."""
    return _generator(base_model, sample, rra, device_for_task(), local_files_only)


@lru_cache(maxsize=1)
def _scorers(clip_model: str, clip_pretrained: str, dino_model: str, device: str,
             batch_size: int, local_files_only: bool):  # (CLIPScorer, DINOScorer)
    from eqdiff.evaluation.metrics import CLIPScorer, DINOScorer

    return (CLIPScorer(clip_model, clip_pretrained, device=device, batch_size=batch_size,
                       local_files_only=local_files_only),
            DINOScorer(dino_model, device=device, batch_size=batch_size,
                       local_files_only=local_files_only))


def scorers(config: EvalConfig, *, local_files_only: bool):  # (CLIPScorer, DINOScorer)
    """This process's CLIP and DINO scorers (loaded on first use); ``local_files_only`` is the
    run's ``model.local_files_only``, the one switch for every model's downloads."""
    return _scorers(config.clip_model, config.clip_pretrained, config.dino_model,
                    device_for_task(), config.batch_size, local_files_only)
