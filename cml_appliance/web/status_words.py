"""The one mapping from the status values the API speaks to what a person reads.

CML's values (ENGINE_RUNNING, APPLICATION_STARTING, a model build's "build failed", ...) stay
unchanged in the API; every page shows them through this table: a short word, a tone (the colour)
and an icon, with the raw value kept in a tooltip. The browser gets the same table as JSON (base
template), so pages that update a status themselves show the same words.
"""

from __future__ import annotations

import dataclasses
import json
from datetime import datetime
from typing import Any

from markupsafe import Markup


@dataclasses.dataclass(frozen=True)
class StatusWord:
    word: str
    tone: str  # ok, busy, done, bad, idle: the stylesheet's colours
    icon: str  # a symbol, decorative (the word says it all), from fonts every system has: no emoji


_BUSY, _OK, _DONE, _BAD, _IDLE = "busy", "ok", "done", "bad", "idle"
RUNNING = StatusWord("Running", _OK, "●")
STARTING = StatusWord("Starting", _BUSY, "◔")
STOPPING = StatusWord("Stopping", _BUSY, "◔")
STOPPED = StatusWord("Stopped", _IDLE, "■")
FAILED = StatusWord("Failed", _BAD, "✕")

WORDS: dict[str, StatusWord] = {
    # Workloads (CML's EngineStatus)
    "ENGINE_SCHEDULING": StatusWord("Scheduling", _BUSY, "◔"),
    "ENGINE_STARTING": STARTING,
    "ENGINE_RUNNING": RUNNING,
    "ENGINE_STOPPING": STOPPING,
    "ENGINE_STOPPED": STOPPED,
    "ENGINE_SUCCEEDED": StatusWord("Succeeded", _DONE, "✓"),
    "ENGINE_FAILED": FAILED,
    "ENGINE_TIMEDOUT": StatusWord("Timed out", _BAD, "◷"),
    "ENGINE_SKIPPED": StatusWord("Skipped", _IDLE, "↷"),
    "ENGINE_UNKNOWN": StatusWord("Unknown", _IDLE, "?"),
    # Applications (CML's ApplicationStatus)
    "APPLICATION_STARTING": STARTING,
    "APPLICATION_RUNNING": RUNNING,
    "APPLICATION_STOPPING": STOPPING,
    "APPLICATION_STOPPED": STOPPED,
    "APPLICATION_FAILED": FAILED,
    "APPLICATION_UNKNOWN": StatusWord("Unknown", _IDLE, "?"),
    # Model builds and deployments (CML's lower-case words; ModelBuild.status's filter values)
    "pending": StatusWord("Building", _BUSY, "◔"),
    "queued": StatusWord("Queued", _BUSY, "◔"),
    "building": StatusWord("Building", _BUSY, "◔"),
    "pushing": StatusWord("Pushing", _BUSY, "◔"),
    "built": StatusWord("Built", _DONE, "✓"),
    "succeeded": StatusWord("Built", _DONE, "✓"),
    "build failed": StatusWord("Build failed", _BAD, "✕"),
    "timedout": StatusWord("Timed out", _BAD, "◷"),
    "unknown": StatusWord("Unknown", _IDLE, "?"),
    "not built": StatusWord("Not built", _IDLE, "○"),
    "deploying": StatusWord("Deploying", _BUSY, "◔"),
    "deployed": StatusWord("Deployed", _OK, "●"),
    "stopping": STOPPING,
    "stopped": STOPPED,
    "failed": FAILED,
    "not deployed": StatusWord("Not deployed", _IDLE, "○"),
    # Experiment runs (CML's ExperimentRunStatus)
    "EXPERIMENT_RUN_SCHEDULED": StatusWord("Scheduled", _BUSY, "◔"),
    "EXPERIMENT_RUN_RUNNING": RUNNING,
    "EXPERIMENT_RUN_FINISHED": StatusWord("Finished", _DONE, "✓"),
    "EXPERIMENT_RUN_FAILED": FAILED,
    "EXPERIMENT_RUN_KILLED": StatusWord("Killed", _BAD, "✕"),
    # A project's creation
    "creating": StatusWord("Cloning", _BUSY, "◔"),
    "success": StatusWord("Ready", _OK, "●"),
    "failure": StatusWord("Creation failed", _BAD, "✕"),
    # A job that has never run
    "never run": StatusWord("Never run", _IDLE, "○"),
}


def status_word(value: str | None) -> StatusWord:
    """The word for a value; an unknown value is shown as itself, never hidden."""
    value = value or ""
    found = WORDS.get(value)
    if found is not None:
        return found
    fallback = value.removeprefix("ENGINE_").removeprefix("APPLICATION_").replace("_", " ").capitalize()
    return StatusWord(fallback or "Unknown", _IDLE, "○")


def words_json() -> Markup:
    """The table for the browser, to sit raw in a <script type="application/json"> (app.js reads it)."""
    text = json.dumps({k: dataclasses.asdict(v) for k, v in WORDS.items()}, ensure_ascii=False)
    return Markup(text.replace("<", "\\u003c"))


def duration(start: datetime | None, end: datetime | None) -> str:
    """'2 h 5 min', '3 min 20 s', '4 s': how long a workload ran (empty when unknown)."""
    if start is None or end is None:
        return ""
    seconds = max(0, int((end - start).total_seconds()))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes} min"
    if minutes:
        return f"{minutes} min {secs} s"
    return f"{secs} s"


def ended_summary(row: Any) -> dict[str, str]:
    """Why a finished workload ended, its exit code and how long it ran, for the pages."""
    start = getattr(row, "running_at", None) or getattr(row, "starting_at", None) or getattr(row, "created_at", None)
    exit_code = getattr(row, "exit_code", None)
    return {
        "reason": getattr(row, "reason", "") or "",
        "exit_code": "" if exit_code is None else str(exit_code),
        "duration": duration(start, getattr(row, "finished_at", None)),
    }
