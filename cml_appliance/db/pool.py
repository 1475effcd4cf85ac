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


async def create_pool(dsn: str, min_size: int = 1, max_size: int = 10, **kwargs: Any) -> asyncpg.Pool:
    pool = await asyncpg.create_pool(dsn, min_size=min_size, max_size=max_size, init=_init_connection, **kwargs)
    assert pool is not None
    return pool
