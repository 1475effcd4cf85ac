"""Models over CML API v2 (create, build, deploy, stop, restart) and the /model endpoint, called
as Cloudera's documentation shows it."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import time
from typing import Any

import aiohttp

from cml_appliance.app import create_app
from cml_appliance.auth import api_keys, users
from cml_appliance.core.settings import Settings
from cml_appliance.models import service as model_service
from cml_appliance.web.keys import MODELS, POOL
from cml_appliance.workloads import states
from tests.conftest import Api, assert_error, wait_build

PREDICT = b'''import json
def predict(args):
    if args.get("boom"):
        raise ValueError("boom requested")
    if args.get("weird"):
        return {1, 2}
    return {"sum": args["a"] + args["b"]}
'''


async def setup(api: Api) -> str:
    _, project = await api.post("/api/v2/projects", json={"name": "models"})
    form = aiohttp.FormData()
    form.add_field("predict.py", PREDICT, filename="predict.py")
    await api.post(f"/api/v2/projects/{project['id']}/files", data=form)
    return project["id"]


async def call(api: Api, key: str, request: Any, *, bearer: bool = True) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {api.key}"} if bearer else {}
    resp = await api.client.post("/model", json={"accessKey": key, "request": request}, headers=headers)
    return resp.status, await resp.json()


async def call_until_served(api: Api, key: str, request: Any, timeout: float = 20) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        status, body = await call(api, key, request)
        if status == 200 or time.monotonic() > deadline:
            assert status == 200, body
            return body
        await asyncio.sleep(0.1)


async def test_create_build_deploy_and_call(alice: Api, bob: Api) -> None:
    pid = await setup(alice)
    # One call creates, builds and deploys, as CreateModelRequest allows.
    status, model = await alice.post(f"/api/v2/projects/{pid}/models", json={
        "project_id": pid, "name": "adder", "description": "adds",
        "auto_build_model": True, "auto_build_config": {"file_path": "predict.py", "function_name": "predict"},
        "auto_deploy_model": True, "auto_deployment_config": {"cpu": 1, "memory": 2, "replicas": 2},
    })
    assert status == 200, model
    assert model["auth_enabled"] is True and model["access_key"].startswith("m") and len(model["access_key"]) == 32
    mid = model["id"]
    build = await wait_build(alice, pid, mid, deployed=True)
    assert build["status"] == "built" and build["built_at"], build
    assert build["built_image"] == f"alice/models/model-{mid}:{build['id']}"
    base = f"/api/v2/projects/{pid}/models/{mid}/builds/{build['id']}/deployments"
    _, deployments = await alice.get(base)
    deployment = deployments["model_deployments"][0]
    assert deployment["replicas"] == 2

    answer = await call_until_served(alice, model["access_key"], {"a": 2, "b": 40})
    assert answer["success"] is True and answer["response"] == {"sum": 42} and answer["ReplicaID"]
    # Also at modelservice.<domain>, where CML serves it.
    resp = await alice.client.post("/model", json={"accessKey": model["access_key"], "request": {"a": 1, "b": 2}},
                                   headers={"Authorization": f"Bearer {alice.key}", "Host": "modelservice.127.0.0.1:8080"})
    assert resp.status == 200 and (await resp.json())["response"] == {"sum": 3}
    seen = {(await call_until_served(alice, model["access_key"], {"a": 1, "b": 1}))["ReplicaID"] for _ in range(4)}
    assert len(seen) == 2  # calls are spread over both replicas
    for _ in range(50):
        _, deployment = await alice.get(f"{base}/{deployment['id']}")
        if deployment["status"] == "deployed":
            break
        await asyncio.sleep(0.1)
    assert deployment["status"] == "deployed"

    # The function's errors reach the caller; the replica stays up.
    status, body = await call(alice, model["access_key"], {"boom": True})
    assert status == 400 and body["success"] is False and "boom requested" in body["error"]["message"]
    status, body = await call(alice, model["access_key"], {"weird": True})
    assert status == 400 and "not JSON" in body["error"]["message"]
    assert (await call_until_served(alice, model["access_key"], {"a": 1, "b": 2}))["response"] == {"sum": 3}

    # Authentication: a collaborator's key is needed; the access key alone is not enough.
    status, body = await call(alice, model["access_key"], {"a": 1, "b": 2}, bearer=False)
    assert status == 401
    status, body = await call(bob, model["access_key"], {"a": 1, "b": 2})
    assert status == 403
    forbidden = body
    # An unknown key reads exactly as a model one may not call: no probing for keys.
    status, body = await call(alice, "mnotakey", {"a": 1})
    assert status == 403 and body == forbidden
    status, body = await call(alice, "mnotakey", {"a": 1}, bearer=False)
    assert status == 401

    status, stopped = await alice.post(f"{base}/{deployment['id']}:stop")
    assert status == 200
    for _ in range(100):
        _, deployment = await alice.get(f"{base}/{deployment['id']}")
        if deployment["status"] == "stopped":
            break
        await asyncio.sleep(0.1)
    assert deployment["status"] == "stopped" and deployment["stopped_at"]
    status, body = await call(alice, model["access_key"], {"a": 1, "b": 2})
    assert status == 503 and body["success"] is False

    status, _ = await alice.post(f"{base}/{deployment['id']}:restart")
    assert status == 200
    assert (await call_until_served(alice, model["access_key"], {"a": 5, "b": 5}))["response"] == {"sum": 10}

    status, regenerated = await alice.post(f"/api/v2/projects/{pid}/models/{mid}:regenerateAccessKey")
    assert regenerated["access_key"] != model["access_key"]
    status, _ = await call(alice, model["access_key"], {"a": 1, "b": 1})
    assert status == 403
    _, everything = await alice.get("/api/v2/models")
    assert [m["id"] for m in everything["models"]] == [mid]
    status, body = await alice.delete(f"/api/v2/projects/{pid}/models/{mid}")
    assert (status, body) == (200, {})


async def test_builds_that_cannot_work_fail_with_a_reason(alice: Api) -> None:
    pid = await setup(alice)
    _, model = await alice.post(f"/api/v2/projects/{pid}/models", json={"name": "m", "disable_authentication": True})
    assert model["auth_enabled"] is False
    url = f"/api/v2/projects/{pid}/models/{model['id']}/builds"
    _, missing_fn = await alice.post(url, json={"file_path": "predict.py", "function_name": "nope"})
    missing_fn = await wait_build(alice, pid, model["id"], missing_fn["id"])
    assert missing_fn["status"] == "build failed" and "has no function named 'nope'" in missing_fn["failure_reason"]
    _, missing_file = await alice.post(url, json={"file_path": "absent.py", "function_name": "predict"})
    missing_file = await wait_build(alice, pid, model["id"], missing_file["id"])
    assert missing_file["status"] == "build failed" and "absent.py is not a file" in missing_file["failure_reason"]
    status, body = await alice.post(f"{url}/{missing_fn['id']}/deployments", json={"replicas": 1})
    assert_error(status, body, 400)
    assert "has no function named 'nope'" in body["message"]
    for payload in ({"file_path": "../x.py", "function_name": "f"}, {"file_path": "predict.py", "function_name": "not a name"}):
        status, body = await alice.post(url, json=payload)
        assert_error(status, body, 400)
    _, good = await alice.post(url, json={"file_path": "predict.py", "function_name": "predict"})
    await wait_build(alice, pid, model["id"], good["id"])
    for payload in ({"replicas": 0}, {"replicas": 1, "cpu": 99}, {"replicas": 1, "nvidia_gpus": 1}):
        status, body = await alice.post(f"{url}/{good['id']}/deployments", json=payload)
        assert_error(status, body, 400)
    # With authentication off, the access key alone calls the model.
    await alice.post(f"{url}/{good['id']}/deployments", json={"replicas": 1})
    deadline = time.monotonic() + 20
    while True:
        resp = await alice.client.post(f"/model?accessKey={model['access_key']}", json={"request": {"a": 1, "b": 1}})
        if resp.status == 200 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    assert resp.status == 200 and (await resp.json())["response"] == {"sum": 2}
    resp = await alice.client.post("/model", data=b"not json")
    assert resp.status == 400 and (await resp.json())["success"] is False


SLOW = b'''import time
def predict(args):
    time.sleep(args.get("sleep", 0))
    return {"slept": args.get("sleep", 0)}
'''


async def auto_deployed(api: Api, pid: str, name: str, file_path: str, replicas: int = 1) -> dict[str, Any]:
    """A model of `file_path`'s predict, built and deployed by its create call, with no authentication."""
    _, model = await api.post(f"/api/v2/projects/{pid}/models", json={
        "name": name, "disable_authentication": True, "auto_build_model": True,
        "auto_build_config": {"file_path": file_path, "function_name": "predict"},
        "auto_deploy_model": True, "auto_deployment_config": {"replicas": replicas},
    })
    return dict(model)


