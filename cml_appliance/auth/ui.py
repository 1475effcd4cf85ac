"""Pages: sign in and out, the API keys page, and site administration of users."""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote, urlsplit

import aiohttp_jinja2
from aiohttp import web

from cml_appliance.auth import api_keys, login_sessions, users
from cml_appliance.core.errors import AppError, InvalidArgument, TooManyRequests
from cml_appliance.core.security import new_token, token_digest
from cml_appliance.web.context import (
    LOGIN,
    PRELOGIN_COOKIE,
    PRELOGIN_NONCE,
    SESSION_COOKIE,
    csrf_token,
    current_user,
    require_site_admin,
)
from cml_appliance.web.keys import APPLICATIONS, POOL, SETTINGS
from cml_appliance.web.templating import redirect


def _safe_next(value: str) -> str:
    """Only a path of this site: never redirect to another site after sign-in.

    Browsers drop tabs and newlines from a URL and read a backslash as a slash, so
    "/%09/evil.example" would become "//evil.example": any control character refuses the value.
    """
    for form in (value, unquote(value)):  # decoded too: it costs nothing to be strict
        if not form.startswith("/") or form.startswith("//") or "\\" in form:
            return "/projects"
        if any(ord(ch) < 32 or ord(ch) == 127 for ch in form):
            return "/projects"
        parts = urlsplit(form)
        if parts.scheme or parts.netloc:
            return "/projects"
    return value


async def index(request: web.Request) -> web.StreamResponse:
    raise web.HTTPFound("/projects" if request.get(LOGIN) else "/login")


async def login_page(request: web.Request) -> web.StreamResponse:
    if not await users.count_users(request.app[POOL]):
        raise web.HTTPFound("/setup")
    if request.get(LOGIN):
        raise web.HTTPFound(_safe_next(request.query.get("next", "/projects")))
    return await _render_login(request, next_path=request.query.get("next", "/projects"))


def _render_anonymous(request: web.Request, template: str, context: dict[str, Any], status: int = 200) -> web.StreamResponse:
    """A page for signed-out visitors. Its form's CSRF token is bound to a random cookie set with it."""
    nonce = request.cookies.get(PRELOGIN_COOKIE) or new_token(16)
    request[PRELOGIN_NONCE] = nonce
    # Context processors ran before the handler chose the nonce: give the token explicitly.
    context = context | {"csrf_token": csrf_token(request)}
    response = aiohttp_jinja2.render_template(template, request, context, status=status)
    response.set_cookie(PRELOGIN_COOKIE, nonce, httponly=True, samesite="Lax", path="/",
                        secure=request.app[SETTINGS].secure_cookies)
    return response


async def _render_login(request: web.Request, *, next_path: str, error: str = "", username: str = "", status: int = 200) -> web.StreamResponse:
    context = {"next": _safe_next(next_path), "error": error, "username": username}
    return _render_anonymous(request, "login.html", context, status)


def _sign_in(request: web.Request, response: web.StreamResponse, token: str) -> None:
    settings = request.app[SETTINGS]
    response.set_cookie(
        SESSION_COOKIE, token, httponly=True, samesite="Lax", path="/", secure=settings.secure_cookies,
        max_age=settings.session_hours * 3600,
    )
    response.del_cookie(PRELOGIN_COOKIE, path="/")


async def setup_page(request: web.Request) -> web.StreamResponse:
    """First run: with no users at all, whoever opens the appliance first creates its administrator."""
    if await users.count_users(request.app[POOL]):
        raise web.HTTPFound("/login")
    return _render_anonymous(request, "setup.html", {"error": "", "form": {}})


async def setup_submit(request: web.Request) -> web.StreamResponse:
    form = {k: str(v) for k, v in (await request.post()).items()}
    try:
        user = await users.create_user(
            request.app[POOL], form.get("username", "").strip().lower(), form.get("email", "").strip(),
            form.get("password", ""), name=form.get("name", "").strip(), is_admin=True, first_user_only=True,
        )
    except AppError as exc:
        return _render_anonymous(request, "setup.html", {"error": exc.message, "form": form}, exc.status)
    token = await login_sessions.create(request.app[POOL], user, request.app[SETTINGS].session_hours)
    response = web.HTTPFound("/projects")
    _sign_in(request, response, token)
    raise response


async def login_submit(request: web.Request) -> web.StreamResponse:
    form = await request.post()
    username = str(form.get("username", "")).strip().lower()
    password = str(form.get("password", ""))
    next_path = _safe_next(str(form.get("next", "/projects")))
    settings = request.app[SETTINGS]
    try:
        user = await users.authenticate(
            request.app[POOL], username, password, request.remote or "unknown", settings.login_max_failures
        )
    except TooManyRequests as exc:
        return await _render_login(request, next_path=next_path, error=exc.message, username=username, status=429)
    if user is None:
        return await _render_login(
            request, next_path=next_path, error="Wrong username or password.", username=username, status=401
        )
    token = await login_sessions.create(request.app[POOL], user, settings.session_hours)
    response = web.HTTPFound(next_path)
    _sign_in(request, response, token)
    raise response


