"""API v2: applications as CML defines them. The proxy that reaches them is in proxy.py."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from cml_appliance.api.bodies import ANY, BOOL, FLOAT, INT, STR, STR_LIST, STR_MAP
from cml_appliance.api.common import json_body, list_query, page
from cml_appliance.applications.service import (
    APP_FILTER_KEYS,
    APP_SORT_KEYS,
    Application,
    app_status,
)
from cml_appliance.core.errors import (
    InvalidArgument,
    NotFound,
)
from cml_appliance.core.timefmt import rfc3339
from cml_appliance.web.context import current_user
from cml_appliance.web.keys import (
    APPLICATIONS,
    POOL,
    STATUS_HUB,
    WORKLOADS,
)
from cml_appliance.workloads import states
from cml_appliance.workloads.store import Workload
from cml_appliance.workloads.streams import event_stream, logs_response


def app_json(app: Application, run: Workload | None) -> dict[str, Any]:
    data = {
        "id": app.public_id, "name": app.name, "description": app.description, "creator": app.creator,
        "script": app.script, "subdomain": app.subdomain, "status": app_status(app, run),
        "created_at": rfc3339(app.created_at), "updated_at": rfc3339(app.updated_at),
        "starting_at": rfc3339(run.starting_at) if run else "", "running_at": rfc3339(app.ready_at),
        "stopped_at": rfc3339(run.finished_at) if run and run.status in states.FINISHED else "",
        "kernel": "", "cpu": app.cpu, "memory": app.memory, "nvidia_gpu": 0,
        "bypass_authentication": app.bypass_authentication, "environment": json.dumps(app.environment),
        "runtime_identifier": app.runtime_identifier, "runtime_addon_identifiers": [], "cdv_app": False,
    }
    return {k: v for k, v in data.items() if not (k.endswith("_at") and v == "")}


CREATE_SPEC = {
    "project_id": STR, "name": STR, "subdomain": STR, "description": STR, "script": STR, "cpu": FLOAT, "memory": FLOAT,
    "nvidia_gpu": INT, "environment": STR_MAP, "kernel": STR, "bypass_authentication": BOOL, "runtime_identifier": STR,
    "runtime_addon_identifiers": STR_LIST, "run_as": INT, "cdv_app": BOOL, "accelerator_label_id": ANY,
    "resource_group_id": INT, "resource_profile_id": INT,
}
UPDATE_SPEC = CREATE_SPEC | {"environment": ANY}
UPDATE_IGNORED = frozenset({"id", "creator", "status", "created_at", "updated_at", "starting_at", "running_at",
                            "stopped_at", "runtime_addon_identifiers", "kernel"})
IGNORED_INPUTS = ("project_id", "kernel", "runtime_addon_identifiers", "accelerator_label_id", "resource_group_id")


def _strip(body: dict[str, Any]) -> dict[str, Any]:
    """Fields that mean nothing here are dropped; ones that would change what runs are refused."""
    if body.pop("run_as", 0):
        raise InvalidArgument("run_as is not supported: an application runs as its creator")
    if body.pop("cdv_app", False):
        raise InvalidArgument("cdv_app (Cloudera Data Visualization) is not available on this appliance")
    for key in IGNORED_INPUTS:
        body.pop(key, None)
    return body


async def list_apps(request: web.Request) -> web.Response:
    q = list_query(request, APP_FILTER_KEYS, APP_SORT_KEYS)
    _, pairs, more = await request.app[APPLICATIONS].list_for_project(current_user(request), request.match_info["project_id"], q)
    return page(request, "applications", [app_json(a, r) for a, r in pairs], q, more)


async def create_app(request: web.Request) -> web.Response:
    body = await json_body(request, CREATE_SPEC)
    if body.get("project_id", request.match_info["project_id"]) != request.match_info["project_id"]:
        raise InvalidArgument("project_id in the body must match the path")
    app, run = await request.app[APPLICATIONS].create(current_user(request), request.match_info["project_id"], _strip(body))
    return web.json_response(app_json(app, run))


async def get_app(request: web.Request) -> web.Response:
    _, app, run = await request.app[APPLICATIONS].get(current_user(request), request.match_info["project_id"], request.match_info["app_id"])
    return web.json_response(app_json(app, run))


async def update_app(request: web.Request) -> web.Response:
    body = await json_body(request, UPDATE_SPEC, UPDATE_IGNORED)
    if body.pop("id", request.match_info["app_id"]) != request.match_info["app_id"]:
        raise InvalidArgument("id in the body must match the path")
    app, run = await request.app[APPLICATIONS].update(current_user(request), request.match_info["project_id"], request.match_info["app_id"], _strip(body))
    return web.json_response(app_json(app, run))


async def delete_app(request: web.Request) -> web.Response:
    await request.app[APPLICATIONS].delete(current_user(request), request.match_info["project_id"], request.match_info["app_id"])
    return web.json_response({})


async def restart_app(request: web.Request) -> web.Response:
    app, run = await request.app[APPLICATIONS].restart(current_user(request), request.match_info["project_id"], request.match_info["app_id"])
    return web.json_response(app_json(app, run))


async def stop_app(request: web.Request) -> web.Response:
    app, run = await request.app[APPLICATIONS].stop(current_user(request), request.match_info["project_id"], request.match_info["app_id"])
    return web.json_response(app_json(app, run))


async def _current_run(request: web.Request) -> Workload:
    _, _, run = await request.app[APPLICATIONS].get(current_user(request), request.match_info["project_id"], request.match_info["app_id"])
    if run is None:
        raise NotFound("the application has not been started")
    return run


async def app_logs(request: web.Request) -> web.Response:
    """Ours: the current start's output (GET …/applications/{id}/logs?offset=N)."""
    return logs_response(request, request.app[WORKLOADS].logs, await _current_run(request))


async def app_events(request: web.Request) -> web.StreamResponse:
    run = await _current_run(request)
    return await event_stream(request, request.app[POOL], request.app[STATUS_HUB], request.app[WORKLOADS].logs, run)


def routes() -> list[web.RouteDef]:
    base = "/api/v2/projects/{project_id}/applications"
    one = base + "/{app_id:[a-z0-9-]+}"
    return [
        web.get(base, list_apps, name="api_list_applications"),
        web.post(base, create_app, name="api_create_application"),
        web.get(one, get_app, name="api_get_application"),
        web.patch(one, update_app, name="api_update_application"),
        web.delete(one, delete_app, name="api_delete_application"),
        web.post(one + ":restart", restart_app, name="api_restart_application"),
        web.post(one + ":stop", stop_app, name="api_stop_application"),
        web.get(one + "/logs", app_logs, name="api_application_logs"),
        web.get(one + "/events", app_events, name="api_application_events"),
    ]

