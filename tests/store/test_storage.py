"""The artifact store: one suite for both backends (local folder, S3 over HTTP to moto's server)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from botocore.exceptions import ClientError, ResponseStreamingError
from moto.server import ThreadedMotoServer

from eqdiff.config import StorageConfig
from eqdiff.store import (
    ArtifactNotFoundError,
    ArtifactStore,
    BucketNotFoundError,
    ChecksumMismatchError,
    InvalidKeyError,
    LocalStore,
    StorageAccessError,
    StorageConfigError,
    StorageUnavailableError,
    open_store,
    store_from_config,
)
from eqdiff.store.keys import (
    MARKER_NAME,
    artifact_key,
    safe_segment,
    unescape_segment,
    validate_key,
)
from eqdiff.store.s3 import S3Store

StoreFactory = Callable[[], ArtifactStore]


def _free_port() -> int:
    """A port nothing listens on (bound then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(params=["local", "s3"])
def store_factory(request: pytest.FixtureRequest, tmp_path: Path) -> StoreFactory:
    """Opens fresh store objects on one location (same folder / same bucket and cache)."""
    if request.param == "local":
        url = str(tmp_path / "artifacts")
        return lambda: open_store(url)
    bucket_url = request.getfixturevalue("s3_bucket_url")
    endpoint = request.getfixturevalue("s3_endpoint")
    return lambda: open_store(f"{bucket_url}/team/eqdiff", endpoint_url=endpoint,
                              cache_dir=str(tmp_path / "s3-cache"))


@pytest.fixture
def store(store_factory: StoreFactory) -> ArtifactStore:
    return store_factory()


def _corrupt(store: ArtifactStore, key: str, request: pytest.FixtureRequest) -> None:
    """Replace an object's bytes behind the store's back, keeping its recorded checksum."""
    if isinstance(store, LocalStore):
        (store.root / key).write_bytes(b"bit rot")
        return
    assert isinstance(store, S3Store)
    client = request.getfixturevalue("s3_client")
    full = f"{store.prefix}/{key}"
    metadata = client.head_object(Bucket=store.bucket, Key=full)["Metadata"]
    client.put_object(Bucket=store.bucket, Key=full, Body=b"bit rot", Metadata=metadata)


# --------------------------------------------------------------------------- round trips

def test_check_passes_and_leaves_nothing(store: ArtifactStore) -> None:
    store.check()
    assert store.list_keys() == []


def test_bytes_round_trip(store: ArtifactStore) -> None:
    data = bytes(range(256)) * 10
    info = store.put_bytes("runs/r1/blob.bin", data)
    assert (info.key, info.size, info.sha256) == (
        "runs/r1/blob.bin", len(data), hashlib.sha256(data).hexdigest())
    assert store.exists("runs/r1/blob.bin")
    assert store.get_bytes("runs/r1/blob.bin") == data
    assert store.get_bytes("runs/r1/blob.bin", sha256=info.sha256) == data
    assert not store.exists("runs/r1/other.bin")
    assert not store.exists("runs/r1")  # a folder is not an object
    with pytest.raises(ArtifactNotFoundError, match="other.bin"):
        store.get_bytes("runs/r1/other.bin")


def test_json_round_trip(store: ArtifactStore) -> None:
    record = {"subject": "chien rouge 🐕", "steps": [1, 2, 3], "nested": {"lr": 4e-05, "ok": True}}
    first = store.put_json("runs/r1/run.json", record)
    assert store.get_json("runs/r1/run.json") == record
    # canonical JSON: the same object (keys in another order) is the same content, not rewritten
    again = store.put_json("runs/r1/run.json", dict(reversed(list(record.items()))))
    assert again == first and not again.written


def test_file_round_trip(store: ArtifactStore, tmp_path: Path) -> None:
    source = tmp_path / "concept.safetensors"
    source.write_bytes(os.urandom(100_000))
    info = store.put_file("runs/r1/concepts/dog/eqdiff/concept.safetensors", source)
    dest = store.get_file(info.key, tmp_path / "out" / "copy.safetensors", sha256=info.sha256)
    assert dest.read_bytes() == source.read_bytes()
    assert store.local_path(info.key).read_bytes() == source.read_bytes()
    assert [p.name for p in dest.parent.iterdir()] == ["copy.safetensors"]  # no temp files left
    with pytest.raises(ArtifactNotFoundError):
        store.get_file("runs/r1/missing.bin", tmp_path / "never.bin")
    assert not (tmp_path / "never.bin").exists()


def test_same_content_is_a_noop_and_new_content_replaces(store: ArtifactStore) -> None:
    assert store.put_bytes("k/a.txt", b"one").written
    assert not store.put_bytes("k/a.txt", b"one").written
    assert store.put_bytes("k/a.txt", b"two").written
    assert store.get_bytes("k/a.txt") == b"two"
    assert store.list_keys("k") == ["k/a.txt"]


def test_list_and_delete_prefix(store: ArtifactStore) -> None:
    for key in ("runs/r1/a.txt", "runs/r1/sub/b.txt", "runs/r10/c.txt", "cache/x.txt"):
        store.put_bytes(key, key.encode())
    store.mark_done("runs/r1", config_hash="h")
    assert store.list_keys("runs/r1") == [f"runs/r1/{MARKER_NAME}", "runs/r1/a.txt",
                                          "runs/r1/sub/b.txt"]  # not runs/r10
    assert store.list_keys("runs/r1/") == store.list_keys("runs/r1")
    assert store.list_keys("nothing/here") == []
    assert len(store.list_keys()) == 5
    assert store.delete_prefix("runs/r1") == 3
    assert store.list_keys() == ["cache/x.txt", "runs/r10/c.txt"]
    assert not store.is_done("runs/r1")
    with pytest.raises(InvalidKeyError, match="whole store"):
        store.delete_prefix("")


def test_large_file_multipart_with_verified_checksum(
        store: ArtifactStore, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    source = tmp_path / "big.bin"
    source.write_bytes(os.urandom(50 * 1024 * 1024))
    expected = hashlib.sha256(source.read_bytes()).hexdigest()
    info = store.put_file("models/big.bin", source)
    assert info.sha256 == expected and info.size == 50 * 1024 * 1024
    if isinstance(store, S3Store):
        head = request.getfixturevalue("s3_client").head_object(
            Bucket=store.bucket, Key=f"{store.prefix}/models/big.bin")
        assert head["ETag"].strip('"').endswith("-7")  # 7 parts of 8 MB: a multipart upload
        assert head["Metadata"]["sha256"] == expected
    dest = store.get_file("models/big.bin", tmp_path / "big-copy.bin")
    assert hashlib.sha256(dest.read_bytes()).hexdigest() == expected
    assert not store.put_file("models/big.bin", source).written


def test_corrupt_object_is_detected_on_read(
        store: ArtifactStore, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    info = store.put_bytes("runs/r1/scores.parquet", b"good bytes" * 100)
    _corrupt(store, info.key, request)
    with pytest.raises(ChecksumMismatchError, match="scores.parquet"):
        store.get_bytes(info.key, sha256=info.sha256)
    with pytest.raises(ChecksumMismatchError):
        store.get_file(info.key, tmp_path / "copy.parquet", sha256=info.sha256)
    assert list(tmp_path.glob("*copy.parquet*")) == []  # nothing half-downloaded left behind
    if isinstance(store, S3Store):  # S3 also checks against the object's own recorded sha256
        with pytest.raises(ChecksumMismatchError):
            store.get_bytes(info.key)


def test_report_url_opens_with_a_browser_content_type(store: ArtifactStore) -> None:
    html = b"<html><body><h1>EqDiff report</h1></body></html>"
    store.put_bytes("runs/r1/report/report.html", html)
    store.put_bytes("runs/r1/report/plots/clip.png", b"\x89PNG\r\n\x1a\nfake")
    with urllib.request.urlopen(store.url_for("runs/r1/report/report.html")) as response:
        assert response.read() == html
        assert response.headers["Content-Type"].startswith("text/html")
    with urllib.request.urlopen(store.url_for("runs/r1/report/plots/clip.png")) as response:
        assert response.headers["Content-Type"] == "image/png"


def test_local_path_downloads_once(store_factory: StoreFactory, tmp_path: Path) -> None:
    writer = store_factory()
    info = writer.put_bytes("cache/priors/dog/abcdef12/000.png", os.urandom(4096))
    first = writer.local_path(info.key)
    stat = first.stat()
    reader = store_factory()  # another worker on the same machine: same cache folder
    second = reader.local_path(info.key, sha256=info.sha256)
    assert second == first and second.name == "000.png"
    assert (second.stat().st_ino, second.stat().st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)
    assert second.read_bytes() == writer.get_bytes(info.key)


# --------------------------------------------------------------------------- stages

def test_stage_marker_is_written_last_with_outputs(store: ArtifactStore) -> None:
    prefix = artifact_key("concept", run_id="r1", subject="dog", method="eqdiff")
    with store.stage(prefix, "cfg1", info={"steps": 10}) as stage:
        a = stage.put_bytes("concept.safetensors", b"tensors")
        stage.put_json("concept.json", {"token": "<eqd>"})
        stage.info["loss"] = 0.25
        assert store.exists(a.key) and not store.is_done(prefix)  # outputs first, marker last
    assert store.is_done(prefix) and store.is_done(prefix, "cfg1")
    assert not store.is_done(prefix, "cfg2")  # done for another config: redo
    record = store.read_marker(prefix)
    assert record is not None and record.config_hash == "cfg1"
    assert record.info == {"steps": 10, "loss": 0.25}
    assert sorted(o.key for o in record.outputs) == [f"{prefix}/concept.json",
                                                     f"{prefix}/concept.safetensors"]
    output = record.output(f"{prefix}/concept.safetensors")
    assert store.get_bytes(output.key, sha256=output.sha256) == b"tensors"


def test_interrupted_stage_is_not_done(store: ArtifactStore) -> None:
    prefix = artifact_key("samples", run_id="r1", subject="dog", method="eqdiff")
    with pytest.raises(RuntimeError, match="OOM"), store.stage(prefix, "cfg1") as stage:
        stage.put_bytes("00_0.png", b"img")
        raise RuntimeError("CUDA OOM")
    assert store.exists(f"{prefix}/00_0.png")  # the output is there...
    assert not store.is_done(prefix) and store.read_marker(prefix) is None  # ...but not done


def test_rerunning_a_stage_withdraws_its_old_marker(store: ArtifactStore) -> None:
    prefix = artifact_key("scores", run_id="r1", subject="dog", method="eqdiff")
    with store.stage(prefix, "old") as stage:
        stage.put_bytes("scores.parquet", b"old")
    with pytest.raises(KeyboardInterrupt), store.stage(prefix, "new") as stage:
        assert not store.is_done(prefix)  # no reader pairs the old marker with new outputs
        stage.put_bytes("scores.parquet", b"new, half done")
        raise KeyboardInterrupt
    assert not store.is_done(prefix)


def test_mark_done_directly(store: ArtifactStore) -> None:
    info = store.put_bytes("cache/masks/0123456789abcdef/grabcut.png", b"mask")
    record = store.mark_done("cache/masks/0123456789abcdef", config_hash="m1", outputs=[info])
    assert store.read_marker("cache/masks/0123456789abcdef") == record
    assert store.get_json(f"cache/masks/0123456789abcdef/{MARKER_NAME}")["outputs"] == [
        {"key": info.key, "size": 4, "sha256": info.sha256}]


# --------------------------------------------------------------------------- keys

BAD_KEYS = ["", "/etc/passwd", "../outside", "runs/../../outside", "runs/./x", "a//b", "a/",
            "a\\..\\b", "runs/r1\x00/x", "runs/\nx", "x/.f.abc.eqdiff-partial"]


@pytest.mark.parametrize("key", BAD_KEYS)
def test_unsafe_keys_are_rejected_everywhere(store: ArtifactStore, key: str,
                                             tmp_path: Path) -> None:
    operations: list[Callable[[], object]] = [
        lambda: store.put_bytes(key, b"x"), lambda: store.put_json(key, {}),
        lambda: store.get_bytes(key), lambda: store.exists(key),
        lambda: store.get_file(key, tmp_path / "dest"), lambda: store.local_path(key),
        lambda: store.url_for(key), lambda: store.is_done(key),
    ]
    if key and not key.endswith("/"):  # listings take "" (everything) and a trailing "/"
        operations += [lambda: store.list_keys(key), lambda: store.delete_prefix(key)]
    for operation in operations:
        with pytest.raises(InvalidKeyError):
            operation()
    with pytest.raises(InvalidKeyError), store.stage("runs/r1/x", "h") as stage:
        stage.put_bytes(key or "..", b"x")
    assert store.list_keys() == []
    assert sorted(p.name for p in tmp_path.iterdir()) in ([], ["s3-cache"], ["artifacts"])


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "../etc", "a\\b", "tab\there"])
def test_safe_segment_rejects_traversal(name: str) -> None:
    with pytest.raises(InvalidKeyError):
        safe_segment(name)
    with pytest.raises((InvalidKeyError, ValueError)):
        artifact_key("concept", run_id="r1", subject=name, method="eqdiff")


@pytest.mark.parametrize("name", ["dog", "red toy #2", "café", "100%", "a.b-c_d~e", "...",
                                  "<script>"])
def test_safe_segment_escapes_reversibly(name: str) -> None:
    segment = safe_segment(name)
    assert validate_key(segment) == segment
    assert all(ch.isalnum() or ch in "%._-~" for ch in segment)
    assert segment == safe_segment(name) and unescape_segment(segment) == name


def test_artifact_key_layout() -> None:
    assert artifact_key("run", run_id="r1", name="run.json") == "runs/r1/run.json"
    assert artifact_key("concept", run_id="r1", subject="red toy", method="eqdiff",
                        name="concept.safetensors") == (
        "runs/r1/concepts/red%20toy/eqdiff/concept.safetensors")
    assert artifact_key("samples", run_id="r1", subject="dog", method="eqdiff",
                        name="03_1.png") == "runs/r1/samples/dog/eqdiff/03_1.png"
    assert artifact_key("scores", run_id="r1", subject="dog", method="eqdiff") == (
        "runs/r1/scores/dog/eqdiff")
    assert artifact_key("report", run_id="r1", name="plots/clip.png") == (
        "runs/r1/report/plots/clip.png")
    assert artifact_key("mask", content_hash="ab" * 32, name="grabcut.png") == (
        f"cache/masks/{'ab' * 32}/grabcut.png")
    assert artifact_key("prior", class_name="dog", content_hash="0123abcd") == (
        "cache/priors/dog/0123abcd")
    with pytest.raises(ValueError, match="missing"):
        artifact_key("concept", run_id="r1", subject="dog")
    with pytest.raises(ValueError, match="not applicable"):
        artifact_key("run", run_id="r1", subject="dog")
    with pytest.raises(InvalidKeyError):
        artifact_key("mask", content_hash="../../etc")
    with pytest.raises(InvalidKeyError):
        artifact_key("report", run_id="r1", name="../../../escape.html")


# --------------------------------------------------------------------------- failures up front

@pytest.fixture(params=["local", "s3"])
def unreachable_store(request: pytest.FixtureRequest, tmp_path: Path
                      ) -> tuple[ArtifactStore, str]:
    """A store whose location cannot work, and the text its errors must name."""
    if request.param == "local":
        blocker = tmp_path / "a-file"
        blocker.write_text("not a folder")
        return open_store(str(blocker / "artifacts")), str(blocker)
    request.getfixturevalue("aws_test_env")
    endpoint = f"http://127.0.0.1:{_free_port()}"
    return open_store("s3://bucket/prefix", endpoint_url=endpoint, max_attempts=1,
                      connect_timeout=1), endpoint


def test_unreachable_store_fails_fast_and_clearly(unreachable_store: tuple[ArtifactStore, str],
                                                  tmp_path: Path) -> None:
    store, location = unreachable_store
    started = time.monotonic()
    with pytest.raises(StorageUnavailableError) as excinfo:
        store.check()
    assert time.monotonic() - started < 5
    assert location in str(excinfo.value) and "check" in str(excinfo.value)
    with pytest.raises(StorageUnavailableError):
        store.put_bytes("runs/r1/a.txt", b"x")
    with pytest.raises(StorageUnavailableError), store.stage("runs/r1", "h") as stage:
        stage.put_bytes("a.txt", b"x")
    if isinstance(store, LocalStore):
        assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]  # nothing partial


