"""Teams: accounts that own projects and collaborate on them, and their members' team roles.

A team is a users row (is_team: no password, no API keys, never signs in) with a teams row for
what only teams have. Anyone signed in (not a workload's key) may create a team and is its first
admin; team admins and site admins manage members and delete the team (not while it owns
projects). Every signed-in user sees the teams and their members (names and roles, no e-mails),
as CML shows them. What a team role gives on projects is decided in projects/store.py.
"""

from __future__ import annotations

import dataclasses
from datetime import datetime
from typing import Any

import asyncpg

from cml_appliance.auth.users import USERNAME_RE, User
from cml_appliance.core import audit
from cml_appliance.core.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, PermissionDenied

ROLES = ("read", "operator", "write", "admin")
MAX_BIO = 2000


@dataclasses.dataclass(frozen=True)
class Team:
    id: int
    username: str
    name: str
    email: str
    bio: str
    team_type: str
    default_permission: str
    created_at: datetime
    members: int
    projects: int


@dataclasses.dataclass(frozen=True)
class Member:
    user_id: int
    username: str
    name: str
    permission: str


_TEAM_SELECT = """
SELECT u.id, u.username, u.name, u.email, u.created_at, t.bio, t.team_type, t.default_permission,
       (SELECT count(*) FROM team_members m WHERE m.team_id = u.id) AS members,
       (SELECT count(*) FROM projects p WHERE p.owner_id = u.id) AS projects
FROM users u JOIN teams t ON t.user_id = u.id
"""


def _team(row: asyncpg.Record) -> Team:
    return Team(row["id"], row["username"], row["name"], row["email"], row["bio"], row["team_type"],
                row["default_permission"], row["created_at"], row["members"], row["projects"])


def _check_role(value: Any, what: str = "permission") -> str:
    if value not in ROLES:
        raise InvalidArgument(f"{what} must be one of: {', '.join(ROLES)}")
    return str(value)


