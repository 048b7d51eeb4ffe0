"""The artifact store: every pipeline stage persists its outputs through this one interface.

A store is opened from a URL (:func:`open_store`, :func:`store_from_config`):

- a local folder (``./artifacts``, the default, or ``file:///abs/path``) -> :class:`LocalStore`;
- ``s3://bucket/prefix`` on AWS or any S3-compatible endpoint (``endpoint_url``) ->
  :class:`eqdiff.store.s3.S3Store`, credentials from the usual boto3 chain (environment,
  profile, instance role). Credentials are never logged, never put into error messages, never
  written to records. boto3 is imported only when an S3 store is opened.

Keys are made in :mod:`eqdiff.store.keys`; what every backend guarantees (atomic objects,
idempotent puts, checksums, completion markers) is stated in :mod:`eqdiff.store.base`.
"""

from __future__ import annotations

import logging
import urllib.parse
import urllib.request

from eqdiff.config import StorageConfig
from eqdiff.store.base import ArtifactStore, StageWriter
from eqdiff.store.errors import (
    ArtifactNotFoundError,
    BucketNotFoundError,
    ChecksumMismatchError,
    InvalidKeyError,
    PreconditionFailedError,
    StorageAccessError,
    StorageConfigError,
    StorageError,
    StorageFullError,
    StorageReadOnlyError,
    StorageUnavailableError,
    is_transient,
)
from eqdiff.store.local import LocalStore
from eqdiff.store.records import ObjectInfo, StageRecord

__all__ = ["ArtifactNotFoundError", "ArtifactStore", "BucketNotFoundError",
           "ChecksumMismatchError", "InvalidKeyError", "LocalStore", "ObjectInfo",
           "PreconditionFailedError", "StageRecord", "StageWriter", "StorageAccessError",
           "StorageConfigError", "StorageError", "StorageFullError", "StorageReadOnlyError",
           "StorageUnavailableError", "is_transient", "open_store", "store_from_config"]

logger = logging.getLogger(__name__)


def open_store(url: str, *, endpoint_url: str = "", region: str = "", cache_dir: str = "",
               max_attempts: int = StorageConfig.max_attempts,
               connect_timeout: float = StorageConfig.connect_timeout_s,
               read_timeout: float = StorageConfig.read_timeout_s,
               deadline: float = StorageConfig.deadline_s) -> ArtifactStore:
    """The store for ``url``: a folder path, ``file:///…`` or ``s3://bucket/prefix``.

    ``endpoint_url``, ``region``, ``cache_dir``, ``max_attempts`` and the timeouts (seconds)
    apply to S3 only; :class:`eqdiff.store.s3.S3Store` says how they bound each call. Nothing is
    contacted here; call :meth:`ArtifactStore.check` before work starts.
    """
    if not url:
        raise StorageConfigError("storage URL is empty; use a folder, file:///… or s3://bucket")
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme == "s3":
        parsed = urllib.parse.urlsplit(url)
        from eqdiff.store.s3 import S3Store  # boto3 is imported only for S3

        return S3Store(parsed.netloc, parsed.path, endpoint_url=endpoint_url, region=region,
                       cache_dir=cache_dir, max_attempts=max_attempts,
                       connect_timeout=connect_timeout, read_timeout=read_timeout,
                       deadline=deadline)
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


def store_from_config(settings: StorageConfig) -> ArtifactStore:
    """The store described by a :class:`eqdiff.config.StorageConfig`."""
    return open_store(settings.url, endpoint_url=settings.endpoint_url, region=settings.region,
                      cache_dir=settings.cache_dir, max_attempts=settings.max_attempts,
                      connect_timeout=settings.connect_timeout_s,
                      read_timeout=settings.read_timeout_s, deadline=settings.deadline_s)
