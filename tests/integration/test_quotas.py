"""Quotas: defaults for users and teams, an account's own, what each uses now, and a start over
quota refused with a message that names the quota and what runs, on the local and the container
engine alike."""

from __future__ import annotations

import asyncio
from typing import Any

from tests.conftest import BUSYBOX_IMAGE, Api, assert_error, user_maker


async def start(api: Api, pid: str, **fields: Any) -> tuple[int, Any]:
    return await api.post(f"/api/v2/projects/{pid}/sessions", json={"runtime_identifier": "host/python3", **fields})


async def test_a_start_over_quota_is_refused_and_says_why(make_user: Any) -> None:
    admin, alice, bob = await make_user("root", admin=True), await make_user("alice"), await make_user("bob")
    status, body = await admin.post("/api/v2/default-quota/user", json={"quota": {
        "requests_cpu": "2", "requests_memory": "4Gi", "requests_gpu": "0"}})
    assert status == 200 and body["success"], body
    _, default = await alice.get("/api/v2/default-quota/user")
    assert default["quota"]["requests_cpu"] == "2" and default["quota"]["requests_memory"] == "4" and default["quota"]["active"]
    assert_error(*await alice.post("/api/v2/default-quota/user", json={"quota": {"requests_cpu": "99"}}), 403)

    _, project = await alice.post("/api/v2/projects", json={"name": "quota"})
    pid = project["id"]
    first = await start(alice, pid, cpu=1, memory=2, name="first")
    second = await start(alice, pid, cpu=1, memory=2, name="second")
    assert first[0] == 200 and second[0] == 200, (first, second)
    status, body = await start(alice, pid, cpu=1, memory=1, name="third")
    assert_error(status, body, 429)
    message = body["message"]
    assert "alice's quota of 2 vCPU, 4 GB, 0 GPU(s)" in message and "CPU" in message, message
    assert "session 'first' in 'quota'" in message and "session 'second'" in message, message
    # Another user has a quota of their own (the default), untouched by alice's use.
    _, bobs = await bob.post("/api/v2/projects", json={"name": "bob's"})
    assert (await start(bob, bobs["id"], cpu=1, memory=1))[0] == 200

    # What each uses now, and what is configured.
    _, listed = await admin.get("/api/v2/usersquota", params={"sort": "username"})
    rows = {r["user"]["user_name"]: r for r in listed["user_quota"]}
    assert rows["alice"]["quota_usage"] == {"cpu": "2", "memory": "4", "nvidia_gpu": "0"}
    assert rows["alice"]["quota_configured"]["cpu"] == "2" and listed["total_count"] == "3"
    _, own = await alice.get("/api/v2/usersquota")
    assert [r["user"]["user_name"] for r in own["user_quota"]] == ["alice"]  # others see themselves only

    # A quota of alice's own lets the third start; going back to the default refuses it again.
    assert (await admin.put("/api/v2/usersquota/alice", json={"cpu": "4", "memory": "", "nvidia_gpu": "0"}))[0] == 200
    third = await start(alice, pid, cpu=1, memory=1, name="third")
    assert third[0] == 200, third
    assert (await admin.delete("/api/v2/usersquota/alice"))[0] == 200
    assert_error(*await start(alice, pid, cpu=0.5, memory=0.5, name="fourth"), 429)
    # Stopped sessions free their share (3 vCPU in use, 2 allowed: two stop, 1 is left).
    await alice.post(f"/api/v2/projects/{pid}/sessions/{first[1]['id']}:stop")
    await alice.post(f"/api/v2/projects/{pid}/sessions/{third[1]['id']}:stop")
    for _ in range(100):
        status, _ = await start(alice, pid, cpu=0.5, memory=0.5, name="after a stop")
        if status == 200:
            break
        await asyncio.sleep(0.1)
    assert status == 200
    assert_error(*await admin.put("/api/v2/usersquota/alice", json={"cpu": "lots"}), 400)
    assert_error(*await admin.put("/api/v2/usersquota/nobody", json={"cpu": "1"}), 404)


