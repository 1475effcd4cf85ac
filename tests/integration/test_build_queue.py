"""The build queue's contract, on a real Postgres, with builders whose behaviour the test sets
(slow, failing, crashing) so that each rule can be seen: claims never overlap, concurrency is
bounded, a lease that runs out is claimed again, infrastructure failures are retried and a
build's own failure is not, time limits and cancellation end builds with CML's statuses.
The real builder is tested end to end in test_builds.py."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from cml_appliance.auth import users
from cml_appliance.builds.image import BuildFailed, BuildSpec, BuiltImage
from cml_appliance.builds.queue import BuildQueue
from cml_appliance.core.tasks import Supervisor
from cml_appliance.db.pool import create_pool
from cml_appliance.workloads.logs import LogStore


class Builder:
    """Builds as the test says: `plan[build_id]` is a list of behaviours, one per attempt."""

    def __init__(self, plan: dict[str, list[str]]):
        self.plan = plan
        self.running: set[str] = set()
        self.most_at_once = 0
        self.attempts: dict[str, int] = {}
        self.release = asyncio.Event()

    async def build(self, spec: BuildSpec, say: Any, stage: Any) -> BuiltImage:
        n = self.attempts.get(spec.build_id, 0)
        self.attempts[spec.build_id] = n + 1
        behaviour = self.plan.get(spec.build_id, ["ok"])[min(n, len(self.plan.get(spec.build_id, ["ok"])) - 1)]
        self.running.add(spec.build_id)
        self.most_at_once = max(self.most_at_once, len(self.running))
        try:
            say(f"building ({behaviour})")
            if behaviour == "wait":
                await self.release.wait()
            elif behaviour == "forever":
                await asyncio.Event().wait()
            elif behaviour == "infra":
                raise OSError("the registry did not answer")
            elif behaviour == "own":
                raise BuildFailed("predict.py has no function named 'f'")
            await stage("pushing")
            return BuiltImage(f"o/p/m:{spec.build_id}", "sha256:" + "0" * 64, "sha256:" + "1" * 64, 10)
        finally:
            self.running.discard(spec.build_id)


async def _rows(pool: asyncpg.Pool, n: int) -> list[str]:
    user = await users.create_user(pool, "builder", "b@example.com", "correct horse")
    project = await pool.fetchval("INSERT INTO projects (public_id, name, slug, owner_id, creator_id)"
                                  " VALUES ('p1', 'p', 'p', $1, $1) RETURNING id", user.id)
    model = await pool.fetchval("INSERT INTO models (public_id, project_id, creator_id, name, access_key)"
                                " VALUES ('m1', $1, $2, 'm', 'mkey') RETURNING id", project, user.id)
    ids = [f"b{i}" for i in range(n)]
    for build_id in ids:
        await pool.execute(
            "INSERT INTO model_builds (public_id, model_id, creator_id, file_path, function_name, runtime_identifier, status,"
            " snapshot_commit) VALUES ($1, $2, $3, 'predict.py', 'f', 'host/python3', 'queued', 'abc')", build_id, model, user.id)
    return ids


def _queue(pool: asyncpg.Pool, builder: Builder, logs: LogStore, *, concurrency: int = 2, timeout: float = 30,
           lease: float = 30, finished: list[tuple[str, str]] | None = None) -> BuildQueue:
    async def spec_for(row: Any) -> BuildSpec:
        return BuildSpec(row["public_id"], "m1", "builder", "p", row["snapshot_commit"], row["runtime_identifier"],
                         row["file_path"], row["function_name"], "http://x", "builder", "key")

    async def release(row: Any) -> None:
        return None

    async def done(build_id: str, status: str) -> None:
        if finished is not None:
            finished.append((build_id, status))

    return BuildQueue(pool, builder, logs, Supervisor(), concurrency=concurrency, timeout_seconds=timeout,  # type: ignore[arg-type]
                      spec_for=spec_for, release=release, finished=done, lease_seconds=lease)


async def _settle(pool: asyncpg.Pool, queues: list[BuildQueue], ids: list[str], timeout: float = 20) -> dict[str, asyncpg.Record]:
    """Run the queues' ticks until every build has ended."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        for queue in queues:
            await queue.tick()
        rows = {r["public_id"]: r for r in await pool.fetch("SELECT * FROM model_builds WHERE public_id = ANY($1::text[])", ids)}
        if all(r["status"] not in ("queued", "pending", "pushing") for r in rows.values()):
            return rows
        assert asyncio.get_running_loop().time() < deadline, {k: r["status"] for k, r in rows.items()}
        await asyncio.sleep(0.05)


@pytest.fixture
async def pool(clean_db: str) -> Any:
    p = await create_pool(clean_db, 1, 8)  # the appliance's own (its JSON codecs)
    yield p
    await p.close()


