"""Quotas over the API: CML's default-quota, usersquota and groupsquota operations, in CML's
shapes (quota parts as strings: vCPU, memory in GB, GPUs; empty for no limit), and what CML's
swagger lacks to give one account a quota of its own (PUT/DELETE /api/v2/usersquota/{username})."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from cml_appliance.api.bodies import ANY, OBJECT, STR
from cml_appliance.api.common import json_body, list_query
from cml_appliance.api.listing import next_page_token
from cml_appliance.core.errors import InvalidArgument
from cml_appliance.core.timefmt import rfc3339
from cml_appliance.quotas.service import Quota, amount, quota_json, usage_json
from cml_appliance.web.context import current_user, require_site_admin
from cml_appliance.web.keys import QUOTAS, SETTINGS


def _default_json(row: Any, owner_type: str) -> dict[str, Any]:
    if row is None:
        return {"requests_cpu": "", "requests_memory": "", "requests_gpu": "", "active": False, "owner_type": owner_type}
    quota = quota_json(Quota(row["cpu"], row["memory"], row["nvidia_gpu"]))
    return {"id": row["id"], "requests_cpu": quota["cpu"], "requests_memory": quota["memory"],
            "requests_gpu": quota["nvidia_gpu"], "created_at": rfc3339(row["created_at"]), "active": row["active"],
            "owner_type": owner_type}


def _quota_from(info: dict[str, Any], cpu: str, memory: str, gpu: str) -> Quota:
    return Quota(amount(info.get(cpu), cpu), amount(info.get(memory), memory),
                 amount(info.get(gpu), gpu, whole=True))  # type: ignore[arg-type]


async def get_default_quota(request: web.Request) -> web.Response:
    current_user(request)
    return web.json_response({"quota": _default_json(await request.app[QUOTAS].default("user"), "user"), "success": True})


async def get_default_quotas(request: web.Request) -> web.Response:
    current_user(request)
    quotas = request.app[QUOTAS]
    return web.json_response({"request_quotas": [_default_json(await quotas.default(kind), kind) for kind in ("user", "team")],
                              "success": True})


async def _set_default(request: web.Request, owner_type: str) -> web.Response:
    user = require_site_admin(request)
    body = await json_body(request, {"uuid": STR, "quota": OBJECT})
    info = body.get("quota") or {}
    quota = _quota_from(info, "requests_cpu", "requests_memory", "requests_gpu")
    active = info.get("active", True)
    if not isinstance(active, bool):
        raise InvalidArgument("quota.active must be true or false")
    await request.app[QUOTAS].set_default(user, owner_type, quota, active)
    return web.json_response({"success": True, "message": f"the default quota for {owner_type}s is {quota.words()}"
                              + ("" if active else " (inactive)")})


async def set_default_quota(request: web.Request) -> web.Response:
    return await _set_default(request, "user")


async def set_team_default_quota(request: web.Request) -> web.Response:
    return await _set_default(request, "team")


async def _list(request: web.Request, *, teams: bool) -> web.Response:
    """Each account's quota and what it uses now: site admins see every one, others themselves."""
    user = current_user(request)
    q = list_query(request, {"deactivated": "deactivated", "banned": "banned"}, {"username": "username"})
    only = None if user.is_admin and user.scope_project_id is None else (user.id if not teams else -1)
    quotas = request.app[QUOTAS]
    descending = bool(q.sort and q.sort[0][1])
    # Nobody is banned here; deactivated accounts are listed when asked for.
    deactivated = q.filters.get("deactivated", "false").lower() == "true"
    if q.filters.get("banned", "false").lower() == "true":
        rows, more, total = [], False, 0
    else:
        rows, more, total = await quotas.accounts(teams=teams, only=only, deactivated=deactivated, descending=descending,
                                                  limit=q.page_size, offset=q.offset)
    items = []
    for row in rows:
        info = {"id": row["id"], "name": row["name"], "user_name": row["username"]}
        items.append({"user" if not teams else "group": info,
                      "quota_usage": usage_json(await quotas.usage(row["id"], teams)),
                      "quota_configured": quota_json(await quotas.configured(row["id"], teams))})
    token = next_page_token(q, request.app[SETTINGS].secret_key, more)
    return web.json_response({("group_quota" if teams else "user_quota"): items, "next_page_token": token,
                              "total_count": str(total)})


async def list_users_quota(request: web.Request) -> web.Response:
    return await _list(request, teams=False)


async def list_groups_quota(request: web.Request) -> web.Response:
    return await _list(request, teams=True)


async def put_account_quota(request: web.Request) -> web.Response:
    user = require_site_admin(request)
    body = await json_body(request, {"cpu": ANY, "memory": ANY, "nvidia_gpu": ANY})
    quota = _quota_from(body, "cpu", "memory", "nvidia_gpu")
    await request.app[QUOTAS].set_account(user, request.match_info["username"], quota)
    return web.json_response(quota_json(quota))


async def delete_account_quota(request: web.Request) -> web.Response:
    user = require_site_admin(request)
    await request.app[QUOTAS].set_account(user, request.match_info["username"], None)
    return web.json_response({})


def routes() -> list[web.RouteDef]:
    return [
        web.get("/api/v2/default-quota/user", get_default_quota, name="api_get_default_quota"),
        web.post("/api/v2/default-quota/user", set_default_quota, name="api_set_default_quota"),
        web.get("/api/v2/default-quota/all", get_default_quotas, name="api_get_default_quotas"),
        web.post("/api/v2/default-quota/team", set_team_default_quota, name="api_set_team_default_quota"),
        web.get("/api/v2/usersquota", list_users_quota, name="api_list_users_quota"),
        web.get("/api/v2/groupsquota", list_groups_quota, name="api_list_groups_quota"),
        web.put("/api/v2/usersquota/{username}", put_account_quota, name="api_put_account_quota"),
        web.delete("/api/v2/usersquota/{username}", delete_account_quota, name="api_delete_account_quota"),
    ]

