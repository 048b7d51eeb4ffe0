"""The artifact store on S3 or an S3-compatible endpoint; the only module that imports boto3.

Every call is bounded in time, so a dead or silent endpoint ends a run with a clear
:class:`StorageUnavailableError` instead of a hang:

- Each HTTP request has a connect timeout and a read timeout: no connection, or no answer or
  progress, for that long ends the request.
- There is one retry layer, :meth:`S3Store._call`. botocore is told not to retry
  (``total_max_attempts=1``) and s3transfer not to retry downloads (``num_download_attempts=1``).
  Ours is the one kept because only it sees whole operations (multipart uploads and downloads,
  bodies that break while streaming, listings of many pages), only it can hold a call to a
  deadline, and it logs every retry with the key. Nested, the two layers multiplied: 4 x 4 tries
  of up to 60 s each turned a silent endpoint into a hang of a quarter of an hour.
- Transient failures (connection refused, reset or closed; timeouts; throttling such as SlowDown;
  HTTP 429 and 5xx) are retried with jittered exponential backoff, at most ``max_attempts`` tries,
  and a try starts only if it would end before the call's deadline (``deadline`` seconds after
  the call began) even if it stalls for the full connect + read timeout. Everything else (a
  missing key or bucket, refused credentials, a full quota, other 4xx) fails at once.
- :meth:`S3Store.check` has a deadline of its own, at most ``CHECK_DEADLINE_S``, and uses
  request timeouts of at most a third of it, so a bad endpoint is reported before work starts.

With the defaults (connect 5 s, read 30 s, deadline 120 s, 6 tries) a request to an endpoint that
accepts connections but never answers fails after about 92 s (three tries of 30 s), one whose
connections are refused after at most about 16 s of backoff, and ``check()`` after about 5 s
and always within 15 s. The deadline bounds retrying, not transfers: a large upload that keeps
making progress is never cut off.
"""

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
    ConnectTimeoutError,
    CredentialRetrievalError,
    HTTPClientError,
    IncompleteReadError,
    NoCredentialsError,
    PartialCredentialsError,
    ReadTimeoutError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

from eqdiff.config import StorageConfig
from eqdiff.store.base import ArtifactStore, content_type_for, discard, partial_path
from eqdiff.store.errors import (
    ArtifactNotFoundError,
    BucketNotFoundError,
    PreconditionFailedError,
    StorageAccessError,
    StorageConfigError,
    StorageError,
    StorageFullError,
    StorageUnavailableError,
    is_transient,
    local_storage_error,
)
from eqdiff.store.keys import MARKER_NAME, validate_delete_prefix, validate_key, validate_prefix
from eqdiff.store.records import ObjectInfo, sha256_bytes, sha256_file, verify_sha256

logger = logging.getLogger(__name__)

MULTIPART_THRESHOLD = 16 * 1024 * 1024  # S3 objects at or above this size go up in parts
MULTIPART_CHUNKSIZE = 8 * 1024 * 1024
CHECK_DEADLINE_S = 15.0  # check() gives up after this long (or the store's deadline if shorter)
_BACKOFF_BASE_S = 0.5
_BACKOFF_CAP_S = 10.0
T = TypeVar("T")

# answers worth retrying: the service is overloaded or failing for now
_TRANSIENT_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "RequestThrottled", "TooManyRequests",
    "TooManyRequestsException", "RequestLimitExceeded", "BandwidthLimitExceeded",
    "ServiceUnavailable", "InternalError", "RequestTimeout", "RequestTimeoutException",
})
_TRANSIENT_STATUSES = frozenset({429, 500, 502, 503, 504})
# answers saying the bucket or the server is out of room (Ceph RGW, MinIO; HTTP 507)
_FULL_CODES = frozenset({"QuotaExceeded", "XMinioStorageFull", "XMinioAdminBucketQuotaExceeded"})
_ENDPOINT_ADVICE = ("check storage.endpoint_url, that the S3 service is running, and "
                    "network/proxy access")


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "eqdiff" / "s3"


