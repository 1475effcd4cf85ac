"""Pages: a project's sessions, starting one, and the session page (status, console, terminal)."""

from __future__ import annotations

import aiohttp_jinja2
from aiohttp import web

from cml_appliance.auth.permissions import Role
from cml_appliance.core.errors import REFUSALS, AppError
from cml_appliance.runtimes.ui import workload_choices
from cml_appliance.web.context import current_user
from cml_appliance.web.keys import SESSIONS
from cml_appliance.web.templating import redirect


async def sessions_page(request: web.Request, *, error: str = "", status: int = 200) -> web.StreamResponse:
    user = current_user(request)
    project, rows, _ = await request.app[SESSIONS].list_for_project(user, request.match_info["project_id"], 50, 0)
    context = {"project": project, "sessions": rows, "error": error, "can_start": project.role >= Role.WRITE}
    return aiohttp_jinja2.render_template("sessions.html", request, context | await workload_choices(request), status=status)


async def my_sessions_page(request: web.Request) -> web.StreamResponse:
    rows, _ = await request.app[SESSIONS].list_for_user(current_user(request), 100, 0)
    return aiohttp_jinja2.render_template("my_sessions.html", request, {"sessions": rows})


async def start_session(request: web.Request) -> web.StreamResponse:
    form = await request.post()
    fields: dict[str, object] = {"runtime_identifier": str(form.get("runtime_identifier", ""))}
    if form.get("name"):
        fields["name"] = str(form["name"])
    if form.get("resource_profile_id"):
        try:
            fields["resource_profile_id"] = int(str(form["resource_profile_id"]))
        except ValueError:
            return await sessions_page(request, error="Choose a resource profile from the list.", status=400)
    try:
        row = await request.app[SESSIONS].start(current_user(request), request.match_info["project_id"], fields)
    except AppError as exc:
        return await sessions_page(request, error=exc.message, status=exc.status)
    raise redirect(request, f"/projects/{request.match_info['project_id']}/sessions/{row.public_id}")


async def session_page(request: web.Request) -> web.StreamResponse:
    user = current_user(request)
    sessions = request.app[SESSIONS]
    project, row = await sessions.get(user, request.match_info["project_id"], request.match_info["session_id"])
    return aiohttp_jinja2.render_template(
        "session.html", request, {"project": project, "session": row, "can_control": sessions.may_control(user, project, row)}
    )


async def stop_session(request: web.Request) -> web.StreamResponse:
    project_id, session_id = request.match_info["project_id"], request.match_info["session_id"]
    back = f"/projects/{project_id}/sessions/{session_id}"
    try:
        await request.app[SESSIONS].stop(current_user(request), project_id, session_id)
    except REFUSALS:
        raise
    except AppError as exc:
        raise redirect(request, back, "error", exc.message) from None
    raise redirect(request, back, "ok", "Stopping the session.")


def routes() -> list[web.RouteDef]:
    base = "/projects/{project_id}/sessions"
    return [
        web.get("/sessions", my_sessions_page, name="ui_my_sessions"),
        web.get(base, sessions_page, name="ui_sessions"),
        web.post(base, start_session, name="ui_session_start"),
        web.get(base + "/{session_id:[a-z0-9]+}", session_page, name="ui_session"),
        web.post(base + "/{session_id:[a-z0-9]+}/stop", stop_session, name="ui_session_stop"),
    ]
