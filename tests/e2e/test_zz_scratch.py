from typing import Any
from aiohttp.test_utils import TestClient

async def test_debug(client: TestClient, make_user: Any) -> None:
    await make_user("alice")
    r = await client.get("/favicon.ico")
    print("anon favicon", r.status, r.content_type, (await r.text())[:200])
    r = await client.get("/login")
    print("login", r.status, [ (c.key, c.value[:10]) for c in client.session.cookie_jar])
    r = await client.post("/login", data={"username": "alice", "password": "x", "csrf_token": "bad"})
    print("bad csrf login", r.status, (await r.text())[:300])
    import re
    r = await client.get("/login")
    tok = re.search(r'name="csrf_token" value="([^"]+)"', await r.text()).group(1)
    r = await client.post("/login", data={"username": "alice", "password": "correct horse", "csrf_token": tok}, allow_redirects=False)
    print("login ok", r.status, r.headers.get("Location"))
    r = await client.get("/projects/new")
    tok = re.search(r'name="csrf_token" value="([^"]+)"', await r.text()).group(1)
    import aiohttp
    fd = aiohttp.FormData(); fd.add_field("csrf_token", tok); fd.add_field("name", "P"); fd.add_field("template", "blank")
    r = await client.post("/projects/new", data=fd, allow_redirects=False)
    loc = r.headers["Location"]; print("create", r.status, loc, r.headers.getall("Set-Cookie", []))
    r = await client.get(loc, allow_redirects=False)
    print("page", r.status, r.headers.getall("Set-Cookie", []), re.findall(r'class="flash[^"]*"[^>]*>[^<]*', await r.text()))
    r = await client.get(loc, allow_redirects=False)
    print("page again", r.status, r.headers.getall("Set-Cookie", []), re.findall(r'class="flash[^"]*"[^>]*>[^<]*', await r.text()))
    r = await client.get("/favicon.ico")
    print("authed favicon", r.status, r.content_type)
