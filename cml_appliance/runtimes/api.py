"""API v2: the runtime catalog (/runtimes) and resource profiles (/cpuprofiles)."""

from __future__ import annotations

from aiohttp import web

from cml_appliance.api.bodies import FLOAT, INT
from cml_appliance.api.common import json_body, list_query, page
from cml_appliance.core.errors import InvalidArgument, NotFound
from cml_appliance.runtimes import catalog
from cml_appliance.web.context import current_user, require_site_admin
from cml_appliance.web.keys import POOL


async def list_runtimes(request: web.Request) -> web.Response:
    current_user(request)
    q = list_query(request, catalog.RUNTIME_FILTER_KEYS, catalog.RUNTIME_SORT_KEYS)
    items, more = await catalog.list_runtimes(request.app[POOL], q)
    return page(request, "runtimes", items, q, more)


async def list_profiles(request: web.Request) -> web.Response:
    current_user(request)
    q = list_query(request, catalog.PROFILE_FILTER_KEYS, catalog.PROFILE_SORT_KEYS)
    items, more = await catalog.list_profiles(request.app[POOL], q)
    return page(request, "cpu_resource_profiles", items, q, more)


PROFILE_SPEC = {"id": INT, "cpu": FLOAT, "memory": FLOAT, "resource_group_id": INT}


async def create_profile(request: web.Request) -> web.Response:
    admin = require_site_admin(request)
    body = await json_body(request, PROFILE_SPEC)
    if "cpu" not in body or "memory" not in body:
        raise InvalidArgument("cpu (vCPU) and memory (GB) are required")
    profile = await catalog.create_profile(
        request.app[POOL], admin.id, body["cpu"], body["memory"], body.get("resource_group_id", 0)
    )
    return web.json_response({"cpu_profile": profile})


def _profile_id(request: web.Request) -> int:
    try:
        value = int(request.match_info["id"])
    except ValueError:
        raise InvalidArgument("resource profile id must be a whole number") from None
    if not 0 < value < 2**31:  # the column is an int32: past it there is no such profile
        raise NotFound(f"there is no resource profile {value}")
    return value


async def update_profile(request: web.Request) -> web.Response:
    admin = require_site_admin(request)
    body = await json_body(request, PROFILE_SPEC)
    profile_id = _profile_id(request)
    if body.pop("id", profile_id) != profile_id:
        raise InvalidArgument("id in the body must match the path")
    rows = await catalog.update_profile(request.app[POOL], admin.id, profile_id, body)
    return web.json_response({"rows_affected": rows})


async def delete_profile(request: web.Request) -> web.Response:
    admin = require_site_admin(request)
    rows = await catalog.delete_profile(request.app[POOL], admin.id, _profile_id(request))
    return web.json_response({"rows_affected": rows})


def routes() -> list[web.RouteDef]:
    return [
        web.get("/api/v2/runtimes", list_runtimes, name="api_list_runtimes"),
        web.get("/api/v2/cpuprofiles", list_profiles, name="api_list_cpu_profiles"),
        web.post("/api/v2/cpuprofiles", create_profile, name="api_create_cpu_profile"),
        web.patch("/api/v2/cpuprofiles/{id}", update_profile, name="api_update_cpu_profile"),
        web.delete("/api/v2/cpuprofiles/{id}", delete_profile, name="api_delete_cpu_profile"),
    ]
