"""Resource groups and accelerators: where workloads may run, and which GPUs they may hold.

A resource group is one of this site's engines (local, container, kubernetes); an administrator
decides which kinds of workload each takes (allow_sessions, allow_jobs, ...), and a start on a
group that does not take its kind is refused. Its size is the host's (local, container) or the
Kubernetes nodes' allocatable total.

Accelerators are the kinds of GPU the Kubernetes nodes offer: nodes with allocatable
nvidia.com/gpu, told apart by their nvidia.com/gpu.product label (NVIDIA's GPU feature
discovery sets it; nodes without it count as nvidia.com/gpu.present=true). They are found again
whenever they are listed or asked for. Per accelerator an administrator sets the most GPUs one
workload may take and a default quota; per user and team a quota of its own. A workload that
asks for GPUs of an accelerator is held to those and runs on a node with that label
(nodeSelector). GPU profiles are a resource group's offered GPU shapes (GPUs, vCPU, memory).
"""

from __future__ import annotations

import os
from typing import Any

import asyncpg

from cml_appliance.api.listing import ListQuery, sql_where_and_order
from cml_appliance.auth.users import User
from cml_appliance.core import audit
from cml_appliance.core.errors import FailedPrecondition, InvalidArgument, NotFound, QuotaExceeded, Unavailable
from cml_appliance.engines.base import EngineUnavailable

GPU_RESOURCE = "nvidia.com/gpu"
PRODUCT_LABEL = "nvidia.com/gpu.product"
PRESENT_LABEL = "nvidia.com/gpu.present"
ALLOW_COLUMNS = {"session": "allow_sessions", "job_run": "allow_jobs", "application": "allow_applications",
                 "model_replica": "allow_models"}
KIND_WORDS = {"session": "sessions", "job_run": "jobs", "application": "applications", "model_replica": "models"}
GROUP_SORT = {"id": "id", "name": "name"}
LABEL_FILTERS = {"label_key": "label_key", "label_value": "label_value", "resource_group_id": "resource_group_id::text"}
LABEL_SORT = {"id": "id", "label_key": "label_key", "label_value": "label_value", "created_at": "created_at"}


def _meminfo_gib() -> int:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) // (1024 * 1024)
    except OSError:
        pass
    return 0


def number(raw: Any, what: str, *, whole: bool = True, allow_empty: bool = False) -> Any:
    if allow_empty and raw in (None, ""):
        return None
    try:
        value = float(str(raw))
    except ValueError:
        raise InvalidArgument(f"{what} must be a number, got {raw!r}") from None
    if value < 0 or value > 1_000_000 or (whole and value != int(value)):
        raise InvalidArgument(f"{what} must be a {'whole ' if whole else ''}number from 0, got {raw!r}")
    return int(value) if whole else value


def label_json(row: asyncpg.Record) -> dict[str, Any]:
    """CML's AcceleratorNodeLabel (int64s as strings)."""
    out: dict[str, Any] = {
        "id": str(row["id"]), "label_key": row["label_key"], "label_value": row["label_value"],
        "availability": row["available"], "max_gpu_count": str(row["gpu_count"] or row["max_gpu_count"]),
        "current_gpu_count": str(max(0, (row["max_gpu_count"] or 0) - (row["held"] or 0))) if "held" in row else "0",
        "created_at": row["created_at"].isoformat(), "updated_at": row["updated_at"].isoformat(),
    }
    # Unset ones are left out (proto3 JSON): no per-workload limit, no default quota.
    for key in ("max_gpu_per_workload", "default_quota", "resource_group_id"):
        if row[key] is not None:
            out[key] = str(row[key])
    for key in ("cpu", "memory", "gpu_memory"):
        if row[key] is not None:
            out[key] = row[key]
    return out


