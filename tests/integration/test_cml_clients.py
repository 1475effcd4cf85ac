"""Existing CML clients, unmodified: an Airflow-style operator that finds a project and a job by
name, starts a run and polls it; and the model chain followed by `curl` as Cloudera's docs show."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from typing import Any

import aiohttp

from tests.conftest import Api, require_tool, wait_build


async def find_by_name(api: Api, path: str, key: str, name: str) -> dict[str, Any]:
    """Pages through a CML list with search_filter, as cmlapi.utils.Cursor does."""
    token = ""
    while True:
        params = {"search_filter": json.dumps({"name": name}), "page_size": "2"}
        if token:
            params["page_token"] = token
        status, body = await api.get(path, params=params)
        assert status == 200, body
        for item in body[key]:
            if item["name"] == name:
                return item
        token = body["next_page_token"]
        if not token:
            raise AssertionError(f"{name!r} not found in {path}")


async def test_airflow_style_operator(alice: Api) -> None:
    for n in range(5):
        await alice.post("/api/v2/projects", json={"name": f"etl-{n}"})
    project = await find_by_name(alice, "/api/v2/projects", "projects", "etl-3")
    form = aiohttp.FormData()
    form.add_field("load.py", b"import os\nprint('loading', os.environ.get('START_DATE'))\n", filename="load.py")
    await alice.post(f"/api/v2/projects/{project['id']}/files", data=form)
    for name in ("extract", "load", "report"):
        await alice.post(f"/api/v2/projects/{project['id']}/jobs", json={"name": name, "script": "load.py"})
    job = await find_by_name(alice, f"/api/v2/projects/{project['id']}/jobs", "jobs", "load")
    status, run = await alice.post(f"/api/v2/projects/{project['id']}/jobs/{job['id']}/runs",
                                   json={"environment": {"START_DATE": "2026-11-01"}})
    assert status == 200
    deadline = time.monotonic() + 20
    while run["status"] not in ("ENGINE_SUCCEEDED", "ENGINE_FAILED", "ENGINE_TIMEDOUT", "ENGINE_STOPPED"):
        assert time.monotonic() < deadline, run
        await asyncio.sleep(0.2)
        _, run = await alice.get(f"/api/v2/projects/{project['id']}/jobs/{job['id']}/runs/{run['id']}")
    assert run["status"] == "ENGINE_SUCCEEDED"
    _, logs = await alice.get(f"/api/v2/projects/{project['id']}/jobs/{job['id']}/runs/{run['id']}/logs")
    assert "loading 2026-11-01" in logs["content"]


async def test_model_chain_then_curl_as_the_docs_show(alice: Api) -> None:
    require_tool(shutil.which("curl") is not None, "curl")
    _, project = await alice.post("/api/v2/projects", json={"name": "scoring"})
    pid = project["id"]
    form = aiohttp.FormData()
    form.add_field("predict.py", b"def predict(args):\n    return {'result': args['feature'] * 2}\n", filename="predict.py")
    await alice.post(f"/api/v2/projects/{pid}/files", data=form)
    _, model = await alice.post(f"/api/v2/projects/{pid}/models", json={"project_id": pid, "name": "double", "description": "x2"})
    _, build = await alice.post(f"/api/v2/projects/{pid}/models/{model['id']}/builds", json={
        "project_id": pid, "model_id": model["id"], "file_path": "predict.py", "function_name": "predict",
        "runtime_identifier": "host/python3"})
    assert build["status"] in ("queued", "pending", "pushing", "built")  # the queue may have claimed it already
    build = await wait_build(alice, pid, model["id"], build["id"])
    assert build["status"] == "built", build
    status, _ = await alice.post(f"/api/v2/projects/{pid}/models/{model['id']}/builds/{build['id']}/deployments", json={
        "project_id": pid, "model_id": model["id"], "build_id": build["id"], "cpu": 1, "memory": 2})
    assert status == 200
    url = str(alice.client.make_url("/model"))
    body = json.dumps({"accessKey": model["access_key"], "request": {"feature": 21}})
    deadline = time.monotonic() + 20
    while True:
        proc = await asyncio.create_subprocess_exec(
            "curl", "-s", "-H", "Content-Type: application/json", "-H", f"Authorization: Bearer {alice.key}",
            "-d", body, url, stdout=asyncio.subprocess.PIPE)
        out, _ = await proc.communicate()
        answer = json.loads(out)
        if answer.get("success") or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    assert answer["success"] is True and answer["response"] == {"result": 42} and answer["ReplicaID"]
    # The in-session `cdsw.call_model` posts the same body to CDSW's older path.
    status, again = await alice.post("/api/altus-ds-1/models/call-model",
                                     json={"accessKey": model["access_key"], "request": {"feature": 4}})
    assert status == 200 and again["response"] == {"result": 8}, again
