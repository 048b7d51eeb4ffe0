"""The customize_dataset flow on a real three-node Ray cluster (``ray start``: a head that runs
no tasks and two worker nodes, ``b`` unable to see the driver's dataset and working folders),
S3 over HTTP (moto's server) and a Prefect server on PostgreSQL.

One test module, in order: a local-folder store is refused before any work; a run of 3
subjects × 2 methods completes while the raylet of a node that is training is killed (the
unit is run again on the other node and resumes from its stored checkpoint), and a second run
of the same run id is refused meanwhile; its scores equal those of the same parameters run in
one process, and so does the resumed concept.
"""

from __future__ import annotations

import io
import json
import logging
import threading
import time
from pathlib import Path

import pytest
from harness import RayCluster

pytestmark = pytest.mark.cluster

logger = logging.getLogger(__name__)

METHODS = ["eqdiff", "custom-diffusion"]
RUN_ID = "cluster-run"


def run_params(dataset: Path, storage_url: str, endpoint: str, compute: str, address: str = ""):
    from flows.params import CustomizeParams

    return CustomizeParams(
        dataset=str(dataset), methods=METHODS, steps=40, base_model="tiny",
        images_per_prompt=1, max_prompts=2, storage_url=storage_url, s3_endpoint_url=endpoint,
        compute=compute, ray_address=address, run_id=RUN_ID, lost_worker_retries=1,
        overrides={"train.num_prior_images": 2, "sample.steps": 2, "train.checkpoint_every": 4})


@pytest.fixture(scope="module")
def dataset(cluster_data_dir: Path) -> Path:
    """The demo's three subjects, in the folder node ``b`` cannot see."""
    from eqdiff.fixtures.demo_data import write_demo_dataset

    return write_demo_dataset(cluster_data_dir / "demo", size=64, images_per_subject=3)


