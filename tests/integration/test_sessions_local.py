"""Sessions on the local engine: start, environment, terminal, logs, stop, limits, bad input."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest

from cml_appliance.web.keys import POOL, WORKLOADS
from tests.conftest import Api, assert_error
from tests.integration.sessions_helpers import (
    open_terminal,
    start_running_session,
    wait_status,
)


async def new_project(api: Api, **fields: Any) -> str:
    status, body = await api.post("/api/v2/projects", json={"name": "work", **fields})
    assert status == 200, body
    return body["id"]


async def test_session_lifecycle_environment_and_logs(alice: Api) -> None:
    pid = await new_project(alice, environment={"FROM_PROJECT": "p", "SHARED": "project"})
    session = await start_running_session(
        alice, pid, name="explore", runtime_identifier="host/python3",
        environment={"SHARED": "session", "CDSW_ENGINE_ID": "forged"},
    )
    assert session["engine"] == "local" and session["name"] == "explore"
    assert session["running_at"] and session["cpu"] == 1.0 and session["memory"] == 2.0
    sid = session["id"]

    term = await open_terminal(alice, pid, sid)
    await term.send(
        "echo EN''V:$CDSW_ENGINE_ID:$CDSW_PROJECT_ID:$CDSW_PROJECT:$FROM_PROJECT:$SHARED:"
        "$CDSW_CPU_MILLICORES:$CDSW_MEMORY_MB:$HADOOP_USER_NAME:$CDSW_API_URL:${#CDSW_APIV2_KEY}:$PWD\n"
    )
    screen = await term.expect("ENV:" + sid)
    line = next(text for text in screen.splitlines() if text.startswith("ENV:" + sid))
    parts = line.split(":", 11)
    assert parts[1:9] == [sid, pid, "work", "p", "session", "1000", "2048", "alice"]
    assert parts[9].startswith("http") and "/api/v1" in line
    assert line.rstrip().endswith(pid)  # the working directory is the project's
    await term.ws.close()

    status, logs = await alice.get(f"/api/v2/projects/{pid}/sessions/{sid}/logs")
    assert status == 200 and f"Session {sid} is running in project work" in logs["content"]
    assert logs["offset"] == "0" and int(logs["next_offset"]) == len(logs["content"].encode())
    status, tail = await alice.get(f"/api/v2/projects/{pid}/sessions/{sid}/logs", params={"offset": "8"})
    assert tail["content"] == logs["content"][8:]

    status, stopped = await alice.post(f"/api/v2/projects/{pid}/sessions/{sid}:stop")
    assert status == 200 and stopped["status"] in ("ENGINE_STOPPING", "ENGINE_STOPPED")
    final = await wait_status(alice, pid, sid, "ENGINE_STOPPED")
    assert final["finished_at"] and "stopped by alice" in final["reason"]
    status, logs = await alice.get(f"/api/v2/projects/{pid}/sessions/{sid}/logs")
    assert logs["complete"] is True and "Session stopping" in logs["content"]
    status, body = await alice.post(f"/api/v2/projects/{pid}/sessions/{sid}:stop")
    assert_error(status, body, 400)

    _, listing = await alice.get(f"/api/v2/projects/{pid}/sessions")
    assert [s["id"] for s in listing["sessions"]] == [sid]
    _, mine = await alice.get("/api/v2/sessions")
    assert [s["id"] for s in mine["sessions"]] == [sid]


async def test_workload_key_is_scoped_and_revoked(alice: Api) -> None:
    pid = await new_project(alice)
    other = await new_project(alice, name="other")
    session = await start_running_session(alice, pid)
    term = await open_terminal(alice, pid, session["id"])
    # The arithmetic makes the printed line differ from the echoed command.
    await term.send("echo K$((1+1))=$CDSW_APIV2_KEY=\n")
    key = (await term.expect_match(r"K2=([A-Za-z0-9_-]{20,})=")).group(1)
    await term.ws.close()
    scoped = Api(alice.client, key, "alice")
    status, body = await scoped.get(f"/api/v2/projects/{pid}")
    assert status == 200
    status, body = await scoped.get(f"/api/v2/projects/{other}")
    assert_error(status, body, 404)
    _, listing = await scoped.get("/api/v2/projects")
    assert [p["id"] for p in listing["projects"]] == [pid]
    status, body = await scoped.get("/api/v2/users/alice/v2_keys")
    assert_error(status, body, 403)
    await alice.post(f"/api/v2/projects/{pid}/sessions/{session['id']}:stop")
    await wait_status(alice, pid, session["id"], "ENGINE_STOPPED")
    status, body = await scoped.get(f"/api/v2/projects/{pid}")
    assert_error(status, body, 401)


async def test_terminal_resize_tabs_and_close_reasons(alice: Api) -> None:
    pid = await new_project(alice)
    session = await start_running_session(alice, pid)
    sid = session["id"]
    first = await open_terminal(alice, pid, sid)
    second = await open_terminal(alice, pid, sid)
    await first.resize(100, 33)
    await first.send("stty size\n")
    await first.expect("33 100")
    await second.send("echo second-tab-$((6*7))\n")
    await second.expect("second-tab-42")
    await first.ws.send_str("not json")
    msg = await first.ws.receive(timeout=5)
    while msg.type == aiohttp.WSMsgType.BINARY:
        msg = await first.ws.receive(timeout=5)
    assert msg.type == aiohttp.WSMsgType.TEXT and json.loads(msg.data)["type"] == "error"

    await alice.post(f"/api/v2/projects/{pid}/sessions/{sid}:stop")
    for term in (first, second):
        code, _ = await term.wait_closed()
        assert code == 4000
    await wait_status(alice, pid, sid, "ENGINE_STOPPED")
    late = await open_terminal(alice, pid, sid)
    code, reason = await late.wait_closed()
    assert code == 4001 and "not running (ENGINE_STOPPED" in reason


async def test_terminal_permissions_and_origin(alice: Api, make_user: Any) -> None:
    pid = await new_project(alice)
    writer = await make_user("writer")
    stranger = await make_user("stranger")
    await alice.put(f"/api/v2/projects/{pid}/collaborators/writer", json={"permission": "write"})
    session = await start_running_session(alice, pid)
    url = f"/api/v2/projects/{pid}/sessions/{session['id']}/terminal"
    for api, expected in ((writer, 403), (stranger, 404)):
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            await alice.client.ws_connect(url, headers={"Authorization": f"Bearer {api.key}"})
        assert info.value.status == expected
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await alice.client.ws_connect(url, headers={"Authorization": f"Bearer {alice.key}", "Origin": "https://evil.example"})
    assert info.value.status == 403
    # The writer may see the session but not stop it.
    status, _ = await writer.get(f"/api/v2/projects/{pid}/sessions/{session['id']}")
    assert status == 200
    status, body = await writer.post(f"/api/v2/projects/{pid}/sessions/{session['id']}:stop")
    assert_error(status, body, 403)
    status, body = await stranger.get(f"/api/v2/projects/{pid}/sessions/{session['id']}")
    assert_error(status, body, 404)
    await alice.post(f"/api/v2/projects/{pid}/sessions/{session['id']}:stop")


async def test_bad_session_requests(alice: Api, make_user: Any) -> None:
    pid = await new_project(alice)
    viewer = await make_user("viewer")
    await alice.put(f"/api/v2/projects/{pid}/collaborators/viewer", json={"permission": "read"})
    url = f"/api/v2/projects/{pid}/sessions"
    for payload, fragment in (
        ({"runtime_identifier": "nope/none:1"}, "unknown runtime"),
        ({"resource_profile_id": 999}, "no resource profile"),
        ({"resource_profile_id": 1, "cpu": 2}, "more than resource profile"),
        ({"cpu": 64, "memory": 2}, "more than this site allows"),
        ({"memory": 9999}, "more than this site allows"),
        ({"nvidia_gpu": 1}, "GPUs need a runtime that runs on Kubernetes"),
        ({"cpu": "2"}, "cpu"),
        ({"environment": {"IDLE_MAXIMUM_MINUTES": "soon"}}, "IDLE_MAXIMUM_MINUTES"),
        ({"flavour": "mint"}, "unknown field"),
    ):
        status, body = await alice.post(url, json=payload)
        assert_error(status, body, 400)
        assert fragment in body["message"], (payload, body)
    status, body = await viewer.post(url, json={})
    assert_error(status, body, 403)
    # No container engine is configured in these tests: a container runtime is unavailable.
    status, body = await alice.post(url, json={"runtime_identifier": "localhost/cml-runtime-python:3.11"})
    assert_error(status, body, 503)
    assert "CML_CONTAINER_ENGINE_URL" in body["message"]
    _, listing = await alice.get(url)
    assert listing["sessions"] == []
    status, body = await alice.get(url + "/nosuchsession")
    assert_error(status, body, 404)
    status, body = await alice.get(url + "/abc/logs", params={"offset": "-1"})
    assert_error(status, body, 404)


async def test_idle_and_maximum_duration_end_sessions_with_a_reason(alice: Api) -> None:
    pid = await new_project(alice)
    idle = await start_running_session(alice, pid, environment={"IDLE_MAXIMUM_MINUTES": "0.5"})
    longest = await start_running_session(alice, pid, environment={"SESSION_MAXIMUM_MINUTES": "0.5"})
    workloads = alice.client.app[WORKLOADS]
    assert await workloads.enforce_time_limits() == 0  # both within their half minute
    # A minute passes (moved back, not waited for): one was idle that long, the other ran that long.
    await alice.client.app[POOL].execute(
        "UPDATE workloads SET last_activity_at = last_activity_at - interval '1 minute' WHERE public_id = $1", idle["id"])
    await alice.client.app[POOL].execute(
        "UPDATE workloads SET running_at = running_at - interval '1 minute' WHERE public_id = $1", longest["id"])
    assert await workloads.enforce_time_limits() == 2
    idle = await wait_status(alice, pid, idle["id"], "ENGINE_TIMEDOUT")
    assert "idle for 0.5 minutes (IDLE_MAXIMUM_MINUTES)" in idle["reason"]
    longest = await wait_status(alice, pid, longest["id"], "ENGINE_TIMEDOUT")
    assert "SESSION_MAXIMUM_MINUTES" in longest["reason"]


async def test_event_stream_reports_status_and_output(alice: Api) -> None:
    pid = await new_project(alice)
    session = await start_running_session(alice, pid)
    url = f"/api/v2/projects/{pid}/sessions/{session['id']}/events"
    resp = await alice.client.get(url, headers={"Authorization": f"Bearer {alice.key}"})
    assert resp.status == 200 and resp.content_type == "text/event-stream"
    seen: list[str] = []
    await alice.post(f"/api/v2/projects/{pid}/sessions/{session['id']}:stop")
    async with asyncio.timeout(20):
        async for raw in resp.content:
            line = raw.decode().strip()
            if line.startswith("event: "):
                seen.append(line[7:])
            if line.startswith("data: ") and "ENGINE_STOPPED" in line:
                break
    assert seen[0] == "status" and "log" in seen
    resp.close()
