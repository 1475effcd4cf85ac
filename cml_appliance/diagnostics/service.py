"""Diagnostics bundles: one archive a site administrator hands to whoever helps them.

It holds, for a window of time: this process's log lines, the effective settings, what the
appliance runs on (versions, migrations, engines and whether they answer, free disk), the
workloads and builds of the window with their statuses and reasons, and the audit events.
Nothing a user made is in it (no files, no workload output, no environments), and every text
is scrubbed of the site's secrets (secret key, SMTP and database passwords) and of bearer
tokens and password-like URL parameters. Bundles are made in the background; the newest
KEEP are kept on disk.
"""

from __future__ import annotations

import asyncio
import io
import json
import platform
import re
import shutil
import sys
import tarfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg

from cml_appliance import __version__
from cml_appliance.core.errors import FailedPrecondition, InvalidArgument, NotFound
from cml_appliance.core.ids import new_public_id
from cml_appliance.core.logs import RecentRecords
from cml_appliance.core.settings import Settings
from cml_appliance.core.tasks import Supervisor
from cml_appliance.core.timefmt import parse_rfc3339, rfc3339

KEEP = 10
DEFAULT_WINDOW = timedelta(hours=24)
LONGEST_WINDOW = timedelta(days=31)
STALE = timedelta(minutes=10)  # an unfinished bundle this old was cut short by a restart
_BEARER = re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]{8,}")
_URL_SECRET = re.compile(r"(?i)\b((?:password|passwd|secret|token|api_?key|access_?key)=)[^&\s\"']+")
_DSN_PASSWORD = re.compile(r"(postgres(?:ql)?://[^:/@\s]+:)[^@\s]+@")

README = """cml-appliance diagnostics bundle
Window: {start} to {end} (UTC). Made {made} for {requester}.

appliance.log   this appliance process's log lines in the window (JSON lines)
settings.json   the effective settings, secrets and the database password hidden
system.json     versions, database, migrations, engines (and whether they answered), disk
workloads.json  workloads that were active in the window: kind, status, reason, times (no
                environment, no output)
builds.json     model builds of the window: status, failure
audit.jsonl     audit events of the window (who did what, never a secret)

Secrets of this site, bearer tokens and password-like URL parameters are replaced by <redacted>.
"""


def parse_time(raw: Any, what: str) -> datetime | None:
    if raw in (None, ""):
        return None
    text = str(raw).strip().replace(" ", "T", 1)
    try:
        return parse_rfc3339(text if text.endswith("Z") or "+" in text[10:] else text + "Z")
    except ValueError as exc:
        raise InvalidArgument(f"{what}: {exc}; use RFC 3339 or 2023-12-11 21:06:51 (UTC)") from None


def status_json(row: asyncpg.Record) -> dict[str, Any]:
    """CML's DiagBundleStatusResponse, with the request id beside it (CML's lacks the id that
    GetDiagBundleStatus and DownloadDiagnosticsBundle take)."""
    return {"request_id": row["public_id"], "status": row["status"], "start_time": rfc3339(row["start_time"]),
            "end_time": rfc3339(row["end_time"])} | ({"failure": row["failure"]} if row["failure"] else {})


class Scrubber:
    def __init__(self, settings: Settings):
        secrets = [settings.secret_key, settings.smtp_password]
        if settings.database_url:
            secrets.append(urlsplit(settings.database_url).password or "")
        self.secrets = sorted({s for s in secrets if s and len(s) >= 4}, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, "<redacted>")
        text = _BEARER.sub(lambda m: f"{m.group(1)} <redacted>", text)
        text = _DSN_PASSWORD.sub(r"\1<redacted>@", text)
        return _URL_SECRET.sub(r"\1<redacted>", text)


