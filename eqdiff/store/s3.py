"""The artifact store on S3 or an S3-compatible endpoint; the only module that imports boto3."""

from __future__ import annotations

import io
import logging
import os
import random
import time
import uuid
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

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

from eqdiff.store.base import ArtifactStore, discard, partial_path
from eqdiff.store.errors import (
    ArtifactNotFoundError,
    BucketNotFoundError,
    StorageAccessError,
    StorageConfigError,
    StorageError,
    StorageUnavailableError,
)
from eqdiff.store.keys import MARKER_NAME, validate_delete_prefix, validate_key, validate_prefix
from eqdiff.store.records import ObjectInfo, sha256_bytes, sha256_file, verify_sha256

logger = logging.getLogger(__name__)

MULTIPART_THRESHOLD = 16 * 1024 * 1024  # S3 objects at or above this size go up in parts
MULTIPART_CHUNKSIZE = 8 * 1024 * 1024
_BACKOFF_BASE_S = 0.2
_BACKOFF_CAP_S = 5.0
T = TypeVar("T")


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
        prefix = validate_prefix(prefix)
        root = f"{self.prefix}/" if self.prefix else ""
        search = f"{root}{prefix}/" if prefix else root

        def collect() -> list[str]:
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=search)
            return [obj["Key"][len(root):] for page in pages for obj in page.get("Contents", [])]
        return sorted(self._call("listing", prefix or None, collect))

    def delete_prefix(self, prefix: str) -> int:
        prefix = validate_delete_prefix(prefix)
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
        verify_sha256(self._where(key), sha256_bytes(data), stored, sha256)
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
            verify_sha256(self._where(key), stored, sha256)  # cheap: compare recorded hashes
            cache_id = stored
        else:  # written by another tool: cache by location and ETag
            cache_id = sha256_bytes(f"{self.endpoint}\n{self._where(key)}\n{head.get('ETag')}"
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
        partial = partial_path(dest)
        try:
            self._call("downloading", key, lambda: self._client.download_file(
                self.bucket, self._full(key), str(partial), Config=self._transfer))
            verify_sha256(self._where(key), sha256_file(partial)[0], *expected)
            os.replace(partial, dest)
        finally:
            discard(partial)

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
