"""The asyncpg pool, on an external Postgres or on an embedded one (pgserver) in the data dir."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg

log = logging.getLogger(__name__)


@contextlib.asynccontextmanager
async def database_url(configured: str, data_dir: Path) -> AsyncIterator[str]:
    """Yield a DSN: the configured one, or that of an embedded Postgres kept in data_dir/postgres.

    pgserver counts the processes using one data dir, so `serve` and CLI commands can share it;
    the server stops when the last of them lets go.
    """
    if configured:
        yield configured
        return
    import pgserver  # imported lazily: it is only needed without an external database

    pgdata = data_dir / "postgres"
    pgdata.mkdir(parents=True, exist_ok=True)
    log.info("starting embedded Postgres in %s", pgdata)
    server = await asyncio.to_thread(pgserver.get_server, pgdata, cleanup_mode="stop")
    try:
        yield server.get_uri()
    finally:
        await asyncio.to_thread(server.cleanup)


async def _init_connection(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")
    await conn.set_type_codec("json", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


async def _no_session_reset(conn: asyncpg.Connection) -> None:
    """Connections go back to the pool without asyncpg's reset query (advisory unlock all, UNLISTEN,
    RESET ALL), which would be a second round trip after every query. asyncpg still rolls back an
    open transaction. So nothing here may leave session state behind: advisory locks are released
    in `finally`, LISTEN has a connection of its own (workloads/events.py), nothing uses SET."""


@contextlib.asynccontextmanager
async def try_advisory_lock(pool: asyncpg.Pool, key: int) -> AsyncIterator[asyncpg.Connection | None]:
    """Hold a session-level advisory lock for the block (on the connection yielded), or yield
    None when another session holds it. Should the unlock fail (a second cancellation), the
    connection is closed: that releases the lock, where the pool would otherwise keep it."""
    async with pool.acquire() as conn:
        if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", key):
            yield None
            return
        try:
            yield conn
        finally:
            try:
                await conn.execute("SELECT pg_advisory_unlock($1)", key)
            except BaseException:
                conn.terminate()
                raise


async def create_pool(dsn: str, min_size: int = 1, max_size: int = 10, **kwargs: Any) -> asyncpg.Pool:
    pool = await asyncpg.create_pool(
        dsn, min_size=min_size, max_size=max_size, init=_init_connection, reset=_no_session_reset, **kwargs
    )
    assert pool is not None
    return pool
