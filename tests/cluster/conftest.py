"""Fixtures of the cluster tests: PostgreSQL, a Prefect server on it, moto's S3 server in its
own process, and a Ray cluster of three ``ray start`` nodes on this machine, one of which
(``b``) cannot see the folders the driver works in. See ``harness.py``.

All are session-scoped (the cluster takes tens of seconds to start) except ``ray_driver``,
which connects this process to the cluster for one test module only, so that tests elsewhere
that start a local Ray instance (``ray_local``) never find this process attached to it.

Layout (override ``cluster_layout`` for another):

* ``head``: no CPU (as on a real cluster, it runs no tasks), resource ``node:head_marker``
* ``a``: 1 CPU, resource ``node_a``
* ``b``: 1 CPU, resource ``node_b``; the folders of ``cluster_hidden_dirs`` are empty there

Pin a task with ``.options(resources={"node_b": 0.001})``.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from harness import (
    MotoServer,
    NodeSpec,
    Postgres,
    RayCluster,
    ServiceMissing,
    free_port,
    start_moto,
    start_postgres,
    start_ray_cluster,
)
from processes import refresh_prefect_settings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrefectOnPostgres:
    """A Prefect server whose database is ``postgres``."""

    api_url: str
    home: Path
    postgres: Postgres


@dataclass(frozen=True)
class ClusterLayout:
    head: NodeSpec
    workers: tuple[NodeSpec, ...]


@pytest.fixture(scope="session")
def cluster_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder for the services' logs and homes (visible on every node)."""
    return tmp_path_factory.mktemp("cluster")


@pytest.fixture(scope="session")
def cluster_postgres() -> Iterator[Postgres]:
    """A throwaway PostgreSQL on 127.0.0.1 with database ``prefect`` (password auth)."""
    started = time.monotonic()
    try:
        pg = start_postgres(database="prefect")
    except ServiceMissing as error:
        pytest.fail(str(error), pytrace=False)
    logger.info("PostgreSQL ready in %.1f s", time.monotonic() - started)
    try:
        yield pg
    finally:
        pg.stop()


@pytest.fixture(scope="session")
def cluster_prefect(cluster_postgres: Postgres, cluster_root: Path) -> Iterator[PrefectOnPostgres]:
    """A Prefect server on ``cluster_postgres``; ``PREFECT_API_URL`` and ``PREFECT_HOME`` point
    at it in this process for the session (as the ``prefect_server`` fixture does)."""
    import psutil

    from flows.server import ensure_server, stop_server

    home = cluster_root / "prefect-home"
    url = cluster_postgres.async_url
    started = time.monotonic()
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("PREFECT_API_URL", raising=False)
        mp.setenv("PREFECT_HOME", str(home))
        mp.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        mp.setenv("PREFECT_LOGGING_TO_API_BATCH_INTERVAL", "0.3")
        if "database_url" in inspect.signature(ensure_server).parameters:
            server = ensure_server(port=free_port(), home=home, database_url=url)
        else:
            with pytest.MonkeyPatch.context() as only_for_the_server:
                # server_env copies os.environ: the server (only) sees the database URL
                only_for_the_server.setenv("PREFECT_API_DATABASE_CONNECTION_URL", url)
                server = ensure_server(port=free_port(), home=home)
        mp.setenv("PREFECT_API_URL", server.api_url)
        refresh_prefect_settings()
        logger.info("Prefect server on PostgreSQL ready in %.1f s: %s",
                    time.monotonic() - started, server.api_url)
        try:
            yield PrefectOnPostgres(server.api_url, home, cluster_postgres)
        finally:
            mp.undo()
            refresh_prefect_settings()
            stop_server(home)  # SIGTERM to its process group, without waiting
            if server.pid:
                with contextlib.suppress(psutil.Error):  # our child: its pid is not reused
                    process = psutil.Process(server.pid)
                    try:
                        process.wait(timeout=30)
                    except psutil.TimeoutExpired:
                        os.killpg(server.pid, signal.SIGKILL)
                        process.wait(timeout=10)


