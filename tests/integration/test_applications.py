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
from tests.conftest import Api, apps_listener, assert_error

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

    async with apps_listener(alice.client) as apps:
        await _lifecycle_through_the_listener(alice, bob, apps, pid, aid, running)


async def _lifecycle_through_the_listener(alice: Api, bob: Api, apps: aiohttp.ClientSession, pid: str, aid: str,
                                          running: dict[str, Any]) -> None:
    auth = {"Authorization": f"Bearer {alice.key}"}
    resp = await apps.get("/apps/dash/hello?x=1", headers=auth)
    assert resp.status == 200
    seen = await resp.json()
    assert seen == {"path": "/hello?x=1", "user": "alice", "auth": None, "cookie": None, "prefix": "/apps/dash"}
    resp = await apps.post("/apps/dash/echo", data=b"stressed", headers=auth)
    assert resp.status == 201 and await resp.read() == b"desserts"
    # A large answer streams, and like a HEAD keeps its length (download progress, resumes).
    for method in ("GET", "HEAD"):
        resp = await apps.request(method, "/apps/dash/big", headers=auth)
        assert resp.status == 200 and resp.headers.get("Content-Length") == "300000", (method, resp.headers)
        assert len(await resp.read()) == (300000 if method == "GET" else 0)
    # The UI's own origin serves no application: it sends API clients to the listener.
    resp = await alice.client.get("/apps/dash/hello?x=1", headers=auth, allow_redirects=False)
    assert resp.status == 307 and resp.headers["Location"] == f"{apps._base_url}/apps/dash/hello?x=1"

    # Viewers and up may open it; others see nothing there; the signed-out are asked to sign in.
    resp = await apps.get("/apps/dash/", headers={"Authorization": f"Bearer {bob.key}"})
    assert resp.status == 404
    await alice.put(f"/api/v2/projects/{pid}/collaborators/bob", json={"permission": "read"})
    resp = await apps.get("/apps/dash/", headers={"Authorization": f"Bearer {bob.key}"})
    assert resp.status == 200 and (await resp.json())["user"] == "bob"
    status, body = await bob.post(f"/api/v2/projects/{pid}/applications/{aid}:stop")
    assert_error(status, body, 403)
    resp = await apps.get("/apps/dash/x?y=1", allow_redirects=False)  # a browser: sign in on the UI first
    assert resp.status == 302 and resp.headers["Location"].endswith("/apps/dash/x?y=1")
    resp = await apps.post("/apps/dash/echo", data=b"x", allow_redirects=False)  # not a browser page: 401
    assert resp.status == 401
    resp = await alice.client.get("/apps/dash/", allow_redirects=False)
    assert resp.status == 302 and resp.headers["Location"].startswith("/login")
    resp = await apps.get("/apps/dash?tab=2", allow_redirects=False)  # relative links need the slash
    assert resp.status == 302 and resp.headers["Location"] == "/apps/dash/?tab=2"
    # A key for the API audience only does not open applications.
    _, api_only = await alice.post("/api/v2/users/alice/v2_keys", json={"audiences": ["API"]})
    resp = await apps.get("/apps/dash/", headers={"Authorization": f"Bearer {api_only['api_key']}"}, allow_redirects=False)
    assert resp.status == 401
    # The listener holds applications only: none of the UI, the API or the static files.
    for path in ("/", "/projects", "/api/v2/projects", "/login", "/static/js/app.js"):
        resp = await apps.get(path, headers=auth, allow_redirects=False)
        assert resp.status == 404, path

    status, stopped = await alice.post(f"/api/v2/projects/{pid}/applications/{aid}:stop")
    assert status == 200
    await wait_app(alice, pid, aid, "APPLICATION_STOPPED")
    resp = await apps.get("/apps/dash/", headers=auth)
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
    resp = await apps.get("/apps/dash/", headers=auth)
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
    async with apps_listener(alice.client) as apps:
        resp = await apps.get("/apps/nowhere/", headers={"Authorization": f"Bearer {alice.key}"})
        assert resp.status == 404


async def _start_dash(api: Api) -> tuple[str, str]:
    pid = await setup(api)
    _, app = await api.post(f"/api/v2/projects/{pid}/applications", json={"name": "Dashboard", "subdomain": "dash", "script": "app.py"})
    await wait_app(api, pid, app["id"], "APPLICATION_RUNNING")
    return pid, app["id"]