@pytest.fixture
def restartable_s3(aws_test_env: dict[str, str]) -> Iterator[tuple[str, Callable[[], None],
                                                                   Callable[[], None]]]:
    """A dedicated moto server: (endpoint, stop, start)."""
    port = _free_port()
    servers = [ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)]
    servers[0].start()

    def stop() -> None:
        servers[-1].stop()

    def start() -> None:
        servers.append(ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False))
        servers[-1].start()

    yield f"http://127.0.0.1:{port}", stop, start
    stop()


def test_s3_endpoint_lost_mid_stage_leaves_no_done_stage_and_no_partial_object(
        restartable_s3: tuple[str, Callable[[], None], Callable[[], None]], tmp_path: Path,
) -> None:
    endpoint, stop, start = restartable_s3
    import boto3

    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="flaky-bucket")
    store = open_store("s3://flaky-bucket/p", endpoint_url=endpoint, max_attempts=1,
                       connect_timeout=1)
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(20 * 1024 * 1024))  # would be a multipart upload
    prefix = artifact_key("concept", run_id="r1", subject="dog", method="eqdiff")
    with pytest.raises(StorageUnavailableError, match=endpoint), \
            store.stage(prefix, "h") as stage:
        stage.put_bytes("concept.json", b"{}")
        stop()
        stage.put_file("concept.safetensors", big)
    start()
    assert not store.is_done(prefix)
    assert store.list_keys() == [f"{prefix}/concept.json"]
    uploads = boto3.client("s3", endpoint_url=endpoint).list_multipart_uploads(
        Bucket="flaky-bucket")
    assert uploads.get("Uploads", []) == []


