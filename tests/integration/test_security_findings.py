"""Findings of the security review (issue 9), each with its regression test."""

from __future__ import annotations

from typing import Any

import aiohttp
from aiohttp.test_utils import TestClient

from tests.conftest import Api, apps_listener
from tests.integration.test_web_ui import csrf_of, sign_in


def multipart(fields: dict[str, str]) -> aiohttp.FormData:
    form = aiohttp.FormData()
    for name, value in fields.items():
        form.add_field(name, value)
    form.add_field("ignored", b"x", filename="x.bin")  # forces multipart/form-data
    return form


async def test_sign_in_never_redirects_off_site(client: TestClient, alice: Api) -> None:
    for bad in ("//evil.example/x", "/\t/evil.example/x", "/%09/evil.example", "/\\evil.example", "https://evil.example/",
                "/\n/evil.example", "/\x00/x", "javascript:alert(1)"):
        token = await csrf_of(client, "/login")
        resp = await client.post("/login", data={"csrf_token": token, "username": "alice", "password": "correct horse",
                                                 "next": bad}, allow_redirects=False)
        assert resp.status == 302 and resp.headers["Location"] == "/projects", (bad, resp.headers.get("Location"))
        resp = await client.get("/login", params={"next": bad}, allow_redirects=False)
        assert 'value="/projects"' in await resp.text() or resp.status == 302, bad
    # Real paths still work, with their query.
    token = await csrf_of(client, "/login")
    resp = await client.post("/login", data={"csrf_token": token, "username": "alice", "password": "correct horse",
                                             "next": "/projects?q=a%20b"}, allow_redirects=False)
    assert resp.headers["Location"] == "/projects?q=a%20b"


async def test_multipart_forms_need_the_csrf_token_too(client: TestClient, make_user: Any) -> None:
    """A same-site page posting multipart/form-data used to skip the check entirely."""
    await make_user("root", admin=True)
    await sign_in(client, "root")
    for path, fields in (
        ("/admin/users", {"username": "mallory", "email": "m@example.com", "password": "longenough", "is_admin": "on"}),
        ("/settings/api-keys", {"comments": "stolen", "audiences": "API"}),
        ("/projects/new", {"name": "Planted", "template": "blank"}),
    ):
        resp = await client.post(path, data=multipart(fields), allow_redirects=False)
        assert resp.status == 403, (path, resp.status)
        assert "did not come from this site" in await resp.text()
    text = await (await client.get("/admin/users")).text()
    assert "mallory" not in text
    # With the token, multipart works as a plain form does.
    token = await csrf_of(client, "/admin/users")
    resp = await client.post("/admin/users", data=multipart({"csrf_token": token, "username": "carol", "email": "c@example.com",
                                                             "password": "longenough"}))
    assert resp.status == 200 and "Created user carol." in await resp.text()


async def test_login_csrf_is_refused_whatever_the_encoding(client: TestClient, alice: Api) -> None:
    fresh = aiohttp.ClientSession()  # a victim's browser: no pre-login cookie of ours
    try:
        for data in ({"username": "alice", "password": "correct horse"},
                     multipart({"username": "alice", "password": "correct horse"})):
            async with fresh.post(client.make_url("/login"), data=data, allow_redirects=False) as resp:
                assert resp.status == 403, resp.status
                assert "cml_session" not in resp.cookies
    finally:
        await fresh.close()


async def test_git_ref_is_never_an_option(client: TestClient, alice: Api, tmp_path: Any) -> None:
    for ref in ("--pathspec-from-file=/etc/passwd", "-b", "main branch", "a\nb"):
        status, body = await alice.post("/api/v2/projects", json={"name": f"r{len(ref)}", "template": "git",
                                                                   "git_url": "https://example.org/x.git", "git_ref": ref})
        assert status == 400 and "git_ref" in body["message"], (ref, body)
    _, listed = await alice.get("/api/v2/projects")
    assert listed["projects"] == []


