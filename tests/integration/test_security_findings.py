"""Findings of the security review (issue 9), each with its regression test."""

from __future__ import annotations

from typing import Any

import aiohttp
from aiohttp.test_utils import TestClient

from tests.conftest import Api
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
