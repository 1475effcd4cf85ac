"""API v2: applications as CML defines them, and the proxy that reaches them at
/apps/<subdomain>/ and at http://<subdomain>.<domain>/ (HTTP, streamed responses, WebSockets)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
from aiohttp import WSMsgType, web

from cml_appliance.api.bodies import ANY, BOOL, FLOAT, INT, STR, STR_LIST, STR_MAP
from cml_appliance.api.common import json_body, list_query, page
from cml_appliance.applications.service import Application, app_status
from cml_appliance.core.errors import (
    InvalidArgument,
    NotFound,
    Unauthenticated,
    Unavailable,
)
from cml_appliance.core.tasks import until_first_done
from cml_appliance.core.timefmt import rfc3339
from cml_appliance.web.context import USER, current_user
from cml_appliance.web.keys import (
    APP_PROXY_SESSION,
    APPLICATIONS,
    POOL,
    SETTINGS,
    STATUS_HUB,
    WORKLOADS,
)
from cml_appliance.workloads import states
from cml_appliance.workloads.store import Workload
from cml_appliance.workloads.streams import event_stream, logs_response

HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
                        "transfer-encoding", "upgrade", "host", "content-length"})
# The user's credentials for the appliance never reach the application.
PRIVATE_HEADERS = frozenset({"authorization", "cookie"})


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
IGNORED_INPUTS = ("project_id", "kernel", "runtime_addon_identifiers", "run_as", "cdv_app", "accelerator_label_id",
                  "resource_group_id")


def _strip(body: dict[str, Any]) -> dict[str, Any]:
    for key in IGNORED_INPUTS:
        body.pop(key, None)
    return body


async def list_apps(request: web.Request) -> web.Response:
    q = list_query(request, {}, {})
    _, pairs, more = await request.app[APPLICATIONS].list_for_project(current_user(request), request.match_info["project_id"], q.page_size, q.offset)
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


# The proxy -------------------------------------------------------------------------------------

def subdomain_of_host(request: web.Request) -> str | None:
    """`<sub>` when the request came for http://<sub>.<domain>/ (wildcard DNS), else None."""
    host = request.host.split(":", 1)[0].lower()
    domain = request.app[SETTINGS].domain.split(":", 1)[0].lower()
    if host.endswith("." + domain):
        sub = host[: -len(domain) - 1]
        if sub and "." not in sub:
            return sub
    return None


async def proxy_path(request: web.Request) -> web.StreamResponse:
    return await proxy(request, request.match_info["subdomain"], "/" + request.match_info["tail"],
                       prefix=f"/apps/{request.match_info['subdomain']}")


async def proxy(request: web.Request, subdomain: str, path: str, prefix: str = "") -> web.StreamResponse:
    apps = request.app[APPLICATIONS]
    route = await apps.route(subdomain)
    if route is None:
        raise NotFound(f"there is no application at {subdomain!r}")
    user = request.get(USER)
    if not (route.app.bypass_authentication and apps.allow_unauthenticated):
        if user is None:
            raise Unauthenticated("sign in to open this application")
        if not await apps.may_open(user, route):
            raise NotFound(f"there is no application at {subdomain!r}")
    if route.address is None:
        raise Unavailable(f"the application is not running ({route.status})")
    address = route.address
    target = f"http://{address}{path}" + (f"?{request.query_string}" if request.query_string else "")
    # Content-Length stays: many small servers cannot read a chunked request body.
    headers = {k: v for k, v in request.headers.items()
               if k.lower() not in (HOP_BY_HOP - {"content-length"}) | PRIVATE_HEADERS}
    headers.update({"X-Forwarded-Host": request.host, "X-Forwarded-Proto": request.scheme})
    if prefix:
        headers["X-Forwarded-Prefix"] = prefix
    if user is not None:
        headers["X-Forwarded-User"] = user.username
    session = request.app[APP_PROXY_SESSION]
    if request.headers.get("Upgrade", "").lower() == "websocket":
        return await _proxy_websocket(request, session, target.replace("http://", "ws://", 1), headers)
    try:
        async with session.request(request.method, target, headers=headers, allow_redirects=False,
                                   data=request.content if request.body_exists else None) as upstream:
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            for key, value in upstream.headers.items():
                if key.lower() not in HOP_BY_HOP:
                    response.headers.add(key, value)
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response
    except (aiohttp.ClientConnectionError, asyncio.TimeoutError) as exc:
        raise Unavailable(f"the application did not answer: {exc}") from None


async def _proxy_websocket(request: web.Request, session: aiohttp.ClientSession, target: str, headers: dict[str, str]) -> web.StreamResponse:
    protocols = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()]
    forward = {k: v for k, v in headers.items() if not k.lower().startswith("sec-websocket")}
    try:
        upstream = await session.ws_connect(target, headers=forward, protocols=protocols)
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        raise Unavailable(f"the application did not accept the WebSocket: {exc}") from None
    ws = web.WebSocketResponse(protocols=protocols, heartbeat=25)
    await ws.prepare(request)

    async def pump(source: Any, sink: Any) -> None:
        async for msg in source:
            if msg.type == WSMsgType.TEXT:
                await sink.send_str(msg.data)
            elif msg.type == WSMsgType.BINARY:
                await sink.send_bytes(msg.data)
            else:
                break

    try:
        await until_first_done(pump(ws, upstream), pump(upstream, ws))
    finally:
        await upstream.close()
        await ws.close()
    return ws


@web.middleware
async def host_router(request: web.Request, handler: Any) -> web.StreamResponse:
    """Requests for http://<subdomain>.<domain>/ go to that application, whatever their path."""
    subdomain = subdomain_of_host(request)
    if subdomain is not None:
        return await proxy(request, subdomain, request.path)
    return await handler(request)


async def _slash(request: web.Request) -> web.StreamResponse:
    """/apps/<subdomain> without the slash: relative links in the app need it."""
    raise web.HTTPFound(f"/apps/{request.match_info['subdomain']}/")


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
        web.route("*", "/apps/{subdomain}/{tail:.*}", proxy_path, name="app_proxy"),
        web.get("/apps/{subdomain}", _slash, name="app_proxy_root"),
    ]

