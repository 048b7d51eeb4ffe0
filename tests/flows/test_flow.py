"""The customize_dataset flow against a real Prefect server, local Ray and S3 over HTTP."""

import json
import shutil
import time

import pytest

from eqdiff.fixtures.demo_data import write_demo_dataset

pytestmark = pytest.mark.ray

METHODS = ["eqdiff-no-rra", "custom-diffusion"]


def two_subjects_with_one_broken(folder):
    """The demo dataset, cut to two subjects, plus a third whose photos are all corrupt."""
    root = write_demo_dataset(folder, images_per_subject=3)
    lines = (root / "subjects.csv").read_text().splitlines()
    kept = lines[:3]
    broken = root / "broken_cup"
    broken.mkdir()
    for index in range(3):
        (broken / f"{index:02d}.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "subjects.csv").write_text("\n".join([*kept, "broken_cup,cup"]) + "\n")
    for name in lines[3:]:
        shutil.rmtree(root / name.split(",")[0], ignore_errors=True)
    return root


def params(dataset, store_url, endpoint, compute):
    from flows.params import CustomizeParams

    return CustomizeParams(dataset=str(dataset), methods=METHODS, steps=3, base_model="tiny",
                           images_per_prompt=1, max_prompts=2, storage_url=store_url,
                           s3_endpoint_url=endpoint, compute=compute, run_id="flowtest",
                           overrides={"train.num_prior_images": 2, "sample.steps": 2,
                                      "train.checkpoint_every": 2})


def test_whole_dag_on_ray_with_s3(prefect_server, ray_local, s3_bucket_url, s3_endpoint,
                                  s3_client, tmp_path):
    from flows.customize import customize_dataset

    dataset = two_subjects_with_one_broken(tmp_path / "data")
    started = time.perf_counter()
    record = customize_dataset(params(dataset, s3_bucket_url, s3_endpoint, "ray"))
    first = time.perf_counter() - started
    ok = [s for s in record["status"] if record["status"][s] == "done" and "/" in s]
    assert sorted(ok) == [f"{s}/{m}" for s in ("blue_box", "red_ball") for m in sorted(METHODS)]
    assert record["status"]["broken_cup"].startswith("failed")
    assert "usable image" in record["failures"]["broken_cup"]

    bucket = s3_bucket_url.removeprefix("s3://")
    pages = s3_client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
    keys = {o["Key"] for page in pages for o in page.get("Contents", [])}
    for subject in ("blue_box", "red_ball"):
        for stage in ("preprocess", "masks"):
            assert f"runs/flowtest/subjects/{subject}/{stage}/_SUCCESS.json" in keys
        for method in METHODS:
            for stage, name in (("concepts", "concept.safetensors"), ("samples", "00_0.png"),
                                ("samples", "01_0.png"), ("scores", "scores.parquet")):
                assert f"runs/flowtest/{stage}/{subject}/{method}/{name}" in keys
                assert f"runs/flowtest/{stage}/{subject}/{method}/_SUCCESS.json" in keys
    assert "runs/flowtest/run.json" in keys
    html = s3_client.get_object(Bucket=bucket, Key="runs/flowtest/report/report.html")
    text = html["Body"].read().decode()
    assert all(method in text for method in METHODS) and "broken_cup" in text
    assert html["ContentType"].startswith("text/html")

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterKey,
        FlowRunFilter,
        FlowRunFilterName,
        TaskRunFilter,
        TaskRunFilterName,
    )

    with get_client(sync_client=True) as client:
        tables = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=["scores-flowtest"])))
        notes = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=["report-flowtest"])))
        wanted = ["ingest · red_ball", "train · blue_box · custom-diffusion",
                  "generate · red_ball · eqdiff-no-rra", "score · blue_box"]
        named = client.read_task_runs(task_run_filter=TaskRunFilter(
            name=TaskRunFilterName(any_=wanted)))
        flow_runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            name=FlowRunFilterName(any_=["flowtest"])))
    assert {t.name for t in named} == set(wanted)  # task runs say what they work on
    assert flow_runs  # the flow run is named after its run id
    assert tables and tables[0].type == "table"
    # the report is named by its store address: no presigned link, no access key id
    assert f"{s3_bucket_url}/runs/flowtest/report/report.html" in notes[0].data
    assert "X-Amz" not in notes[0].data and "testing" not in notes[0].data
    rows = json.loads(tables[0].data) if isinstance(tables[0].data, str) else tables[0].data
    assert {row["method"] for row in rows} >= set(METHODS)

    started = time.perf_counter()
    again = customize_dataset(params(dataset, s3_bucket_url, s3_endpoint, "ray"))
    second = time.perf_counter() - started
    for key in ok:
        for stage in ("train", "generate"):
            assert again["records"][key][stage]["skipped"] is True, (key, stage)
    for subject in ("blue_box", "red_ball"):
        for stage in ("ingest", "preprocess", "masks", "score"):
            assert again["records"][subject][stage]["skipped"] is True, (subject, stage)
    assert second < first
    with get_client(sync_client=True) as client:  # the plan found everything done but the
        # broken subject, whose preprocessing is the one step dispatched again; its failure is
        # the same, so the stored report is current and not rebuilt
        rerun = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            name=FlowRunFilterName(any_=["flowtest"])), sort="START_TIME_DESC", limit=1)[0]
        dispatched = {t.name for t in client.read_task_runs(flow_run_filter=FlowRunFilter(
            id={"any_": [rerun.id]}))}
    assert dispatched == {"preprocess · broken_cup"}, dispatched
    assert "runs/flowtest/_LEASE.json" not in {  # released when the run ended
        o["Key"] for o in s3_client.list_objects_v2(Bucket=bucket).get("Contents", [])}


def test_a_second_run_of_a_run_id_is_refused_naming_the_first(prefect_server, tmp_path):
    """While another process holds the run's lease, the flow stops before any work and says
    who holds it; once it is released, the run goes ahead."""
    from eqdiff.store import keys, open_store
    from eqdiff.store.lease import LeaseHeldError, hold_lease
    from flows.customize import customize_dataset

    dataset = two_subjects_with_one_broken(tmp_path / "data")
    store_url = str(tmp_path / "store")
    store = open_store(store_url)
    run = params(dataset, store_url, "", "local").model_copy(update={"subjects": ["broken_cup"]})
    with hold_lease(store, keys.run_lease("flowtest"), "ann@node-7 pid 4242 (flow run x)"):
        with pytest.raises(LeaseHeldError, match=r"ann@node-7 pid 4242 \(flow run x\)"):
            customize_dataset(run)
        assert not store.list_keys("runs/flowtest/subjects/")  # nothing ingested
    record = customize_dataset(run)
    assert record["status"]["broken_cup"].startswith("failed")
