"""CML API v2 keys: random, shown once, stored as a digest, with an expiry and audiences."""

from __future__ import annotations

import base64
import binascii
import dataclasses
import secrets
from datetime import UTC, datetime

import asyncpg

from cml_appliance.auth.users import User, get_by_id
from cml_appliance.core import audit
from cml_appliance.core.errors import InvalidArgument, NotFound
from cml_appliance.core.security import new_token, token_digest
from cml_appliance.core.timefmt import parse_rfc3339

AUDIENCES = ("API", "Application")


@dataclasses.dataclass(frozen=True)
class ApiKey:
    key_id: str
    user_id: int
    comments: str
    audiences: tuple[str, ...]
    expires_at: datetime | None
    created_at: datetime
    scope_project_id: int | None = None


@dataclasses.dataclass(frozen=True)
class KeyCheck:
    """What a presented key turned out to be."""

    user: User | None
    key: ApiKey | None
    problem: str  # empty when the key is valid


def _key(row: asyncpg.Record) -> ApiKey:
    return ApiKey(
        row["key_id"], row["user_id"], row["comments"], tuple(row["audiences"]), row["expires_at"], row["created_at"],
        row["scope_project_id"],
    )


def parse_audiences(values: list[str] | None) -> list[str]:
    if not values:
        return list(AUDIENCES)
    bad = [v for v in values if v not in AUDIENCES]
    if bad:
        raise InvalidArgument(f"unknown audience(s) {bad}: use {' and/or '.join(AUDIENCES)}")
    return sorted(set(values), key=AUDIENCES.index)


def parse_expiry(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        when = parse_rfc3339(text)
    except ValueError as exc:
        raise InvalidArgument(f"expiry_date: {exc}") from None
    if when <= datetime.now(UTC):
        raise InvalidArgument("expiry_date must be in the future")
    return when


async def create(
    pool: asyncpg.Pool,
    user: User,
    *,
    comments: str = "",
    audiences: list[str] | None = None,
    expires_at: datetime | None = None,
    actor_id: int | None = None,
    scope_project_id: int | None = None,
) -> tuple[str, ApiKey]:
    """Create a key; returns (the secret, shown only now, and its record).

    A key with scope_project_id (a workload's CDSW_APIV2_KEY) reaches that project only.
    """
    secret = new_token(32)
    key_id = secrets.token_hex(8)
    async with pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(
            "INSERT INTO api_keys (key_id, user_id, key_digest, comments, audiences, expires_at, scope_project_id)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING *",
            key_id,
            user.id,
            token_digest(secret),
            comments,
            parse_audiences(audiences),
            expires_at,
            scope_project_id,
        )
        await audit.record(conn, actor_id or user.id, "api_key.create", "api_key", key_id, {"user": user.username})
    return secret, _key(row)


def workload_key(user_id: int, project_id: int, comments: str) -> tuple[str, dict[str, object]]:
    """A workload's own CDSW_APIV2_KEY: (the secret, the api_keys columns to insert with the workload).

    It reaches only its project, and is revoked when the workload ends; being part of the
    workload's life, it gets no audit entry of its own.
    """
    secret = new_token(32)
    return secret, {
        "key_id": secrets.token_hex(8), "user_id": user_id, "key_digest": token_digest(secret), "comments": comments,
        "audiences": ["API"], "scope_project_id": project_id,
    }


async def short_lived_key(pool: asyncpg.Pool, user_id: int, project_id: int, comments: str, seconds: int) -> tuple[str, str]:
    """(secret, key_id) of a key the appliance uses on a user's behalf for a moment (a build's
    fetch of its snapshot, an engine's pull of a built image): this project only, gone after
    `seconds`; like a workload's key, no audit entry of its own."""
    secret, columns = workload_key(user_id, project_id, comments)
    await pool.execute(
        "INSERT INTO api_keys (key_id, user_id, key_digest, comments, audiences, scope_project_id, expires_at)"
        " VALUES ($1, $2, $3, $4, $5, $6, now() + make_interval(secs => $7))",
        columns["key_id"], columns["user_id"], columns["key_digest"], columns["comments"], columns["audiences"],
        columns["scope_project_id"], seconds)
    return secret, str(columns["key_id"])


async def revoke(pool: asyncpg.Pool, key_id: str) -> None:
    """Remove a key without an audit entry of its own (a workload's key when the workload ends)."""
    await pool.execute("DELETE FROM api_keys WHERE key_id = $1", key_id)


async def list_for(pool: asyncpg.Pool, user: User) -> list[ApiKey]:
    rows = await pool.fetch(
        "SELECT * FROM api_keys WHERE user_id = $1 AND scope_project_id IS NULL ORDER BY created_at, id", user.id
    )
    return [_key(r) for r in rows]


async def delete(pool: asyncpg.Pool, user: User, key_id: str, actor_id: int) -> None:
    async with pool.acquire() as conn, conn.transaction():
        done = await conn.execute("DELETE FROM api_keys WHERE user_id = $1 AND key_id = $2", user.id, key_id)
        if done == "DELETE 0":
            raise NotFound(f"API key {key_id!r} not found")
        await audit.record(conn, actor_id, "api_key.delete", "api_key", key_id, {"user": user.username})


async def delete_all(pool: asyncpg.Pool, user: User, actor_id: int) -> int:
    async with pool.acquire() as conn, conn.transaction():
        done = await conn.execute("DELETE FROM api_keys WHERE user_id = $1", user.id)
        count = int(done.split()[-1])
        await audit.record(conn, actor_id, "api_key.delete_all", "user", user.username, {"count": count})
    return count


async def check(pool: asyncpg.Pool, secret: str, audience: str = "API") -> KeyCheck:
    row = await pool.fetchrow("SELECT * FROM api_keys WHERE key_digest = $1", token_digest(secret))
    if row is None:
        return KeyCheck(None, None, "API key is not valid")
    key = _key(row)
    user = await get_by_id(pool, key.user_id)
    if user is None or not user.is_active:
        return KeyCheck(user, key, "the key's user is deactivated")
    if key.expires_at is not None and key.expires_at <= datetime.now(UTC):
        return KeyCheck(user, key, "API key has expired")
    if audience not in key.audiences:
        return KeyCheck(user, key, f"API key is not valid for the audience {audience!r}")
    if key.scope_project_id is not None:
        user = dataclasses.replace(user, is_admin=False, scope_project_id=key.scope_project_id)
    return KeyCheck(user, key, "")


def basic_credentials(authorization: str) -> tuple[str, str] | None:
    """(user name, password) of an `Authorization: Basic …` header, or None."""
    scheme, _, encoded = authorization.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        user, _, password = base64.b64decode(encoded.strip(), validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return user, password


async def check_basic(pool: asyncpg.Pool, authorization: str) -> KeyCheck:
    """HTTP Basic with a user name and one of that user's API keys as the password (git and
    registry clients sign in so): the key's check, refused when the name is not its user's."""
    credentials = basic_credentials(authorization)
    if credentials is None or not credentials[1]:
        return KeyCheck(None, None, "sign in with your user name and an API key as the password")
    found = await check(pool, credentials[1], "API")
    if not found.problem and (found.user is None or found.user.username != credentials[0]):
        return KeyCheck(None, None, "the API key is not the named user's")
    return found
