"""SQL for workloads. Status changes go through transition(), a compare-and-set on the state machine."""

from __future__ import annotations

import dataclasses
from datetime import datetime
from typing import Any

import asyncpg

from cml_appliance.workloads import states


@dataclasses.dataclass(frozen=True)
class Workload:
    id: int
    public_id: str
    kind: str
    project_id: int
    project_public_id: str
    creator: dict[str, str]
    creator_id: int
    engine: str
    status: str
    name: str
    runtime_identifier: str
    cpu: float
    memory: float
    nvidia_gpu: int
    script: str
    arguments: str
    environment: dict[str, str]
    handle: str
    node: str
    exit_code: int | None
    reason: str
    stop_status: str | None
    api_key_id: str | None
    app_port: int | None
    readonly_port: int | None
    job_id: int | None
    attempt: int
    deployment_id: int | None
    idle_timeout_minutes: float | None
    max_duration_minutes: float | None
    created_at: datetime
    updated_at: datetime
    scheduling_at: datetime
    starting_at: datetime | None
    running_at: datetime | None
    stopping_at: datetime | None
    finished_at: datetime | None
    last_activity_at: datetime
    editor: str = ""
    application_id: int | None = None
    project_name: str = ""

    @property
    def active(self) -> bool:
        return self.status in states.ACTIVE

    @property
    def namespace(self) -> str:
        """A Kubernetes workload's namespace (its handle is namespace/pod)."""
        return self.handle.partition("/")[0] if self.engine == "kubernetes" and "/" in self.handle else ""


SELECT = """
SELECT w.*, p.public_id AS project_public_id, p.name AS project_name, u.username AS cr_username, u.name AS cr_name, u.email AS cr_email
FROM workloads w JOIN projects p ON p.id = w.project_id JOIN users u ON u.id = w.creator_id
"""
_FIELDS = {f.name for f in dataclasses.fields(Workload)} - {"creator", "project_public_id", "project_name"}


def from_row(row: asyncpg.Record) -> Workload:
    values = {k: row[k] for k in _FIELDS}
    return Workload(
        **values,
        project_public_id=row["project_public_id"],
        project_name=row["project_name"],
        creator={"username": row["cr_username"], "name": row["cr_name"], "email": row["cr_email"]},
    )


async def insert(conn: asyncpg.Connection | asyncpg.Pool, values: dict[str, Any],
                 api_key: dict[str, Any] | None = None, consume_fire: int | None = None) -> Workload | None:
    """Insert a workload and return it whole, in one statement.

    With `api_key` (the columns of its own CDSW_APIV2_KEY row) the key is inserted by the same
    statement, so neither exists alone. With `consume_fire` the job fire it starts is deleted by
    the same statement too; None is returned, and nothing inserted, when that fire is gone.
    """
    args = list(values.values())
    columns = list(values)
    placeholders = [f"${i}" for i in range(1, len(args) + 1)]
    ctes: list[str] = []
    source = ""
    if consume_fire is not None:
        args.append(consume_fire)
        ctes.append(f"f AS (DELETE FROM job_fires WHERE id = ${len(args)} RETURNING id)")
        source = " FROM f"
    if api_key:
        key_placeholders = ", ".join(f"${i}" for i in range(len(args) + 1, len(args) + len(api_key) + 1))
        args += list(api_key.values())
        ctes.append(f"k AS (INSERT INTO api_keys ({', '.join(api_key)}) SELECT {key_placeholders}{source} RETURNING key_id)")
        columns.append("api_key_id")
        placeholders.append("k.key_id")
        source = " FROM k"
    ctes.append(f"w AS (INSERT INTO workloads ({', '.join(columns)}) SELECT {', '.join(placeholders)}{source} RETURNING *)")
    row = await conn.fetchrow(f"WITH {', '.join(ctes)} {SELECT.replace('FROM workloads w', 'FROM w')}", *args)
    return from_row(row) if row is not None else None


async def get_by_id(conn: asyncpg.Connection | asyncpg.Pool, row_id: int) -> Workload | None:
    row = await conn.fetchrow(SELECT + " WHERE w.id = $1", row_id)
    return from_row(row) if row else None


async def get(conn: asyncpg.Connection | asyncpg.Pool, public_id: str) -> Workload | None:
    row = await conn.fetchrow(SELECT + " WHERE w.public_id = $1", public_id)
    return from_row(row) if row else None


