"""The Prefect UI path a user takes: Deployments → customize-dataset → Run → Custom run, the
parameters entered in the form's own fields (text, numbers, a list, a multi-select and a select;
no JSON), Submit, the run completing, the training task run's log lines (step, loss) found
through the Runs page's task runs, and the report artifact.

Drives headless Chromium (Debian's /usr/bin/chromium; Playwright never downloads a browser)
against the session's Prefect server, with the deployments served by deployments/serve.py in a
subprocess. Screenshots of each step land in test-artifacts/prefect-ui/.

The UI finds its API through ``/ui-settings``, whose ``api_url`` is the server's
PREFECT_UI_API_URL setting: ``http://127.0.0.1:4200/api`` unless set, whatever port the server
runs on. flows/server.py starts the test server on a free port without setting it, so the page
would talk to port 4200 (nothing, or another server). The test rewrites that one response to
the fixture's API URL.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from processes import stop_group

logger = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
SHOTS = PROJECT_ROOT / "test-artifacts" / "prefect-ui"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--disable-dev-shm-usage"]
DEPLOYMENT = "customize-dataset/customize-dataset"
SERVE_TIMEOUT_S = 120.0
RUN_TIMEOUT_S = 300.0
UI_TIMEOUT_MS = 30_000
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium"),
]


def _form_field(page: Any, label: str) -> Any:
    """The Prefect UI form's property titled ``label`` (its header, description and control),
    not the ones nested in it."""
    return page.locator(
        "xpath=//div[contains(concat(' ', normalize-space(@class), ' '), ' schema-form-property ')]"
        "[./div[contains(@class, 'p-label__header')]"
        "//span[contains(@class, 'schema-form-property__label')]"
        f"[normalize-space()='{label} (Optional)']]")


def _select(page: Any, label: str, wanted: set[str]) -> None:
    """Make exactly ``wanted`` the chosen options of the multi-select property ``label``."""
    control = _form_field(page, label).locator("button.p-select-button__control")
    control.focus()
    control.press("ArrowDown")  # opens the option list
    options = page.get_by_role("option")
    options.first.wait_for()
    for option in options.all():
        chosen = "p-select-option--selected" in (option.get_attribute("class") or "")
        if (option.inner_text().strip() in wanted) != chosen:
            option.click()
    control.press("Escape")


def _choose(page: Any, label: str, value: str) -> None:
    """Choose ``value`` in the single-select property ``label``."""
    control = _form_field(page, label).locator("button.p-select-button__control")
    control.focus()
    control.press("ArrowDown")
    page.get_by_role("option", name=value, exact=True).click()


def _tail(path: Path, chars: int = 4000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.is_file() else "(no log)"


@pytest.fixture
def served(prefect_server: str, tmp_path: Path) -> Iterator[tuple[Any, Path]]:
    """deployments/serve.py in its own process group, until its deployment is registered;
    yields (the customize-dataset deployment, the serve log). Stopped before the server."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    log = tmp_path / "serve.log"
    process = subprocess.Popen(
        [sys.executable, str(PROJECT_ROOT / "deployments" / "serve.py")],
        cwd=PROJECT_ROOT, env={**os.environ, "PREFECT_RUNNER_POLL_FREQUENCY": "1"},
        stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + SERVE_TIMEOUT_S
        with get_client(sync_client=True) as client:
            while True:
                assert process.poll() is None, f"serve.py exited:\n{_tail(log)}"
                try:  # a worker-bound deployment of the same name (an earlier test) is replaced
                    deployment = client.read_deployment_by_name(DEPLOYMENT)
                    if deployment.work_pool_name is None:
                        break
                except ObjectNotFound:
                    pass
                assert time.monotonic() < deadline, (
                    f"{DEPLOYMENT} not served after {SERVE_TIMEOUT_S:.0f} s:\n{_tail(log)}")
                time.sleep(0.5)
        yield deployment, log
    finally:
        stop_group(process)


def test_custom_run_from_the_prefect_ui(prefect_server: str, served: tuple[Any, Path],
                                        tmp_path: Path) -> None:
    os.environ.setdefault("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")
    from playwright.sync_api import Page, Route, expect, sync_playwright
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        TaskRunFilter,
        TaskRunFilterName,
        TaskRunFilterStartTime,
    )

    from flows.params import CustomizeParams

    deployment, serve_log = served
    ui_url = prefect_server.removesuffix("/api")
    store = tmp_path / "store"
    # a tiny run: one subject, one method, two steps, one image of one prompt, in the flow's
    # process; the form's other fields (the overrides too) keep what it starts with
    entered = {"dataset": "demo", "subjects": ["red_ball"], "methods": ["textual-inversion"],
               "steps": 2, "base_model": "tiny", "images_per_prompt": 1, "max_prompts": 1,
               "compute": "local", "storage_url": str(store)}
    unit = "red_ball · textual-inversion"  # how task runs name a (subject, method)
    SHOTS.mkdir(parents=True, exist_ok=True)
    for old in SHOTS.glob("*.png"):
        old.unlink()

    def shot(page: Page, name: str, *, full_page: bool = False) -> Path:
        path = SHOTS / f"{name}.png"
        page.screenshot(path=str(path), full_page=full_page)
        logger.info("screenshot: %s", path)
        return path

    def ui_settings(route: Route) -> None:  # see the module docstring
        response = route.fetch()
        route.fulfill(response=response, json={**response.json(), "api_url": prefect_server})

    profile = tmp_path / "chromium-profile"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch_persistent_context(
            str(profile), executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 1000})
        page = browser.new_page()
        page.set_default_timeout(UI_TIMEOUT_MS)
        page.route("**/ui-settings", ui_settings)
        try:
            # Deployments → customize-dataset (the flow has the same name: take the
            # deployment's link)
            page.goto(f"{ui_url}/deployments", wait_until="networkidle")
            page.locator("a[href*='/deployments/deployment/']").filter(
                has_text=re.compile(r"^\s*customize-dataset\s*$")).first.click()
            page.wait_for_url(f"**/deployments/deployment/{deployment.id}**")
            expect(page.get_by_text("flows.customize.customize_dataset")).to_be_visible()
            shot(page, "01-deployment")

            # Run → Custom run: the params model as a nested form
            page.get_by_role("button", name="Run", exact=True).click()
            page.get_by_role("button", name="Custom run").click()
            page.wait_for_url(f"**/deployments/deployment/{deployment.id}/run**")
            expect(page.get_by_text("Images Per Prompt (Optional)")).to_be_visible()
            shot(page, "02-custom-run-form", full_page=True)

            # The form's own fields, as a user fills them
            for label, value in (("Dataset", entered["dataset"]),
                                 ("Base Model", entered["base_model"]),
                                 ("Storage Url", entered["storage_url"])):
                _form_field(page, label).locator("textarea").fill(value)
            for label, value in (("Steps", entered["steps"]),
                                 ("Max Prompts", entered["max_prompts"]),
                                 ("Images Per Prompt", entered["images_per_prompt"])):
                _form_field(page, label).locator("input").fill(str(value))
            subjects = _form_field(page, "Subjects")
            subjects.get_by_role("button", name="Add item").click()
            subjects.locator("textarea").last.fill(entered["subjects"][0])
            _select(page, "Methods", set(entered["methods"]))
            _choose(page, "Compute", entered["compute"])
            for label, shown in (("Methods", "textual-inversion"), ("Compute", "local")):
                control = _form_field(page, label).locator("button.p-select-button__control")
                expect(control).to_have_accessible_name(shown)
            shot(page, "03-custom-run-filled", full_page=True)

            by_deployment = DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id]))
            with get_client(sync_client=True) as client:  # earlier tests may have run it
                before = {r.id for r in client.read_flow_runs(deployment_filter=by_deployment)}
            started, submitted_at = time.monotonic(), datetime.now(UTC)
            page.get_by_role("button", name="Submit", exact=True).click()
            page.wait_for_url(f"**/deployments/deployment/{deployment.id}?**")

            # the run the form created, then its page until it completes
            with get_client(sync_client=True) as client:
                runs = [r for r in client.read_flow_runs(deployment_filter=by_deployment)
                        if r.id not in before]
                assert len(runs) == 1, f"expected the one submitted run, got {runs}"
                run = runs[0]
                submitted = CustomizeParams(**run.parameters["params"])
                assert {k: getattr(submitted, k) for k in entered} == entered, run.parameters
                run_id = submitted.derived_run_id()
                page.goto(f"{ui_url}/flow-runs/flow-run/{run.id}", wait_until="networkidle")
                shot(page, "04-run-started")
                while True:
                    run = client.read_flow_run(run.id)
                    if run.state and run.state.type.value in FINAL:
                        break
                    assert time.monotonic() - started < RUN_TIMEOUT_S, (
                        f"flow run still {run.state.name if run.state else None} after "
                        f"{RUN_TIMEOUT_S:.0f} s:\n{_tail(serve_log)}")
                    time.sleep(1.0)
                assert run.state.is_completed(), f"{run.state}:\n{_tail(serve_log)}"
                logger.info("flow run %s completed in %.0f s", run.name,
                            time.monotonic() - started)
                artifacts = {a.key: a.type for a in client.read_artifacts()
                             if a.flow_run_id == run.id and a.key}
                # this run's task runs of the unit, wherever they sit under the flow run
                ours = TaskRunFilter(name=TaskRunFilterName(like_=unit),
                                     start_time=TaskRunFilterStartTime(after_=submitted_at))
                task_runs = {t.name.split(" · ")[0]: t.id
                             for t in client.read_task_runs(task_run_filter=ours)}
            assert set(task_runs) == {"train", "generate"}, task_runs

            report_key, scores_key = f"report-{run_id}", f"scores-{run_id}"
            assert artifacts.get(report_key) == "markdown", artifacts
            assert artifacts.get(scores_key) == "table", artifacts

            # the run page shows Completed (the UI polls; reload to not wait on it)
            page.reload(wait_until="networkidle")
            expect(page.get_by_text("Completed").first).to_be_visible()
            expect(page.get_by_text(run.name).first).to_be_visible()
            shot(page, "05-run-completed")

            # Runs → Task runs, searched by subject and method: the training's page, its log
            # lines (one per logged step, with the loss)
            page.goto(f"{ui_url}/runs", wait_until="networkidle")
            page.get_by_role("tab", name="Task runs").click()
            page.get_by_placeholder("Search by task run name").fill(unit)
            for stage, task_run_id in task_runs.items():
                expect(page.locator(f"a[href$='/runs/task-run/{task_run_id}']")).to_have_text(
                    f"{stage} · {unit}")
            shot(page, "06-task-runs")
            page.locator(f"a[href$='/runs/task-run/{task_runs['train']}']").click()
            page.wait_for_url(f"**/runs/task-run/{task_runs['train']}**")
            expect(page.get_by_text(re.compile(r"step 2/2 loss \d+\.\d{4}, [\d.]+ steps/s, "
                                               r"ETA 0s"))).to_be_visible()
            expect(page.get_by_text(re.compile(r"step 1/2 loss"))).to_be_visible()
            shot(page, "07-train-task-run-logs")

            page.goto(f"{ui_url}/flow-runs/flow-run/{run.id}", wait_until="networkidle")
            page.get_by_role("tablist").get_by_text("Artifacts", exact=True).click()
            report_link = page.get_by_text(report_key, exact=True).first
            expect(report_link).to_be_visible()
            expect(page.get_by_text(scores_key, exact=True).first).to_be_visible()
            shot(page, "08-run-artifacts")

            report_link.click()
            page.wait_for_url("**/artifacts/**")
            expect(page.get_by_text(f"EqDiff run {run_id}").first).to_be_visible()
            all_done = re.compile(r"(\d+) of \1 \(subject, method\) units done")
            expect(page.get_by_text(all_done).first).to_be_visible()
            shot(page, "09-report-artifact", full_page=True)
        except Exception:
            path = shot(page, "failure", full_page=True)
            logger.error("the UI at failure: %s (page %s)", path, page.url)
            raise
        finally:
            browser.close()

    record = json.loads((store / "runs" / run_id / "run.json").read_text())
    assert record["status"] == {"red_ball": "done", "red_ball/textual-inversion": "done"}
