"""The application proxy: http://<subdomain>.<domain>/ (by Host header) and /apps/<subdomain>/
(no wildcard DNS needed) lead to the application's 127.0.0.1:$CDSW_APP_PORT, with streamed
responses and WebSockets.

Application traffic is many small requests a second, so it takes a short path: the `gateway`
middleware (right after observe and errors) answers it before the API and page middlewares run.
Model calls (POST /model), which check their callers themselves, take the same short cut.
Who is calling (cookie or Application-audience key), where the app is and whether the caller may
open it are each remembered for ROUTE_TTL_SECONDS (applications/service.py).
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
from aiohttp import WSMsgType, web

from cml_appliance.applications.service import RESERVED_SUBDOMAINS
from cml_appliance.core.errors import NotFound, Unauthenticated, Unavailable
from cml_appliance.core.tasks import until_first_done
from cml_appliance.web.context import ROUTE_LABEL, SESSION_COOKIE, USER
from cml_appliance.web.keys import APP_PROXY_SESSION, APPLICATIONS, SETTINGS

HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
                        "transfer-encoding", "upgrade", "host", "content-length"})
# The user's credentials for the appliance never reach the application.
PRIVATE_HEADERS = frozenset({"authorization", "cookie"})
DROPPED_REQUEST_HEADERS = (HOP_BY_HOP - {"content-length"}) | PRIVATE_HEADERS
# The appliance's own cookies (sign-in, flash, pre-sign-in): an application may never set them.
APPLIANCE_COOKIE_PREFIX = "cml_"
# Answers up to this size with a Content-Length are passed on in one piece (one write, not a
# chunked stream); larger or open-ended ones stream as they come.
WHOLE_BODY_LIMIT = 256 * 1024


def subdomain_of_host(request: web.Request) -> str | None:
    """`<sub>` when the request came for http://<sub>.<domain>/ (wildcard DNS), else None."""
    host = request.host.split(":", 1)[0].lower()
    domain = request.app[SETTINGS].domain.split(":", 1)[0].lower()
    if host.endswith("." + domain):
        sub = host[: -len(domain) - 1]
        if sub and "." not in sub:
            return sub
    return None


# Routes that check their callers themselves and are called many times a second: the gateway
# sends them straight to their handler, past the API and page middlewares (POST /model).
SELF_CHECKING_ROUTES = frozenset({"model_endpoint", "model_endpoint_altus"})


@web.middleware
async def gateway(request: web.Request, handler: Any) -> web.StreamResponse:
    """Application traffic goes to the proxy, model calls to their handler; everything else on
    through the appliance."""
    subdomain = subdomain_of_host(request)
    if subdomain is not None and subdomain not in RESERVED_SUBDOMAINS:
        return await proxy(request, subdomain, request.path)
    name = request.match_info.route.name
    if name == "app_proxy":
        return await by_path(request)
    if name in SELF_CHECKING_ROUTES:
        return await request.match_info.handler(request)  # the route's own handler, no middleware after this one
    return await handler(request)


async def by_path(request: web.Request) -> web.StreamResponse:
    """/apps/<subdomain>/<path>: the gateway calls this before the API and page middlewares."""
    subdomain, slash, tail = request.match_info["tail"].partition("/")
    if not subdomain:
        raise NotFound("name an application: /apps/<subdomain>/")
    if not slash:  # relative links in the app need the slash
        raise web.HTTPFound(f"/apps/{subdomain}/" + (f"?{request.query_string}" if request.query_string else ""))
    return await proxy(request, subdomain, "/" + tail, prefix=f"/apps/{subdomain}")


def routes() -> list[web.RouteDef]:
    # Resolving the path to a route of its own is cheaper than a miss, and names it in the metrics.
    return [web.route("*", "/apps/{tail:.*}", by_path, name="app_proxy")]


def _bearer(request: web.Request) -> str | None:
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    return value.strip() or None if scheme.lower() == "bearer" else None


async def proxy(request: web.Request, subdomain: str, path: str, prefix: str = "") -> web.StreamResponse:
    request[ROUTE_LABEL] = "app_proxy"  # for the metrics
    apps = request.app[APPLICATIONS]
    route = await apps.route(subdomain)
    if route is None:
        raise NotFound(f"there is no application at {subdomain!r}")
    user = await apps.visitor(_bearer(request), request.cookies.get(SESSION_COOKIE))
    if user is not None:
        request[USER] = user
    if not (route.app.bypass_authentication and apps.allow_unauthenticated):
        if user is None:
            raise Unauthenticated("sign in to open this application")
        if not await apps.may_open(user, route):
            raise NotFound(f"there is no application at {subdomain!r}")
    if route.address is None:
        raise Unavailable(f"the application is not running ({route.status})")
    target = f"http://{route.address}{path}" + (f"?{request.query_string}" if request.query_string else "")
    # Content-Length stays: many small servers cannot read a chunked request body.
    headers = {k: v for k, v in request.headers.items() if k.lower() not in DROPPED_REQUEST_HEADERS}
    headers["X-Forwarded-Host"] = request.host
    headers["X-Forwarded-Proto"] = request.scheme
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
            passed = [(k, v) for k, v in upstream.headers.items()
                      if k.lower() not in HOP_BY_HOP and not _sets_our_cookie(k, v)]
            length = upstream.content_length
            if length is not None and length <= WHOLE_BODY_LIMIT and request.method != "HEAD":
                body = await upstream.read()
                response = web.Response(status=upstream.status, reason=upstream.reason, body=body)
                response.headers.extend(passed)
                return response
            streamed = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            streamed.headers.extend(passed)
            if length is not None:
                streamed.content_length = length  # a known length is kept (downloads, HEAD), not chunked
            await streamed.prepare(request)
            async for chunk in upstream.content.iter_any():
                await streamed.write(chunk)
            await streamed.write_eof()
            return streamed
    except (aiohttp.ClientConnectionError, asyncio.TimeoutError) as exc:
        raise Unavailable(f"the application did not answer: {exc}") from None


def _sets_our_cookie(name: str, value: str) -> bool:
    """An application's Set-Cookie for one of the appliance's cookies, which would replace the
    user's sign-in (a fixation) on this host: dropped."""
    return name.lower() == "set-cookie" and value.split("=", 1)[0].strip().lower().startswith(APPLIANCE_COOKIE_PREFIX)


async def _proxy_websocket(request: web.Request, session: aiohttp.ClientSession, target: str,
                           headers: dict[str, str]) -> web.StreamResponse:
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
