"""The artifact store: every pipeline stage persists its outputs through this one interface.

A store is opened from a URL (:func:`open_store`, :func:`store_from_config`):

- a local folder (``./artifacts``, the default, or ``file:///abs/path``) -> :class:`LocalStore`;
- ``s3://bucket/prefix`` on AWS or any S3-compatible endpoint (``endpoint_url``) ->
  :class:`S3Store`, credentials from the usual boto3 chain (environment, profile, instance
  role). Credentials are never logged, never put into error messages, never written to records.

Keys are ``/``-separated relative strings such as ``runs/r1/concepts/dog/eqdiff/concept.json``;
every key is validated (:func:`validate_key`) and the pipeline builds them with one function,
:func:`artifact_key`, which escapes subject/method names with :func:`safe_segment`.

Guarantees, the same for both backends:

- Single objects appear whole or not at all: local writes go to a temp file that is renamed into
  place with ``os.replace``; S3 objects (multipart ones included) become visible only once
  complete.
- Writing a key again with the same content is a no-op (``ObjectInfo.written`` is ``False``).
- Every object carries its sha256 (S3: object metadata ``sha256``); reads verify it, and a caller
  that knows the expected sha256 (e.g. from a stage marker) can pass it to any read.
- A stage writes its outputs first and a completion marker ``{prefix}/_SUCCESS.json`` last
  (:meth:`ArtifactStore.stage`, :meth:`ArtifactStore.mark_done`); a stage without a marker, or
  with a marker for another config hash, is not done, and its outputs are not to be read.
- Errors are :class:`StorageError` subclasses whose messages name the URL/endpoint and say what
  to check; :meth:`ArtifactStore.check` raises them before any work starts.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import mimetypes
import os
import random
import re
import shutil
import tempfile
import time
import urllib.parse
import urllib.request
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import IO, TYPE_CHECKING, Any, Literal, TypeVar

import boto3
from boto3.exceptions import Boto3Error, RetriesExceededError, S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    CredentialRetrievalError,
    HTTPClientError,
    IncompleteReadError,
    NoCredentialsError,
    PartialCredentialsError,
    ReadTimeoutError,
    ResponseStreamingError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

if TYPE_CHECKING:
    from eqdiff.config import StorageConfig

logger = logging.getLogger(__name__)

T = TypeVar("T")

MARKER_NAME = "_SUCCESS.json"
MARKER_FORMAT = 1
MULTIPART_THRESHOLD = 16 * 1024 * 1024  # S3 objects at or above this size go up in parts
MULTIPART_CHUNKSIZE = 8 * 1024 * 1024
_PARTIAL_SUFFIX = ".eqdiff-partial"  # in-flight local temp files; never listed, never a key
_CHUNK = 1024 * 1024
_MAX_KEY_BYTES = 1024  # the S3 limit
_MAX_SEGMENT_BYTES = 255  # the usual file-name limit
_BACKOFF_BASE_S = 0.2
_BACKOFF_CAP_S = 5.0
_CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".htm": "text/html; charset=utf-8",
    ".md": "text/markdown; charset=utf-8",
    ".csv": "text/csv; charset=utf-8",
    ".txt": "text/plain; charset=utf-8",
    ".json": "application/json",
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".webp": "image/webp",
    ".svg": "image/svg+xml",
    ".parquet": "application/vnd.apache.parquet",
    ".safetensors": "application/octet-stream",
}


# --------------------------------------------------------------------------- errors

class StorageError(Exception):
    """Base class of every artifact-store error."""


class StorageConfigError(StorageError, ValueError):
    """The storage URL or options are malformed."""


class InvalidKeyError(StorageError, ValueError):
    """A key or name segment is unsafe: traversal, absolute, backslash, control characters..."""


class ArtifactNotFoundError(StorageError):
    """The requested key does not exist."""


class ChecksumMismatchError(StorageError):
    """Downloaded content does not match its recorded sha256."""


class StorageUnavailableError(StorageError):
    """The endpoint cannot be reached, or the local folder cannot be created or used."""


class StorageAccessError(StorageError):
    """Credentials are missing or rejected, or permission is denied."""


class BucketNotFoundError(StorageError):
    """The S3 bucket does not exist at the endpoint."""


# --------------------------------------------------------------------------- keys

def validate_key(key: str) -> str:
    """Return ``key`` unchanged if it is a safe relative key, else raise :class:`InvalidKeyError`.

    Rejected: empty keys, absolute keys (leading ``/``), backslashes, empty segments (``a//b``,
    trailing ``/``), ``.``/``..`` segments, control characters, reserved temp-file names and keys
    over 1024 UTF-8 bytes.
    """
    if not isinstance(key, str) or not key:
        raise InvalidKeyError(f"artifact key must be a non-empty string, got {key!r}")
    if key.startswith("/"):
        raise InvalidKeyError(f"artifact key must be relative, got absolute key {key!r}")
    if "\\" in key:
        raise InvalidKeyError(f"artifact key must use '/' separators, got backslash in {key!r}")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in key):
        raise InvalidKeyError(f"artifact key contains control characters: {key!r}")
    for segment in key.split("/"):
        if not segment:
            raise InvalidKeyError(f"artifact key has an empty segment: {key!r}")
        if segment in (".", ".."):
            raise InvalidKeyError(f"artifact key contains a '{segment}' segment: {key!r}")
        if segment.endswith(_PARTIAL_SUFFIX):
            raise InvalidKeyError(f"artifact key uses the reserved suffix {_PARTIAL_SUFFIX!r}: "
                                  f"{key!r}")
    if len(key.encode()) > _MAX_KEY_BYTES:
        raise InvalidKeyError(f"artifact key is longer than {_MAX_KEY_BYTES} bytes: {key[:80]!r}…")
    return key


def _validate_prefix(prefix: str) -> str:
    """A listing prefix: ``""`` (everything) or a valid key, one trailing ``/`` tolerated."""
    if prefix == "":
        return ""
    return validate_key(prefix[:-1] if prefix.endswith("/") else prefix)


def _validate_delete_prefix(prefix: str) -> str:
    """A deletion prefix: like a listing prefix, but never the whole store."""
    if prefix in ("", "/"):
        raise InvalidKeyError("refusing to delete the whole store: give a non-empty prefix")
    return _validate_prefix(prefix)


def join_key(*parts: str) -> str:
    """Join key parts (each may hold several ``/``-separated segments) and validate the result."""
    return validate_key("/".join(parts))


def safe_segment(name: str) -> str:
    """One key segment from a user-supplied name (subject, method, run id, class).

    Traversal is rejected, not escaped: empty names, ``.``, ``..`` and names holding ``/``, ``\\``
    or control characters raise :class:`InvalidKeyError`. Every other character outside
    ``A-Z a-z 0-9 _ . - ~`` is percent-escaped as UTF-8 (``"red toy#2"`` -> ``"red%20toy%232"``),
    deterministically and reversibly (:func:`unescape_segment`); ``%`` itself becomes ``%25``.
    """
    if not isinstance(name, str) or not name:
        raise InvalidKeyError(f"name must be a non-empty string, got {name!r}")
    if name in (".", ".."):
        raise InvalidKeyError(f"name {name!r} would escape its folder")
    if "/" in name or "\\" in name:
        raise InvalidKeyError(f"name {name!r} must not contain '/' or '\\'")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in name):
        raise InvalidKeyError(f"name {name!r} contains control characters")
    segment = urllib.parse.quote(name, safe="")
    if len(segment.encode()) > _MAX_SEGMENT_BYTES:
        raise InvalidKeyError(f"name is longer than {_MAX_SEGMENT_BYTES} bytes once escaped: "
                              f"{name[:60]!r}…")
    return segment


def unescape_segment(segment: str) -> str:
    """The original name of a segment made by :func:`safe_segment`."""
    return urllib.parse.unquote(segment, errors="strict")


ArtifactKind = Literal["run", "subject", "checkpoint", "concept", "samples", "scores", "report",
                       "mask", "prior"]

# The storage layout (DESIGN.md). Every prefix is a stage prefix: its marker lives at
# {prefix}/_SUCCESS.json. Placeholders are filled by artifact_key.
_LAYOUT: dict[str, tuple[str, ...]] = {
    "run": ("runs", "{run_id}"),
    "subject": ("runs", "{run_id}", "subjects", "{subject}"),
    "checkpoint": ("runs", "{run_id}", "checkpoints", "{subject}", "{method}"),
    "concept": ("runs", "{run_id}", "concepts", "{subject}", "{method}"),
    "samples": ("runs", "{run_id}", "samples", "{subject}", "{method}"),
    "scores": ("runs", "{run_id}", "scores", "{subject}", "{method}"),
    "report": ("runs", "{run_id}", "report"),
    "mask": ("cache", "masks", "{content_hash}"),
    "prior": ("cache", "priors", "{class_name}", "{content_hash}"),
}
_HASH_RE = re.compile(r"[0-9a-f]{8,128}")


def artifact_key(kind: ArtifactKind, *, run_id: str | None = None, subject: str | None = None,
                 method: str | None = None, class_name: str | None = None,
                 content_hash: str | None = None, name: str | None = None) -> str:
    """The key (with ``name``) or stage prefix (without ``name``) of an artifact.

    This is the one place keys are made.

    Layout, relative to the store's root::

        run      runs/{run_id}/                                  name: run.json
        subject  runs/{run_id}/subjects/{subject}/               preprocess/, masks/
        checkpoint runs/{run_id}/checkpoints/{subject}/{method}/ last.pt (training resume)
        concept  runs/{run_id}/concepts/{subject}/{method}/      concept.safetensors, concept.json
        samples  runs/{run_id}/samples/{subject}/{method}/       {prompt_idx:02d}_{k}.png
        scores   runs/{run_id}/scores/{subject}/{method}/        scores.parquet
        report   runs/{run_id}/report/                           report.html, plots/x.png, ...
        mask     cache/masks/{content_hash}/                     {extractor}.png  (image sha256)
        prior    cache/priors/{class_name}/{content_hash}/       class-prior images

    Each kind needs exactly its placeholders; names go through :func:`safe_segment`,
    ``content_hash`` must be 8-128 lowercase hex digits and ``name`` must be a valid key.
    """
    try:
        template = _LAYOUT[kind]
    except KeyError:
        raise ValueError(f"unknown artifact kind {kind!r}; known: {sorted(_LAYOUT)}") from None
    given = {"run_id": run_id, "subject": subject, "method": method, "class_name": class_name,
             "content_hash": content_hash}
    needed = {part[1:-1] for part in template if part.startswith("{")}
    missing = sorted(k for k in needed if given[k] is None)
    extra = sorted(k for k, v in given.items() if v is not None and k not in needed)
    if missing or extra:
        raise ValueError(f"artifact kind {kind!r} needs {sorted(needed)}; "
                         f"missing {missing}, not applicable {extra}")
    if content_hash is not None and not _HASH_RE.fullmatch(content_hash):
        raise InvalidKeyError(f"content_hash must be 8-128 lowercase hex digits, got "
                              f"{content_hash!r}")
    values = {k: (v if k == "content_hash" else safe_segment(v))
              for k, v in given.items() if v is not None}
    parts = [values[part[1:-1]] if part.startswith("{") else part for part in template]
    return join_key(*parts) if name is None else join_key(*parts, name)


def marker_key(prefix: str) -> str:
    """The completion marker of the stage at ``prefix``."""
    return join_key(prefix, MARKER_NAME)


def content_type_for(key: str) -> str:
    """The Content-Type for a key, from its extension (so reports open in a browser)."""
    suffix = PurePosixPath(key).suffix.lower()
    return (_CONTENT_TYPES.get(suffix) or mimetypes.guess_type(key)[0]
            or "application/octet-stream")


# --------------------------------------------------------------------------- records

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


def _sha256_bytes(data: bytes) -> str:
    """sha256 (hex) of bytes."""
    return hashlib.sha256(data).hexdigest()


def _sha256_file(path: Path) -> tuple[str, int]:
    """sha256 (hex) and size of a file."""
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
        return digest, os.fstat(f.fileno()).st_size


def _verify(where: str, actual: str, *expected: str | None) -> None:
    """Raise :class:`ChecksumMismatchError` unless every given expected sha256 equals ``actual``."""
    for want in expected:
        if want is not None and want != actual:
            raise ChecksumMismatchError(
                f"checksum mismatch for {where}: expected sha256 {want}, got {actual}; the object "
                f"is corrupt or was overwritten while being read — re-run the stage that wrote it")


def _partial_path(dest: Path) -> Path:
    """A unique temp path next to ``dest`` (same filesystem, so ``os.replace`` is atomic)."""
    return dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:12]}{_PARTIAL_SUFFIX}")


def _discard(path: Path) -> None:
    """Remove a temp file if it is there (its folder may not even exist)."""
    with suppress(FileNotFoundError, NotADirectoryError):
        path.unlink()


def _copy_hashing(src: IO[bytes], dest: Path) -> str:
    """Copy a stream into ``dest`` (created) and return the sha256 of what was copied."""
    digest = hashlib.sha256()
    with open(dest, "wb") as out:
        while chunk := src.read(_CHUNK):
            digest.update(chunk)
            out.write(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------------- the interface

class ArtifactStore(ABC):
    """Put/get bytes, files and JSON by key; list; delete; URLs; stage markers.

    Subclasses implement the backend primitives; idempotent puts, JSON and stage markers are
    built here on top of them.
    """

    #: the store's URL (``file:///…`` or ``s3://bucket/prefix``), safe to log
    url: str

    # ---- backend primitives

    @abstractmethod
    def check(self) -> None:
        """Fail now, with a clear :class:`StorageError`, unless the store is usable and writable."""

    @abstractmethod
    def exists(self, key: str) -> bool:
        """Whether an object with this key exists."""

    @abstractmethod
    def list_keys(self, prefix: str = "") -> list[str]:
        """Sorted keys under the folder ``prefix`` (``""``: all keys)."""

    @abstractmethod
    def delete_prefix(self, prefix: str) -> int:
        """Delete every key under the folder ``prefix`` (markers first); return how many."""

    @abstractmethod
    def get_bytes(self, key: str, *, sha256: str | None = None) -> bytes:
        """The object's content, checksum-verified (against ``sha256`` too when given)."""

    @abstractmethod
    def get_file(self, key: str, dest: str | Path, *, sha256: str | None = None) -> Path:
        """Download to ``dest`` (written atomically, verified); return ``dest``."""

    @abstractmethod
    def local_path(self, key: str, *, sha256: str | None = None) -> Path:
        """A local path with the object's content: the file itself, or a cached download.

        Do not modify the returned file.
        """

    @abstractmethod
    def url_for(self, key: str, *, expires_s: int = 7 * 24 * 3600) -> str:
        """A URL a browser can open: ``file://`` locally, a presigned GET URL on S3.

        A presigned URL carries the access key *id* (never the secret) and expires after
        ``expires_s`` seconds (at most 7 days with SigV4).
        """

    @abstractmethod
    def _matches(self, key: str, info: ObjectInfo) -> bool:
        """Whether ``key`` already holds content with this size and sha256."""

    @abstractmethod
    def _write(self, key: str, source: bytes | Path, info: ObjectInfo, content_type: str) -> None:
        """Store ``source`` (bytes or a file) under ``key``, atomically."""

    @abstractmethod
    def _delete(self, key: str) -> None:
        """Delete one key; a missing key is fine."""

    # ---- puts and gets built on the primitives

    def put_bytes(self, key: str, data: bytes, *, content_type: str | None = None) -> ObjectInfo:
        """Store ``data`` under ``key``; a no-op if the same content is already there."""
        info = ObjectInfo(validate_key(key), len(data), _sha256_bytes(data))
        return self._put(info, data, content_type)

    def put_file(self, key: str, path: str | Path, *, content_type: str | None = None
                 ) -> ObjectInfo:
        """Store the file at ``path`` under ``key`` (multipart on S3 above 16 MB); idempotent."""
        path = Path(path)
        sha, size = _sha256_file(path)
        return self._put(ObjectInfo(validate_key(key), size, sha), path, content_type)

    def put_json(self, key: str, obj: Any) -> ObjectInfo:
        """Store ``obj`` as canonical JSON (sorted keys), so equal objects give equal bytes."""
        text = json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
        return self.put_bytes(key, text.encode(), content_type="application/json")

    def get_json(self, key: str, *, sha256: str | None = None) -> Any:
        """The JSON object stored under ``key``."""
        data = self.get_bytes(key, sha256=sha256)
        try:
            return json.loads(data)
        except ValueError as exc:
            raise StorageError(f"{self.url}: {key!r} is not valid JSON ({exc})") from exc

    def _put(self, info: ObjectInfo, source: bytes | Path, content_type: str | None
             ) -> ObjectInfo:
        if self._matches(info.key, info):
            logger.debug("%s: %s unchanged (sha256 %s), not rewritten", self.url, info.key,
                         info.sha256[:12])
            return replace(info, written=False)
        self._write(info.key, source, info, content_type or content_type_for(info.key))
        logger.debug("%s: wrote %s (%d bytes)", self.url, info.key, info.size)
        return info

    # ---- stages

    def mark_done(self, prefix: str, *, config_hash: str, outputs: Sequence[ObjectInfo] = (),
                  info: Mapping[str, Any] | None = None) -> StageRecord:
        """Write the stage's completion marker; call it only after all outputs are stored."""
        record = StageRecord(prefix=validate_key(prefix), config_hash=config_hash,
                             outputs=tuple(outputs), info=dict(info or {}),
                             completed_at=datetime.now(UTC).isoformat(timespec="seconds"))
        self.put_json(marker_key(prefix), record.to_dict())
        logger.info("%s: stage %s done (%d outputs)", self.url, prefix, len(record.outputs))
        return record

    def read_marker(self, prefix: str) -> StageRecord | None:
        """The stage's completion record, or ``None`` if the stage has not completed."""
        key = marker_key(prefix)
        try:
            data = self.get_json(key)
        except ArtifactNotFoundError:
            return None
        try:
            return StageRecord.from_dict(data)
        except (KeyError, TypeError) as exc:
            raise StorageError(f"{self.url}: marker {key!r} is malformed ({exc!r}); delete it to "
                               f"re-run the stage") from exc

    def is_done(self, prefix: str, expect_hash: str | None = None) -> bool:
        """Whether the stage completed (for ``expect_hash``'s config, when given)."""
        record = self.read_marker(prefix)
        if record is None:
            return False
        if expect_hash is not None and record.config_hash != expect_hash:
            logger.info("%s: stage %s was done for config %s, not %s: redoing", self.url, prefix,
                        record.config_hash, expect_hash)
            return False
        return True

    @contextmanager
    def stage(self, prefix: str, config_hash: str, *, info: Mapping[str, Any] | None = None
              ) -> Iterator[Stage]:
        """Write a stage's outputs, then its marker only if the block exits cleanly.

        An existing marker is removed first, so readers never pair an old marker with new,
        half-written outputs. Outputs written through the yielded :class:`Stage` are listed in the
        marker with their sha256; ``stage.info`` is recorded too.
        """
        prefix = validate_key(prefix)
        self._delete(marker_key(prefix))
        stage = Stage(self, prefix, dict(info or {}))
        try:
            yield stage
        except BaseException:
            logger.warning("%s: stage %s interrupted after %d outputs; no marker written",
                           self.url, prefix, len(stage.outputs))
            raise
        self.mark_done(prefix, config_hash=config_hash, outputs=stage.outputs, info=stage.info)


