"""Supervised background work: no fire-and-forget tasks.

The supervisor keeps a reference to every task, logs failures, restarts loops with capped
backoff and cancels everything on shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

log = logging.getLogger(__name__)


class Supervisor:
    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loops: set[asyncio.Task[Any]] = set()
        self._closing = False

    def spawn(self, name: str, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run a one-off job; its failure is logged, not lost."""
        if self._closing:
            coro.close()
            raise RuntimeError("the supervisor is shutting down")
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def loop(self, name: str, body: Callable[[], Awaitable[object]], interval: float, max_backoff: float = 60.0,
             wake: asyncio.Event | None = None) -> None:
        """Call body every `interval` seconds; after a failure wait longer, up to max_backoff.

        A body that returns a number of seconds is called again after that long instead, if sooner.
        Setting `wake` calls it again at once (work arrived that should not wait for the interval).
        """

        async def run() -> None:
            delay = interval
            me = asyncio.current_task()
            while True:
                if wake is not None:
                    wake.clear()  # what arrives from here on is for this call or the next
                failed = False
                try:
                    sooner = await body()
                    delay = interval
                    if isinstance(sooner, float):
                        delay = max(0.0, min(interval, sooner))
                except asyncio.CancelledError:
                    raise
                except Exception:
                    failed = True
                    delay = min(max(delay * 2, 1.0), max_backoff)
                    log.exception("background loop %s failed; retrying in %.0f s", name, delay)
                # A library may swallow a cancellation (asyncpg can, on a closed pool): honour it here.
                if me is not None and me.cancelling():
                    raise asyncio.CancelledError
                if wake is None or failed:  # after a failure the backoff holds
                    await asyncio.sleep(delay)
                else:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(wake.wait(), delay)

        self._loops.add(self.spawn(name, run()))

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        self._loops.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task %s failed", task.get_name(), exc_info=task.exception())

    async def wait_idle(self) -> None:
        """Wait for the current one-off tasks, not the loops (used by tests)."""
        while one_off := self._tasks - self._loops:
            await asyncio.wait(one_off)

    async def close(self) -> None:
        self._closing = True
        pending = set(self._tasks)
        while pending:
            for task in pending:
                task.cancel()
            # Cancel again any task that swallowed the first request instead of ending.
            _, pending = await asyncio.wait(pending, timeout=1)


async def until_first_done(*coros: Coroutine[Any, Any, Any]) -> None:
    """Run coroutines together until one ends, then cancel the rest (relays: either side closing ends both)."""
    tasks = [asyncio.create_task(c) for c in coros]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, ConnectionResetError):
                await task
