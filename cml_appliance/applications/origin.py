"""The applications' own origin: what users serve never runs on the UI's origin.

An application's JavaScript on the UI's origin could read the UI's pages (and their CSRF
tokens) and call the API as whoever opened it. So applications are served elsewhere:

- by port (the default, no DNS needed): a second listener, http://<host>:<apps_port>/apps/<sub>/;
  `apps_url` names it when a proxy stands in front;
- by host name (wildcard DNS, `apps_domain`): http://<sub>.<apps_domain>/, on either listener;
  every application is then an origin of its own.

The UI's sign-in cookie is never accepted there. Opening an application from the UI hands the
user over: the UI (which knows the user) issues a one-time token valid for HANDOFF_TTL_SECONDS
and redirects to <apps origin>/_cml/handoff?token=…, which sets a cookie of the applications'
origin (APPS_COOKIE) and redirects on to the application. That cookie is HttpOnly, never passed
to an application, and names the sign-in session it came from (signed with the site key), so
signing out of the UI closes the applications too.

Cookies ignore ports: by port, the browser sends the UI's cookies to the applications' listener
(and this cookie to the UI). Neither side accepts the other's cookie, and the proxy strips every
cml_* cookie before a request reaches an application.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from html import escape

from aiohttp import web

from cml_appliance.core.errors import AppError, Unauthenticated
from cml_appliance.core.settings import Settings
from cml_appliance.web.handoff import HANDOFF_PATH, HandoffOrigin

log = logging.getLogger(__name__)

__all__ = ["APPS_COOKIE", "HANDOFF_PATH", "AppsOrigin", "errors", "plain_page"]
APPS_COOKIE = "cml_apps"


class AppsOrigin(HandoffOrigin):
    """Where applications are served, and how a signed-in user is handed over to it
    (web/handoff.py: the tokens and the cookie)."""

    def __init__(self, settings: Settings):
        super().__init__(settings, "apps-origin-cookie")
        self.port = settings.apps_port  # the bound port once the listener runs (apps_port 0: any)

    # --- addresses ------------------------------------------------------------------------------

    @property
    def by_host(self) -> bool:
        return bool(self.settings.apps_domain)

    def base(self, request: web.Request) -> str:
        """The applications' listener, as users reach it."""
        if self.settings.apps_url:
            return self.settings.apps_url.rstrip("/")
        scheme, host = self._scheme_and_host(request)
        return f"{scheme}://{host}:{self.port}"

    def app_url(self, request: web.Request, subdomain: str, path_qs: str = "/") -> str:
        if self.by_host:
            scheme, _ = self._scheme_and_host(request)
            return f"{scheme}://{subdomain}.{self.settings.apps_domain}{path_qs}"
        return f"{self.base(request)}/apps/{subdomain}{path_qs}"

    def handoff_url(self, request: web.Request, subdomain: str, token: str) -> str:
        if self.by_host:
            scheme, _ = self._scheme_and_host(request)
            return f"{scheme}://{subdomain}.{self.settings.apps_domain}{HANDOFF_PATH}?token={token}"
        return f"{self.base(request)}{HANDOFF_PATH}?token={token}"

    def subdomain_of_host(self, request: web.Request) -> str | None:
        """`<sub>` for a request to <sub>.<apps_domain> (wildcard DNS), else None."""
        if not self.by_host:
            return None
        host = request.host.lower()
        domain = self.settings.apps_domain.lower()
        if ":" not in domain:
            host = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        if host.endswith("." + domain):
            sub = host[: -len(domain) - 1]
            if sub and "." not in sub:
                return sub
        return None

    @property
    def secure(self) -> bool:
        url = self.settings.apps_url or self.settings.public_url
        return url.startswith("https://")


def plain_page(status: int, title: str, message: str, link: tuple[str, str] | None = None,
               headers: dict[str, str] | None = None, refresh_seconds: int = 0) -> web.Response:
    """A small page of the applications' (or editors') origin (errors, an expired hand-over, a
    server still starting, which `refresh_seconds` reloads): no script, no styles from anywhere,
    never framed."""
    anchor = f'<p><a href="{escape(link[0])}">{escape(link[1])}</a></p>' if link else ""
    refresh = f'<meta http-equiv="refresh" content="{refresh_seconds}">' if refresh_seconds else ""
    body = (f"<!doctype html><html lang=en><meta charset=utf-8>{refresh}<title>{escape(title)}</title>"
            f"<h1>{escape(title)}</h1><p>{escape(message)}</p>{anchor}</html>")
    response = web.Response(status=status, text=body, content_type="text/html", headers=headers)
    response.headers["Content-Security-Policy"] = "default-src 'none'; frame-ancestors 'none'"
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["Cache-Control"] = "no-store"
    return response


@web.middleware
async def errors(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    """The applications' listener answers its own errors with a small page, never a UI page."""
    try:
        return await handler(request)
    except AppError as exc:
        headers = {"Retry-After": str(exc.retry_after)} if hasattr(exc, "retry_after") else None
        title = "Sign in first" if isinstance(exc, Unauthenticated) else f"Error {exc.status}"
        return plain_page(exc.status, title, exc.message, headers=headers)
    except web.HTTPException:
        raise
    except Exception:
        log.exception("unexpected error answering %s %s on the applications' listener", request.method, request.path)
        return plain_page(500, "Error 500", "internal error")
