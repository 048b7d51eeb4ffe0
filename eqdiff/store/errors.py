"""The artifact store's errors: each message names the URL or endpoint and what to check."""

from __future__ import annotations


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
