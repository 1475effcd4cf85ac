"""Teams over the API: CML's CreateTeam (POST /api/v2/site/teams) and DeleteTeam, in CML's shapes,
and what CML's swagger lacks for local teams (list, get, update, members), described in the
appliance's own OpenAPI document. Synced teams answer that no directory is configured."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from cml_appliance.api.bodies import STR
from cml_appliance.api.common import json_body, list_query, page
from cml_appliance.core.errors import FailedPrecondition
from cml_appliance.core.timefmt import rfc3339
from cml_appliance.teams.service import Member, Team
from cml_appliance.web.context import current_user
from cml_appliance.web.keys import TEAMS

NO_DIRECTORY = ("synced teams come from a directory (LDAP or CDP groups), and none is configured here: "
                "create a local team with POST /api/v2/site/teams")


def team_json(team: Team) -> dict[str, Any]:
    """CML's Team, with what a local team has."""
    return {
        "id": str(team.id), "username": team.username, "type": team.team_type, "name": team.name, "bio": team.bio,
        "email": team.email, "joined_on": rfc3339(team.created_at), "members": str(team.members),
        "private_projects": str(team.projects), "admin": False, "business_user": False,
    }


def member_json(member: Member) -> dict[str, Any]:
    """CML's TeamMember."""
    return {"id": member.user_id, "username": member.username, "name": member.name, "permission": member.permission}


async def create_team(request: web.Request) -> web.Response:
    body = await json_body(request, {"username": STR, "type": STR, "cn": STR, "bio": STR, "permission": STR, "name": STR})
    if body.get("cn"):
        raise FailedPrecondition(NO_DIRECTORY)
    return web.json_response(team_json(await request.app[TEAMS].create(current_user(request), body)))


async def delete_team(request: web.Request) -> web.Response:
    await request.app[TEAMS].delete(current_user(request), request.match_info["team_name"])
    return web.json_response({})


async def list_teams(request: web.Request) -> web.Response:
    user = current_user(request)
    q = list_query(request, {"username": "u.username"}, {"username": "u.username"})
    mine = request.query.get("member", "").lower() in ("1", "true", "yes")
    found, more = await request.app[TEAMS].list(member_of=user if mine else None, name_filter=q.filters.get("username", ""),
                                                limit=q.page_size, offset=q.offset)
    return page(request, "teams", [team_json(t) for t in found], q, more)


async def get_team(request: web.Request) -> web.Response:
    current_user(request)
    return web.json_response(team_json(await request.app[TEAMS].get(request.match_info["team_name"])))


async def update_team(request: web.Request) -> web.Response:
    body = await json_body(request, {"bio": STR, "permission": STR, "name": STR},
                           frozenset({"id", "username", "type", "email", "joined_on", "members", "private_projects",
                                      "admin", "business_user"}))
    team = await request.app[TEAMS].update(current_user(request), request.match_info["team_name"], body)
    return web.json_response(team_json(team))


async def list_members(request: web.Request) -> web.Response:
    current_user(request)
    members = await request.app[TEAMS].members(request.match_info["team_name"])
    return web.json_response({"members": [member_json(m) for m in members]})


async def put_member(request: web.Request) -> web.Response:
    body = await json_body(request, {"permission": STR})
    member = await request.app[TEAMS].put_member(current_user(request), request.match_info["team_name"],
                                                 request.match_info["username"], body.get("permission"))
    return web.json_response(member_json(member))


async def delete_member(request: web.Request) -> web.Response:
    await request.app[TEAMS].delete_member(current_user(request), request.match_info["team_name"],
                                           request.match_info["username"])
    return web.json_response({})


async def no_directory(request: web.Request) -> web.Response:
    current_user(request)
    raise FailedPrecondition(NO_DIRECTORY)


def routes() -> list[web.RouteDef]:
    one = "/api/v2/teams/{team_name}"
    return [
        web.post("/api/v2/site/teams", create_team, name="api_create_team"),
        web.get("/api/v2/teams", list_teams, name="api_list_teams"),
        web.get(one, get_team, name="api_get_team"),
        web.patch(one, update_team, name="api_update_team"),
        web.delete(one, delete_team, name="api_delete_team"),
        web.get(one + "/members", list_members, name="api_list_team_members"),
        web.put(one + "/members/{username}", put_member, name="api_put_team_member"),
        web.delete(one + "/members/{username}", delete_member, name="api_delete_team_member"),
        # Synced teams and their directory: none is configured (FailedPrecondition says so).
        web.post("/api/v2/site/synced-teams", no_directory, name="api_create_synced_team"),
        web.get("/api/v2/sync/status", no_directory, name="api_latest_sync_status"),
        web.get("/api/v2/sync/teams/status", no_directory, name="api_teams_sync_status"),
        web.get("/api/v2/sync/users/status", no_directory, name="api_users_sync_status"),
        web.get(one + "/group_members", no_directory, name="api_list_synced_team_members"),
        web.patch(one + "/group_members/{user_id}", no_directory, name="api_update_synced_team_member"),
        web.get(one + "/groups", no_directory, name="api_list_synced_team_groups"),
        web.put(one + "/groups", no_directory, name="api_add_synced_team_group"),
        web.delete(one + "/groups/{group_id}", no_directory, name="api_remove_synced_team_group"),
        web.patch(one + "/groups/{group_id}", no_directory, name="api_update_synced_team_group"),
    ]
