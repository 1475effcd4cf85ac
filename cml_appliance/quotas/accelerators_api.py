"""API v2: resource groups, accelerator node labels, GPU profiles and accelerator quotas, in
CML's shapes (quotas/accelerators.py says what they mean here). Changes are for site
administrators; listings for everyone signed in (quota listings: administrators see every
account, others their own)."""

from __future__ import annotations

from aiohttp import web

from cml_appliance.api.bodies import ANY, BOOL, FLOAT, INT, STR
from cml_appliance.api.common import json_body, list_query, page, query_flag
from cml_appliance.core.errors import InvalidArgument
from cml_appliance.quotas import accelerators
from cml_appliance.web.context import current_user, require_site_admin
from cml_appliance.web.keys import ACCELERATORS


async def list_groups(request: web.Request) -> web.Response:
    current_user(request)
    q = list_query(request, {"name": "name"}, accelerators.GROUP_SORT)
    items, more = await request.app[ACCELERATORS].groups(q)
    return page(request, "resource_group", items, q, more)


async def update_group(request: web.Request) -> web.Response:
    admin = require_site_admin(request)
    body = await json_body(request, {"id": INT, "allow_jobs": BOOL, "allow_sessions": BOOL, "allow_models": BOOL,
                                     "allow_applications": BOOL, "name": STR})
    return web.json_response(await request.app[ACCELERATORS].update_group(admin.id, body))


async def list_labels(request: web.Request) -> web.Response:
    current_user(request)
    q = list_query(request, accelerators.LABEL_FILTERS, accelerators.LABEL_SORT)
    items, more = await request.app[ACCELERATORS].labels(q, query_flag(request, "display_all"))
    return page(request, "accelerator_node_label", items, q, more)


async def _per_label(request: web.Request, field: str, column: str) -> web.Response:
    admin = require_site_admin(request)
    body = await json_body(request, {field: ANY})
    rows = await request.app[ACCELERATORS].set_per_label(admin.id, column, body.get(field) or {})
    return web.json_response({"rows_affected": rows})


async def set_max_per_workload(request: web.Request) -> web.Response:
    return await _per_label(request, "id_max_gpu_workload", "max_gpu_per_workload")


async def set_default_quota(request: web.Request) -> web.Response:
    return await _per_label(request, "id_default_quota", "default_quota")


PROFILE_SPEC = {"resource_group_id": STR, "gpu_count": STR, "cpu": FLOAT, "memory": FLOAT, "id": STR}


def _same_group(request: web.Request, body: dict[str, object]) -> str:
    group = request.match_info["resource_group_id"]
    if body.get("resource_group_id") not in (None, "", group):
        raise InvalidArgument("resource_group_id in the body must match the path")
    return group


async def create_profile(request: web.Request) -> web.Response:
    admin = require_site_admin(request)
    body = await json_body(request, PROFILE_SPEC)
    made = await request.app[ACCELERATORS].create_profile(admin.id, _same_group(request, body), body)
    return web.json_response({"accelerator_node_label": made})


async def update_profile(request: web.Request) -> web.Response:
    admin = require_site_admin(request)
    body = await json_body(request, PROFILE_SPEC)
    rows = await request.app[ACCELERATORS].update_profile(admin.id, _same_group(request, body), body)
    return web.json_response({"rows_affected": rows})


async def delete_profile(request: web.Request) -> web.Response:
    admin = require_site_admin(request)
    rows = await request.app[ACCELERATORS].delete_profile(admin.id, request.match_info["resource_group_id"],
                                                          request.query.get("id", ""))
    return web.json_response({"rows_affected": rows})


async def _list_quotas(request: web.Request, teams: bool) -> web.Response:
    require_site_admin(request)
    key = "accelerator_based_team_quota" if teams else "accelerator_based_user_quota"
    return web.json_response({key: await request.app[ACCELERATORS].quotas(teams), "next_page_token": ""})


async def list_user_quotas(request: web.Request) -> web.Response:
    return await _list_quotas(request, teams=False)


async def list_team_quotas(request: web.Request) -> web.Response:
    return await _list_quotas(request, teams=True)


async def _set_quotas(request: web.Request, teams: bool) -> web.Response:
    admin = require_site_admin(request)
    key = "accelerator_based_team_quota" if teams else "accelerator_based_user_quota"
    body = await json_body(request, {key: ANY})
    return web.json_response({"rows_affected": await request.app[ACCELERATORS].set_quotas(admin.id, teams, body.get(key))})


async def set_user_quotas(request: web.Request) -> web.Response:
    return await _set_quotas(request, teams=False)


async def set_team_quotas(request: web.Request) -> web.Response:
    return await _set_quotas(request, teams=True)


async def _accounts(request: web.Request, teams: bool) -> web.Response:
    user = current_user(request)
    admin = user.is_admin and user.scope_project_id is None
    # Site admins see every account; a user sees their own (teams' GPU quotas: administrators only).
    rows = [] if teams and not admin else await request.app[ACCELERATORS].accounts(teams, "" if admin else user.username)
    key = "team_accelerator_quota" if teams else "user_accelerator_quota"
    return web.json_response({key: rows, "next_page_token": "", "total_count": str(len(rows))})


async def list_users_accelerator_quota(request: web.Request) -> web.Response:
    return await _accounts(request, teams=False)


async def list_teams_accelerator_quota(request: web.Request) -> web.Response:
    return await _accounts(request, teams=True)


def routes() -> list[web.RouteDef]:
    return [
        web.get("/api/v2/resourcegroups", list_groups, name="api_list_resource_groups"),
        web.patch("/api/v2/resourcegroup", update_group, name="api_update_resource_group"),
        web.get("/api/v2/nodelabels", list_labels, name="api_list_node_labels"),
        web.patch("/api/v2/nodelabels/config", set_max_per_workload, name="api_node_labels_config"),
        web.patch("/api/v2/nodelabels/default_quota", set_default_quota, name="api_node_labels_default_quota"),
        web.get("/api/v2/nodelabels/quota", list_user_quotas, name="api_list_accelerator_user_quotas"),
        web.patch("/api/v2/nodelabels/quota", set_user_quotas, name="api_set_accelerator_user_quotas"),
        web.get("/api/v2/nodelabels/team-quota", list_team_quotas, name="api_list_accelerator_team_quotas"),
        web.patch("/api/v2/nodelabels/team-quota", set_team_quotas, name="api_set_accelerator_team_quotas"),
        web.post("/api/v2/nodelabels/{resource_group_id}", create_profile, name="api_create_gpu_profile"),
        web.patch("/api/v2/nodelabels/{resource_group_id}/gpuprofile", update_profile, name="api_update_gpu_profile"),
        web.delete("/api/v2/nodelabels/{resource_group_id}/gpuprofile", delete_profile, name="api_delete_gpu_profile"),
        web.get("/api/v2/userslabels/quota", list_users_accelerator_quota, name="api_list_users_accelerator_quota"),
        web.get("/api/v2/userslabels/team-quota", list_teams_accelerator_quota, name="api_list_teams_accelerator_quota"),
    ]
