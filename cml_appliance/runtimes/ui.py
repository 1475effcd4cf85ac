"""Page: the runtime catalog and the resource profiles; for site administrators, registering a
custom runtime, its status, and the docker credentials images are pulled with."""

from __future__ import annotations

from typing import Any

import aiohttp_jinja2
from aiohttp import web

from cml_appliance.api.listing import ListQuery
from cml_appliance.core.errors import AppError
from cml_appliance.runtimes import catalog, credentials
from cml_appliance.runtimes.custom import REASON_WORDS, STATUSES
from cml_appliance.web.context import current_user, require_site_admin
from cml_appliance.web.keys import CUSTOM_RUNTIMES, DOCKER_CREDENTIALS, POOL, SETTINGS, WORKLOADS
from cml_appliance.web.templating import redirect


async def workload_choices(request: web.Request) -> dict[str, Any]:
    """What a start form offers: enabled runtimes, each marked available or not (its engine is not
    configured here, and why), and the resource profiles."""
    everything = ListQuery(1000, 0, {}, [], "")
    runtimes, _ = await catalog.list_runtimes(request.app[POOL], everything)
    profiles, _ = await catalog.list_profiles(request.app[POOL], everything)
    workloads = request.app[WORKLOADS]
    offered = []
    for runtime in runtimes:
        if runtime["status"] == "DISABLED":
            continue
        engine = workloads.engine_name_for(runtime["image_identifier"])
        available = engine in workloads.engines
        offered.append(runtime | {
            "engine": engine, "available": available,
            "unavailable_because": "" if available else f"needs the {engine} engine, which this site has not configured",
        })
    # The first available runtime first, so a form's default can always start; Workbench (a
    # terminal and a console, which every runtime has) before other editors.
    offered.sort(key=lambda r: (not r["available"], r["editor"] != "Workbench"))
    return {"runtimes": offered, "profiles": profiles}


async def runtimes_page(request: web.Request, *, error: str = "", status: int = 200) -> web.StreamResponse:
    user = current_user(request)
    everything = ListQuery(1000, 0, {}, [], "")
    runtimes, _ = await catalog.list_runtimes(request.app[POOL], everything)
    profiles, _ = await catalog.list_profiles(request.app[POOL], everything)
    choices = {r["image_identifier"]: r for r in (await workload_choices(request))["runtimes"]}
    logins = (await request.app[DOCKER_CREDENTIALS].list(everything))[0] if user.is_admin else []
    return aiohttp_jinja2.render_template("runtimes.html", request, {
        "runtimes": runtimes, "profiles": profiles, "choices": choices, "credentials": logins, "statuses": STATUSES,
        "registry_host": request.app[SETTINGS].domain, "error": error}, status=status)


def _credential_choice(raw: object) -> int | None:
    return None if raw in (None, "") else credentials.parse_id(raw)


async def register_runtime(request: web.Request) -> web.StreamResponse:
    admin = require_site_admin(request)
    form = await request.post()
    try:
        answer = await request.app[CUSTOM_RUNTIMES].register(
            admin.id, str(form.get("url", "")), _credential_choice(form.get("docker_credential_id")))
    except AppError as exc:
        return await runtimes_page(request, error=exc.message, status=exc.status)
    if not answer["insert_success"]:
        words = REASON_WORDS.get(answer["reason"], answer["reason"])
        return await runtimes_page(request, error=f"Not registered. {words}: {answer['reason_data']}", status=422)
    d = answer["details"]
    raise redirect(request, "/runtimes", "ok", f"Registered {form.get('url')}: {d['editor']}, {d['kernel']}, {d['edition']}.")


async def set_status(request: web.Request) -> web.StreamResponse:
    admin = require_site_admin(request)
    form = await request.post()
    image = str(form.get("image_identifier", ""))
    try:
        await request.app[CUSTOM_RUNTIMES].update_status(admin.id, str(form.get("status", "")), [], [image])
    except AppError as exc:
        return await runtimes_page(request, error=exc.message, status=exc.status)
    raise redirect(request, "/runtimes", "ok", f"{image} is now {str(form.get('status')).lower()}.")


async def create_credential(request: web.Request) -> web.StreamResponse:
    admin = require_site_admin(request)
    form = await request.post()
    body = {k: str(form.get(k, "")) for k in ("name", "server", "username", "password")}
    try:
        await request.app[DOCKER_CREDENTIALS].create(admin.id, body | {"is_default": form.get("is_default") == "on"})
    except AppError as exc:
        return await runtimes_page(request, error=exc.message, status=exc.status)
    raise redirect(request, "/runtimes", "ok", f"Saved the docker credential {body['name']}.")


async def delete_credential(request: web.Request) -> web.StreamResponse:
    admin = require_site_admin(request)
    try:
        await request.app[DOCKER_CREDENTIALS].delete(admin.id, credentials.parse_id(request.match_info["id"]))
    except AppError as exc:
        return await runtimes_page(request, error=exc.message, status=exc.status)
    raise redirect(request, "/runtimes", "ok", "Deleted the docker credential.")


def routes() -> list[web.RouteDef]:
    return [
        web.get("/runtimes", runtimes_page, name="ui_runtimes"),
        web.post("/runtimes/register", register_runtime, name="ui_register_runtime"),
        web.post("/runtimes/status", set_status, name="ui_runtime_status"),
        web.post("/runtimes/credentials", create_credential, name="ui_create_docker_credential"),
        web.post("/runtimes/credentials/{id}/delete", delete_credential, name="ui_delete_docker_credential"),
    ]
