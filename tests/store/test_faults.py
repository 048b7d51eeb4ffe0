"""The store under faults: a silent or refusing S3 endpoint (through tests/store/faultproxy.py),
a full or read-only local folder, and which errors count as transient.

The S3 stores here get small timeouts through their options, so every bound is a few seconds.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import pathlib
import subprocess
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import (
    ClientError,
    ConnectionClosedError,
    EndpointConnectionError,
    ReadTimeoutError,
)
from faultproxy import FaultProxy

from eqdiff.store import (
    ArtifactNotFoundError,
    BucketNotFoundError,
    ChecksumMismatchError,
    InvalidKeyError,
    LocalStore,
    StorageAccessError,
    StorageConfigError,
    StorageError,
    StorageFullError,
    StorageReadOnlyError,
    StorageUnavailableError,
    is_transient,
)
from eqdiff.store import local as local_module
from eqdiff.store import s3 as s3_module
from eqdiff.store.keys import PARTIAL_SUFFIX
from eqdiff.store.s3 import CHECK_DEADLINE_S, MULTIPART_THRESHOLD, S3Store

FAST = {"connect_timeout": 0.5, "read_timeout": 1.0, "deadline": 4.0}
SLACK_S = 1.0  # scheduling and client set-up on a busy 2-core machine


@pytest.fixture
def proxy(s3_endpoint: str) -> Iterator[FaultProxy]:
    target = urllib.parse.urlsplit(s3_endpoint)
    assert target.hostname and target.port
    with FaultProxy(target.hostname, target.port) as fault_proxy:
        yield fault_proxy


def _bucket(bucket_url: str) -> str:
    return urllib.parse.urlsplit(bucket_url).netloc


def _proxied_store(proxy: FaultProxy, bucket_url: str, cache: Path, **options: Any) -> S3Store:
    return S3Store(_bucket(bucket_url), "team", endpoint_url=proxy.endpoint, cache_dir=cache,
                   **options)


# --------------------------------------------------------------------------- S3: black hole

def test_black_hole_endpoint_fails_within_the_deadline(proxy: FaultProxy, s3_bucket_url: str,
                                                       tmp_path: Path) -> None:
    store = _proxied_store(proxy, s3_bucket_url, tmp_path / "cache", max_attempts=6, **FAST)
    store.put_bytes("runs/r1/a.txt", b"stored before the fault")
    proxy.set_mode("black-hole")
    # no try starts that could end after the deadline, even stalled for connect + read timeout
    check_bound = min(CHECK_DEADLINE_S, FAST["deadline"]) + SLACK_S
    calls: list[tuple[str, Callable[[], object], str, float]] = [
        ("checking bucket", store.check, store.url, check_bound),
        ("looking up", lambda: store.put_bytes("runs/r1/b.txt", b"x"), "runs/r1/b.txt",
         FAST["deadline"] + SLACK_S),
        ("reading", lambda: store.get_bytes("runs/r1/a.txt"), "runs/r1/a.txt",
         FAST["deadline"] + SLACK_S),
    ]
    for action, call, named, bound in calls:
        started = time.monotonic()
        with pytest.raises(StorageUnavailableError) as excinfo:
            call()
        elapsed = time.monotonic() - started
        assert FAST["read_timeout"] <= elapsed < bound, (action, named, elapsed)
        message = str(excinfo.value)
        for part in (action, named, proxy.endpoint, "gave up after", "no answer"):
            assert part in message, (part, message)
        assert "\n" not in message


def test_check_fails_fast_against_a_black_hole_with_default_timeouts(
        proxy: FaultProxy, s3_bucket_url: str, tmp_path: Path) -> None:
    """With the default 30 s read timeout and 120 s deadline, check() still ends within its own
    deadline: its requests use at most a third of it as timeouts."""
    store = _proxied_store(proxy, s3_bucket_url, tmp_path / "cache")
    proxy.set_mode("black-hole")
    started = time.monotonic()
    with pytest.raises(StorageUnavailableError, match="checking bucket"):
        store.check()
    assert time.monotonic() - started < CHECK_DEADLINE_S + SLACK_S


# --------------------------------------------------------------------------- S3: outage

@pytest.mark.parametrize("mode", ["refuse", "reset"])
def test_puts_ride_out_a_short_outage_and_leave_a_clean_bucket(
        mode: str, proxy: FaultProxy, s3_bucket_url: str, s3_client, tmp_path: Path,
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    store = _proxied_store(proxy, s3_bucket_url, tmp_path / "cache", max_attempts=10,
                           connect_timeout=1.0, read_timeout=5.0, deadline=20.0)
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(MULTIPART_THRESHOLD + 1024 * 1024))  # goes up in 3 parts
    # skip the existence check, so the first request to meet the outage is the multipart upload
    monkeypatch.setattr(store, "_matches", lambda key, info: False)
    caplog.set_level(logging.WARNING, logger="eqdiff.store")
    outage_s = 3.0

    proxy.fault(mode, outage_s)  # type: ignore[arg-type]
    started = time.monotonic()
    written = [store.put_file("runs/r1/big.bin", big)]
    written += [store.put_bytes(f"runs/r1/small-{i}.txt", f"small {i}".encode())
                for i in range(3)]
    elapsed = time.monotonic() - started

    assert elapsed >= outage_s - 0.5  # the first put waited the outage out
    assert "retrying" in caplog.text
    assert proxy.mode == "pass"
    bucket = _bucket(s3_bucket_url)
    listed = s3_client.list_objects_v2(Bucket=bucket).get("Contents", [])
    assert sorted(obj["Key"] for obj in listed) == sorted(f"team/{i.key}" for i in written)
    for info in written:
        head = s3_client.head_object(Bucket=bucket, Key=f"team/{info.key}")
        assert head["Metadata"].get("sha256") == info.sha256
        assert head["ContentLength"] == info.size
    body = s3_client.get_object(Bucket=bucket, Key="team/runs/r1/big.bin")["Body"].read()
    assert hashlib.sha256(body).hexdigest() == written[0].sha256
    assert s3_client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


# --------------------------------------------------------------------------- local: full, read-only

@dataclass
class SmallFolder:
    """A 1 MiB folder: a tmpfs mount, or (where mounting is not allowed) the same errors raised
    by patched file functions."""

    root: Path
    mounted: bool
    monkeypatch: pytest.MonkeyPatch

    def fill_limit(self) -> None:
        """Make writes over the size limit fail with ENOSPC (a tmpfs does that by itself)."""
        if not self.mounted:
            def fsync(fd: int) -> None:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self.monkeypatch.setattr(local_module.os, "fsync", fsync)

    def make_read_only(self) -> None:
        """Remount read-only, or make creating and unlinking files under ``root`` fail."""
        if self.mounted:
            subprocess.run(["mount", "-o", "remount,ro", str(self.root)], check=True)
            return
        inside = self._inside

        def erofs(path: object) -> OSError:
            return OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

        real_open, real_unlink, real_mkstemp = open, pathlib.Path.unlink, tempfile.mkstemp

        def fake_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
            if inside(file) and any(flag in mode for flag in "wax+"):
                raise erofs(file)
            return real_open(file, mode, *args, **kwargs)

        def fake_unlink(path: Path, missing_ok: bool = False) -> None:
            if inside(path):
                raise erofs(path)
            real_unlink(path, missing_ok=missing_ok)

        def fake_mkstemp(*args: Any, **kwargs: Any) -> tuple[int, str]:
            if inside(kwargs.get("dir", "")):
                raise erofs(kwargs["dir"])
            return real_mkstemp(*args, **kwargs)

        self.monkeypatch.setattr(local_module, "open", fake_open, raising=False)
        self.monkeypatch.setattr(pathlib.Path, "unlink", fake_unlink)
        self.monkeypatch.setattr(local_module.tempfile, "mkstemp", fake_mkstemp)

    def _inside(self, path: object) -> bool:
        return bool(path) and Path(str(path)).is_relative_to(self.root)

    def files(self) -> list[str]:
        return sorted(str(p.relative_to(self.root)) for p in self.root.rglob("*") if p.is_file())


@pytest.fixture(params=["tmpfs", "simulated"])
def small_folder(request: pytest.FixtureRequest, tmp_path: Path,
                 monkeypatch: pytest.MonkeyPatch) -> Iterator[SmallFolder]:
    root = tmp_path / "small"
    root.mkdir()
    if request.param == "simulated":
        yield SmallFolder(root, False, monkeypatch)
        return
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(root)],
                           capture_output=True, text=True, check=False)
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mount.stderr.strip()}); the simulated case "
                    f"covers the same errors")
    try:
        yield SmallFolder(root, True, monkeypatch)
    finally:
        subprocess.run(["umount", str(root)], check=True)


def test_full_folder_fails_at_once_with_storage_full(small_folder: SmallFolder,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     tmp_path: Path) -> None:
    store = LocalStore(small_folder.root)
    store.check()
    small_folder.fill_limit()
    tries: list[Path] = []
    real_partial_path = local_module.partial_path

    def counted(dest: Path) -> Path:  # every write try makes one temp path
        tries.append(dest)
        return real_partial_path(dest)

    monkeypatch.setattr(local_module, "partial_path", counted)
    source = tmp_path / "two-megabytes.bin"
    source.write_bytes(os.urandom(2 * 1024 * 1024))

    for put in (lambda: store.put_bytes("runs/r1/big.bin", source.read_bytes()),
                lambda: store.put_file("runs/r1/big.bin", source)):
        tries.clear()
        started = time.monotonic()
        with pytest.raises(StorageFullError) as excinfo:
            put()
        assert time.monotonic() - started < 1.0 and len(tries) == 1  # one try, no retry
        message = str(excinfo.value)
        assert str(small_folder.root) in message and "free space" in message
        assert "storage.url" in message and "\n" not in message
        assert not is_transient(excinfo.value)
    assert small_folder.files() == []  # no temp file left behind


def test_read_only_folder_is_named_not_a_raw_oserror(small_folder: SmallFolder) -> None:
    store = LocalStore(small_folder.root)
    kept = store.put_bytes("runs/r1/a.txt", b"written before the remount")
    small_folder.make_read_only()

    with pytest.raises(StorageReadOnlyError) as excinfo:
        store.check()
    with pytest.raises(StorageReadOnlyError) as put_error:
        store.put_bytes("runs/r1/b.txt", b"new")
    with pytest.raises(StorageReadOnlyError), store.stage("runs/r2", "h") as stage:
        stage.put_bytes("out.txt", b"new")
    for error in (excinfo.value, put_error.value):
        message = str(error)
        assert str(small_folder.root) in message and "mounted read-only" in message
        assert PARTIAL_SUFFIX not in message  # names the folder, not the temp file
        assert not is_transient(error)
    if small_folder.mounted:
        with pytest.raises(StorageReadOnlyError):
            store.delete_prefix("runs/r1")
    # reads still work, and re-putting the same content needs no write
    assert store.get_bytes("runs/r1/a.txt", sha256=kept.sha256) == b"written before the remount"
    assert store.put_bytes("runs/r1/a.txt", b"written before the remount").written is False
    assert small_folder.files() == ["runs/r1/a.txt"]


# --------------------------------------------------------------------------- classification

@pytest.mark.parametrize(("error", "transient"), [
    (StorageUnavailableError("endpoint down"), True),
    (ConnectionResetError(errno.ECONNRESET, "reset"), True),
    (ConnectionRefusedError(errno.ECONNREFUSED, "refused"), True),
    (BrokenPipeError(errno.EPIPE, "broken pipe"), True),
    (TimeoutError("timed out"), True),
    (OSError(errno.ENETUNREACH, "network is unreachable"), True),
    (StorageFullError("full"), False),
    (StorageReadOnlyError("read-only"), False),
    (StorageAccessError("denied"), False),
    (ArtifactNotFoundError("missing"), False),
    (BucketNotFoundError("no bucket"), False),
    (ChecksumMismatchError("corrupt"), False),
    (InvalidKeyError("../x"), False),
    (StorageConfigError("bad url"), False),
    (StorageError("other"), False),
    (OSError(errno.ENOSPC, "no space"), False),
    (OSError(errno.EDQUOT, "quota"), False),
    (OSError(errno.EROFS, "read-only"), False),
    (PermissionError(errno.EACCES, "denied"), False),
    (FileNotFoundError(errno.ENOENT, "missing"), False),
    (ValueError("bad input"), False),
    (KeyboardInterrupt(), False),
])
def test_is_transient(error: BaseException, transient: bool) -> None:
    assert is_transient(error) is transient


def _client_error(code: str, status: int) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": "x"},
                        "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject")


@pytest.fixture
def offline_store(aws_test_env: dict[str, str], monkeypatch: pytest.MonkeyPatch,
                  tmp_path: Path) -> tuple[S3Store, list[float]]:
    """An S3 store that is never contacted, and the backoff sleeps its calls would take."""
    sleeps: list[float] = []
    monkeypatch.setattr(s3_module.time, "sleep", sleeps.append)
    store = S3Store("bucket", endpoint_url="http://127.0.0.1:9", cache_dir=tmp_path,
                    max_attempts=3, **FAST)
    return store, sleeps


@pytest.mark.parametrize(("raised", "expected", "transient"), [
    (_client_error("SlowDown", 503), StorageUnavailableError, True),
    (_client_error("InternalError", 500), StorageUnavailableError, True),
    (_client_error("TooManyRequests", 429), StorageUnavailableError, True),
    (_client_error("BadGateway", 502), StorageUnavailableError, True),
    (ReadTimeoutError(endpoint_url="http://127.0.0.1:9"), StorageUnavailableError, True),
    (EndpointConnectionError(endpoint_url="http://127.0.0.1:9"), StorageUnavailableError, True),
    (ConnectionClosedError(endpoint_url="http://127.0.0.1:9"), StorageUnavailableError, True),
    (_client_error("InvalidArgument", 400), StorageError, False),
    (_client_error("EntityTooLarge", 400), StorageError, False),
    (_client_error("AccessDenied", 403), StorageAccessError, False),
    (_client_error("QuotaExceeded", 403), StorageFullError, False),
    (_client_error("XMinioStorageFull", 507), StorageFullError, False),
])
def test_s3_errors_are_classified_and_only_transient_ones_retried(
        offline_store: tuple[S3Store, list[float]], raised: Exception,
        expected: type[StorageError], transient: bool) -> None:
    store, sleeps = offline_store
    tries: list[int] = []

    def fail() -> None:
        tries.append(1)
        raise raised

    with pytest.raises(expected) as excinfo:
        store._call("uploading", "runs/r1/a.txt", fail)
    assert type(excinfo.value) is expected and is_transient(excinfo.value) is transient
    assert len(tries) == (3 if transient else 1)  # max_attempts, or no retry at all
    assert len(sleeps) == len(tries) - 1
    message = str(excinfo.value)
    assert "s3://bucket/runs/r1/a.txt" in message and "http://127.0.0.1:9" in message
    if transient:
        assert "gave up after 3 tries" in message


def test_s3_transient_error_then_success(offline_store: tuple[S3Store, list[float]]) -> None:
    store, sleeps = offline_store
    answers = [_client_error("SlowDown", 503), ReadTimeoutError(endpoint_url="x"), "done"]

    def flaky() -> str:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    assert store._call("reading", "k", flaky) == "done"
    assert len(sleeps) == 2 and sleeps[0] <= sleeps[1]  # jittered exponential backoff


def test_s3_no_try_starts_that_could_outlast_the_deadline(
        offline_store: tuple[S3Store, list[float]]) -> None:
    store, sleeps = offline_store
    tries: list[int] = []

    def stalls() -> None:
        tries.append(1)
        raise ReadTimeoutError(endpoint_url="x")

    # 1 s left: a stalled try takes connect + read timeout (1.5 s), so none may start
    with pytest.raises(StorageUnavailableError, match="gave up after 1 try "):
        store._call("reading", "k", stalls, until=time.monotonic() + 1.0)
    assert len(tries) == 1 and sleeps == []


def test_s3_store_rejects_bad_timeouts(aws_test_env: dict[str, str]) -> None:
    with pytest.raises(StorageConfigError, match="positive"):
        S3Store("bucket", endpoint_url="http://127.0.0.1:9", read_timeout=0)
