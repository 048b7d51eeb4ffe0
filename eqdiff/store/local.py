"""The artifact store in a local folder: temp file + ``os.replace`` for every write."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from eqdiff.store.base import CHUNK, ArtifactStore, copy_hashing, discard, partial_path
from eqdiff.store.errors import (
    ArtifactNotFoundError,
    StorageAccessError,
    StorageError,
    StorageUnavailableError,
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