async def logout(request: web.Request) -> web.StreamResponse:
    token = request.cookies.get(SESSION_COOKIE)
    if token:
        await login_sessions.delete(request.app[POOL], token)
        request.app[APPLICATIONS].signed_out(token_digest(token))
    response = web.HTTPFound("/login")
    response.del_cookie(SESSION_COOKIE, path="/")
    raise response


# API keys ------------------------------------------------------------------------------------

async def _keys_page(request: web.Request, extra: dict[str, Any] | None = None, status: int = 200) -> web.StreamResponse:
    user = current_user(request)
    keys = await api_keys.list_for(request.app[POOL], user)
    # The address clients should use: the configured public URL, else the one this page came from.
    api_url = request.app[SETTINGS].public_url.rstrip("/") or f"{request.scheme}://{request.host}"
    context = {"keys": keys, "new_key": None, "error": "", "api_url": api_url} | (extra or {})
    return aiohttp_jinja2.render_template("api_keys.html", request, context, status=status)


async def keys_page(request: web.Request) -> web.StreamResponse:
    return await _keys_page(request)


async def keys_create(request: web.Request) -> web.StreamResponse:
    user = current_user(request)
    form = await request.post()
    audiences = [str(a) for a in form.getall("audiences", [])]
    try:
        expiry = api_keys.parse_expiry(str(form.get("expiry_date", "")).strip() + "T00:00:00Z") if form.get("expiry_date") else None
        secret, key = await api_keys.create(
            request.app[POOL], user, comments=str(form.get("comments", ""))[:500], audiences=audiences, expires_at=expiry
        )
    except AppError as exc:
        return await _keys_page(request, {"error": exc.message}, status=exc.status)
    # Shown once, on this response only: no redirect, so the key is never stored anywhere.
    return await _keys_page(request, {"new_key": secret, "new_key_id": key.key_id})


async def keys_delete(request: web.Request) -> web.StreamResponse:
    user = current_user(request)
    await api_keys.delete(request.app[POOL], user, request.match_info["key_id"], user.id)
    raise redirect(request, "/settings/api-keys", "ok", "The key was deleted; clients using it are refused from now on.")


# Site administration ---------------------------------------------------------------------------

async def admin_users(request: web.Request, *, error: str = "", status: int = 200) -> web.StreamResponse:
    require_site_admin(request)
    all_users = await users.list_users(request.app[POOL])
    return aiohttp_jinja2.render_template("admin_users.html", request, {"users": all_users, "error": error}, status=status)


async def admin_users_page(request: web.Request) -> web.StreamResponse:
    return await admin_users(request)


async def admin_create_user(request: web.Request) -> web.StreamResponse:
    admin = require_site_admin(request)
    form = await request.post()
    try:
        created = await users.create_user(
            request.app[POOL],
            str(form.get("username", "")).strip().lower(),
            str(form.get("email", "")).strip(),
            str(form.get("password", "")),
            name=str(form.get("name", "")).strip(),
            is_admin=form.get("is_admin") == "on",
            actor_id=admin.id,
        )
    except AppError as exc:
        return await admin_users(request, error=exc.message, status=exc.status)
    raise redirect(request, "/admin/users", "ok", f"Created user {created.username}.")


async def admin_update_user(request: web.Request) -> web.StreamResponse:
    admin = require_site_admin(request)
    username = request.match_info["username"]
    form = await request.post()
    action = str(form.get("action", ""))
    changes = {
        "make_admin": {"is_admin": True},
        "revoke_admin": {"is_admin": False},
        "deactivate": {"is_active": False},
        "activate": {"is_active": True},
    }.get(action)
    if changes is None:
        raise InvalidArgument(f"unknown action {action!r}")
    if username == admin.username and action in ("revoke_admin", "deactivate"):
        raise InvalidArgument("you cannot remove your own administrator rights or deactivate yourself")
    await users.update_user(request.app[POOL], username, actor_id=admin.id, **changes)
    raise redirect(request, "/admin/users", "ok", f"Updated {username}.")


def routes() -> list[web.RouteDef]:
    return [
        web.get("/", index, name="index"),
        web.get("/setup", setup_page, name="setup"),
        web.post("/setup", setup_submit, name="setup_post"),
        web.get("/login", login_page, name="login"),
        web.post("/login", login_submit, name="login_post"),
        web.post("/logout", logout, name="logout"),
        web.get("/settings/api-keys", keys_page, name="ui_api_keys"),
        web.post("/settings/api-keys", keys_create, name="ui_api_keys_create"),
        web.post("/settings/api-keys/{key_id}/delete", keys_delete, name="ui_api_keys_delete"),
        web.get("/admin/users", admin_users_page, name="ui_admin_users"),
        web.post("/admin/users", admin_create_user, name="ui_admin_users_create"),
        web.post("/admin/users/{username}", admin_update_user, name="ui_admin_users_update"),
    ]
