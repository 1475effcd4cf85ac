"""Quotas: how much CPU, memory and GPUs an account's running workloads may hold at once.

A user's quota is their own (account_quotas), else the default for users when it is active,
else none. Every active workload a user started counts against them; the workloads of a
team-owned project count against the team too (its own quota, else the default for teams). A
start that would go past a quota is refused, on every engine, before anything is made: the
message names the quota and what runs. Each check and the insert it allows happen under one
site-wide lock (WorkloadService.launch: an asyncio lock in the process, a Postgres advisory lock
across appliance processes), so starts racing from several processes cannot pass a quota.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import asyncpg

from cml_appliance.auth.users import User
from cml_appliance.core import audit
from cml_appliance.core.errors import InvalidArgument, NotFound, QuotaExceeded
from cml_appliance.workloads import states

KIND_WORDS = {"session": "session", "job_run": "job run", "application": "application", "model_replica": "model replica"}
_AMOUNT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(gi|gb|g)?\s*$", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class Quota:
    """None in a part: no limit on it."""

    cpu: float | None = None
    memory: float | None = None
    nvidia_gpu: int | None = None

    @property
    def unlimited(self) -> bool:
        return self.cpu is None and self.memory is None and self.nvidia_gpu is None

    def words(self) -> str:
        parts = [f"{self.cpu:g} vCPU" if self.cpu is not None else "",
                 f"{self.memory:g} GB" if self.memory is not None else "",
                 f"{self.nvidia_gpu} GPU(s)" if self.nvidia_gpu is not None else ""]
        return ", ".join(p for p in parts if p) or "no limit"


@dataclasses.dataclass(frozen=True)
class Usage:
    cpu: float
    memory: float
    nvidia_gpu: int
    running: list[str]  # what holds it, in words


def amount(value: Any, what: str, whole: bool = False) -> float | int | None:
    """A quota part as CML sends it (a string: "4", "8Gi", "8GB"; "" or null for no limit)."""
    if value is None or value == "":
        return None
    match = _AMOUNT.match(str(value))
    if not match:
        raise InvalidArgument(f"{what} must be a number (memory in GB, such as 8 or 8Gi), or empty for no limit; got {value!r}")
    number = float(match.group(1))
    if whole:
        if number != int(number):
            raise InvalidArgument(f"{what} must be a whole number")
        return int(number)
    return number


def _holding(row: asyncpg.Record) -> str:
    """'session 'Session' in 'churn' (1 vCPU, 2 GB)': one workload that holds part of a quota."""
    gpus = f", {row['nvidia_gpu']} GPU(s)" if row["nvidia_gpu"] else ""
    return f"{KIND_WORDS.get(row['kind'], row['kind'])} {row['name']!r} in {row['project']!r} ({row['cpu']:g} vCPU, {row['memory']:g} GB{gpus})"


def quota_json(quota: Quota | None) -> dict[str, str]:
    """CML's Quota: strings, empty for no limit."""
    q = quota or Quota()
    return {"cpu": "" if q.cpu is None else f"{q.cpu:g}", "memory": "" if q.memory is None else f"{q.memory:g}",
            "nvidia_gpu": "" if q.nvidia_gpu is None else str(q.nvidia_gpu)}


def usage_json(usage: Usage) -> dict[str, str]:
    return {"cpu": f"{usage.cpu:g}", "memory": f"{usage.memory:g}", "nvidia_gpu": str(usage.nvidia_gpu)}


