"""Starting and stopping the Prefect workers and serve processes the flow and cluster tests
start (importable as ``processes``: ``tests/`` is on the path through its conftest)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path


def stop_group(process: subprocess.Popen) -> None:
    """SIGTERM the process group of ``process`` (started with ``start_new_session``), then
    SIGKILL it if it is still there after 30 s."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


def start_worker(pool: str, log: Path) -> subprocess.Popen:
    """``prefect worker start`` with this process's environment (the test's API and home),
    polling every second; in its own process group so its flow runs stop with it."""
    env = {**os.environ, "PREFECT_WORKER_QUERY_SECONDS": "1",
           "PREFECT_WORKER_PREFETCH_SECONDS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--type", "process"],
        env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)


def tail(path: Path, chars: int = 4000) -> str:
    """The end of a log file, for assertion messages."""
    return path.read_text(errors="replace")[-chars:] if path.is_file() else "(no log)"


def refresh_prefect_settings() -> None:
    """Make Prefect in this process read its settings from the environment again: it fixes them
    when first imported, which collecting the tests (``from prefect import flow``) does before
    any fixture has set ``PREFECT_API_URL``; without this, a client or flow here would use
    another server (or start a temporary one) instead of the fixture's."""
    if "prefect" in sys.modules:
        import prefect.context

        prefect.context.refresh_global_settings_context()
