"""Sessions on the container engine, for real, through Podman's Docker-compatible API."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiodocker
import pytest

from cml_appliance.auth import api_keys, users
from cml_appliance.web.keys import POOL, SETTINGS, WORKLOADS
from tests.conftest import BUSYBOX_IMAGE, Api, assert_error
from tests.integration.sessions_helpers import (
    open_terminal,
    start_running_session,
    wait_status,
)


@pytest.fixture
async def carl(container_client: Any) -> Api:
    pool = container_client.app[POOL]
    user = await users.create_user(pool, "carl", "carl@example.com", "correct horse")
    secret, _ = await api_keys.create(pool, user)
    return Api(container_client, secret, "carl")


async def test_container_session_runs_limited_and_stops(carl: Api) -> None:
    _, project = await carl.post("/api/v2/projects", json={"name": "boxed"})
    pid = project["id"]
    session = await start_running_session(carl, pid, runtime_identifier=BUSYBOX_IMAGE, resource_profile_id=1)
    assert session["engine"] == "container"
    sid = session["id"]

    docker = aiodocker.Docker(url=carl.client.app[SETTINGS].container_engine_url)
    try:
        info = await docker.containers.container(f"cml-{sid}").show()
    finally:
        await docker.close()
    host = info["HostConfig"]
    assert host["Memory"] == 2 * 1024**3 and host["NanoCpus"] == 1_000_000_000 and host["PidsLimit"] > 0
    assert host["Init"] is True and "no-new-privileges" in " ".join(host.get("SecurityOpt") or [])
    assert info["Config"]["User"] != "" and not info["Config"]["User"].startswith("0")
    assert info["Config"]["Labels"]["cml.workload"] == sid

    term = await open_terminal(carl, pid, sid)
    await term.resize(90, 30)
    await term.send("id -u; stty size; echo $CDSW_ENGINE_ID-$CDSW_APP_PORT; touch made-in-container; pwd\n")
    await term.expect(f"{sid}-8100")
    await term.expect("30 90")
    screen = await term.expect("/home/cdsw")
    assert "\n0\r" not in screen  # not root
    project_dir = carl.client.app[SETTINGS].projects_dir / pid
    assert (project_dir / "made-in-container").exists()

    status, logs = await carl.get(f"/api/v2/projects/{pid}/sessions/{sid}/logs")
    assert f"Session {sid} is running" in logs["content"]

    await carl.post(f"/api/v2/projects/{pid}/sessions/{sid}:stop")
    code, _ = await term.wait_closed()
    assert code == 4000
    final = await wait_status(carl, pid, sid, "ENGINE_STOPPED")
    assert final["finished_at"]
    # The container is removed once its output is kept.
    docker = aiodocker.Docker(url=carl.client.app[SETTINGS].container_engine_url)
    try:
        for _ in range(50):
            listed = await docker.containers.list(all=True, filters={"label": [f"cml.workload={sid}"]})
            if not listed:
                break
            await asyncio.sleep(0.1)
        assert listed == []
    finally:
        await docker.close()


async def test_missing_image_fails_with_a_reason(carl: Api, container_settings: Any) -> None:
    from cml_appliance.runtimes import catalog

    await catalog.seed_runtimes(carl.client.app[POOL], [{
        "image_identifier": "localhost/never-built:0", "editor": "x", "kernel": "x", "edition": "x", "full_version": "0",
    }])
    _, project = await carl.post("/api/v2/projects", json={"name": "noimage"})
    status, body = await carl.post(f"/api/v2/projects/{project['id']}/sessions", json={"runtime_identifier": "localhost/never-built:0"})
    assert status == 200
    final = await wait_status(carl, project["id"], body["id"], "ENGINE_FAILED")
    assert "never-built" in final["reason"]


async def test_engine_unreachable_is_503_and_running_rows_fail(carl: Api, tmp_path: Path) -> None:
    _, project = await carl.post("/api/v2/projects", json={"name": "outage"})
    pid = project["id"]
    session = await start_running_session(carl, pid, runtime_identifier=BUSYBOX_IMAGE)
    workloads = carl.client.app[WORKLOADS]
    engine = workloads.engines["container"]
    real_url = engine.url
    # Point the engine at a socket that does not exist, as if Podman had gone away.
    await engine.close()
    engine._docker = None
    engine.url = f"unix://{tmp_path}/gone.sock"
    try:
        status, body = await carl.post(f"/api/v2/projects/{pid}/sessions", json={"runtime_identifier": BUSYBOX_IMAGE})
        assert_error(status, body, 503)
        assert "cannot be reached" in body["message"]
        await workloads.reconcile("container")
        failed = await wait_status(carl, pid, session["id"], "ENGINE_FAILED")
        assert "cannot be reached" in failed["reason"]
        # The local engine and the rest of the API carry on.
        status, _ = await carl.get("/api/v2/projects")
        assert status == 200
        local = await start_running_session(carl, pid)
        await carl.post(f"/api/v2/projects/{pid}/sessions/{local['id']}:stop")
    finally:
        await engine.close()
        engine._docker = None
        engine.url = real_url
        # Podman still runs the container the outage hid: the next reconciliation removes it.
        counts = await workloads.reconcile("container")
        assert counts["orphans_stopped"] == 1
