"""The Models pages over HTTP: create a model from the form (built and deployed on the local
engine), its page (access key, builds, deployments, replicas and their output), the test request,
readable errors, and who may see and do what."""

from __future__ import annotations

import asyncio
import html
import json
import re
import time
from typing import Any

import aiohttp
from aiohttp.test_utils import TestClient

from tests.conftest import Api, wait_build
from tests.integration.test_web_ui import CSRF_RE, csrf_of, sign_in

PREDICT = b'''def predict(args):
    if args.get("boom"):
        raise ValueError("boom requested")
    return {"sum": args["a"] + args["b"]}
'''


async def new_project_with_predict(client: TestClient) -> str:
    """Create a project from the page's form, uploading predict.py; returns /projects/<id>."""
    token = await csrf_of(client, "/projects/new")
    form = aiohttp.FormData()
    form.add_field("csrf_token", token)
    form.add_field("name", "Model pages")
    form.add_field("template", "upload")
    form.add_field("files", PREDICT, filename="predict.py", content_type="text/x-python")
    resp = await client.post("/projects/new", data=form)
    assert resp.status == 200 and "predict.py" in await resp.text()
    return resp.url.path


async def page(client: TestClient, path: str, status: int = 200) -> str:
    resp = await client.get(path)
    text = await resp.text()
    assert resp.status == status, text
    return text


async def wait_for_page(client: TestClient, path: str, pattern: str, timeout: float = 20) -> str:
    deadline = time.monotonic() + timeout
    while True:
        text = await page(client, path)
        if re.search(pattern, text, re.S):
            return text
        if time.monotonic() > deadline:
            shown = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", text.split('id="access"')[-1]))
            raise AssertionError(f"{pattern!r} never showed on {path}: {shown}")
        await asyncio.sleep(0.2)


def deployment_ids(text: str) -> list[str]:
    return re.findall(r'data-deployment="([a-z0-9-]+)"', text)


async def replica_log(client: TestClient, model_path: str, replica_id: str, expected: str, timeout: float = 20) -> str:
    """The replica's output once it holds `expected` (a replica runs before its server has printed)."""
    deadline = time.monotonic() + timeout
    while True:
        resp = await client.get(f"{model_path}/replicas/{replica_id}/logs")
        assert resp.status == 200, await resp.text()
        content = (await resp.json())["content"]
        if expected in content:
            return content
        assert time.monotonic() < deadline, f"{expected!r} is not in the output of {replica_id}: {content!r}"
        await asyncio.sleep(0.1)


def row_with(deployment_id: str, status: str) -> str:
    """A pattern for the deployment's own table row showing that status."""
    return rf'data-deployment="{deployment_id}">(?:(?!</tr>).)*data-status="{status}"'


def deployment_status(text: str, deployment_id: str) -> str:
    row = re.search(rf'data-deployment="{deployment_id}">(.*?)</tr>', text, re.S)
    assert row, f"no row for deployment {deployment_id}"
    return re.findall(r'data-status="([^"]+)"', row.group(1))[0]


async def send_test_request(client: TestClient, model_path: str, token: str, body: str) -> tuple[int, Any]:
    resp = await client.post(model_path + "/test", data={"csrf_token": token, "request": body})
    assert resp.content_type == "application/json", await resp.text()
    return resp.status, await resp.json()


async def send_until_served(client: TestClient, model_path: str, token: str, body: str, timeout: float = 20) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        status, answer = await send_test_request(client, model_path, token, body)
        if status == 200 or time.monotonic() > deadline:
            assert status == 200, answer
            return answer
        await asyncio.sleep(0.1)