class Accelerators:
    def __init__(self, pool: asyncpg.Pool, engines: dict[str, Any]):
        self.pool = pool
        self.engines = engines

    # Resource groups -----------------------------------------------------------------------

    async def seed_groups(self) -> None:
        for name in self.engines:
            await self.pool.execute("INSERT INTO resource_groups (name) VALUES ($1) ON CONFLICT (name) DO NOTHING", name)

    async def _nodes(self) -> list[dict[str, Any]]:
        kubernetes = self.engines.get("kubernetes")
        if kubernetes is None:
            return []
        try:
            return list(await kubernetes.node_resources())
        except EngineUnavailable as exc:  # 503 with why, not a 500
            raise Unavailable(f"the Kubernetes nodes cannot be read now: {exc}") from None

    async def groups(self, q: ListQuery) -> tuple[list[dict[str, Any]], bool]:
        await self.seed_groups()
        args: list[Any] = []
        where, order = sql_where_and_order(q, {"name": "name"}, GROUP_SORT, "id ASC", args)
        args += [q.page_size + 1, q.offset]
        rows = await self.pool.fetch(f"SELECT * FROM resource_groups WHERE {where} AND name = ANY(${len(args) + 1})"
                                     f" ORDER BY {order} LIMIT ${len(args) - 1} OFFSET ${len(args)}", *args, list(self.engines))
        nodes = await self._nodes() if any(r["name"] == "kubernetes" for r in rows) else []
        return [self._group_json(r, nodes) for r in rows[: q.page_size]], len(rows) > q.page_size

    def _group_json(self, row: asyncpg.Record, nodes: list[dict[str, Any]]) -> dict[str, Any]:
        if row["name"] == "kubernetes":
            cpu = sum(n["cpu"] for n in nodes)
            memory_gib = sum(n["memory_bytes"] for n in nodes) // 1024 ** 3
            gpus = sum(n["gpus"] for n in nodes)
            products = sorted({n["labels"].get(PRODUCT_LABEL, "") for n in nodes if n["gpus"]} - {""})
            kind = f"{len(nodes)} node(s)"
        else:
            cpu, memory_gib, gpus, products, kind = os.cpu_count() or 1, _meminfo_gib(), 0, [], "this host"
        return {
            "id": row["id"], "name": row["name"], "instance_group_name": row["name"], "instance_type": kind,
            "cpu_count": int(cpu), "memory_in_gib": int(memory_gib), "gpu_count": str(gpus), "gpumemory_in_gib": "0",
            "gpu_model": ", ".join(products), "gpu_type": GPU_RESOURCE if gpus else "",
            "allow_jobs": row["allow_jobs"], "allow_sessions": row["allow_sessions"], "allow_models": row["allow_models"],
            "allow_applications": row["allow_applications"], "autoscale_min": 0, "autoscale_max": 0,
            "rg_updated_at": row["updated_at"].isoformat(),
        }

    async def update_group(self, actor_id: int, fields: dict[str, Any]) -> dict[str, Any]:
        group_id = fields.get("id")
        if not isinstance(group_id, int) or group_id <= 0:
            raise InvalidArgument("id is required: the resource group to change (see GET /api/v2/resourcegroups)")
        changes = {k: fields[k] for k in ALLOW_COLUMNS.values() if isinstance(fields.get(k), bool)}
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow("SELECT * FROM resource_groups WHERE id = $1 FOR UPDATE", group_id)
            if row is None or row["name"] not in self.engines:
                raise NotFound(f"there is no resource group {group_id}")
            merged = {k: changes.get(k, row[k]) for k in ALLOW_COLUMNS.values()}
            row = await conn.fetchrow(
                "UPDATE resource_groups SET allow_jobs = $2, allow_sessions = $3, allow_models = $4,"
                " allow_applications = $5, updated_at = now() WHERE id = $1 RETURNING *", group_id,
                merged["allow_jobs"], merged["allow_sessions"], merged["allow_models"], merged["allow_applications"])
            await audit.record(conn, actor_id, "resource_group.update", "resource_group", str(group_id), changes)
        return self._group_json(row, await self._nodes() if row["name"] == "kubernetes" else [])

    async def check_group(self, engine: str, kind: str) -> None:
        column = ALLOW_COLUMNS.get(kind)
        if column is None:
            return
        allowed = await self.pool.fetchval(f"SELECT {column} FROM resource_groups WHERE name = $1", engine)
        if allowed is False:
            raise FailedPrecondition(f"the {engine} resource group does not take {KIND_WORDS[kind]}: a site administrator "
                                     f"closed it to them (Site admin → Resources)")

    # Accelerators -----------------------------------------------------------------------------

    async def sync(self) -> None:
        """The accelerators the cluster's nodes offer now (available), and the rest not."""
        if "kubernetes" not in self.engines:
            return
        found: dict[tuple[str, str], int] = {}
        for node in await self._nodes():
            if node["gpus"] <= 0:
                continue
            key = (PRODUCT_LABEL, node["labels"][PRODUCT_LABEL]) if PRODUCT_LABEL in node["labels"] else (PRESENT_LABEL, "true")
            found[key] = found.get(key, 0) + node["gpus"]
        group = await self.pool.fetchval("SELECT id FROM resource_groups WHERE name = 'kubernetes'")
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("UPDATE accelerator_labels SET available = false WHERE gpu_count IS NULL")
            for (key, value), count in found.items():
                await conn.execute(
                    "INSERT INTO accelerator_labels (label_key, label_value, resource_group_id, available, max_gpu_count)"
                    " VALUES ($1, $2, $3, true, $4) ON CONFLICT (label_key, label_value) WHERE gpu_count IS NULL"
                    " DO UPDATE SET available = true, max_gpu_count = excluded.max_gpu_count,"
                    " resource_group_id = excluded.resource_group_id, updated_at = now()", key, value, group, count)

    async def labels(self, q: ListQuery, display_all: bool) -> tuple[list[dict[str, Any]], bool]:
        await self.seed_groups()
        await self.sync()
        args: list[Any] = []
        where, order = sql_where_and_order(q, LABEL_FILTERS, LABEL_SORT, "id ASC", args)
        shown = "true" if display_all else "(available OR gpu_count IS NOT NULL)"
        args += [q.page_size + 1, q.offset]
        rows = await self.pool.fetch(
            "SELECT a.*, (SELECT coalesce(sum(w.nvidia_gpu), 0) FROM workloads w WHERE w.accelerator_label_id = a.id"
            f" AND w.finished_at IS NULL) AS held FROM accelerator_labels a WHERE {where} AND {shown}"
            f" ORDER BY {order} LIMIT ${len(args) - 1} OFFSET ${len(args)}", *args)
        return [label_json(r) for r in rows[: q.page_size]], len(rows) > q.page_size

    async def set_per_label(self, actor_id: int, column: str, values: dict[str, Any]) -> int:
        """UpdateAcceleratorLabelsAdminConfig / ...DefaultQuota: {accelerator id: value}; "" (and, for
        the per-workload limit, 0) removes it."""
        if not isinstance(values, dict) or not values:
            raise InvalidArgument("give a map of accelerator id to a number")
        assert column in ("max_gpu_per_workload", "default_quota")
        rows = 0
        async with self.pool.acquire() as conn, conn.transaction():
            for raw_id, raw in values.items():
                label_id = number(raw_id, "accelerator id")
                value = number(raw, column, allow_empty=True)
                if column == "max_gpu_per_workload" and value == 0:
                    value = None  # 0 GPUs per workload would make the accelerator useless: it means no limit
                done = await conn.execute(f"UPDATE accelerator_labels SET {column} = $2, updated_at = now() WHERE id = $1",
                                          label_id, value)
                if done == "UPDATE 0":
                    raise NotFound(f"there is no accelerator {raw_id}")
                rows += 1
            await audit.record(conn, actor_id, f"accelerator.{column}", "accelerator", ",".join(map(str, values)),
                               {str(k): v for k, v in values.items()})
        return rows

    async def _group_id(self, raw: Any) -> int:
        group_id = number(raw, "resource_group_id")
        if not await self.pool.fetchval("SELECT 1 FROM resource_groups WHERE id = $1", group_id):
            raise NotFound(f"there is no resource group {raw}")
        return int(group_id)

    async def create_profile(self, actor_id: int, raw_group: Any, fields: dict[str, Any]) -> dict[str, Any]:
        group_id = await self._group_id(raw_group)
        gpus, cpu, memory = self._profile(fields)
        try:
            row = await self.pool.fetchrow(
                "INSERT INTO accelerator_labels (resource_group_id, gpu_count, cpu, memory, available) VALUES ($1, $2, $3, $4, true)"
                " RETURNING *", group_id, gpus, cpu, memory)
        except asyncpg.UniqueViolationError:
            raise InvalidArgument(f"resource group {group_id} already has a profile with {gpus} GPU(s)") from None
        await audit.record(self.pool, actor_id, "gpu_profile.create", "gpu_profile", str(row["id"]),
                           {"gpus": gpus, "cpu": cpu, "memory": memory})
        return label_json(row)

    @staticmethod
    def _profile(fields: dict[str, Any]) -> tuple[int, float, float]:
        gpus = number(fields.get("gpu_count"), "gpu_count")
        cpu = number(fields.get("cpu"), "cpu", whole=False)
        memory = number(fields.get("memory"), "memory", whole=False)
        if not gpus or not cpu or not memory:
            raise InvalidArgument("a GPU profile needs gpu_count, cpu (vCPU) and memory (GB), each more than 0")
        return int(gpus), float(cpu), float(memory)

    async def update_profile(self, actor_id: int, raw_group: Any, fields: dict[str, Any]) -> int:
        group_id = await self._group_id(raw_group)
        profile_id = number(fields.get("id"), "id")
        gpus, cpu, memory = self._profile(fields)
        try:
            done = await self.pool.execute(
                "UPDATE accelerator_labels SET gpu_count = $3, cpu = $4, memory = $5, updated_at = now()"
                " WHERE id = $1 AND resource_group_id = $2 AND gpu_count IS NOT NULL", profile_id, group_id, gpus, cpu, memory)
        except asyncpg.UniqueViolationError:
            raise InvalidArgument(f"resource group {group_id} already has a profile with {gpus} GPU(s)") from None
        if done == "UPDATE 0":
            raise NotFound(f"resource group {group_id} has no GPU profile {fields.get('id')}")
        await audit.record(self.pool, actor_id, "gpu_profile.update", "gpu_profile", str(profile_id),
                           {"gpus": gpus, "cpu": cpu, "memory": memory})
        return 1

    async def delete_profile(self, actor_id: int, raw_group: Any, raw_id: Any) -> int:
        group_id = await self._group_id(raw_group)
        profile_id = number(raw_id, "id")
        done = await self.pool.execute(
            "DELETE FROM accelerator_labels WHERE id = $1 AND resource_group_id = $2 AND gpu_count IS NOT NULL",
            profile_id, group_id)
        if done == "DELETE 0":
            raise NotFound(f"resource group {group_id} has no GPU profile {raw_id}")
        await audit.record(self.pool, actor_id, "gpu_profile.delete", "gpu_profile", str(profile_id))
        return 1

    # Quotas ---------------------------------------------------------------------------------

    async def quotas(self, teams: bool) -> list[dict[str, Any]]:
        """AcceleratorBasedUserQuota / ...TeamQuota: the accounts' own accelerator quotas."""
        rows = await self.pool.fetch(
            "SELECT q.*, a.label_key, a.label_value FROM accelerator_quotas q JOIN users u ON u.id = q.account_id"
            " JOIN accelerator_labels a ON a.id = q.accelerator_id WHERE u.is_team = $1 ORDER BY q.account_id, q.accelerator_id",
            teams)
        who = "team_id" if teams else "user_id"
        return [{who: str(r["account_id"]), "accelerator_id": str(r["accelerator_id"]), "gpu_quota": str(r["gpu_quota"]),
                 "accelerator_key": r["label_key"], "accelerator_value": r["label_value"]} for r in rows]

    async def set_quotas(self, actor_id: int, teams: bool, entries: Any) -> int:
        if not isinstance(entries, list) or not entries:
            raise InvalidArgument("give a list of quotas: account id, accelerator_id and gpu_quota (empty to remove)")
        who = "team_id" if teams else "user_id"
        rows = 0
        async with self.pool.acquire() as conn, conn.transaction():
            for entry in entries:
                if not isinstance(entry, dict):
                    raise InvalidArgument(f"each quota is an object with {who}, accelerator_id and gpu_quota")
                account = number(entry.get(who), who)
                label = number(entry.get("accelerator_id"), "accelerator_id")
                gpus = number(entry.get("gpu_quota"), "gpu_quota", allow_empty=True)
                is_team = await conn.fetchval("SELECT is_team FROM users WHERE id = $1", account)
                if is_team is None or is_team != teams:
                    raise NotFound(f"there is no {'team' if teams else 'user'} {entry.get(who)}")
                if not await conn.fetchval("SELECT 1 FROM accelerator_labels WHERE id = $1", label):
                    raise NotFound(f"there is no accelerator {entry.get('accelerator_id')}")
                if gpus is None:
                    await conn.execute("DELETE FROM accelerator_quotas WHERE account_id = $1 AND accelerator_id = $2", account, label)
                else:
                    await conn.execute(
                        "INSERT INTO accelerator_quotas (account_id, accelerator_id, gpu_quota) VALUES ($1, $2, $3)"
                        " ON CONFLICT (account_id, accelerator_id) DO UPDATE SET gpu_quota = excluded.gpu_quota",
                        account, label, gpus)
                rows += 1
            await audit.record(conn, actor_id, "accelerator_quota.set", "team" if teams else "user",
                               ",".join(str(e.get(who)) for e in entries), {"quotas": entries})
        return rows

    async def accounts(self, teams: bool, only: str = "") -> list[dict[str, Any]]:
        """UserAcceleratorQuota / TeamAcceleratorQuota: each account and accelerator, what is
        configured (its own, else the accelerator's default) and what it holds now."""
        rows = await self.pool.fetch(
            "SELECT u.id AS account_id, u.username, a.id AS accelerator_id, coalesce(q.gpu_quota, a.default_quota) AS quota,"
            " (SELECT coalesce(sum(w.nvidia_gpu), 0) FROM workloads w JOIN projects p ON p.id = w.project_id"
            "   WHERE w.accelerator_label_id = a.id AND w.finished_at IS NULL"
            "   AND (CASE WHEN u.is_team THEN p.owner_id ELSE w.creator_id END) = u.id) AS held"
            " FROM users u CROSS JOIN accelerator_labels a"
            " LEFT JOIN accelerator_quotas q ON q.account_id = u.id AND q.accelerator_id = a.id"
            " WHERE u.is_team = $1 AND u.is_active AND a.gpu_count IS NULL AND ($2 = '' OR u.username = $2)"
            " ORDER BY u.username, a.id", teams, only)
        who, name = ("team_id", "team_name") if teams else ("user_id", "username")
        return [{who: str(r["account_id"]), name: r["username"], "accelerator_id": str(r["accelerator_id"]),
                 "quota_configured": {"cpu": "", "memory": "", "nvidia_gpu": "" if r["quota"] is None else str(r["quota"])},
                 "quota_usage": {"cpu": "", "memory": "", "nvidia_gpu": str(r["held"])}} for r in rows]

    async def check_launch(self, user: User, project_id: int, accelerator_id: int | None, gpus: int) -> dict[str, str]:
        """Before a start: the node selector of the accelerator asked for, once its limits and the
        user's (and the project's team's) quotas allow `gpus` more."""
        if accelerator_id is None:
            return {}
        await self.sync()
        label = await self.pool.fetchrow("SELECT * FROM accelerator_labels WHERE id = $1 AND gpu_count IS NULL", accelerator_id)
        if label is None:
            raise InvalidArgument(f"there is no accelerator {accelerator_id}: see GET /api/v2/nodelabels")
        words = f"{label['label_value']} GPUs"
        if not label["available"]:
            raise FailedPrecondition(f"no node offers {words} now")
        if gpus <= 0:
            raise InvalidArgument(f"an accelerator needs GPUs: set nvidia_gpu to 1 or more {words}")
        if label["max_gpu_per_workload"] is not None and gpus > label["max_gpu_per_workload"]:
            raise InvalidArgument(f"one workload may take at most {label['max_gpu_per_workload']} {words}")
        owner = await self.pool.fetchrow("SELECT ow.id, ow.username, ow.is_team FROM projects p"
                                         " JOIN users ow ON ow.id = p.owner_id WHERE p.id = $1", project_id)
        accounts = [(user.id, user.username, False)] + ([(owner["id"], owner["username"], True)] if owner and owner["is_team"] else [])
        for account_id, name, team in accounts:
            quota = await self.pool.fetchval(
                "SELECT coalesce((SELECT gpu_quota FROM accelerator_quotas WHERE account_id = $1 AND accelerator_id = $2),"
                " (SELECT default_quota FROM accelerator_labels WHERE id = $2))", account_id, accelerator_id)
            if quota is None:
                continue
            held = await self.pool.fetchval(
                "SELECT coalesce(sum(w.nvidia_gpu), 0) FROM workloads w JOIN projects p ON p.id = w.project_id"
                " WHERE w.accelerator_label_id = $1 AND w.finished_at IS NULL"
                f" AND {'p.owner_id' if team else 'w.creator_id'} = $2", accelerator_id, account_id)
            if held + gpus > quota:
                whose = f"team {name}'s" if team else f"{name}'s"
                raise QuotaExceeded(f"this needs {gpus} {words}, and {whose} quota of {quota} {words} has {quota - held} left "
                                    f"({held} held by running workloads). Stop something first, or ask a site admin for more.")
        return {label["label_key"]: label["label_value"]}
