"""Runs that end badly leave nothing open: Ctrl-C of ``eqdiff run`` (and SIGKILL, found by the
next run), and a store that cannot take the run record."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.ray

RUN_ID = "interrupted"


def start_run(store: Path, ray_dir: Path, log: Path, prefect_server: str) -> subprocess.Popen:
    """``eqdiff run`` of one tiny training long enough to be interrupted, on its own local Ray
    instance (whose files are under ``ray_dir``)."""
    overrides = ("{train.checkpoint_every: 5, train.num_prior_images: 2, sample.steps: 2}")
    command = [sys.executable, "-m", "flows.cli", "run", "--no-server",
               "--set", "dataset=demo", "--set", "base_model=tiny", "--set", "steps=100",
               "--set", "subjects=[red_ball]", "--set", "methods=[custom-diffusion]",
               "--set", f"storage_url={store}", "--set", f"run_id={RUN_ID}",
               "--set", f"overrides={overrides}"]
    env = {**os.environ, "PREFECT_API_URL": prefect_server, "RAY_TMPDIR": str(ray_dir),
           "RAY_AUTH_MODE": "disabled", "EQDIFF_RAY_NUM_CPUS": "2",
           "PYTHONPATH": str(Path(__file__).parents[2])}
    return subprocess.Popen(command, env=env, cwd=Path(__file__).parents[2],
                            stdout=log.open("wb"), stderr=subprocess.STDOUT)


def wait_for_training(process: subprocess.Popen, store: Path, log: Path) -> None:
    """Until the run has stored a checkpoint of its own (not one left by an earlier run)."""
    started, deadline = time.time(), time.monotonic() + 300
    folder = store / "runs" / RUN_ID / "checkpoints"
    while not [p for p in folder.rglob("last.pt") if p.stat().st_mtime > started]:
        assert process.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.5)


def open_runs(run_name: str) -> tuple[list, list]:
    """The flow runs named ``run_name`` and their subflows, and every task run of them, that
    are not in a final state."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        FlowRunFilterName,
        FlowRunFilterParentFlowRunId,
    )

    with get_client(sync_client=True) as client:
        parents = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            name=FlowRunFilterName(any_=[run_name])))
        subflows = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[r.id for r in parents])))
        runs = [*parents, *subflows]
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=[r.id for r in runs])))
    assert parents, f"no flow run named {run_name}"
    return ([r for r in runs if not r.state.is_final()],
            [t for t in tasks if t.state is None or not t.state.is_final()])


def ray_processes(ray_dir: Path) -> list[str]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        with_dir = " ".join(process.info["cmdline"] or [])
        if str(ray_dir) in with_dir:
            found.append(with_dir[:120])
    return found


@pytest.fixture
def ray_dir() -> Path:
    """A short folder for the run's own Ray instance (socket paths must stay short)."""
    folder = Path(tempfile.mkdtemp(prefix="eqr-", dir="/tmp"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.operations
def test_ctrl_c_leaves_no_run_open_and_no_ray_process(prefect_server, tmp_path, ray_dir):
    store, log = tmp_path / "store", tmp_path / "run.log"
    process = start_run(store, ray_dir, log, prefect_server)
    try:
        wait_for_training(process, store, log)
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=120) == 130, log.read_text()[-3000:]
    finally:
        if process.poll() is None:
            process.kill()
    assert "interrupted" in log.read_text()
    flows, tasks = open_runs(RUN_ID)
    assert flows == [] and tasks == [], (flows, tasks)
    deadline = time.monotonic() + 30
    while ray_processes(ray_dir):
        assert time.monotonic() < deadline, ray_processes(ray_dir)
        time.sleep(1)

    # SIGKILL: nothing runs in the process; the next run of the id (once it holds the lease)
    # marks what the killed one left open, then goes on from its checkpoint
    process = start_run(store, ray_dir, log, prefect_server)
    try:
        wait_for_training(process, store, log)
        process.kill()
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    for leftover in psutil.process_iter(["cmdline"]):  # the killed driver's Ray instance
        if str(ray_dir) in " ".join(leftover.info["cmdline"] or []):
            leftover.kill()
    flows, _ = open_runs(RUN_ID)
    assert flows, "a SIGKILLed run should have left its flow run open"
    lease = store / "runs" / RUN_ID / "_LEASE.json"
    holder = json.loads(lease.read_text())["holder"]
    assert f"pid {process.pid}" in holder
    lease.unlink()  # as the refusal advises once the holder is known to be dead
    process = start_run(store, ray_dir, log, prefect_server)
    assert process.wait(timeout=600) == 0, log.read_text()[-3000:]
    assert "orphaned flow run" in log.read_text()
    flows, tasks = open_runs(RUN_ID)
    assert flows == [] and tasks == [], (flows, tasks)
    record = json.loads((store / "runs" / RUN_ID / "run.json").read_text())
    assert record["records"]["red_ball/custom-diffusion"]["train"]["resumed_from_step"] > 0


@pytest.fixture
def read_only_store(tmp_path: Path):
    """A local store on a tmpfs remounted read-only after a first write (we run as root)."""
    from eqdiff.store import open_store

    root = tmp_path / "store"
    root.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(root)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        store = open_store(str(root))
        store.put_bytes("runs/r1/kept.txt", b"written before")
        subprocess.run(["mount", "-o", "remount,ro", str(root)], check=True)
        yield store
    finally:
        subprocess.run(["umount", str(root)], check=True)


def test_a_run_record_the_store_cannot_take_goes_to_a_named_local_file(read_only_store,
                                                                        tmp_path, caplog):
    from flows.customize import save_run_record

    # importing Prefect may have reset the root logger's handlers (caplog's among them)
    logging.getLogger("flows").addHandler(caplog.handler)
    record = {"run_id": "r1", "status": {"red_ball": "failed: masks: the store is read-only"}}
    started = time.monotonic()
    where = save_run_record(read_only_store, "r1", record, tmp_path / "work")
    assert time.monotonic() - started < 2  # read-only is permanent: not retried
    saved = json.loads(Path(where).read_text())
    assert saved["status"] == record["status"] and saved["record_at"] == where
    assert Path(where).parent == tmp_path / "work" / "run-records"
    errors = sorted({r.getMessage() for r in caplog.records if r.levelname == "ERROR"})
    assert len(errors) == 1 and "read-only" in errors[0] and where in errors[0]
    assert "runs/r1/run.json" in errors[0]
    logging.getLogger("flows").removeHandler(caplog.handler)
