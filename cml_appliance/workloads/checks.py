"""Checks shared by every kind of workload a user configures: runtime, resources, GPUs, script."""

from __future__ import annotations

import math
from typing import Any

import asyncpg

from cml_appliance.api.listing import ListQuery
from cml_appliance.core.errors import InvalidArgument, NotFound
from cml_appliance.runtimes import catalog

DEFAULT_RUNTIME = "host/python3"
# The least a workload may ask for: below this a memory limit rounds to 0 bytes, which means none.
MIN_CPU = 0.01
MIN_MEMORY_GB = 0.0625


async def check_runtime(pool: asyncpg.Pool, runtime_id: str | None) -> str:
    runtime_id = runtime_id or DEFAULT_RUNTIME
    try:
        runtime = await catalog.get_runtime(pool, runtime_id)
    except NotFound:
        raise InvalidArgument(f"unknown runtime {runtime_id!r}: see GET /api/v2/runtimes") from None
    if runtime["status"] == "DISABLED":
        raise InvalidArgument(f"runtime {runtime_id!r} is disabled by an administrator")
    return runtime_id


def check_no_gpus(count: int) -> None:
    if count:
        raise InvalidArgument("this site has no GPUs: nvidia_gpu must be 0")


def check_script(raw: str | None) -> str:
    script = (raw or "").strip().lstrip("/")
    if not script or ".." in script.split("/"):
        raise InvalidArgument("script must name a file in the project, relative to its root")
    return script


async def resources_within_profiles(pool: asyncpg.Pool, fields: dict[str, Any]) -> tuple[float, float]:
    """cpu and memory asked for (or a profile's), checked against the profile and the site's largest."""
    profiles, _ = await catalog.list_profiles(pool, ListQuery(1000, 0, {}, [], ""))
    if not profiles:
        profiles = [{"id": 0, "cpu": 1.0, "memory": 2.0}]
    chosen = None
    if "resource_profile_id" in fields:
        chosen = next((p for p in profiles if p["id"] == fields["resource_profile_id"]), None)
        if chosen is None:
            raise InvalidArgument(f"there is no resource profile {fields['resource_profile_id']}")
    smallest = min(profiles, key=lambda p: (p["cpu"], p["memory"]))
    cpu = float(fields.get("cpu", (chosen or smallest)["cpu"]))
    memory = float(fields.get("memory", (chosen or smallest)["memory"]))
    if not (math.isfinite(cpu) and math.isfinite(memory)) or cpu < MIN_CPU or memory < MIN_MEMORY_GB:
        raise InvalidArgument(f"cpu must be at least {MIN_CPU:g} vCPU and memory at least {MIN_MEMORY_GB:g} GB")
    if chosen is not None and (cpu > chosen["cpu"] or memory > chosen["memory"]):
        raise InvalidArgument(
            f"{cpu:g} vCPU / {memory:g} GB is more than resource profile {chosen['id']} "
            f"allows ({chosen['cpu']:g} vCPU / {chosen['memory']:g} GB)"
        )
    max_cpu = max(p["cpu"] for p in profiles)
    max_memory = max(p["memory"] for p in profiles)
    if cpu > max_cpu or memory > max_memory:
        raise InvalidArgument(
            f"{cpu:g} vCPU / {memory:g} GB is more than this site allows "
            f"(at most {max_cpu:g} vCPU and {max_memory:g} GB, the largest resource profile)"
        )
    return cpu, memory
