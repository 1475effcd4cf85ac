"""The build queue, in Postgres: builds survive restarts and crashes, and several appliance
processes may share the work.

A build is enqueued as `queued`. A worker claims the oldest one with SELECT … FOR UPDATE SKIP
LOCKED, moving it to `pending` with a lease (lease_owner, lease_expires_at) that it renews every
LEASE_SECONDS / 3 while it builds; at most build_concurrency run at once per process. A lease
that runs out (the process died) makes the build claimable again. The build ends `built`,
`build failed` (with the reason; `cancelled` when asked to stop), or `timedout` past
build_timeout_seconds. A failure of the infrastructure (the git server, the registry or the
engine not answering) is retried up to MAX_ATTEMPTS times; a failure of the build itself never.

Each build's log (progress lines: which step, bytes sent) is a LogStore file named by the
build's id, streamed like a workload's.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
import asyncpg

from cml_appliance.builds.image import BuildFailed, BuildSpec, BuiltImage, ImageBuilder
from cml_appliance.core.tasks import Supervisor
from cml_appliance.workloads.logs import LogStore

log = logging.getLogger(__name__)

ACTIVE = ("queued", "pending", "pushing")
RUNNING = ("pending", "pushing")
LEASE_SECONDS = 30.0
MAX_ATTEMPTS = 3
IDLE_POLL_SECONDS = 5.0  # also notices leases that ran out in other processes


class LeaseLost(Exception):
    """Another worker holds the build now (this one was too slow to renew its lease)."""


class BuildQueue:
    def __init__(self, pool: asyncpg.Pool, builder: ImageBuilder, logs: LogStore, supervisor: Supervisor, *,
                 concurrency: int, timeout_seconds: float, spec_for: Callable[[asyncpg.Record], Awaitable[BuildSpec]],
                 release: Callable[[asyncpg.Record], Awaitable[None]],
                 finished: Callable[[str, str], Awaitable[None]], lease_seconds: float = LEASE_SECONDS):
        self.pool = pool
        self.builder = builder
        self.logs = logs
        self.supervisor = supervisor
        self.concurrency = concurrency
        self.timeout_seconds = timeout_seconds
        self.lease_seconds = lease_seconds
        self.spec_for = spec_for  # a build row -> what the builder needs (with a fetch key of its own)
        self.release = release  # after an attempt: revoke that key
        self.finished = finished  # (build public id, final status): deploy, tell the UI
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.wake = asyncio.Event()
        self._running: dict[str, asyncio.Task[None]] = {}

    # --- what the API and the UI ask -----------------------------------------------------------

    def say(self, build_id: str, line: str) -> None:
        stamp = datetime.now(UTC).strftime("%H:%M:%S.%f")[:-3]  # steps take milliseconds: show them
        self.logs.append(build_id, f"{stamp} {line}\n".encode())

    async def enqueue(self, build_id: str) -> None:
        await self.pool.execute("UPDATE model_builds SET status = 'queued', updated_at = now() WHERE public_id = $1", build_id)
        self.say(build_id, "Queued")
        self.wake.set()

    async def cancel(self, build_id: str) -> bool:
        """Stop a build: a queued one ends at once, a running one as soon as its worker hears.
        False when it had already ended."""
        row = await self.pool.fetchrow(
            "UPDATE model_builds SET cancel_requested = true, updated_at = now()"
            " WHERE public_id = $1 AND status = ANY($2::text[]) RETURNING status", build_id, list(ACTIVE))
        if row is None:
            return False
        ended = await self.pool.fetchval(
            "UPDATE model_builds SET status = 'build failed', failure = 'cancelled', finished_at = now(), updated_at = now()"
            " WHERE public_id = $1 AND status = 'queued' RETURNING 1", build_id)
        if ended:
            self.say(build_id, "Cancelled before it started")
            self.logs.close(build_id)
            await self.finished(build_id, "build failed")
        task = self._running.get(build_id)
        if task is not None:
            task.cancel()
        return True

    # --- the workers ---------------------------------------------------------------------------

    async def tick(self) -> float:
        """Claim builds while there is room (the supervisor calls this again when `wake` is set
        by an enqueue or a build's end, and every IDLE_POLL_SECONDS, to notice leases that ran
        out in other processes)."""
        while len(self._running) < self.concurrency:
            row = await self.claim()
            if row is None:
                break
            build_id = row["public_id"]
            self._running[build_id] = asyncio.ensure_future(self._attempt(row))
            self._running[build_id].add_done_callback(lambda _t, b=build_id: self._done(b))
        return IDLE_POLL_SECONDS

    def _done(self, build_id: str) -> None:
        self._running.pop(build_id, None)
        self.wake.set()  # room for the next one

    async def claim(self) -> asyncpg.Record | None:
        return await self.pool.fetchrow(
            "UPDATE model_builds b SET status = 'pending', lease_owner = $1,"
            " lease_expires_at = now() + make_interval(secs => $2), attempts = b.attempts + 1,"
            " started_at = COALESCE(b.started_at, now()), updated_at = now()"
            " WHERE b.id = (SELECT id FROM model_builds"
            "   WHERE NOT cancel_requested AND (status = 'queued' OR (status = ANY($3::text[]) AND lease_expires_at < now()))"
            "   ORDER BY created_at LIMIT 1 FOR UPDATE SKIP LOCKED)"
            " RETURNING b.*", self.owner, self.lease_seconds, list(RUNNING))

    async def _renew(self, build_id: str) -> None:
        while True:
            await asyncio.sleep(self.lease_seconds / 3)
            row = await self.pool.fetchrow(
                "UPDATE model_builds SET lease_expires_at = now() + make_interval(secs => $3)"
                " WHERE public_id = $1 AND lease_owner = $2 AND status = ANY($4::text[]) RETURNING cancel_requested",
                build_id, self.owner, self.lease_seconds, list(RUNNING))
            if row is None:
                raise LeaseLost(build_id)
            if row["cancel_requested"]:
                raise asyncio.CancelledError

    async def _stage(self, build_id: str, status: str) -> None:
        moved = await self.pool.fetchval(
            "UPDATE model_builds SET status = $3, updated_at = now() WHERE public_id = $1 AND lease_owner = $2"
            " AND status = ANY($4::text[]) RETURNING 1", build_id, self.owner, status, list(RUNNING))
        if not moved:
            raise LeaseLost(build_id)

    async def _attempt(self, row: asyncpg.Record) -> None:
        build_id = row["public_id"]
        attempt = row["attempts"]
        if attempt > 1:
            self.say(build_id, f"Attempt {attempt} of {MAX_ATTEMPTS} (the previous one did not finish)")
        started = time.monotonic()
        elapsed_before = (datetime.now(UTC) - row["started_at"]).total_seconds() if row["started_at"] else 0.0
        remaining = max(1.0, self.timeout_seconds - elapsed_before)
        outcome: tuple[str, str] | None = None
        built: BuiltImage | None = None
        deadline = asyncio.timeout(remaining)
        try:
            spec = await self.spec_for(row)
            try:
                work = asyncio.ensure_future(self.builder.build(
                    spec, lambda line: self.say(build_id, line), lambda status: self._stage(build_id, status)))
                renew = asyncio.ensure_future(self._renew(build_id))
                try:
                    async with deadline:
                        done, _ = await asyncio.wait({work, renew}, return_when=asyncio.FIRST_COMPLETED)
                    if renew in done:
                        renew.result()  # raises LeaseLost or CancelledError (cancel requested)
                    built = work.result()
                finally:
                    for task in (work, renew):
                        task.cancel()
                    await asyncio.gather(work, renew, return_exceptions=True)
            finally:
                await self.release(row)
            outcome = ("built", "")
        except LeaseLost:
            log.warning("build %s: another worker took it over", build_id)
            return
        except TimeoutError as exc:
            if not deadline.expired():  # a timeout inside the build (a client's): the infrastructure's
                outcome = await self._retry_or_fail(build_id, attempt, exc)
                if outcome is None:
                    return
            else:
                outcome = ("timedout", f"the build took longer than {self.timeout_seconds:g} s")
        except asyncio.CancelledError:
            if not await self.pool.fetchval("SELECT cancel_requested FROM model_builds WHERE public_id = $1", build_id):
                raise  # the appliance is stopping: the lease runs out and another start claims it again
            outcome = ("build failed", "cancelled")
        except BuildFailed as exc:
            outcome = ("build failed", str(exc))
        except Exception as exc:  # the infrastructure's: try again, up to MAX_ATTEMPTS
            outcome = await self._retry_or_fail(build_id, attempt, exc)
            if outcome is None:
                return
        status, reason = outcome
        self.say(build_id, {"built": f"Done in {time.monotonic() - started:.1f} s", "timedout": f"Timed out: {reason}"}.get(
            status, f"Failed: {reason}"))
        ended = await self.pool.fetchval(
            "UPDATE model_builds SET status = $3, failure = $4, built_image = $5, image_digest = $6,"
            " built_at = CASE WHEN $3 = 'built' THEN now() END, finished_at = now(), lease_owner = NULL,"
            " lease_expires_at = NULL, updated_at = now() WHERE public_id = $1 AND lease_owner = $2 RETURNING 1",
            build_id, self.owner, status, reason, built.reference if built else "", built.digest if built else "")
        self.logs.close(build_id)
        if ended:
            await self.finished(build_id, status)

    async def _retry_or_fail(self, build_id: str, attempt: int, exc: BaseException) -> tuple[str, str] | None:
        """Queue the build again (None), or, after MAX_ATTEMPTS, the failure to record."""
        reason = f"{type(exc).__name__}: {exc}"[:2000]
        log.warning("build %s, attempt %d: %s", build_id, attempt, reason)
        if attempt >= MAX_ATTEMPTS:
            return "build failed", f"gave up after {attempt} attempts: {reason}"
        self.say(build_id, f"Attempt {attempt} failed ({reason}); trying again")
        await self.pool.execute(
            "UPDATE model_builds SET status = 'queued', lease_owner = NULL, lease_expires_at = NULL, updated_at = now()"
            " WHERE public_id = $1 AND lease_owner = $2", build_id, self.owner)
        return None

    async def close(self) -> None:
        """At shutdown: running builds stop where they are; their leases run out, and the next
        start (this process's or another's) claims them again."""
        for task in list(self._running.values()):
            task.cancel()
        await asyncio.gather(*self._running.values(), return_exceptions=True)

    def running(self) -> list[str]:
        return list(self._running)