async def deployed_model(api: Api, pid: str, name: str, file_path: str) -> tuple[dict[str, Any], str, str]:
    """(model, build id, deployment id) of a model deployed with one replica and no authentication."""
    model = await auto_deployed(api, pid, name, file_path)
    build = await wait_build(api, pid, model["id"], deployed=True)
    _, deployments = await api.get(f"/api/v2/projects/{pid}/models/{model['id']}/builds/{build['id']}/deployments")
    await call_until_served(api, model["access_key"], {})
    return model, build["id"], deployments["model_deployments"][0]["id"]


async def test_limits_busy_replicas_and_timeouts(aiohttp_client: Any, settings: Settings) -> None:
    """The request timeout, body limit and busy wait are settings; each ends with its own status."""
    client = await aiohttp_client(create_app(dataclasses.replace(
        settings, model_request_timeout_seconds=2, model_max_request_mb=1, model_busy_wait_seconds=1)))
    user = await users.create_user(client.app[POOL], "alice", "alice@example.com", "correct horse")
    alice = Api(client, (await api_keys.create(client.app[POOL], user))[0], "alice")
    _, project = await alice.post("/api/v2/projects", json={"name": "slow models"})
    pid = project["id"]
    form = aiohttp.FormData()
    form.add_field("slow.py", SLOW, filename="slow.py")
    form.add_field("latin1.py", "def predict(args):\n    return 'caf\xe9'\n".encode("latin-1"), filename="latin1.py")
    await alice.post(f"/api/v2/projects/{pid}/files", data=form)
    model, build_id, first = await deployed_model(alice, pid, "slow", "slow.py")
    key = model["access_key"]

    # The one replica is busy for 1.5 s: a second call waits 1 s for it, then gets model.busy.
    slow = asyncio.ensure_future(call(alice, key, {"sleep": 1.5}, bearer=False))
    models = client.app[MODELS]
    while not any(lock.locked() for lock in models._busy.values()):  # the slow call holds the replica
        await asyncio.sleep(0.01)
    started = time.monotonic()
    status, body = await call(alice, key, {"sleep": 0}, bearer=False)
    assert (status, body) == (429, {"success": False, "error": {"message": "model.busy"}})
    assert 0.9 <= time.monotonic() - started < 1.5
    assert (await slow) == (200, {"success": True, "response": {"slept": 1.5}, "ReplicaID": (await slow)[1]["ReplicaID"]})

    # A function slower than the request timeout: 504 with the reason; the replica serves on.
    status, body = await call(alice, key, {"sleep": 3}, bearer=False)
    assert status == 504 and "within 2 s" in body["error"]["message"]
    answer = await call_until_served(alice, key, {"sleep": 0})
    assert answer["response"] == {"slept": 0}

    # A large body under the limit arrives in many pieces: it is read whole.
    status, body = await call(alice, key, {"sleep": 0, "blob": "x" * 600_000}, bearer=False)
    assert status == 200 and body["response"] == {"slept": 0}, body
    # A body over model_max_request_mb.
    resp = await client.post("/model", json={"accessKey": key, "request": {"blob": "x" * (1024 * 1024)}})
    assert resp.status == 413 and (await resp.json())["success"] is False

    # A file that is not UTF-8 (and says nothing of its encoding) fails its build with the reason.
    url = f"/api/v2/projects/{pid}/models/{model['id']}/builds"
    _, latin1 = await alice.post(url, json={"file_path": "latin1.py", "function_name": "predict"})
    latin1 = await wait_build(alice, pid, model["id"], latin1["id"])
    assert latin1["status"] == "build failed"
    _, listed = await alice.get(f"{url}/{latin1['id']}")
    assert listed["status"] == "build failed"

    # A second deployment replaces the first once it is up; restarting the first brings it back
    # and retires the second: one deployment serves a model.
    deployments = f"{url}/{build_id}/deployments"
    _, second = await alice.post(deployments, json={"replicas": 1})

    async def statuses() -> dict[str, str]:
        _, listed = await alice.get(deployments)
        return {d["id"]: d["status"] for d in listed["model_deployments"]}

    async def until(wanted: dict[str, str]) -> None:
        deadline = time.monotonic() + 20
        while (seen := await statuses()) != wanted:
            assert time.monotonic() < deadline, seen
            await asyncio.sleep(0.1)

    await until({first: "stopped", second["id"]: "deployed"})
    status, _ = await alice.post(f"{deployments}/{first}:restart")
    assert status == 200
    await until({first: "deployed", second["id"]: "stopped"})
    assert (await call_until_served(alice, key, {"sleep": 0}))["success"] is True


