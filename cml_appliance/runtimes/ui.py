"""Page: the runtime catalog and the resource profiles."""

from __future__ import annotations

import aiohttp_jinja2
from aiohttp import web

from cml_appliance.api.listing import ListQuery
from cml_appliance.runtimes import catalog
from cml_appliance.web.context import current_user
from cml_appliance.web.keys import POOL


async def runtimes_page(request: web.Request) -> web.StreamResponse:
    current_user(request)
    everything = ListQuery(1000, 0, {}, [], "")
    runtimes, _ = await catalog.list_runtimes(request.app[POOL], everything)
    profiles, _ = await catalog.list_profiles(request.app[POOL], everything)
    return aiohttp_jinja2.render_template("runtimes.html", request, {"runtimes": runtimes, "profiles": profiles})


def routes() -> list[web.RouteDef]:
    return [web.get("/runtimes", runtimes_page, name="ui_runtimes")]
