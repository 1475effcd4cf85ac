"""Pages: a project's applications (create, open, restart, stop) and one application's output."""

from __future__ import annotations

import aiohttp_jinja2
from aiohttp import web

from cml_appliance.api.listing import ListQuery
from cml_appliance.applications.service import app_status
from cml_appliance.auth.permissions import Role
from cml_appliance.core.errors import REFUSALS, AppError
from cml_appliance.runtimes.ui import workload_choices
from cml_appliance.web.context import current_user
from cml_appliance.web.keys import APPLICATIONS
from cml_appliance.web.templating import redirect


async def apps_page(request: web.Request, *, error: str = "", form: dict[str, str] | None = None, status: int = 200) -> web.StreamResponse:
    project, pairs, _ = await request.app[APPLICATIONS].list_for_project(current_user(request), request.match_info["project_id"], ListQuery.first(200))
    context = {
        "project": project, "apps": [(a, r, app_status(a, r)) for a, r in pairs], "error": error, "form": form or {},
        "can_write": project.role >= Role.WRITE,
    } | await workload_choices(request)
    return aiohttp_jinja2.render_template("applications.html", request, context, status=status)


async def create_app(request: web.Request) -> web.StreamResponse:
    form = {k: str(v) for k, v in (await request.post()).items()}
    fields: dict[str, object] = {k: form.get(k, "").strip() for k in ("name", "subdomain", "script", "description", "runtime_identifier")}
    if form.get("resource_profile_id", "").isdigit():
        fields["resource_profile_id"] = int(form["resource_profile_id"])
    try:
        await request.app[APPLICATIONS].create(current_user(request), request.match_info["project_id"], fields)
    except AppError as exc:
        return await apps_page(request, error=exc.message, form=form, status=exc.status)
    raise redirect(request, f"/projects/{request.match_info['project_id']}/applications", "ok", f"Starting application {fields['name']}.")


async def act(request: web.Request) -> web.StreamResponse:
    pid, aid, action = request.match_info["project_id"], request.match_info["app_id"], request.match_info["action"]
    apps = request.app[APPLICATIONS]
    back = f"/projects/{pid}/applications"
    if action != "delete" and (await request.post()).get("back") == "application":
        back = f"/projects/{pid}/applications/{aid}"  # the application's own page asked
    try:
        if action == "restart":
            await apps.restart(current_user(request), pid, aid)
        elif action == "stop":
            await apps.stop(current_user(request), pid, aid)
        else:
            await apps.delete(current_user(request), pid, aid)
    except REFUSALS:
        raise
    except AppError as exc:
        raise redirect(request, back, "error", exc.message) from None
    raise redirect(request, back, "ok", {"restart": "Restarting.", "stop": "Stopping.", "delete": "Deleted."}[action])


async def app_page(request: web.Request) -> web.StreamResponse:
    project, app, run = await request.app[APPLICATIONS].get(current_user(request), request.match_info["project_id"], request.match_info["app_id"])
    return aiohttp_jinja2.render_template("application.html", request, {
        "project": project, "app": app, "run": run, "status": app_status(app, run), "can_write": project.role >= Role.WRITE})


def routes() -> list[web.RouteDef]:
    base = "/projects/{project_id}/applications"
    return [
        web.get(base, apps_page, name="ui_applications"),
        web.post(base, create_app, name="ui_application_create"),
        web.get(base + "/{app_id:[a-z0-9-]+}", app_page, name="ui_application"),
        web.post(base + "/{app_id:[a-z0-9-]+}/{action:restart|stop|delete}", act, name="ui_application_action"),
    ]