async def test_create_deploy_and_test_a_model_from_the_pages(client: TestClient, alice: Api) -> None:
    await sign_in(client, "alice")
    project_path = await new_project_with_predict(client)
    pid = project_path.rsplit("/", 1)[1]
    models_path = project_path + "/models"
    # The project's page links to its models, next to jobs and applications.
    assert f'href="{models_path}"' in await page(client, project_path)

    text = await page(client, models_path)
    assert "No models yet." in text
    token = CSRF_RE.search(text).group(1)  # type: ignore[union-attr]
    assert re.search(r'name="build_and_deploy" checked', text), "build and deploy is on by default"

    form = {"csrf_token": token, "name": "adder", "description": "adds two numbers", "file_path": "predict.py",
            "function_name": "nope", "runtime_identifier": "host/python3", "replicas": "2", "build_and_deploy": "on"}
    # A function missing from its file: the form again, with the reason, and nothing created.
    resp = await client.post(models_path, data=form)
    text = await resp.text()
    assert resp.status == 400, text
    assert "predict.py has no function named 'nope'" in html.unescape(text)
    assert 'value="adder"' in text and 'value="nope"' in text and 'name="build_and_deploy" checked' in text
    _, listed = await alice.get(f"/api/v2/projects/{pid}/models")
    assert listed["models"] == []
    # Other bad input reads as well.
    resp = await client.post(models_path, data=form | {"function_name": "predict", "replicas": "many"})
    assert resp.status == 400 and "Replicas must be a whole number" in await resp.text()
    resp = await client.post(models_path, data=form | {"function_name": "predict", "cpu": "999"})
    assert resp.status == 400 and "more than" in await resp.text()
    _, listed = await alice.get(f"/api/v2/projects/{pid}/models")
    assert listed["models"] == []
    # Without the CSRF token nothing happens.
    resp = await client.post(models_path, data={k: v for k, v in form.items() if k != "csrf_token"} | {"function_name": "predict"})
    assert resp.status == 403

    resp = await client.post(models_path, data=form | {"function_name": "predict"}, allow_redirects=False)
    assert resp.status == 302, await resp.text()
    model_path, _, shown = resp.headers["Location"].partition("?")
    assert shown.startswith("build=") and shown.endswith("#build-output")  # the build's log is shown
    mid = model_path.rsplit("/", 1)[1]
    _, model = await alice.get(f"/api/v2/projects/{pid}/models/{mid}")
    assert model["name"] == "adder" and model["auth_enabled"] is True
    _, builds = await alice.get(f"/api/v2/projects/{pid}/models/{mid}/builds")
    [build] = builds["model_builds"]

    # The flash shows on the first page after the redirect, whatever the deployment's status.
    first_page = await page(client, resp.headers["Location"])
    assert "Created model adder; it is being built, and deploys once built." in first_page
    assert 'id="build-output"' in first_page and f'/builds/{build["id"]}/events' in first_page
    text = await wait_for_page(client, model_path, r'data-status="deployed"[^>]*id="model-status"')
    assert f'<code id="access-key">{model["access_key"]}</code>' in text
    assert f'data-build="{build["id"]}"' in text and "predict.py" in text
    [first_deployment] = deployment_ids(text)
    assert deployment_status(text, first_deployment) == "deployed"
    replica_ids = re.findall(r'data-replica="([a-z0-9-]+)"', text)
    assert len(replica_ids) == 2
    assert 'id="test-input"' in text and 'id="regenerate-key"' in text and 'id="new-build"' in text
    # The example in the box is JSON.
    example = re.search(r'<textarea name="request" id="test-input"[^>]*>(.*?)</textarea>', text, re.S)
    assert example and isinstance(json.loads(html.unescape(example.group(1))), dict)
    # The models list shows its latest deployment's status.
    listing = await page(client, models_path)
    assert re.search(rf'data-model="{mid}">(?:(?!</tr>).)*data-status="deployed"', listing, re.S)

    # The test request: the function's answer, or its error, as JSON for the page's script.
    answer = await send_until_served(client, model_path, token, '{"a": 2, "b": 40}')
    assert answer["success"] is True and answer["response"] == {"sum": 42} and answer["ReplicaID"] in replica_ids
    status, answer = await send_test_request(client, model_path, token, '{"boom": true}')
    assert status == 400 and answer["success"] is False and "boom requested" in answer["error"]["message"]
    status, answer = await send_test_request(client, model_path, token, '{"a": ')
    assert status == 400 and "not valid JSON" in answer["error"]["message"]
    resp = await client.post(model_path + "/test", data={"request": '{"a": 1, "b": 1}'})
    assert resp.status == 403

    # Each replica's output, through the workload logs machinery.
    await replica_log(client, model_path, replica_ids[0], "serving predict from predict.py")
    assert "boom requested" in "".join([
        (await (await client.get(f"{model_path}/replicas/{r}/logs")).json())["content"] for r in replica_ids])
    text = await page(client, f"{model_path}?replica={replica_ids[1]}")
    assert f"/replicas/{replica_ids[1]}/events" in text and 'id="console"' in text
    async with client.get(f"{model_path}/replicas/{replica_ids[1]}/events") as resp:
        assert resp.status == 200 and resp.content_type == "text/event-stream"
        seen = b""
        deadline = time.monotonic() + 10
        while b"serving predict" not in seen and time.monotonic() < deadline:
            seen += await asyncio.wait_for(resp.content.readany(), 10)
        assert b"event: status" in seen and b"serving predict" in seen
    resp = await client.get(f"{model_path}/replicas/notareplica/logs")
    assert resp.status == 404

    # A new access key; the old one no longer calls the model.
    resp = await client.post(model_path + "/regenerate-key", data={"csrf_token": token})
    text = await resp.text()
    assert resp.status == 200 and "A new access key was made" in text
    _, renewed = await alice.get(f"/api/v2/projects/{pid}/models/{mid}")
    assert renewed["access_key"] != model["access_key"] and f'<code id="access-key">{renewed["access_key"]}</code>' in text

    # New builds: one that fails shows why; one that works is deployed from its row.
    resp = await client.post(model_path + "/builds", data={"csrf_token": token, "file_path": "predict.py",
                                                           "function_name": "absent", "runtime_identifier": "host/python3"})
    text = html.unescape(await resp.text())
    assert "failed: predict.py has no function named 'absent'" in text
    assert re.search(r'class="muted build-failure">predict.py has no function named \'absent\'<', text)
    resp = await client.post(model_path + "/builds", data={"csrf_token": token, "file_path": "predict.py", "function_name": "predict",
                                                           "runtime_identifier": "host/python3", "comment": "second"})
    text = await resp.text()
    assert re.search(r"Building [a-z0-9-]+\. Its log follows below\.", text), text
    _, builds = await alice.get(f"/api/v2/projects/{pid}/models/{mid}/builds")
    second = next(b for b in builds["model_builds"] if b["comment"] == "second")
    second = await wait_build(alice, pid, mid, second["id"])
    assert second["status"] == "built" and len(builds["model_builds"]) == 3
    # Its log says what was done, step by step.
    status, logged = await alice.get(f"/api/v2/projects/{pid}/models/{mid}/builds/{second['id']}/logs")
    assert status == 200 and logged["complete"] is True
    for step in ("Snapshot of the project's files", "[1/4] Fetching snapshot", "[4/4] Pushing", "Built ", "Done in"):
        assert step in logged["content"], logged["content"]
    text = await page(client, model_path)
    assert deployment_ids(text) == [first_deployment]  # built, not deployed
    resp = await client.post(f"{model_path}/builds/{second['id']}/deploy", data={"csrf_token": token, "replicas": "0"})
    assert "replicas must be between 1 and 32" in await resp.text()
    resp = await client.post(f"{model_path}/builds/{second['id']}/deploy", data={"csrf_token": token, "replicas": "1"})
    assert "Deploying build" in await resp.text()
    # The new deployment replaces the first once it is up.
    text = await wait_for_page(client, model_path, row_with(first_deployment, "stopped"))
    newest = deployment_ids(text)[0]
    assert newest != first_deployment and deployment_status(text, newest) == "deployed"
    assert len(re.findall(r'data-replica="', text)) == 1
    assert (await send_until_served(client, model_path, token, '{"a": 1, "b": 2}'))["response"] == {"sum": 3}

    # Stop, then restart, the active deployment from its row.
    action = f"{model_path}/builds/{second['id']}/deployments/{newest}"
    resp = await client.post(action + "/stop", data={"csrf_token": token})
    assert "Stopping the deployment." in await resp.text()
    await wait_for_page(client, model_path, row_with(newest, "stopped"))
    status, answer = await send_test_request(client, model_path, token, '{"a": 1, "b": 2}')
    assert status == 503 and "not deployed" in answer["error"]["message"]
    resp = await client.post(action + "/restart", data={"csrf_token": token})
    assert "Restarting the deployment." in await resp.text()
    await wait_for_page(client, model_path, row_with(newest, "deployed"))
    assert (await send_until_served(client, model_path, token, '{"a": 5, "b": 5}'))["response"] == {"sum": 10}

    # Deleting the model from its page.
    resp = await client.post(model_path + "/delete", data={"csrf_token": token})
    assert "Model deleted." in await resp.text()
    await page(client, model_path, 404)


