"""API v2: jobs and job runs, as CML's swagger defines them, plus run logs (CML has none) and the
legacy v1 start (`POST /api/v1/projects/{owner}/{slug}/jobs/{id}/start`, HTTP Basic with the key)."""

from __future__ import annotations

import base64
import json
from typing import Any

from aiohttp import web

from cml_appliance.api.bodies import ANY, BOOL, FLOAT, INT, STR, STR_LIST, STR_MAP
from cml_appliance.api.common import json_body, list_query, page
from cml_appliance.auth import api_keys
from cml_appliance.auth.permissions import Role
from cml_appliance.core.errors import InvalidArgument, NotFound, Unauthenticated
from cml_appliance.core.timefmt import rfc3339
from cml_appliance.jobs.schedule import english
from cml_appliance.jobs.service import (
    JOB_FILTER_KEYS,
    JOB_SORT_KEYS,
    RUN_FILTER_KEYS,
    RUN_SORT_KEYS,
    Job,
)
from cml_appliance.projects import store as project_store
from cml_appliance.web.context import current_user
from cml_appliance.web.keys import JOBS, POOL, STATUS_HUB, WORKLOADS
from cml_appliance.workloads.store import Workload
from cml_appliance.workloads.streams import event_stream, logs_response


def job_json(job: Job, project_public_id: str, project_name: str = "", slug: str = "") -> dict[str, Any]:
    return {
        "id": job.public_id,
        "name": job.name,
        "script": job.script,
        "arguments": job.arguments,
        "cpu": job.cpu,
        "memory": job.memory,
        "nvidia_gpu": job.nvidia_gpu,
        "kernel": "",
        "runtime_identifier": job.runtime_identifier,
        "runtime_addon_identifiers": [],
        "environment": json.dumps(job.environment),
        "schedule": job.schedule,
        "english_schedule": english(job.schedule),
        "timezone": job.timezone,
        "paused": job.paused,
        "type": job.type,
        "parent_id": job.parent_public_id or "",
        "timeout": str(job.timeout_seconds),
        "kill_on_timeout": job.kill_on_timeout,
        "created_at": rfc3339(job.created_at),
        "updated_at": rfc3339(job.updated_at),
        "creator": job.creator,
        "owner": job.creator,
        "project": {"public_identifier": project_public_id, "name": project_name, "slug": slug,
                    "default_project_engine": "ml_runtime"},
        "engine_image_id": "0",
        "retry_enabled": job.retry_enabled,
        "max_retry": job.max_retry,
        "retry_delay": job.retry_delay,
        "retry_for_script_failure": job.retry_for_script_failure,
        "retry_for_system_failure": job.retry_for_system_failure,
        "retry_for_timedout_runs": job.retry_for_timedout_runs,
        "retry_for_skipped_runs": job.retry_for_skipped_runs,
        "recipients": job.recipients,
        "attachments": job.attachments,
        **{legacy: ", ".join(r["email"] for r in job.recipients if r[flag]) for legacy, flag in LEGACY_RECIPIENTS.items()},
    }


# CML's older recipient fields: comma-separated addresses per ending, the same as `recipients`
# with one flag set. Both are accepted, and merged by address.
LEGACY_RECIPIENTS = {"success_recipients": "notify_on_success", "failure_recipients": "notify_on_failure",
                     "timeout_recipients": "notify_on_timeout", "stopped_recipients": "notify_on_stop"}


def _merge_legacy_recipients(body: dict[str, Any]) -> None:
    given = {legacy: body.pop(legacy) for legacy in LEGACY_RECIPIENTS if legacy in body}
    if not any(value.strip() for value in given.values()):
        return
    recipients = body.get("recipients", [])
    if not isinstance(recipients, list):
        return  # the service says what is wrong with it
    by_email: dict[str, dict[str, Any]] = {}
    for item in recipients:
        if isinstance(item, dict) and isinstance(item.get("email"), str):
            by_email[item["email"]] = dict(item)
    for legacy, addresses in given.items():
        for email in filter(None, (a.strip() for a in addresses.split(","))):
            by_email.setdefault(email, {"email": email})[LEGACY_RECIPIENTS[legacy]] = True
    body["recipients"] = list(by_email.values())


TIME_FIELDS = ("scheduling_at", "starting_at", "running_at", "finished_at")


def run_json(run: Workload, job_public_id: str) -> dict[str, Any]:
    data = {
        "id": run.public_id,
        "project_id": run.project_public_id,
        "job_id": job_public_id,
        "status": run.status,
        "created_at": rfc3339(run.created_at),
        "scheduling_at": rfc3339(run.scheduling_at),
        "starting_at": rfc3339(run.starting_at),
        "running_at": rfc3339(run.running_at),
        "finished_at": rfc3339(run.finished_at),
        "kernel": "",
        "cpu": run.cpu,
        "memory": run.memory,
        "nvidia_gpu": run.nvidia_gpu,
        "arguments": run.arguments,
        "environment": json.dumps(run.environment),
        "creator": run.creator,
        "runtime_identifier": run.runtime_identifier,
        # Ours, beyond CML: why the run ended the way it did, and its exit code.
        "reason": run.reason,
        "exit_code": run.exit_code,
        "attempt": run.attempt,
    }
    # As in proto3 JSON, a time that has not happened yet is left out, not sent empty.
    return {k: v for k, v in data.items() if not (k in TIME_FIELDS and v == "")}


