"""Per-request state shared by middlewares and handlers: the user, the sign-in session, CSRF."""

from __future__ import annotations

from aiohttp import web

from cml_appliance.auth.login_sessions import LoginSession
from cml_appliance.auth.users import User
from cml_appliance.core.errors import PermissionDenied, Unauthenticated
from cml_appliance.core.security import sign, verify_signature
from cml_appliance.web.keys import SETTINGS

USER = web.RequestKey("user", User)
# A metrics label for requests that no route names (application traffic).
ROUTE_LABEL = web.RequestKey("route_label", str)
LOGIN = web.RequestKey("login", LoginSession)
SESSION_COOKIE = "cml_session"
PRELOGIN_COOKIE = "cml_prelogin"
# The pre-sign-in nonce chosen while rendering a page, before its cookie reaches the browser.
PRELOGIN_NONCE = web.RequestKey("prelogin_nonce", str)


def is_api_path(path: str) -> bool:
    """Paths answered in JSON to callers with API keys: API v2 and each project's MLflow API."""
    return path.startswith(("/api/", "/mlflow/"))


def current_user(request: web.Request) -> User:
    user = request.get(USER)
    if user is None:
        raise Unauthenticated("sign in first")
    return user


def require_site_admin(request: web.Request) -> User:
    user = current_user(request)
    if not user.is_admin:
        raise PermissionDenied("only site administrators may do that")
    return user


def csrf_token(request: web.Request) -> str:
    """The token forms must carry: the sign-in session's, or before sign-in one bound to a cookie."""
    login = request.get(LOGIN)
    if login is not None:
        return login.csrf_token
    nonce = request.get(PRELOGIN_NONCE) or request.cookies.get(PRELOGIN_COOKIE, "")
    return sign(request.app[SETTINGS].secret_key, "prelogin:" + nonce) if nonce else ""


def check_csrf(request: web.Request, token: str) -> None:
    login = request.get(LOGIN)
    if login is not None:
        ok = bool(token) and token == login.csrf_token
    else:
        nonce = request.cookies.get(PRELOGIN_COOKIE, "")
        ok = bool(nonce) and verify_signature(request.app[SETTINGS].secret_key, "prelogin:" + nonce, token)
    if not ok:
        raise PermissionDenied("the form has expired or did not come from this site: reload the page and try again")
