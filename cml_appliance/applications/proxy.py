"""The application proxy: an application's own origin (applications/origin.py) leads to its
127.0.0.1:$CDSW_APP_PORT, with streamed responses and WebSockets.

- On the applications' listener: /apps/<subdomain>/<path>, and the hand-over /_cml/handoff.
- On either listener, with wildcard DNS: http://<subdomain>.<apps_domain>/<path>.
- On the UI's origin, /apps/<subdomain>/<path> serves nothing: it hands a signed-in user over
  to the application's origin (open_from_ui), and sends API clients there (307).

Application traffic is many small requests a second, so on the UI's listener it takes a short
path: the `gateway` middleware (right after observe and errors) answers it before the API and
page middlewares run. Model calls (POST /model), which check their callers themselves, take the
same short cut. Who is calling (an Application-audience key, or the applications' cookie),
where the app is and whether the caller may open it are each remembered for ROUTE_TTL_SECONDS
(applications/service.py).
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from cml_appliance.applications import origin as apps_origin
from cml_appliance.applications.origin import APPS_COOKIE, HANDOFF_PATH
from cml_appliance.applications.service import RESERVED_SUBDOMAINS
from cml_appliance.core.paths import static_dir
from cml_appliance.core.errors import NotFound, Unauthenticated, Unavailable
from cml_appliance.core.security import token_digest
from cml_appliance.web.context import LOGIN, ROUTE_LABEL, SESSION_COOKIE, USER
from cml_appliance.web.keys import APP_PROXY_SESSION, APPLICATIONS, APPS_ORIGIN, METRICS
from cml_appliance.web import listener
from cml_appliance.web.proxying import HOP_BY_HOP, forwarded_cookies, relay_websocket, sets_appliance_cookie
from cml_appliance.web.middlewares import observe

# The user's credentials for the appliance never reach the application (cookies: only cml_* ones).
DROPPED_REQUEST_HEADERS = (HOP_BY_HOP - {"content-length"}) | {"authorization", "cookie"}
# Answers up to this size with a Content-Length are passed on in one piece (one write, not a
# chunked stream); larger or open-ended ones stream as they come.
WHOLE_BODY_LIMIT = 256 * 1024

# Routes that check their callers themselves: the gateway sends them straight to their handler,
# past the API and page middlewares (POST /model, called many times a second; git's smart HTTP,
# whose clients sign in with HTTP Basic and send no CSRF token).
SELF_CHECKING_ROUTES = frozenset({"model_endpoint", "model_endpoint_altus", "git_smart_http",
                                  # the registry proxy: Docker token auth, no cookie
                                  "registry_base", "registry_token", "registry_catalog", "registry_api"})


@web.middleware
async def gateway(request: web.Request, handler: Any) -> web.StreamResponse:
    """On the UI's listener: requests for <subdomain>.<apps_domain> go to the application, model
    calls to their handler; everything else on through the appliance."""
    subdomain = request.app[APPS_ORIGIN].subdomain_of_host(request)
    if subdomain is not None and subdomain not in RESERVED_SUBDOMAINS:
        # The application's origin answers its own errors: never a UI page, never a UI sign-in link.
        return await apps_origin.errors(request, serve)
    if request.match_info.route.name in SELF_CHECKING_ROUTES:
        return await request.match_info.handler(request)  # the route's own handler, no middleware after this one
    return await handler(request)


def routes() -> list[web.RouteDef]:
    """The UI listener's /apps/…: a hand-over to the applications' origin."""
    return [web.get("/apps/{tail:.*}", open_from_ui, name="app_open")]


def _split_app_path(request: web.Request, tail: str) -> tuple[str, str]:
    """/apps/<subdomain>/<rest>?<query> -> (subdomain, /<rest>?<query>)."""
    subdomain, slash, rest = tail.partition("/")
    if not subdomain:
        raise NotFound("name an application: /apps/<subdomain>/")
    query = f"?{request.query_string}" if request.query_string else ""
    if not slash:  # relative links in the app need the slash
        raise web.HTTPFound(f"/apps/{subdomain}/{query}")
    return subdomain, "/" + rest + query


async def open_from_ui(request: web.Request) -> web.StreamResponse:
    """GET /apps/<subdomain>/<path> on the UI's origin: a signed-in user who may open the
    application gets a one-time token and goes to its origin, which sets a cookie of its own.
    API clients (a Bearer key) are sent straight there; visitors who are not signed in sign in
    first, unless the application is open to everyone."""
    subdomain, path_qs = _split_app_path(request, request.match_info["tail"])
    origin, apps = request.app[APPS_ORIGIN], request.app[APPLICATIONS]
    target = origin.app_url(request, subdomain, path_qs)
    if request.headers.get("Authorization"):
        raise web.HTTPTemporaryRedirect(target)
    route = await apps.route(subdomain)
    if route is None:
        raise NotFound(f"there is no application at {subdomain!r}")
    login = request.get(LOGIN)
    if login is None:
        if route.app.bypass_authentication and apps.allow_unauthenticated:
            raise web.HTTPSeeOther(target)
        raise Unauthenticated("sign in to open this application")
    if not await apps.may_open(login.user, route):
        raise NotFound(f"there is no application at {subdomain!r}")
    token = origin.issue(token_digest(request.cookies[SESSION_COOKIE]), subdomain, path_qs)
    response = web.HTTPSeeOther(origin.handoff_url(request, subdomain, token))
    response.headers["Cache-Control"] = "no-store"
    raise response


async def serve(request: web.Request) -> web.StreamResponse:
    """Everything the applications' origin answers: the hand-over, and the applications."""
    origin = request.app[APPS_ORIGIN]
    subdomain = origin.subdomain_of_host(request)
    if request.path == HANDOFF_PATH:
        return await _handoff(request, origin, subdomain)
    if subdomain is not None:
        return await proxy(request, subdomain, request.path_qs)
    if request.path.startswith("/apps/"):
        subdomain, path_qs = _split_app_path(request, request.path[len("/apps/"):])
        return await proxy(request, subdomain, path_qs, prefix=f"/apps/{subdomain}")
    request[ROUTE_LABEL] = "apps_listener"
    if request.path == "/favicon.ico":  # browsers ask the origin's root for it, whatever the app
        return web.FileResponse(static_dir() / "favicon.svg", headers={"Content-Type": "image/svg+xml"})
    return apps_origin.plain_page(404, "Nothing here", "Applications are at /apps/<subdomain>/.")