RECIPIENTS = ANY
JOB_SPEC = {
    "project_id": STR, "name": STR, "script": STR, "cpu": FLOAT, "memory": FLOAT, "nvidia_gpu": INT,
    "parent_job_id": STR, "parent_id": STR, "environment": STR_MAP, "arguments": STR, "timeout": ANY, "schedule": STR,
    "kernel": STR, "recipients": RECIPIENTS, "attachments": STR_LIST, "runtime_identifier": STR,
    "runtime_addon_identifiers": STR_LIST, "kill_on_timeout": BOOL, "timezone": STR, "paused": BOOL,
    "success_recipients": STR, "failure_recipients": STR, "timeout_recipients": STR, "stopped_recipients": STR,
    "run_as": INT, "accelerator_label_id": ANY, "retry_enabled": BOOL, "max_retry": INT, "retry_delay": INT,
    "retry_for_script_failure": BOOL, "retry_for_system_failure": BOOL, "retry_for_timedout_runs": BOOL,
    "retry_for_skipped_runs": BOOL, "resource_group_id": INT, "resource_profile_id": INT,
}
# PATCH takes a Job: its output-only fields are dropped, and environment may be a JSON string.
UPDATE_SPEC = JOB_SPEC | {"environment": ANY}
UPDATE_IGNORED = frozenset({"id", "type", "english_schedule", "created_at", "updated_at", "creator", "owner", "project",
                            "engine_image_id", "runtime_addon_identifiers", "kernel"})


def _unused(body: dict[str, Any]) -> None:
    """Fields CML takes that mean nothing here (the kernel follows from the runtime; one resource
    group) are dropped; running as another user is refused rather than ignored. `timeout` is an
    int64, which JSON clients may send quoted."""
    if "timeout" in body:
        try:
            body["timeout"] = int(body["timeout"])
        except (TypeError, ValueError):
            raise InvalidArgument("timeout must be a whole number of seconds") from None
    if body.pop("run_as", 0):
        raise InvalidArgument("run_as is not supported: a job runs as its creator")
    _merge_legacy_recipients(body)
    for key in ("accelerator_label_id", "resource_group_id", "kernel", "runtime_addon_identifiers", "project_id"):
        body.pop(key, None)


async def _project_names(request: web.Request, project_public_id: str) -> tuple[str, str]:
    row = await request.app[POOL].fetchrow("SELECT name, slug FROM projects WHERE public_id = $1", project_public_id)
    return (row["name"], row["slug"]) if row else ("", "")


async def list_jobs(request: web.Request) -> web.Response:
    q = list_query(request, JOB_FILTER_KEYS, JOB_SORT_KEYS)
    project, jobs, more = await request.app[JOBS].list_for_project(current_user(request), request.match_info["project_id"], q)
    return page(request, "jobs", [job_json(j, project.public_id, project.name, project.slug) for j in jobs], q, more)


async def list_all_jobs(request: web.Request) -> web.Response:
    q = list_query(request, JOB_FILTER_KEYS, JOB_SORT_KEYS)
    pairs, more = await request.app[JOBS].list_all(current_user(request), q)
    items = [job_json(job, pid, *(await _project_names(request, pid))) for pid, job in pairs]
    return page(request, "jobs", items, q, more)


async def create_job(request: web.Request) -> web.Response:
    body = await json_body(request, JOB_SPEC)
    project_id = request.match_info["project_id"]
    if body.get("project_id", project_id) != project_id:
        raise InvalidArgument("project_id in the body must match the path")
    _unused(body)
    job = await request.app[JOBS].create(current_user(request), project_id, body)
    return web.json_response(job_json(job, project_id, *(await _project_names(request, project_id))))


async def get_job(request: web.Request) -> web.Response:
    project, job = await request.app[JOBS].get(current_user(request), request.match_info["project_id"], request.match_info["job_id"])
    return web.json_response(job_json(job, project.public_id, project.name, project.slug))


async def update_job(request: web.Request) -> web.Response:
    body = await json_body(request, UPDATE_SPEC, UPDATE_IGNORED)
    if body.pop("id", request.match_info["job_id"]) != request.match_info["job_id"]:
        raise InvalidArgument("id in the body must match the path")
    _unused(body)
    job = await request.app[JOBS].update(current_user(request), request.match_info["project_id"], request.match_info["job_id"], body)
    project_id = request.match_info["project_id"]
    return web.json_response(job_json(job, project_id, *(await _project_names(request, project_id))))