async def test_operators_run_jobs_as_they_are(client: TestClient, alice: Api, bob: Api) -> None:
    """An operator may start a job but not change what it runs; loader variables are refused to all."""
    from cml_appliance.web.keys import PROJECTS

    _, project = await alice.post("/api/v2/projects", json={"name": "Ops"})
    pid = project["id"]
    (client.app[PROJECTS].projects_dir / pid / "job.py").write_text("print('ok')\n")
    await alice.put(f"/api/v2/projects/{pid}/collaborators/bob", json={"permission": "operator"})
    _, job = await alice.post(f"/api/v2/projects/{pid}/jobs", json={"name": "j", "script": "job.py"})
    runs = f"/api/v2/projects/{pid}/jobs/{job['id']}/runs"
    for body in ({"environment": {"PYTHONWARNINGS": "ignore::antigravity.x", "BROWSER": "sh -c id"}},
                 {"environment": {"HARMLESS": "1"}}, {"arguments": "--evil"}):
        status, answer = await bob.post(runs, json=body)
        assert status == 403 and "write role" in answer["message"], (body, answer)
    status, run = await bob.post(runs, json={})
    assert status == 200, run
    # A contributor overrides freely, except what makes programs load other code.
    for name in ("LD_PRELOAD", "PYTHONPATH", "PYTHONSTARTUP", "PYTHONWARNINGS", "BROWSER", "ld_audit", "NODE_OPTIONS"):
        status, answer = await alice.post(runs, json={"environment": {name: "/tmp/x"}})
        assert status == 400 and name in answer["message"], (name, answer)


async def test_a_workloads_own_key_cannot_create_projects(client: TestClient, alice: Api) -> None:
    from cml_appliance.auth import api_keys, users
    from cml_appliance.web.keys import POOL

    _, project = await alice.post("/api/v2/projects", json={"name": "Home"})
    pool = client.app[POOL]
    user = await users.get_by_username(pool, "alice")
    assert user is not None
    project_row_id = await pool.fetchval("SELECT id FROM projects WHERE public_id = $1", project["id"])
    secret, _ = await api_keys.create(pool, user, scope_project_id=project_row_id)
    scoped = Api(client, secret, "alice")
    status, body = await scoped.post("/api/v2/projects", json={"name": "Escaped"})
    assert status == 403, body
    assert await pool.fetchval("SELECT count(*) FROM projects") == 1


async def test_input_that_used_to_be_a_500_is_a_400(client: TestClient, alice: Api) -> None:
    _, project = await alice.post("/api/v2/projects", json={"name": "Inputs"})
    pid = project["id"]
    headers = {"Authorization": f"Bearer {alice.key}", "Content-Type": "application/json"}

    async def raw(method: str, path: str, body: str) -> tuple[int, Any]:
        resp = await client.request(method, path, data=body.encode(), headers=headers)
        assert resp.content_type == "application/json", (path, body[:60], await resp.text())
        return resp.status, await resp.json()

    bad_bodies = [
        ("POST", "/api/v2/projects", '{"name": "a\\ud800b"}'),
        ("POST", "/api/v2/projects", '{"name": "a\\u0000b"}'),
        ("PATCH", f"/api/v2/projects/{pid}", '{"description": "x\\udfff"}'),
        ("PATCH", f"/api/v2/projects/{pid}", '{"environment": {"A": "x\\u0000y"}}'),
        ("POST", f"/api/v2/projects/{pid}/jobs", '{"name": "j", "script": "a.py", "cpu": NaN}'),
        ("POST", f"/api/v2/projects/{pid}/jobs", '{"name": "j", "script": "a.py", "memory": Infinity}'),
        ("POST", f"/api/v2/projects/{pid}/jobs", '{"name": "j", "script": "a.py", "memory": 1e-300}'),
        ("POST", f"/api/v2/projects/{pid}/jobs", '{"name": "j", "script": "a.py", "max_retry": 4294967296}'),
        ("POST", f"/api/v2/projects/{pid}/jobs", '{"name": "j", "script": "a.py", "retry_delay": 2147483648}'),
        ("POST", f"/api/v2/projects/{pid}/jobs", '{"name": "j", "script": "a.py", "schedule": "0 0 31 2 *"}'),
        ("POST", "/api/v2/projects", "[" * 100_000 + "]" * 100_000),
        ("POST", "/api/v2/projects", '{"a": ' + "[" * 5000 + "]" * 5000 + "}"),
    ]
    for method, path, body in bad_bodies:
        status, answer = await raw(method, path, body)
        assert status == 400, (path, body[:60], answer)
    for query in ({"search_filter": '{"name": "\\ud800"}'}, {"search_filter": '{"name": "\\u0000"}'},
                  {"search_filter": "[" * 100_000}):
        status, answer = await alice.get("/api/v2/projects", params=query)
        assert status == 400, (query, answer)
    _, session = await alice.post(f"/api/v2/projects/{pid}/sessions", json={"runtime_identifier": "host/python3"})
    status, answer = await alice.get(f"/api/v2/projects/{pid}/sessions/{session['id']}/logs", params={"offset": str(2**64)})
    assert status == 400, answer
    # Within int64 but past what the file system can seek to (found by the fuzzer): an empty chunk.
    status, answer = await alice.get(f"/api/v2/projects/{pid}/sessions/{session['id']}/logs", params={"offset": "287206280783117"})
    assert status == 200 and answer["content"] == "" and answer["next_offset"] == "287206280783117", answer
    await alice.post(f"/api/v2/projects/{pid}/sessions/{session['id']}:stop")
    # Files: a name past 255 bytes, a move under a file.
    form = aiohttp.FormData()
    form.add_field("x" * 300 + ".txt", b"long", filename="x" * 300 + ".txt")
    status, answer = await alice.post(f"/api/v2/projects/{pid}/files", data=form)
    assert status == 400, answer
    form = aiohttp.FormData()
    form.add_field("plain.txt", b"a file", filename="plain.txt")
    await alice.post(f"/api/v2/projects/{pid}/files", data=form)
    status, answer = await alice.patch(f"/api/v2/projects/{pid}/files/plain.txt", json={"path": "plain.txt/inside.txt"})
    assert status in (400, 409), answer
    form = aiohttp.FormData()
    form.add_field("other.txt", b"x", filename="other.txt")
    await alice.post(f"/api/v2/projects/{pid}/files", data=form)
    status, answer = await alice.patch(f"/api/v2/projects/{pid}/files/other.txt", json={"path": "plain.txt/deeper/x.txt"})
    assert status in (400, 409), answer
    # A header that is not text.
    resp = await client.get("/api/v2/projects", headers={"Authorization": "Bearer \xff\xfe"})
    assert resp.status == 401 and resp.content_type == "application/json"


