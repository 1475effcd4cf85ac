"""Applications and models on the container engine, for real, through Podman's Docker API: the
app and the replica listen on 127.0.0.1 inside their containers, as CML asks, and are reached
through the relay on the bridge network."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any

import aiodocker
import aiohttp
import pytest

from cml_appliance.app import create_app
from cml_appliance.auth import api_keys, users
from cml_appliance.core.settings import Settings
from cml_appliance.web.keys import POOL
from tests.conftest import BUSYBOX_IMAGE, Api, apps_listener, wait_build

APP = b'''import os
from http.server import BaseHTTPRequestHandler, HTTPServer


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        body = f"hello from {os.environ['CDSW_ENGINE_ID']} at {self.path}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


HTTPServer(("127.0.0.1", int(os.environ["CDSW_APP_PORT"])), Handler).serve_forever()
'''
MODEL = b'''def predict(args):
    return {"double": args["x"] * 2}
'''


@pytest.fixture
async def dana(aiohttp_client: Any, container_settings: Settings, python_image: str) -> Api:
    runtime = {
        "image_identifier": python_image, "editor": "Workbench", "kernel": "Python 3.11", "edition": "Standard",
        "description": "Debian with Python 3, for tests", "full_version": "1.0", "status": "ENABLED",
    }
    settings = dataclasses.replace(container_settings, runtimes=(*container_settings.runtimes, runtime))
    client = await aiohttp_client(create_app(settings))
    user = await users.create_user(client.app[POOL], "dana", "dana@example.com", "correct horse")
    return Api(client, (await api_keys.create(client.app[POOL], user))[0], "dana")


async def until_ok(what: Any, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = await what()
        if result is not None:
            return result
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.2)


async def test_application_and_model_in_containers(dana: Api, python_image: str, podman_url: str) -> None:
    _, project = await dana.post("/api/v2/projects", json={"name": "boxed apps"})
    pid = project["id"]
    form = aiohttp.FormData()
    form.add_field("app.py", APP, filename="app.py")
    form.add_field("predict.py", MODEL, filename="predict.py")
    await dana.post(f"/api/v2/projects/{pid}/files", data=form)

    status, app = await dana.post(f"/api/v2/projects/{pid}/applications", json={
        "name": "boxed", "subdomain": "boxed", "script": "app.py", "runtime_identifier": python_image})
    assert status == 200, app

    async def app_running() -> dict[str, Any] | None:
        _, body = await dana.get(f"/api/v2/projects/{pid}/applications/{app['id']}")
        assert body["status"] not in ("APPLICATION_FAILED", "APPLICATION_STOPPED"), body
        return body if body["status"] == "APPLICATION_RUNNING" else None

    await until_ok(app_running)
    async with apps_listener(dana.client) as apps:
        resp = await apps.get("/apps/boxed/deep/path", headers={"Authorization": f"Bearer {dana.key}"})
        text = await resp.text()
    assert resp.status == 200 and text.startswith("hello from ") and text.endswith(" at /deep/path"), text
    run_id = text.split()[2]
    docker = aiodocker.Docker(url=podman_url)
    try:
        info = await docker.containers.container(f"cml-{run_id}").show()
        assert info["Config"]["Image"].endswith(python_image.split("/", 1)[1])
        assert info["HostConfig"]["NetworkMode"] == "bridge"
        # Another container on the bridge cannot reach the app past the appliance's checks.
        app_ip = info["NetworkSettings"]["IPAddress"] or next(
            n["IPAddress"] for n in info["NetworkSettings"]["Networks"].values() if n.get("IPAddress"))
        probe = await docker.containers.run({
            "Image": python_image, "NetworkMode": "bridge", "Cmd": ["python3", "-c", (
                "import socket; s = socket.create_connection((%r, 18100), 5); s.sendall(b'GET / HTTP/1.0\\r\\n\\r\\n');"
                " print('got', repr(s.recv(100)))" % app_ip)]})
        try:
            await probe.wait(timeout=30)
            output = "".join(await probe.log(stdout=True, stderr=True))
        finally:
            await probe.delete(force=True)
        assert "HTTP" not in output and ("got b''" in output or "ConnectionResetError" in output), output
    finally:
        await docker.close()

    status, model = await dana.post(f"/api/v2/projects/{pid}/models", json={
        "name": "doubler", "disable_authentication": True, "auto_build_model": True,
        "auto_build_config": {"file_path": "predict.py", "function_name": "predict", "runtime_identifier": python_image},
        "auto_deploy_model": True, "auto_deployment_config": {"replicas": 1},
    })
    assert status == 200, model

    async def answered() -> dict[str, Any] | None:
        resp = await dana.client.post("/model", json={"accessKey": model["access_key"], "request": {"x": 21}})
        body = await resp.json()
        return body if resp.status == 200 else None

    built = await wait_build(dana, pid, model["id"], deployed=True)
    assert built["status"] == "built", built["failure_reason"]
    answer = await until_ok(answered)
    assert answer["success"] is True and answer["response"] == {"double": 42}
    replicas = await dana.client.app[POOL].fetch("SELECT engine, public_id FROM workloads WHERE kind = 'model_replica'")
    assert [r["engine"] for r in replicas] == ["container"]
    # The replica runs the built image, pulled through the appliance's registry proxy: its
    # /home/cdsw is the image's, not a folder of the host mounted in.
    build = await wait_build(dana, pid, model["id"])
    docker = aiodocker.Docker(url=podman_url)
    try:
        info = await docker.containers.container(f"cml-{replicas[0]['public_id']}").show()
    finally:
        await docker.close()
    assert info["Config"]["Image"].endswith(build["built_image"]), (info["Config"]["Image"], build["built_image"])
    # Nothing of the host but its own gRPC certificate, read-only.
    assert [b.split(":")[1] for b in info["HostConfig"].get("Binds") or []] == ["/run/cml/tls"], info["HostConfig"]["Binds"]

    status, _ = await dana.post(f"/api/v2/projects/{pid}/applications/{app['id']}:stop")
    assert status == 200


async def test_a_runtime_without_python_cannot_serve_an_application(dana: Api) -> None:
    _, project = await dana.post("/api/v2/projects", json={"name": "no python"})
    pid = project["id"]
    form = aiohttp.FormData()
    form.add_field("app.sh", b"sleep 600\n", filename="app.sh")  # runs (busybox has sh), but has no python3
    await dana.post(f"/api/v2/projects/{pid}/files", data=form)
    _, app = await dana.post(f"/api/v2/projects/{pid}/applications", json={
        "name": "bare", "subdomain": "bare", "script": "app.sh", "runtime_identifier": BUSYBOX_IMAGE})

    async def failed() -> dict[str, Any] | None:
        _, body = await dana.get(f"/api/v2/projects/{pid}/applications/{app['id']}")
        return body if body["status"] == "APPLICATION_FAILED" else None

    await until_ok(failed)
    reason = await dana.client.app[POOL].fetchval("SELECT reason FROM workloads WHERE kind = 'application'")
    assert "python3" in reason and "container_network" in reason, reason


async def test_a_container_workload_reaches_its_project_and_nothing_else(dana: Api, python_image: str,
                                                                         container_settings: Settings) -> None:
    """The same probe as the local sandbox's (tests/integration/test_sandbox.py), in a container."""
    import json

    from tests.integration.test_jobs_api import wait_run
    from tests.integration.test_sandbox import PROBE

    _, other = await dana.post("/api/v2/projects", json={"name": "Other"})
    secret_file = container_settings.projects_dir / other["id"] / "secret.txt"
    secret_file.write_text("not for containers")
    _, project = await dana.post("/api/v2/projects", json={"name": "Boxed"})
    pid = project["id"]
    form = aiohttp.FormData()
    form.add_field("probe.py", PROBE.encode(), filename="probe.py")
    form.add_field("mine.txt", b"mine", filename="mine.txt")
    await dana.post(f"/api/v2/projects/{pid}/files", data=form)
    db_socket = container_settings.data_dir / "postgres" / ".s.PGSQL.5432"
    _, job = await dana.post(f"/api/v2/projects/{pid}/jobs", json={
        "name": "probe", "script": "probe.py", "runtime_identifier": python_image,
        "arguments": f"{secret_file} {container_settings.data_dir} {db_socket} /home/cdsw/mine.txt"})
    _, run = await dana.post(f"/api/v2/projects/{pid}/jobs/{job['id']}/runs", json={})
    await wait_run(dana, pid, job["id"], run["id"], "ENGINE_SUCCEEDED", timeout=60)
    _, log = await dana.get(f"/api/v2/projects/{pid}/jobs/{job['id']}/runs/{run['id']}/logs")
    seen = json.loads(next(x for x in log["content"].splitlines() if x.startswith("PROBE ")).removeprefix("PROBE "))
    assert seen["uid"] == 8536, seen
    for name in ("other_project_file", "other_project_dir", "secret_key", "data_dir", "projects_dir",
                 "write_etc", "write_usr", "database_socket"):
        assert seen[name][0] == "refused", (name, seen)
    assert seen["own_file"] == ["ok", "mine"] and seen["write_home"][0] == "ok", seen
    assert (container_settings.projects_dir / pid / "written-inside.txt").read_text() == "from the sandbox"