async def test_a_replica_that_dies_is_replaced_and_a_crash_loop_stops(alice: Api, monkeypatch: Any) -> None:
    monkeypatch.setattr(model_service, "REPLACE_PAUSE_SECONDS", 0.05)
    monkeypatch.setattr(model_service, "MAX_REPLACEMENTS", 3)
    pid = await setup(alice)
    form = aiohttp.FormData()
    form.add_field("crashes.py", b"import sys\nsys.exit(3)\ndef predict(args):\n    return args\n", filename="crashes.py")
    await alice.post(f"/api/v2/projects/{pid}/files", data=form)
    pool = alice.client.app[POOL]

    key = (await auto_deployed(alice, pid, "sturdy", "predict.py", replicas=2))["access_key"]
    seen: set[str] = set()
    while len(seen) < 2:
        seen.add((await call_until_served(alice, key, {"a": 1, "b": 1}))["ReplicaID"])
    first, other = sorted(seen)
    handle = await pool.fetchval("SELECT handle FROM workloads WHERE public_id = $1", first)
    os.killpg(int(handle.split(":")[0]), signal.SIGKILL)  # one replica dies
    # Calls go on, on the other replica, while the dead one is noticed and replaced.
    answers = [await call(alice, key, {"a": 2, "b": 2}, bearer=False) for _ in range(6)]
    assert all(status == 200 and body["response"] == {"sum": 4} for status, body in answers), answers

    deadline = time.monotonic() + 20
    while True:
        answer = await call(alice, key, {"a": 2, "b": 2}, bearer=False)
        if answer[0] == 200 and answer[1]["ReplicaID"] not in (first, other):
            break  # the replacement serves
        assert time.monotonic() < deadline, answer
        await asyncio.sleep(0.05)
    dead = await pool.fetchrow("SELECT status, reason FROM workloads WHERE public_id = $1", first)
    assert dead["status"] == "ENGINE_FAILED" and dead["reason"]

    # A replica that cannot even start is replaced a few times, then the deployment shows failed.
    looping = await auto_deployed(alice, pid, "looping", "crashes.py")
    build = await wait_build(alice, pid, looping["id"], deployed=True)
    base = f"/api/v2/projects/{pid}/models/{looping['id']}/builds/{build['id']}/deployments"
    _, listed = await alice.get(base)
    deployment_id = listed["model_deployments"][0]["id"]
    deadline = time.monotonic() + 30
    while True:
        _, deployment = await alice.get(f"{base}/{deployment_id}")
        if deployment["status"] == "failed":
            break
        assert time.monotonic() < deadline, deployment
        await asyncio.sleep(0.2)
    # Failed means given up: nothing of the deployment runs, and nothing more is started.
    assert await pool.fetchval(
        "SELECT count(*) FROM workloads w JOIN model_deployments d ON d.id = w.deployment_id"
        " WHERE d.public_id = $1 AND w.status = ANY($2::text[])", deployment_id, list(states.ACTIVE)) == 0
    tries = await pool.fetchval(
        "SELECT count(*) FROM workloads w JOIN model_deployments d ON d.id = w.deployment_id WHERE d.public_id = $1",
        deployment_id)
    assert tries == 1 + 3  # the first, then MAX_REPLACEMENTS replacements