async def list_for_project(
    conn: asyncpg.Pool, project_id: int, kind: str, limit: int, offset: int, status_like: str = ""
) -> tuple[list[Workload], bool]:
    rows = await conn.fetch(
        SELECT + " WHERE w.project_id = $1 AND w.kind = $2 AND ($5 = '' OR lower(w.status) LIKE '%' || $5 || '%')"
        " ORDER BY w.created_at DESC, w.id DESC LIMIT $3 OFFSET $4",
        project_id, kind, limit + 1, offset, status_like.lower(),
    )
    return [from_row(r) for r in rows[:limit]], len(rows) > limit


@dataclasses.dataclass(frozen=True)
class ProjectActivity:
    """A session or job run of a project, with its job's id and name (runs), for overviews."""

    workload: Workload
    job_public_id: str | None
    job_name: str | None


async def project_activity(conn: asyncpg.Pool, project_id: int, *, active: bool, limit: int) -> list[ProjectActivity]:
    """The project's sessions and job runs, newest first: those still active, or those that ended."""
    rows = await conn.fetch(
        SELECT.replace("FROM workloads w", "FROM workloads w LEFT JOIN jobs j ON j.id = w.job_id").replace(
            "SELECT w.*", "SELECT w.*, j.public_id AS job_public_id, j.name AS job_name")
        + " WHERE w.project_id = $1 AND w.kind IN ('session', 'job_run') AND (w.status = ANY($2::text[])) = $3"
        " ORDER BY w.created_at DESC, w.id DESC LIMIT $4",
        project_id, list(states.ACTIVE), active, limit,
    )
    return [ProjectActivity(from_row(r), r["job_public_id"], r["job_name"]) for r in rows]


async def list_for_user(conn: asyncpg.Pool, user_id: int, kind: str, limit: int, offset: int) -> tuple[list[Workload], bool]:
    rows = await conn.fetch(
        SELECT + " WHERE w.creator_id = $1 AND w.kind = $2 ORDER BY w.created_at DESC, w.id DESC LIMIT $3 OFFSET $4",
        user_id, kind, limit + 1, offset,
    )
    return [from_row(r) for r in rows[:limit]], len(rows) > limit


async def list_active(conn: asyncpg.Pool, engine: str) -> list[Workload]:
    rows = await conn.fetch(
        SELECT + " WHERE w.engine = $1 AND w.status = ANY($2::text[]) ORDER BY w.id", engine, list(states.ACTIVE)
    )
    return [from_row(r) for r in rows]


async def transition(
    conn: asyncpg.Connection | asyncpg.Pool, row_id: int, target: str, *, revoke_key: str | None = None, **fields: Any
) -> Workload | None:
    """Move a workload to `target` if the state machine allows it from its current status.

    Returns the updated workload, or None when the move is illegal (nothing changes then). With
    `revoke_key`, that API key is deleted by the same statement, if the move is made: it is gone
    once the status shows. A job run's final status marks what its end owes (see jobs.service).
    """
    stamp = states.STAMPS.get(target)
    sets = ["status = $2", "updated_at = now()"]
    if stamp:
        sets.append(f"{stamp} = coalesce({stamp}, now())")
    if target in states.FINISHED:
        sets.append("followup_due = (kind = 'job_run')")
    args: list[Any] = [row_id, target, states.sources_of(target)]
    for key, value in fields.items():
        args.append(value)
        sets.append(f"{key} = ${len(args)}")
    revoke = ""
    if revoke_key:
        args.append(revoke_key)
        revoke = f", gone AS (DELETE FROM api_keys WHERE key_id = ${len(args)} AND EXISTS (SELECT FROM w))"
    row = await conn.fetchrow(
        f"WITH w AS (UPDATE workloads SET {', '.join(sets)} WHERE id = $1 AND status = ANY($3::text[])"
        f" RETURNING *){revoke} {SELECT.replace('FROM workloads w', 'FROM w')}",
        *args,
    )
    return from_row(row) if row else None


async def update(conn: asyncpg.Connection | asyncpg.Pool, row_id: int, **fields: Any) -> None:
    sets = ", ".join(f"{k} = ${i}" for i, k in enumerate(fields, start=2))
    await conn.execute(f"UPDATE workloads SET {sets}, updated_at = now() WHERE id = $1", row_id, *fields.values())


async def touch(conn: asyncpg.Pool, row_id: int) -> None:
    await conn.execute("UPDATE workloads SET last_activity_at = now() WHERE id = $1", row_id)


async def site_id(conn: asyncpg.Pool) -> str:
    """This installation's id, made on first use; engines label everything they start with it."""
    await conn.execute(
        "INSERT INTO site (site_id) VALUES (substr(md5(random()::text || clock_timestamp()::text), 1, 12))"
        " ON CONFLICT (singleton) DO NOTHING"
    )
    return str(await conn.fetchval("SELECT site_id FROM site"))