@pytest.fixture
def in_work_dir(cluster_work_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The driver works in the folder node ``b`` cannot see (as ``./artifacts`` would be)."""
    monkeypatch.chdir(cluster_work_dir)
    return cluster_work_dir


def listing(client, bucket: str, prefix: str = "") -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def test_a_local_folder_store_is_refused_on_the_cluster(ray_driver: RayCluster, dataset: Path,
                                                        in_work_dir: Path) -> None:
    from flows.compute import TopologyError
    from flows.customize import customize_dataset

    params = run_params(dataset, "./artifacts", "", "ray", ray_driver.address)
    started = time.monotonic()
    with pytest.raises(TopologyError, match=r"has 3 nodes.*local folder.*s3://"):
        customize_dataset(params)
    logger.info("refused in %.1f s", time.monotonic() - started)
    assert not list((in_work_dir / "artifacts").rglob("*_SUCCESS.json"))


def test_a_run_survives_a_lost_node_and_equals_a_one_process_run(
        ray_driver: RayCluster, cluster_s3, cluster_prefect, dataset: Path, in_work_dir: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    import torch

    from eqdiff.store.lease import LeaseHeldError
    from flows.customize import customize_dataset

    client = cluster_s3.client()
    bucket = cluster_s3.create_bucket()
    params = run_params(dataset, f"s3://{bucket}", cluster_s3.endpoint, "ray",
                        ray_driver.address)
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["record"] = customize_dataset(params)
        except BaseException as error:  # noqa: BLE001 - reported by the test thread
            outcome["error"] = error

    started = time.monotonic()
    flow = threading.Thread(target=run, name="cluster-flow")
    flow.start()

    # both worker nodes train, each with a checkpoint stored: kill node a's raylet
    deadline = time.monotonic() + 600
    while True:
        assert flow.is_alive(), outcome
        assert time.monotonic() < deadline, "no two trainings with checkpoints in 10 minutes"
        stored = listing(client, bucket, f"runs/{RUN_ID}/")
        checkpoints = [k for k in stored if k.endswith("/last.pt")]
        concepts = [k for k in stored if "/concepts/" in k and k.endswith("_SUCCESS.json")]
        if len(checkpoints) == 2 and not concepts:
            break
        time.sleep(0.2)
    with pytest.raises(LeaseHeldError, match=r"pid \d+ \(flow run "):  # one run per run id
        customize_dataset(params)
    killed_node = ray_driver.node("a").node_id
    ray_driver.kill_raylet("a")
    logger.info("killed node a's raylet %.1f s into the run; checkpoints: %s",
                time.monotonic() - started, checkpoints)
    try:
        flow.join(timeout=900)
        assert not flow.is_alive(), "the run did not end within 15 minutes of the kill"
    finally:
        ray_driver.restart_node("a")
    cluster_s = time.monotonic() - started
    assert "error" not in outcome, outcome.get("error")
    record = outcome["record"]
    units = [f"{s}/{m}" for s in ("blue_box", "green_toy", "red_ball") for m in METHODS]
    assert {k: record["status"].get(k) for k in units} == {k: "done" for k in units}
    assert all(v == "done" for v in record["status"].values()), record["failures"]
    resumed = {k: record["records"][k]["train"]["resumed_from_step"] for k in units
               if record["records"][k]["train"].get("resumed_from_step")}
    assert len(resumed) == 1, record["records"]  # the unit node a was training
    (unit, step), = resumed.items()
    assert step > 0 and step % 4 == 0
    assert not [k for k in listing(client, bucket) if k.endswith("last.pt")]

    # the resume is in the unit's log in Prefect (the task ran on a Ray worker)
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterTaskRunId

    with get_client(sync_client=True) as prefect_client:
        logs = prefect_client.read_logs(log_filter=LogFilter(
            task_run_id=LogFilterTaskRunId(is_null_=False)), limit=200, offset=0)
        resume_lines = [log.message for log in logs if "resuming from step" in log.message]
    assert any(unit.split("/")[0] in line and f"step {step}" in line for line in resume_lines), \
        resume_lines

    # the same parameters in one process (one thread, as each Ray worker has one CPU)
    reference_bucket = cluster_s3.create_bucket()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        started = time.monotonic()
        reference = customize_dataset(run_params(dataset, f"s3://{reference_bucket}",
                                                 cluster_s3.endpoint, "local"))
        local_s = time.monotonic() - started
    finally:
        torch.set_num_threads(threads)
    assert all(v == "done" for v in reference["status"].values())

    import pandas as pd
    from safetensors.torch import load

    def scores(name: str) -> pd.DataFrame:
        frames = [pd.read_parquet(io.BytesIO(client.get_object(Bucket=name, Key=k)["Body"]
                                             .read()))
                  for k in listing(client, name, f"runs/{RUN_ID}/scores/")
                  if k.endswith(".parquet")]
        table = pd.concat(frames).sort_values(["subject", "method", "image_key"])
        return table.reset_index(drop=True)

    ours, theirs = scores(bucket), scores(reference_bucket)
    metrics = [c for c in ("clip_i", "clip_t", "dino") if c in ours.columns]
    assert metrics and len(ours) == len(theirs) > 0
    score_diff = float((ours[metrics] - theirs[metrics]).abs().max().max())

    subject, method = unit.split("/")
    concept_key = f"runs/{RUN_ID}/concepts/{subject}/{method}/concept.safetensors"
    resumed_tensors = load(client.get_object(Bucket=bucket, Key=concept_key)["Body"].read())
    straight = load(client.get_object(Bucket=reference_bucket, Key=concept_key)["Body"].read())
    tensor_diff = max(float((resumed_tensors[n].float() - straight[n].float()).abs().max())
                      for n in straight)
    logger.info("cluster run %.0f s (node %s lost), one-process run %.0f s; unit %s resumed "
                "from step %d; max |score difference| %.3g, max |concept difference| %.3g",
                cluster_s, killed_node[:8], local_s, unit, step, score_diff, tensor_diff)
    assert set(resumed_tensors) == set(straight)
    assert tensor_diff == 0.0
    assert score_diff == 0.0


def test_a_deployment_run_from_a_process_worker_on_postgres_runs_on_the_cluster(
        ray_driver: RayCluster, cluster_s3, cluster_prefect, tmp_path: Path) -> None:
    """The operator's path: deployments registered on the Prefect server (PostgreSQL), a
    process worker picks a run up and drives the Ray cluster; its artifacts are in Postgres."""
    from prefect.client.orchestration import get_client
    from processes import start_worker, stop_group, tail

    from flows.deploy import WORK_POOL, deploy_all, ensure_work_pool

    bucket = cluster_s3.create_bucket()
    ensure_work_pool(WORK_POOL)
    worker_log = tmp_path / "worker.log"
    worker = start_worker(WORK_POOL, worker_log)
    try:
        names = deploy_all(WORK_POOL)
        params = {"dataset": "demo", "subjects": ["red_ball"], "methods": ["custom-diffusion"],
                  "steps": 2, "images_per_prompt": 1, "max_prompts": 1, "base_model": "tiny",
                  "storage_url": f"s3://{bucket}", "s3_endpoint_url": cluster_s3.endpoint,
                  "compute": "ray", "ray_address": ray_driver.address,
                  "run_id": "deployed", "overrides": {"sample.steps": 2,
                                                      "train.num_prior_images": 2}}
        with get_client(sync_client=True) as client:
            deployment = client.read_deployment_by_name(names[0])
            assert deployment.global_concurrency_limit.limit == 1  # from prefect.yaml
            run = client.create_flow_run_from_deployment(deployment.id,
                                                         parameters={"params": params})
            deadline = time.monotonic() + 600
            while not (run.state and run.state.is_final()):
                assert worker.poll() is None, f"the worker exited:\n{tail(worker_log)}"
                assert time.monotonic() < deadline, tail(worker_log)
                time.sleep(1.0)
                run = client.read_flow_run(run.id)
        assert run.state.is_completed(), f"{run.state}:\n{tail(worker_log)}"
    finally:
        stop_group(worker)

    record = json.loads(cluster_s3.client().get_object(
        Bucket=bucket, Key="runs/deployed/run.json")["Body"].read())
    assert record["status"].get("red_ball/custom-diffusion") == "done", record["status"]
    psql = cluster_prefect.postgres.psql
    assert psql(f"SELECT state_type FROM flow_run WHERE id = '{run.id}'") == "COMPLETED"
    assert psql("SELECT type FROM artifact WHERE key = 'scores-deployed'") == "table"
    assert psql("SELECT count(*) FROM artifact WHERE key = 'report-deployed'") == "1"
