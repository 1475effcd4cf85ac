"""JupyterLab sessions: the runtime's own jupyter lab on a Unix socket, served through the editors'
listener (an origin of its own) to the session's owner only, HTTP and WebSockets (a kernel runs
code), with the hand-over from the UI and the checks that keep other origins and users out."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from tests.conftest import assert_error
from tests.integration.editor_helpers import editors_listener, hand_over, run_in_kernel, start_jupyterlab, until_ready
from tests.integration.test_web_ui import csrf_of, sign_in


@pytest.fixture
def jupyter_on_path(workload_python: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The host runtime runs what PATH finds: the workloads' Python, which has JupyterLab, first
    (set before the app starts, so that its sandbox binds that venv in)."""
    monkeypatch.setenv("PATH", f"{workload_python.parent}:{os.environ.get('PATH', '')}")
    return workload_python


async def test_a_jupyterlab_session_serves_its_owner_on_the_editors_origin(jupyter_on_path: Path, client: TestClient,
                                                                           make_user: Any) -> None:
    alice, bob = await make_user("alice"), await make_user("bob")
    pid, sid = await start_jupyterlab(alice)
    form = aiohttp.FormData()
    form.add_field("data/ünïcode notes.txt", b"hello", filename="data/ünïcode notes.txt")
    assert (await alice.post(f"/api/v2/projects/{pid}/files", data=form))[0] == 200
    from cml_appliance.web.context import SESSION_COOKIE

    await alice.put(f"/api/v2/projects/{pid}/collaborators/bob", json={"permission": "admin"})
    assert (await sign_in(client, "alice")).status == 302
    ui_cookie = next(c.value for c in client.session.cookie_jar if c.key == SESSION_COOKIE)
    async with editors_listener(client) as editors:
        origin = str(editors._base_url).rstrip("/")
        # Without the hand-over: nothing, and the UI's own cookie is no credential here.
        resp = await editors.get(f"/editors/{sid}/lab", headers={"Cookie": f"{SESSION_COOKIE}={ui_cookie}"})
        assert resp.status == 401
        await hand_over(client, editors, pid, sid)
        resp = await until_ready(editors, f"/editors/{sid}/lab")
        assert resp.status == 200 and "JupyterLab" in await resp.text()
        # The project's files are JupyterLab's, and a kernel runs in the session (sandboxed,
        # with the variables every workload gets).
        resp = await editors.get(f"/editors/{sid}/api/contents")
        assert resp.status == 200, await resp.text()
        assert "data" in [item["name"] for item in (await resp.json())["content"]]
        resp = await editors.get(f"/editors/{sid}/api/contents/data/ünïcode notes.txt")
        assert resp.status == 200 and (await resp.json())["content"] == "hello"
        out = await run_in_kernel(editors, sid, "import os; print(os.getuid(), os.environ['MLFLOW_TRACKING_URI'].endswith('/mlflow/' + os.environ['CDSW_PROJECT_ID']), os.getcwd())", origin)
        assert out.split()[1] == "True", out
        assert os.getuid() != 0 or out.split()[0] == "8536", out  # as root, the sandbox's uid

        # Another origin cannot drive it, not even with the owner's cookie (an application on
        # this host would send it): no state change, no WebSocket.
        resp = await editors.post(f"/editors/{sid}/api/kernels", json={"name": "python3"},
                                  headers={"Origin": "http://127.0.0.1:1"})
        assert resp.status == 403
        with pytest.raises(aiohttp.WSServerHandshakeError):
            await editors.ws_connect(f"/editors/{sid}/api/kernels/x/channels", headers={"Origin": "http://evil.example"})
        # The appliance's cookies never reach JupyterLab, and it cannot set them.
        resp = await editors.get(f"/editors/{sid}/api/me")
        assert resp.status == 200

    # bob, a project admin, still cannot open alice's editor; the UI's page does not offer it.
    assert (await sign_in(client, "bob")).status == 302
    resp = await client.get(f"/projects/{pid}/sessions/{sid}/editor", allow_redirects=False)
    assert resp.status == 403
    resp = await client.get(f"/projects/{pid}/sessions/{sid}")
    assert resp.status == 200 and 'id="open-editor"' not in await resp.text()

    # Stopped: the editor is gone and says so.
    await alice.post(f"/api/v2/projects/{pid}/sessions/{sid}:stop")
    from cml_appliance.web.keys import WORKLOADS

    deadline = time.monotonic() + 30
    while True:
        _, current = await alice.get(f"/api/v2/projects/{pid}/sessions/{sid}")
        if current["status"] == "ENGINE_STOPPED":
            break
        assert time.monotonic() < deadline, current
        await asyncio.sleep(0.2)
    assert not client.app[WORKLOADS].editors.directory(sid).exists()


async def test_jupyterlab_needs_jupyter_on_the_host(client: TestClient, make_user: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    alice = await make_user("alice")
    _, project = await alice.post("/api/v2/projects", json={"name": "no jupyter"})
    status, body = await alice.post(f"/api/v2/projects/{project['id']}/sessions", json={"runtime_identifier": "host/jupyterlab"})
    assert_error(status, body, 400)
    assert "pip install jupyterlab" in body["message"]


async def test_a_jupyterlab_session_in_a_container(aiohttp_client: Any, container_settings: Any, jupyterlab_image: str) -> None:
    """The same editor from the container runtime: its socket's folder is bound into that
    container alone; the kernel runs in the container, as uid 8536, with the project as its home."""
    import dataclasses

    from cml_appliance.app import create_app
    from tests.conftest import user_maker

    runtime = {"image_identifier": jupyterlab_image, "editor": "JupyterLab", "kernel": "Python 3.11", "edition": "Standard",
               "description": "JupyterLab, for tests", "full_version": "1.0", "status": "ENABLED"}
    settings = dataclasses.replace(container_settings, runtimes=(*container_settings.runtimes, runtime))
    client = await aiohttp_client(create_app(settings, allow_local_git=True))
    alice = await user_maker(client)("alice")
    pid, sid = await start_jupyterlab(alice, "container notebooks", runtime=jupyterlab_image)
    assert (await sign_in(client, "alice")).status == 302
    async with editors_listener(client) as editors:
        origin = str(editors._base_url).rstrip("/")
        await hand_over(client, editors, pid, sid)
        resp = await until_ready(editors, f"/editors/{sid}/lab", timeout=120)
        assert resp.status == 200 and "JupyterLab" in await resp.text()
        out = await run_in_kernel(editors, sid, "import os; print(os.getuid(), os.getcwd(), os.path.exists('/.dockerenv') or os.path.exists('/run/.containerenv'))", origin)
        uid, cwd, in_container = out.split()
        assert (uid, cwd, in_container) == ("8536", "/home/cdsw", "True"), out

    # The appliance restarts; the container (and its JupyterLab) keeps running, and the editor
    # is there again after a new hand-over: its socket and token do not depend on the process.
    await client.close()
    client = await aiohttp_client(create_app(settings, allow_local_git=True))
    assert (await sign_in(client, "alice")).status == 302
    async with editors_listener(client) as editors:
        origin = str(editors._base_url).rstrip("/")
        await hand_over(client, editors, pid, sid)
        resp = await until_ready(editors, f"/editors/{sid}/api/contents")
        assert resp.status == 200, await resp.text()
        assert (await run_in_kernel(editors, sid, "print(6 * 7)", origin)).strip() == "42"
    resp = await client.post(f"/projects/{pid}/sessions/{sid}/stop", data={"csrf_token": await csrf_of(client, f"/projects/{pid}/sessions/{sid}")})
    assert resp.status in (200, 302, 303)
