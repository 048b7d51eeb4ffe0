"""Services for the cluster tests, all on this one machine: a throwaway PostgreSQL, a moto S3
server in its own process, and a Ray cluster of several nodes started with the ``ray start``
command line, as an operator would start one.

Every node is a separate ``ray start --block`` process with its own raylet, object store and
workers. A node can be given *hidden* folders: it then runs in its own mount namespace with an
empty tmpfs over each of them, so its tasks cannot read what the driver wrote there (the data
set, the driver's working folder) and must get it some other way (S3), as on a real cluster.

All nodes of one cluster share one temporary root (``--temp-dir`` of the head; the other nodes
take the head's from the GCS) and so one session folder; Ray names the sockets of each raylet
apart. Ray registers every node under this machine's outward IP address even when told
127.0.0.1 (it replaces loopback addresses); the GCS listens on all interfaces, so
``127.0.0.1:PORT`` reaches it all the same. Every port is chosen here (the defaults, such as
52365 for the dashboard agent or 10001 for the client server, would collide between nodes or
with another Ray on the machine), and workers bind random ports. Each ``ray start`` runs in a
session of its own, so everything it leaves behind, Ray's workers included (whose command
lines read ``ray::IDLE``), can be found by session id and killed at teardown without touching
any other Ray on the machine (``ray stop`` would end them all).

Nothing here needs pytest; ``conftest.py`` wraps it in fixtures.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import psutil

logger = logging.getLogger(__name__)

VENV_BIN = Path(sys.executable).parent
RAY = str(VENV_BIN / "ray")
PG_BIN_GLOB = "/usr/lib/postgresql/*/bin"
INSTALL_HINT = "run `make test-operations`, which installs PostgreSQL (Debian package `postgresql`)"
OBJECT_STORE_BYTES = 200 * 1024 * 1024  # per node; Ray's floor is 75 MiB
HIDDEN_TMPFS_SIZE = "1g"  # the most a node may write into a hidden folder (RAM, on demand)
RAY_NODE_ENV = {
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
}
# The GCS's health checks of raylets: by default every 3 s, dead after 5 misses (a node whose
# raylet died is reported dead ~15 s later); here every 1 s, dead after 3 misses (~3 s). A
# killed raylet refuses connections at once, so the 10 s timeout of a check does not apply.
FAST_FAILURE_DETECTION_ENV = {
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
}


class ServiceMissing(RuntimeError):
    """A program the cluster tests need is not installed."""


class StartupFailed(RuntimeError):
    """A service did not come up; the message names its log."""


# --------------------------------------------------------------------------- helpers


def free_port() -> int:
    """A TCP port nobody listens on right now (there is a race, as always with this trick)."""
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """``count`` distinct free TCP ports (all held open together while they are picked)."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket())
            sock.bind(("127.0.0.1", 0))
            ports.append(sock.getsockname()[1])
        return ports


def wait_for(predicate: Callable[[], object], timeout: float, what: str,
              interval: float = 0.25, log: Path | None = None) -> object:
    """Poll ``predicate`` until it returns something truthy; raise ``StartupFailed`` naming
    ``what`` (and the tail of ``log``) when ``timeout`` seconds pass first."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise StartupFailed(f"{what} within {timeout:.0f} s{log_tail(log)}")
        time.sleep(interval)


def log_tail(log: Path | None, lines: int = 30) -> str:
    if log is None or not log.is_file():
        return ""
    text = log.read_text(errors="replace").splitlines()[-lines:]
    return f"; last lines of {log}:\n" + "\n".join(text)


def http_status(url: str, timeout: float = 2.0) -> int | None:
    """The HTTP status ``url`` answers with, or None when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except (urllib.error.URLError, OSError):
        return None


