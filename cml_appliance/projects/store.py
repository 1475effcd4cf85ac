"""SQL for projects and collaborators. Every read is made as a given user, whose role comes back with it."""

from __future__ import annotations

import dataclasses
from datetime import datetime
from typing import Any

import asyncpg

from cml_appliance.api.listing import ListQuery, sql_where_and_order
from cml_appliance.auth.permissions import Role
from cml_appliance.auth.users import User

FILTER_KEYS = {
    "name": "p.name",
    "description": "p.description",
    "owner.username": "ow.username",
    "owner.name": "ow.name",
    "owner.email": "ow.email",
    "creator.username": "cr.username",
    "creator.name": "cr.name",
    "creator.email": "cr.email",
}
SORT_KEYS = {**FILTER_KEYS, "created_at": "p.created_at", "updated_at": "p.updated_at"}
DEFAULT_ORDER = "p.updated_at DESC, p.id DESC"


@dataclasses.dataclass(frozen=True)
class Project:
    id: int
    public_id: str
    name: str
    slug: str
    owner: dict[str, str]
    creator: dict[str, str]
    description: str
    visibility: str
    default_engine_type: str
    template: str
    git_url: str
    creation_status: str
    creation_message: str
    shared_memory_limit: int
    ephemeral_storage_request: int
    ephemeral_storage_limit: int
    environment: dict[str, str]
    created_at: datetime
    updated_at: datetime
    role: Role


# The caller's role: the owner and site admins are admin; otherwise the highest of the caller's
# collaborator permission, their team role when a team owns the project, the permission of a team
# of theirs that is a collaborator, and read on a public project.
_SELECT = """
SELECT p.*,
       ow.username AS ow_username, ow.name AS ow_name, ow.email AS ow_email, ow.is_team AS ow_is_team,
       cr.username AS cr_username, cr.name AS cr_name, cr.email AS cr_email,
       CASE WHEN p.owner_id = $1 OR $2 THEN 'admin'
            ELSE coalesce((
              SELECT (ARRAY['read', 'operator', 'write', 'admin'])[max(array_position(ARRAY['read', 'operator', 'write', 'admin'], g.permission))]
              FROM (SELECT c.permission FROM project_collaborators c WHERE c.project_id = p.id AND c.user_id = $1
                    UNION ALL
                    SELECT m.permission FROM team_members m WHERE m.team_id = p.owner_id AND m.user_id = $1
                    UNION ALL
                    SELECT tc.permission FROM project_collaborators tc
                    JOIN team_members tm ON tm.team_id = tc.user_id AND tm.user_id = $1 WHERE tc.project_id = p.id
                    UNION ALL
                    SELECT 'read' WHERE p.visibility = 'public') g), '') END AS role
FROM projects p
JOIN users ow ON ow.id = p.owner_id
JOIN users cr ON cr.id = p.creator_id
"""


# The projects $1 holds a role on, public ones aside: owned by them or by a team of theirs, or
# with them or a team of theirs as a collaborator.
_HOLDS_A_ROLE = """(p.owner_id = $1
  OR p.owner_id IN (SELECT m.team_id FROM team_members m WHERE m.user_id = $1)
  OR EXISTS (SELECT 1 FROM project_collaborators c WHERE c.project_id = p.id
             AND (c.user_id = $1 OR c.user_id IN (SELECT m.team_id FROM team_members m WHERE m.user_id = $1))))"""