@pytest.fixture(scope="session")
def cluster_s3(aws_test_env: dict[str, str], cluster_root: Path) -> Iterator[MotoServer]:
    """moto's S3 server in its own process (fake credentials); ``.endpoint``,
    ``.create_bucket()``, ``.client()``."""
    server = start_moto(cluster_root / "moto.log", env=aws_test_env)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def cluster_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder for the data set: the driver and nodes ``head`` and ``a`` see its files,
    node ``b`` sees an empty folder."""
    return tmp_path_factory.mktemp("hidden-data")


@pytest.fixture(scope="session")
def cluster_work_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A working folder for the driver (local artifacts, checkpoints), hidden from node ``b``."""
    return tmp_path_factory.mktemp("hidden-work")


@pytest.fixture(scope="session")
def cluster_hidden_dirs(cluster_data_dir: Path, cluster_work_dir: Path) -> list[Path]:
    """The folders node ``b`` cannot see; they must exist before the cluster starts."""
    return [cluster_data_dir, cluster_work_dir]


@pytest.fixture(scope="session")
def cluster_layout(cluster_hidden_dirs: list[Path]) -> ClusterLayout:
    return ClusterLayout(
        head=NodeSpec("head", num_cpus=0, resources={"node:head_marker": 1}),
        workers=(NodeSpec("a", num_cpus=1, resources={"node_a": 1}),
                 NodeSpec("b", num_cpus=1, resources={"node_b": 1},
                          hidden=tuple(cluster_hidden_dirs))))


@pytest.fixture(scope="session")
def cluster_node_env(aws_test_env: dict[str, str], cluster_prefect: PrefectOnPostgres,
                     cluster_root: Path) -> dict[str, str]:
    """What every node has in its environment besides this process's: fake AWS credentials
    (no instance-metadata probing) and the test Prefect server."""
    node_home = cluster_root / "node-prefect-home"
    node_home.mkdir(exist_ok=True)
    return {**aws_test_env, "PREFECT_API_URL": cluster_prefect.api_url,
            "PREFECT_HOME": str(node_home)}


@pytest.fixture(scope="session")
def ray_cluster(cluster_layout: ClusterLayout, cluster_node_env: dict[str, str],
                cluster_root: Path) -> Iterator[RayCluster]:
    """A running Ray cluster of ``ray start`` nodes (not connected; see ``ray_driver``).

    ``.address``, ``.nodes`` / ``.node(name)`` (``node_id``, ``raylet_pid``, ``resources``),
    ``.kill_raylet(name)``, ``.restart_node(name)``, ``.alive(name)``, ``.processes()``.
    At teardown no process of it is left (checked); its logs are kept in
    ``cluster_root / "ray-logs"``.
    """
    started = time.monotonic()
    cluster = start_ray_cluster(cluster_layout.head, cluster_layout.workers,
                                env=cluster_node_env)
    logger.info("Ray cluster %s up in %.1f s: %s", cluster.address,
                time.monotonic() - started, cluster.describe())
    try:
        yield cluster
    finally:
        stopping = time.monotonic()
        cluster.stop(keep_logs=cluster_root / "ray-logs")
        leftovers = cluster.processes()
        logger.info("Ray cluster stopped in %.1f s", time.monotonic() - stopping)
        assert not leftovers, f"Ray processes left behind: {leftovers}"


@pytest.fixture(scope="module")
def ray_driver(ray_cluster: RayCluster) -> Iterator[RayCluster]:
    """This process connected to ``ray_cluster`` as a driver, as the flow connects
    (:func:`flows.compute.ray_init_kwargs`), for one test module; disconnected afterwards."""
    import ray

    from flows.compute import ray_init_kwargs

    if ray.is_initialized():
        pytest.fail("this process is already attached to another Ray instance; run the "
                    "cluster tests on their own (`make test-operations`)", pytrace=False)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_AUTH_MODE", "disabled")
        mp.setenv("RAY_ADDRESS", ray_cluster.address)
        started = time.monotonic()
        ray.init(ray_cluster.address, **ray_init_kwargs(ray_cluster.address))
        logger.info("driver connected in %.1f s", time.monotonic() - started)
        try:
            yield ray_cluster
        finally:
            ray.shutdown()