@dataclass(frozen=True)
class Session:
    """A process started as the leader of a new session (``start_new_session``), with its
    start time. Its pid may be reused once it has exited, but not while any process of its
    session lives (the kernel keeps the id allocated), so a live process with that pid and
    another start time means the session is over and the id belongs to someone else."""

    pid: int
    started: float | None

    @classmethod
    def of(cls, process: subprocess.Popen) -> Session:
        try:
            return cls(process.pid, psutil.Process(process.pid).create_time())
        except psutil.Error:
            return cls(process.pid, None)

    def still_ours(self) -> bool:
        try:
            return psutil.Process(self.pid).create_time() == self.started
        except psutil.Error:
            return True  # the leader is gone; its session id is not reused while members live


def session_members(sessions: Iterable[Session]) -> list[psutil.Process]:
    """Live processes (zombies left out) of ``sessions``."""
    wanted = {session.pid for session in sessions if session.still_ours()}
    found = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            if proc.status() != psutil.STATUS_ZOMBIE and os.getsid(proc.pid) in wanted:
                found.append(proc)
    return found


def processes_mentioning(text: str) -> list[psutil.Process]:
    """Live processes whose command line contains ``text``."""
    found = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if proc.status() != psutil.STATUS_ZOMBIE and text in " ".join(proc.cmdline()):
                found.append(proc)
    return found


def kill_all(processes: list[psutil.Process], timeout: float = 10.0) -> None:
    """SIGKILL ``processes`` and wait for them (reaping those that are our children)."""
    for proc in processes:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(processes, timeout=timeout)


def stop_process(process: subprocess.Popen, session: Session, timeout: float = 30.0, *,
                 signalled: bool = False) -> None:
    """SIGTERM ``process``, the leader of ``session`` (not again when ``signalled``), SIGKILL
    it after ``timeout``, then SIGKILL whatever is left in its session."""
    if process.poll() is None:
        if not signalled:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            logger.warning("pid %d ignored SIGTERM for %.0f s; killing it", process.pid, timeout)
            process.kill()
            process.wait(timeout=10)
    kill_all(session_members([session]))


# --------------------------------------------------------------------------- PostgreSQL


def postgres_bin() -> Path:
    """The newest installed PostgreSQL server's bin folder; ``ServiceMissing`` if none."""
    candidates = sorted(Path("/").glob(PG_BIN_GLOB.lstrip("/")),
                        key=lambda path: int(path.parent.name) if path.parent.name.isdigit()
                        else 0)
    candidates = [path for path in candidates if (path / "initdb").is_file()]
    if not candidates:
        raise ServiceMissing(f"no PostgreSQL server in {PG_BIN_GLOB}: {INSTALL_HINT}")
    return candidates[-1]


@dataclass
class Postgres:
    """A PostgreSQL cluster in a temporary folder, listening on ``127.0.0.1:port`` with
    password authentication for ``user``; its unix socket sits in ``root``."""

    bin_dir: Path
    root: Path
    port: int
    user: str
    password: str
    database: str
    host: str = "127.0.0.1"

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def log(self) -> Path:
        return self.root / "postgres.log"

    @property
    def async_url(self) -> str:
        """SQLAlchemy URL with asyncpg, the form Prefect's settings take."""
        return (f"postgresql+asyncpg://{self.user}:{self.password}@{self.host}:{self.port}/"
                f"{self.database}")

    def psql(self, sql: str, database: str | None = None) -> str:
        """Run ``sql`` with psql over TCP and the password; unaligned, tuples-only output."""
        result = subprocess.run(
            [str(self.bin_dir / "psql"), "-h", self.host, "-p", str(self.port), "-U", self.user,
             "-d", database or self.database, "-v", "ON_ERROR_STOP=1", "-At", "-c", sql],
            env={**os.environ, "PGPASSWORD": self.password, "PGCONNECT_TIMEOUT": "10"},
            capture_output=True, text=True, timeout=60, check=False)
        if result.returncode:
            raise RuntimeError(f"psql failed ({result.returncode}): {result.stderr.strip()}")
        return result.stdout.strip()

    def stop(self) -> None:
        """Stop the server (fast shutdown: open sessions are ended) and delete its folder."""
        if (self.data_dir / "postmaster.pid").is_file():
            result = _as_postgres([str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir),
                                   "-m", "fast", "-w", "-t", "60", "stop"], check=False)
            if result.returncode:
                logger.warning("pg_ctl stop failed: %s", result.stderr.strip())
                kill_all(processes_mentioning(str(self.data_dir)))
        shutil.rmtree(self.root, ignore_errors=True)


