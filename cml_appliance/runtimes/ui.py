"""Page: the runtime catalog and the resource profiles."""

from __future__ import annotations

from typing import Any

import aiohttp_jinja2
from aiohttp import web

from cml_appliance.api.listing import ListQuery
from cml_appliance.runtimes import catalog
from cml_appliance.web.context import current_user
from cml_appliance.web.keys import POOL, WORKLOADS


async def workload_choices(request: web.Request) -> dict[str, Any]:
    """What a start form offers: enabled runtimes, each marked available or not (its engine is not
    configured here, and why), and the resource profiles."""
    everything = ListQuery(1000, 0, {}, [], "")
    runtimes, _ = await catalog.list_runtimes(request.app[POOL], everything)
    profiles, _ = await catalog.list_profiles(request.app[POOL], everything)
    workloads = request.app[WORKLOADS]
    offered = []
    for runtime in runtimes:
        if runtime["status"] == "DISABLED":
            continue
        engine = workloads.engine_name_for(runtime["image_identifier"])
        available = engine in workloads.engines
        offered.append(runtime | {
            "engine": engine, "available": available,
            "unavailable_because": "" if available else f"needs the {engine} engine, which this site has not configured",
        })
    # The first available runtime first, so a form's default can always start; Workbench (a
    # terminal and a console, which every runtime has) before other editors.
    offered.sort(key=lambda r: (not r["available"], r["editor"] != "Workbench"))
    return {"runtimes": offered, "profiles": profiles}


async def runtimes_page(request: web.Request) -> web.StreamResponse:
    current_user(request)
    everything = ListQuery(1000, 0, {}, [], "")
    runtimes, _ = await catalog.list_runtimes(request.app[POOL], everything)
    profiles, _ = await catalog.list_profiles(request.app[POOL], everything)
    choices = {r["image_identifier"]: r for r in (await workload_choices(request))["runtimes"]}
    return aiohttp_jinja2.render_template("runtimes.html", request, {"runtimes": runtimes, "profiles": profiles, "choices": choices})


def routes() -> list[web.RouteDef]:
    return [web.get("/runtimes", runtimes_page, name="ui_runtimes")]
