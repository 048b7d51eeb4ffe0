"""The device half of a training step as a CUDA graph (``train.cuda_graphs``).

The device half — text encoder, extensions' passes, UNet, losses, backward, clipping and the
fused AdamW update — reads only persistent step buffers and tensors fixed at set-up, so it has
the same shapes and the same memory every step. :class:`GraphedStep` runs it eagerly for
:data:`CUDA_GRAPH_WARMUP_STEPS` steps on a side stream, then captures it once and replays it
from then on: one launch per step instead of thousands, with the same kernels on the same data.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import Tensor

from eqdiff.config import CudaGraphs, RunConfig

logger = logging.getLogger(__name__)

# eager steps before the capture (on a side stream, as CUDA graph capture requires)
CUDA_GRAPH_WARMUP_STEPS = 3

DeviceStep = Callable[[], tuple[tuple[str, ...], Tensor]]


def cuda_graph_mode(config: RunConfig, device: torch.device) -> CudaGraphs:
    """Whether the trainer captures its step as a CUDA graph: never off CUDA; on CUDA
    ``train.cuda_graphs`` ("auto" falls back to eager steps, with a warning, if the capture
    fails; "on" raises instead)."""
    return config.train.cuda_graphs if device.type == "cuda" else "off"


class GraphedStep:
    """Runs a device step eagerly, as a warm-up step on a side stream, or as its graph.

    States: ``mode`` "off" — eager, always (off CUDA, or after a failed "auto" capture);
    otherwise warm-up steps, then the capture, then replays (:attr:`captured`). :meth:`drop`
    returns to the warm-up (the step's memory changed, e.g. a loaded optimizer state).
    """

    def __init__(self, device: torch.device, mode: CudaGraphs) -> None:
        self.device = device
        self.mode = mode
        self.warm_steps = 0
        self._graph: torch.cuda.CUDAGraph | None = None
        self._names: tuple[str, ...] = ()
        self._values = torch.empty(0)
        self._side_stream: torch.cuda.Stream | None = None

    @property
    def captured(self) -> bool:
        """Whether steps now replay a captured CUDA graph."""
        return self._graph is not None

    def run(self, step: DeviceStep,
            optimizer: torch.optim.Optimizer) -> tuple[tuple[str, ...], Tensor]:
        """One step: ``step()`` eagerly, on the side stream, captured, or replayed. ``step``
        returns the loss names and values; ``optimizer``'s gradients are cleared before a
        capture (and after a failed one)."""
        if self._graph is not None:
            self._graph.replay()
            return self._names, self._values.clone()  # the next replay overwrites
        if self.mode == "off":
            return step()
        if self.warm_steps >= CUDA_GRAPH_WARMUP_STEPS:
            try:
                return self._capture(step, optimizer)
            except Exception as err:  # any capture failure: continue eagerly
                if self.mode == "on":
                    raise
                optimizer.zero_grad(set_to_none=True)  # gradients the capture left
                torch.cuda.synchronize(self.device)
                torch.cuda.empty_cache()
                self.mode = "off"
                logger.warning("CUDA graph capture failed (%s: %s); this run continues "
                               "without graphs", type(err).__name__, str(err).splitlines()[0])
                return step()
        if self._side_stream is None:  # capture wants the warm-up off the main stream
            self._side_stream = torch.cuda.Stream(self.device)
        side = self._side_stream
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            result = step()
        torch.cuda.current_stream(self.device).wait_stream(side)
        self.warm_steps += 1
        return result

    def _capture(self, step: DeviceStep,
                 optimizer: torch.optim.Optimizer) -> tuple[tuple[str, ...], Tensor]:
        """Capture ``step`` as a CUDA graph, then replay it once for this step."""
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        optimizer.zero_grad(set_to_none=True)
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            names, values = step()
        self._graph, self._names, self._values = graph, names, values
        logger.info("captured the training step as a CUDA graph after %d eager steps",
                    self.warm_steps)
        graph.replay()
        return names, values.clone()

    def drop(self) -> None:
        """Release the captured graph (if any) and its memory pool; the next steps warm up and
        capture again."""
        self.warm_steps = 0
        if self._graph is None:
            return
        self._graph = None
        self._values = torch.empty(0)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