class QuotaService:
    def __init__(self, pool: asyncpg.Pool):
        self.pool = pool

    # What is configured -------------------------------------------------------------------

    async def default(self, owner_type: str) -> asyncpg.Record | None:
        return await self.pool.fetchrow("SELECT * FROM default_quotas WHERE owner_type = $1", owner_type)

    async def configured(self, account_id: int, is_team: bool) -> Quota | None:
        own = await self.pool.fetchrow("SELECT cpu, memory, nvidia_gpu FROM account_quotas WHERE user_id = $1", account_id)
        if own is not None:
            return Quota(own["cpu"], own["memory"], own["nvidia_gpu"])
        row = await self.default("team" if is_team else "user")
        if row is None or not row["active"]:
            return None
        return Quota(row["cpu"], row["memory"], row["nvidia_gpu"])

    async def has_own(self, account_id: int) -> bool:
        return bool(await self.pool.fetchval("SELECT 1 FROM account_quotas WHERE user_id = $1", account_id))

    async def set_default(self, actor: User, owner_type: str, quota: Quota, active: bool) -> None:
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO default_quotas (owner_type, cpu, memory, nvidia_gpu, active) VALUES ($1, $2, $3, $4, $5)"
                " ON CONFLICT (owner_type) DO UPDATE SET cpu = excluded.cpu, memory = excluded.memory,"
                " nvidia_gpu = excluded.nvidia_gpu, active = excluded.active",
                owner_type, quota.cpu, quota.memory, quota.nvidia_gpu, active)
            await audit.record(conn, actor.id, "quota.default.set", "quota", owner_type, dataclasses.asdict(quota) | {"active": active})

    async def set_account(self, actor: User, username: str, quota: Quota | None) -> None:
        """An account's own quota (None: back to the default)."""
        account = await self.pool.fetchval("SELECT id FROM users WHERE username = $1", username)
        if account is None:
            raise NotFound(f"there is no user or team named {username!r}")
        async with self.pool.acquire() as conn, conn.transaction():
            if quota is None:
                await conn.execute("DELETE FROM account_quotas WHERE user_id = $1", account)
            else:
                await conn.execute(
                    "INSERT INTO account_quotas (user_id, cpu, memory, nvidia_gpu) VALUES ($1, $2, $3, $4)"
                    " ON CONFLICT (user_id) DO UPDATE SET cpu = excluded.cpu, memory = excluded.memory,"
                    " nvidia_gpu = excluded.nvidia_gpu, updated_at = now()",
                    account, quota.cpu, quota.memory, quota.nvidia_gpu)
            await audit.record(conn, actor.id, "quota.set", "user", username,
                               dataclasses.asdict(quota) if quota else {"default": True})

    # What is used -------------------------------------------------------------------------

    async def usage(self, account_id: int, is_team: bool) -> Usage:
        column = "p.owner_id" if is_team else "w.creator_id"
        rows = await self.pool.fetch(
            "SELECT w.kind, w.name, w.cpu, w.memory, w.nvidia_gpu, p.name AS project FROM workloads w"
            f" JOIN projects p ON p.id = w.project_id WHERE {column} = $1 AND w.status = ANY($2::text[])"
            " ORDER BY w.created_at", account_id, list(states.ACTIVE))
        return Usage(sum(r["cpu"] for r in rows), sum(r["memory"] for r in rows), sum(r["nvidia_gpu"] for r in rows),
                     [_holding(r) for r in rows])

    # The check at every start ---------------------------------------------------------------

    async def check(self, user: User, project_id: int, cpu: float, memory: float, gpus: int, what: str) -> None:
        owner = await self.pool.fetchrow("SELECT u.id, u.username, u.is_team FROM projects p JOIN users u ON u.id = p.owner_id"
                                         " WHERE p.id = $1", project_id)
        accounts = [(user.id, user.username, False)]
        if owner is not None and owner["is_team"]:
            accounts.append((owner["id"], owner["username"], True))
        for account_id, name, is_team in accounts:
            quota = await self.configured(account_id, is_team)
            if quota is None or quota.unlimited:
                continue
            used = await self.usage(account_id, is_team)
            over = [part for part, limit, total in (("CPU", quota.cpu, used.cpu + cpu), ("memory", quota.memory, used.memory + memory),
                                                    ("GPUs", quota.nvidia_gpu, used.nvidia_gpu + gpus))
                    if limit is not None and total > limit + 1e-9]
            if over:
                whose = f"team {name}'s" if is_team else f"{name}'s"
                running = "; ".join(used.running) if used.running else "nothing else"
                raise QuotaExceeded(
                    f"this {what} ({cpu:g} vCPU, {memory:g} GB{f', {gpus} GPU(s)' if gpus else ''}) would pass {whose} quota "
                    f"of {quota.words()} in {' and '.join(over)}: in use now {used.cpu:g} vCPU, {used.memory:g} GB, "
                    f"{used.nvidia_gpu} GPU(s) by {running}. Stop something first, or ask a site admin for more.")

    # Listings ------------------------------------------------------------------------------

    async def accounts(self, *, teams: bool, only: int | None, deactivated: bool, descending: bool, limit: int,
                       offset: int) -> tuple[list[asyncpg.Record], bool, int]:
        args: list[Any] = [teams, not deactivated]
        where = "is_team = $1 AND is_active = $2"
        if only is not None:
            args.append(only)
            where += f" AND id = ${len(args)}"
        total = int(await self.pool.fetchval(f"SELECT count(*) FROM users WHERE {where}", *args))
        args += [limit + 1, offset]
        rows = await self.pool.fetch(f"SELECT id, username, name FROM users WHERE {where}"
                                     f" ORDER BY username {'DESC' if descending else 'ASC'} LIMIT ${len(args) - 1} OFFSET ${len(args)}",
                                     *args)
        return list(rows[:limit]), len(rows) > limit, total
