"""Audit events: one row per change, tagged with the request that made it."""

from __future__ import annotations

from typing import Any

import asyncpg

from cml_appliance.core.logs import request_id_var


async def record(
    conn: asyncpg.Connection | asyncpg.Pool,
    user_id: int | None,
    action: str,
    target_type: str,
    target_id: str,
    details: dict[str, Any] | None = None,
) -> None:
    await conn.execute(
        "INSERT INTO audit_events (user_id, action, target_type, target_id, details, request_id)"
        " VALUES ($1, $2, $3, $4, $5, $6)",
        user_id,
        action,
        target_type,
        target_id,
        details or {},
        request_id_var.get(),
    )
