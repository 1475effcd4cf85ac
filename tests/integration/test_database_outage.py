"""Postgres stopped for 10 s and started again under API load (a Postgres of the test's own, never
the machine's): while it is away the API answers only 503 with Retry-After, full service is back
within 5 s of its return, no acknowledged row is lost or doubled, a running session keeps running,
and the live notifications come back."""

from __future__ import annotations

import asyncio
import dataclasses
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient, TestServer

from cml_appliance.app import create_app
from cml_appliance.auth import api_keys, users
from cml_appliance.core.settings import Settings
from cml_appliance.web.keys import POOL, STATUS_HUB
from tests.conftest import Api
from tests.integration.sessions_helpers import wait_status

AWAY_SECONDS = 10
LOAD_CLIENTS = 6


@pytest.fixture
def own_postgres() -> Any:
    import pgserver

    pgdata = Path(tempfile.mkdtemp(prefix="cml-outage-pg-")) / "pg"
    server = pgserver.get_server(pgdata, cleanup_mode="delete")
    try:
        yield server, pgdata
    finally:
        server.cleanup()


def _pg_ctl(server: Any, pgdata: Path, *args: str) -> None:
    from pgserver._commands import pg_ctl

    pg_ctl(list(args), pgdata=pgdata, user=server.system_user)


@pytest.fixture
async def outage_client(own_postgres: Any, data_dir: Path, settings: Settings) -> AsyncIterator[TestClient]:
    server, _ = own_postgres
    dsn = server.get_uri()
    conn = await asyncpg.connect(dsn)
    await conn.execute("CREATE DATABASE outage")
    await conn.close()
    dsn = dsn.replace("/postgres?", "/outage?")
    client = TestClient(TestServer(create_app(dataclasses.replace(settings, database_url=dsn, data_dir=data_dir))))
    await client.start_server()
    try:
        yield client
    finally:
        await client.close()


async def test_postgres_away_for_ten_seconds_under_load(outage_client: TestClient, own_postgres: Any) -> None:
    server, pgdata = own_postgres
    client = outage_client
    pool = client.app[POOL]
    user = await users.create_user(pool, "alice", "alice@example.com", "correct horse")
    alice = Api(client, (await api_keys.create(pool, user))[0], "alice")
    _, project = await alice.post("/api/v2/projects", json={"name": "Before"})
    _, session = await alice.post(f"/api/v2/projects/{project['id']}/sessions", json={"runtime_identifier": "host/python3"})
    await wait_status(alice, project["id"], session["id"], "ENGINE_RUNNING")
    socket_dir = server.get_postmaster_info().socket_dir

    answers: Counter[int] = Counter()
    created: list[str] = []
    missing_retry_after = 0
    stop_load = asyncio.Event()

    async def load(n: int) -> None:
        nonlocal missing_retry_after
        i = 0
        while not stop_load.is_set():
            i += 1
            name = f"load {n}-{i}"
            resp = await client.post("/api/v2/projects", json={"name": name}, headers={"Authorization": f"Bearer {alice.key}"})
            answers[resp.status] += 1
            if resp.status == 200:
                created.append(name)
            elif resp.status == 503 and "Retry-After" not in resp.headers:
                missing_retry_after += 1
            resp = await client.get("/api/v2/projects", headers={"Authorization": f"Bearer {alice.key}"})
            answers[resp.status] += 1
            await asyncio.sleep(0.05)

    workers = [asyncio.ensure_future(load(n)) for n in range(LOAD_CLIENTS)]
    while answers[200] < 20:  # the load runs, and is served, before the database goes
        await asyncio.sleep(0.05)
    await asyncio.to_thread(_pg_ctl, server, pgdata, "-w", "-m", "fast", "stop")
    await asyncio.sleep(AWAY_SECONDS)
    during = Counter(answers)
    await asyncio.to_thread(_pg_ctl, server, pgdata, "-w", "-o", '-h ""', "-o", f"-k {socket_dir}", "-l",
                            str(pgdata / "log"), "start")
    back = time.monotonic()
    while True:
        status, _ = await alice.get("/api/v2/projects")
        if status == 200:
            break
        assert time.monotonic() - back < 5, "no full service within 5 s of the database's return"
        await asyncio.sleep(0.1)
    recovered_in = time.monotonic() - back
    await asyncio.sleep(1)
    stop_load.set()
    await asyncio.gather(*workers)

    assert set(answers) <= {200, 503}, answers
    assert during[503] > 0 and missing_retry_after == 0, (during, missing_retry_after)
    # Every acknowledged row is there once.
    names = Counter(r["name"] for r in await pool.fetch("SELECT name FROM projects"))
    assert all(names[name] == 1 for name in created), [n for n in created if names[n] != 1]
    assert max(names.values()) == 1
    # The session ran on through it.
    status, body = await alice.get(f"/api/v2/projects/{project['id']}/sessions/{session['id']}")
    assert status == 200 and body["status"] == "ENGINE_RUNNING", body
    # Notifications are back: a change made now reaches a subscriber.
    hub = client.app[STATUS_HUB]
    async with hub.subscribe() as queue:
        for _ in range(50):  # the listener reconnects with backoff (at most 5 s)
            await alice.patch(f"/api/v2/projects/{project['id']}", json={"description": f"after {time.monotonic()}"})
            try:
                event = await asyncio.wait_for(queue.get(), 0.2)
            except TimeoutError:
                continue
            if event.get("table") == "projects" or event.get("resync"):
                break
        else:
            raise AssertionError("no notification after the database came back")
    await alice.post(f"/api/v2/projects/{project['id']}/sessions/{session['id']}:stop")
    print(f"answers {dict(answers)}; full service {recovered_in:.2f} s after the return")


async def test_the_embedded_postgres_is_started_again_when_it_dies(settings: Settings, tmp_path: Path) -> None:
    import os
    import signal

    data_dir = tmp_path / "data"
    client = TestClient(TestServer(create_app(dataclasses.replace(settings, database_url="", data_dir=data_dir))))
    await client.start_server()
    try:
        pool = client.app[POOL]
        user = await users.create_user(pool, "alice", "alice@example.com", "correct horse")
        alice = Api(client, (await api_keys.create(pool, user))[0], "alice")
        assert (await alice.post("/api/v2/projects", json={"name": "Kept"}))[0] == 200
        postmaster = int((data_dir / "postgres" / "postmaster.pid").read_text().split()[0])
        os.kill(postmaster, signal.SIGKILL)
        seen: Counter[int] = Counter()
        deadline = time.monotonic() + 20
        while True:
            status, _ = await alice.get("/api/v2/projects")
            seen[status] += 1
            if status == 200 and seen[503]:
                break
            assert time.monotonic() < deadline, f"the embedded Postgres did not come back: {seen}"
            await asyncio.sleep(0.2)
        assert set(seen) <= {200, 503}, seen
        _, listed = await alice.get("/api/v2/projects")
        assert [p["name"] for p in listed["projects"]] == ["Kept"]
    finally:
        await client.close()
