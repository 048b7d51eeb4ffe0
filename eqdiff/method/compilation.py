"""Regional ``torch.compile``: the repeated blocks of the networks a run calls many times.

Compiling a whole SD UNet once took over 6 minutes on an H100 (docs/design.md). Compiling its
repeated blocks instead — every ``ResnetBlock2D`` and ``BasicTransformerBlock`` (with whatever
attention processors they hold: K/V copies, RRA, reference writers) and the text encoder's
layers — gives inductor the fusions that matter inside each block (GroupNorm + SiLU, LayerNorm,
GEGLU, residual adds, RRA's gate) while it compiles each distinct block variant once: blocks of
the same class, shape, grad mode and processors share one compiled graph (processors reach their
layer's reference-bank entry through a slot object, not by name, for that; only the few layers
that record RRA attention for its loss get one graph per position). Eager code runs between the
blocks, so the network's own control flow and the extension hooks are untouched.

Blocks are compiled per instance, never on the class: the instance's ``forward`` becomes the
class's forward compiled and bound to that instance (so ``copy.deepcopy`` rebinds it to the
copy), and :meth:`CompiledRegions.remove` deletes it again.

Within one process the compiled code serves every later network with the same block shapes:
the next subject trained by a kept Ray worker traces and compiles nothing. Inductor also caches
what it compiles on disk (its FX graph and AOTAutograd caches under ``TORCHINDUCTOR_CACHE_DIR``,
by default ``/tmp/torchinductor_<user>``), so a later process on the same machine — a new
worker, a rerun — only traces again and takes the compiled kernels from the cache.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import MethodType

import torch
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.resnet import ResnetBlock2D
from torch import nn
from transformers.models.clip.modeling_clip import CLIPEncoderLayer

logger = logging.getLogger(__name__)

REGION_TYPES: tuple[type[nn.Module], ...] = (ResnetBlock2D, BasicTransformerBlock,
                                             CLIPEncoderLayer)
# Variants of one block class that may each keep a compiled graph: SD-1.5 training with RRA
# has dozens (block shapes × grad mode × processor kind, in two UNets), and dynamo's default
# of 8 would send the rest back to eager code.
RECOMPILE_LIMIT = 256


@dataclass
class CompiledRegions:
    """The blocks :func:`compile_regions` compiled; :meth:`remove` restores their forwards."""

    modules: list[nn.Module] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.modules)

    def remove(self) -> None:
        for module in self.modules:
            del module.forward
        self.modules = []


def compile_regions(*networks: nn.Module, backend: str = "inductor") -> CompiledRegions:
    """Compile every block of :data:`REGION_TYPES` inside ``networks`` (static shapes) with
    ``backend`` (inductor generates fused kernels; "aot_eager" only traces, for checks).

    Compilation itself happens at each block variant's first call (minutes for SD-1.5 with a
    cold cache): call the networks within :func:`compiled_calls`.
    """
    modules = list(dict.fromkeys(module for network in networks for module in network.modules()
                                 if isinstance(module, REGION_TYPES)))
    if not modules:
        raise ValueError("these networks have no blocks to compile "
                         f"({', '.join(t.__name__ for t in REGION_TYPES)})")
    compiled = {cls: torch.compile(cls.forward, dynamic=False, backend=backend)
                for cls in {type(module) for module in modules}}
    for module in modules:
        if "forward" in vars(module):
            raise ValueError(f"a {type(module).__name__} already has its own forward "
                             "(compiled twice, or hooked by another library)")
    for module in modules:
        module.forward = MethodType(compiled[type(module)], module)
    logger.info("compiling %d blocks (%s) at their first calls: minutes for SD-1.5 when "
                "inductor's cache is cold", len(modules),
                ", ".join(sorted(cls.__name__ for cls in compiled)))
    return CompiledRegions(modules)


@contextlib.contextmanager
def compiled_calls(regions: CompiledRegions | None, setting: str) -> Iterator[None]:
    """Call compiled blocks within this: they get the recompile limit they need (a dynamo
    setting, changed for the block rather than for the process), and a failed compile is
    raised as a ``RuntimeError`` that names ``setting``. A no-op when ``regions`` is None."""
    if regions is None:
        yield
        return
    try:
        with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
            yield
    except torch._dynamo.exc.TorchDynamoException as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise RuntimeError(f"torch.compile of the model's blocks failed ({type(err).__name__}:"
                           f" {first}); set {setting}=off to run without it") from err
