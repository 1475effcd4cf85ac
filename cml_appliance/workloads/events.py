"""Live status: one LISTEN connection per process fans Postgres NOTIFY out to subscribers.

The trigger in migration 0002 notifies channel cml_workloads on every status change, whichever
appliance process made it, so every browser sees every change.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg

log = logging.getLogger(__name__)
CHANNEL = "cml_workloads"


class StatusHub:
    def __init__(self) -> None:
        self._subscribers: set[asyncio.Queue[dict[str, Any]]] = set()
        self._conn: asyncpg.Connection | None = None

    async def start(self, dsn: str) -> None:
        # A connection of its own: a LISTEN must not go back to a pool.
        self._conn = await asyncpg.connect(dsn)
        await self._conn.add_listener(CHANNEL, self._notified)

    async def stop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            await conn.close()

    def _notified(self, conn: Any, pid: int, channel: str, payload: str) -> None:
        try:
            event = json.loads(payload)
        except json.JSONDecodeError:
            log.warning("ignoring a malformed notification: %r", payload[:200])
            return
        for queue in list(self._subscribers):
            if queue.qsize() < 1000:  # a stuck subscriber loses events rather than memory
                queue.put_nowait(event)

    @asynccontextmanager
    async def subscribe(self) -> AsyncIterator[asyncio.Queue[dict[str, Any]]]:
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._subscribers.add(queue)
        try:
            yield queue
        finally:
            self._subscribers.discard(queue)
