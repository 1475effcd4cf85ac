"""Runtime add-ons: files an administrator adds to the workloads that ask for them.

An add-on is uploaded as a tarball with its metadata (HandleCustomRuntimeUpload); its files are
unpacked (regular files and folders only: no links, devices or paths leaving it) into
data_dir/runtime-addons/<id>, and a session that names it in runtime_addon_identifiers sees them
read-only at /runtime-addons/<identifier>, in the local engine's sandbox or its container. Only
AVAILABLE add-ons can be asked for; DISABLED, DEPRECATED or DELETED ones stay listed with that
status (DELETED ones lose their files).
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import Any

import asyncpg

from cml_appliance.api.listing import ListQuery, fetch_listing
from cml_appliance.core import audit
from cml_appliance.core.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, PayloadTooLarge

FILTER_KEYS = {"identifier": "identifier", "component": "component", "display_name": "display_name", "status": "status"}
SORT_KEYS = {"identifier": "identifier", "component": "component", "display_name": "display_name",
             "created_at": "created_at", "id": "id"}
STATUSES = ("AVAILABLE", "DISABLED", "DEPRECATED", "DELETED")
MOUNT_ROOT = "/runtime-addons"
_IDENTIFIER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def addon_json(row: asyncpg.Record) -> dict[str, Any]:
    return {"id": row["id"], "identifier": row["identifier"], "component": row["component"],
            "display_name": row["display_name"], "status": row["status"], "manageable": True,
            "created_at": row["created_at"].isoformat(), "reason": row["reason"]}


def _unpack(archive: Path, target: Path, max_bytes: int) -> tuple[int, int]:
    """(files, bytes) unpacked from a tar (gzip, bzip2 or xz too) into target."""
    target.mkdir(parents=True, exist_ok=True)  # an empty archive is an empty add-on
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            size = sum(m.size for m in members if m.isfile())
            if size > max_bytes:
                raise PayloadTooLarge(f"the add-on unpacks to {size} bytes, more than the limit of {max_bytes}")
            odd = [m.name for m in members if not (m.isfile() or m.isdir())]
            if odd:
                raise InvalidArgument(f"the tarball holds more than files and folders (links, devices): {odd[:5]}")
            tar.extractall(target, filter="data")
    except tarfile.TarError as exc:
        raise InvalidArgument(f"tarball is not a tar archive (plain, gzip, bzip2 or xz): {exc}") from None
    for path in target.rglob("*"):  # readable by the workloads' user, whatever the archive said
        path.chmod(0o755 if path.is_dir() else 0o644)
    target.chmod(0o755)
    return sum(1 for m in members if m.isfile()), size


class RuntimeAddons:
    def __init__(self, pool: asyncpg.Pool, directory: Path, max_bytes: int):
        self.pool = pool
        self.directory = directory
        self.max_bytes = max_bytes

    def folder(self, addon_id: int) -> Path:
        return self.directory / str(addon_id)

    async def list(self, q: ListQuery) -> tuple[list[dict[str, Any]], bool]:
        rows, more = await fetch_listing(self.pool, "runtime_addons", q, FILTER_KEYS, SORT_KEYS, "identifier ASC")
        return [addon_json(r) for r in rows], more

    async def add(self, actor_id: int, metadata_raw: bytes, archive: Path) -> dict[str, Any]:
        try:
            metadata = json.loads(metadata_raw or b"{}")
        except (ValueError, UnicodeDecodeError) as exc:
            raise InvalidArgument(f"metadata must be JSON: {exc}") from None
        if not isinstance(metadata, dict):
            raise InvalidArgument('metadata must be a JSON object such as {"identifier": "tools", "display_name": "Our tools"}')
        identifier = str(metadata.get("identifier") or "").strip()
        if not _IDENTIFIER.match(identifier):
            raise InvalidArgument("metadata.identifier must be 1 to 100 letters, digits, dots, dashes or underscores")
        component = str(metadata.get("component") or "Custom")[:100]
        display_name = str(metadata.get("display_name") or identifier)[:200]
        self.directory.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".addon-", dir=self.directory))
        try:
            files, size = await asyncio.to_thread(_unpack, archive, staging / "files", self.max_bytes)
            async with self.pool.acquire() as conn, conn.transaction():
                try:
                    row = await conn.fetchrow(
                        "INSERT INTO runtime_addons (identifier, component, display_name, size_bytes, files, creator_id)"
                        " VALUES ($1, $2, $3, $4, $5, $6) RETURNING *", identifier, component, display_name, size, files, actor_id)
                except asyncpg.UniqueViolationError:
                    raise AlreadyExists(f"a runtime add-on {identifier!r} already exists") from None
                (staging / "files").rename(self.folder(row["id"]))
                await audit.record(conn, actor_id, "runtime_addon.create", "runtime_addon", identifier,
                                   {"files": files, "bytes": size})
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return addon_json(row)

    async def update_status(self, actor_id: int, status: str, ids: list[int], identifiers: list[str]) -> int:
        if status not in STATUSES:
            raise InvalidArgument(f"status must be one of {', '.join(STATUSES)}")
        if not ids and not identifiers:
            raise InvalidArgument("name the add-ons to update: identifiers (or ids)")
        async with self.pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(
                "UPDATE runtime_addons SET status = $1 WHERE (identifier = ANY($2::text[]) OR id = ANY($3::bigint[]))"
                " AND status <> 'DELETED' RETURNING id, identifier", status, identifiers, ids)
            if not rows:
                raise NotFound("none of the add-ons named is there (or each is deleted)")
            for row in rows:
                await audit.record(conn, actor_id, "runtime_addon.update_status", "runtime_addon", row["identifier"],
                                   {"status": status})
        if status == "DELETED":
            for row in rows:
                await asyncio.to_thread(shutil.rmtree, self.folder(row["id"]), True)
        return len(rows)

    async def mounts(self, identifiers: list[str]) -> dict[str, Path]:
        """{path inside the workload: folder here} for the add-ons a workload asks for."""
        wanted = list(dict.fromkeys(i for i in identifiers if i))
        if not wanted:
            return {}
        rows = {r["identifier"]: r for r in await self.pool.fetch(
            "SELECT id, identifier, status FROM runtime_addons WHERE identifier = ANY($1::text[])", wanted)}
        out = {}
        for identifier in wanted:
            row = rows.get(identifier)
            if row is None:
                raise InvalidArgument(f"there is no runtime add-on {identifier!r}: see GET /api/v2/runtimeaddons")
            if row["status"] != "AVAILABLE":
                raise FailedPrecondition(f"runtime add-on {identifier!r} is {row['status'].lower()}")
            out[f"{MOUNT_ROOT}/{identifier}"] = self.folder(row["id"])
        return out
