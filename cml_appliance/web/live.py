"""GET /live: tells an open page that something it shows has changed, so it re-renders its live
regions (static/js/app.js). One server-sent event stream per tab, fed by the status hub.

`?project=<id>` follows one project (its workloads, jobs, models, builds, deployments,
applications and its own creation); without it the stream follows the user's own workloads and
the creation of the projects they can see (the project list, "My sessions").
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import web

from cml_appliance.api.listing import ListQuery
from cml_appliance.web.context import current_user
from cml_appliance.web.keys import CLOSING, PROJECTS, STATUS_HUB

KEEPALIVE_SECONDS = 15.0


async def live(request: web.Request) -> web.StreamResponse:
    user = current_user(request)
    project_param = request.query.get("project", "")
    if project_param:
        project = await request.app[PROJECTS].get(user, project_param)
        project_ids = {project.id}

        def wanted(event: dict[str, Any]) -> bool:
            return event.get("project_id") in project_ids
    else:
        projects, _ = await request.app[PROJECTS].list_projects(user, ListQuery.first(1000), include_public=True, include_all=False)
        project_ids = {p.id for p in projects}

        def wanted(event: dict[str, Any]) -> bool:
            if "id" in event:  # a workload
                return event.get("creator_id") == user.id
            return event.get("table") == "projects" and event.get("project_id") in project_ids

    response = web.StreamResponse(headers={
        "Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no",
    })
    async with request.app[STATUS_HUB].subscribe() as queue:
        await response.prepare(request)
        await response.write(b"retry: 2000\n\n")
        closing = request.app[CLOSING]
        while not closing.is_set():
            getter = asyncio.ensure_future(queue.get())
            stop = asyncio.ensure_future(closing.wait())
            try:
                done, _ = await asyncio.wait({getter, stop}, timeout=KEEPALIVE_SECONDS, return_when=asyncio.FIRST_COMPLETED)
            finally:  # also when the browser went away and this handler is cancelled
                getter.cancel()
                stop.cancel()
            if getter not in done or getter.cancelled():
                if not closing.is_set():
                    await response.write(b": keepalive\n\n")
                continue
            event = getter.result()
            if event.get("resync") or wanted(event):
                # What changed, for the curious; the page re-renders whatever it shows.
                summary = {k: event[k] for k in ("table", "kind", "id", "status") if k in event}
                await response.write(f"event: change\ndata: {json.dumps(summary)}\n\n".encode())
    return response


async def end_streams(app: web.Application) -> None:
    """On shutdown: every open live stream ends (browsers reconnect to the next process)."""
    app[CLOSING].set()


def routes() -> list[web.RouteDef]:
    return [web.get("/live", live, name="ui_live")]
