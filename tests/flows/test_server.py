"""A Prefect server other machines can reach, and a database password that never reaches a log."""

from __future__ import annotations

import json
import logging
import socket
import time
import urllib.request
from pathlib import Path

import pytest

from flows import server as server_module
from flows.server import (
    advertised_api_url,
    ensure_server,
    healthy,
    mask_password,
    stop_server,
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("0.0.0.0", 0))
        return sock.getsockname()[1]


def _non_loopback_ipv4() -> str | None:
    """An IPv4 address of this machine other than 127.x, from its interfaces' routing."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: picks a route, sends nothing
        except OSError:
            return None
        address = probe.getsockname()[0]
    return None if address.startswith("127.") or address == "0.0.0.0" else address


@pytest.fixture
def prefect_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh Prefect home and no PREFECT_API_URL (restored afterwards)."""
    home = tmp_path / "prefect-home"
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setenv("PREFECT_HOME", str(home))
    return home


@pytest.mark.operations
def test_a_server_on_all_interfaces_answers_on_the_network_address(prefect_env: Path) -> None:
    address = _non_loopback_ipv4()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address to reach the server on")
    port = _free_port()
    network_url = f"http://{address}:{port}/api"
    try:
        server = ensure_server(port=port, home=prefect_env, host="0.0.0.0")
        assert server.api_url == network_url
        assert healthy(network_url)
        ui_url = f"{server.ui_url}/ui-settings"
        with urllib.request.urlopen(ui_url, timeout=10) as response:  # what the UI calls
            assert json.loads(response.read())["api_url"] == network_url
    finally:
        stopped = stop_server(prefect_env)
    assert stopped
    deadline = time.monotonic() + 30
    while healthy(network_url) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not healthy(network_url)


def test_the_database_password_never_reaches_the_logs(
        prefect_env: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    secret = "s3cr%40t-pw"
    database_url = f"postgresql+asyncpg://prefect:{secret}@db.internal:5432/prefect"
    started: dict = {}

    class ExitedServer:  # a server process that fails at once (e.g. the database is down)
        pid = 4242
        returncode = 3

        def __init__(self, args: list[str], *, env: dict[str, str], **_: object) -> None:
            started.update(args=args, env=env)

        def poll(self) -> int:
            return self.returncode

    monkeypatch.setattr(server_module.subprocess, "Popen", ExitedServer)
    with caplog.at_level(logging.DEBUG), pytest.raises(RuntimeError) as failed:
        ensure_server(port=_free_port(), home=prefect_env, host="0.0.0.0",
                      advertise_url="http://head-node:4200", database_url=database_url)
    assert started["env"]["PREFECT_API_DATABASE_CONNECTION_URL"] == database_url
    assert started["env"]["PREFECT_UI_API_URL"] == "http://head-node:4200/api"
    assert started["args"][-4:-2] == ["--host", "0.0.0.0"]
    assert "prefect:***@db.internal:5432" in caplog.text
    assert secret not in caplog.text
    assert "s3cr" not in caplog.text + str(failed.value)


def test_masking_and_advertised_urls() -> None:
    assert mask_password("postgresql+asyncpg://u:p%40ss@h:5432/db") == \
        "postgresql+asyncpg://u:***@h:5432/db"
    assert mask_password("postgresql+asyncpg://u@h/db") == "postgresql+asyncpg://u@h/db"
    assert mask_password("sqlite+aiosqlite:////tmp/prefect.db") == \
        "sqlite+aiosqlite:////tmp/prefect.db"
    assert advertised_api_url("0.0.0.0", 4200, "http://head:4200/") == "http://head:4200/api"
    assert advertised_api_url("127.0.0.1", 4300) == "http://127.0.0.1:4300/api"
    assert advertised_api_url("10.1.2.3", 4300) == "http://10.1.2.3:4300/api"
