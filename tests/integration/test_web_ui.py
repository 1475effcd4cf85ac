"""The web UI over HTTP: first-run set-up, sign-in, CSRF, throttling, pages and forms."""

from __future__ import annotations

import re
from typing import Any

import aiohttp
from aiohttp.test_utils import TestClient

from cml_appliance.web.keys import PROJECTS as PROJECTS_KEY
from tests.conftest import Api

CSRF_RE = re.compile(r'name="csrf_token" value="([^"]+)"')


async def csrf_of(client: TestClient, path: str) -> str:
    resp = await client.get(path)
    assert resp.status == 200, await resp.text()
    match = CSRF_RE.search(await resp.text())
    assert match, "the page has no CSRF token"
    return match.group(1)


async def sign_in(client: TestClient, username: str, password: str = "correct horse") -> aiohttp.ClientResponse:
    token = await csrf_of(client, "/login")
    return await client.post(
        "/login", data={"csrf_token": token, "username": username, "password": password, "next": "/projects"},
        allow_redirects=False,
    )


async def test_first_run_creates_the_administrator(client: TestClient) -> None:
    resp = await client.get("/login", allow_redirects=False)
    assert resp.status == 302 and resp.headers["Location"] == "/setup"
    token = await csrf_of(client, "/setup")
    resp = await client.post(
        "/setup", data={"csrf_token": token, "username": "boss", "email": "b@example.com", "password": "longenough"},
        allow_redirects=False,
    )
    assert resp.status == 302 and resp.headers["Location"] == "/projects"
    resp = await client.get("/admin/users")
    assert resp.status == 200 and "boss" in await resp.text()
    # Set-up happens once.
    resp = await client.get("/setup", allow_redirects=False)
    assert resp.headers["Location"] == "/login"
    client.session.cookie_jar.clear()
    resp = await client.post(
        "/setup", data={"csrf_token": token, "username": "intruder", "email": "i@example.com", "password": "longenough"},
    )
    assert resp.status in (403, 409)


async def test_sign_in_sets_a_safe_cookie_and_sign_out_ends_it(client: TestClient, alice: Api) -> None:
    resp = await sign_in(client, "alice")
    assert resp.status == 302 and resp.headers["Location"] == "/projects"
    cookie = resp.cookies["cml_session"]
    assert cookie["httponly"] and cookie["samesite"] == "Lax"
    resp = await client.get("/projects")
    assert resp.status == 200 and "Projects" in await resp.text()
    token = CSRF_RE.search(await resp.text()).group(1)  # type: ignore[union-attr]
    resp = await client.post("/logout", data={"csrf_token": token}, allow_redirects=False)
    assert resp.status == 302
    resp = await client.get("/projects", allow_redirects=False)
    assert resp.status == 302 and resp.headers["Location"].startswith("/login")


async def test_forms_without_the_csrf_token_are_refused(client: TestClient, alice: Api) -> None:
    await sign_in(client, "alice")
    resp = await client.post("/settings/api-keys", data={"comments": "x"})
    assert resp.status == 403 and "expired" in await resp.text()
    resp = await client.post("/login", data={"username": "alice", "password": "correct horse"})
    assert resp.status == 403


async def test_wrong_passwords_are_throttled(client: TestClient, alice: Api) -> None:
    for _ in range(5):
        resp = await sign_in(client, "alice", "wrong password")
        assert resp.status == 401 and "Wrong username or password" in await resp.text()
    resp = await sign_in(client, "alice")  # even the right password waits now
    assert resp.status == 429 and "wait 15 minutes" in await resp.text()


async def test_deactivated_user_cannot_sign_in_or_use_keys(client: TestClient, make_user: Any) -> None:
    boss = await make_user("boss", admin=True)
    carol = await make_user("carol")
    await sign_in(client, "boss")
    token = await csrf_of(client, "/admin/users")
    resp = await client.post("/admin/users/carol", data={"csrf_token": token, "action": "deactivate"})
    assert resp.status == 200 and "deactivated" in await resp.text()
    status, _ = await carol.get("/api/v2/projects")
    assert status == 401
    client.session.cookie_jar.clear()
    resp = await sign_in(client, "carol")
    assert resp.status == 401
    del boss


async def test_admin_pages_are_for_site_admins_only(client: TestClient, alice: Api) -> None:
    await sign_in(client, "alice")
    resp = await client.get("/admin/users")
    assert resp.status == 403 and "site administrators" in await resp.text()


