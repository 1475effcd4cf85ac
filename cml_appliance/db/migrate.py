"""Numbered, forward-only SQL migrations, checksummed and applied under an advisory lock.

Files are cml_appliance/db/migrations/NNNN_name.sql. Each one runs in its own transaction.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import re
from pathlib import Path

import asyncpg

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
# Arbitrary constant shared by every appliance process: one migrator at a time.
MIGRATION_LOCK_KEY = 0x434D4C01
_NAME_RE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


class SchemaError(Exception):
    """The database schema does not match this version of the code."""


@dataclasses.dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def load_migrations(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    found = []
    for path in sorted(directory.glob("*.sql")):
        match = _NAME_RE.match(path.name)
        if not match:
            raise SchemaError(f"migration file {path.name} is not named NNNN_name.sql")
        found.append(Migration(int(match.group(1)), match.group(2), path.read_text()))
    versions = [m.version for m in found]
    if versions != list(range(1, len(found) + 1)):
        raise SchemaError(f"migration numbers must run 1, 2, 3... without gaps; found {versions}")
    return found


_CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version integer PRIMARY KEY,
    name text NOT NULL,
    checksum text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""


async def _applied(conn: asyncpg.Connection) -> dict[int, asyncpg.Record]:
    exists = await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
    if not exists:
        return {}
    rows = await conn.fetch("SELECT version, name, checksum FROM schema_migrations ORDER BY version")
    return {r["version"]: r for r in rows}


def _check_applied(applied: dict[int, asyncpg.Record], known: list[Migration]) -> list[Migration]:
    """Raise on an altered or newer schema; return the migrations still to apply."""
    by_version = {m.version: m for m in known}
    newer = sorted(v for v in applied if v not in by_version)
    if newer:
        raise SchemaError(
            f"the database has migrations {newer} that this version of cml-appliance does not know: "
            "it was migrated by a newer release. Upgrade cml-appliance, or point CML_DATABASE_URL elsewhere."
        )
    for version, row in applied.items():
        if row["checksum"] != by_version[version].checksum:
            raise SchemaError(
                f"migration {version:04d}_{row['name']} was changed after it was applied "
                "(checksum mismatch). Migrations are forward-only: restore the file and add a new migration."
            )
    return [m for m in known if m.version not in applied]


async def pending_migrations(conn: asyncpg.Connection, known: list[Migration] | None = None) -> list[Migration]:
    """Check the schema without changing it; raises SchemaError when it is altered or newer."""
    return _check_applied(await _applied(conn), known if known is not None else load_migrations())


async def migrate(conn: asyncpg.Connection, known: list[Migration] | None = None) -> list[Migration]:
    """Apply pending migrations under the advisory lock; return those applied."""
    known = known if known is not None else load_migrations()
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
    try:
        await conn.execute(_CREATE_TABLE)
        todo = _check_applied(await _applied(conn), known)
        for migration in todo:
            log.info("applying migration %04d_%s", migration.version, migration.name)
            async with conn.transaction():
                await conn.execute(migration.sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                    migration.version,
                    migration.name,
                    migration.checksum,
                )
        return todo
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)


async def require_current_schema(conn: asyncpg.Connection) -> None:
    """Refuse to run on a schema that is behind, altered or newer, naming the command that fixes it."""
    todo = await pending_migrations(conn)
    if todo:
        names = ", ".join(f"{m.version:04d}_{m.name}" for m in todo)
        raise SchemaError(f"the database lacks migrations {names}: run `cml-appliance migrate` first")
