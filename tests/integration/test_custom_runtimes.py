"""Custom runtimes, docker credentials and runtime repos.

The whole path with the real things: an administrator builds a project into an image with the
source-to-image pipeline, registers that image as a runtime (pulled through the registry proxy
and run once by Podman to check it), and another user, who cannot read the image's project,
starts a session and a job on it. Credentials are sealed in the database and really used for
pulls (a wrong password fails the pull); images that cannot be runtimes are refused with why.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import shutil
from typing import Any

import aiodocker

from cml_appliance.app import create_app
from cml_appliance.web.keys import INTERNAL_URL, POOL, SETTINGS
from tests.conftest import BUSYBOX_IMAGE, Api, require_tool, user_maker, wait_build
from tests.integration.sessions_helpers import open_terminal, start_running_session, wait_status
from tests.integration.test_builds import project_with_files


async def test_docker_credentials_are_sealed_listed_without_secrets_and_one_default_per_server(admin: Api, alice: Api) -> None:
    status, made = await admin.post("/api/v2/dockercredentials", json={
        "name": "team registry", "server": "registry.example.com:5000", "username": "robot", "password": "s3cret-Pa55",
        "is_default": True})
    assert status == 200, made
    assert set(made) == {"id", "name", "server", "is_default"} and made["is_default"] is True
    sealed = await admin.client.app[POOL].fetchval("SELECT password_sealed FROM docker_credentials WHERE id = $1",
                                                   int(made["id"]))
    assert b"s3cret-Pa55" not in sealed and len(sealed) > 12
    # A second default for the same server takes over; the first is no longer the default.
    _, second = await admin.post("/api/v2/dockercredentials", json={
        "name": "second login", "server": "registry.example.com:5000", "username": "robot2", "password": "x", "is_default": True})
    status, listed = await alice.get("/api/v2/dockercredentials", params={"sort": "name"})
    assert status == 200 and [c["is_default"] for c in listed["docker_credentials"]] == [True, False], listed  # second login, team registry
    assert "robot" not in json.dumps(listed) and "s3cret" not in json.dumps(listed)
    status, found = await alice.get("/api/v2/dockercredentials", params={"search_filter": json.dumps({"name": "team"})})
    assert [c["name"] for c in found["docker_credentials"]] == ["team registry"], found

    # Only administrators change them; bad input is a clear 400, a taken name a 409.
    status, body = await alice.post("/api/v2/dockercredentials", json={"name": "mine", "server": "r.example.com",
                                                                       "username": "u", "password": "p"})
    assert status == 403, body
    status, body = await admin.post("/api/v2/dockercredentials", json={"name": "nopass", "server": "r.example.com", "username": "u"})
    assert status == 400 and "password is required" in body["message"], body
    status, body = await admin.post("/api/v2/dockercredentials", json={"name": "bad", "server": "not a host!",
                                                                       "username": "u", "password": "p"})
    assert status == 400 and "registry host" in body["message"], body
    status, body = await admin.post("/api/v2/dockercredentials", json={"name": "team registry", "server": "r.example.com",
                                                                       "username": "u", "password": "p"})
    assert status == 409, body

    status, renamed = await admin.patch(f"/api/v2/dockercredentials/{made['id']}", json={"name": "renamed"})
    assert status == 200 and renamed["name"] == "renamed" and renamed["server"] == "registry.example.com:5000", renamed
    assert await admin.client.app[POOL].fetchval("SELECT password_sealed FROM docker_credentials WHERE id = $1",
                                                 int(made["id"])) == sealed  # the password is kept
    status, body = await admin.patch("/api/v2/dockercredentials/999999", json={"name": "ghost"})
    assert status == 404, body
    status, body = await admin.call("DELETE", f"/api/v2/dockercredentials/{second['id']}")
    assert status == 200 and body == {}, body
    status, body = await admin.call("DELETE", f"/api/v2/dockercredentials/{second['id']}")
    assert status == 404, body

    # A credential is attached to a runtime; an unknown runtime or credential is a 404.
    status, body = await admin.post("/api/v2/runtimes/credential:set",
                                    json={"docker_credential_id": made["id"], "runtime_identifier": "host/python3"})
    assert status == 200 and body == {}, body
    assert await admin.client.app[POOL].fetchval(
        "SELECT docker_credential_id FROM runtimes WHERE image_identifier = 'host/python3'") == int(made["id"])
    status, body = await admin.post("/api/v2/runtimes/credential:set",
                                    json={"docker_credential_id": made["id"], "runtime_identifier": "nope/nope:1"})
    assert status == 404, body


async def test_runtime_repos_are_kept_and_listed(admin: Api, alice: Api) -> None:
    status, repo = await admin.post("/api/v2/runtimerepos", json={"name": "Cloudera", "url": "https://archive.example.com/runtimes.json"})
    assert status == 200 and isinstance(repo["id"], int), repo
    await admin.post("/api/v2/runtimerepos", json={"name": "Ours", "url": "http://intranet.example/rt.json"})
    status, listed = await alice.get("/api/v2/runtimerepos", params={"sort": "-name"})
    assert status == 200 and [r["name"] for r in listed["runtimerepos"]] == ["Ours", "Cloudera"], listed
    status, body = await admin.post("/api/v2/runtimerepos", json={"name": "ftp", "url": "ftp://x.example/rt"})
    assert status == 400 and "http" in body["message"], body
    status, body = await admin.post("/api/v2/runtimerepos", json={"name": "Cloudera", "url": "https://other.example/x"})
    assert status == 409, body
    status, body = await alice.post("/api/v2/runtimerepos", json={"name": "mine", "url": "https://x.example/"})
    assert status == 403, body
    status, updated = await admin.patch(f"/api/v2/runtimerepos/{repo['id']}", json={"url": "https://archive.example.com/v2.json"})
    assert status == 200 and updated == {"id": repo["id"], "name": "Cloudera", "url": "https://archive.example.com/v2.json"}
    status, body = await admin.patch(f"/api/v2/runtimerepos/{repo['id']}", json={"id": repo["id"] + 1, "name": "x"})
    assert status == 400, body
    status, body = await admin.call("DELETE", f"/api/v2/runtimerepos/{repo['id']}")
    assert status == 200 and body == {}
    status, listed = await alice.get("/api/v2/runtimerepos", params={"search_filter": json.dumps({"url": "archive"})})
    assert listed["runtimerepos"] == [], listed


async def test_without_a_container_engine_validation_says_why(admin: Api, alice: Api) -> None:
    status, body = await admin.get("/api/v2/runtimes:validate", params={"url": "registry.example.com/rt:1"})
    assert status == 200 and body["success"] is False and body["reason"] == "NO_CONTAINER_ENGINE", body
    status, body = await admin.get("/api/v2/runtimes:validate", params={"url": "Not An Image!"})
    assert status == 400 and "not an image reference" in body["message"], body
    status, body = await admin.post("/api/v2/runtimes", json={"url": "host/python3"})
    assert status == 400 and "host/" in body["message"], body
    status, body = await alice.get("/api/v2/runtimes:validate", params={"url": "registry.example.com/rt:1"})
    assert status == 403, body
    status, body = await admin.post("/api/v2/runtimes:update", json={"status": "DISABLED", "image_identifier": ["host/python3"]})
    assert status == 200 and body == {"rows_affected": 1}, body
    _, project = await alice.post("/api/v2/projects", json={"name": "p"})
    status, body = await alice.post(f"/api/v2/projects/{project['id']}/sessions", json={"runtime_identifier": "host/python3"})
    assert status == 400 and "disabled" in body["message"], body
    status, body = await admin.post("/api/v2/runtimes:update", json={"status": "GONE", "image_identifier": ["host/python3"]})
    assert status == 400, body
    status, body = await admin.post("/api/v2/runtimes:update", json={"status": "ENABLED", "runtime_id": [987654]})
    assert status == 404, body


async def test_an_admin_registers_a_built_image_and_another_user_works_on_it(
        aiohttp_client: Any, container_settings: Any, python_image: str) -> None:
    require_tool(shutil.which("docker-registry") is not None, "docker-registry (Debian package)")
    python_runtime = {"image_identifier": python_image, "editor": "Workbench", "kernel": "Python 3.11",
                      "edition": "Standard", "full_version": "bookworm", "status": "ENABLED"}
    settings = dataclasses.replace(container_settings, runtimes=(*container_settings.runtimes, python_runtime))
    client = await aiohttp_client(create_app(settings, allow_local_git=True))
    make = user_maker(client)
    admin, dana = await make("root-admin", admin=True), await make("dana")

    # The administrator's project, built by the source-to-image pipeline on the Python runtime.
    pid, directory = await project_with_files(admin)
    (directory / "toolbox.py").write_text("GREETING = 'from the custom runtime'\n")
    _, model = await admin.post(f"/api/v2/projects/{pid}/models", json={"name": "toolbox"})
    status, made = await admin.post(f"/api/v2/projects/{pid}/models/{model['id']}/builds",
                                    json={"file_path": "predict.py", "function_name": "predict",
                                          "runtime_identifier": python_image})
    assert status == 200, made
    built = await wait_build(admin, pid, model["id"], made["id"], timeout=180)
    assert built["status"] == "built", built
    image = f"{settings.domain}/{built['built_image']}"

    # Images that cannot be runtimes are refused, with why.
    status, body = await admin.get("/api/v2/runtimes:validate", params={"url": BUSYBOX_IMAGE})
    assert status == 200 and body["success"] is False and body["reason"] == "PYTHON3_MISSING", body
    status, body = await admin.get("/api/v2/runtimes:validate", params={"url": f"{settings.domain}/root-admin/nope/x:1"})
    assert body["success"] is False and body["reason"] == "IMAGE_PULL_FAILED", body
    status, body = await dana.post("/api/v2/runtimes", json={"url": image})
    assert status == 403, body

    status, registered = await admin.post("/api/v2/runtimes", json={"url": image})
    assert status == 200 and registered["validation_success"] and registered["insert_success"], registered
    details = registered["details"]
    assert details["kernel"] == "Python 3.11" and details["editor"] == "Workbench" and details["edition"] == "Custom", details
    assert details["version"] == built["id"] and details["registry"] == settings.domain, details
    status, again = await admin.post("/api/v2/runtimes", json={"url": image})
    assert again["insert_success"] is False and again["reason"] == "ALREADY_REGISTERED", again
    status, listed = await dana.get("/api/v2/runtimes", params={"search_filter": json.dumps({"edition": "Custom"})})
    assert [r["image_identifier"] for r in listed["runtimes"]] == [image], listed
    assert listed["runtimes"][0]["register_user_id"] > 0

    # Dana cannot read the administrator's project, yet her session runs on its image: the
    # appliance pulls it with the registrant's short-lived key.
    status, body = await dana.get(f"/api/v2/projects/{pid}")
    assert status in (403, 404), body
    _, project = await dana.post("/api/v2/projects", json={"name": "on custom"})
    session = await start_running_session(dana, project["id"], runtime_identifier=image)
    async with aiodocker.Docker(url=settings.container_engine_url) as docker:
        info = await docker.containers.container(f"cml-{session['id']}").show()
    internal_host = client.app[INTERNAL_URL].removeprefix("http://")
    assert info["Config"]["Image"] == f"{internal_host}/{built['built_image']}", info["Config"]
    term = await open_terminal(dana, project["id"], session["id"])
    await term.send("python3 -c 'import sys; print(\"py\", sys.version_info[0])'\n")
    await term.expect("py 3")
    await dana.post(f"/api/v2/projects/{project['id']}/sessions/{session['id']}:stop")
    await wait_status(dana, project["id"], session["id"], "ENGINE_STOPPED")

    # A job on it too; then the administrator disables the runtime and new sessions are refused.
    status, job = await dana.post(f"/api/v2/projects/{project['id']}/jobs", json={
        "name": "which python", "script": "which.py", "runtime_identifier": image})
    assert status == 200, job
    (client.app[SETTINGS].projects_dir / project["id"] / "which.py").write_text("import sys\nprint('ran on', sys.executable)\n")
    status, run = await dana.post(f"/api/v2/projects/{project['id']}/jobs/{job['id']}/runs", json={})
    assert status == 200, run
    for _ in range(600):
        _, run = await dana.get(f"/api/v2/projects/{project['id']}/jobs/{job['id']}/runs/{run['id']}")
        if run["status"] in ("ENGINE_SUCCEEDED", "ENGINE_FAILED"):
            break
        await asyncio.sleep(0.1)
    assert run["status"] == "ENGINE_SUCCEEDED", run
    status, body = await admin.post("/api/v2/runtimes:update", json={"status": "DISABLED", "image_identifier": [image]})
    assert body == {"rows_affected": 1}, body
    status, body = await dana.post(f"/api/v2/projects/{project['id']}/sessions", json={"runtime_identifier": image})
    assert status == 400 and "disabled" in body["message"], body


async def test_a_credential_is_what_pulls_the_image(aiohttp_client: Any, container_settings: Any, python_image: str) -> None:
    """A runtime validated with a docker credential is pulled with it: a wrong password fails the
    pull, the right one (an API key of the administrator) succeeds."""
    require_tool(shutil.which("docker-registry") is not None, "docker-registry (Debian package)")
    client = await aiohttp_client(create_app(container_settings, allow_local_git=True))
    admin = await user_maker(client)("root-admin", admin=True)
    pid, _ = await project_with_files(admin)
    _, model = await admin.post(f"/api/v2/projects/{pid}/models", json={"name": "m"})
    _, made = await admin.post(f"/api/v2/projects/{pid}/models/{model['id']}/builds",
                               json={"file_path": "predict.py", "function_name": "predict", "runtime_identifier": BUSYBOX_IMAGE})
    built = await wait_build(admin, pid, model["id"], made["id"], timeout=180)
    assert built["status"] == "built", built
    internal_host = client.app[INTERNAL_URL].removeprefix("http://")
    image = f"{internal_host}/{built['built_image']}"
    _, credential = await admin.post("/api/v2/dockercredentials", json={
        "name": "ours", "server": internal_host, "username": "root-admin", "password": "wrong"})
    status, body = await admin.get("/api/v2/runtimes:validate", params={"url": image, "docker_credential_id": credential["id"]})
    assert body["success"] is False and body["reason"] == "IMAGE_PULL_FAILED", body
    await admin.patch(f"/api/v2/dockercredentials/{credential['id']}", json={"password": admin.key})
    status, body = await admin.get("/api/v2/runtimes:validate", params={"url": image, "docker_credential_id": credential["id"]})
    # The pull now succeeds; busybox has no python3, which is the next check's finding.
    assert body["success"] is False and body["reason"] == "PYTHON3_MISSING", body