async def test_project_pages_create_upload_view(client: TestClient, alice: Api, bob: Api) -> None:
    await sign_in(client, "alice")
    token = await csrf_of(client, "/projects/new")
    form = aiohttp.FormData()
    form.add_field("csrf_token", token)
    form.add_field("name", "Web project")
    form.add_field("template", "upload")
    form.add_field("files", b"print('hello')\n", filename="hello.py", content_type="text/x-python")
    resp = await client.post("/projects/new", data=form)
    assert resp.status == 200
    page = await resp.text()
    assert "Created project Web project with 1 file(s)" in page and "hello.py" in page
    project_path = resp.url.path
    resp = await client.get(project_path + "/files/hello.py")
    assert "print(&#39;hello&#39;)" in await resp.text()

    # Bad input on a form gives a readable message, not a 500.
    form = aiohttp.FormData()
    form.add_field("csrf_token", token)
    form.add_field("name", "Web project")
    form.add_field("template", "blank")
    resp = await client.post("/projects/new", data=form)
    assert resp.status == 409 and "already have a project named" in await resp.text()

    # Another user's project page is a 404 page.
    client2_status, _ = await bob.get("/api/v2/projects" + project_path.removeprefix("/projects"))
    assert client2_status == 404

    # Environment variables through the form.
    resp = await client.post(project_path + "/environment", data={"csrf_token": token, "environment": "A=1\nbad line"})
    assert "write NAME=value" in await resp.text()
    resp = await client.post(project_path + "/environment", data={"csrf_token": token, "environment": "A=1\nB = two"})
    assert "Environment variables saved" in await resp.text()
    status, project = await alice.get("/api/v2/projects" + project_path.removeprefix("/projects"))
    assert project["environment"] == '{"A": "1", "B": "two"}'


async def test_api_key_page_shows_a_new_key_once(client: TestClient, alice: Api) -> None:
    await sign_in(client, "alice")
    token = await csrf_of(client, "/settings/api-keys")
    resp = await client.post("/settings/api-keys", data={"csrf_token": token, "comments": "laptop", "audiences": "API"})
    page = await resp.text()
    key = re.search(r'data-testid="new-api-key">([^<]+)<', page).group(1)  # type: ignore[union-attr]
    resp = await client.get("/api/v2/projects", headers={"Authorization": f"Bearer {key}"})
    assert resp.status == 200
    page = await (await client.get("/settings/api-keys")).text()
    assert key not in page and "laptop" in page


async def test_every_project_page_opens_for_a_project_with_folders_links_and_odd_names(client: TestClient, alice: Api) -> None:
    """The bug that hid here: any project holding a folder answered its page with a 500."""
    from cml_appliance.web.keys import PROJECTS

    _, project = await alice.post("/api/v2/projects", json={"name": "Folders"})
    root = client.app[PROJECTS].projects_dir / project["id"]
    (root / "a/b/c").mkdir(parents=True)
    (root / "a/b/c/deep.txt").write_text("deep\n")
    (root / "name with \"quotes\" & ünïcode.html").write_text("<script>alert(1)</script>")
    (root / "half.txt").write_bytes("é".encode() * 300_000)  # cut in the middle of a character at 512 KB
    (root / "in").symlink_to("a")
    await sign_in(client, "alice")
    base = f"/projects/{project['id']}"
    for path in ("", "/files", "/files/a", "/files/a/b/c", "/files/in/b", "/files/a/b/c/deep.txt", "/files/half.txt",
                 "/collaborators", "/settings", "/sessions", "/jobs", "/models", "/applications"):
        resp = await client.get(base + path)
        assert resp.status == 200, (path, await resp.text())
    text = await (await client.get(base + "/files/half.txt")).text()
    assert "Only the first 512 KB are shown" in text
    # Downloads keep odd names, and an HTML file is never shown on the UI's origin.
    resp = await client.get(base + "/download/" + "name%20with%20%22quotes%22%20%26%20%C3%BCn%C3%AFcode.html")
    assert resp.status == 200
    assert resp.headers["Content-Disposition"].startswith("attachment;")
    assert "filename*=UTF-8''name%20with%20%22quotes%22%20%26%20%C3%BCn%C3%AFcode.html" in resp.headers["Content-Disposition"]
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
    resp = await client.get(base + "/download/name%20with%20%22quotes%22%20%26%20%C3%BCn%C3%AFcode.html?inline=1")
    assert resp.headers["Content-Disposition"].startswith("attachment;")  # only raster images open inline
    # Every page carries the security headers.
    resp = await client.get(base)
    assert "script-src 'self'" in resp.headers["Content-Security-Policy"] and "frame-ancestors 'none'" in resp.headers["Content-Security-Policy"]
    assert resp.headers["X-Frame-Options"] == "DENY" and resp.headers["Referrer-Policy"] == "same-origin"


