"""Shared fixtures.

S3: tests talk HTTP to moto's server mode on 127.0.0.1 — a real S3 endpoint that other
processes (Ray workers, subprocesses) can reach too — with fake credentials that never touch AWS.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

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
