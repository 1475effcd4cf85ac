"""Docker credentials: registry logins that runtime images are pulled with.

A password is sealed (AES-GCM) with a key derived from the site's secret key, so a copy of the
database alone does not reveal it; it is unsealed only to hand it to the container engine or to
a pod's pull secret, and no answer ever carries it. Which login pulls an image (pull_auth):
the runtime's own credential, else the default credential of the image's registry, else, for
an image in the appliance's own registry, a short-lived key of the administrator who registered
it, else none (a public image).
"""

from __future__ import annotations

import os
import re
from typing import Any

import asyncpg
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from cml_appliance.api.listing import ListQuery, fetch_listing
from cml_appliance.core import audit
from cml_appliance.core.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound

FILTER_KEYS = {"name": "name", "server": "server", "is_default": "is_default::text"}
SORT_KEYS = {"name": "name", "server": "server", "created_at": "created_at", "id": "id"}
_SERVER = re.compile(r"^[A-Za-z0-9.-]+(:\d{1,5})?(/[A-Za-z0-9._/-]*)?$")
_AAD = b"cml-appliance docker credential"


def _key(secret_key: str) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"docker-credentials").derive(secret_key.encode())


def seal(secret_key: str, password: str) -> bytes:
    nonce = os.urandom(12)
    return nonce + AESGCM(_key(secret_key)).encrypt(nonce, password.encode(), _AAD)


def unseal(secret_key: str, sealed: bytes) -> str:
    try:
        return AESGCM(_key(secret_key)).decrypt(sealed[:12], sealed[12:], _AAD).decode()
    except InvalidTag:
        raise FailedPrecondition("a docker credential cannot be read with this site's secret key "
                                 "(was the key changed?): set its password again") from None


def registry_of(image: str) -> str:
    """The registry host of an image reference ('docker.io' when it names none)."""
    first, sep, _ = image.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        return first
    return "docker.io"


def server_host(server: str) -> str:
    """A credential's server as a registry host: 'https://reg.example.com/v2/' -> 'reg.example.com'."""
    return re.sub(r"^https?://", "", server.strip()).split("/", 1)[0]


def public_json(row: asyncpg.Record) -> dict[str, Any]:
    return {"id": str(row["id"]), "name": row["name"], "server": row["server"], "is_default": row["is_default"]}


def _check(name: str | None, server: str | None, username: str | None, password: str | None, partial: bool) -> None:
    for field, value in (("name", name), ("server", server), ("username", username), ("password", password)):
        if value is None and partial:
            continue
        if not (value or "").strip():
            raise InvalidArgument(f"{field} is required")
        if len(value or "") > 1024:
            raise InvalidArgument(f"{field} is longer than 1024 characters")
    if server is not None and not _SERVER.match(re.sub(r"^https?://", "", server.strip())):
        raise InvalidArgument(f"server must be a registry host such as registry.example.com:5000, got {server!r}")


def parse_id(raw: Any) -> int:
    try:
        value = int(str(raw))
    except ValueError:
        raise InvalidArgument(f"docker credential id must be a whole number, got {raw!r}") from None
    if not 0 < value < 2**63:
        raise NotFound(f"there is no docker credential {raw}")
    return value