async def test_the_ui_hands_a_signed_in_user_over_to_the_applications_origin(alice: Api, bob: Api) -> None:
    """Opening an application from the UI: a one-time token moves the user to the applications'
    listener, whose cookie is its own. The UI's cookie opens nothing there, the hand-over works
    once, and signing out of the UI closes the application too."""
    from cml_appliance.applications.origin import APPS_COOKIE
    from tests.integration.test_web_ui import csrf_of, sign_in

    await _start_dash(alice)
    ui = alice.client
    await sign_in(ui, "alice")
    ui_cookie = ui.session.cookie_jar.filter_cookies(ui.make_url("/"))["cml_session"].value
    async with apps_listener(ui) as apps:
        resp = await ui.get("/apps/dash/hello?x=1", allow_redirects=False)
        assert resp.status == 303 and resp.headers["Cache-Control"] == "no-store"
        handoff = resp.headers["Location"]
        assert handoff.startswith(f"{apps._base_url}/_cml/handoff?token=")
        # The UI's sign-in cookie is not a credential of the applications' origin.
        resp = await apps.get("/apps/dash/hello", cookies={"cml_session": ui_cookie}, allow_redirects=False)
        assert resp.status == 302 and "/apps/dash/hello" in resp.headers["Location"]
        resp = await apps.get(handoff, allow_redirects=False)
        assert resp.status == 303 and resp.headers["Location"] == "/apps/dash/hello?x=1"
        cookie = resp.cookies[APPS_COOKIE]
        assert cookie["httponly"] and cookie["samesite"] == "Lax" and cookie["path"] == "/"
        # The application sees the user's name and its own cookies, never one of the appliance's.
        resp = await apps.get("/apps/dash/hello?x=1", cookies={"theme": "dark", "cml_session": ui_cookie})
        assert resp.status == 200
        seen = await resp.json()
        assert (seen["user"], seen["cookie"], seen["auth"]) == ("alice", "theme=dark", None)
        # A token works once.
        async with apps_listener(ui) as stranger:
            resp = await stranger.get(handoff, allow_redirects=False)
            assert resp.status == 400 and "expired" in await resp.text()
            assert APPS_COOKIE not in resp.cookies
            # A forged or tampered cookie opens nothing.
            forged = cookie.value.rsplit(".", 1)[0] + ".00"
            resp = await stranger.get("/apps/dash/", cookies={APPS_COOKIE: forged}, allow_redirects=False)
            assert resp.status == 302
        # Signing out of the UI signs out of its applications.
        token = await csrf_of(ui, "/projects")
        resp = await ui.post("/logout", data={"csrf_token": token}, allow_redirects=False)
        assert resp.status == 302
        resp = await apps.get("/apps/dash/hello", allow_redirects=False)
        assert resp.status == 302, "the applications' cookie outlived its sign-in session"
    # Someone who may not open the application gets no token for it (bob shares alice's test client).
    await sign_in(bob.client, "bob")
    resp = await bob.client.get("/apps/dash/", allow_redirects=False)
    assert resp.status == 404


async def test_applications_by_host_name_with_wildcard_dns(aiohttp_client: Any, settings: Settings) -> None:
    """With apps_domain, every application is an origin of its own: <subdomain>.<apps_domain>,
    on either listener; the hand-over lands on that host; the UI's host name serves no app."""
    from tests.integration.test_web_ui import sign_in

    client = await aiohttp_client(create_app(dataclasses.replace(settings, apps_domain="apps.test"), allow_local_git=True))
    user = await users.create_user(client.app[POOL], "carol", "carol@example.com", "correct horse")
    key, _ = await api_keys.create(client.app[POOL], user)
    carol = Api(client, key, "carol")
    await _start_dash(carol)
    auth = {"Authorization": f"Bearer {carol.key}"}
    for session in (client.session, None):
        headers = {**auth, "Host": "dash.apps.test"}
        if session is None:  # the applications' own listener answers the same host names
            async with apps_listener(client) as apps:
                resp = await apps.get("/anything?q=1", headers=headers)
                assert resp.status == 200 and (await resp.json())["path"] == "/anything?q=1"
        else:
            resp = await client.get("/anything?q=1", headers=headers)
            assert resp.status == 200 and (await resp.json())["path"] == "/anything?q=1"
    # The hand-over goes to the application's own host, and its token is for that host alone.
    await sign_in(client, "carol")
    resp = await client.get("/apps/dash/page", allow_redirects=False)
    assert resp.status == 303
    location = resp.headers["Location"]
    assert location.startswith("http://dash.apps.test/_cml/handoff?token=")
    path = location.removeprefix("http://dash.apps.test")
    resp = await client.get(path, headers={"Host": "other.apps.test"}, allow_redirects=False)
    assert resp.status == 400  # a token for dash is not one for other
    # Errors on an application's host are its origin's own small pages, never the UI's sign-in.
    resp = await client.post("/x", headers={"Host": "dash.apps.test"}, data=b"", allow_redirects=False)
    assert resp.status == 401 and "Content-Security-Policy" in resp.headers


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
    async with apps_listener(alice.client) as apps:
        ws = await apps.ws_connect("/apps/wsapp/ws", headers=auth)
        await ws.send_str("hello")
        msg = await ws.receive(timeout=5)
        assert msg.data == "echo:hello"
        await ws.close()
        resp = await apps.get("/apps/wsapp/stream", headers=auth)
        assert await resp.text() == "chunk0\nchunk1\nchunk2\n"
