"""The one skeleton every stage runs on.

A stage owns one prefix in the store. It reads the records of the stages it depends on
(:func:`require_done`), hashes everything that determines its outputs, returns at once when
its completion marker holds that hash, and otherwise produces its files in a scratch folder
that :func:`run_stage` uploads, writing the marker last. So a rerun costs seconds, an
interrupted stage leaves no marker, and a changed setting redoes exactly the stages it reaches.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eqdiff.config import RunConfig
from eqdiff.store import ArtifactStore, StageRecord, StageWriter, store_from_config


class StageFailed(Exception):
    """A stage could not produce its outputs for a reason that retrying will not fix
    (bad images, too few photos, an unusable subject). The message is shown in the report."""


class UpstreamNotDone(RuntimeError):
    """A stage was asked to run before a stage it reads from had completed."""


@dataclass(frozen=True)
class RunContext:
    """What every stage needs to find its inputs and outputs. Small and picklable."""

    run_id: str
    config: RunConfig

    def store(self) -> ArtifactStore:
        return store_from_config(self.config.storage)

    @property
    def base_model(self) -> str:
        return self.config.model.base_model


@dataclass(frozen=True)
class StageResult:
    """A stage's outcome: the prefix it wrote and whether it did any work."""

    prefix: str
    skipped: bool
    info: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Produced:
    """What a stage's work made: a folder whose files become the stage's outputs (names
    relative to it), the facts its marker records, and what the stage returns (by default the
    same facts)."""

    folder: Path
    marker: dict[str, Any] = field(default_factory=dict)
    returned: dict[str, Any] | None = None


def require_done(store: ArtifactStore, prefix: str, what: str) -> StageRecord:
    """The completion record of an upstream stage; :class:`UpstreamNotDone` names it if absent."""
    record = store.read_marker(prefix)
    if record is None:
        raise UpstreamNotDone(f"{what} ({prefix}) is not done: run that stage first")
    return record


def upload_folder(writer: StageWriter, folder: Path) -> None:
    """Every file under ``folder`` as an output of the stage, in a stable order."""
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        writer.put_file(path.relative_to(folder).as_posix(), path)


def run_stage(store: ArtifactStore, prefix: str, digest: str,
              work: Callable[[Path], Produced], *, name: str) -> StageResult:
    """Skip when ``prefix`` is done for ``digest``; else ``work(scratch)`` and upload its folder.

    ``work`` gets an empty scratch folder that is removed afterwards whatever happens; raising
    from it (for instance :class:`StageFailed`) leaves the stage without a marker.
    """
    if store.is_done(prefix, expect_hash=digest):
        return StageResult(prefix, skipped=True)
    with tempfile.TemporaryDirectory(prefix=f"eqdiff-{name}-") as scratch:
        produced = work(Path(scratch))
        with store.stage(prefix, digest, info=produced.marker) as writer:
            upload_folder(writer, produced.folder)
    returned = produced.marker if produced.returned is None else produced.returned
    return StageResult(prefix, skipped=False, info=dict(returned))