class Stage:
    """The outputs of one stage in progress; names are relative to the stage prefix."""

    def __init__(self, store: ArtifactStore, prefix: str, info: dict[str, Any]) -> None:
        self.store = store
        self.prefix = prefix
        self.info = info
        self._outputs: dict[str, ObjectInfo] = {}

    @property
    def outputs(self) -> list[ObjectInfo]:
        """What was written so far (each key once, latest content)."""
        return list(self._outputs.values())

    def key(self, name: str) -> str:
        """The full key of output ``name`` (which may contain ``/``)."""
        return join_key(self.prefix, validate_key(name))

    def put_bytes(self, name: str, data: bytes, *, content_type: str | None = None
                  ) -> ObjectInfo:
        """Store ``data`` as output ``name`` and record it for the marker."""
        return self._record(self.store.put_bytes(self.key(name), data, content_type=content_type))

    def put_file(self, name: str, path: str | Path, *, content_type: str | None = None
                 ) -> ObjectInfo:
        """Store the file at ``path`` as output ``name`` and record it for the marker."""
        return self._record(self.store.put_file(self.key(name), path, content_type=content_type))

    def put_json(self, name: str, obj: Any) -> ObjectInfo:
        """Store ``obj`` as JSON output ``name`` and record it for the marker."""
        return self._record(self.store.put_json(self.key(name), obj))

    def _record(self, info: ObjectInfo) -> ObjectInfo:
        self._outputs[info.key] = info
        return info


