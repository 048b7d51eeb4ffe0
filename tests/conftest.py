"""Shared fixtures.

S3: tests talk HTTP to moto's server mode on 127.0.0.1 — a real S3 endpoint that other
processes (Ray workers, subprocesses) can reach too — with fake credentials that never touch AWS.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from processes import refresh_prefect_settings

FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",  # no instance-metadata probing for credentials
}


@pytest.fixture(scope="session")
def aws_test_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Fake AWS credentials for the session, isolated from the developer's ~/.aws and AWS_*."""
    nowhere = str(tmp_path_factory.mktemp("aws") / "absent")
    with pytest.MonkeyPatch.context() as mp:
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL",
                     "AWS_ENDPOINT_URL_S3"):
            mp.delenv(name, raising=False)
        mp.setenv("AWS_CONFIG_FILE", nowhere)
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", nowhere)
        for name, value in FAKE_AWS_ENV.items():
            mp.setenv(name, value)
        yield dict(FAKE_AWS_ENV)


@pytest.fixture(scope="session")
def s3_endpoint(aws_test_env: dict[str, str]) -> Iterator[str]:
    """``http://127.0.0.1:PORT`` of a moto S3 server started once for the session."""
    from moto.server import ThreadedMotoServer  # imported here: only S3 tests pay for it

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture(scope="session")
def s3_client(s3_endpoint: str):
    """A plain boto3 S3 client on the test endpoint, for setting up and inspecting buckets."""
    import boto3

    return boto3.client("s3", endpoint_url=s3_endpoint)


@pytest.fixture
def s3_bucket_url(s3_client) -> str:
    """``s3://NAME`` of a fresh, empty bucket on the test endpoint."""
    name = f"test-{uuid.uuid4().hex[:16]}"
    s3_client.create_bucket(Bucket=name)
    return f"s3://{name}"


# --------------------------------------------------------------------------- models


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The offline tiny models (SD, CLIP, DINO), built once per session, as folders."""
    from eqdiff.fixtures.zoo import build_zoo

    return build_zoo(tmp_path_factory.mktemp("zoo"))


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
               ) -> list:
    """Every network connection of this process refused and recorded in the returned list, an
    empty Hugging Face cache, and ``HF_HUB_OFFLINE`` off: a model load that tries to download
    leaves an entry, whatever it does with the error.

    huggingface_hub looks up a list of AI-agent harnesses once a day for its user-agent header
    (not a download, and skipped only by ``HF_HUB_OFFLINE``); it is answered empty here."""
    import socket

    import huggingface_hub.constants as hub

    attempts: list = []

    def refuse(*address: object, **_: object) -> None:
        attempts.append(address[:2])
        raise OSError("network access refused by the test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", lambda self, address: refuse(address))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path_factory.mktemp("hf-cache")))
    monkeypatch.setattr("huggingface_hub.utils._detect_agent._registry",
                        {"standardEnvVars": [], "harnesses": {}})
    return attempts


# --------------------------------------------------------------------------- services


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Prefect server (SQLite) on a free port for the session; yields its API URL.

    ``PREFECT_API_URL`` and ``PREFECT_HOME`` point at it for this process and its children
    (Ray workers included), so flows, tasks and deployments all talk to it.
    """
    from flows.server import ensure_server, stop_server

    home = tmp_path_factory.mktemp("prefect-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("PREFECT_API_URL", raising=False)
        mp.setenv("PREFECT_HOME", str(home))
        mp.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        mp.setenv("PREFECT_LOGGING_TO_API_BATCH_INTERVAL", "0.3")
        server = ensure_server(port=_free_port(), home=home)
        mp.setenv("PREFECT_API_URL", server.api_url)
        refresh_prefect_settings()
        try:
            yield server.api_url
        finally:
            stop_server(home)
            mp.undo()
            refresh_prefect_settings()


@pytest.fixture(scope="session")
def ray_local(prefect_server: str, aws_test_env: dict[str, str]) -> Iterator[None]:
    """A local Ray instance (2 CPUs, no dashboard, no token auth) for the session.

    Started after the Prefect server and the fake AWS credentials exist, so its workers
    inherit both (as workers on a real cluster have their own).
    """
    import ray

    from flows.compute import ray_init_kwargs

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_AUTH_MODE", "disabled")
        mp.setenv("EQDIFF_RAY_NUM_CPUS", "2")
        if not ray.is_initialized():
            ray.init(**ray_init_kwargs(""))
        try:
            yield
        finally:
            ray.shutdown()


@pytest.fixture(scope="session")
def tiny_sd(tiny_zoo: dict) -> str:
    """The tiny offline SD pipeline folder (seed 0), shared by the whole session."""
    return str(tiny_zoo["base"])
