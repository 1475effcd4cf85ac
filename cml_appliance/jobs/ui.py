"""Pages: a project's jobs, one job (settings, run now, history) and one run (status and output)."""

from __future__ import annotations

from typing import Any

import aiohttp_jinja2
from aiohttp import web

from cml_appliance.api.listing import ListQuery
from cml_appliance.auth.permissions import Role
from cml_appliance.core.errors import REFUSALS, AppError
from cml_appliance.runtimes.ui import workload_choices
from cml_appliance.web.context import current_user
from cml_appliance.web.keys import JOBS
from cml_appliance.web.templating import redirect
from cml_appliance.workloads import states


def _fields(form: Any) -> dict[str, Any]:
    """The job form's fields in the API's terms; empty optional fields are left out."""
    fields: dict[str, Any] = {k: str(form.get(k, "")).strip() for k in ("name", "script", "arguments", "runtime_identifier")}
    fields["schedule"] = str(form.get("schedule", "")).strip()
    if form.get("timezone"):
        fields["timezone"] = str(form["timezone"]).strip()
    fields["parent_id"] = str(form.get("parent_id", "")).strip()
    for key in ("timeout", "resource_profile_id"):
        raw = str(form.get(key, "")).strip()
        if raw:
            fields[key] = int(raw) if raw.isdigit() else raw
    fields["kill_on_timeout"] = form.get("kill_on_timeout") == "on"
    fields["paused"] = form.get("paused") == "on"
    return fields


async def jobs_page(request: web.Request, *, error: str = "", form: dict[str, Any] | None = None, status: int = 200) -> web.StreamResponse:
    project, jobs, _ = await request.app[JOBS].list_for_project(current_user(request), request.match_info["project_id"], ListQuery.first(200))
    last_runs = await request.app[JOBS].last_runs([j.id for j in jobs])
    context = {"project": project, "jobs": jobs, "last_runs": last_runs, "error": error, "form": form or {},
               "parents": jobs, "parent_names": {j.id: j.name for j in jobs},
               "can_write": project.role >= Role.WRITE} | await workload_choices(request)
    return aiohttp_jinja2.render_template("jobs.html", request, context, status=status)


async def create_job(request: web.Request) -> web.StreamResponse:
    form = await request.post()
    fields = _fields(form)
    if not fields["parent_id"]:
        fields.pop("parent_id")
    if isinstance(fields.get("timeout"), str) or isinstance(fields.get("resource_profile_id"), str):
        return await jobs_page(request, error="Timeout and resources must be whole numbers.", form=dict(form), status=400)
    try:
        job = await request.app[JOBS].create(current_user(request), request.match_info["project_id"], fields)
    except AppError as exc:
        return await jobs_page(request, error=exc.message, form=dict(form), status=exc.status)
    raise redirect(request, f"/projects/{request.match_info['project_id']}/jobs/{job.public_id}", "ok", f"Created job {job.name}.")


async def job_page(request: web.Request, *, error: str = "", status: int = 200) -> web.StreamResponse:
    user = current_user(request)
    jobs = request.app[JOBS]
    project, job = await jobs.get(user, request.match_info["project_id"], request.match_info["job_id"])
    _, runs, _ = await jobs.list_runs(user, project.public_id, job.public_id, ListQuery.first(50))
    _, siblings, _ = await jobs.list_for_project(user, project.public_id, ListQuery.first(200))
    context = {
        "project": project, "job": job, "runs": runs, "error": error, "active": states.ACTIVE,
        "parents": [j for j in siblings if j.id != job.id], "can_write": project.role >= Role.WRITE,
        "can_run": project.role >= Role.OPERATOR,
    } | await workload_choices(request)
    return aiohttp_jinja2.render_template("job.html", request, context, status=status)


async def update_job(request: web.Request) -> web.StreamResponse:
    form = await request.post()
    fields = _fields(form)
    if isinstance(fields.get("timeout"), str) or isinstance(fields.get("resource_profile_id"), str):
        return await job_page(request, error="Timeout and resources must be whole numbers.", status=400)
    try:
        await request.app[JOBS].update(current_user(request), request.match_info["project_id"], request.match_info["job_id"], fields)
    except AppError as exc:
        return await job_page(request, error=exc.message, status=exc.status)
    raise redirect(request, request.path.removesuffix("/settings"), "ok", "Job saved.")


async def run_job(request: web.Request) -> web.StreamResponse:
    pid, jid = request.match_info["project_id"], request.match_info["job_id"]
    try:
        run = await request.app[JOBS].start_run(current_user(request), pid, jid, {})
    except REFUSALS:
        raise
    except AppError as exc:
        raise redirect(request, f"/projects/{pid}/jobs/{jid}", "error", exc.message) from None
    raise redirect(request, f"/projects/{pid}/jobs/{jid}/runs/{run.public_id}")


async def run_page(request: web.Request) -> web.StreamResponse:
    project, job, run = await request.app[JOBS].get_run(
        current_user(request), request.match_info["project_id"], request.match_info["job_id"], request.match_info["run_id"]
    )
    return aiohttp_jinja2.render_template(
        "job_run.html", request, {"project": project, "job": job, "run": run, "can_run": project.role >= Role.OPERATOR}
    )


async def stop_run(request: web.Request) -> web.StreamResponse:
    pid, jid, rid = request.match_info["project_id"], request.match_info["job_id"], request.match_info["run_id"]
    back = f"/projects/{pid}/jobs/{jid}/runs/{rid}"
    try:
        await request.app[JOBS].stop_run(current_user(request), pid, jid, rid)
    except REFUSALS:
        raise
    except AppError as exc:
        raise redirect(request, back, "error", exc.message) from None
    raise redirect(request, back, "ok", "Stopping the run.")


async def delete_job(request: web.Request) -> web.StreamResponse:
    pid = request.match_info["project_id"]
    await request.app[JOBS].delete(current_user(request), pid, request.match_info["job_id"])
    raise redirect(request, f"/projects/{pid}/jobs", "ok", "Job deleted.")


def routes() -> list[web.RouteDef]:
    base = "/projects/{project_id}/jobs"
    job = base + "/{job_id:[a-z0-9-]+}"
    return [
        web.get(base, jobs_page, name="ui_jobs"),
        web.post(base, create_job, name="ui_job_create"),
        web.get(job, job_page, name="ui_job"),
        web.post(job + "/settings", update_job, name="ui_job_update"),
        web.post(job + "/run", run_job, name="ui_job_run"),
        web.post(job + "/delete", delete_job, name="ui_job_delete"),
        web.get(job + "/runs/{run_id:[a-z0-9]+}", run_page, name="ui_job_run_page"),
        web.post(job + "/runs/{run_id:[a-z0-9]+}/stop", stop_run, name="ui_job_run_stop"),
    ]