def _as_postgres(command: list[str], check: bool = True) -> subprocess.CompletedProcess:
    """Run ``command`` as the ``postgres`` OS user (initdb and the server refuse root)."""
    run_as = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    result = subprocess.run([*run_as, *command], capture_output=True, text=True, timeout=120,
                            check=False, cwd="/")
    if check and result.returncode:
        raise StartupFailed(f"{' '.join(command)} failed ({result.returncode}): "
                            f"{(result.stderr or result.stdout).strip()}")
    return result


def start_postgres(database: str = "prefect", user: str = "eqdiff",
                   port: int | None = None) -> Postgres:
    """Create and start a throwaway PostgreSQL cluster with ``database`` in it.

    The folder is a fresh one under /tmp (a short path: the socket name must fit in 107
    bytes, and ``postgres`` must be able to reach it, which pytest's 0700 tmp root forbids).
    Durability is switched off: the data lives for one test session.
    """
    bin_dir = postgres_bin()
    if os.geteuid() == 0 and not shutil.which("runuser"):
        raise ServiceMissing("running as root needs `runuser` to start PostgreSQL as postgres")
    root = Path(tempfile.mkdtemp(prefix="eqdiff-pg-", dir="/tmp"))
    pg = Postgres(bin_dir, root, port or free_port(), user, secrets.token_hex(12), database)
    try:
        password_file = root / "password"
        password_file.write_text(pg.password + "\n")
        if os.geteuid() == 0:
            shutil.chown(root, "postgres", "postgres")
            shutil.chown(password_file, "postgres", "postgres")
        password_file.chmod(0o600)
        _as_postgres([str(bin_dir / "initdb"), "-D", str(pg.data_dir), "-U", user,
                      f"--pwfile={password_file}", "--auth-host=scram-sha-256",
                      "--auth-local=trust", "-E", "UTF8", "--locale=C", "--no-sync"])
        password_file.unlink()
        options = (f"-c listen_addresses={pg.host} -p {pg.port} -k {root} -c fsync=off "
                   "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
        _as_postgres([str(bin_dir / "pg_ctl"), "-D", str(pg.data_dir), "-l", str(pg.log),
                      "-o", options, "-w", "-t", "60", "start"])
        pg.psql(f'CREATE DATABASE "{database}"', database="postgres")
    except Exception as error:
        detail = log_tail(pg.log)
        pg.stop()
        if detail and isinstance(error, StartupFailed):
            raise StartupFailed(f"{error}{detail}") from error
        raise
    logger.info("PostgreSQL %s on %s:%d (%s)", bin_dir.parent.name, pg.host, pg.port, root)
    return pg


# --------------------------------------------------------------------------- moto (S3)


@dataclass
class MotoServer:
    """moto's S3 server in a process of its own, reachable over HTTP at ``endpoint`` by any
    process on the machine."""

    process: subprocess.Popen
    session: Session
    endpoint: str
    log: Path

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint)

    def create_bucket(self, name: str | None = None) -> str:
        """Create a bucket (a fresh random name by default) and return its name."""
        name = name or f"test-{secrets.token_hex(8)}"
        self.client().create_bucket(Bucket=name)
        return name

    def stop(self) -> None:
        stop_process(self.process, self.session, timeout=15)


