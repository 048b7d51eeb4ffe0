"""A Prefect server started when none is running: local by default, or shared.

The demo and the tests use one on 127.0.0.1 with SQLite. For a team or a cluster, bind all
interfaces (``host="0.0.0.0"``) and keep its state in Postgres (``database_url``): the server
then advertises an API URL other machines can reach (``advertise_url``, or this machine's
primary IPv4 address), tells its UI that URL, and it is the ``PREFECT_API_URL`` workers use.
The database password is passed to the server in its environment and never logged. The server
runs detached, with its log and pid file in its Prefect home, so ``eqdiff server stop`` can end
it later.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_PORT = 4200
DEFAULT_HOME = Path.home() / ".eqdiff" / "prefect"
STARTUP_TIMEOUT_S = 120.0
# a server bound to all interfaces is probed on loopback
_LOOPBACK_OF = {"0.0.0.0": "127.0.0.1", "::": "[::1]"}


@dataclass(frozen=True)
class LocalServer:
    api_url: str  # the advertised URL: what flows and workers set as PREFECT_API_URL
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


def mask_password(url: str) -> str:
    """``url`` with its password, if any, replaced by ``***`` (safe to log)."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    userinfo, _, hostinfo = parts.netloc.rpartition("@")
    user = userinfo.partition(":")[0]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:***@{hostinfo}"))


def primary_ipv4() -> str | None:
    """This machine's IPv4 address on its default route, or None if it has none but loopback.

    Connecting a UDP socket only picks the route and source address; no packet is sent.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("10.255.255.255", 9))
            address = probe.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") or address == "0.0.0.0" else address


def local_api_url(host: str, port: int) -> str:
    """Where this machine reaches a server bound to ``host``: loopback for all interfaces."""
    address = _LOOPBACK_OF.get(host, f"[{host}]" if ":" in host else host)
    return f"http://{address}:{port}/api"


def advertised_api_url(host: str, port: int, advertise_url: str | None = None) -> str:
    """The API URL to hand to workers and the UI.

    ``advertise_url`` if given (``/api`` is appended when missing); else, for a server bound to
    all interfaces, this machine's primary IPv4 address (pass ``advertise_url`` to use a DNS
    name instead); else the bound address itself.
    """
    if advertise_url:
        url = advertise_url.rstrip("/")
        return url if url.endswith("/api") else f"{url}/api"
    if host not in _LOOPBACK_OF:
        return local_api_url(host, port)
    address = primary_ipv4()
    if address is None:
        logger.warning("this machine has no non-loopback IPv4 address: advertising 127.0.0.1, "
                       "which other machines cannot reach; pass advertise_url")
        address = "127.0.0.1"
    return f"http://{address}:{port}/api"


def server_env(home: Path, port: int, *, api_url: str | None = None,
               database_url: str | None = None) -> dict[str, str]:
    """The server's environment.

    Its UI is told the API address browsers should call, ``api_url`` (default: loopback on
    ``port``; unset, Prefect would point it at port 4200 whatever port the server listens on).
    ``database_url`` (e.g. ``postgresql+asyncpg://user:pw@host:5432/prefect``) replaces the
    SQLite file in ``home``; both of Prefect's names for it are set, so a value already in the
    environment under the newer name cannot win over it.
    """
    api_url = api_url or f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_UI_API_URL": api_url,
           "PREFECT_SERVER_UI_API_URL": api_url,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
           "PREFECT_UI_ENABLED": "true"}
    if database_url:
        env["PREFECT_API_DATABASE_CONNECTION_URL"] = database_url
        env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = database_url
    return env


def ensure_server(port: int = DEFAULT_PORT, home: Path = DEFAULT_HOME,
                  *, host: str = "127.0.0.1", advertise_url: str | None = None,
                  database_url: str | None = None,
                  timeout: float = STARTUP_TIMEOUT_S) -> LocalServer:
    """Use the server at ``PREFECT_API_URL`` or on ``port``; start one if none answers.

    The server binds ``host`` (``0.0.0.0``: all interfaces, for other machines) and advertises
    :func:`advertised_api_url`; ``database_url`` stores its state in that database instead of
    SQLite in ``home`` (its password is masked in every log line). Sets ``PREFECT_API_URL`` in
    this process to the advertised URL so flows and workers use it.
    """
    configured = os.environ.get("PREFECT_API_URL", "")
    if configured and healthy(configured):
        return LocalServer(configured, home, None)
    if configured and not configured.startswith(("http://127.0.0.1", "http://localhost")):
        raise RuntimeError(f"PREFECT_API_URL={configured} does not answer; start that server "
                           "or unset PREFECT_API_URL to use a local one")
    probe_url = local_api_url(host, port)
    api_url = advertised_api_url(host, port, advertise_url)
    if healthy(probe_url):
        if api_url != probe_url and not healthy(api_url):
            raise RuntimeError(f"a Prefect server already answers on {probe_url} but not on "
                               f"{api_url}: it may be bound to 127.0.0.1 only; stop it (eqdiff "
                               f"server stop) and start it again with host {host}")
        os.environ["PREFECT_API_URL"] = api_url
        return LocalServer(api_url, home, None)
    home.mkdir(parents=True, exist_ok=True)
    log = (home / "server.log").open("ab")
    process = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", host,
         "--port", str(port)],
        env=server_env(home, port, api_url=api_url, database_url=database_url), stdout=log,
        stderr=subprocess.STDOUT, start_new_session=True)
    (home / "server.pid").write_text(str(process.pid))
    logger.info("starting a Prefect server on %s port %d, advertised as %s, database %s "
                "(log: %s)", host, port, api_url,
                mask_password(database_url) if database_url else f"SQLite in {home}",
                home / "server.log")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if healthy(probe_url):
            if api_url != probe_url and not healthy(api_url):
                logger.warning("the server answers on %s but not on its advertised URL %s from "
                               "this machine; check advertise_url and the firewall", probe_url,
                               api_url)
            os.environ["PREFECT_API_URL"] = api_url
            logger.info("Prefect server ready: UI at %s; workers use PREFECT_API_URL=%s",
                        api_url.removesuffix("/api"), api_url)
            return LocalServer(api_url, home, process.pid)
        if process.poll() is not None:
            raise RuntimeError(f"the Prefect server exited with code {process.returncode}; "
                               f"see {home / 'server.log'}")
        time.sleep(1.0)
    process.terminate()
    raise RuntimeError(f"the Prefect server did not answer on {probe_url} within {timeout:.0f} s; "
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
