"""What a store records: one object's size and sha256, a stage's completion marker."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eqdiff.store.errors import ArtifactNotFoundError, ChecksumMismatchError

MARKER_FORMAT = 1


@dataclass(frozen=True)
class ObjectInfo:
    """One stored object: its key, size in bytes and sha256 (hex).

    ``written`` is ``False`` when a put found the same content already there and did nothing.
    """

    key: str
    size: int
    sha256: str
    written: bool = field(default=True, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form recorded in stage markers (without ``written``)."""
        return {"key": self.key, "size": self.size, "sha256": self.sha256}


@dataclass(frozen=True)
class StageRecord:
    """The content of a stage's completion marker."""

    prefix: str
    config_hash: str
    outputs: tuple[ObjectInfo, ...]
    info: dict[str, Any]
    completed_at: str

    def to_dict(self) -> dict[str, Any]:
        """The marker's JSON content."""
        return {"format": MARKER_FORMAT, "prefix": self.prefix, "config_hash": self.config_hash,
                "outputs": [o.to_dict() for o in self.outputs], "info": self.info,
                "completed_at": self.completed_at}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StageRecord:
        """Parse a marker's JSON content."""
        return cls(prefix=data["prefix"], config_hash=data["config_hash"],
                   outputs=tuple(ObjectInfo(o["key"], o["size"], o["sha256"])
                                 for o in data["outputs"]),
                   info=dict(data.get("info", {})), completed_at=data["completed_at"])

    def output(self, key: str) -> ObjectInfo:
        """The recorded output with this key (full key, as written)."""
        for info in self.outputs:
            if info.key == key:
                return info
        raise ArtifactNotFoundError(f"stage {self.prefix!r} recorded no output {key!r}; "
                                    f"it has {[o.key for o in self.outputs]}")


def sha256_bytes(data: bytes) -> str:
    """sha256 (hex) of bytes."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> tuple[str, int]:
    """sha256 (hex) and size of a file."""
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
        return digest, os.fstat(f.fileno()).st_size


def verify_sha256(where: str, actual: str, *expected: str | None) -> None:
    """Raise :class:`ChecksumMismatchError` unless every given expected sha256 equals ``actual``."""
    for want in expected:
        if want is not None and want != actual:
            raise ChecksumMismatchError(
                f"checksum mismatch for {where}: expected sha256 {want}, got {actual}; the object "
                f"is corrupt or was overwritten while being read — re-run the stage that wrote it")