async def delete_job(request: web.Request) -> web.Response:
    await request.app[JOBS].delete(current_user(request), request.match_info["project_id"], request.match_info["job_id"])
    return web.json_response({})


async def create_run(request: web.Request) -> web.Response:
    body = await json_body(request, {"project_id": STR, "job_id": STR, "environment": STR_MAP, "arguments": STR})
    run = await request.app[JOBS].start_run(current_user(request), request.match_info["project_id"], request.match_info["job_id"], body)
    return web.json_response(run_json(run, request.match_info["job_id"]))


async def list_runs(request: web.Request) -> web.Response:
    q = list_query(request, RUN_FILTER_KEYS, RUN_SORT_KEYS)
    job, runs, more = await request.app[JOBS].list_runs(
        current_user(request), request.match_info["project_id"], request.match_info["job_id"], q)
    return page(request, "job_runs", [run_json(r, job.public_id) for r in runs], q, more)


async def get_run(request: web.Request) -> web.Response:
    _, job, run = await request.app[JOBS].get_run(current_user(request), request.match_info["project_id"],
                                                  request.match_info["job_id"], request.match_info["run_id"])
    return web.json_response(run_json(run, job.public_id))


async def stop_run(request: web.Request) -> web.Response:
    run = await request.app[JOBS].stop_run(current_user(request), request.match_info["project_id"],
                                           request.match_info["job_id"], request.match_info["run_id"])
    return web.json_response(run_json(run, request.match_info["job_id"]))


async def run_logs(request: web.Request) -> web.Response:
    _, _, run = await request.app[JOBS].get_run(current_user(request), request.match_info["project_id"],
                                                request.match_info["job_id"], request.match_info["run_id"])
    return logs_response(request, request.app[WORKLOADS].logs, run)


async def run_events(request: web.Request) -> web.StreamResponse:
    _, _, run = await request.app[JOBS].get_run(current_user(request), request.match_info["project_id"],
                                                request.match_info["job_id"], request.match_info["run_id"])
    return await event_stream(request, request.app[POOL], request.app[STATUS_HUB], request.app[WORKLOADS].logs, run)


async def legacy_start(request: web.Request) -> web.Response:
    """CDSW's v1 job start: HTTP Basic with the API key as user name and an empty password (a
    Bearer key is taken too)."""
    header = request.headers.get("Authorization", "")
    scheme, _, encoded = header.partition(" ")
    try:
        if scheme.lower() == "basic":
            key = base64.b64decode(encoded).decode().split(":", 1)[0]
        else:
            key = encoded.strip() if scheme.lower() == "bearer" else ""
    except (ValueError, UnicodeDecodeError):
        key = ""
    if not key:
        raise Unauthenticated("use HTTP Basic with your API key as the user name and an empty password")
    checked = await api_keys.check(request.app[POOL], key, "API")
    if checked.problem or checked.user is None:
        raise Unauthenticated(checked.problem or "API key is not valid")
    user = checked.user
    project = await project_store.get_by_owner_slug(request.app[POOL], user, request.match_info["owner"],
                                                     request.match_info["slug"])
    if project is None or project.role < Role.READ:
        raise NotFound("project not found")
    body = await json_body(request, {"environment": STR_MAP, "arguments": STR})
    run = await request.app[JOBS].start_run(user, project.public_id, request.match_info["job_id"], body)
    return web.json_response({"engine_id": run.public_id})


def legacy_routes() -> list[web.RouteDef]:
    """The v1 start, and the same under /api/v2 as CDSW 1.10's documentation prints it. Added
    before the project routes: a project whose slug is "files" would otherwise send the v2 form
    to the file routes."""
    return [
        web.post("/api/v1/projects/{owner}/{slug}/jobs/{job_id}/start", legacy_start, name="api_v1_start_job"),
        web.post("/api/v2/projects/{owner}/{slug}/jobs/{job_id}/start", legacy_start, name="api_v1_start_job_v2_path"),
    ]


def routes() -> list[web.RouteDef]:
    base = "/api/v2/projects/{project_id}/jobs"
    job = base + "/{job_id:[a-z0-9-]+}"
    run = job + "/runs/{run_id:[a-z0-9]+}"
    return [
        web.get("/api/v2/jobs", list_all_jobs, name="api_list_all_jobs"),
        web.get(base, list_jobs, name="api_list_jobs"),
        web.post(base, create_job, name="api_create_job"),
        web.get(job, get_job, name="api_get_job"),
        web.patch(job, update_job, name="api_update_job"),
        web.delete(job, delete_job, name="api_delete_job"),
        web.get(job + "/runs", list_runs, name="api_list_job_runs"),
        web.post(job + "/runs", create_run, name="api_create_job_run"),
        web.get(run, get_run, name="api_get_job_run"),
        web.post(run + ":stop", stop_run, name="api_stop_job_run"),
        web.get(run + "/logs", run_logs, name="api_job_run_logs"),
        web.get(run + "/events", run_events, name="api_job_run_events"),
    ]
