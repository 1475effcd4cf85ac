"""The editors' listener: /editors/<session id>/… leads to that session's JupyterLab (its Unix
socket, editors/sockets.py), HTTP and WebSockets (kernels, terminals), for the session's owner
only; /_cml/handoff trades the UI's one-time token for this origin's cookie.

On the UI's origin, GET /projects/<project>/sessions/<session>/editor hands the owner over.

What a request must pass here, beyond the cookie: a state-changing request or a WebSocket whose
Origin is another origin is refused (JupyterLab's own XSRF check is skipped for the token this
proxy adds, and cookies of one host reach every port of it, so another origin on this host, an
application, could otherwise drive a kernel in a visitor's name). The appliance's cookies never
reach JupyterLab, and JupyterLab cannot set them.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from cml_appliance.applications.origin import plain_page
from cml_appliance.core.errors import AppError, FailedPrecondition, NotFound, PermissionDenied, Unauthenticated, Unavailable
from cml_appliance.core.security import token_digest
from cml_appliance.editors.origin import EDITOR_COOKIE, EditorsOrigin
from cml_appliance.editors.service import EditorProxy
from cml_appliance.web import listener
from cml_appliance.web.context import ROUTE_LABEL, SESSION_COOKIE, current_user
from cml_appliance.web.handoff import HANDOFF_PATH
from cml_appliance.web.keys import EDITORS, EDITORS_ORIGIN, METRICS, POOL, PROJECTS
from cml_appliance.web.middlewares import observe
from cml_appliance.web.proxying import HOP_BY_HOP, forwarded_cookies, relay_websocket, sets_appliance_cookie
from cml_appliance.workloads import store as workload_store

log = logging.getLogger(__name__)

DROPPED_REQUEST_HEADERS = (HOP_BY_HOP - {"content-length"}) | {"authorization", "cookie"}
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


# On the UI's origin -----------------------------------------------------------------------

async def open_from_ui(request: web.Request) -> web.StreamResponse:
    """The session's owner goes to the editors' origin with a one-time token."""
    user = current_user(request)
    project = await request.app[PROJECTS].get(user, request.match_info["project_id"])
    session_id = request.match_info["session_id"]
    row = await workload_store.get(request.app[POOL], session_id)
    if row is None or row.kind != "session" or row.project_id != project.id:
        raise NotFound(f"session {session_id!r} not found")
    if row.creator_id != user.id:
        raise PermissionDenied("a session's editor is its owner's alone")
    if not row.editor:
        raise FailedPrecondition("this session has no editor: start a session on a JupyterLab runtime")
    origin: EditorsOrigin = request.app[EDITORS_ORIGIN]
    token = origin.issue(token_digest(request.cookies[SESSION_COOKIE]), session_id, f"/editors/{session_id}/lab")
    response = web.HTTPSeeOther(origin.handoff_url(request, token))
    response.headers["Cache-Control"] = "no-store"
    raise response


def routes() -> list[web.RouteDef]:
    return [web.get("/projects/{project_id}/sessions/{session_id:[a-z0-9]+}/editor", open_from_ui, name="ui_session_editor")]


# The editors' listener --------------------------------------------------------------------

async def serve(request: web.Request) -> web.StreamResponse:
    origin: EditorsOrigin = request.app[EDITORS_ORIGIN]
    try:
        if request.path == HANDOFF_PATH:
            return await _handoff(request, origin)
        if request.path.startswith("/editors/"):
            session_id = request.path.split("/")[2]
            if session_id:
                return await _proxy(request, origin, session_id)
        request[ROUTE_LABEL] = "editors_listener"
        return plain_page(404, "Nothing here", "Editors are opened from a session's page in the appliance.")
    except AppError as exc:
        title = "Sign in first" if isinstance(exc, Unauthenticated) else f"Error {exc.status}"
        return plain_page(exc.status, title, exc.message)


async def _handoff(request: web.Request, origin: EditorsOrigin) -> web.StreamResponse:
    request[ROUTE_LABEL] = "editor_handoff"
    handoff = origin.redeem(request.query.get("token", ""), None)
    if handoff is None:
        return plain_page(400, "This link has expired", "Links that open an editor work once, for a minute. "
                          "Open the editor again from the session's page.", (origin.ui_url(request, "/sessions"), "Your sessions"))
    response = web.HTTPSeeOther(handoff.target)
    response.headers["Cache-Control"] = "no-store"
    response.headers["Referrer-Policy"] = "no-referrer"
    response.set_cookie(EDITOR_COOKIE, origin.cookie_value(handoff.login_digest), httponly=True, samesite="Strict",
                        path="/editors/", secure=origin.secure, max_age=origin.settings.session_hours * 3600)
    raise response


async def _proxy(request: web.Request, origin: EditorsOrigin, session_id: str) -> web.StreamResponse:
    request[ROUTE_LABEL] = "editor_proxy"
    websocket = request.headers.get("Upgrade", "").lower() == "websocket"
    sent_origin = request.headers.get("Origin")
    if (websocket or request.method not in SAFE_METHODS) and sent_origin and sent_origin != origin.origin_of(request):
        raise PermissionDenied(f"requests from {sent_origin} may not drive an editor")
    proxy: EditorProxy = request.app[EDITORS]
    access = await proxy.access(origin.login_digest_of(request.cookies.get(EDITOR_COOKIE)), session_id)
    if access.why is not None:
        raise access.why
    headers = CIMultiDict((k, v) for k, v in request.headers.items() if k.lower() not in DROPPED_REQUEST_HEADERS)
    headers["Host"] = request.host  # JupyterLab compares a WebSocket's Origin with it
    headers["Authorization"] = f"token {proxy.sockets.token(session_id)}"
    cookies = forwarded_cookies(request)
    if cookies:
        headers["Cookie"] = cookies
    headers["X-Forwarded-Proto"] = request.scheme
    target = f"{access.base_url}{request.path_qs}"
    client = proxy.client(access.target)
    if websocket:
        return await relay_websocket(request, client, target.replace("http://", "ws://", 1), headers, what="editor",
                                     max_msg_size=0)  # a kernel's messages carry whole outputs
    try:
        async with client.request(request.method, target, headers=headers, allow_redirects=False,
                                  data=request.content if request.body_exists else None) as upstream:
            passed = [(k, v) for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP
                      and not sets_appliance_cookie(k, v)]
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            response.headers.extend(passed)
            if upstream.content_length is not None:
                response.content_length = upstream.content_length
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response
    except (aiohttp.ClientConnectionError, asyncio.TimeoutError) as exc:
        if request.method == "GET" and "text/html" in request.headers.get("Accept", ""):
            # A browser opening the editor while JupyterLab starts: a page that tries again.
            return plain_page(503, "Starting JupyterLab…", "The session runs; its editor is starting. "
                              "This page reloads by itself.", headers={"Retry-After": "2"}, refresh_seconds=2)
        raise Unavailable(f"the editor did not answer (it may still be starting): {exc}") from None


def create_listener_app(main: web.Application) -> web.Application:
    """The editors' own listener: the hand-over and the editors, nothing of the UI."""
    app = listener.sharing(main, (EDITORS, EDITORS_ORIGIN, METRICS), middlewares=[observe],
                           client_max_size=main[EDITORS_ORIGIN].settings.max_upload_mb * 1024 * 1024)
    app.router.add_route("*", "/{tail:.*}", serve, name="editors_listener")
    return app
