"""Page: diagnostics bundles (site admins): make one for a window, see it progress, download it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import aiohttp_jinja2
from aiohttp import web

from cml_appliance.core.errors import AppError
from cml_appliance.diagnostics.api import download
from cml_appliance.web.context import require_site_admin
from cml_appliance.web.keys import DIAGNOSTICS
from cml_appliance.web.templating import redirect

WINDOWS = {"hour": ("The last hour", timedelta(hours=1)), "day": ("The last 24 hours", timedelta(days=1)),
           "week": ("The last 7 days", timedelta(days=7))}


async def diagnostics_page(request: web.Request, *, error: str = "", status: int = 200) -> web.StreamResponse:
    require_site_admin(request)
    bundles = await request.app[DIAGNOSTICS].newest()
    return aiohttp_jinja2.render_template("admin_diagnostics.html", request, {
        "bundles": bundles, "windows": WINDOWS, "error": error,
        "working": any(b["status"] == "DIAG_IN_PROGRESS" for b in bundles)}, status=status)


async def make_bundle(request: web.Request) -> web.StreamResponse:
    admin = require_site_admin(request)
    form = await request.post()
    label, span = WINDOWS.get(str(form.get("window")), WINDOWS["day"])
    now = datetime.now(UTC)
    try:
        await request.app[DIAGNOSTICS].request(admin.id, now - span, now)
    except AppError as exc:
        return await diagnostics_page(request, error=exc.message, status=exc.status)
    raise redirect(request, "/admin/diagnostics", "ok", f"Making a bundle of {label.lower()}.")


def routes() -> list[web.RouteDef]:
    return [
        web.get("/admin/diagnostics", diagnostics_page, name="ui_admin_diagnostics"),
        web.post("/admin/diagnostics", make_bundle, name="ui_admin_make_diagnostics"),
        web.get("/admin/diagnostics/{request_id}.tar.gz", download, name="ui_admin_download_diagnostics"),
    ]
