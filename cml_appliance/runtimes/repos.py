"""Runtime repositories: named URLs of runtime catalogs, kept and listed as CML does."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import asyncpg

from cml_appliance.api.listing import ListQuery, fetch_listing
from cml_appliance.core import audit
from cml_appliance.core.errors import AlreadyExists, InvalidArgument, NotFound

FILTER_KEYS = {"id": "id::text", "name": "name", "url": "url"}
SORT_KEYS = {"id": "id", "name": "name", "url": "url"}


def repo_json(row: asyncpg.Record) -> dict[str, Any]:
    return {"id": row["id"], "name": row["name"], "url": row["url"]}


def _check(name: str | None, url: str | None, partial: bool) -> None:
    if name is not None or not partial:
        if not (name or "").strip() or len(name or "") > 200:
            raise InvalidArgument("name is required (at most 200 characters)")
    if url is not None or not partial:
        parts = urlsplit((url or "").strip())
        if parts.scheme not in ("http", "https") or not parts.netloc or len(url or "") > 2048:
            raise InvalidArgument(f"url must be an http:// or https:// address, got {url!r}")


def parse_id(raw: Any) -> int:
    try:
        value = int(str(raw))
    except ValueError:
        raise InvalidArgument(f"runtime repo id must be a whole number, got {raw!r}") from None
    if not 0 < value < 2**63:
        raise NotFound(f"there is no runtime repo {raw}")
    return value


def _taken(name: str, url: str) -> AlreadyExists:
    return AlreadyExists(f"a runtime repo named {name!r} or at {url} already exists")


async def list_repos(pool: asyncpg.Pool, q: ListQuery) -> tuple[list[dict[str, Any]], bool]:
    rows, more = await fetch_listing(pool, "runtime_repos", q, FILTER_KEYS, SORT_KEYS, "name ASC")
    return [repo_json(r) for r in rows], more


async def create_repo(pool: asyncpg.Pool, actor_id: int, name: str | None, url: str | None) -> dict[str, Any]:
    _check(name, url, partial=False)
    assert name is not None and url is not None
    async with pool.acquire() as conn, conn.transaction():
        try:
            row = await conn.fetchrow("INSERT INTO runtime_repos (name, url) VALUES ($1, $2) RETURNING *",
                                      name.strip(), url.strip())
        except asyncpg.UniqueViolationError:
            raise _taken(name.strip(), url.strip()) from None
        await audit.record(conn, actor_id, "runtime_repo.create", "runtime_repo", str(row["id"]), repo_json(row))
    return repo_json(row)


async def update_repo(pool: asyncpg.Pool, actor_id: int, repo_id: int, name: str | None, url: str | None) -> dict[str, Any]:
    _check(name, url, partial=True)
    async with pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow("SELECT * FROM runtime_repos WHERE id = $1 FOR UPDATE", repo_id)
        if row is None:
            raise NotFound(f"there is no runtime repo {repo_id}")
        new_name, new_url = (name or row["name"]).strip(), (url or row["url"]).strip()
        try:
            row = await conn.fetchrow("UPDATE runtime_repos SET name = $2, url = $3 WHERE id = $1 RETURNING *",
                                      repo_id, new_name, new_url)
        except asyncpg.UniqueViolationError:
            raise _taken(new_name, new_url) from None
        await audit.record(conn, actor_id, "runtime_repo.update", "runtime_repo", str(repo_id), repo_json(row))
    return repo_json(row)


async def delete_repo(pool: asyncpg.Pool, actor_id: int, repo_id: int) -> None:
    async with pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow("DELETE FROM runtime_repos WHERE id = $1 RETURNING *", repo_id)
        if row is None:
            raise NotFound(f"there is no runtime repo {repo_id}")
        await audit.record(conn, actor_id, "runtime_repo.delete", "runtime_repo", str(repo_id), repo_json(row))
