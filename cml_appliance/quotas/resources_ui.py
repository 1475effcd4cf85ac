"""Page: resource groups and GPU kinds (site admins): which kinds of workload each engine takes,
and each accelerator's limits, with what its GPUs hold now."""

from __future__ import annotations

import aiohttp_jinja2
from aiohttp import web

from cml_appliance.api.listing import ListQuery
from cml_appliance.core.errors import AppError, InvalidArgument
from cml_appliance.quotas.accelerators import ALLOW_COLUMNS, number
from cml_appliance.web.context import require_site_admin
from cml_appliance.web.keys import ACCELERATORS
from cml_appliance.web.templating import redirect

EVERYTHING = ListQuery(1000, 0, {}, [], "")
KINDS = (("allow_sessions", "Sessions"), ("allow_jobs", "Jobs"), ("allow_applications", "Applications"),
         ("allow_models", "Models"))


async def resources_page(request: web.Request, *, error: str = "", status: int = 200) -> web.StreamResponse:
    require_site_admin(request)
    accelerators = request.app[ACCELERATORS]
    try:
        groups, _ = await accelerators.groups(EVERYTHING)
        labels, _ = await accelerators.labels(EVERYTHING, display_all=True)
    except AppError as exc:  # the cluster cannot be read now: say so on the page
        groups, labels, error, status = [], [], exc.message, exc.status
    return aiohttp_jinja2.render_template("admin_resources.html", request, {
        "groups": groups, "labels": [l for l in labels if "label_value" in l and l["label_key"]],
        "kinds": KINDS, "error": error}, status=status)


async def set_group(request: web.Request) -> web.StreamResponse:
    admin = require_site_admin(request)
    form = await request.post()
    fields = {"id": int(request.match_info["id"])} | {column: form.get(column) == "on" for column in ALLOW_COLUMNS.values()}
    try:
        if form.get("kinds") != "shown":  # unchecked boxes send nothing: only the page's form may close them all
            raise InvalidArgument("send the resource group's form from Site admin → Resources")
        group = await request.app[ACCELERATORS].update_group(admin.id, fields)
    except AppError as exc:
        return await resources_page(request, error=exc.message, status=exc.status)
    raise redirect(request, "/admin/resources", "ok", f"Saved what the {group['name']} resource group takes.")


async def set_accelerator(request: web.Request) -> web.StreamResponse:
    admin = require_site_admin(request)
    form = await request.post()
    label_id = request.match_info["id"]
    values = {column: str(form.get(column, "")).strip() for column in ("max_gpu_per_workload", "default_quota")}
    try:
        for column, value in values.items():  # both checked before either is saved
            number(value, column, allow_empty=True)
        for column, value in values.items():
            await request.app[ACCELERATORS].set_per_label(admin.id, column, {label_id: value})
    except AppError as exc:
        return await resources_page(request, error=exc.message, status=exc.status)
    raise redirect(request, "/admin/resources", "ok", "Saved the GPU limits.")


def routes() -> list[web.RouteDef]:
    return [
        web.get("/admin/resources", resources_page, name="ui_admin_resources"),
        web.post("/admin/resources/groups/{id:[0-9]{1,9}}", set_group, name="ui_admin_resource_group"),
        web.post("/admin/resources/accelerators/{id:[0-9]{1,18}}", set_accelerator, name="ui_admin_accelerator"),
    ]