# --------------------------------------------------------------------------- local folder

class LocalStore(ArtifactStore):
    """Artifacts in a local folder; writes are temp file + ``os.replace`` (atomic)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().absolute()
        self.url = self.root.as_uri()

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*validate_key(key).split("/"))

    def _error(self, exc: OSError, action: str, path: Path) -> StorageError:
        if isinstance(exc, PermissionError):
            return StorageAccessError(
                f"{action} {path} failed: permission denied; check the folder's owner and "
                f"permissions, or point storage.url elsewhere")
        return StorageUnavailableError(
            f"{action} {path} failed: {exc.strerror or exc}; check that storage.url "
            f"({self.url}) names a folder that can be created and written")

    def check(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(prefix=".eqdiff-check-", suffix=_PARTIAL_SUFFIX,
                                         dir=self.root)
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise self._error(exc, "checking artifact folder", self.root) from exc

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list_keys(self, prefix: str = "") -> list[str]:
        prefix = _validate_prefix(prefix)
        base = self._path(prefix) if prefix else self.root
        keys = []
        for dirpath, _dirnames, filenames in os.walk(base):
            for filename in filenames:
                if not filename.endswith(_PARTIAL_SUFFIX):
                    keys.append(Path(dirpath, filename).relative_to(self.root).as_posix())
        return sorted(keys)

    def delete_prefix(self, prefix: str) -> int:
        prefix = _validate_delete_prefix(prefix)
        keys = self.list_keys(prefix)
        for key in keys:
            if key.endswith("/" + MARKER_NAME):
                self._delete(key)
        base = self._path(prefix)
        try:
            if base.is_dir():
                shutil.rmtree(base)
        except OSError as exc:
            raise self._error(exc, "deleting", base) from exc
        return len(keys)

    def get_bytes(self, key: str, *, sha256: str | None = None) -> bytes:
        path = self._path(key)
        try:
            data = path.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ArtifactNotFoundError(f"no artifact {key!r} in {self.url}") from None
        except OSError as exc:
            raise self._error(exc, "reading", path) from exc
        _verify(str(path), _sha256_bytes(data), sha256)
        return data

    def get_file(self, key: str, dest: str | Path, *, sha256: str | None = None) -> Path:
        src, dest = self._existing(key), Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        partial = _partial_path(dest)
        try:
            with open(src, "rb") as f:
                actual = _copy_hashing(f, partial)
            _verify(str(src), actual, sha256)
            os.replace(partial, dest)
        finally:
            _discard(partial)
        return dest

    def local_path(self, key: str, *, sha256: str | None = None) -> Path:
        path = self._existing(key)
        if sha256 is not None:
            _verify(str(path), _sha256_file(path)[0], sha256)
        return path

    def url_for(self, key: str, *, expires_s: int = 7 * 24 * 3600) -> str:
        return self._path(key).as_uri()

    def _existing(self, key: str) -> Path:
        path = self._path(key)
        if not path.is_file():
            raise ArtifactNotFoundError(f"no artifact {key!r} in {self.url}")
        return path

    def _matches(self, key: str, info: ObjectInfo) -> bool:
        path = self._path(key)
        try:
            return path.stat().st_size == info.size and _sha256_file(path)[0] == info.sha256
        except (FileNotFoundError, NotADirectoryError):
            return False

    def _write(self, key: str, source: bytes | Path, info: ObjectInfo, content_type: str) -> None:
        path = self._path(key)
        partial = _partial_path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(partial, "wb") as out:
                if isinstance(source, bytes):
                    out.write(source)
                else:
                    with open(source, "rb") as src:
                        shutil.copyfileobj(src, out, _CHUNK)
                out.flush()
                os.fsync(out.fileno())
            os.replace(partial, path)
        except OSError as exc:
            raise self._error(exc, "writing", path) from exc
        finally:
            _discard(partial)

    def _delete(self, key: str) -> None:
        path = self._path(key)
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            raise self._error(exc, "deleting", path) from exc


# --------------------------------------------------------------------------- S3

# connection failures botocore cannot retry once a response has started streaming
_MID_TRANSFER_ERRORS = (ConnectionClosedError, IncompleteReadError, ReadTimeoutError,
                        ResponseStreamingError)


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "eqdiff" / "s3"


class S3Store(ArtifactStore):
    """Artifacts in ``s3://bucket/prefix`` on AWS or an S3-compatible endpoint (boto3).

    Retries: botocore's ``standard`` mode retries each request on throttling, 5xx and
    connection errors (``max_attempts`` in all); on top of that, whole operations are retried with
    jittered exponential backoff when the connection breaks mid-transfer (errors botocore cannot
    retry once a response has started). Nothing else is retried: a missing key, bucket or a
    refused credential fails at once.

    Reads through :meth:`local_path` are cached under ``cache_dir``, content-addressed by the
    object's sha256, so a worker that needs the same object twice downloads it once.
    """

    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: str = "", region: str = "",
                 cache_dir: str | Path = "", max_attempts: int = 4,
                 connect_timeout: float = 5.0, read_timeout: float = 60.0) -> None:
        if not bucket:
            raise StorageConfigError("S3 URL names no bucket; use s3://bucket/prefix")
        if max_attempts < 1:
            raise StorageConfigError(f"max_attempts must be >= 1, got {max_attempts}")
        self.bucket = bucket
        stripped = prefix.strip("/")
        self.prefix = validate_key(stripped) if stripped else ""
        self.url = f"s3://{bucket}/{self.prefix}".rstrip("/")
        self.endpoint = endpoint_url or f"the AWS endpoint for region {region or '(default)'}"
        self._max_attempts = max_attempts
        self._cache_dir = Path(cache_dir).expanduser() if cache_dir else _default_cache_dir()
        config = Config(
            retries={"mode": "standard", "total_max_attempts": max_attempts},
            connect_timeout=connect_timeout, read_timeout=read_timeout, signature_version="s3v4",
            s3={"addressing_style": "path"} if endpoint_url else None,
        )
        self._client = boto3.session.Session().client(
            "s3", endpoint_url=endpoint_url or None, region_name=region or None, config=config)
        self._transfer = TransferConfig(multipart_threshold=MULTIPART_THRESHOLD,
                                        multipart_chunksize=MULTIPART_CHUNKSIZE)

    def _full(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _where(self, key: str | None) -> str:
        return f"s3://{self.bucket}/{self._full(key)}" if key else self.url

    # ---- error mapping and retries

    def _error(self, exc: Exception, action: str, key: str | None) -> StorageError:
        """A :class:`StorageError` for a boto error; messages never carry credentials."""
        cause: BaseException = exc
        if isinstance(exc, S3UploadFailedError) and exc.__context__ is not None:
            cause = exc.__context__
        elif isinstance(exc, RetriesExceededError):
            cause = exc.last_exception
        where = f"{action} {self._where(key)} (endpoint {self.endpoint})"
        if isinstance(cause, (NoCredentialsError, PartialCredentialsError,
                              CredentialRetrievalError)):
            return StorageAccessError(
                f"{where}: no usable AWS credentials; set AWS_ACCESS_KEY_ID and "
                f"AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or give the machine a role")
        if isinstance(cause, (BotoConnectionError, HTTPClientError)):
            return StorageUnavailableError(
                f"{where}: cannot reach the endpoint ({type(cause).__name__}); check "
                f"storage.endpoint_url, that the S3 service is running, and network/proxy access")
        if isinstance(cause, ClientError):
            code = str(cause.response.get("Error", {}).get("Code", ""))
            status = cause.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code == "NoSuchBucket" or (code in ("404", "NotFound") and key is None):
                return BucketNotFoundError(
                    f"{where}: bucket {self.bucket!r} does not exist; create it or fix "
                    f"storage.url (and storage.endpoint_url/region if it lives elsewhere)")
            if code in ("NoSuchKey", "404", "NotFound"):
                return ArtifactNotFoundError(f"no artifact {key!r} in {self.url}")
            if status == 403 or code in ("AccessDenied", "InvalidAccessKeyId",
                                         "SignatureDoesNotMatch", "ExpiredToken",
                                         "InvalidToken"):
                return StorageAccessError(
                    f"{where}: refused ({code or status}); check the credentials (AWS_PROFILE or "
                    f"AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY), their permissions on bucket "
                    f"{self.bucket!r}, and storage.region")
            return StorageError(f"{where}: failed with {code or 'an error'} (HTTP {status}); "
                                f"check storage.url, storage.region and storage.endpoint_url")
        return StorageError(f"{where}: failed ({type(cause).__name__})")

    def _call(self, action: str, key: str | None, fn: Callable[[], T]) -> T:
        """Run ``fn``, retrying mid-transfer connection failures; map boto errors."""
        attempt = 1
        while True:
            try:
                return fn()
            except _MID_TRANSFER_ERRORS as exc:
                if attempt >= self._max_attempts:
                    raise self._error(exc, action, key) from exc
                delay = min(_BACKOFF_CAP_S, _BACKOFF_BASE_S * 2 ** (attempt - 1))
                delay *= 0.5 + random.random() / 2
                logger.warning("%s %s: %s; retry %d/%d in %.1f s", action, self._where(key),
                               type(exc).__name__, attempt, self._max_attempts - 1, delay)
                time.sleep(delay)
                attempt += 1
            except (BotoCoreError, ClientError, Boto3Error) as exc:
                error = self._error(exc, action, key)
                # an access error's boto message may quote the access key id: don't chain it
                raise error from (None if isinstance(error, StorageAccessError) else exc)

    # ---- primitives

    def check(self) -> None:
        self._call("checking bucket", None, lambda: self._client.head_bucket(Bucket=self.bucket))
        probe = self._full(f".eqdiff-check-{uuid.uuid4().hex}")
        self._call("writing a probe object to", None, lambda: self._client.put_object(
            Bucket=self.bucket, Key=probe, Body=b""))
        self._call("deleting the probe object from", None, lambda: self._client.delete_object(
            Bucket=self.bucket, Key=probe))

    def _head(self, key: str) -> dict[str, Any] | None:
        def head() -> dict[str, Any] | None:
            try:
                return self._client.head_object(Bucket=self.bucket, Key=self._full(key))
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                    return None
                raise
        return self._call("reading", validate_key(key), head)

    def _existing(self, key: str) -> dict[str, Any]:
        head = self._head(key)
        if head is None:
            raise ArtifactNotFoundError(f"no artifact {key!r} in {self.url}")
        return head

    def exists(self, key: str) -> bool:
        return self._head(key) is not None

    def list_keys(self, prefix: str = "") -> list[str]:
        prefix = _validate_prefix(prefix)
        root = f"{self.prefix}/" if self.prefix else ""
        search = f"{root}{prefix}/" if prefix else root

        def collect() -> list[str]:
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=search)
            return [obj["Key"][len(root):] for page in pages for obj in page.get("Contents", [])]
        return sorted(self._call("listing", prefix or None, collect))

    def delete_prefix(self, prefix: str) -> int:
        prefix = _validate_delete_prefix(prefix)
        keys = self.list_keys(prefix)
        markers = [k for k in keys if k.endswith("/" + MARKER_NAME)]
        others = [k for k in keys if not k.endswith("/" + MARKER_NAME)]
        for batch_keys in (markers, others):  # markers go first: no marker outlives its outputs
            for start in range(0, len(batch_keys), 1000):
                batch = [{"Key": self._full(k)} for k in batch_keys[start:start + 1000]]
                response = self._call("deleting under", prefix, lambda b=batch: (
                    self._client.delete_objects(Bucket=self.bucket,
                                                Delete={"Objects": b, "Quiet": True})))
                if response.get("Errors"):
                    failed = [(e.get("Key"), e.get("Code")) for e in response["Errors"][:5]]
                    raise StorageError(f"deleting under {self._where(prefix)} failed for "
                                       f"{len(response['Errors'])} keys, e.g. {failed}")
        return len(keys)

    def get_bytes(self, key: str, *, sha256: str | None = None) -> bytes:
        key = validate_key(key)

        def fetch() -> tuple[bytes, str | None]:
            response = self._client.get_object(Bucket=self.bucket, Key=self._full(key))
            return response["Body"].read(), response.get("Metadata", {}).get("sha256")
        data, stored = self._call("reading", key, fetch)
        _verify(self._where(key), _sha256_bytes(data), stored, sha256)
        return data

    def get_file(self, key: str, dest: str | Path, *, sha256: str | None = None) -> Path:
        head = self._existing(key)
        dest = Path(dest)
        self._download(key, dest, head.get("Metadata", {}).get("sha256"), sha256)
        return dest

    def local_path(self, key: str, *, sha256: str | None = None) -> Path:
        head = self._existing(key)
        stored = head.get("Metadata", {}).get("sha256")
        if stored is not None:
            _verify(self._where(key), stored, sha256)  # cheap: compare recorded hashes
            cache_id = stored
        else:  # written by another tool: cache by location and ETag
            cache_id = _sha256_bytes(f"{self.endpoint}\n{self._where(key)}\n{head.get('ETag')}"
                                     .encode())
        path = self._cache_dir / cache_id[:2] / cache_id / PurePosixPath(key).name
        if path.is_file():
            logger.debug("%s: %s served from cache %s", self.url, key, path)
            return path
        self._download(key, path, stored, sha256)
        return path

    def url_for(self, key: str, *, expires_s: int = 7 * 24 * 3600) -> str:
        key = validate_key(key)
        return self._call("presigning", key, lambda: self._client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": self._full(key)},
            ExpiresIn=expires_s))

    def _download(self, key: str, dest: Path, *expected: str | None) -> None:
        """Download (multipart above the threshold) to a temp file, verify, rename into place."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        partial = _partial_path(dest)
        try:
            self._call("downloading", key, lambda: self._client.download_file(
                self.bucket, self._full(key), str(partial), Config=self._transfer))
            _verify(self._where(key), _sha256_file(partial)[0], *expected)
            os.replace(partial, dest)
        finally:
            _discard(partial)

    def _matches(self, key: str, info: ObjectInfo) -> bool:
        head = self._head(key)
        return (head is not None and head.get("ContentLength") == info.size
                and head.get("Metadata", {}).get("sha256") == info.sha256)

    def _write(self, key: str, source: bytes | Path, info: ObjectInfo, content_type: str) -> None:
        extra = {"Metadata": {"sha256": info.sha256}, "ContentType": content_type}
        if isinstance(source, bytes):
            self._call("uploading", key, lambda: self._client.upload_fileobj(
                io.BytesIO(source), self.bucket, self._full(key), ExtraArgs=extra,
                Config=self._transfer))
        else:
            self._call("uploading", key, lambda: self._client.upload_file(
                str(source), self.bucket, self._full(key), ExtraArgs=extra,
                Config=self._transfer))

    def _delete(self, key: str) -> None:
        self._call("deleting", key, lambda: self._client.delete_object(
            Bucket=self.bucket, Key=self._full(key)))