async def test_a_team_project_counts_against_the_team(make_user: Any) -> None:
    admin, alice, bob = await make_user("root", admin=True), await make_user("alice"), await make_user("bob")
    await alice.post("/api/v2/site/teams", json={"username": "ds", "permission": "write"})
    await alice.put("/api/v2/teams/ds/members/bob", json={})
    _, project = await alice.post("/api/v2/projects", json={"name": "shared", "team_name": "ds"})
    status, body = await admin.post("/api/v2/default-quota/team", json={"quota": {"requests_cpu": "1.5"}})
    assert status == 200, body
    _, defaults = await bob.get("/api/v2/default-quota/all")
    assert {q["owner_type"]: q["requests_cpu"] for q in defaults["request_quotas"]} == {"user": "", "team": "1.5"}
    assert (await start(bob, project["id"], cpu=1, memory=1, name="bob's"))[0] == 200
    status, body = await start(alice, project["id"], cpu=1, memory=1, name="alice's")
    assert_error(status, body, 429)
    assert "team ds's quota of 1.5 vCPU" in body["message"] and "session \"bob's\"" in body["message"], body
    _, teams = await admin.get("/api/v2/groupsquota")
    (ds,) = teams["group_quota"]
    assert ds["group"]["user_name"] == "ds" and ds["quota_usage"]["cpu"] == "1"
    # Outside the team's projects, alice's own (unlimited) quota is all that counts.
    _, mine = await alice.post("/api/v2/projects", json={"name": "mine"})
    assert (await start(alice, mine["id"], cpu=1, memory=1))[0] == 200


async def test_the_container_engine_is_held_to_quotas_too(aiohttp_client: Any, container_settings: Any) -> None:
    from cml_appliance.app import create_app

    client = await aiohttp_client(create_app(container_settings, allow_local_git=True))
    make = user_maker(client)
    admin, carl = await make("root", admin=True), await make("carl")
    await admin.put("/api/v2/usersquota/carl", json={"cpu": "1", "memory": "8"})
    _, project = await carl.post("/api/v2/projects", json={"name": "containers"})
    first = await start(carl, project["id"], runtime_identifier=BUSYBOX_IMAGE, cpu=1, memory=1)
    assert first[0] == 200, first
    status, body = await start(carl, project["id"], runtime_identifier=BUSYBOX_IMAGE, cpu=1, memory=1)
    assert_error(status, body, 429)
    assert "carl's quota of 1 vCPU, 8 GB" in body["message"]
    await carl.post(f"/api/v2/projects/{project['id']}/sessions/{first[1]['id']}:stop")


async def test_starts_racing_from_two_appliance_processes_cannot_pass_a_quota(aiohttp_client: Any, settings: Any) -> None:
    """Two appliances on one database (as two replicas behind a load balancer), eight starts at
    once for a user whose quota holds two: two start, six are refused."""
    from cml_appliance.app import create_app

    first = await aiohttp_client(create_app(settings, allow_local_git=True))
    second = await aiohttp_client(create_app(settings, allow_local_git=True))
    make = user_maker(first)
    admin, alice = await make("root", admin=True), await make("alice")
    status, body = await admin.put("/api/v2/usersquota/alice", json={"cpu": "2", "memory": "", "nvidia_gpu": ""})
    assert status == 200, body
    _, project = await alice.post("/api/v2/projects", json={"name": "race"})
    alice_there = Api(second, alice.key, "alice")
    answers = await asyncio.gather(*(start(api, project["id"], cpu=1, memory=0.5, name=f"s{n}")
                                     for n, api in enumerate([alice, alice_there] * 4)))
    statuses = sorted(status for status, _ in answers)
    assert statuses == [200, 200] + [429] * 6, answers
