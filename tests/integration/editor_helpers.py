"""Helpers of the editor tests (test_editors.py, test_kubernetes.py): reach the editors'
listener, start a JupyterLab session, hand a signed-in user over, run code in a kernel."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import aiohttp
from aiohttp.test_utils import TestClient

from tests.conftest import Api


def editors_listener(client: TestClient) -> aiohttp.ClientSession:
    from cml_appliance.web.keys import EDITORS_ORIGIN

    return aiohttp.ClientSession(base_url=f"http://127.0.0.1:{client.app[EDITORS_ORIGIN].port}",
                                 cookie_jar=aiohttp.CookieJar(unsafe=True))


async def start_jupyterlab(api: Api, name: str = "notebooks", runtime: str = "host/jupyterlab") -> tuple[str, str]:
    _, project = await api.post("/api/v2/projects", json={"name": name})
    pid = project["id"]
    status, session = await api.post(f"/api/v2/projects/{pid}/sessions", json={"runtime_identifier": runtime})
    assert status == 200, session
    deadline = time.monotonic() + 60
    while True:
        _, current = await api.get(f"/api/v2/projects/{pid}/sessions/{session['id']}")
        if current["status"] == "ENGINE_RUNNING":
            return pid, session["id"]
        assert current["status"] in ("ENGINE_SCHEDULING", "ENGINE_STARTING"), current
        assert time.monotonic() < deadline, current
        await asyncio.sleep(0.2)


async def hand_over(ui: TestClient, editors: aiohttp.ClientSession, pid: str, sid: str) -> None:
    """What the session page's button does: the UI's one-time token, traded for the editors' cookie."""
    resp = await ui.get(f"/projects/{pid}/sessions/{sid}/editor", allow_redirects=False)
    assert resp.status == 303, await resp.text()
    handoff = resp.headers["Location"]
    assert handoff.startswith(f"{editors._base_url}/_cml/handoff?token=")
    resp = await editors.get(handoff, allow_redirects=False)
    assert resp.status == 303 and resp.headers["Location"] == f"/editors/{sid}/lab"
    cookie = resp.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/editors/" in cookie
    # Once only.
    resp = await editors.get(handoff, allow_redirects=False)
    assert resp.status == 400


async def until_ready(editors: aiohttp.ClientSession, path: str, timeout: float = 60) -> aiohttp.ClientResponse:
    """JupyterLab takes a few seconds to listen after the session runs: 503 meanwhile."""
    deadline = time.monotonic() + timeout
    while True:
        resp = await editors.get(path, allow_redirects=False)
        if resp.status != 503:
            return resp
        assert time.monotonic() < deadline, await resp.text()
        await asyncio.sleep(0.3)


async def run_in_kernel(editors: aiohttp.ClientSession, sid: str, code: str, origin: str) -> str:
    """Start a kernel through the proxy and run code over its WebSocket (Jupyter's protocol)."""
    resp = await editors.post(f"/editors/{sid}/api/kernels", json={"name": "python3"}, headers={"Origin": origin})
    assert resp.status == 201, await resp.text()
    kernel = await resp.json()
    msg_id = uuid.uuid4().hex
    request = {"header": {"msg_id": msg_id, "username": "", "session": uuid.uuid4().hex, "msg_type": "execute_request",
                          "version": "5.3", "date": ""},
               "parent_header": {}, "metadata": {}, "channel": "shell",
               "content": {"code": code, "silent": False, "store_history": False, "user_expressions": {},
                           "allow_stdin": False, "stop_on_error": True}, "buffers": []}
    output = []
    async with editors.ws_connect(f"/editors/{sid}/api/kernels/{kernel['id']}/channels", headers={"Origin": origin}) as ws:
        await ws.send_str(json.dumps(request))
        async with asyncio.timeout(60):
            async for message in ws:
                if message.type != aiohttp.WSMsgType.TEXT:
                    continue
                body = json.loads(message.data)
                if body.get("parent_header", {}).get("msg_id") != msg_id:
                    continue
                if body["msg_type"] == "stream":
                    output.append(body["content"]["text"])
                elif body["msg_type"] == "error":
                    output.append("ERROR " + body["content"]["evalue"])
                elif body["msg_type"] == "status" and body["content"]["execution_state"] == "idle":
                    break
    await editors.delete(f"/editors/{sid}/api/kernels/{kernel['id']}", headers={"Origin": origin})
    return "".join(output)
