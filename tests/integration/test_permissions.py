"""Permissions on every project route: no access reads as 404, a weaker role gets 403."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from tests.conftest import Api, assert_error

ROLES = ["none", "read", "operator", "write", "admin"]


def upload(name: str) -> aiohttp.FormData:
    data = aiohttp.FormData()
    data.add_field(name, b"content", filename=name)
    return data


# (method, path template, body factory, weakest role allowed)
ROUTES: list[tuple[str, str, Any, str]] = [
    ("GET", "/api/v2/projects/{pid}", None, "read"),
    ("PATCH", "/api/v2/projects/{pid}", lambda: {"json": {"description": "changed"}}, "write"),
    ("GET", "/api/v2/projects/{pid}/collaborators", None, "read"),
    ("PUT", "/api/v2/projects/{pid}/collaborators/carol", lambda: {"json": {"permission": "read"}}, "admin"),
    ("DELETE", "/api/v2/projects/{pid}/collaborators/dave", None, "admin"),
    ("GET", "/api/v2/projects/{pid}/files", None, "read"),
    ("GET", "/api/v2/projects/{pid}/files/readme.txt", None, "read"),
    ("POST", "/api/v2/projects/{pid}/files/readme.txt:download", None, "read"),
    ("POST", "/api/v2/projects/{pid}/files", lambda: {"data": upload("new.txt")}, "write"),
    ("PATCH", "/api/v2/projects/{pid}/files/readme.txt", lambda: {"json": {"path": "moved.txt"}}, "write"),
    ("DELETE", "/api/v2/projects/{pid}/files/readme.txt", None, "write"),
    ("DELETE", "/api/v2/projects/{pid}", None, "admin"),
]


@pytest.mark.parametrize("role", ROLES)
async def test_route_matrix(role: str, make_user: Any) -> None:
    owner = await make_user("owner")
    caller = await make_user("caller")
    await make_user("carol")
    await make_user("dave")
    for method, template, body, weakest in ROUTES:
        # A fresh project per route, so that a delete or move cannot affect the next check.
        status, project = await owner.post("/api/v2/projects", json={"name": f"{method} {template}"})
        pid = project["id"]
        await owner.post(f"/api/v2/projects/{pid}/files", data=upload("readme.txt"))
        await owner.put(f"/api/v2/projects/{pid}/collaborators/dave", json={"permission": "read"})
        if role != "none":
            status, _ = await owner.put(f"/api/v2/projects/{pid}/collaborators/caller", json={"permission": role})
            assert status == 200
        status, resp = await caller.call(method, template.format(pid=pid), **(body() if body else {}))
        allowed = role != "none" and ROLES.index(role) >= ROLES.index(weakest)
        where = f"{role} {method} {template}"
        if allowed:
            assert status == 200, (where, resp)
        elif role == "none":
            assert_error(status, resp, 404)
        else:
            assert_error(status, resp, 403)
        # Whatever was refused left the project as it was.
        if not allowed:
            _, files = await owner.get(f"/api/v2/projects/{pid}/files")
            assert [f["path"] for f in files["files"]] == ["readme.txt"], where
            _, got = await owner.get(f"/api/v2/projects/{pid}")
            assert got["description"] == ""


async def test_collaborators_crud(alice: Api, bob: Api) -> None:
    _, project = await alice.post("/api/v2/projects", json={"name": "team"})
    pid = project["id"]
    status, body = await alice.put(f"/api/v2/projects/{pid}/collaborators/bob", json={"permission": "write"})
    assert (status, body) == (200, {})
    status, body = await alice.get(f"/api/v2/projects/{pid}/collaborators")
    assert body["collaborators"] == [
        {"user": {"username": "bob", "name": "bob", "email": "bob@example.com"}, "permission": "write"}
    ]
    assert body["next_page_token"] == ""
    _, seen = await bob.get(f"/api/v2/projects/{pid}")
    assert seen["permissions"] == {
        "read": True, "operator": True, "write": True, "admin": False, "business_user": False, "inherit": False
    }
    await alice.put(f"/api/v2/projects/{pid}/collaborators/bob", json={"permission": "operator"})
    _, body = await alice.get(f"/api/v2/projects/{pid}/collaborators", params={"search_filter": '{"permission":"oper"}'})
    assert [c["permission"] for c in body["collaborators"]] == ["operator"]
    status, body = await alice.delete(f"/api/v2/projects/{pid}/collaborators/bob")
    assert (status, body) == (200, {})
    status, body = await bob.get(f"/api/v2/projects/{pid}")
    assert_error(status, body, 404)


async def test_bad_collaborator_requests(alice: Api, bob: Api) -> None:
    _, project = await alice.post("/api/v2/projects", json={"name": "team"})
    pid = project["id"]
    for user, payload, status_expected in (
        ("bob", {"permission": "god"}, 400),
        ("bob", {}, 400),
        ("bob", {"permission": "read", "username": "carol"}, 400),
        ("nobody", {"permission": "read"}, 400),
        ("alice", {"permission": "read"}, 400),
    ):
        status, body = await alice.put(f"/api/v2/projects/{pid}/collaborators/{user}", json=payload)
        assert_error(status, body, status_expected)
    status, body = await alice.delete(f"/api/v2/projects/{pid}/collaborators/bob")
    assert_error(status, body, 404)


async def test_unknown_project_and_another_users_project_look_the_same(alice: Api, bob: Api) -> None:
    _, project = await alice.post("/api/v2/projects", json={"name": "mine"})
    status_other, body_other = await bob.get(f"/api/v2/projects/{project['id']}")
    status_missing, body_missing = await bob.get("/api/v2/projects/zzzz-zzzz-zzzz-zzzz")
    assert status_other == status_missing == 404
    assert body_other["code"] == body_missing["code"]


async def test_site_admin_reaches_every_project(alice: Api, admin: Api) -> None:
    _, project = await alice.post("/api/v2/projects", json={"name": "private"})
    status, body = await admin.get(f"/api/v2/projects/{project['id']}")
    assert status == 200 and body["permissions"]["admin"]


async def test_only_site_admins_manage_cpu_profiles(alice: Api, admin: Api) -> None:
    status, body = await alice.post("/api/v2/cpuprofiles", json={"cpu": 8, "memory": 32})
    assert_error(status, body, 403)
    status, body = await admin.post("/api/v2/cpuprofiles", json={"cpu": 8, "memory": 32})
    assert status == 200
    pid = body["cpu_profile"]["id"]
    status, body = await alice.patch(f"/api/v2/cpuprofiles/{pid}", json={"cpu": 4})
    assert_error(status, body, 403)
    status, body = await alice.delete(f"/api/v2/cpuprofiles/{pid}")
    assert_error(status, body, 403)
