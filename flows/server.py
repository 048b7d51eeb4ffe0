"""A local Prefect server on 127.0.0.1 (SQLite), started when none is running.

The demo and the tests use it; at scale ``PREFECT_API_URL`` points at a real server (on
Postgres) and nothing is started here. The server runs detached, with its log and pid file in
its Prefect home, so ``eqdiff server stop`` can end it later.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_PORT = 4200
DEFAULT_HOME = Path.home() / ".eqdiff" / "prefect"
STARTUP_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class LocalServer:
    api_url: str
    home: Path
    pid: int | None  # None when the server was already running (not ours)

    @property
    def ui_url(self) -> str:
        return self.api_url.removesuffix("/api")


def healthy(api_url: str, timeout: float = 2.0) -> bool:
    """True when ``{api_url}/health`` answers."""
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=timeout) as response:
            return response.status == 200 and json.loads(response.read() or b"true") is True
    except (urllib.error.URLError, OSError, ValueError):
        return False


def server_env(home: Path, port: int) -> dict[str, str]:
    """The server's environment; its UI is told its own API address (by default it points
    at port 4200, whatever port the server listens on)."""
    api_url = f"http://127.0.0.1:{port}/api"
    return {**os.environ, "PREFECT_HOME": str(home), "PREFECT_UI_API_URL": api_url,
            "PREFECT_SERVER_UI_API_URL": api_url,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
            "PREFECT_UI_ENABLED": "true"}


def ensure_server(port: int = DEFAULT_PORT, home: Path = DEFAULT_HOME,
                  *, timeout: float = STARTUP_TIMEOUT_S) -> LocalServer:
    """Use the server at ``PREFECT_API_URL`` or on ``port``; start one if none answers.

    Sets ``PREFECT_API_URL`` in this process so flows and workers use it.
    """
    configured = os.environ.get("PREFECT_API_URL", "")
    if configured and healthy(configured):
        return LocalServer(configured, home, None)
    if configured and not configured.startswith(("http://127.0.0.1", "http://localhost")):
        raise RuntimeError(f"PREFECT_API_URL={configured} does not answer; start that server "
                           "or unset PREFECT_API_URL to use a local one")
    api_url = f"http://127.0.0.1:{port}/api"
    if healthy(api_url):
        os.environ["PREFECT_API_URL"] = api_url
        return LocalServer(api_url, home, None)
    home.mkdir(parents=True, exist_ok=True)
    log = (home / "server.log").open("ab")
    process = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
         "--port", str(port)],
        env=server_env(home, port), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    (home / "server.pid").write_text(str(process.pid))
    logger.info("starting a Prefect server on %s (log: %s)", api_url, home / "server.log")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if healthy(api_url):
            os.environ["PREFECT_API_URL"] = api_url
            logger.info("Prefect server ready: UI at %s", api_url.removesuffix("/api"))
            return LocalServer(api_url, home, process.pid)
        if process.poll() is not None:
            raise RuntimeError(f"the Prefect server exited with code {process.returncode}; "
                               f"see {home / 'server.log'}")
        time.sleep(1.0)
    process.terminate()
    raise RuntimeError(f"the Prefect server did not answer on {api_url} within {timeout:.0f} s; "
                       f"see {home / 'server.log'}")


def stop_server(home: Path = DEFAULT_HOME) -> bool:
    """Stop a server this module started (found by its pid file). True if one was stopped."""
    pid_file = home / "server.pid"
    if not pid_file.is_file():
        return False
    pid = int(pid_file.read_text())
    pid_file.unlink()
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    return True
