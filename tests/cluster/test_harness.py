"""Smoke tests of the cluster harness: what a node sees, what it reaches, where Prefect keeps
its runs, and what Ray does when a node's raylet dies under a running task."""

from __future__ import annotations

import json
import logging
import os
import time
import urllib.request
from pathlib import Path

import pytest
import ray
from harness import MotoServer, RayCluster, in_own_mount_namespace
from prefect import flow
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

pytestmark = pytest.mark.cluster

logger = logging.getLogger(__name__)

ON_A = {"resources": {"node_a": 0.001}, "num_cpus": 0.1}
ON_B = {"resources": {"node_b": 0.001}, "num_cpus": 0.1}


@ray.remote
def look_at(paths: list[str]) -> dict:
    """Which of ``paths`` exist where this task runs, and which node and namespace that is."""
    return {"exists": {path: os.path.exists(path) for path in paths},
            "node_id": ray.get_runtime_context().get_node_id(),
            "mount_ns": os.readlink("/proc/self/ns/mnt")}


@ray.remote
def reach(endpoint: str, bucket: str, api_url: str) -> dict:
    """List ``bucket`` on the S3 endpoint with the node's own credentials, and ask the
    Prefect API for its health."""
    import boto3

    listing = boto3.client("s3", endpoint_url=endpoint).list_objects_v2(Bucket=bucket)
    with urllib.request.urlopen(f"{api_url}/health", timeout=10) as response:
        health = json.loads(response.read())
    return {"keys": [item["Key"] for item in listing.get("Contents", [])],
            "health": health,
            "access_key_id": os.environ.get("AWS_ACCESS_KEY_ID"),
            "node_id": ray.get_runtime_context().get_node_id()}


@ray.remote
def hold_on(marker_dir: str, doomed_node: str, seconds: float) -> str:
    """Note the attempt in ``marker_dir``; sleep ``seconds`` on ``doomed_node``, return at once
    anywhere else. Returns the id of the node the task finished on."""
    node_id = ray.get_runtime_context().get_node_id()
    Path(marker_dir, f"{os.getpid()}.attempt").write_text(node_id)
    if node_id == doomed_node:
        time.sleep(seconds)
    return node_id


@flow(name="cluster-smoke", persist_result=False)
def trivial_flow() -> int:
    return 42


def test_hidden_folders_are_empty_on_node_b(ray_driver: RayCluster,
                                            cluster_hidden_dirs: list[Path]) -> None:
    files = []
    for folder in cluster_hidden_dirs:
        path = folder / "written-by-the-driver.txt"
        path.write_text("only the driver's side can read this")
        files.append(str(path))

    on_a = ray.get(look_at.options(**ON_A).remote(files), timeout=120)
    on_b = ray.get(look_at.options(**ON_B).remote(files), timeout=120)

    assert on_a["node_id"] == ray_driver.node("a").node_id
    assert on_b["node_id"] == ray_driver.node("b").node_id
    assert all(on_a["exists"].values()), on_a
    assert not any(on_b["exists"].values()), on_b
    assert on_b["mount_ns"] != on_a["mount_ns"]
    names = {node["NodeID"]: node["NodeName"] for node in ray.nodes()}
    assert [names[ray_driver.node(n).node_id] for n in ("head", "a", "b")] == ["head", "a", "b"]
    assert in_own_mount_namespace(ray_driver.node("b").raylet_pid)
    assert not in_own_mount_namespace(ray_driver.node("a").raylet_pid)


def test_nodes_reach_s3_and_prefect(ray_driver: RayCluster, cluster_s3: MotoServer,
                                    cluster_prefect) -> None:
    bucket = cluster_s3.create_bucket()
    cluster_s3.client().put_object(Bucket=bucket, Key="hello.txt", Body=b"hi")

    results = ray.get([reach.options(**ON_A).remote(cluster_s3.endpoint, bucket,
                                                    cluster_prefect.api_url),
                       reach.options(**ON_B).remote(cluster_s3.endpoint, bucket,
                                                    cluster_prefect.api_url)], timeout=120)

    assert [r["node_id"] for r in results] == [ray_driver.node("a").node_id,
                                               ray_driver.node("b").node_id]
    for result in results:
        assert result["keys"] == ["hello.txt"]
        assert result["health"] is True
        assert result["access_key_id"] == "testing"  # the node's own, not forwarded


def test_prefect_runs_are_stored_in_postgres(cluster_prefect) -> None:
    state = trivial_flow(return_state=True)

    assert state.is_completed()
    run_id = state.state_details.flow_run_id
    row = cluster_prefect.postgres.psql(
        f"SELECT state_type FROM flow_run WHERE id = '{run_id}'")
    assert row == "COMPLETED"


def test_a_task_outlives_the_raylet_of_its_node(ray_driver: RayCluster, tmp_path: Path) -> None:
    node_a = ray_driver.node("a")
    near_a = NodeAffinitySchedulingStrategy(node_id=node_a.node_id, soft=True)
    markers = {name: tmp_path / name for name in ("retried", "not-retried")}
    for folder in markers.values():
        folder.mkdir()
    retried = hold_on.options(num_cpus=0.5, max_retries=1, scheduling_strategy=near_a).remote(
        str(markers["retried"]), node_a.node_id, 600)
    not_retried = hold_on.options(num_cpus=0.5, max_retries=0,
                                  scheduling_strategy=near_a).remote(
        str(markers["not-retried"]), node_a.node_id, 600)

    deadline = time.monotonic() + 120
    while not all(any(folder.iterdir()) for folder in markers.values()):
        assert time.monotonic() < deadline, "the tasks did not start on node a"
        time.sleep(0.2)
    for folder in markers.values():
        assert [f.read_text() for f in folder.iterdir()] == [node_a.node_id]

    try:
        killed_at = time.monotonic()
        ray_driver.kill_raylet("a")
        while True:
            entry = next(n for n in ray.nodes() if n["NodeID"] == node_a.node_id)
            if not entry["Alive"]:
                break
            assert time.monotonic() - killed_at < 90, "node a still alive 90 s after its raylet"
            time.sleep(0.2)
        seen_dead_s = time.monotonic() - killed_at
        logger.info("ray.nodes() reports node a dead %.1f s after SIGKILL of its raylet: %s",
                    seen_dead_s, {k: v for k, v in entry.items() if "Death" in k or k == "Alive"})

        finished_on = ray.get(retried, timeout=180)
        retried_s = time.monotonic() - killed_at
        with pytest.raises(ray.exceptions.RayError) as raised:
            ray.get(not_retried, timeout=180)
        logger.info("retried task finished on %s %.1f s after the kill; the task without "
                    "retries raised %s: %s", finished_on[:12], retried_s,
                    type(raised.value).__name__, str(raised.value).splitlines()[0])

        assert finished_on != node_a.node_id
        assert finished_on == ray_driver.node("b").node_id  # the head runs no tasks
        assert len(list(markers["retried"].iterdir())) == 2  # on a, then elsewhere
        assert len(list(markers["not-retried"].iterdir())) == 1
        assert not ray_driver.alive("a")
        logger.info("node a's `ray start --block` exited with code %s",
                    ray_driver.node("a").process.poll())
    finally:
        restarted_at = time.monotonic()
        ray_driver.restart_node("a")
        logger.info("node a restarted in %.1f s", time.monotonic() - restarted_at)

    assert ray_driver.alive("a")
    back = ray.get(look_at.options(**ON_A).remote([]), timeout=120)
    assert back["node_id"] == ray_driver.node("a").node_id != node_a.node_id