async def test_runtimes_whose_engine_is_missing_are_offered_disabled_with_why(client: TestClient, alice: Api) -> None:
    _, project = await alice.post("/api/v2/projects", json={"name": "Runtimes"})
    await sign_in(client, "alice")
    text = await (await client.get(f"/projects/{project['id']}/sessions")).text()
    options = re.findall(r"<option value=\"([^\"]+)\" ([^>]*)>([^<]*)</option>", text)
    host = [o for o in options if o[0] == "host/python3"]
    others = [o for o in options if o[0].startswith("localhost/")]
    assert host and "disabled" not in host[0][1]
    assert others and all("disabled" in o[1] and "needs the container engine" in o[2] for o in others)
    # The first runtime offered is one that can start.
    assert options[0][0] == "host/python3"


async def test_the_live_stream_is_for_those_who_may_read_the_project(client: TestClient, alice: Api, bob: Api) -> None:
    _, project = await alice.post("/api/v2/projects", json={"name": "Live"})
    resp = await client.get(f"/live?project={project['id']}", allow_redirects=False)
    assert resp.status in (302, 401)
    await sign_in(client, "bob")
    resp = await client.get(f"/live?project={project['id']}")
    assert resp.status == 404
    await sign_in(client, "alice")
    async with client.get(f"/live?project={project['id']}") as resp:
        assert resp.status == 200 and resp.content_type == "text/event-stream"
        await resp.content.readuntil(b"\n\n")  # retry: ...
        # A change in the project reaches the stream.
        await alice.patch(f"/api/v2/projects/{project['id']}", json={"description": "changed"})
        await alice.post(f"/api/v2/projects/{project['id']}/jobs", json={"name": "j", "script": "x.py"})
        first = await resp.content.readuntil(b"\n\n")
        second = await resp.content.readuntil(b"\n\n")
        assert first == b'event: change\ndata: {"table": "projects"}\n\n'
        assert second == b'event: change\ndata: {"table": "jobs"}\n\n'



async def test_project_pages_by_role(client: TestClient, alice: Api, bob: Api, make_user: Any) -> None:
    """Every project page for a stranger (404), a reader (pages yes, changes 403) and a writer."""
    await make_user("carol")
    await make_user("dave")
    _, project = await alice.post("/api/v2/projects", json={"name": "Roles"})
    pid = project["id"]
    await alice.put(f"/api/v2/projects/{pid}/collaborators/bob", json={"permission": "read"})
    await alice.put(f"/api/v2/projects/{pid}/collaborators/carol", json={"permission": "write"})
    form = aiohttp.FormData()
    form.add_field("keep.txt", b"kept", filename="keep.txt")
    await alice.post(f"/api/v2/projects/{pid}/files", data=form)
    _, session = await alice.post(f"/api/v2/projects/{pid}/sessions", json={"runtime_identifier": "host/python3"})
    base = f"/projects/{pid}"
    pages = ["", "/files", "/files/keep.txt", "/collaborators", "/settings", "/sessions", "/jobs", "/models",
             "/applications", f"/sessions/{session['id']}"]
    changes = ["/delete-file?path=keep.txt", "/mkdir", "/settings", "/environment", "/collaborators", "/delete"]
    for user, page_status, change_status in (("bob", 200, 403), ("dave", 404, 404)):
        await sign_in(client, user)
        token = await csrf_of(client, "/projects")
        for path in pages:
            resp = await client.get(base + path)
            assert resp.status == page_status, (user, path, resp.status)
        for path in changes:
            resp = await client.post(base + path, data={"csrf_token": token, "name": "x", "username": "x", "permission": "read"},
                                     allow_redirects=False)
            assert resp.status == change_status, (user, path, resp.status, await resp.text())
        # The terminal's transcript is for the session's owner and project admins only.
        resp = await client.get(f"/api/v2/projects/{pid}/sessions/{session['id']}/terminal/transcript")
        assert resp.status == (403 if user == "bob" else 404), (user, resp.status)
    assert (client.app[PROJECTS_KEY].projects_dir / pid / "keep.txt").exists()
    await alice.post(f"/api/v2/projects/{pid}/sessions/{session['id']}:stop")