def start_moto(log: Path, env: Mapping[str, str] | None = None,
               timeout: float = 60.0) -> MotoServer:
    """Start ``python -m moto.server`` on a free port of 127.0.0.1 and wait until it answers."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    with log.open("ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            env={**os.environ, **(env or {})}, stdout=out, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True)
    server = MotoServer(process, Session.of(process), endpoint, log)

    def up() -> bool:
        if process.poll() is not None:
            raise StartupFailed(f"moto exited with code {process.returncode}{log_tail(log)}")
        return http_status(f"{endpoint}/moto-api/") is not None

    try:
        wait_for(up, timeout, f"moto did not answer on {endpoint}", log=log)
    except Exception:
        server.stop()
        raise
    logger.info("moto S3 server on %s (pid %d)", endpoint, process.pid)
    return server


# --------------------------------------------------------------------------- Ray


@dataclass(frozen=True)
class NodeSpec:
    """One node to start: its name (ours, not Ray's), CPUs, custom resources, and the
    folders hidden from its processes (each covered by an empty tmpfs)."""

    name: str
    num_cpus: int = 1
    resources: Mapping[str, float] = field(default_factory=dict)
    hidden: tuple[Path, ...] = ()


@dataclass
class RayNode:
    """A started node. ``node_id`` (hex) and ``raylet_pid`` change when it is restarted."""

    spec: NodeSpec
    process: subprocess.Popen  # the `ray start --block` process, leader of its own session
    session: Session
    node_manager_port: int
    log: Path
    node_id: str = ""
    raylet_pid: int = 0

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def resources(self) -> dict[str, float]:
        return {"CPU": float(self.spec.num_cpus), **self.spec.resources}

    @property
    def pid(self) -> int:
        return self.process.pid

    def describe(self) -> dict:
        return {"name": self.name, "node_id": self.node_id, "raylet_pid": self.raylet_pid,
                "resources": self.resources, "hidden": [str(p) for p in self.spec.hidden]}


class RayCluster:
    """A Ray cluster of ``ray start`` nodes on this machine; see :func:`start_ray_cluster`."""

    def __init__(self, temp_dir: Path, env: dict[str, str], *,
                 object_store_bytes: int = OBJECT_STORE_BYTES) -> None:
        self.temp_dir = temp_dir
        self.env = env
        self.object_store_bytes = object_store_bytes
        self.port = 0
        self.nodes: dict[str, RayNode] = {}
        self._sessions: list[Session] = []  # every `ray start` ever started, for the sweep

    @property
    def address(self) -> str:
        """``127.0.0.1:PORT`` of the GCS, for ``ray.init(address=...)`` and ``RAY_ADDRESS``."""
        return f"127.0.0.1:{self.port}"

    @property
    def head(self) -> RayNode:
        return next(iter(self.nodes.values()))

    def node(self, name: str) -> RayNode:
        return self.nodes[name]

    def describe(self) -> list[dict]:
        return [node.describe() for node in self.nodes.values()]

    # ------------------------------------------------------------- starting

    def _command(self, spec: NodeSpec, head: bool, node_manager_port: int,
                 ports: Iterator[int]) -> list[str]:
        command = [RAY, "start", "--block", "--node-name", spec.name,
                   "--num-cpus", str(spec.num_cpus), "--num-gpus", "0",
                   "--resources", json.dumps(dict(spec.resources)),
                   "--object-store-memory", str(self.object_store_bytes),
                   "--node-manager-port", str(node_manager_port),
                   "--object-manager-port", str(next(ports)),
                   "--metrics-export-port", str(next(ports)),
                   "--dashboard-agent-listen-port", str(next(ports)),
                   "--dashboard-agent-grpc-port", str(next(ports)),
                   "--runtime-env-agent-port", str(next(ports)),
                   "--min-worker-port", "0", "--max-worker-port", "0",
                   "--disable-usage-stats", "--log-style", "record", "--log-color", "false"]
        if head:
            command += ["--head", "--port", str(self.port), "--temp-dir", str(self.temp_dir),
                        "--include-dashboard=false", "--dashboard-port", str(next(ports)),
                        "--ray-client-server-port", str(next(ports))]
        else:
            command += ["--address", self.address]
        if not spec.hidden:
            return command
        # A mount namespace of its own, with a tmpfs over each hidden folder; `exec` keeps the
        # pid, so `ray start` and all it starts (raylet, workers) stay in that namespace.
        mount = f"mount -t tmpfs -o size={HIDDEN_TMPFS_SIZE},mode=0755 eqdiff-hidden"
        mounts = " && ".join(f"{mount} {shlex.quote(str(path))}" for path in spec.hidden)
        script = f"{mounts} && exec {shlex.join(command)}"
        return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script]

    def start_node(self, spec: NodeSpec, *, head: bool = False,
                   timeout: float = 120.0) -> RayNode:
        """Start ``spec`` as a node (the head when ``head``) and wait until the GCS lists it
        alive. Replaces an earlier node of that name (see :meth:`restart_node`)."""
        for path in spec.hidden:
            if not path.is_dir():
                raise ValueError(f"hidden folder {path} must exist before its node starts")
        gcs_port, node_manager_port, *others = free_ports(9)
        if head:
            self.port = gcs_port
        log = self.temp_dir.parent / f"{spec.name}-{len(self._sessions)}.log"
        with log.open("ab") as out:
            process = subprocess.Popen(self._command(spec, head, node_manager_port,
                                                     iter(others)),
                                       env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, start_new_session=True)
        node = RayNode(spec, process, Session.of(process), node_manager_port, log)
        self._sessions.append(node.session)
        self.nodes[spec.name] = node

        def registered() -> dict | None:
            if process.poll() is not None:
                raise StartupFailed(f"`ray start` of node {spec.name} exited with code "
                                    f"{process.returncode}{log_tail(log)}")
            if not self.port or port_closed(self.port):
                return None
            return self.node_table().get(node_manager_port)

        info = wait_for(registered, timeout, f"node {spec.name} did not join the cluster",
                        interval=0.5, log=log)
        node.node_id = info["node_id"]
        node.raylet_pid = wait_for(lambda: self._find_raylet(node), 30,
                                   f"no raylet process of node {spec.name}", log=log)
        logger.info("Ray node %s up: id %s, raylet pid %d, resources %s", spec.name,
                    node.node_id[:12], node.raylet_pid, node.resources)
        return node

    def _find_raylet(self, node: RayNode) -> int:
        """The pid of the raylet under ``node``'s ``ray start`` with its node-manager port."""
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(node.pid).children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    cmdline = child.cmdline()
                    if (cmdline and Path(cmdline[0]).name == "raylet"
                            and f"--node_manager_port={node.node_manager_port}" in cmdline):
                        return child.pid
        return 0

    def restart_node(self, name: str, timeout: float = 120.0) -> RayNode:
        """Start a fresh node with the spec of node ``name`` (e.g. after :meth:`kill_raylet`);
        Ray sees a new node (new id) with the same resources."""
        old = self.nodes[name]
        stop_process(old.process, old.session, timeout=15)
        return self.start_node(old.spec, timeout=timeout)

    # ------------------------------------------------------------- looking

    def node_table(self) -> dict[int, dict]:
        """The GCS's node table, alive and dead nodes, keyed by node-manager port."""
        from ray._raylet import GcsClient

        table = {}
        client = GcsClient(address=self.address)
        for node_id, info in client.get_all_node_info(timeout=10).items():
            table[info.node_manager_port] = {
                "node_id": node_id.hex(), "alive": info.state == 0, "name": info.node_name,
                "address": info.node_manager_address,
                "resources": dict(info.resources_total),
            }
        return table

    def alive(self, name: str) -> bool:
        """Whether the GCS holds node ``name`` (its current id) alive."""
        node = self.nodes[name]
        entry = self.node_table().get(node.node_manager_port)
        return bool(entry and entry["alive"] and entry["node_id"] == node.node_id)

    def kill_raylet(self, name: str) -> int:
        """SIGKILL the raylet of node ``name`` by pid, as a crashed machine would lose it;
        returns the pid. Its ``ray start`` then notices and ends the node's other processes."""
        node = self.nodes[name]
        pid = node.raylet_pid
        proc = psutil.Process(pid)
        if f"--node_manager_port={node.node_manager_port}" not in proc.cmdline():
            raise RuntimeError(f"pid {pid} is no longer the raylet of node {name}")
        proc.send_signal(signal.SIGKILL)
        logger.info("killed the raylet of node %s (pid %d)", name, pid)
        return pid

    def processes(self) -> list[psutil.Process]:
        """Every live process of this cluster: the members of each ``ray start``'s session,
        and anything else naming the cluster's temp folder."""
        found = {proc.pid: proc for proc in session_members(self._sessions)}
        for proc in processes_mentioning(str(self.temp_dir)):
            found.setdefault(proc.pid, proc)
        return list(found.values())

    # ------------------------------------------------------------- stopping

    def stop(self, timeout: float = 30.0, keep_logs: Path | None = None) -> None:
        """Stop the worker nodes, then the head (SIGTERM: `ray start --block` ends what it
        started), SIGKILL whatever is left, and delete the temp folder; its logs (``ray start``
        output, and each session's ``logs`` folder) are moved to ``keep_logs`` first."""
        nodes = list(self.nodes.values())
        for node in nodes[1:]:
            with contextlib.suppress(ProcessLookupError):
                if node.process.poll() is None:
                    os.kill(node.pid, signal.SIGTERM)
        for node in nodes[1:]:
            stop_process(node.process, node.session, timeout=timeout, signalled=True)
        if nodes:
            stop_process(nodes[0].process, nodes[0].session, timeout=timeout)
        leftovers = self.processes()
        if leftovers:
            logger.warning("killing %d leftover Ray processes: %s", len(leftovers),
                           sorted(proc.pid for proc in leftovers))
            kill_all(leftovers)
        if keep_logs is not None:
            keep_logs.mkdir(parents=True, exist_ok=True)
            for log in [*self.temp_dir.parent.glob("*.log"), *self.temp_dir.glob("session_*")]:
                target = keep_logs / log.name
                if log.is_dir():
                    log, target = log / "logs", target / "logs"
                with contextlib.suppress(OSError):
                    shutil.move(log, target)
        shutil.rmtree(self.temp_dir.parent, ignore_errors=True)


def port_closed(port: int) -> bool:
    """True while nothing accepts TCP connections on the GCS port."""
    with socket.socket() as sock:
        sock.settimeout(1.0)
        return sock.connect_ex(("127.0.0.1", port)) != 0


def start_ray_cluster(head: NodeSpec, workers: Iterable[NodeSpec],
                      env: Mapping[str, str] | None = None, *,
                      object_store_bytes: int = OBJECT_STORE_BYTES,
                      fast_failure_detection: bool = True) -> RayCluster:
    """Start a head node and then each worker node (one after the other: nodes sharing a
    session folder pick their socket names by looking at what exists).

    ``env`` is added to this process's environment for every node (and so every worker):
    credentials, ``PREFECT_API_URL`` and the like, which real nodes would have of their own.
    ``fast_failure_detection`` has the GCS declare a node dead ~3 s after its raylet stops
    answering instead of ~15 s (:data:`FAST_FAILURE_DETECTION_ENV`).
    """
    root = Path(tempfile.mkdtemp(prefix="eqdiff-ray-", dir="/tmp"))  # short: socket paths
    temp_dir = root / "t"
    temp_dir.mkdir()
    node_env = {**os.environ, **RAY_NODE_ENV,
                **(FAST_FAILURE_DETECTION_ENV if fast_failure_detection else {}), **(env or {})}
    cluster = RayCluster(temp_dir, node_env, object_store_bytes=object_store_bytes)
    try:
        cluster.start_node(head, head=True)
        for spec in workers:
            cluster.start_node(spec)
    except BaseException:
        cluster.stop(timeout=10)
        raise
    return cluster


def in_own_mount_namespace(pid: int) -> bool:
    """Whether process ``pid`` lives in a mount namespace other than this process's."""
    return os.readlink(f"/proc/{pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt")