async def test_model_without_build_then_built_from_its_page(client: TestClient, alice: Api) -> None:
    await sign_in(client, "alice")
    project_path = await new_project_with_predict(client)
    token = await csrf_of(client, project_path + "/models")
    resp = await client.post(project_path + "/models", data={"csrf_token": token, "name": "later", "disable_authentication": "on"},
                             allow_redirects=False)
    assert resp.status == 302
    model_path = resp.headers["Location"]
    text = await page(client, model_path)
    assert "Created model later." in text and "No builds yet." in text and "Not deployed yet." in text
    assert re.search(r'data-status="not deployed"[^>]*id="model-status"', text) and "no authentication" in text
    resp = await client.post(model_path + "/builds", data={"csrf_token": token, "file_path": "predict.py", "function_name": "predict",
                                                           "deploy": "on", "replicas": "1"})
    assert "it deploys once built" in await resp.text()
    await wait_for_page(client, model_path, r'data-status="deployed"[^>]*id="model-status"')
    assert (await send_until_served(client, model_path, token, '{"a": 20, "b": 1}'))["response"] == {"sum": 21}


async def test_viewers_see_but_cannot_act_and_strangers_see_nothing(client: TestClient, alice: Api, make_user: Any) -> None:
    viewer = await make_user("viola")
    await make_user("stranger")
    _, project = await alice.post("/api/v2/projects", json={"name": "shared"})
    pid = project["id"]
    files = aiohttp.FormData()
    files.add_field("predict.py", PREDICT, filename="predict.py")
    await alice.post(f"/api/v2/projects/{pid}/files", data=files)
    await alice.put(f"/api/v2/projects/{pid}/collaborators/viola", json={"permission": "read"})
    _, model = await alice.post(f"/api/v2/projects/{pid}/models", json={
        "name": "adder", "auto_build_model": True, "auto_build_config": {"file_path": "predict.py", "function_name": "predict"},
        "auto_deploy_model": True, "auto_deployment_config": {"replicas": 1},
    })
    mid = model["id"]
    build_id = (await wait_build(alice, pid, mid, deployed=True))["id"]
    _, deployments = await alice.get(f"/api/v2/projects/{pid}/models/{mid}/builds/{build_id}/deployments")
    deployment_id = deployments["model_deployments"][0]["id"]
    models_path = f"/projects/{pid}/models"
    model_path = f"{models_path}/{mid}"

    await sign_in(client, "viola")
    listing = await page(client, models_path)
    assert f'data-model="{mid}"' in listing and 'id="new-model"' not in listing
    text = await wait_for_page(client, model_path, r'data-status="deployed"[^>]*id="model-status"')
    token = CSRF_RE.search(text).group(1)  # type: ignore[union-attr]
    # What a viewer sees: the model, its key, builds, deployments, replicas and the test box.
    assert f'<code id="access-key">{model["access_key"]}</code>' in text and f'data-deployment="{deployment_id}"' in text
    assert f'data-build="{build_id}"' in text and 'id="test-form"' in text
    replica_id = re.search(r'data-replica="([a-z0-9-]+)"', text).group(1)  # type: ignore[union-attr]
    await replica_log(client, model_path, replica_id, "serving predict")
    # No buttons that act.
    for act in ('id="regenerate-key"', 'id="new-build"', 'id="delete-model"', "/stop\"", "/restart\"", "/deploy\"", 'class="deploy-form'):
        assert act not in text, act
    # The test request is a call, which /model allows every collaborator too.
    answer = await send_until_served(client, model_path, token, '{"a": 1, "b": 1}')
    assert answer["response"] == {"sum": 2}
    # Every action a viewer posts anyway is refused, and changes nothing.
    deployment_path = f"{model_path}/builds/{build_id}/deployments/{deployment_id}"
    for path, data in (
        (models_path, {"name": "mine", "file_path": "predict.py", "function_name": "predict", "build_and_deploy": "on"}),
        (model_path + "/regenerate-key", {}),
        (model_path + "/builds", {"file_path": "predict.py", "function_name": "predict", "deploy": "on"}),
        (f"{model_path}/builds/{build_id}/deploy", {"replicas": "1"}),
        (deployment_path + "/stop", {}),
        (deployment_path + "/restart", {}),
        (model_path + "/delete", {}),
    ):
        resp = await client.post(path, data={"csrf_token": token, **data}, allow_redirects=False)
        assert resp.status == 403, (path, resp.status, await resp.text())
        assert "you need the write permission" in await resp.text()
    _, after = await alice.get(f"/api/v2/projects/{pid}/models/{mid}")
    assert after["access_key"] == model["access_key"]
    _, listed = await alice.get(f"/api/v2/projects/{pid}/models")
    assert [m["id"] for m in listed["models"]] == [mid]
    _, builds = await alice.get(f"/api/v2/projects/{pid}/models/{mid}/builds")
    assert len(builds["model_builds"]) == 1
    _, deployment = await alice.get(f"/api/v2/projects/{pid}/models/{mid}/builds/{build_id}/deployments/{deployment_id}")
    assert deployment["status"] == "deployed"

    # Someone with no role on the project: every page and route is a 404, as if nothing were there.
    client.session.cookie_jar.clear()
    await sign_in(client, "stranger")
    token = await csrf_of(client, "/projects")
    await page(client, models_path, 404)
    await page(client, model_path, 404)
    resp = await client.get(f"{model_path}/replicas/{replica_id}/logs")
    assert resp.status == 404
    resp = await client.post(model_path + "/test", data={"csrf_token": token, "request": "{}"})
    assert resp.status == 404 and (await resp.json())["success"] is False
    resp = await client.post(deployment_path + "/stop", data={"csrf_token": token})
    assert resp.status == 404
    _, deployment = await alice.get(f"/api/v2/projects/{pid}/models/{mid}/builds/{build_id}/deployments/{deployment_id}")
    assert deployment["status"] == "deployed"
    del viewer
