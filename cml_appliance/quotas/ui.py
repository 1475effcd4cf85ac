"""Page: the site's quotas (site admins): the defaults for users and teams, and each account's
quota beside what it uses now, each changeable in place."""

from __future__ import annotations

from typing import Any

import aiohttp_jinja2
from aiohttp import web

from cml_appliance.core.errors import AppError
from cml_appliance.quotas.service import Quota, amount
from cml_appliance.web.context import require_site_admin
from cml_appliance.web.keys import QUOTAS
from cml_appliance.web.templating import redirect


def _quota(form: Any) -> Quota:
    return Quota(amount(form.get("cpu"), "vCPU"), amount(form.get("memory"), "memory"),  # type: ignore[arg-type]
                 amount(form.get("nvidia_gpu"), "GPUs", whole=True))  # type: ignore[arg-type]


async def quotas_page(request: web.Request, *, error: str = "", status: int = 200) -> web.StreamResponse:
    require_site_admin(request)
    quotas = request.app[QUOTAS]
    defaults = {kind: await quotas.default(kind) for kind in ("user", "team")}
    accounts = []
    for teams in (False, True):
        rows, _, _ = await quotas.accounts(teams=teams, only=None, deactivated=False, descending=False, limit=500, offset=0)
        for row in rows:
            accounts.append({"username": row["username"], "team": teams, "own": await quotas.has_own(row["id"]),
                             "configured": await quotas.configured(row["id"], teams), "used": await quotas.usage(row["id"], teams)})
    return aiohttp_jinja2.render_template("admin_quotas.html", request,
                                          {"defaults": defaults, "accounts": accounts, "error": error}, status=status)


async def set_default(request: web.Request) -> web.StreamResponse:
    admin = require_site_admin(request)
    form = await request.post()
    kind = request.match_info["kind"]
    try:
        await request.app[QUOTAS].set_default(admin, kind, _quota(form), form.get("active") == "on")
    except AppError as exc:
        return await quotas_page(request, error=exc.message, status=exc.status)
    raise redirect(request, "/admin/quotas", "ok", f"Saved the default quota for {kind}s.")


async def set_account(request: web.Request) -> web.StreamResponse:
    admin = require_site_admin(request)
    form = await request.post()
    username = request.match_info["username"]
    try:
        quota = None if form.get("action") == "default" else _quota(form)
        await request.app[QUOTAS].set_account(admin, username, quota)
    except AppError as exc:
        return await quotas_page(request, error=exc.message, status=exc.status)
    raise redirect(request, "/admin/quotas", "ok", f"Saved the quota of {username}.")


def routes() -> list[web.RouteDef]:
    return [
        web.get("/admin/quotas", quotas_page, name="ui_admin_quotas"),
        web.post("/admin/quotas/default/{kind:user|team}", set_default, name="ui_admin_quota_default"),
        web.post("/admin/quotas/{username}", set_account, name="ui_admin_quota_account"),
    ]
