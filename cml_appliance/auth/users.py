"""Users: creation, lookup, password sign-in with throttling, site administration."""

from __future__ import annotations

import asyncio
import dataclasses
import re
from datetime import datetime

import asyncpg

from cml_appliance.core import audit
from cml_appliance.core.errors import (
    AlreadyExists,
    InvalidArgument,
    NotFound,
    TooManyRequests,
)
from cml_appliance.core.security import hash_password, verify_password

USERNAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
EMAIL_RE = re.compile(r"^[^@\s]+@[^@\s]+$")
THROTTLE_WINDOW = "15 minutes"
FIRST_USER_LOCK_KEY = 0x434D4C02


@dataclasses.dataclass(frozen=True)
class User:
    id: int
    username: str
    email: str
    name: str
    is_admin: bool
    is_active: bool
    created_at: datetime
    # Set when the caller is a workload's own key: it reaches this one project only.
    scope_project_id: int | None = None

    def short(self) -> dict[str, str]:
        """CML's ShortUser."""
        return {"username": self.username, "name": self.name, "email": self.email}


_COLUMNS = "id, username, email, name, is_admin, is_active, created_at"


def _user(row: asyncpg.Record) -> User:
    return User(**{k: row[k] for k in ("id", "username", "email", "name", "is_admin", "is_active", "created_at")})


def check_new_user(username: str, email: str, password: str) -> None:
    if not USERNAME_RE.match(username):
        raise InvalidArgument(
            "username must be 1-64 characters: lower-case letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    if not EMAIL_RE.match(email):
        raise InvalidArgument(f"{email!r} is not an email address")
    if len(password) < 8:
        raise InvalidArgument("password must be at least 8 characters")


async def create_user(
    pool: asyncpg.Pool,
    username: str,
    email: str,
    password: str,
    *,
    name: str = "",
    is_admin: bool = False,
    actor_id: int | None = None,
    first_user_only: bool = False,
) -> User:
    """Create a user. With first_user_only, refuse unless nobody exists yet (first-run set-up)."""
    check_new_user(username, email, password)
    # Hashing is deliberately slow: keep it off the event loop.
    password_hash = await asyncio.to_thread(hash_password, password)
    async with pool.acquire() as conn, conn.transaction():
        if first_user_only:
            # Two browsers finishing set-up at once: the lock lets exactly one of them win.
            await conn.execute("SELECT pg_advisory_xact_lock($1)", FIRST_USER_LOCK_KEY)
            if await conn.fetchval("SELECT count(*) FROM users"):
                raise AlreadyExists("the appliance is already set up: sign in instead")
        try:
            row = await conn.fetchrow(
                f"INSERT INTO users (username, email, name, password_hash, is_admin) VALUES ($1, $2, $3, $4, $5)"
                f" RETURNING {_COLUMNS}",
                username,
                email,
                name or username,
                password_hash,
                is_admin,
            )
        except asyncpg.UniqueViolationError:
            raise AlreadyExists(f"user {username!r} already exists") from None
        user = _user(row)
        await audit.record(conn, actor_id, "user.create", "user", username, {"is_admin": is_admin})
    return user


async def get_by_username(pool: asyncpg.Pool | asyncpg.Connection, username: str) -> User:
    row = await pool.fetchrow(f"SELECT {_COLUMNS} FROM users WHERE username = $1", username)
    if row is None:
        raise NotFound(f"user {username!r} not found")
    return _user(row)


async def get_by_id(pool: asyncpg.Pool, user_id: int) -> User | None:
    row = await pool.fetchrow(f"SELECT {_COLUMNS} FROM users WHERE id = $1", user_id)
    return _user(row) if row else None


async def list_users(pool: asyncpg.Pool) -> list[User]:
    return [_user(r) for r in await pool.fetch(f"SELECT {_COLUMNS} FROM users WHERE NOT is_team ORDER BY username")]


async def count_users(pool: asyncpg.Pool) -> int:
    return int(await pool.fetchval("SELECT count(*) FROM users WHERE NOT is_team"))


async def update_user(
    pool: asyncpg.Pool, username: str, *, actor_id: int, is_admin: bool | None = None, is_active: bool | None = None
) -> User:
    async with pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(
            f"UPDATE users SET is_admin = coalesce($2, is_admin), is_active = coalesce($3, is_active),"
            f" updated_at = now() WHERE username = $1 RETURNING {_COLUMNS}",
            username,
            is_admin,
            is_active,
        )
        if row is None:
            raise NotFound(f"user {username!r} not found")
        if is_active is False:
            # A deactivated user is signed out everywhere at once.
            await conn.execute("DELETE FROM login_sessions WHERE user_id = $1", row["id"])
        await audit.record(
            conn, actor_id, "user.update", "user", username, {"is_admin": is_admin, "is_active": is_active}
        )
    return _user(row)


async def authenticate(pool: asyncpg.Pool, username: str, password: str, remote: str, max_failures: int) -> User | None:
    """Check a password; None when wrong. Raises TooManyRequests after too many recent failures."""
    username = username.strip().lower()
    failures = await pool.fetchrow(
        f"SELECT (SELECT count(*) FROM login_failures WHERE username = $1 AND failed_at > now() - interval '{THROTTLE_WINDOW}') AS by_user,"
        f" (SELECT count(*) FROM login_failures WHERE remote = $2 AND failed_at > now() - interval '{THROTTLE_WINDOW}') AS by_remote",
        username,
        remote,
    )
    if failures["by_user"] >= max_failures or failures["by_remote"] >= max_failures * 4:
        raise TooManyRequests("too many failed sign-ins: wait 15 minutes and try again", retry_after=900)
    row = await pool.fetchrow(f"SELECT {_COLUMNS}, password_hash FROM users WHERE username = $1 AND NOT is_team", username)
    stored = row["password_hash"] if row else None
    ok = await asyncio.to_thread(verify_password, password, stored)
    if not ok or row is None or not row["is_active"]:
        await pool.execute("INSERT INTO login_failures (username, remote) VALUES ($1, $2)", username, remote)
        return None
    await pool.execute("DELETE FROM login_failures WHERE username = $1", username)
    return _user(row)