async def test_the_model_endpoint_answers_json_to_anything(client: TestClient) -> None:
    for body in ("[" * 100_000, '{"accessKey": "x", "request": NaN}', '{"accessKey": "\\ud800", "request": {}}'):
        resp = await client.post("/model", data=body.encode(), headers={"Content-Type": "application/json"})
        assert resp.status in (400, 404) and resp.content_type == "application/json", (body[:40], await resp.text())


async def test_an_upload_in_flight_is_never_in_the_projects_tree_and_leftovers_are_swept(client: TestClient, alice: Api) -> None:
    import asyncio

    from cml_appliance.web.keys import PROJECTS

    _, project = await alice.post("/api/v2/projects", json={"name": "Uploads"})
    service = client.app[PROJECTS]
    root = service.projects_dir / project["id"]
    staging = service.projects_dir / ".uploads"
    halfway = asyncio.Event()
    proceed = asyncio.Event()

    async def body() -> Any:
        yield b"x" * 200_000
        halfway.set()
        await proceed.wait()
        yield b"y" * 1000

    form = aiohttp.FormData()
    form.add_field("big.bin", body(), filename="big.bin", content_type="application/octet-stream")
    upload = asyncio.ensure_future(alice.post(f"/api/v2/projects/{project['id']}/files", data=form))
    await halfway.wait()
    for _ in range(200):  # until the server has started writing
        if staging.exists() and any(staging.iterdir()):
            break
        await asyncio.sleep(0.01)
    assert any(staging.iterdir())
    assert [p.name for p in root.iterdir()] == [".git"]  # the repository, and no upload
    status, listing = await alice.get(f"/api/v2/projects/{project['id']}/files")
    assert listing["files"] == []
    proceed.set()
    status, info = await upload
    assert status == 200 and sorted(p.name for p in root.iterdir()) == [".git", "big.bin"]
    assert list(staging.iterdir()) == []
    # What a killed process left behind goes at the next start.
    (staging / "upload-left-by-a-crash").write_bytes(b"half")
    await service.fail_interrupted_creations()
    assert not staging.exists()


async def test_the_embedded_postgres_needs_its_password_even_on_its_socket(tmp_path: Any) -> None:
    import stat

    import asyncpg

    from cml_appliance.db.pool import database_url

    data_dir = tmp_path / "data"
    for attempt in range(2):  # the first start sets the password up, the second finds it
        async with database_url("", data_dir) as dsn:
            assert ":@" not in dsn
            conn = await asyncpg.connect(dsn)
            assert await conn.fetchval("SELECT 1") == 1
            await conn.close()
            without = dsn.split("://", 1)[0] + "://postgres:@" + dsn.split("@", 1)[1]
            try:
                await asyncpg.connect(without)
            except (asyncpg.InvalidPasswordError, asyncpg.InvalidAuthorizationSpecificationError) as exc:
                refused = str(exc)
            else:
                refused = ""
            assert "password" in refused, (attempt, refused)
    # Only the appliance lists or reads it (root lets Postgres's own system user pass through).
    assert stat.S_IMODE(data_dir.stat().st_mode) in (0o700, 0o711)
    assert stat.S_IMODE((data_dir / "postgres_password").stat().st_mode) == 0o600
    assert "trust" not in (data_dir / "postgres" / "pg_hba.conf").read_text().split("#")[-1]


