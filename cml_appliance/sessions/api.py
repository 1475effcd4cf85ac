"""API v2 style sessions (CML's API v2 has none; ours follow its conventions), their logs,
live events, and the terminal WebSocket."""

from __future__ import annotations

import json
import logging
import time
from urllib.parse import urlsplit

from aiohttp import WSCloseCode, WSMsgType, web

from cml_appliance.api.bodies import FLOAT, INT, INT64, STR, STR_LIST, STR_MAP
from cml_appliance.api.common import json_body, list_query, page
from cml_appliance.core.errors import InvalidArgument, PermissionDenied
from cml_appliance.core.tasks import until_first_done
from cml_appliance.engines.base import EngineError, EngineUnavailable, Terminal
from cml_appliance.web.context import LOGIN, current_user
from cml_appliance.web.keys import (
    POOL,
    SESSIONS,
    SETTINGS,
    STATUS_HUB,
    WEBSOCKETS,
    WORKLOADS,
)
from cml_appliance.workloads import states, store
from cml_appliance.workloads.streams import event_stream, logs_response, workload_json

log = logging.getLogger(__name__)

# Close codes in the private range 4000-4999, each with a readable reason.
CLOSE_SESSION_ENDED = 4000
CLOSE_NOT_RUNNING = 4001
CLOSE_ENGINE_ERROR = 4002
HEARTBEAT_SECONDS = 25  # shorter than the 60 s idle timeout of common load balancers
ACTIVITY_EVERY_SECONDS = 10

START_SPEC = {
    "name": STR, "runtime_identifier": STR, "cpu": FLOAT, "memory": FLOAT, "nvidia_gpu": INT,
    "environment": STR_MAP, "resource_profile_id": INT, "project_id": STR, "accelerator_label_id": INT64,
    "runtime_addon_identifiers": STR_LIST,
}
STATUS_FILTER = {"status": "status"}


async def list_sessions(request: web.Request) -> web.Response:
    q = list_query(request, STATUS_FILTER, {})
    _, rows, more = await request.app[SESSIONS].list_for_project(
        current_user(request), request.match_info["project_id"], q.page_size, q.offset, q.filters.get("status", "")
    )
    return page(request, "sessions", [workload_json(r) for r in rows], q, more)


async def list_my_sessions(request: web.Request) -> web.Response:
    q = list_query(request, {}, {})
    rows, more = await request.app[SESSIONS].list_for_user(current_user(request), q.page_size, q.offset)
    return page(request, "sessions", [workload_json(r) for r in rows], q, more)


async def start_session(request: web.Request) -> web.Response:
    body = await json_body(request, START_SPEC)
    project_id = request.match_info["project_id"]
    if body.pop("project_id", project_id) != project_id:
        raise InvalidArgument("project_id in the body must match the path")
    row = await request.app[SESSIONS].start(current_user(request), project_id, body)
    return web.json_response(workload_json(row))


async def get_session(request: web.Request) -> web.Response:
    _, row = await request.app[SESSIONS].get(
        current_user(request), request.match_info["project_id"], request.match_info["session_id"]
    )
    return web.json_response(workload_json(row))


async def stop_session(request: web.Request) -> web.Response:
    row = await request.app[SESSIONS].stop(
        current_user(request), request.match_info["project_id"], request.match_info["session_id"]
    )
    return web.json_response(workload_json(row))


async def session_logs(request: web.Request) -> web.Response:
    _, row = await request.app[SESSIONS].get(
        current_user(request), request.match_info["project_id"], request.match_info["session_id"]
    )
    return logs_response(request, request.app[WORKLOADS].logs, row)


async def session_events(request: web.Request) -> web.StreamResponse:
    _, row = await request.app[SESSIONS].get(
        current_user(request), request.match_info["project_id"], request.match_info["session_id"]
    )
    return await event_stream(request, request.app[POOL], request.app[STATUS_HUB], request.app[WORKLOADS].logs, row)


def _origin_allowed(request: web.Request) -> bool:
    """Browsers send Origin on WebSockets: it must be this site. Other clients send none."""
    origin = request.headers.get("Origin")
    if origin is None:
        return request.get(LOGIN) is None  # a cookie without an Origin is not a browser we trust
    allowed = {f"{request.scheme}://{request.host}"}
    public = request.app[SETTINGS].public_url
    if public:
        parts = urlsplit(public)
        allowed.add(f"{parts.scheme}://{parts.netloc}")
    return origin in allowed


