"""The artifact store's errors: each message names the URL or endpoint and what to check.

Errors are either transient (:class:`StorageUnavailableError`: the endpoint or folder may work
again soon, so retrying helps) or permanent (everything else: a full disk, a read-only mount,
refused credentials, a missing key, corrupt content...). :func:`is_transient` tells them apart
for callers that retry, such as the Prefect tasks' retry condition.
"""

from __future__ import annotations

import errno
import os


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


class StorageFullError(StorageError):
    """No space is left, or a quota is used up, where the store writes; retrying cannot help."""


class StorageReadOnlyError(StorageError):
    """The store's folder is on a read-only filesystem; retrying cannot help."""


class BucketNotFoundError(StorageError):
    """The S3 bucket does not exist at the endpoint."""


class PreconditionFailedError(StorageError):
    """A conditional write lost: the key already exists, or no longer has the expected version."""


_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
# network errnos that are not already ConnectionError or TimeoutError subclasses
_TRANSIENT_ERRNOS = frozenset({errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENETDOWN})


def is_transient(error: BaseException) -> bool:
    """Whether trying again later may succeed where ``error`` failed.

    Store errors are transient only as :class:`StorageUnavailableError`. Other exceptions are
    judged by class: ``ConnectionError`` (reset, refused, aborted, broken pipe), ``TimeoutError``
    and an unreachable network are transient; anything else, including ``OSError`` such as
    ENOSPC, EROFS or EACCES, is not.
    """
    if isinstance(error, StorageError):
        return isinstance(error, StorageUnavailableError)
    if isinstance(error, ConnectionError | TimeoutError):
        return True
    return isinstance(error, OSError) and error.errno in _TRANSIENT_ERRNOS


def local_storage_error(exc: OSError, action: str, path: str | os.PathLike[str], *,
                        folder: str | os.PathLike[str], setting: str) -> StorageError:
    """The :class:`StorageError` for a failed local file operation, as one actionable line.

    ``folder`` is the folder the store writes in and ``setting`` what points there (e.g.
    ``"storage.url"``); both appear in the advice. Errors that are not a full disk, a read-only
    mount or a refused permission become :class:`StorageUnavailableError`.
    """
    what = f"{action} {os.fspath(path)} failed"
    folder = os.fspath(folder)
    if exc.errno in _FULL_ERRNOS:
        reason = "disk quota exceeded" if exc.errno == errno.EDQUOT else "no space left on device"
        return StorageFullError(f"{what}: {reason} in {folder}; free space or point {setting} "
                                f"elsewhere")
    if exc.errno == errno.EROFS:
        return StorageReadOnlyError(f"{what}: the folder {folder} is mounted read-only; remount it "
                                    f"read-write or point {setting} elsewhere")
    if isinstance(exc, PermissionError):
        return StorageAccessError(f"{what}: permission denied in {folder}; check the folder's "
                                  f"owner and permissions, or point {setting} elsewhere")
    return StorageUnavailableError(f"{what}: {exc.strerror or exc}; check that {setting} "
                                   f"({folder}) names a folder that can be created and written")