# --------------------------------------------------------------------------- opening

def open_store(url: str, *, endpoint_url: str = "", region: str = "", cache_dir: str = "",
               max_attempts: int = 4, connect_timeout: float = 5.0) -> ArtifactStore:
    """The store for ``url``: a folder path, ``file:///…`` or ``s3://bucket/prefix``.

    ``endpoint_url``, ``region``, ``cache_dir``, ``max_attempts`` and ``connect_timeout`` apply
    to S3 only. Nothing is contacted here; call :meth:`ArtifactStore.check` before work starts.
    """
    if not url:
        raise StorageConfigError("storage URL is empty; use a folder, file:///… or s3://bucket")
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme == "s3":
        parsed = urllib.parse.urlsplit(url)
        return S3Store(parsed.netloc, parsed.path, endpoint_url=endpoint_url, region=region,
                       cache_dir=cache_dir, max_attempts=max_attempts,
                       connect_timeout=connect_timeout)
    if endpoint_url:
        logger.warning("storage.endpoint_url %s is ignored for the local store %s",
                       endpoint_url, url)
    if scheme == "file":
        parsed = urllib.parse.urlsplit(url)
        if parsed.netloc not in ("", "localhost"):
            raise StorageConfigError(f"file URL must name a local path (file:///abs/path), got "
                                     f"{url!r}")
        return LocalStore(urllib.request.url2pathname(parsed.path))
    if scheme:
        raise StorageConfigError(f"storage URL scheme must be file:// or s3:// (or a plain path), "
                                 f"got {url!r}")
    return LocalStore(url)


def store_from_config(cfg: StorageConfig) -> ArtifactStore:
    """The store described by a :class:`eqdiff.config.StorageConfig`."""
    return open_store(cfg.url, endpoint_url=cfg.endpoint_url, region=cfg.region,
                      cache_dir=cfg.cache_dir)
