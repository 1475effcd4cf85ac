"""Template context every page gets, filters, and one-shot flash messages."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime
from typing import Any

import aiohttp_jinja2
import jinja2
from markupsafe import Markup
from aiohttp import hdrs, web

from cml_appliance import __version__
from cml_appliance.core.security import sign, verify_signature
from cml_appliance.web.context import ROUTE_LABEL, USER, csrf_token
from cml_appliance.web import status_words
from cml_appliance.web.keys import SETTINGS
from cml_appliance.workloads import states

FLASH_COOKIE = "cml_flash"
FLASH_SHOWN = web.RequestKey("flash_shown", bool)


def flash(request: web.Request, response: web.StreamResponse, kind: str, text: str) -> web.StreamResponse:
    """Show `text` on the next page rendered (kind: ok or error). Signed so it cannot be forged."""
    payload = base64.urlsafe_b64encode(json.dumps([kind, text]).encode()).decode()
    value = f"{payload}.{sign(request.app[SETTINGS].secret_key, 'flash:' + payload)}"
    response.set_cookie(FLASH_COOKIE, value, httponly=True, samesite="Lax", path="/")
    return response


def json_data(value: Any) -> Markup:
    """JSON to sit raw inside <script type="application/json">: nothing in it can close the tag."""
    return Markup(json.dumps(value, ensure_ascii=False).replace("<", "\\u003c"))


def redirect(request: web.Request, location: str, kind: str = "", text: str = "") -> web.HTTPFound:
    response = web.HTTPFound(location)
    if text:
        flash(request, response, kind, text)
    return response


def _read_flash(request: web.Request) -> list[tuple[str, str]]:
    raw = request.cookies.get(FLASH_COOKIE, "")
    payload, _, signature = raw.partition(".")
    if not payload or not verify_signature(request.app[SETTINGS].secret_key, "flash:" + payload, signature):
        return []
    try:
        kind, text = json.loads(base64.urlsafe_b64decode(payload))
    except (ValueError, TypeError):
        return []
    request[FLASH_SHOWN] = True
    return [(str(kind), str(text))]


async def context_processor(request: web.Request) -> dict[str, Any]:
    return {
        "current_user": request.get(USER),
        "csrf_token": csrf_token(request),
        "version": __version__,
        "request_path": request.path,
        "messages": _read_flash(request),
    }


@web.middleware
async def page_context(request: web.Request, handler: Any) -> web.StreamResponse:
    """What every page's template gets; API requests skip the work (it shows in the benchmark)."""
    if not request.path.startswith("/api/"):
        request[aiohttp_jinja2.REQUEST_CONTEXT_KEY] = await context_processor(request)
    return await handler(request)


async def clear_shown_flash(request: web.Request, response: web.StreamResponse) -> None:
    # By the time this signal runs aiohttp has already turned response.cookies into headers,
    # so the expiring cookie is added as a header of its own.
    if request.get(FLASH_SHOWN) and FLASH_COOKIE not in response.cookies:
        response.headers.add(
            hdrs.SET_COOKIE, f'{FLASH_COOKIE}=""; expires=Thu, 01 Jan 1970 00:00:00 GMT; Max-Age=0; Path=/'
        )


def _when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M UTC") if value else ""


def _ms_when(value: int | None) -> str:
    """A time in milliseconds since the epoch (MLflow's), as _when writes times."""
    return _when(datetime.fromtimestamp(value / 1000, UTC)) if value is not None else ""


def _metric(value: Any) -> str:
    """A metric's value, short: six significant digits; NaN and the infinities as MLflow names them."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{value:.6g}"
    return str(value)


def _size(value: Any) -> str:
    """Bytes in words; empty for what has no size (a folder's FileInfo has no file_size)."""
    if isinstance(value, jinja2.Undefined) or value in (None, ""):
        return ""
    try:
        n = float(value)
    except (TypeError, ValueError):
        return ""
    for unit in ("B", "KB", "MB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


# What every page of the UI is allowed to do: its own scripts only (no inline script, no eval),
# inline styles (xterm.js sets them), images from anywhere over HTTPS (README badges), no framing.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data: https:; "
    "connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
UI_SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
}


async def security_headers(request: web.Request, response: web.StreamResponse) -> None:
    """Every response of the UI and the API carries them; an application's own answers do not
    (the proxy passes those through as the application made them)."""
    if request.get(ROUTE_LABEL) == "app_proxy":
        return
    for name, value in UI_SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    if request.secure:  # over HTTPS: browsers keep to it for a year
        response.headers.setdefault("Strict-Transport-Security", "max-age=31536000")


async def favicon(request: web.Request) -> web.StreamResponse:
    raise web.HTTPMovedPermanently(str(request.app.router["static"].url_for(filename="favicon.svg")))


def setup(app: web.Application) -> None:
    env = aiohttp_jinja2.get_env(app)
    env.filters["when"] = _when
    env.filters["size"] = _size
    env.filters["ms_when"] = _ms_when
    env.filters["metric"] = _metric
    env.globals["public_url"] = app[SETTINGS].base_url
    env.globals["status_word"] = status_words.status_word
    env.globals["ended_summary"] = status_words.ended_summary
    env.globals["status_words_json"] = status_words.words_json()
    env.globals["finished_statuses"] = states.FINISHED
    env.filters["duration"] = status_words.duration
    env.globals["static_url"] = lambda filename: str(app.router["static"].url_for(filename=filename))
    app.on_response_prepare.append(clear_shown_flash)
    app.on_response_prepare.append(security_headers)
    app.router.add_get("/favicon.ico", favicon, name="favicon")