def _project(row: asyncpg.Record) -> Project:
    return Project(
        id=row["id"],
        public_id=row["public_id"],
        name=row["name"],
        slug=row["slug"],
        owner={"username": row["ow_username"], "name": row["ow_name"], "email": row["ow_email"]},
        creator={"username": row["cr_username"], "name": row["cr_name"], "email": row["cr_email"]},
        description=row["description"],
        visibility=row["visibility"],
        default_engine_type=row["default_engine_type"],
        template=row["template"],
        git_url=row["git_url"],
        creation_status=row["creation_status"],
        creation_message=row["creation_message"],
        shared_memory_limit=row["shared_memory_limit"],
        ephemeral_storage_request=row["ephemeral_storage_request"],
        ephemeral_storage_limit=row["ephemeral_storage_limit"],
        environment=row["environment"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        role=Role.parse(row["role"]),
    )


async def get(conn: asyncpg.Pool | asyncpg.Connection, user: User, public_id: str) -> Project | None:
    row = await conn.fetchrow(
        _SELECT + " WHERE p.public_id = $3 AND ($4::bigint IS NULL OR p.id = $4)",
        user.id, user.is_admin, public_id, user.scope_project_id,
    )
    return _project(row) if row else None


async def get_by_owner_slug(conn: asyncpg.Pool, user: User, owner: str, slug: str) -> Project | None:
    row = await conn.fetchrow(
        _SELECT + " WHERE ow.username = $3 AND p.slug = $4 AND ($5::bigint IS NULL OR p.id = $5)",
        user.id, user.is_admin, owner, slug, user.scope_project_id,
    )
    return _project(row) if row else None


async def list_visible(
    conn: asyncpg.Pool, user: User, q: ListQuery, *, include_public: bool, include_all: bool
) -> tuple[list[Project], bool]:
    """One page of the projects the user may see; returns (page, whether more follow)."""
    args: list[Any] = [user.id, user.is_admin]
    visible = f"({_HOLDS_A_ROLE}"
    if include_all and user.is_admin:
        visible = "(TRUE"
    elif include_public or include_all:
        visible += " OR p.visibility = 'public'"
    visible += ")"
    if user.scope_project_id is not None:
        args.append(user.scope_project_id)
        visible += f" AND p.id = ${len(args)}"
    where, order = sql_where_and_order(q, FILTER_KEYS, SORT_KEYS, DEFAULT_ORDER, args)
    args += [q.page_size + 1, q.offset]
    rows = await conn.fetch(
        f"{_SELECT} WHERE {visible} AND {where} ORDER BY {order} LIMIT ${len(args) - 1} OFFSET ${len(args)}", *args
    )
    return [_project(r) for r in rows[: q.page_size]], len(rows) > q.page_size


async def visible_ids(conn: asyncpg.Pool | asyncpg.Connection, user: User) -> list[int]:
    """The ids of every project the user holds a role on (for listings across projects)."""
    rows = await conn.fetch(
        f"SELECT id FROM ({_SELECT}) v WHERE v.role <> '' AND ($3::bigint IS NULL OR v.id = $3)",
        user.id, user.is_admin, user.scope_project_id)
    return [r["id"] for r in rows]


async def insert(conn: asyncpg.Connection, values: dict[str, Any]) -> int:
    columns = ", ".join(values)
    placeholders = ", ".join(f"${i}" for i in range(1, len(values) + 1))
    return int(await conn.fetchval(f"INSERT INTO projects ({columns}) VALUES ({placeholders}) RETURNING id", *values.values()))


async def update(conn: asyncpg.Pool | asyncpg.Connection, project_id: int, values: dict[str, Any]) -> None:
    if not values:
        return
    sets = ", ".join(f"{k} = ${i}" for i, k in enumerate(values, start=2))
    await conn.execute(f"UPDATE projects SET {sets}, updated_at = now() WHERE id = $1", project_id, *values.values())


async def delete(conn: asyncpg.Connection, project_id: int) -> None:
    await conn.execute("DELETE FROM projects WHERE id = $1", project_id)


COLLAB_FILTER_KEYS = {"username": "u.username", "permission": "c.permission"}
COLLAB_SORT_KEYS = COLLAB_FILTER_KEYS


async def list_collaborators(conn: asyncpg.Pool, project_id: int, q: ListQuery) -> tuple[list[asyncpg.Record], bool]:
    args: list[Any] = [project_id]
    where, order = sql_where_and_order(q, COLLAB_FILTER_KEYS, COLLAB_SORT_KEYS, "u.username ASC", args)
    args += [q.page_size + 1, q.offset]
    rows = await conn.fetch(
        "SELECT u.username, u.name, u.email, c.permission FROM project_collaborators c"
        f" JOIN users u ON u.id = c.user_id WHERE c.project_id = $1 AND {where}"
        f" ORDER BY {order} LIMIT ${len(args) - 1} OFFSET ${len(args)}",
        *args,
    )
    return list(rows[: q.page_size]), len(rows) > q.page_size


async def put_collaborator(conn: asyncpg.Connection, project_id: int, user_id: int, permission: str) -> None:
    await conn.execute(
        "INSERT INTO project_collaborators (project_id, user_id, permission) VALUES ($1, $2, $3)"
        " ON CONFLICT (project_id, user_id) DO UPDATE SET permission = excluded.permission",
        project_id,
        user_id,
        permission,
    )


async def delete_collaborator(conn: asyncpg.Connection, project_id: int, user_id: int) -> bool:
    done = await conn.execute(
        "DELETE FROM project_collaborators WHERE project_id = $1 AND user_id = $2", project_id, user_id
    )
    return done != "DELETE 0"
