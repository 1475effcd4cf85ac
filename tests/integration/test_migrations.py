"""Migrations: applied once under a lock, checksummed, and a wrong schema is refused."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from cml_appliance.db import migrate
from cml_appliance.db.migrate import Migration, SchemaError
from tests.conftest import _with_database


@pytest.fixture
async def empty_db(database_server: str) -> AsyncIterator[str]:
    name = f"cml_mig_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(database_server)
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield _with_database(database_server, name)
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def test_migrate_applies_once_even_when_racing(empty_db: str) -> None:
    conns = [await asyncpg.connect(empty_db) for _ in range(3)]
    try:
        results = await asyncio.gather(*(migrate.migrate(c) for c in conns))
        assert sorted(len(r) for r in results) == [0, 0, len(migrate.load_migrations())]
        assert await migrate.pending_migrations(conns[0]) == []
        await migrate.require_current_schema(conns[0])
    finally:
        for c in conns:
            await c.close()


async def test_pending_schema_names_the_command(empty_db: str) -> None:
    conn = await asyncpg.connect(empty_db)
    try:
        with pytest.raises(SchemaError, match="run `cml-appliance migrate`"):
            await migrate.require_current_schema(conn)
    finally:
        await conn.close()


async def test_altered_and_newer_schemas_are_refused(empty_db: str) -> None:
    conn = await asyncpg.connect(empty_db)
    try:
        await migrate.migrate(conn)
        known = migrate.load_migrations()
        altered = [Migration(m.version, m.name, m.sql + "\n-- edited") for m in known]
        with pytest.raises(SchemaError, match="changed after it was applied"):
            await migrate.pending_migrations(conn, altered)
        await conn.execute(
            "INSERT INTO schema_migrations (version, name, checksum) VALUES (999, 'from_the_future', 'x')"
        )
        with pytest.raises(SchemaError, match="newer release"):
            await migrate.require_current_schema(conn)
    finally:
        await conn.close()


def test_migration_files_are_numbered_without_gaps(tmp_path: Path) -> None:
    assert [m.version for m in migrate.load_migrations()] == list(range(1, len(migrate.load_migrations()) + 1))
    (tmp_path / "0001_a.sql").write_text("SELECT 1;")
    (tmp_path / "0003_c.sql").write_text("SELECT 1;")
    with pytest.raises(SchemaError, match="without gaps"):
        migrate.load_migrations(tmp_path)
    (tmp_path / "bad name.sql").write_text("SELECT 1;")
    with pytest.raises(SchemaError, match="NNNN_name"):
        migrate.load_migrations(tmp_path)


async def test_a_failing_migration_leaves_nothing_behind(empty_db: str) -> None:
    conn = await asyncpg.connect(empty_db)
    try:
        broken = migrate.load_migrations() + [Migration(len(migrate.load_migrations()) + 1, "broken", "CREATE TABLE half (x int); SELECT nonsense;")]
        with pytest.raises(asyncpg.PostgresError):
            await migrate.migrate(conn, broken)
        assert await conn.fetchval("SELECT to_regclass('half')") is None
        assert await conn.fetchval("SELECT max(version) FROM schema_migrations") == len(broken) - 1
    finally:
        await conn.close()
