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
        self._dsn = ""
        self._reconnecting: asyncio.Task[None] | None = None
        self._stopped = False

    async def start(self, dsn: str) -> None:
        self._dsn = dsn
        await self._listen()

    async def _listen(self) -> None:
        # A connection of its own: a LISTEN must not go back to a pool.
        conn = await asyncpg.connect(self._dsn)
        await conn.add_listener(CHANNEL, self._notified)
        conn.add_termination_listener(self._lost)
        self._conn = conn

    def _lost(self, conn: Any) -> None:
        """The database went away (a restart, a stop): listen again once it is back. Whatever
        changed meanwhile is not replayed; subscribers are told with a 'resync' event, and pages
        re-render on it."""
        if self._stopped or (self._reconnecting is not None and not self._reconnecting.done()):
            return
        log.warning("lost the database's notifications; reconnecting")
        self._reconnecting = asyncio.get_running_loop().create_task(self._reconnect())

    async def _reconnect(self) -> None:
        delay = 0.2
        while not self._stopped:
            try:
                await self._listen()
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.debug("still no database for notifications: %s", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            log.info("listening to the database's notifications again")
            self._notified(None, 0, CHANNEL, json.dumps({"resync": True}))
            return

    async def stop(self) -> None:
        self._stopped = True
        if self._reconnecting is not None:
            self._reconnecting.cancel()
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