class S3Store(ArtifactStore):
    """Artifacts in ``s3://bucket/prefix`` on AWS or an S3-compatible endpoint (boto3).

    Timeouts and retries (seconds; the module docstring says how they bound a call):
    ``connect_timeout`` and ``read_timeout`` per request, ``max_attempts`` tries per call on
    transient failures, no new try once it could end after ``deadline``. Defaults are those of
    :class:`eqdiff.config.StorageConfig`.

    Reads through :meth:`local_path` are cached under ``cache_dir``, content-addressed by the
    object's sha256, so a worker that needs the same object twice downloads it once.
    """

    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: str = "", region: str = "",
                 cache_dir: str | Path = "", max_attempts: int = StorageConfig.max_attempts,
                 connect_timeout: float = StorageConfig.connect_timeout_s,
                 read_timeout: float = StorageConfig.read_timeout_s,
                 deadline: float = StorageConfig.deadline_s) -> None:
        if not bucket:
            raise StorageConfigError("S3 URL names no bucket; use s3://bucket/prefix")
        if max_attempts < 1:
            raise StorageConfigError(f"max_attempts must be >= 1, got {max_attempts}")
        if min(connect_timeout, read_timeout, deadline) <= 0:
            raise StorageConfigError(f"S3 timeouts must be positive, got connect "
                                     f"{connect_timeout}, read {read_timeout}, deadline {deadline}")
        self.bucket = bucket
        stripped = prefix.strip("/")
        self.prefix = validate_key(stripped) if stripped else ""
        self.url = f"s3://{bucket}/{self.prefix}".rstrip("/")
        self.endpoint = endpoint_url or f"the AWS endpoint for region {region or '(default)'}"
        self._endpoint_url = endpoint_url
        self._region = region
        self._max_attempts = max_attempts
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._deadline = deadline
        self._cache_dir = Path(cache_dir).expanduser() if cache_dir else _default_cache_dir()
        self._client = self._new_client(connect_timeout, read_timeout)
        self._transfer = TransferConfig(multipart_threshold=MULTIPART_THRESHOLD,
                                        multipart_chunksize=MULTIPART_CHUNKSIZE,
                                        num_download_attempts=1)  # retries are _call's alone

    def _new_client(self, connect_timeout: float, read_timeout: float) -> Any:
        """A boto3 S3 client with these timeouts that never retries (:meth:`_call` does)."""
        config = Config(
            retries={"mode": "standard", "total_max_attempts": 1},
            connect_timeout=connect_timeout, read_timeout=read_timeout, signature_version="s3v4",
            s3={"addressing_style": "path"} if self._endpoint_url else None,
        )
        return boto3.session.Session().client(
            "s3", endpoint_url=self._endpoint_url or None, region_name=self._region or None,
            config=config)

    def _full(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _where(self, key: str | None) -> str:
        return f"s3://{self.bucket}/{self._full(key)}" if key else self.url

    # ---- error mapping and retries

    def _error(self, exc: Exception, action: str, key: str | None, *,
               gave_up: tuple[int, float] | None = None) -> StorageError:
        """A :class:`StorageError` for a boto error; messages never carry credentials.

        Transient failures become :class:`StorageUnavailableError`; ``gave_up`` (tries, seconds)
        says how long the call kept trying.
        """
        cause: BaseException = exc
        if isinstance(exc, S3UploadFailedError) and exc.__context__ is not None:
            cause = exc.__context__
        elif isinstance(exc, RetriesExceededError):
            cause = exc.last_exception
        tried = ""
        if gave_up:
            tries, waited = gave_up
            tried = f"; gave up after {tries} {'try' if tries == 1 else 'tries'} in {waited:.1f} s"
        where = f"{action} {self._where(key)} (endpoint {self.endpoint}{tried})"
        if isinstance(cause, (NoCredentialsError, PartialCredentialsError,
                              CredentialRetrievalError)):
            return StorageAccessError(
                f"{where}: no usable AWS credentials; set AWS_ACCESS_KEY_ID and "
                f"AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or give the machine a role")
        if isinstance(cause, (ReadTimeoutError, ConnectTimeoutError)):
            return StorageUnavailableError(f"{where}: no answer within the timeout "
                                           f"({type(cause).__name__}); {_ENDPOINT_ADVICE}")
        if isinstance(cause, (BotoConnectionError, HTTPClientError, IncompleteReadError)):
            return StorageUnavailableError(f"{where}: cannot reach the endpoint, or the connection "
                                           f"broke ({type(cause).__name__}); {_ENDPOINT_ADVICE}")
        if isinstance(cause, ClientError):
            code = str(cause.response.get("Error", {}).get("Code", ""))
            status = cause.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code == "NoSuchBucket" or (code in ("404", "NotFound") and key is None):
                return BucketNotFoundError(
                    f"{where}: bucket {self.bucket!r} does not exist; create it or fix "
                    f"storage.url (and storage.endpoint_url/region if it lives elsewhere)")
            if code in ("NoSuchKey", "404", "NotFound"):
                return ArtifactNotFoundError(f"no artifact {key!r} in {self.url}")
            if status == 507 or code in _FULL_CODES:
                return StorageFullError(
                    f"{where}: the bucket's quota or the server's storage is full "
                    f"({code or status}); free space in bucket {self.bucket!r}, raise its quota, "
                    f"or point storage.url elsewhere")
            if status == 403 or code in ("AccessDenied", "InvalidAccessKeyId",
                                         "SignatureDoesNotMatch", "ExpiredToken",
                                         "InvalidToken"):
                return StorageAccessError(
                    f"{where}: refused ({code or status}); check the credentials (AWS_PROFILE or "
                    f"AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY), their permissions on bucket "
                    f"{self.bucket!r}, and storage.region")
            if status == 412 or code in ("PreconditionFailed", "ConditionalRequestConflict"):
                return PreconditionFailedError(
                    f"{where}: condition not met ({code or status}): the object already exists "
                    f"or changed since it was read")
            if status in _TRANSIENT_STATUSES or code in _TRANSIENT_CODES:
                return StorageUnavailableError(
                    f"{where}: the service is overloaded or failing ({code or 'an error'}, HTTP "
                    f"{status}); retry later, run fewer workers at once, or check the service")
            return StorageError(f"{where}: failed with {code or 'an error'} (HTTP {status}); "
                                f"check storage.url, storage.region and storage.endpoint_url")
        return StorageError(f"{where}: failed ({type(cause).__name__})")

    def _call(self, action: str, key: str | None, fn: Callable[[], T], *,
              until: float | None = None, request_s: float | None = None) -> T:
        """Run ``fn`` (one try), retrying transient failures; map boto errors.

        The only retry layer (see the module docstring). After a transient failure ``fn`` runs
        again, after a jittered exponential backoff, while fewer than ``max_attempts`` tries were
        made and a try that stalls for ``request_s`` (default: connect + read timeout) would
        still end before ``until`` (a ``time.monotonic()`` time; default: the store's deadline
        from now). Other failures are raised at once.
        """
        started = time.monotonic()
        until = started + self._deadline if until is None else until
        request_s = self._connect_timeout + self._read_timeout if request_s is None else request_s
        attempt = 1
        while True:
            try:
                return fn()
            except (BotoCoreError, ClientError, Boto3Error) as exc:
                error = self._error(exc, action, key)
                if not is_transient(error):
                    # an access error's boto message may quote the access key id: don't chain it
                    raise error from (None if isinstance(error, StorageAccessError) else exc)
                now = time.monotonic()
                delay = (min(_BACKOFF_CAP_S, _BACKOFF_BASE_S * 2 ** (attempt - 1))
                         * random.uniform(0.5, 1.0))
                if attempt >= self._max_attempts or now + delay + request_s > until:
                    raise self._error(exc, action, key,
                                      gave_up=(attempt, now - started)) from exc
                logger.warning("%s; try %d of %d failed, retrying in %.1f s", error, attempt,
                               self._max_attempts, delay)
                time.sleep(delay)
                attempt += 1

    # ---- primitives

    def check(self) -> None:
        """Head the bucket, write and delete a probe, all within ``CHECK_DEADLINE_S`` (or the
        store's deadline if shorter), each request with timeouts of at most a third of it."""
        budget = min(CHECK_DEADLINE_S, self._deadline)
        connect = min(self._connect_timeout, budget / 3)
        read = min(self._read_timeout, budget / 3)
        client = self._new_client(connect, read)
        bounds = {"until": time.monotonic() + budget, "request_s": connect + read}
        self._call("checking bucket", None, lambda: client.head_bucket(Bucket=self.bucket),
                   **bounds)
        probe = self._full(f".eqdiff-check-{uuid.uuid4().hex}")
        self._call("writing a probe object to", None, lambda: client.put_object(
            Bucket=self.bucket, Key=probe, Body=b""), **bounds)
        self._call("deleting the probe object from", None, lambda: client.delete_object(
            Bucket=self.bucket, Key=probe), **bounds)

    def _head(self, key: str) -> dict[str, Any] | None:
        def head() -> dict[str, Any] | None:
            try:
                return self._client.head_object(Bucket=self.bucket, Key=self._full(key))
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                    return None
                raise
        return self._call("looking up", validate_key(key), head)

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

    def location(self, key: str) -> str:
        return self._where(validate_key(key))

    def url_for(self, key: str, *, expires_s: int = 3600) -> str:
        key = validate_key(key)
        return self._call("presigning", key, lambda: self._client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": self._full(key)},
            ExpiresIn=expires_s))

    def _download(self, key: str, dest: Path, *expected: str | None) -> None:
        """Download (multipart above the threshold) to a temp file, verify, rename into place."""
        partial = partial_path(dest)
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            self._call("downloading", key, lambda: self._client.download_file(
                self.bucket, self._full(key), str(partial), Config=self._transfer))
            verify_sha256(self._where(key), sha256_file(partial)[0], *expected)
            os.replace(partial, dest)
        except OSError as exc:  # the local side: the cache, or the caller's destination, folder
            cached = dest.is_relative_to(self._cache_dir)
            raise local_storage_error(
                exc, f"downloading {self._where(key)} to", dest,
                folder=self._cache_dir if cached else dest.parent,
                setting="storage.cache_dir" if cached else "the destination") from exc
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

    # ---- conditional writes: If-None-Match / If-Match; the token is the ETag

    def create_exclusive(self, key: str, data: bytes) -> str:
        return self._put_if(key, data, IfNoneMatch="*")

    def get_with_token(self, key: str) -> tuple[bytes, str]:
        key = validate_key(key)

        def fetch() -> tuple[bytes, str | None, str]:
            response = self._client.get_object(Bucket=self.bucket, Key=self._full(key))
            return (response["Body"].read(), response.get("Metadata", {}).get("sha256"),
                    response["ETag"])
        data, stored, etag = self._call("reading", key, fetch)
        verify_sha256(self._where(key), sha256_bytes(data), stored)
        return data, etag

    def replace_if(self, key: str, data: bytes, token: str) -> str:
        try:
            return self._put_if(key, data, IfMatch=token)
        except ArtifactNotFoundError:  # If-Match on a missing key answers 404
            raise PreconditionFailedError(f"{self._where(key)} is gone (expected ETag "
                                          f"{token})") from None

    def delete_if(self, key: str, token: str) -> None:
        # AWS honours If-Match on DELETE (since 2025), but some S3-compatible servers ignore
        # it; checking the ETag first keeps them from deleting an object that changed long ago.
        head = self._head(key)
        if head is None or head.get("ETag") != token:
            raise PreconditionFailedError(f"{self._where(key)} is gone or changed (expected ETag "
                                          f"{token})")
        try:
            self._call("deleting", key, lambda: self._client.delete_object(
                Bucket=self.bucket, Key=self._full(key), IfMatch=token))
        except ArtifactNotFoundError:
            raise PreconditionFailedError(f"{self._where(key)} is gone (expected ETag "
                                          f"{token})") from None

    def _put_if(self, key: str, data: bytes, **condition: str) -> str:
        key = validate_key(key)
        response = self._call("writing", key, lambda: self._client.put_object(
            Bucket=self.bucket, Key=self._full(key), Body=data,
            ContentType=content_type_for(key), Metadata={"sha256": sha256_bytes(data)},
            **condition))
        return response["ETag"]
