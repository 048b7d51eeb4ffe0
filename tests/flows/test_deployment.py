"""The deployments of deployments/prefect.yaml: registered with ``prefect deploy`` on the session's
Prefect server, run by a process worker, triggered through the API as the UI does. And the run
files users start from (examples/, the README's)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from processes import start_worker, stop_group, tail

RUN_TIMEOUT_S = 600.0
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def test_prefect_yaml_deployment_runs_on_a_process_worker(prefect_server, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    from flows.deploy import PROJECT_ROOT, WORK_POOL, deploy_all, ensure_work_pool

    ensure_work_pool(WORK_POOL)
    worker_log = tmp_path / "worker.log"
    worker = start_worker(WORK_POOL, worker_log)  # starts up while the deployments register
    try:
        names = deploy_all(WORK_POOL)
        assert names == ["customize-dataset/customize-dataset", "toy-benchmark/toy-benchmark",
                         "customize-dataset/nightly-reevaluation"]
        store = tmp_path / "store"
        params = {"dataset": "demo", "subjects": ["red_ball"], "methods": ["textual-inversion"],
                  "steps": 2, "images_per_prompt": 1, "max_prompts": 1, "base_model": "tiny",
                  "storage_url": str(store), "compute": "local", "run_id": "deploytest",
                  "overrides": {"sample.steps": 2}}
        with get_client(sync_client=True) as client:
            nightly = client.read_deployment_by_name(names[2])
            assert nightly.paused and nightly.work_pool_name == WORK_POOL
            assert [(s.schedule.cron, s.active) for s in nightly.schedules] == [
                ("0 2 * * *", False)]
            assert not client.read_flow_runs(deployment_filter=DeploymentFilter(
                id=DeploymentFilterId(any_=[nightly.id])))  # paused: nothing scheduled

            deployment = client.read_deployment_by_name(names[0])
            assert deployment.pull_steps == [{"prefect.deployments.steps.set_working_directory":
                                              {"directory": str(PROJECT_ROOT)}}]
            assert deployment.parameters["params"]["base_model"] == "toy"
            benchmark = client.read_deployment_by_name(names[1])
            assert benchmark.parameters["params"]["seeds"] == [0, 1, 2, 3, 4]
            run = client.create_flow_run_from_deployment(deployment.id,
                                                         parameters={"params": params})
            deadline = time.monotonic() + RUN_TIMEOUT_S
            while True:
                run = client.read_flow_run(run.id)
                if run.state and run.state.type.value in FINAL:
                    break
                assert worker.poll() is None, f"the worker exited:\n{tail(worker_log)}"
                assert time.monotonic() < deadline, (
                    f"flow run still {run.state.name if run.state else None} after "
                    f"{RUN_TIMEOUT_S:.0f} s:\n{tail(worker_log)}")
                time.sleep(1.0)
        assert run.state.is_completed(), f"{run.state}:\n{tail(worker_log)}"
        assert run.work_pool_name == WORK_POOL and run.deployment_id == deployment.id
    finally:
        stop_group(worker)

    record = json.loads((store / "runs" / "deploytest" / "run.json").read_text())
    assert record["status"] == {"red_ball": "done", "red_ball/textual-inversion": "done"}
    assert record["params"]["compute"] == "local"
    sample_dir = store / "runs" / "deploytest" / "samples" / "red_ball" / "textual-inversion"
    assert (sample_dir / "00_0.png").is_file() and (sample_dir / "_SUCCESS.json").is_file()
    assert (store / "runs" / "deploytest" / "report" / "report.html").is_file()


def test_serve_builds_the_declared_deployments(monkeypatch):
    """deployments/serve.py serves the same declarations (no server needed to build them)."""
    from flows.deploy import PROJECT_ROOT, runner_deployments

    monkeypatch.chdir(PROJECT_ROOT)
    served = {d.name: d for d in runner_deployments()}
    assert set(served) == {"customize-dataset", "nightly-reevaluation", "toy-benchmark"}
    assert served.pop("toy-benchmark").entrypoint == "flows.toy_benchmark.toy_benchmark"
    for deployment in served.values():
        assert deployment.entrypoint == "flows.customize.customize_dataset"  # a module path
        assert deployment.parameters["params"]["dataset"] == "toyworld"
    for deployment in [*served.values()]:  # one flow run at a time; more are queued
        assert deployment.concurrency_limit == 1
        assert deployment.concurrency_options.collision_strategy == "ENQUEUE"
    assert not served["customize-dataset"].paused and not served["customize-dataset"].schedules
    nightly = served["nightly-reevaluation"]
    assert nightly.paused
    assert [(s.schedule.cron, s.active) for s in nightly.schedules] == [("0 2 * * *", False)]
    assert nightly.parameters["params"]["run_id"] == "nightly-demo"


def test_worker_runs_ship_the_stage_loggers_to_prefect() -> None:
    """A process worker's flow run gets the environment that sends the stages' log lines to
    their task runs, the same loggers as `eqdiff run` and served runs."""
    import yaml

    from flows.deploy import PREFECT_FILE
    from tasks.logs import STAGE_LOGGERS

    declared = yaml.safe_load(PREFECT_FILE.read_text())["deployments"]
    for deployment in declared:
        env = deployment["work_pool"]["job_variables"]["env"]
        assert env["PREFECT_LOGGING_EXTRA_LOGGERS"].split(",") == list(STAGE_LOGGERS)
        assert env["PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW"] == "ignore"


RUN_FILES = sorted((Path(__file__).parents[2] / "examples").glob("*.yaml"))


def _readme_run_file() -> str:
    readme = (Path(__file__).parents[2] / "README.md").read_text("utf-8")
    after = readme[readme.index("A run file is YAML"):]
    start = after.index("```yaml\n") + len("```yaml\n")
    return after[start:after.index("```\n", start)]


def test_examples_holds_run_files() -> None:
    assert {path.name for path in RUN_FILES} >= {"dreambench.yaml", "dreambench-mini.yaml"}


@pytest.mark.parametrize("path", RUN_FILES, ids=lambda path: path.name)
def test_example_run_files_are_valid_runs(path: Path) -> None:
    """Every run file in examples/ (and the README's) holds only flow parameters, and its
    overrides name real configuration fields."""
    from flows.cli import _params, load_run_file

    params = _params(load_run_file(path))
    config = params.run_config(base_model=params.base_model)
    for method in config.methods:
        assert config.training(method).steps == (params.recipes.get(method.name, {}).get("steps")
                                                 or params.steps or method.recipe.steps)
    assert params.methods


def test_the_readme_run_file_is_a_valid_run(tmp_path: Path) -> None:
    from flows.cli import _params, load_run_file

    path = tmp_path / "run.yaml"
    path.write_text(_readme_run_file())
    params = _params(load_run_file(path))
    config = params.run_config(base_model=params.base_model)
    eqdiff = config.method("eqdiff")
    assert len(config.methods) == 7 and config.training(eqdiff).learning_rate == 4.0e-5
    assert config.training(config.method("textual-inversion")).steps == 1000
    assert config.method("eqdiff-mgdp-loss-only").mgdp_parts == "loss-only"


def test_toy_deployments_train_with_the_toy_models_settings() -> None:
    """deployments/prefect.yaml cannot import Python: its copy of the toy model's run settings
    must match the one place they are defined (eqdiff.fixtures)."""
    import yaml

    from eqdiff.fixtures import fixture_run_overrides

    spec = yaml.safe_load((Path(__file__).resolve().parents[2] / "deployments" / "prefect.yaml")
                          .read_text())
    toy = [d["parameters"]["params"] for d in spec["deployments"]
           if d.get("parameters", {}).get("params", {}).get("base_model") == "toy"]
    assert toy, "no deployment runs the toy model"
    for params in toy:
        overrides = dict(params["overrides"])
        overrides.pop("train.checkpoint_every", None)
        assert overrides == fixture_run_overrides("toy")