class DockerCredentials:
    def __init__(self, pool: asyncpg.Pool, secret_key: str):
        self.pool = pool
        self.secret_key = secret_key

    async def list(self, q: ListQuery) -> tuple[list[dict[str, Any]], bool]:
        rows, more = await fetch_listing(self.pool, "docker_credentials", q, FILTER_KEYS, SORT_KEYS, "name ASC")
        return [public_json(r) for r in rows], more

    async def get(self, credential_id: int) -> asyncpg.Record:
        row = await self.pool.fetchrow("SELECT * FROM docker_credentials WHERE id = $1", credential_id)
        if row is None:
            raise NotFound(f"there is no docker credential {credential_id}")
        return row

    async def create(self, actor_id: int, body: dict[str, Any]) -> dict[str, Any]:
        _check(body.get("name"), body.get("server"), body.get("username"), body.get("password"), partial=False)
        async with self.pool.acquire() as conn, conn.transaction():
            if body.get("is_default"):
                await conn.execute("UPDATE docker_credentials SET is_default = false WHERE server = $1", body["server"].strip())
            try:
                row = await conn.fetchrow(
                    "INSERT INTO docker_credentials (name, server, username, password_sealed, is_default, creator_id)"
                    " VALUES ($1, $2, $3, $4, $5, $6) RETURNING *",
                    body["name"].strip(), body["server"].strip(), body["username"], seal(self.secret_key, body["password"]),
                    bool(body.get("is_default")), actor_id)
            except asyncpg.UniqueViolationError:
                raise AlreadyExists(f"a docker credential named {body['name'].strip()!r} already exists") from None
            await audit.record(conn, actor_id, "docker_credential.create", "docker_credential", str(row["id"]),
                               {"name": row["name"], "server": row["server"]})
        return public_json(row)

    async def update(self, actor_id: int, credential_id: int, body: dict[str, Any]) -> dict[str, Any]:
        _check(body.get("name"), body.get("server"), body.get("username"), body.get("password"), partial=True)
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow("SELECT * FROM docker_credentials WHERE id = $1 FOR UPDATE", credential_id)
            if row is None:
                raise NotFound(f"there is no docker credential {credential_id}")
            server = (body.get("server") or row["server"]).strip()
            is_default = row["is_default"] if body.get("is_default") is None else bool(body["is_default"])
            if is_default:
                await conn.execute("UPDATE docker_credentials SET is_default = false WHERE server = $1 AND id <> $2",
                                   server, credential_id)
            sealed = seal(self.secret_key, body["password"]) if body.get("password") else row["password_sealed"]
            try:
                row = await conn.fetchrow(
                    "UPDATE docker_credentials SET name = $2, server = $3, username = $4, password_sealed = $5,"
                    " is_default = $6 WHERE id = $1 RETURNING *",
                    credential_id, (body.get("name") or row["name"]).strip(), server, body.get("username") or row["username"],
                    sealed, is_default)
            except asyncpg.UniqueViolationError:
                raise AlreadyExists(f"a docker credential named {body['name'].strip()!r} already exists") from None
            changed = sorted(k for k in ("name", "server", "username", "password", "is_default") if body.get(k) is not None)
            await audit.record(conn, actor_id, "docker_credential.update", "docker_credential", str(credential_id),
                               {"changed": changed})
        return public_json(row)

    async def delete(self, actor_id: int, credential_id: int) -> None:
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow("DELETE FROM docker_credentials WHERE id = $1 RETURNING name", credential_id)
            if row is None:
                raise NotFound(f"there is no docker credential {credential_id}")
            await audit.record(conn, actor_id, "docker_credential.delete", "docker_credential", str(credential_id),
                               {"name": row["name"]})

    async def set_for_runtime(self, actor_id: int, credential_id: int | None, image_identifier: str) -> None:
        """The credential a runtime's image is pulled with (None: the default of its registry)."""
        if credential_id is not None:
            await self.get(credential_id)
        async with self.pool.acquire() as conn, conn.transaction():
            done = await conn.execute("UPDATE runtimes SET docker_credential_id = $2 WHERE image_identifier = $1",
                                      image_identifier, credential_id)
            if done == "UPDATE 0":
                raise NotFound(f"runtime {image_identifier!r} not found")
            await audit.record(conn, actor_id, "runtime.set_credential", "runtime", image_identifier,
                               {"docker_credential_id": credential_id})

    async def login_for(self, image: str, credential_id: int | None) -> dict[str, str] | None:
        """{username, password, serveraddress} to pull `image` with: the named credential, else
        the default one of the image's registry, else None."""
        if credential_id is not None:
            row = await self.get(credential_id)
        else:
            host = registry_of(image)
            rows = await self.pool.fetch("SELECT * FROM docker_credentials WHERE is_default", )
            row = next((r for r in rows if server_host(r["server"]) == host), None)
            if row is None:
                return None
        return {"username": row["username"], "password": unseal(self.secret_key, row["password_sealed"]),
                "serveraddress": server_host(row["server"])}