async def terminal(request: web.Request) -> web.StreamResponse:
    """GET .../sessions/{id}/terminal, upgraded to a WebSocket.

    Binary frames carry terminal bytes both ways; a text frame is a JSON control message
    ({"type": "resize", "cols": C, "rows": R}). When the session ends the server closes with a
    code and a reason.
    """
    user = current_user(request)
    if not _origin_allowed(request):
        raise PermissionDenied("this WebSocket must be opened from the appliance's own pages")
    sessions = request.app[SESSIONS]
    project, row = await sessions.get(user, request.match_info["project_id"], request.match_info["session_id"])
    if not sessions.may_control(user, project, row):
        raise PermissionDenied("only the session's owner or a project admin may use its terminal")

    ws = web.WebSocketResponse(heartbeat=HEARTBEAT_SECONDS, max_msg_size=1024 * 1024)
    await ws.prepare(request)
    sockets = request.app[WEBSOCKETS]
    sockets.add(ws)
    workloads = request.app[WORKLOADS]
    shell: Terminal | None = None
    try:
        spec = workloads.spec_for(row)
        if row.status != states.RUNNING or not row.handle:
            reason = f"the session is not running ({row.status}{': ' + row.reason if row.reason else ''})"
            await ws.close(code=CLOSE_NOT_RUNNING, message=reason[:120].encode())
            return ws
        try:
            shell = await workloads.engine(row.engine).open_terminal(row.handle, spec)
        except (EngineError, EngineUnavailable) as exc:
            await ws.close(code=CLOSE_ENGINE_ERROR, message=str(exc)[:120].encode())
            return ws
        await workloads.touch(row)
        await _relay(ws, shell, workloads, row)
        final = await store.get(request.app[POOL], row.public_id)
        if not ws.closed:
            status = final.status if final else "gone"
            message = "the terminal's shell exited" if final and final.status == states.RUNNING else f"the session ended ({status})"
            await ws.close(code=CLOSE_SESSION_ENDED, message=message.encode())
    finally:
        sockets.discard(ws)
        if shell is not None:
            await shell.close()
    return ws


async def terminal_transcript(request: web.Request) -> web.Response:
    """GET .../sessions/{id}/terminal/transcript: the last bytes the terminal showed (raw, for a
    terminal emulator to replay), to whoever may use the terminal."""
    user = current_user(request)
    sessions = request.app[SESSIONS]
    project, row = await sessions.get(user, request.match_info["project_id"], request.match_info["session_id"])
    if not sessions.may_control(user, project, row):
        raise PermissionDenied("only the session's owner or a project admin may read its terminal")
    data = request.app[WORKLOADS].logs.read_transcript(row.public_id)
    return web.Response(body=data, content_type="application/octet-stream", headers={"Cache-Control": "no-store"})


async def _relay(ws: web.WebSocketResponse, shell: Terminal, workloads: object, row: store.Workload) -> None:
    logs = workloads.logs  # type: ignore[attr-defined]

    async def to_browser() -> None:
        while data := await shell.read():
            logs.append_transcript(row.public_id, data)
            await ws.send_bytes(data)

    async def from_browser() -> None:
        last_touch = time.monotonic()
        async for msg in ws:
            if msg.type == WSMsgType.BINARY:
                await shell.write(msg.data)
            elif msg.type == WSMsgType.TEXT:
                await _control(ws, shell, msg.data)
            else:
                break
            if time.monotonic() - last_touch > ACTIVITY_EVERY_SECONDS:
                last_touch = time.monotonic()
                await workloads.touch(row)  # type: ignore[attr-defined]

    await until_first_done(to_browser(), from_browser())


async def _control(ws: web.WebSocketResponse, shell: Terminal, text: str) -> None:
    try:
        message = json.loads(text)
        if message.get("type") == "resize":
            cols, rows = int(message["cols"]), int(message["rows"])
            if not (1 <= cols <= 1000 and 1 <= rows <= 1000):
                raise ValueError("size out of range")
            await shell.resize(cols, rows)
        elif message.get("type") != "ping":
            raise ValueError(f"unknown control message type {message.get('type')!r}")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        await ws.send_str(json.dumps({"type": "error", "message": f"bad control message: {exc}"}))


async def close_websockets(app: web.Application) -> None:
    """On shutdown: tell every attached terminal, then let cleanup close the sessions."""
    sockets: set[web.WebSocketResponse] = app[WEBSOCKETS]
    for ws in list(sockets):
        await ws.close(code=WSCloseCode.GOING_AWAY, message=b"the appliance is shutting down")


def routes() -> list[web.RouteDef]:
    base = "/api/v2/projects/{project_id}/sessions"
    one = base + "/{session_id:[a-z0-9]+}"
    return [
        web.get("/api/v2/sessions", list_my_sessions, name="api_list_my_sessions"),
        web.get(base, list_sessions, name="api_list_sessions"),
        web.post(base, start_session, name="api_start_session"),
        web.get(one, get_session, name="api_get_session"),
        web.post(one + ":stop", stop_session, name="api_stop_session"),
        web.get(one + "/logs", session_logs, name="api_session_logs"),
        web.get(one + "/events", session_events, name="api_session_events"),
        web.get(one + "/terminal", terminal, name="api_session_terminal"),
        web.get(one + "/terminal/transcript", terminal_transcript, name="api_session_terminal_transcript"),
    ]