async def _handoff(request: web.Request, origin: apps_origin.AppsOrigin, subdomain: str | None) -> web.StreamResponse:
    """GET /_cml/handoff?token=…: the token becomes this origin's cookie, once."""
    request[ROUTE_LABEL] = "app_handoff"
    handoff = origin.redeem(request.query.get("token", ""), subdomain)
    if handoff is None:
        return apps_origin.plain_page(
            400, "This link has expired", "Links that open an application work once, for a minute. "
            "Open the application again from the appliance.", (origin.ui_url(request, "/"), "Back to the appliance"))
    target = handoff.target if subdomain is not None else f"/apps/{handoff.scope}{handoff.target}"
    response = web.HTTPSeeOther(target)
    response.headers["Cache-Control"] = "no-store"
    response.headers["Referrer-Policy"] = "no-referrer"
    response.set_cookie(APPS_COOKIE, origin.cookie_value(handoff.login_digest), httponly=True, samesite="Lax",
                        path="/", secure=origin.secure, max_age=origin.settings.session_hours * 3600)
    raise response


def create_listener_app(main: web.Application) -> web.Application:
    """The applications' own listener: the hand-over and the applications, nothing of the UI."""
    app = listener.sharing(main, (APPS_ORIGIN, APPLICATIONS, APP_PROXY_SESSION, METRICS),
                           middlewares=[observe, apps_origin.errors],
                           client_max_size=main[APPS_ORIGIN].settings.max_upload_mb * 1024 * 1024)
    app.router.add_route("*", "/{tail:.*}", serve, name="apps_listener")
    return app


def _bearer(request: web.Request) -> str | None:
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    return value.strip() or None if scheme.lower() == "bearer" else None


async def proxy(request: web.Request, subdomain: str, path: str, prefix: str = "") -> web.StreamResponse:
    request[ROUTE_LABEL] = "app_proxy"  # for the metrics
    apps, origin = request.app[APPLICATIONS], request.app[APPS_ORIGIN]
    route = await apps.route(subdomain)
    if route is None:
        raise NotFound(f"there is no application at {subdomain!r}")
    user = await apps.visitor(_bearer(request), origin.login_digest_of(request.cookies.get(APPS_COOKIE)))
    if user is not None:
        request[USER] = user
    if not (route.app.bypass_authentication and apps.allow_unauthenticated):
        if user is None:
            if request.method in ("GET", "HEAD") and not request.headers.get("Authorization") \
                    and request.headers.get("Upgrade", "").lower() != "websocket":
                # A browser: sign in on the UI, which hands the user back over to this origin.
                raise web.HTTPFound(origin.ui_url(request, f"/apps/{subdomain}{path}"))
            raise Unauthenticated("sign in to open this application: open it from the appliance, "
                                  "or send 'Authorization: Bearer <key made for Applications>'")
        if not await apps.may_open(user, route):
            raise NotFound(f"there is no application at {subdomain!r}")
    if route.address is None:
        raise Unavailable(f"the application is not running ({route.status})")
    target = f"http://{route.address}{path}"
    # Content-Length stays: many small servers cannot read a chunked request body.
    # A multidict: a header a client sends more than once (Accept, Forwarded) goes on as it came.
    headers = CIMultiDict((k, v) for k, v in request.headers.items() if k.lower() not in DROPPED_REQUEST_HEADERS)
    cookies = forwarded_cookies(request)
    if cookies:
        headers["Cookie"] = cookies
    headers["X-Forwarded-Host"] = request.host
    headers["X-Forwarded-Proto"] = request.scheme
    if prefix:
        headers["X-Forwarded-Prefix"] = prefix
    if user is not None:
        headers["X-Forwarded-User"] = user.username
    session = request.app[APP_PROXY_SESSION]
    if request.headers.get("Upgrade", "").lower() == "websocket":
        return await relay_websocket(request, session, target.replace("http://", "ws://", 1), headers, what="application")
    try:
        async with session.request(request.method, target, headers=headers, allow_redirects=False,
                                   data=request.content if request.body_exists else None) as upstream:
            passed = [(k, v) for k, v in upstream.headers.items()
                      if k.lower() not in HOP_BY_HOP and not sets_appliance_cookie(k, v)]
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


