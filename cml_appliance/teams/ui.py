"""Pages: the teams (yours and all), one team (its members and their roles, its projects), and
the forms that create a team, add or change a member, remove one, and delete the team."""

from __future__ import annotations

from typing import Any

import aiohttp_jinja2
from aiohttp import web

from cml_appliance.core.errors import AppError
from cml_appliance.web.context import current_user
from cml_appliance.web.keys import POOL, TEAMS
from cml_appliance.web.templating import redirect

ROLE_WORDS = {"read": "Viewer", "operator": "Operator", "write": "Contributor", "admin": "Admin"}


async def teams_page(request: web.Request, *, error: str = "", form: dict[str, Any] | None = None,
                     status: int = 200) -> web.StreamResponse:
    user = current_user(request)
    service = request.app[TEAMS]
    everything, _ = await service.list(limit=500)
    mine = {t.username for t in (await service.list(member_of=user, limit=500))[0]}
    return aiohttp_jinja2.render_template("teams.html", request, {
        "teams": everything, "mine": mine, "error": error, "form": form or {}, "roles": ROLE_WORDS}, status=status)


async def create_team(request: web.Request) -> web.StreamResponse:
    form = await request.post()
    fields = {k: str(form.get(k, "")).strip() for k in ("username", "bio", "permission")}
    try:
        team = await request.app[TEAMS].create(current_user(request), fields)
    except AppError as exc:
        return await teams_page(request, error=exc.message, form=fields, status=exc.status)
    raise redirect(request, f"/teams/{team.username}", "ok", f"Created team {team.username}; you are its admin.")


async def team_page(request: web.Request, *, error: str = "", status: int = 200) -> web.StreamResponse:
    user = current_user(request)
    service = request.app[TEAMS]
    team = await service.get(request.match_info["team_name"])
    members = await service.members(team.username)
    role = await service.role_of(team, user)
    # The team's projects that the viewer can see (all of them, for its members).
    projects = await request.app[POOL].fetch(
        "SELECT p.public_id, p.name, p.description, p.updated_at FROM projects p WHERE p.owner_id = $1"
        " AND ($2 OR p.visibility = 'public' OR EXISTS (SELECT 1 FROM team_members m WHERE m.team_id = $1 AND m.user_id = $3))"
        " ORDER BY p.name", team.id, user.is_admin, user.id)
    return aiohttp_jinja2.render_template("team.html", request, {
        "team": team, "members": members, "my_role": role, "can_manage": role == "admin" or user.is_admin,
        "projects": projects, "roles": ROLE_WORDS, "error": error}, status=status)


async def put_member(request: web.Request) -> web.StreamResponse:
    form = await request.post()
    name = request.match_info["team_name"]
    username = str(form.get("username", "")).strip().lower()
    try:
        await request.app[TEAMS].put_member(current_user(request), name, username, str(form.get("permission", "")) or None)
    except AppError as exc:
        return await team_page(request, error=exc.message, status=exc.status)
    raise redirect(request, f"/teams/{name}", "ok", f"{username} is now a member of {name}.")


async def delete_member(request: web.Request) -> web.StreamResponse:
    name, username = request.match_info["team_name"], request.match_info["username"]
    try:
        await request.app[TEAMS].delete_member(current_user(request), name, username)
    except AppError as exc:
        return await team_page(request, error=exc.message, status=exc.status)
    raise redirect(request, f"/teams/{name}", "ok", f"{username} left {name}.")


async def delete_team(request: web.Request) -> web.StreamResponse:
    name = request.match_info["team_name"]
    try:
        await request.app[TEAMS].delete(current_user(request), name)
    except AppError as exc:
        return await team_page(request, error=exc.message, status=exc.status)
    raise redirect(request, "/teams", "ok", f"Deleted team {name}.")


def routes() -> list[web.RouteDef]:
    one = "/teams/{team_name}"
    return [
        web.get("/teams", teams_page, name="ui_teams"),
        web.post("/teams", create_team, name="ui_team_create"),
        web.get(one, team_page, name="ui_team"),
        web.post(one + "/members", put_member, name="ui_team_member_put"),
        web.post(one + "/members/{username}/delete", delete_member, name="ui_team_member_delete"),
        web.post(one + "/delete", delete_team, name="ui_team_delete"),
    ]
