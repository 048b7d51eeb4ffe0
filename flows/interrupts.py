"""Nothing left "Running" in Prefect after a run was interrupted or its process died.

- **Interrupted** (SIGINT, or SIGTERM, which the command line turns into the same): Prefect
  marks the flow runs Crashed and calls their ``on_crashed`` hooks; :func:`crash_open_task_runs`
  is that hook. It marks the flow run's task runs that never reached a final state, for
  instance those whose Ray worker was stopped with the run, Crashed too.
- **Killed** (SIGKILL, a lost machine): nothing in the process runs. The next run of the same
  run id, once it holds the run's lease (so no live process is running that id),
  finds the flow runs of that id that are still open and marks them, their subflows and their
  task runs Crashed (:func:`crash_orphaned_runs`).

Flow runs are found by name: a customize run's flow run is named after its run id.
"""

from __future__ import annotations

import logging
from typing import Any
from uuid import UUID

from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterName,
    FlowRunFilterParentFlowRunId,
    FlowRunFilterState,
    FlowRunFilterStateType,
    TaskRunFilter,
    TaskRunFilterState,
    TaskRunFilterStateType,
)
from prefect.client.schemas.objects import StateType
from prefect.states import Crashed

logger = logging.getLogger(__name__)

OPEN_STATES = [StateType.SCHEDULED, StateType.PENDING, StateType.RUNNING, StateType.PAUSED]


def _crash_task_runs(client: SyncPrefectClient, flow_run_ids: list[UUID], reason: str) -> int:
    open_runs = client.read_task_runs(
        flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=flow_run_ids)),
        task_run_filter=TaskRunFilter(state=TaskRunFilterState(
            type=TaskRunFilterStateType(any_=OPEN_STATES))))
    for task_run in open_runs:
        client.set_task_run_state(task_run.id, Crashed(message=reason), force=True)
    return len(open_runs)


def crash_open_task_runs(flow: Any, flow_run: Any, state: Any) -> None:
    """``on_crashed`` hook: the crashed flow run's unfinished task runs are marked Crashed."""
    reason = f"its flow run crashed: {state.message or state.name}"
    with get_client(sync_client=True) as client:
        count = _crash_task_runs(client, [flow_run.id], reason)
    if count:
        logger.warning("flow run %s crashed: %d unfinished task run(s) marked Crashed",
                       flow_run.name, count)


def crash_orphaned_runs(run_name: str, current: UUID, holder: str) -> int:
    """Mark the open flow runs named ``run_name`` other than ``current`` (with their subflows
    and task runs) Crashed: their process is gone, since ``holder`` (this run) holds the run
    id's lease. Returns how many flow runs were marked."""
    reason = f"orphaned: its process is gone (the run id is now leased by {holder})"
    with get_client(sync_client=True) as client:
        open_filter = FlowRunFilterState(type=FlowRunFilterStateType(any_=OPEN_STATES))
        orphans = [run for run in client.read_flow_runs(flow_run_filter=FlowRunFilter(
            name=FlowRunFilterName(any_=[run_name]), state=open_filter)) if run.id != current]
        if not orphans:
            return 0
        subflows = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[r.id for r in orphans]),
            state=open_filter))
        runs = [*orphans, *subflows]
        tasks = _crash_task_runs(client, [r.id for r in runs], reason)
        for run in runs:
            client.set_flow_run_state(run.id, Crashed(message=reason), force=True)
    logger.warning("run %s: marked %d orphaned flow run(s) and %d task run(s) Crashed (%s)",
                   run_name, len(runs), tasks, ", ".join(str(r.id) for r in orphans))
    return len(runs)