@pytest.fixture
def logs() -> LogStore:
    return LogStore(Path(tempfile.mkdtemp(prefix="cml-build-logs-")), 1024 * 1024)


async def test_two_workers_never_take_the_same_build_and_respect_their_limit(pool: asyncpg.Pool, logs: LogStore) -> None:
    ids = await _rows(pool, 12)
    builder = Builder({})
    finished: list[tuple[str, str]] = []
    queues = [_queue(pool, builder, logs, concurrency=2, finished=finished) for _ in range(2)]
    rows = await _settle(pool, queues, ids)
    assert {r["status"] for r in rows.values()} == {"built"}
    assert all(builder.attempts[i] == 1 for i in ids), builder.attempts  # nobody built one twice
    assert builder.most_at_once <= 4
    assert sorted(finished) == sorted((i, "built") for i in ids)
    assert rows["b0"]["built_image"] == "o/p/m:b0" and rows["b0"]["lease_owner"] is None and rows["b0"]["built_at"]


async def test_infrastructure_failures_are_retried_a_builds_own_failure_is_not(pool: asyncpg.Pool, logs: LogStore) -> None:
    ids = await _rows(pool, 3)
    builder = Builder({"b0": ["infra", "ok"], "b1": ["own"], "b2": ["infra", "infra", "infra", "ok"]})
    rows = await _settle(pool, [_queue(pool, builder, logs)], ids)
    assert (rows["b0"]["status"], rows["b0"]["attempts"]) == ("built", 2)
    assert (rows["b1"]["status"], rows["b1"]["attempts"]) == ("build failed", 1)
    assert rows["b1"]["failure"] == "predict.py has no function named 'f'"
    assert (rows["b2"]["status"], rows["b2"]["attempts"]) == ("build failed", 3)
    assert "gave up after 3 attempts" in rows["b2"]["failure"] and "the registry did not answer" in rows["b2"]["failure"]
    log = logs.read("b0", 0, 10_000).decode()
    assert "Attempt 1 failed (OSError: the registry did not answer); trying again" in log and "Attempt 2 of 3" in log


async def test_a_build_past_its_time_limit_ends_timedout(pool: asyncpg.Pool, logs: LogStore) -> None:
    ids = await _rows(pool, 1)
    rows = await _settle(pool, [_queue(pool, Builder({"b0": ["forever"]}), logs, timeout=1)], ids)
    assert rows["b0"]["status"] == "timedout" and "longer than 1 s" in rows["b0"]["failure"]


async def test_cancelling_a_queued_and_a_running_build(pool: asyncpg.Pool, logs: LogStore) -> None:
    ids = await _rows(pool, 2)
    finished: list[tuple[str, str]] = []
    builder = Builder({"b0": ["forever"]})
    queue = _queue(pool, builder, logs, concurrency=1, finished=finished)
    await queue.tick()  # b0 runs; b1 waits for room
    assert await pool.fetchval("SELECT status FROM model_builds WHERE public_id = 'b1'") == "queued"
    assert await queue.cancel("b1") is True
    assert await pool.fetchval("SELECT status || ':' || failure FROM model_builds WHERE public_id = 'b1'") == "build failed:cancelled"
    assert await queue.cancel("b0") is True
    rows = await _settle(pool, [queue], ids)
    assert (rows["b0"]["status"], rows["b0"]["failure"]) == ("build failed", "cancelled")
    assert await queue.cancel("b0") is False  # it has ended
    assert sorted(finished) == [("b0", "build failed"), ("b1", "build failed")]


async def test_a_lease_that_runs_out_is_claimed_again_and_the_late_worker_stands_down(pool: asyncpg.Pool, logs: LogStore) -> None:
    """A worker that stops renewing (a killed appliance) loses its build to the next claim."""
    ids = await _rows(pool, 1)
    dead = Builder({"b0": ["wait"]})
    first = _queue(pool, dead, logs, lease=0.6)
    await first.tick()
    while not dead.running:
        await asyncio.sleep(0.01)
    # It "dies": its lease is no longer renewed (renewals are a task of the queue; stop them).
    for task in list(first._running.values()):
        task.cancel()
    await asyncio.gather(*first._running.values(), return_exceptions=True)
    assert await pool.fetchval("SELECT status FROM model_builds WHERE public_id = 'b0'") == "pending"
    second = _queue(pool, Builder({}), logs, lease=0.6)
    assert await second.claim() is None  # still leased
    await asyncio.sleep(0.7)
    rows = await _settle(pool, [second], ids)
    assert (rows["b0"]["status"], rows["b0"]["attempts"]) == ("built", 2)