async def test_git_urls_on_internal_addresses_are_refused(client: TestClient, alice: Api) -> None:
    """Resolved only, never fetched: the check runs before any clone."""
    for url in ("http://169.254.169.254/latest/meta-data.git", "https://127.0.0.1:8080/x.git", "https://localhost/x.git",
                "https://[::1]/x.git", "git://10.1.2.3/x.git", "ssh://git@192.168.1.1/x.git", "git@127.0.0.1:team/x.git",
                "https://0.0.0.0/x.git", "http://[fe80::1]/x.git"):
        status, body = await alice.post("/api/v2/projects", json={"name": f"n{abs(hash(url))}", "template": "git", "git_url": url})
        assert status == 400 and ("internal address" in body["message"] or "does not resolve" in body["message"]), (url, body)
    _, listed = await alice.get("/api/v2/projects")
    assert listed["projects"] == []


def test_git_host_names_the_host_of_every_url_form() -> None:
    from cml_appliance.projects.service import git_host

    assert git_host("https://user@github.com:443/o/r.git") == "github.com"
    assert git_host("git@github.com:o/r.git") == "github.com"
    assert git_host("git@[::1]:o/r.git") == "::1"
    assert git_host("ssh://git@10.0.0.1/o/r") == "10.0.0.1"
    assert git_host("/srv/repo") is None


async def test_what_a_first_fuzzing_run_found(client: TestClient, admin: Api, alice: Api) -> None:
    """DELETE /api/v2/cpuprofiles/2147483648 and a multipart upload without a boundary (or with a
    broken part) were 500s."""
    for profile_id in ("2147483648", "99999999999999999999", "-1", "x"):
        status, body = await admin.delete(f"/api/v2/cpuprofiles/{profile_id}")
        assert status in (400, 404), (profile_id, status, body)
    _, project = await alice.post("/api/v2/projects", json={"name": "Fuzzed"})
    url = f"/api/v2/projects/{project['id']}/files"
    for content_type, body in (("multipart/form-data", b"--x\r\n\r\n"),
                               ("multipart/form-data; boundary=7c51", b"--7c51\r\nNone--7c51--\r\n")):
        resp = await client.post(url, data=body, headers={"Authorization": f"Bearer {alice.key}", "Content-Type": content_type})
        assert resp.status == 400 and resp.content_type == "application/json", (content_type, await resp.text())
    # A page form sent as multipart without a boundary: a page that says so, not a 500.
    await sign_in(client, "alice")
    resp = await client.post("/admin/users", data=b"--x\r\n", headers={"Content-Type": "multipart/form-data"})
    assert resp.status == 400 and "could not be read" in await resp.text()


async def test_an_application_cannot_set_the_appliances_cookies(client: TestClient, alice: Api) -> None:
    import asyncio

    from cml_appliance.web.keys import PROJECTS

    app_py = (
        "import http.server, os\n"
        "class H(http.server.BaseHTTPRequestHandler):\n"
        "    def do_GET(self):\n"
        "        self.send_response(200)\n"
        "        self.send_header('Set-Cookie', 'cml_session=planted; Path=/')\n"
        "        self.send_header('Set-Cookie', 'CML_FLASH=x')\n"
        "        self.send_header('Set-Cookie', 'theme=dark; Path=/apps/cookies/')\n"
        "        self.send_header('Content-Length', '2'); self.end_headers(); self.wfile.write(b'ok')\n"
        "http.server.HTTPServer(('127.0.0.1', int(os.environ['CDSW_APP_PORT'])), H).serve_forever()\n")
    _, project = await alice.post("/api/v2/projects", json={"name": "Cookies"})
    (client.app[PROJECTS].projects_dir / project["id"] / "app.py").write_text(app_py)
    _, app = await alice.post(f"/api/v2/projects/{project['id']}/applications",
                              json={"name": "c", "subdomain": "cookies", "script": "app.py"})
    async with apps_listener(client) as apps:
        for _ in range(200):
            resp = await apps.get("/apps/cookies/", headers={"Authorization": f"Bearer {alice.key}"})
            if resp.status == 200:
                break
            await asyncio.sleep(0.1)
        assert resp.status == 200 and await resp.text() == "ok"
    cookies = resp.headers.getall("Set-Cookie", [])
    assert cookies == ["theme=dark; Path=/apps/cookies/"], cookies
    await alice.post(f"/api/v2/projects/{project['id']}/applications/{app['id']}:stop")
