"""Browser sign-in sessions: a random cookie value, stored as a digest, with its CSRF token."""

from __future__ import annotations

import dataclasses

import asyncpg

from cml_appliance.auth.users import User, get_by_id
from cml_appliance.core.security import new_token, token_digest


@dataclasses.dataclass(frozen=True)
class LoginSession:
    user: User
    csrf_token: str


async def create(pool: asyncpg.Pool, user: User, hours: int) -> str:
    token = new_token()
    await pool.execute(
        "INSERT INTO login_sessions (token_digest, user_id, csrf_token, expires_at)"
        " VALUES ($1, $2, $3, now() + make_interval(hours => $4))",
        token_digest(token),
        user.id,
        new_token(24),
        hours,
    )
    # Housekeeping: expired sessions go when new ones come.
    await pool.execute("DELETE FROM login_sessions WHERE expires_at < now()")
    return token


async def resolve(pool: asyncpg.Pool, token: str) -> LoginSession | None:
    return await resolve_digest(pool, token_digest(token))


async def resolve_digest(pool: asyncpg.Pool, digest: str) -> LoginSession | None:
    """The session whose cookie has this digest (the applications' origin knows only that)."""
    row = await pool.fetchrow(
        "SELECT user_id, csrf_token FROM login_sessions WHERE token_digest = $1 AND expires_at > now()",
        digest,
    )
    if row is None:
        return None
    user = await get_by_id(pool, row["user_id"])
    if user is None or not user.is_active:
        return None
    return LoginSession(user, row["csrf_token"])


async def delete(pool: asyncpg.Pool, token: str) -> None:
    await pool.execute("DELETE FROM login_sessions WHERE token_digest = $1", token_digest(token))