async def test_a_request_that_kills_its_replica_kills_no_more_than_two(alice: Api) -> None:
    pid = await setup(alice)
    form = aiohttp.FormData()
    form.add_field("poison.py", b"import os\ndef predict(args):\n    if args.get('die'):\n        os._exit(1)\n    return 'ok'\n",
                   filename="poison.py")
    await alice.post(f"/api/v2/projects/{pid}/files", data=form)
    key = (await auto_deployed(alice, pid, "poisoned", "poison.py", replicas=3))["access_key"]
    seen: set[str] = set()
    while len(seen) < 3:  # all three serve, and each has an open connection from the appliance
        seen.add((await call_until_served(alice, key, {}))["ReplicaID"])
    status, body = await call(alice, key, {"die": True}, bearer=False)
    assert status == 502 and "died while answering" in body["error"]["message"], body
    status, body = await call(alice, key, {}, bearer=False)
    assert status == 200 and body["response"] == "ok", body  # the third still serves
    pool = alice.client.app[POOL]
    query = "SELECT count(*) FROM workloads WHERE public_id = ANY($1::text[]) AND status = 'ENGINE_FAILED'"
    deadline = time.monotonic() + 10
    while (died := await pool.fetchval(query, list(seen))) < 2:
        assert time.monotonic() < deadline, died
        await asyncio.sleep(0.05)
    # The third's process is alive (not merely not yet noticed dead), and it is running.
    (third,) = seen - set(await pool.fetchval(
        "SELECT array_agg(public_id) FROM workloads WHERE public_id = ANY($1::text[]) AND status = 'ENGINE_FAILED'", list(seen)))
    handle = await pool.fetchval("SELECT handle FROM workloads WHERE public_id = $1 AND status = 'ENGINE_RUNNING'", third)
    os.killpg(int(handle.split(":")[0]), 0)  # raises if the process group is gone
    assert await pool.fetchval(query, list(seen)) == 2
