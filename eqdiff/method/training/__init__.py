"""Customization training: one run per subject and method (docs/method.md §2–4, §6–7).

- :mod:`~eqdiff.method.training.loop` — :func:`train_concept`, the run from start to end;
- :mod:`~eqdiff.method.training.trainer` — :class:`ConceptTrainer`: set-up and the step;
- :mod:`~eqdiff.method.training.graphed` — the step captured and replayed as a CUDA graph;
- :mod:`~eqdiff.method.training.extensions` — the :class:`TrainingExtension` seam and the
  trainer's own extensions (Custom-Diffusion K/V, the cross-attention mask loss);
- :mod:`~eqdiff.method.training.checkpoint` — :class:`Checkpointer`, :func:`read_checkpoint`,
  and :class:`CheckpointRejected`;
- :mod:`~eqdiff.method.training.callbacks` — :class:`TrainingCallback`, :class:`StepResult`,
  :class:`ProgressBar`, :class:`LogProgress`;
- :mod:`~eqdiff.method.training.batch` — :class:`ConceptData` and the per-step batches;
- :mod:`~eqdiff.method.training.precision` — autocast and frozen-weight dtypes.
"""

from eqdiff.method.training.batch import STEP_INPUTS, ConceptData, StepBatch, StepDraws
from eqdiff.method.training.callbacks import (
    LogProgress,
    ProgressBar,
    StepResult,
    TrainingCallback,
)
from eqdiff.method.training.checkpoint import (
    Checkpointer,
    CheckpointRejected,
    read_checkpoint,
)
from eqdiff.method.training.extensions import (
    EXTENSION_SWITCHES,
    CrossAttentionLossExtension,
    CustomKVExtension,
    TrainingExtension,
    adapter_extensions,
    builtin_extensions,
    check_extensions,
)
from eqdiff.method.training.graphed import CUDA_GRAPH_WARMUP_STEPS, GraphedStep, cuda_graph_mode
from eqdiff.method.training.loop import TrainedConcept, train_concept
from eqdiff.method.training.precision import autocast_dtype, frozen_weight_dtype
from eqdiff.method.training.trainer import CLASS_PROMPT, INSTANCE_PROMPT, ConceptTrainer

__all__ = [
    "CLASS_PROMPT",
    "CUDA_GRAPH_WARMUP_STEPS",
    "EXTENSION_SWITCHES",
    "INSTANCE_PROMPT",
    "STEP_INPUTS",
    "CheckpointRejected",
    "Checkpointer",
    "ConceptData",
    "ConceptTrainer",
    "CrossAttentionLossExtension",
    "CustomKVExtension",
    "GraphedStep",
    "LogProgress",
    "ProgressBar",
    "StepBatch",
    "StepDraws",
    "StepResult",
    "TrainedConcept",
    "TrainingCallback",
    "TrainingExtension",
    "adapter_extensions",
    "autocast_dtype",
    "builtin_extensions",
    "check_extensions",
    "cuda_graph_mode",
    "frozen_weight_dtype",
    "read_checkpoint",
    "train_concept",
]
