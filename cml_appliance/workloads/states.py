"""CML's EngineStatus values and the one state machine every workload follows."""

from __future__ import annotations

SCHEDULING = "ENGINE_SCHEDULING"
STARTING = "ENGINE_STARTING"
RUNNING = "ENGINE_RUNNING"
STOPPING = "ENGINE_STOPPING"
STOPPED = "ENGINE_STOPPED"
SUCCEEDED = "ENGINE_SUCCEEDED"
FAILED = "ENGINE_FAILED"
TIMEDOUT = "ENGINE_TIMEDOUT"
# A job run that never ran: its cron fire found the job's previous run still going. It is
# recorded with this status from the start (no transitions lead here).
SKIPPED = "ENGINE_SKIPPED"

ACTIVE = (SCHEDULING, STARTING, RUNNING, STOPPING)
FINISHED = (STOPPED, SUCCEEDED, FAILED, TIMEDOUT, SKIPPED)

# status -> the statuses it may move to. Finished states are final.
TRANSITIONS: dict[str, frozenset[str]] = {
    # Kubernetes may show a pod running before the watcher saw it start: SCHEDULING -> RUNNING.
    SCHEDULING: frozenset({STARTING, RUNNING, STOPPING, STOPPED, SUCCEEDED, FAILED}),
    STARTING: frozenset({RUNNING, STOPPING, STOPPED, SUCCEEDED, FAILED, TIMEDOUT}),
    RUNNING: frozenset({STOPPING, STOPPED, SUCCEEDED, FAILED, TIMEDOUT}),
    STOPPING: frozenset({STOPPED, SUCCEEDED, FAILED, TIMEDOUT}),
    STOPPED: frozenset(),
    SUCCEEDED: frozenset(),
    FAILED: frozenset(),
    TIMEDOUT: frozenset(),
    SKIPPED: frozenset(),
}

# The timestamp column each status sets when entered.
STAMPS = {STARTING: "starting_at", RUNNING: "running_at", STOPPING: "stopping_at"} | {s: "finished_at" for s in FINISHED}


def sources_of(target: str) -> list[str]:
    """The statuses from which `target` may be entered."""
    return [source for source, targets in TRANSITIONS.items() if target in targets]


def allowed(source: str, target: str) -> bool:
    return target in TRANSITIONS.get(source, frozenset())
