"""Applications over CML API v2, reached through the appliance by path and by Host header."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any

import aiohttp

from cml_appliance.app import create_app
from cml_appliance.auth import api_keys, users
from cml_appliance.core.settings import Settings
from cml_appliance.web.keys import POOL
from tests.conftest import Api, assert_error

APP = b'''import http.server, json, os
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self, head=False):
        body = json.dumps({"path": self.path, "user": self.headers.get("X-Forwarded-User"),
                           "auth": self.headers.get("Authorization"), "cookie": self.headers.get("Cookie"),
                           "prefix": self.headers.get("X-Forwarded-Prefix")}).encode()
        if self.path == "/big":
            body = b"x" * 300000
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)
    def do_HEAD(self):
        self.do_GET(head=True)
    def do_POST(self):
        data = self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(201)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[::-1])
    def log_message(self, *args):
        pass
print("listening on", os.environ["CDSW_APP_PORT"], flush=True)
http.server.ThreadingHTTPServer(("127.0.0.1", int(os.environ["CDSW_APP_PORT"])), Handler).serve_forever()
'''


async def setup(api: Api) -> str:
    _, project = await api.post("/api/v2/projects", json={"name": "apps"})
    form = aiohttp.FormData()
    form.add_field("app.py", APP, filename="app.py")
    form.add_field("deaf.py", b"import time\ntime.sleep(600)\n", filename="deaf.py")
    await api.post(f"/api/v2/projects/{project['id']}/files", data=form)
    return project["id"]


async def wait_app(api: Api, pid: str, aid: str, wanted: str, timeout: float = 20) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    body: dict[str, Any] = {}
    while time.monotonic() < deadline:
        _, body = await api.get(f"/api/v2/projects/{pid}/applications/{aid}")
        if body.get("status") == wanted:
            return body
        await asyncio.sleep(0.1)
    raise AssertionError(f"application is {body.get('status')}, wanted {wanted}")


async def test_application_lifecycle_and_proxy(alice: Api, bob: Api) -> None:
    pid = await setup(alice)
    status, app = await alice.post(f"/api/v2/projects/{pid}/applications", json={
        "name": "Dashboard", "subdomain": "dash", "script": "app.py", "runtime_identifier": "host/python3",
    })
    assert status == 200, app
    assert app["status"] in ("APPLICATION_STARTING", "APPLICATION_RUNNING")
    aid = app["id"]
    running = await wait_app(alice, pid, aid, "APPLICATION_RUNNING")
    assert running["running_at"] and running["subdomain"] == "dash"

    client = alice.client
    resp = await client.get("/apps/dash/hello?x=1", headers={"Authorization": f"Bearer {alice.key}"})
    assert resp.status == 200
    seen = await resp.json()
    assert seen == {"path": "/hello?x=1", "user": "alice", "auth": None, "cookie": None, "prefix": "/apps/dash"}
    resp = await client.post("/apps/dash/echo", data=b"stressed", headers={"Authorization": f"Bearer {alice.key}"})
    assert resp.status == 201 and await resp.read() == b"desserts"
    # A large answer streams, and like a HEAD keeps its length (download progress, resumes).
    for method in ("GET", "HEAD"):
        resp = await client.request(method, "/apps/dash/big", headers={"Authorization": f"Bearer {alice.key}"})
        assert resp.status == 200 and resp.headers.get("Content-Length") == "300000", (method, resp.headers)
        assert len(await resp.read()) == (300000 if method == "GET" else 0)
    # By Host header, as with wildcard DNS.
    resp = await client.get("/anything", headers={"Authorization": f"Bearer {alice.key}", "Host": "dash.127.0.0.1:8080"})
    assert resp.status == 200 and (await resp.json())["path"] == "/anything"

    # Viewers and up may open it; others see nothing there; the signed-out are asked to sign in.
    resp = await client.get("/apps/dash/", headers={"Authorization": f"Bearer {bob.key}"})
    assert resp.status == 404
    await alice.put(f"/api/v2/projects/{pid}/collaborators/bob", json={"permission": "read"})
    resp = await client.get("/apps/dash/", headers={"Authorization": f"Bearer {bob.key}"})
    assert resp.status == 200 and (await resp.json())["user"] == "bob"
    status, body = await bob.post(f"/api/v2/projects/{pid}/applications/{aid}:stop")
    assert_error(status, body, 403)
    resp = await client.get("/apps/dash/", allow_redirects=False)
    assert resp.status == 302 and resp.headers["Location"].startswith("/login")
    resp = await client.get("/apps/dash?tab=2", allow_redirects=False)  # relative links need the slash
    assert resp.status == 302 and resp.headers["Location"] == "/apps/dash/?tab=2"
    # A key for the API audience only does not open applications.
    _, api_only = await alice.post("/api/v2/users/alice/v2_keys", json={"audiences": ["API"]})
    resp = await client.get("/apps/dash/", headers={"Authorization": f"Bearer {api_only['api_key']}"}, allow_redirects=False)
    assert resp.status == 302 and resp.headers["Location"].startswith("/login")

    status, stopped = await alice.post(f"/api/v2/projects/{pid}/applications/{aid}:stop")
    assert status == 200
    await wait_app(alice, pid, aid, "APPLICATION_STOPPED")
    resp = await client.get("/apps/dash/", headers={"Authorization": f"Bearer {alice.key}"})
    assert resp.status == 503

    status, restarted = await alice.post(f"/api/v2/projects/{pid}/applications/{aid}:restart")
    assert status == 200
    await wait_app(alice, pid, aid, "APPLICATION_RUNNING")
    _, listing = await alice.get(f"/api/v2/projects/{pid}/applications")
    assert [a["id"] for a in listing["applications"]] == [aid]
    status, patched = await alice.patch(f"/api/v2/projects/{pid}/applications/{aid}", json={**running, "description": "KPIs"})
    assert status == 200 and patched["description"] == "KPIs"
    status, body = await alice.delete(f"/api/v2/projects/{pid}/applications/{aid}")
    assert (status, body) == (200, {})
    resp = await client.get("/apps/dash/", headers={"Authorization": f"Bearer {alice.key}"})
    assert resp.status == 404


async def test_application_that_never_listens_fails_with_a_reason(aiohttp_client: Any, settings: Settings) -> None:
    client = await aiohttp_client(create_app(dataclasses.replace(settings, app_ready_timeout_seconds=1)))
    user = await users.create_user(client.app[POOL], "alice", "alice@example.com", "correct horse")
    alice = Api(client, (await api_keys.create(client.app[POOL], user))[0], "alice")
    pid = await setup(alice)
    _, app = await alice.post(f"/api/v2/projects/{pid}/applications", json={"name": "deaf", "subdomain": "deaf", "script": "deaf.py"})
    failed = await wait_app(alice, pid, app["id"], "APPLICATION_FAILED")
    run = await client.app[POOL].fetchrow("SELECT reason FROM workloads WHERE kind = 'application'")
    assert "did not answer" in run["reason"] and failed["stopped_at"]


async def test_bad_application_requests(alice: Api) -> None:
    pid = await setup(alice)
    await alice.post(f"/api/v2/projects/{pid}/applications", json={"name": "one", "subdomain": "taken", "script": "app.py"})
    for payload, code in (
        ({"name": "two", "subdomain": "taken", "script": "app.py"}, 409),
        ({"name": "x", "subdomain": "Bad_Sub", "script": "app.py"}, 400),
        ({"name": "x", "subdomain": "-x", "script": "app.py"}, 400),
        ({"name": "x", "subdomain": "modelservice", "script": "app.py"}, 400),
        ({"name": "x", "subdomain": "ok", "script": ""}, 400),
        ({"name": "x", "subdomain": "ok", "script": "app.py", "bypass_authentication": True}, 400),
        ({"name": "x", "subdomain": "ok", "script": "app.py", "runtime_identifier": "no/such"}, 400),
        ({"name": "x", "subdomain": "ok", "script": "app.py", "colour": "red"}, 400),
    ):
        status, body = await alice.post(f"/api/v2/projects/{pid}/applications", json=payload)
        assert_error(status, body, code)
    resp = await alice.client.get("/apps/nowhere/", headers={"Authorization": f"Bearer {alice.key}"})
    assert resp.status == 404


WS_APP = b'''import os
from aiohttp import web

async def index(request):
    return web.Response(text="ok")

async def echo(request):
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    async for msg in ws:
        await ws.send_str("echo:" + msg.data)
    return ws

async def stream(request):
    response = web.StreamResponse()
    await response.prepare(request)
    for i in range(3):
        await response.write(f"chunk{i}\\n".encode())
    return response

app = web.Application()
app.add_routes([web.get("/", index), web.get("/ws", echo), web.get("/stream", stream)])
web.run_app(app, host="127.0.0.1", port=int(os.environ["CDSW_APP_PORT"]), print=None)
'''


async def test_websockets_and_streams_pass_through(alice: Api) -> None:
    import os
    import sys

    _, project = await alice.post("/api/v2/projects", json={"name": "wsapp"})
    pid = project["id"]
    form = aiohttp.FormData()
    form.add_field("ws.py", WS_APP, filename="ws.py")
    await alice.post(f"/api/v2/projects/{pid}/files", data=form)
    # The app needs aiohttp: run it with this interpreter's environment.
    path = f"{os.path.dirname(sys.executable)}:{os.environ.get('PATH', '')}"
    _, app = await alice.post(f"/api/v2/projects/{pid}/applications", json={
        "name": "ws", "subdomain": "wsapp", "script": "ws.py", "environment": {"PATH": path},
    })
    await wait_app(alice, pid, app["id"], "APPLICATION_RUNNING")
    auth = {"Authorization": f"Bearer {alice.key}"}
    ws = await alice.client.ws_connect("/apps/wsapp/ws", headers=auth)
    await ws.send_str("hello")
    msg = await ws.receive(timeout=5)
    assert msg.data == "echo:hello"
    await ws.close()
    resp = await alice.client.get("/apps/wsapp/stream", headers=auth)
    assert await resp.text() == "chunk0\nchunk1\nchunk2\n"
