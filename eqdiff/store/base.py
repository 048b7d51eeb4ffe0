"""The artifact store's interface, and what every backend guarantees.

Keys are ``/``-separated relative strings such as ``runs/r1/concepts/dog/eqdiff/concept.json``;
every key is validated and made in :mod:`eqdiff.store.keys`.

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
import json
import logging
import mimetypes
import os
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import IO, Any

from eqdiff.store.errors import ArtifactNotFoundError, StorageError
from eqdiff.store.keys import PARTIAL_SUFFIX, join_key, marker_key, validate_key
from eqdiff.store.records import ObjectInfo, StageRecord, sha256_bytes, sha256_file

logger = logging.getLogger(__name__)

CHUNK = 1024 * 1024
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


def content_type_for(key: str) -> str:
    """The Content-Type for a key, from its extension (so reports open in a browser)."""
    suffix = PurePosixPath(key).suffix.lower()
    return (_CONTENT_TYPES.get(suffix) or mimetypes.guess_type(key)[0]
            or "application/octet-stream")


def partial_path(dest: Path) -> Path:
    """A unique temp path next to ``dest`` (same filesystem, so ``os.replace`` is atomic)."""
    return dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:12]}{PARTIAL_SUFFIX}")


def discard(path: Path) -> None:
    """Remove a temp file if it is there (its folder may not even exist).

    Never raises: it runs while another error is being handled (a full disk, a read-only
    mount), and that error is the one to report. A temp file it cannot remove is logged; listings
    skip such files anyway.
    """
    try:
        path.unlink()
    except OSError as exc:  # missing (fine), or e.g. EROFS even for a file never created
        if os.path.lexists(path):
            logger.warning("could not remove the temp file %s (%s); delete it by hand", path,
                           exc.strerror or exc)


def copy_hashing(src: IO[bytes], dest: Path) -> str:
    """Copy a stream into ``dest`` (created) and return the sha256 of what was copied."""
    digest = hashlib.sha256()
    with open(dest, "wb") as out:
        while chunk := src.read(CHUNK):
            digest.update(chunk)
            out.write(chunk)
    return digest.hexdigest()


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
    def location(self, key: str) -> str:
        """Where ``key`` lives, as an address that carries no credentials: ``file://…``
        locally, ``s3://bucket/prefix/key`` on S3. Safe to log and to show in Prefect."""

    @abstractmethod
    def url_for(self, key: str, *, expires_s: int = 3600) -> str:
        """A URL a browser can open: ``file://`` locally, a presigned GET URL on S3.

        A presigned URL carries the access key *id* (never the secret) and lets anyone who
        has it read the object until it expires, after ``expires_s`` seconds (at most 7 days
        with SigV4): hand it out only when asked, never put it in logs or Prefect artifacts.
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

    # ---- conditional writes (the run lease, eqdiff.store.lease, is built on these)
    #
    # A version token is opaque: the sha256 of the content locally, the ETag on S3. Both follow
    # the content, so writing the same bytes again keeps the token; put a nonce in the data when
    # every write must be told apart. A request retried after a lost reply may report
    # PreconditionFailedError for a write that did land; a nonce lets the caller recognise it.

    @abstractmethod
    def create_exclusive(self, key: str, data: bytes) -> str:
        """Store ``data`` under ``key`` only if no object has that key; return its version token.

        Of callers racing to create one key, exactly one succeeds; the others get
        :class:`~eqdiff.store.errors.PreconditionFailedError`.
        """

    @abstractmethod
    def get_with_token(self, key: str) -> tuple[bytes, str]:
        """The object's content (checksum-verified) and its current version token."""

    @abstractmethod
    def replace_if(self, key: str, data: bytes, token: str) -> str:
        """Replace the object only if its version token is still ``token``; return the new one.

        Raises :class:`~eqdiff.store.errors.PreconditionFailedError` if the object changed or is
        gone.
        """

    @abstractmethod
    def delete_if(self, key: str, token: str) -> None:
        """Delete the object only if its version token is still ``token``.

        Raises :class:`~eqdiff.store.errors.PreconditionFailedError` if the object changed or is
        gone.
        """

    # ---- puts and gets built on the primitives

    def put_bytes(self, key: str, data: bytes, *, content_type: str | None = None) -> ObjectInfo:
        """Store ``data`` under ``key``; a no-op if the same content is already there."""
        info = ObjectInfo(validate_key(key), len(data), sha256_bytes(data))
        return self._put(info, data, content_type)

    def put_file(self, key: str, path: str | Path, *, content_type: str | None = None
                 ) -> ObjectInfo:
        """Store the file at ``path`` under ``key`` (multipart on S3 above 16 MB); idempotent."""
        path = Path(path)
        sha, size = sha256_file(path)
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
              ) -> Iterator[StageWriter]:
        """Write a stage's outputs, then its marker only if the block exits cleanly.

        An existing marker is removed first, so readers never pair an old marker with new,
        half-written outputs. Outputs written through the yielded :class:`StageWriter` are listed
        in the marker with their sha256; ``stage.info`` is recorded too.
        """
        prefix = validate_key(prefix)
        self._delete(marker_key(prefix))
        stage = StageWriter(self, prefix, dict(info or {}))
        try:
            yield stage
        except BaseException:
            logger.warning("%s: stage %s interrupted after %d outputs; no marker written",
                           self.url, prefix, len(stage.outputs))
            raise
        self.mark_done(prefix, config_hash=config_hash, outputs=stage.outputs, info=stage.info)


class StageWriter:
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
