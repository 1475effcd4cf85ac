"""The asyncpg pool, on an external Postgres or on an embedded one (pgserver) in the data dir."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import re
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import asyncpg

from cml_appliance.core.processes import process_exists

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

    data_dir.mkdir(parents=True, exist_ok=True)
    pgdata = data_dir / "postgres"
    pgdata.mkdir(parents=True, exist_ok=True)
    log.info("starting embedded Postgres in %s", pgdata)
    await asyncio.to_thread(_forget_dead_users, pgdata)
    server = await asyncio.to_thread(pgserver.get_server, pgdata, cleanup_mode="stop")
    # The secret key, the database and every project: the appliance's alone. pgserver opened the
    # way (g+rx, o+rx) for the system user it runs Postgres as when we are root; that user only
    # needs to pass through.
    data_dir.chmod(DATA_DIR_MODE_AS_ROOT if os.geteuid() == 0 else 0o700)
    watch = asyncio.get_running_loop().create_task(_keep_running(server, pgdata))
    try:
        yield await require_password(server.get_uri(), data_dir, pgdata)
    finally:
        watch.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watch
        await asyncio.to_thread(server.cleanup)


EMBEDDED_CHECK_SECONDS = 2.0


async def _keep_running(server: Any, pgdata: Path) -> None:
    """The embedded Postgres is the appliance's to keep: when its postmaster dies (killed, a
    crash), start it again on the same data, as pgserver starts it, under pgserver's lock."""
    from pgserver.postgres_server import PostgresServer
    from pgserver.utils import PostmasterInfo

    def restart_if_dead() -> bool:
        info = PostmasterInfo.read_from_pgdata(pgdata)
        if info is not None and info.is_running():
            return False
        with PostgresServer._lock:
            server.ensure_postgres_running()
        return True

    while True:
        await asyncio.sleep(EMBEDDED_CHECK_SECONDS)
        try:
            if await asyncio.to_thread(restart_if_dead):
                log.warning("the embedded Postgres had stopped: started it again")
        except Exception as exc:  # keep watching: the next look may succeed
            log.error("could not start the embedded Postgres again: %s", exc)


def _forget_dead_users(pgdata: Path) -> None:
    """pgserver stops the server when its last user lets go, counting users in a file of pids; a
    process killed with SIGKILL never let go, so its pid stays and the server would outlive every
    later clean stop. Pids of processes that are gone are struck out first (under pgserver's lock)."""
    from pgserver.postgres_server import PostgresServer

    pids_file = pgdata / ".handle_pids.json"
    with PostgresServer._lock:
        try:
            pids = json.loads(pids_file.read_text())
        except (FileNotFoundError, ValueError):
            return
        alive = [pid for pid in pids if isinstance(pid, int) and process_exists(pid)]
        if alive != pids:
            log.info("embedded Postgres: forgetting users that died without letting go: %s", sorted(set(pids) - set(alive)))
            pids_file.write_text(json.dumps(alive))



async def require_password(trusting_dsn: str, data_dir: Path, pgdata: Path) -> str:
    """pgserver makes a cluster that trusts every local connection, and its socket may sit in a
    world-writable directory. The first start gives the role a password (kept in
    data_dir/postgres_password, 0600) and switches pg_hba.conf to SCRAM; every start returns the
    DSN with that password. A file lock keeps a CLI command and `serve` from racing."""
    password_file = data_dir / PASSWORD_FILE
    with open(data_dir / (PASSWORD_FILE + ".lock"), "w") as lock:
        await asyncio.to_thread(fcntl.flock, lock, fcntl.LOCK_EX)
        try:
            if not password_file.exists():
                password = secrets.token_urlsafe(32)
                conn = await asyncpg.connect(trusting_dsn)  # trust still holds: this is the first start
                try:
                    await conn.execute("SET password_encryption = 'scram-sha-256'")
                    await conn.execute(f"ALTER ROLE CURRENT_USER PASSWORD {_literal(password)}")
                finally:
                    await conn.close()
                tmp = password_file.with_suffix(".tmp")
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "w") as fh:
                    fh.write(password)
                os.replace(tmp, password_file)
            password = password_file.read_text().strip()
            dsn = trusting_dsn.replace("postgresql://postgres:@", f"postgresql://postgres:{quote(password, safe='')}@", 1)
            hba = pgdata / "pg_hba.conf"
            text = hba.read_text()
            required = re.sub(r"\btrust\b", "scram-sha-256", text)
            if required != text:
                hba.write_text(required)
                conn = await asyncpg.connect(dsn)
                try:
                    await conn.execute("SELECT pg_reload_conf()")
                finally:
                    await conn.close()
            return dsn
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


PASSWORD_FILE = "postgres_password"
DATA_DIR_MODE_AS_ROOT = 0o711


def _literal(text: str) -> str:
    """A SQL string literal (ALTER ROLE takes no parameters); the password is URL-safe base64."""
    assert re.fullmatch(r"[A-Za-z0-9_-]+", text)
    return f"'{text}'"


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


@contextlib.asynccontextmanager
async def advisory_lock(pool: asyncpg.Pool, key: int) -> AsyncIterator[asyncpg.Connection]:
    """Hold a session-level advisory lock for the block, waiting for it: one holder site-wide,
    whichever appliance process. Callers serialise within their process first (each waiter holds
    a pool connection)."""
    async with pool.acquire() as conn:
        await conn.execute("SELECT pg_advisory_lock($1)", key)
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


# Postgres answers that mean "the server is going away or not there": a stop, a restart, a crash.
_AWAY = (
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
)


def database_unreachable(exc: BaseException) -> bool:
    """Whether an error says the database is away (stopped, restarting, its socket gone), which
    is answered 503 with Retry-After, not an internal error."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, _AWAY):
            return True
        if isinstance(current, asyncpg.exceptions.InterfaceError) and "connection is closed" in str(current):
            return True
        if isinstance(current, asyncpg.exceptions.InternalClientError) and "another operation" in str(current):
            return True  # a connection the server dropped in the middle of a statement
        if isinstance(current, (OSError, TimeoutError)) and _raised_in_asyncpg(current):
            return True  # connecting failed: refused, reset, the socket file gone, timed out
        current = current.__cause__ or current.__context__
    return False


def _raised_in_asyncpg(exc: BaseException) -> bool:
    tb = exc.__traceback__
    while tb is not None:
        if "/asyncpg/" in tb.tb_frame.f_code.co_filename:
            return True
        tb = tb.tb_next
    return False