class TeamService:
    def __init__(self, pool: asyncpg.Pool):
        self.pool = pool

    async def get(self, name: str) -> Team:
        row = await self.pool.fetchrow(_TEAM_SELECT + " WHERE u.username = $1", name)
        if row is None:
            raise NotFound(f"there is no team named {name!r}")
        return _team(row)

    async def list(self, *, member_of: User | None = None, name_filter: str = "", limit: int = 100,
                   offset: int = 0) -> tuple[list[Team], bool]:
        args: list[Any] = [f"%{name_filter}%", limit + 1, offset]
        where = "u.username ILIKE $1"
        if member_of is not None:
            args.append(member_of.id)
            where += f" AND EXISTS (SELECT 1 FROM team_members m WHERE m.team_id = u.id AND m.user_id = ${len(args)})"
        rows = await self.pool.fetch(_TEAM_SELECT + f" WHERE {where} ORDER BY u.username LIMIT $2 OFFSET $3", *args)
        return [_team(r) for r in rows[:limit]], len(rows) > limit

    async def role_of(self, team: Team, user: User) -> str:
        """The user's team role ('' when not a member)."""
        return str(await self.pool.fetchval("SELECT permission FROM team_members WHERE team_id = $1 AND user_id = $2",
                                            team.id, user.id) or "")

    async def _require_admin(self, team: Team, user: User) -> None:
        if user.is_admin and user.scope_project_id is None:
            return
        if user.scope_project_id is not None or await self.role_of(team, user) != "admin":
            raise PermissionDenied(f"only an admin of team {team.username!r} (or a site admin) may change it")

    async def create(self, user: User, fields: dict[str, Any]) -> Team:
        if user.scope_project_id is not None:
            raise PermissionDenied("a workload's own key cannot create teams")
        name = str(fields.get("username") or "").strip().lower()
        if not USERNAME_RE.match(name):
            raise InvalidArgument("a team's username is 1-64 characters: lower-case letters, digits, '.', '_' or '-'")
        bio = str(fields.get("bio") or "")
        if len(bio) > MAX_BIO:
            raise InvalidArgument(f"a team's bio has at most {MAX_BIO} characters")
        default = _check_role(fields.get("permission") or "read", "permission (the members' default role)")
        team_type = str(fields.get("type") or "local").lower()
        if team_type != "local":
            raise FailedPrecondition("synced teams (ldap, saml) need a directory, and none is configured: create a local team")
        async with self.pool.acquire() as conn, conn.transaction():
            try:
                team_id = await conn.fetchval(
                    "INSERT INTO users (username, email, name, is_team) VALUES ($1, '', $2, true) RETURNING id",
                    name, str(fields.get("name") or name))
            except asyncpg.UniqueViolationError:
                raise AlreadyExists(f"the name {name!r} is taken (by a user or a team)") from None
            await conn.execute("INSERT INTO teams (user_id, bio, team_type, default_permission, created_by)"
                               " VALUES ($1, $2, $3, $4, $5)", team_id, bio, team_type, default, user.id)
            await conn.execute("INSERT INTO team_members (team_id, user_id, permission) VALUES ($1, $2, 'admin')",
                               team_id, user.id)
            await audit.record(conn, user.id, "team.create", "team", name, {"bio": bio})
        return await self.get(name)

    async def update(self, user: User, name: str, fields: dict[str, Any]) -> Team:
        team = await self.get(name)
        await self._require_admin(team, user)
        bio = team.bio if fields.get("bio") is None else str(fields["bio"])
        if len(bio) > MAX_BIO:
            raise InvalidArgument(f"a team's bio has at most {MAX_BIO} characters")
        default = team.default_permission if not fields.get("permission") else _check_role(fields["permission"])
        display = team.name if not fields.get("name") else str(fields["name"])[:200]
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("UPDATE teams SET bio = $2, default_permission = $3 WHERE user_id = $1", team.id, bio, default)
            await conn.execute("UPDATE users SET name = $2, updated_at = now() WHERE id = $1", team.id, display)
            await audit.record(conn, user.id, "team.update", "team", name, {"bio": bio, "permission": default})
        return await self.get(name)

    async def delete(self, user: User, name: str) -> None:
        team = await self.get(name)
        await self._require_admin(team, user)
        if team.projects:
            raise FailedPrecondition(f"team {name!r} owns {team.projects} project(s): delete them first")
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("DELETE FROM users WHERE id = $1 AND is_team", team.id)
            await audit.record(conn, user.id, "team.delete", "team", name, {})

    async def members(self, name: str) -> list[Member]:
        team = await self.get(name)
        rows = await self.pool.fetch(
            "SELECT u.id, u.username, u.name, m.permission FROM team_members m JOIN users u ON u.id = m.user_id"
            " WHERE m.team_id = $1 ORDER BY u.username", team.id)
        return [Member(r["id"], r["username"], r["name"], r["permission"]) for r in rows]

    async def put_member(self, user: User, name: str, username: str, permission: str | None) -> Member:
        team = await self.get(name)
        await self._require_admin(team, user)
        role = _check_role(permission or team.default_permission)
        target = await self.pool.fetchrow("SELECT id, username, name, is_team FROM users WHERE username = $1 AND is_active",
                                          username)
        if target is None or target["is_team"]:
            raise InvalidArgument(f"there is no user named {username!r} (a team cannot be a member of a team)")
        async with self.pool.acquire() as conn, conn.transaction():
            if role != "admin" and await self._last_admin(conn, team.id, target["id"]):
                raise FailedPrecondition(f"{username!r} is the team's last admin: make another member an admin first")
            await conn.execute("INSERT INTO team_members (team_id, user_id, permission) VALUES ($1, $2, $3)"
                               " ON CONFLICT (team_id, user_id) DO UPDATE SET permission = excluded.permission",
                               team.id, target["id"], role)
            await audit.record(conn, user.id, "team.member.put", "team", name, {"user": username, "permission": role})
        return Member(target["id"], target["username"], target["name"], role)

    async def delete_member(self, user: User, name: str, username: str) -> None:
        if user.scope_project_id is not None:
            raise PermissionDenied("a workload's own key cannot change teams")
        team = await self.get(name)
        target_id = await self.pool.fetchval("SELECT id FROM users WHERE username = $1", username)
        if target_id != user.id:  # leaving a team is everyone's right
            await self._require_admin(team, user)
        async with self.pool.acquire() as conn, conn.transaction():
            if target_id is None or not await conn.fetchval(
                    "SELECT 1 FROM team_members WHERE team_id = $1 AND user_id = $2", team.id, target_id):
                raise NotFound(f"{username!r} is not a member of team {name!r}")
            if await self._last_admin(conn, team.id, target_id):
                raise FailedPrecondition(f"{username!r} is the team's last admin: make another member an admin first")
            await conn.execute("DELETE FROM team_members WHERE team_id = $1 AND user_id = $2", team.id, target_id)
            await audit.record(conn, user.id, "team.member.delete", "team", name, {"user": username})

    @staticmethod
    async def _last_admin(conn: asyncpg.Connection, team_id: int, user_id: int) -> bool:
        admins = await conn.fetch("SELECT user_id FROM team_members WHERE team_id = $1 AND permission = 'admin' FOR UPDATE",
                                  team_id)
        return [r["user_id"] for r in admins] == [user_id]

    async def owner_for_project(self, user: User, name: str) -> int:
        """The team a new project goes to (CreateProject's team_name): its members with write
        or admin, and site admins, may create projects for it."""
        try:
            team = await self.get(name)
        except NotFound:
            raise InvalidArgument(f"team_name: there is no team named {name!r}") from None
        if not (user.is_admin and user.scope_project_id is None) and await self.role_of(team, user) not in ("write", "admin"):
            raise PermissionDenied(f"creating a project for team {name!r} needs the team role write or admin")
        return team.id