def test_s3_missing_bucket_is_named(s3_endpoint: str) -> None:
    store = open_store("s3://no-such-bucket-here/x", endpoint_url=s3_endpoint)
    with pytest.raises(BucketNotFoundError, match="no-such-bucket-here") as excinfo:
        store.check()
    assert s3_endpoint in str(excinfo.value)


def test_s3_missing_credentials(s3_endpoint: str, s3_bucket_url: str,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(StorageAccessError, match="no usable AWS credentials"):
        open_store(s3_bucket_url, endpoint_url=s3_endpoint).check()


def test_s3_rejected_credentials_are_never_echoed(
        s3_endpoint: str, s3_bucket_url: str, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    secret = "wJalrXUtnFEMI-do-not-leak"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIADONOTLEAK")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    store = open_store(s3_bucket_url, endpoint_url=s3_endpoint)

    def moto_auth(count: str) -> None:  # moto's switch: authenticate requests after `count`
        request = urllib.request.Request(f"{s3_endpoint}/moto-api/reset-auth",
                                         data=count.encode(), method="POST",
                                         headers={"Content-Type": "text/plain"})
        urllib.request.urlopen(request).close()

    caplog.set_level(logging.DEBUG, logger="eqdiff")
    moto_auth("0")
    try:
        with pytest.raises(StorageAccessError) as excinfo:
            store.check()
    finally:
        moto_auth("inf")
    message = str(excinfo.value)
    assert "refused" in message and "check the credentials" in message
    assert excinfo.value.__cause__ is None  # the raw boto error is not chained
    for text in (message, caplog.text):
        assert secret not in text and "AKIADONOTLEAK" not in text


def test_s3_retries_only_mid_transfer_failures(s3_endpoint: str, s3_bucket_url: str) -> None:
    store = open_store(s3_bucket_url, endpoint_url=s3_endpoint, max_attempts=3)
    assert isinstance(store, S3Store)
    calls: list[str] = []

    def flaky() -> str:
        calls.append("x")
        if len(calls) < 3:
            raise ResponseStreamingError(error="connection reset")
        return "ok"

    assert store._call("reading", "k", flaky) == "ok" and len(calls) == 3

    def missing() -> None:
        calls.append("y")
        raise ClientError({"Error": {"Code": "NoSuchKey"}}, "GetObject")

    with pytest.raises(ArtifactNotFoundError):
        store._call("reading", "k", missing)
    assert calls.count("y") == 1


def test_records_hold_no_credentials(s3_endpoint: str, s3_bucket_url: str) -> None:
    store = open_store(s3_bucket_url, endpoint_url=s3_endpoint)
    store.mark_done("runs/r1", config_hash="h")
    text = json.dumps(store.get_json(f"runs/r1/{MARKER_NAME}"))
    assert "testing" not in text and s3_endpoint not in text


# --------------------------------------------------------------------------- opening

def test_open_store_dispatch(tmp_path: Path, s3_endpoint: str) -> None:
    local = open_store(tmp_path.as_uri())
    assert isinstance(local, LocalStore) and local.root == tmp_path
    assert isinstance(open_store(str(tmp_path)), LocalStore)
    s3 = store_from_config(StorageConfig(url="s3://bucket/a/b/", endpoint_url=s3_endpoint,
                                         cache_dir=str(tmp_path)))
    assert isinstance(s3, S3Store) and (s3.bucket, s3.prefix) == ("bucket", "a/b")
    assert s3.url == "s3://bucket/a/b"
    with pytest.raises(StorageConfigError, match="scheme"):
        open_store("gs://bucket")
    with pytest.raises(StorageConfigError, match="bucket"):
        open_store("s3:///prefix-only")
    with pytest.raises(InvalidKeyError):
        open_store("s3://bucket/../up")


def test_the_pipeline_keys_keep_the_documented_layout() -> None:
    """Every prefix the stages use comes from eqdiff.store.keys; the layout is the one existing
    stores hold, so a store written before keeps being read (and skipped) after."""
    from eqdiff.store import keys

    sha = "ab" * 32
    run = "runs/r1"
    assert keys.run_record("r1") == f"{run}/run.json"
    assert keys.preprocess_prefix("r1", "red toy") == f"{run}/subjects/red%20toy/preprocess"
    assert keys.masks_prefix("r1", "dog") == f"{run}/subjects/dog/masks"
    assert keys.checkpoint_key("r1", "dog", "eqdiff", "0123abcd") == (
        f"{run}/checkpoints/dog/eqdiff/0123abcd/last.pt")
    assert keys.checkpoints_prefix("r1", "dog", "eqdiff") == f"{run}/checkpoints/dog/eqdiff"
    assert keys.concept_prefix("r1", "dog", "eqdiff") == f"{run}/concepts/dog/eqdiff"
    assert keys.samples_prefix("r1", "dog", "eqdiff") == f"{run}/samples/dog/eqdiff"
    assert keys.scores_key("r1", "dog", "eqdiff") == f"{run}/scores/dog/eqdiff/scores.parquet"
    assert keys.scores_root("r1") == f"{run}/scores"
    assert keys.report_prefix("r1") == f"{run}/report"
    assert keys.prior_prefix("dog", "0123abcd") == "cache/priors/dog/0123abcd"
    assert keys.mask_cache_key(sha, "grounded-sam", "0123abcd") == (
        f"cache/masks/{sha}/grounded-sam-0123abcd.png")
    assert keys.features_key("0123456789abcdef", sha) == (
        f"cache/features/0123456789abcdef/{sha}.safetensors")
    with pytest.raises(InvalidKeyError):
        keys.concept_prefix("r1", "../etc", "eqdiff")


def test_s3_locations_carry_no_credentials_and_links_expire_within_an_hour(s3_bucket_url,
                                                                            s3_endpoint):
    store = open_store(s3_bucket_url, endpoint_url=s3_endpoint)
    key = "runs/r1/report/report.html"
    assert store.location(key) == f"{s3_bucket_url}/{key}"
    link = store.url_for(key)
    assert "X-Amz-Expires=3600" in link  # a presigned link only when asked, for one hour
