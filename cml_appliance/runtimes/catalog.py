"""The runtime catalog and the admin-defined CPU/memory resource profiles."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import asyncpg

from cml_appliance.api.listing import ListQuery, fetch_listing
from cml_appliance.core import audit
from cml_appliance.core.errors import AlreadyExists, InvalidArgument, NotFound

RUNTIME_FIELDS = ("image_identifier", "editor", "kernel", "edition", "description", "full_version")
RUNTIME_FILTER_KEYS = {k: f"r.{k}" for k in RUNTIME_FIELDS} | {"status": "r.status"}
RUNTIME_SORT_KEYS = {k: f"r.{k}" for k in RUNTIME_FIELDS}
HOST_RUNTIME_PREFIX = "host/"


async def seed_runtimes(conn: asyncpg.Pool | asyncpg.Connection, runtimes: Iterable[Mapping[str, Any]]) -> None:
    """Upsert the runtimes named in the configuration (admin changes to status are kept)."""
    for rt in runtimes:
        missing = [k for k in ("image_identifier", "editor", "kernel", "edition", "full_version") if not rt.get(k)]
        if missing:
            raise ValueError(f"runtime {rt.get('image_identifier')!r} in the configuration lacks {missing}")
        await conn.execute(
            "INSERT INTO runtimes (image_identifier, editor, kernel, edition, description, full_version, short_version, status)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (image_identifier) DO UPDATE SET"
            " editor = excluded.editor, kernel = excluded.kernel, edition = excluded.edition,"
            " description = excluded.description, full_version = excluded.full_version,"
            " short_version = excluded.short_version",
            rt["image_identifier"],
            rt["editor"],
            rt["kernel"],
            rt["edition"],
            rt.get("description", ""),
            rt["full_version"],
            rt.get("short_version", ""),
            rt.get("status", "ENABLED"),
        )


def runtime_json(row: asyncpg.Record) -> dict[str, Any]:
    return {k: row[k] for k in RUNTIME_FIELDS} | {"status": row["status"], "register_user_id": row["register_user_id"]}


async def list_runtimes(pool: asyncpg.Pool, q: ListQuery) -> tuple[list[dict[str, Any]], bool]:
    rows, more = await fetch_listing(pool, "runtimes r", q, RUNTIME_FILTER_KEYS, RUNTIME_SORT_KEYS, "r.image_identifier ASC")
    return [runtime_json(r) for r in rows], more


async def get_runtime(pool: asyncpg.Pool, image_identifier: str) -> dict[str, Any]:
    row = await pool.fetchrow("SELECT * FROM runtimes WHERE image_identifier = $1", image_identifier)
    if row is None:
        raise NotFound(f"runtime {image_identifier!r} not found")
    return runtime_json(row)


# Resource profiles ---------------------------------------------------------------------------

PROFILE_FILTER_KEYS = {"id": "id", "resource_group_id": "resource_group_id"}
PROFILE_SORT_KEYS = {"id": "id", "cpu": "cpu", "memory": "memory", "resource_group_id": "resource_group_id"}
MAX_CPU, MAX_MEMORY_GB = 1024.0, 8192.0


def profile_json(row: asyncpg.Record) -> dict[str, Any]:
    return {"id": row["id"], "cpu": row["cpu"], "memory": row["memory"], "resource_group_id": row["resource_group_id"]}


def check_profile(cpu: float, memory: float) -> None:
    if not 0 < cpu <= MAX_CPU:
        raise InvalidArgument(f"cpu must be more than 0 and at most {MAX_CPU:g} vCPU")
    if not 0 < memory <= MAX_MEMORY_GB:
        raise InvalidArgument(f"memory must be more than 0 and at most {MAX_MEMORY_GB:g} GB")


async def seed_profiles(conn: asyncpg.Pool, profiles: Iterable[Mapping[str, Any]]) -> None:
    """Profiles from the configuration, only into an empty table (admins own them afterwards)."""
    if await conn.fetchval("SELECT count(*) FROM cpu_profiles"):
        return
    for p in profiles:
        await conn.execute(
            "INSERT INTO cpu_profiles (cpu, memory) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            float(p["cpu"]),
            float(p["memory"]),
        )


async def list_profiles(pool: asyncpg.Pool, q: ListQuery) -> tuple[list[dict[str, Any]], bool]:
    rows, more = await fetch_listing(pool, "cpu_profiles", q, PROFILE_FILTER_KEYS, PROFILE_SORT_KEYS,
                                     "cpu ASC, memory ASC, id ASC")
    return [profile_json(r) for r in rows], more


async def create_profile(pool: asyncpg.Pool, actor_id: int, cpu: float, memory: float, group: int) -> dict[str, Any]:
    check_profile(cpu, memory)
    async with pool.acquire() as conn, conn.transaction():
        try:
            row = await conn.fetchrow(
                "INSERT INTO cpu_profiles (cpu, memory, resource_group_id) VALUES ($1, $2, $3) RETURNING *",
                cpu,
                memory,
                group,
            )
        except asyncpg.UniqueViolationError:
            raise AlreadyExists(f"a profile with {cpu:g} vCPU and {memory:g} GB already exists") from None
        await audit.record(conn, actor_id, "cpu_profile.create", "cpu_profile", str(row["id"]), profile_json(row))
    return profile_json(row)


async def update_profile(pool: asyncpg.Pool, actor_id: int, profile_id: int, fields: dict[str, Any]) -> int:
    async with pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow("SELECT * FROM cpu_profiles WHERE id = $1 FOR UPDATE", profile_id)
        if row is None:
            raise NotFound(f"resource profile {profile_id} not found")
        cpu = fields.get("cpu", row["cpu"])
        memory = fields.get("memory", row["memory"])
        group = fields.get("resource_group_id", row["resource_group_id"])
        check_profile(cpu, memory)
        try:
            done = await conn.execute(
                "UPDATE cpu_profiles SET cpu = $2, memory = $3, resource_group_id = $4 WHERE id = $1",
                profile_id,
                cpu,
                memory,
                group,
            )
        except asyncpg.UniqueViolationError:
            raise AlreadyExists(f"a profile with {cpu:g} vCPU and {memory:g} GB already exists") from None
        await audit.record(conn, actor_id, "cpu_profile.update", "cpu_profile", str(profile_id), dict(fields))
    return int(done.split()[-1])


async def delete_profile(pool: asyncpg.Pool, actor_id: int, profile_id: int) -> int:
    async with pool.acquire() as conn, conn.transaction():
        done = await conn.execute("DELETE FROM cpu_profiles WHERE id = $1", profile_id)
        if done == "DELETE 0":
            raise NotFound(f"resource profile {profile_id} not found")
        await audit.record(conn, actor_id, "cpu_profile.delete", "cpu_profile", str(profile_id))
    return 1
