"""What a task needs from the process it runs in: its device, and models kept loaded.

Ray reuses worker processes, so a model cached here stays loaded across the many generation
and scoring requests that one worker serves: each worker loads the base model and the metric
models once, not once per (subject, method). Each cache holds one entry: a request for
another model replaces (and drops) the old one.
"""

from __future__ import annotations

from functools import lru_cache

from eqdiff.config import EvalConfig, RRAConfig, SampleConfig


def device_for_task() -> str:
    """``cuda`` when this process was given a GPU (Ray sets CUDA_VISIBLE_DEVICES), else cpu."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _dtype(device: str):  # noqa: ANN202 - torch dtype
    import torch

    return torch.bfloat16 if device == "cuda" else None


@lru_cache(maxsize=1)
def _generator(base_model: str, sample: SampleConfig, rra: RRAConfig, device: str,
               local_files_only: bool):  # noqa: ANN202 - ConceptGenerator
    from eqdiff.sampling import ConceptGenerator

    return ConceptGenerator.from_pretrained(base_model, sample, rra, device=device,
                                            dtype=_dtype(device),
                                            local_files_only=local_files_only)


def concept_generator(base_model: str, sample: SampleConfig, rra: RRAConfig, *,
                      local_files_only: bool):  # noqa: ANN201 - ConceptGenerator
    """This process's generator for the base model (loaded on first use; a different model
    replaces the cached one)."""
    return _generator(base_model, sample, rra, device_for_task(), local_files_only)


@lru_cache(maxsize=1)
def _scorers(clip_model: str, clip_pretrained: str, dino_model: str, device: str,
             batch_size: int):  # noqa: ANN202 - (CLIPScorer, DINOScorer)
    from eqdiff.metrics import CLIPScorer, DINOScorer

    return (CLIPScorer(clip_model, clip_pretrained, device=device, batch_size=batch_size),
            DINOScorer(dino_model, device=device, batch_size=batch_size))


def scorers(config: EvalConfig):  # noqa: ANN201 - (CLIPScorer, DINOScorer)
    """This process's CLIP and DINO scorers (loaded on first use)."""
    return _scorers(config.clip_model, config.clip_pretrained, config.dino_model,
                    device_for_task(), config.batch_size)