class Diagnostics:
    def __init__(self, pool: asyncpg.Pool, settings: Settings, supervisor: Supervisor, recent: RecentRecords,
                 engines: dict[str, Any]):
        self.pool = pool
        self.settings = settings
        self.supervisor = supervisor
        self.recent = recent
        self.engines = engines
        self.directory = settings.data_dir / "diagnostics"

    def path(self, public_id: str) -> Path:
        return self.directory / f"{public_id}.tar.gz"

    async def request(self, requester_id: int, start: datetime | None, end: datetime | None) -> asyncpg.Record:
        now = datetime.now(UTC)
        end = min(end or now, now)
        start = start or end - DEFAULT_WINDOW
        if start >= end:
            raise InvalidArgument("start_time must come before end_time (and before now)")
        if end - start > LONGEST_WINDOW:
            raise InvalidArgument(f"the window may be {LONGEST_WINDOW.days} days at most")
        row = await self.pool.fetchrow(
            "INSERT INTO diag_bundles (public_id, requester_id, start_time, end_time) VALUES ($1, $2, $3, $4) RETURNING *",
            new_public_id(), requester_id, start, end)
        self.supervisor.spawn(f"diagnostics-{row['public_id']}", self._make(row))
        return row

    async def get(self, public_id: str) -> asyncpg.Record:
        await self.pool.execute(
            "UPDATE diag_bundles SET status = 'DIAG_FAILED', failure = 'cut short: the appliance stopped while making it',"
            " finished_at = now() WHERE status = 'DIAG_IN_PROGRESS' AND created_at < now() - $1::interval", STALE)
        row = await self.pool.fetchrow("SELECT * FROM diag_bundles WHERE public_id = $1", public_id)
        if row is None:
            raise NotFound(f"there is no diagnostics bundle {public_id!r}")
        return row

    async def archive(self, public_id: str) -> Path:
        row = await self.get(public_id)
        if row["status"] != "DIAG_COMPLETED":
            raise FailedPrecondition(f"diagnostics bundle {public_id} is not ready: {row['status']}")
        path = self.path(public_id)
        if not path.is_file():
            raise NotFound(f"diagnostics bundle {public_id} is no longer kept (the newest {KEEP} are)")
        return path

    async def newest(self, limit: int = 20) -> list[asyncpg.Record]:
        return await self.pool.fetch(
            "SELECT b.*, u.username AS requester FROM diag_bundles b LEFT JOIN users u ON u.id = b.requester_id"
            " ORDER BY b.created_at DESC, b.id DESC LIMIT $1", limit)

    async def _make(self, row: asyncpg.Record) -> None:
        public_id = row["public_id"]
        try:
            files = await self._gather(row)
            size = await asyncio.to_thread(self._write, public_id, files)
        except Exception as exc:
            await self.pool.execute(
                "UPDATE diag_bundles SET status = 'DIAG_FAILED', failure = $2, finished_at = now() WHERE public_id = $1",
                public_id, str(exc)[:2000] or type(exc).__name__)
            raise
        await self.pool.execute(
            "UPDATE diag_bundles SET status = 'DIAG_COMPLETED', size_bytes = $2, finished_at = now() WHERE public_id = $1",
            public_id, size)
        await self._prune()

    async def _gather(self, row: asyncpg.Record) -> dict[str, str]:
        start, end = row["start_time"], row["end_time"]
        requester = await self.pool.fetchval("SELECT username FROM users WHERE id = $1", row["requester_id"])
        workloads = await self.pool.fetch(
            "SELECT w.public_id, w.kind, p.public_id AS project, w.engine, w.status, w.reason, w.exit_code,"
            " w.runtime_identifier, w.cpu, w.memory, w.nvidia_gpu, w.node, w.created_at, w.starting_at, w.running_at,"
            " w.finished_at FROM workloads w JOIN projects p ON p.id = w.project_id"
            " WHERE w.created_at <= $2 AND coalesce(w.finished_at, now()) >= $1 ORDER BY w.created_at", start, end)
        builds = await self.pool.fetch(
            "SELECT b.public_id, b.status, b.failure, b.runtime_identifier, b.created_at, b.built_at"
            " FROM model_builds b WHERE b.created_at BETWEEN $1 AND $2 ORDER BY b.created_at", start, end)
        audit = await self.pool.fetch(
            "SELECT a.at, u.username AS actor, a.action, a.target_type, a.target_id, a.details, a.request_id"
            " FROM audit_events a LEFT JOIN users u ON u.id = a.user_id WHERE a.at BETWEEN $1 AND $2 ORDER BY a.at",
            start, end)
        lines = self.recent.between(start.timestamp(), end.timestamp())
        return {
            "README.txt": README.format(start=rfc3339(start), end=rfc3339(end), made=rfc3339(datetime.now(UTC)),
                                        requester=requester or "a deleted user"),
            "appliance.log": "\n".join(lines) + ("\n" if lines else ""),
            "settings.json": _json(self.settings.redacted()),
            "system.json": _json(await self._system()),
            "workloads.json": _json([dict(r) for r in workloads]),
            "builds.json": _json([dict(r) for r in builds]),
            "audit.jsonl": "".join(json.dumps(dict(r) | {"details": _jsonb(r["details"])}, default=str) + "\n" for r in audit),
        }

    async def _system(self) -> dict[str, Any]:
        engines: dict[str, str] = {}
        for name, engine in self.engines.items():
            try:
                await engine.ping()
                engines[name] = "answers"
            except Exception as exc:
                engines[name] = f"does not answer: {exc}"
        counts = await self.pool.fetchrow(
            "SELECT (SELECT count(*) FROM users WHERE NOT is_team) AS users, (SELECT count(*) FROM users WHERE is_team) AS teams,"
            " (SELECT count(*) FROM projects) AS projects,"
            " (SELECT count(*) FROM workloads WHERE finished_at IS NULL) AS active_workloads")
        disk = shutil.disk_usage(self.settings.data_dir)
        return {
            "appliance_version": __version__, "python": sys.version, "platform": platform.platform(),
            "postgres": await self.pool.fetchval("SHOW server_version"),
            "migrations": [r["version"] for r in await self.pool.fetch("SELECT version FROM schema_migrations ORDER BY version")],
            "engines": engines, "counts": dict(counts),
            "data_dir_disk": {"total_bytes": disk.total, "free_bytes": disk.free},
        }

    def _write(self, public_id: str, files: dict[str, str]) -> int:
        scrub = Scrubber(self.settings)
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        partial = self.directory / f".{public_id}.partial"
        with tarfile.open(partial, "w:gz") as tar:
            for name, text in files.items():
                data = scrub(text).encode()
                info = tarfile.TarInfo(f"cml-diagnostics-{public_id}/{name}")
                info.size, info.mtime, info.mode = len(data), int(time.time()), 0o600
                tar.addfile(info, io.BytesIO(data))
        partial.rename(self.path(public_id))
        return self.path(public_id).stat().st_size

    async def _prune(self) -> None:
        old = await self.pool.fetch("SELECT public_id FROM diag_bundles WHERE status = 'DIAG_COMPLETED'"
                                    " ORDER BY created_at DESC, id DESC OFFSET $1", KEEP)
        for row in old:
            self.path(row["public_id"]).unlink(missing_ok=True)


def _json(value: Any) -> str:
    return json.dumps(value, indent=2, default=str) + "\n"


def _jsonb(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value
