"""Middlewares, outermost first:

1. observe: request id (echoed as X-Request-ID), one JSON log line and metrics per request.
   Outermost so it sees the final status of every answer, errors included.
2. errors: domain errors and HTTP exceptions become CML's JSON error body under /api and a page
   elsewhere; anything unexpected is logged once and answered with a generic 500.
3. authenticate: a Bearer API key for /api, the sign-in cookie for pages; public routes are listed.
4. csrf: unsafe page requests must carry the sign-in session's CSRF token.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Awaitable, Callable

import aiohttp_jinja2
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from cml_appliance.auth import api_keys, login_sessions
from cml_appliance.core.errors import AppError, InvalidArgument, Unauthenticated
from cml_appliance.core.logs import request_id_var
from cml_appliance.db.pool import database_unreachable
from cml_appliance.experiments import mlflow_api, mlflow_registry_api
from cml_appliance.web import templating
from cml_appliance.web.context import (
    LOGIN,
    ROUTE_LABEL,
    SESSION_COOKIE,
    USER,
    check_csrf,
    is_api_path,
)
from cml_appliance.web.keys import METRICS, POOL

log = logging.getLogger("cml_appliance.access")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
# Routes anyone may reach without signing in.
PUBLIC_ROUTES = frozenset(
    {"healthz", "readyz", "metrics", "login", "login_post", "setup", "setup_post", "static", "favicon", "api_validate_key", "index",
     "api_openapi",
     # Authenticates itself with HTTP Basic (CDSW's v1 API).
     "api_v1_start_job", "api_v1_start_job_v2_path", "git_smart_http",
     # The model endpoint checks the model's access key, and the caller's key when the model asks.
     "model_endpoint", "model_endpoint_altus",
     # Hands a signed-in user over to the applications' origin, or sends them to sign in.
     "app_open"}
) | mlflow_api.route_names(mlflow_registry_api.routes())  # each project's MLflow API checks its own key, in MLflow's shape
# Page forms whose handlers stream their multipart body and check its CSRF token themselves
# (projects/ui.py _form_fields: the token must be the first field).
STREAMED_FORMS = frozenset({"ui_project_create", "ui_project_upload"})
# Seconds a client is told to wait when the database is away.
DATABASE_RETRY_AFTER = 5
# HTTP status -> gRPC code, for errors aiohttp raises itself (no route, wrong method, body too large).
_GRPC_CODES = {400: 3, 401: 16, 403: 7, 404: 5, 405: 12, 409: 6, 413: 8, 429: 8, 501: 12, 503: 14}


def _route_name(request: web.Request) -> str:
    # match_info is a dict of path parameters: empty (falsy) for routes without any.
    if label := request.get(ROUTE_LABEL):
        return label
    route = request.match_info.route
    if route is None or route.resource is None:
        return "unmatched"
    return route.name or route.resource.canonical


@web.middleware
async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
    incoming = request.headers.get("X-Request-ID", "")
    request_id = incoming if _REQUEST_ID_RE.match(incoming) else os.urandom(16).hex()
    token = request_id_var.set(request_id)
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        response.headers["X-Request-ID"] = request_id
        return response
    except web.HTTPException as exc:  # redirects and bare HTTP errors are answers too
        status = exc.status
        exc.headers["X-Request-ID"] = request_id
        raise
    finally:
        elapsed = time.perf_counter() - started
        route = _route_name(request)
        request.app[METRICS].observe_request(request.method, route, status, elapsed)
        user = request.get(USER)
        log.info(
            "%s %s %s",
            request.method,
            request.path,
            status,
            extra={
                "method": request.method,
                "path": request.path,
                "status": status,
                "duration_ms": round(elapsed * 1000, 2),
                "user": user.username if user else None,
            },
        )
        request_id_var.reset(token)


def api_error(status: int, message: str, grpc_code: int | None = None, headers: dict[str, str] | None = None) -> web.Response:
    code = grpc_code if grpc_code is not None else _GRPC_CODES.get(status, 2)
    body = {"error": message, "code": code, "message": message, "details": []}
    return web.json_response(body, status=status, headers=headers)


async def _page_error(request: web.Request, status: int, message: str) -> web.Response:
    # The error may come from a middleware that runs before aiohttp_jinja2's context processors.
    context = await templating.context_processor(request) | {"status": status, "message": message}
    return aiohttp_jinja2.render_template("error.html", request, context, status=status)


@web.middleware
async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    api = is_api_path(request.path)
    try:
        return await handler(request)
    except AppError as exc:
        headers = {"Retry-After": str(exc.retry_after)} if hasattr(exc, "retry_after") else None
        if api:
            return api_error(exc.status, exc.message, exc.grpc_code, headers)
        if isinstance(exc, Unauthenticated):
            raise web.HTTPFound(f"/login?next={request.path_qs}") from None
        return await _page_error(request, exc.status, exc.message)
    except web.HTTPException as exc:
        if exc.status < 400 or exc.empty_body:
            raise
        message = exc.reason if exc.text is None or exc.text.startswith(f"{exc.status}:") else exc.text
        if exc.status == 413:
            message = "request body is too large"
        if api:
            return api_error(exc.status, message)
        return await _page_error(request, exc.status, message)
    except HttpProcessingError as exc:  # a body aiohttp could not parse (a broken multipart form)
        message = f"the request body could not be read: {str(exc.message).strip()[:200]}"
        if api:
            return api_error(400, message, 3)
        return await _page_error(request, 400, message)
    except Exception as exc:
        if database_unreachable(exc):
            log.warning("the database is unreachable answering %s %s: %s", request.method, request.path, exc)
            message = "the database is unreachable for a moment: try again shortly"
            headers = {"Retry-After": str(DATABASE_RETRY_AFTER)}
            if api:
                return api_error(503, message, 14, headers)
            response = await _page_error(request, 503, message)
            response.headers.update(headers)
            return response
        log.exception("unexpected error answering %s %s", request.method, request.path)
        message = f"internal error; quote request id {request_id_var.get()} when reporting it"
        if api:
            return api_error(500, message, 13)
        return await _page_error(request, 500, message)


def _bearer(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return None


@web.middleware
async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
    pool = request.app[POOL]
    cookie = request.cookies.get(SESSION_COOKIE)
    login = await login_sessions.resolve(pool, cookie) if cookie else None
    if login is not None:
        request[LOGIN] = login
        request[USER] = login.user
    if is_api_path(request.path):
        secret = _bearer(request)
        if secret is not None:
            result = await api_keys.check(pool, secret, "API")
            if result.problem or result.user is None:
                request.pop(USER, None)
                if _route_name(request) not in PUBLIC_ROUTES:
                    raise Unauthenticated(result.problem)
            else:
                request[USER] = result.user
        elif login is not None and request.method not in ("GET", "HEAD"):
            # The cookie alone may read the API from the UI's own pages, never change it.
            request.pop(USER, None)
    if request.get(USER) is None and _route_name(request) not in PUBLIC_ROUTES:
        if request.match_info.http_exception is not None:
            raise request.match_info.http_exception
        raise Unauthenticated("sign in first: send 'Authorization: Bearer <API key>'" if is_api_path(request.path) else "sign in first")
    return await handler(request)


@web.middleware
async def csrf(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.method in ("GET", "HEAD", "OPTIONS") or is_api_path(request.path) or request.path == "/model":
        return await handler(request)
    # Uploads carry the token as their first field and their handlers check it while streaming;
    # every other form, whatever its encoding (multipart too), is read and checked here.
    if request.content_type == "multipart/form-data" and _route_name(request) in STREAMED_FORMS:
        return await handler(request)
    try:
        form = await request.post()
    except ValueError as exc:  # multipart without a boundary, and the like
        raise InvalidArgument(f"the form could not be read: {exc}") from None
    check_csrf(request, str(form.get("csrf_token", "")))
    return await handler(request)

