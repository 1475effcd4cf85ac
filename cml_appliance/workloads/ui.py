"""Page: the site's usage (site admins): CPU, memory and GPUs held over a window as charts, each
user's and team's share of it, and the most recent workloads with what they took."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp_jinja2
from aiohttp import web

from cml_appliance.web.context import require_site_admin
from cml_appliance.web.keys import POOL
from cml_appliance.workloads import usage

WINDOWS = {"day": ("Last 24 hours", timedelta(days=1)), "week": ("Last 7 days", timedelta(days=7)),
           "month": ("Last 30 days", timedelta(days=30))}
RECENT = 50


async def usage_page(request: web.Request) -> web.StreamResponse:
    require_site_admin(request)
    pool = request.app[POOL]
    chosen = request.query.get("window", "day")
    if chosen not in WINDOWS:
        chosen = "day"
    now = datetime.now(UTC)
    window = usage.Window.of(now - WINDOWS[chosen][1], now, now)
    series: dict[str, Any] = {}
    for kind in usage.SERIES:
        points = await usage.time_series(pool, kind, window, [], [])
        scale = {"cpu": 1000, "memory": 1024, "gpu": 1}[kind]  # shown in vCPU, GB and GPUs
        series[kind] = [[at, round(value / scale, 3)] for at, value in points]
    hours = await usage.hours_by_account(pool, window)
    recent = await pool.fetch(
        f"SELECT w.public_id, w.name, w.kind, w.status, w.cpu, w.memory, w.nvidia_gpu, w.created_at, w.running_at,"
        f" w.starting_at, w.finished_at, u.username AS creator, p.name AS project, p.public_id AS project_id,"
        f" CASE WHEN ow.is_team THEN ow.username ELSE '' END AS team {usage.FROM}"
        f" ORDER BY w.created_at DESC, w.id DESC LIMIT {RECENT}")
    return aiohttp_jinja2.render_template("admin_usage.html", request, {
        "windows": WINDOWS, "chosen": chosen, "series": series, "hours": hours, "recent": recent, "now": now,
        "step_minutes": window.step_seconds // 60})


def routes() -> list[web.RouteDef]:
    return [web.get("/admin/usage", usage_page, name="ui_admin_usage")]
