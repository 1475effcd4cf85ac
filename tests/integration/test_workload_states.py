"""The one state machine, the NOTIFY on every change, and the capped durable logs."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg

from cml_appliance.auth import api_keys
from cml_appliance.web.keys import POOL
from cml_appliance.workloads import states, store
from cml_appliance.workloads.events import StatusHub
from cml_appliance.workloads.logs import LogStore
from tests.conftest import Api


async def _row(api: Api) -> store.Workload:
    pool = api.client.app[POOL]
    _, project = await api.post("/api/v2/projects", json={"name": "states"})
    ids = await pool.fetchrow(
        "SELECT p.id AS project_id, p.owner_id FROM projects p WHERE p.public_id = $1", project["id"]
    )
    return await store.insert(pool, {
        "public_id": "teststatesmachin", "kind": "job_run", "project_id": ids["project_id"],
        "creator_id": ids["owner_id"], "engine": "local", "runtime_identifier": "host/python3", "cpu": 1, "memory": 1,
    })


def test_transition_table_is_consistent() -> None:
    assert set(states.TRANSITIONS) == set(states.ACTIVE) | set(states.FINISHED)
    for final in states.FINISHED:
        assert states.TRANSITIONS[final] == frozenset()
    assert states.allowed(states.RUNNING, states.SUCCEEDED)
    assert not states.allowed(states.SUCCEEDED, states.RUNNING)
    # A pod can finish before the watcher ever saw it start (a short job on Kubernetes).
    assert states.allowed(states.SCHEDULING, states.SUCCEEDED)
    assert not states.allowed(states.RUNNING, states.STARTING)
    assert not states.allowed(states.STOPPING, states.RUNNING)


async def test_illegal_transitions_are_refused_and_change_nothing(alice: Api) -> None:
    pool = alice.client.app[POOL]
    row = await _row(alice)
    assert row.status == states.SCHEDULING
    assert await store.transition(pool, row.id, states.SCHEDULING) is None  # not a move
    started = await store.transition(pool, row.id, states.STARTING)
    assert started is not None and started.starting_at is not None
    running = await store.transition(pool, row.id, states.RUNNING)
    assert running is not None and running.running_at is not None
    assert await store.transition(pool, row.id, states.STARTING) is None  # never backwards
    _, key = api_keys.workload_key(row.creator_id, row.project_id, "states")
    await pool.execute("INSERT INTO api_keys (key_id, user_id, key_digest, comments, audiences, scope_project_id)"
                       " VALUES ($1, $2, $3, $4, $5, $6)", *key.values())
    # A move that is refused revokes nothing; the one that ends the workload revokes its key.
    assert await store.transition(pool, row.id, states.SCHEDULING, revoke_key=key["key_id"]) is None
    assert await pool.fetchval("SELECT count(*) FROM api_keys WHERE key_id = $1", key["key_id"]) == 1
    done = await store.transition(pool, row.id, states.SUCCEEDED, exit_code=0, revoke_key=key["key_id"])
    assert done is not None and done.finished_at is not None and done.exit_code == 0
    assert await pool.fetchval("SELECT count(*) FROM api_keys WHERE key_id = $1", key["key_id"]) == 0
    assert await pool.fetchval("SELECT followup_due FROM workloads WHERE id = $1", row.id)  # a job run's end is followed up
    for target in (states.RUNNING, states.FAILED, states.STOPPING, states.SCHEDULING):
        assert await store.transition(pool, row.id, target) is None
    again = await store.get_by_id(pool, row.id)
    assert again is not None and again.status == states.SUCCEEDED and again.finished_at == done.finished_at


async def test_every_status_change_is_notified(alice: Api, clean_db: str) -> None:
    hub = StatusHub()
    await hub.start(clean_db)
    try:
        async with hub.subscribe() as queue:
            row = await _row(alice)
            await store.transition(alice.client.app[POOL], row.id, states.STARTING)
            await store.transition(alice.client.app[POOL], row.id, states.FAILED, reason="boom")
            seen = []
            async with asyncio.timeout(5):
                while len(seen) < 3:
                    seen.append(await queue.get())
    finally:
        await hub.stop()
    assert [e["status"] for e in seen] == [states.SCHEDULING, states.STARTING, states.FAILED]
    assert seen[-1]["reason"] == "boom" and seen[-1]["id"] == row.public_id


def test_logs_are_capped_with_a_notice(tmp_path: Path) -> None:
    logs = LogStore(tmp_path, cap_bytes=1024 * 1024)
    logs.append("w1", b"a" * (1024 * 1024 - 10))
    logs.append("w1", b"b" * 100)
    logs.append("w1", b"c" * 100)
    data = logs.read("w1", 0, 2 * 1024 * 1024)
    assert data[: 1024 * 1024] == b"a" * (1024 * 1024 - 10) + b"b" * 10  # the rest dropped
    assert data.endswith(b"[cml-appliance: the log reached its cap of 1 MB; later output was dropped]\n")
    assert logs.read("w1", 1024 * 1024 - 10, 10) == b"b" * 10


async def test_followers_get_new_output_and_stop_when_closed(tmp_path: Path) -> None:
    logs = LogStore(tmp_path, cap_bytes=1024)
    logs.append("w2", b"hello ")
    got: list[bytes] = []

    async def follow() -> None:
        async for _, chunk in logs.follow("w2", 0, poll=0.05):
            got.append(chunk)

    task = asyncio.create_task(follow())
    await asyncio.sleep(0.1)
    logs.append("w2", b"world")
    await asyncio.sleep(0.1)
    logs.close("w2")
    await asyncio.wait_for(task, 2)
    assert b"".join(got) == b"hello world"


async def test_reconciliation_is_single_across_processes(alice: Api, clean_db: str) -> None:
    from cml_appliance.web.keys import WORKLOADS
    from cml_appliance.workloads.service import RECONCILE_LOCK_BASE

    pool = alice.client.app[POOL]
    row = await _row(alice)
    await store.transition(pool, row.id, states.STARTING)
    await store.transition(pool, row.id, states.RUNNING, handle="1:1:teststatesmachin")
    import zlib

    lock = RECONCILE_LOCK_BASE + zlib.crc32(b"local") % 1000
    other = await asyncpg.connect(clean_db)  # another appliance process, reconciling right now
    try:
        await other.execute("SELECT pg_advisory_lock($1)", lock)
        counts = await alice.client.app[WORKLOADS].reconcile("local")
        assert counts == {"failed": 0, "orphans_stopped": 0, "adopted": 0}
        assert (await store.get_by_id(pool, row.id)).status == states.RUNNING  # type: ignore[union-attr]
    finally:
        await other.close()
    counts = await alice.client.app[WORKLOADS].reconcile("local")
    assert counts["failed"] == 1
    gone = await store.get_by_id(pool, row.id)
    assert gone is not None and gone.status == states.FAILED and "is gone" in gone.reason
