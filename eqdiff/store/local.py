"""The artifact store in a local folder: temp file + ``os.replace`` for every write."""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from eqdiff.store.base import CHUNK, ArtifactStore, copy_hashing, discard, partial_path
from eqdiff.store.errors import (
    ArtifactNotFoundError,
    PreconditionFailedError,
    StorageError,
    local_storage_error,
)
from eqdiff.store.keys import (
    MARKER_NAME,
    PARTIAL_SUFFIX,
    validate_delete_prefix,
    validate_key,
    validate_prefix,
)
from eqdiff.store.records import ObjectInfo, sha256_bytes, sha256_file, verify_sha256


class LocalStore(ArtifactStore):
    """Artifacts in a local folder; writes are temp file + ``os.replace`` (atomic)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().absolute()
        self.url = self.root.as_uri()

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*validate_key(key).split("/"))

    def _error(self, exc: OSError, action: str, path: Path) -> StorageError:
        """One line naming the path and the store's folder: full, read-only, denied or broken."""
        return local_storage_error(exc, action, path, folder=self.root, setting="storage.url")

    def check(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(prefix=".eqdiff-check-", suffix=PARTIAL_SUFFIX,
                                         dir=self.root)
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise self._error(exc, "checking artifact folder", self.root) from exc

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list_keys(self, prefix: str = "") -> list[str]:
        prefix = validate_prefix(prefix)
        base = self._path(prefix) if prefix else self.root
        keys = []
        for dirpath, _dirnames, filenames in os.walk(base):
            for filename in filenames:
                if not filename.endswith(PARTIAL_SUFFIX):
                    keys.append(Path(dirpath, filename).relative_to(self.root).as_posix())
        return sorted(keys)

    def delete_prefix(self, prefix: str) -> int:
        prefix = validate_delete_prefix(prefix)
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
        verify_sha256(str(path), sha256_bytes(data), sha256)
        return data

    def get_file(self, key: str, dest: str | Path, *, sha256: str | None = None) -> Path:
        src, dest = self._existing(key), Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        partial = partial_path(dest)
        try:
            with open(src, "rb") as f:
                actual = copy_hashing(f, partial)
            verify_sha256(str(src), actual, sha256)
            os.replace(partial, dest)
        finally:
            discard(partial)
        return dest

    def local_path(self, key: str, *, sha256: str | None = None) -> Path:
        path = self._existing(key)
        if sha256 is not None:
            verify_sha256(str(path), sha256_file(path)[0], sha256)
        return path

    def location(self, key: str) -> str:
        return self._path(key).as_uri()

    def url_for(self, key: str, *, expires_s: int = 3600) -> str:
        return self._path(key).as_uri()

    def _existing(self, key: str) -> Path:
        path = self._path(key)
        if not path.is_file():
            raise ArtifactNotFoundError(f"no artifact {key!r} in {self.url}")
        return path

    def _matches(self, key: str, info: ObjectInfo) -> bool:
        path = self._path(key)
        try:
            return path.stat().st_size == info.size and sha256_file(path)[0] == info.sha256
        except (FileNotFoundError, NotADirectoryError):
            return False

    def _write(self, key: str, source: bytes | Path, info: ObjectInfo, content_type: str) -> None:
        path = self._path(key)
        partial = partial_path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(partial, "wb") as out:
                if isinstance(source, bytes):
                    out.write(source)
                else:
                    with open(source, "rb") as src:
                        shutil.copyfileobj(src, out, CHUNK)
                out.flush()
                os.fsync(out.fileno())
            os.replace(partial, path)
        except OSError as exc:
            raise self._error(exc, "writing", path) from exc
        finally:
            discard(partial)

    def _delete(self, key: str) -> None:
        path = self._path(key)
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            raise self._error(exc, "deleting", path) from exc

    # ---- conditional writes: one flock per key serialises them; the token is the sha256

    def create_exclusive(self, key: str, data: bytes) -> str:
        path = self._path(key)
        with self._locked(path):
            if path.exists():
                raise PreconditionFailedError(f"{key!r} already exists in {self.url}")
            return self._replace(key, data)

    def get_with_token(self, key: str) -> tuple[bytes, str]:
        data = self.get_bytes(key)
        return data, sha256_bytes(data)

    def replace_if(self, key: str, data: bytes, token: str) -> str:
        with self._locked(self._path(key)):
            self._require_version(key, token)
            return self._replace(key, data)

    def delete_if(self, key: str, token: str) -> None:
        with self._locked(self._path(key)):
            self._require_version(key, token)
            self._delete(key)

    def _replace(self, key: str, data: bytes) -> str:
        info = ObjectInfo(key, len(data), sha256_bytes(data))
        self._write(key, data, info, "")
        return info.sha256

    def _require_version(self, key: str, token: str) -> None:
        try:
            current = sha256_bytes(self.get_bytes(key))
        except ArtifactNotFoundError:
            raise PreconditionFailedError(f"{key!r} is gone from {self.url} (expected version "
                                          f"{token[:12]})") from None
        if current != token:
            raise PreconditionFailedError(f"{key!r} in {self.url} is at version {current[:12]}, "
                                          f"not the expected {token[:12]}")

    @contextmanager
    def _locked(self, path: Path) -> Iterator[None]:
        """Hold an exclusive flock on a hidden sibling of ``path`` for one conditional write.

        Every conditional write of a key takes this lock, so each one's check and write happen
        together. The lock file is left in place (deleting it would let two writers lock two
        different files) and is never listed. flock excludes other processes and threads on
        this machine; on Linux it works over NFS as well.
        """
        lock = path.with_name(f".{path.name}.lock{PARTIAL_SUFFIX}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock, os.O_WRONLY | os.O_CREAT, 0o644)
        except OSError as exc:
            raise self._error(exc, "opening the lock file", lock) from exc
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError as exc:
                raise self._error(exc, "locking", lock) from exc
            yield
        finally:
            os.close(fd)  # releases the lock
