"""Teams: accounts that own projects, whose members hold team roles on them; teams as
collaborators; who may manage a team; a team never signs in."""

from __future__ import annotations

from typing import Any

import aiohttp

from tests.conftest import Api, assert_error
from tests.integration.test_web_ui import sign_in


async def upload(api: Api, pid: str, name: str, content: bytes = b"x") -> int:
    form = aiohttp.FormData()
    form.add_field(name, content, filename=name)
    status, _ = await api.post(f"/api/v2/projects/{pid}/files", data=form)
    return status


async def test_two_users_share_a_team_project_with_team_roles(make_user: Any) -> None:
    alice, bob, carol, dave = [await make_user(name) for name in ("alice", "bob", "carol", "dave")]
    status, team = await alice.post("/api/v2/site/teams", json={"username": "data-science", "bio": "the DS team"})
    assert status == 200 and team["username"] == "data-science" and team["members"] == "1", team
    assert (await alice.put("/api/v2/teams/data-science/members/bob", json={"permission": "write"}))[0] == 200
    assert (await alice.put("/api/v2/teams/data-science/members/carol", json={}))[0] == 200  # the default: read
    _, members = await bob.get("/api/v2/teams/data-science/members")
    assert {m["username"]: m["permission"] for m in members["members"]} == {"alice": "admin", "bob": "write", "carol": "read"}

    # A project of the team: made by a member with write, owned by the team.
    status, project = await bob.post("/api/v2/projects", json={"name": "churn", "team_name": "data-science"})
    assert status == 200 and project["owner"]["username"] == "data-science", project
    pid = project["id"]
    assert await upload(bob, pid, "train.py") == 200  # write
    assert await upload(carol, pid, "notes.txt") in (403, 404)  # read only
    status, files = await carol.get(f"/api/v2/projects/{pid}/files")
    assert status == 200 and "train.py" in [f["path"] for f in files["files"]]
    assert_error(*await dave.get(f"/api/v2/projects/{pid}"), 404)  # not a member: nothing there
    status, listed = await carol.get("/api/v2/projects")
    assert pid in [p["id"] for p in listed["projects"]]
    assert_error(*await carol.post("/api/v2/projects", json={"name": "mine", "team_name": "data-science"}), 403)
    # alice, the team's admin, administers its projects (collaborators).
    assert (await alice.put(f"/api/v2/projects/{pid}/collaborators/dave", json={"permission": "read"}))[0] == 200
    assert (await dave.get(f"/api/v2/projects/{pid}"))[0] == 200
    # Roles change at once: carol becomes a writer; bob leaves the team and loses the project.
    await alice.put("/api/v2/teams/data-science/members/carol", json={"permission": "write"})
    assert await upload(carol, pid, "notes.txt") == 200
    assert (await bob.delete("/api/v2/teams/data-science/members/bob"))[0] == 200
    assert_error(*await bob.get(f"/api/v2/projects/{pid}"), 404)

    # A team as a collaborator on someone's own project gives its members that permission.
    _, own = await dave.post("/api/v2/projects", json={"name": "dave's"})
    assert (await dave.put(f"/api/v2/projects/{own['id']}/collaborators/data-science", json={"permission": "operator"}))[0] == 200
    _, seen = await carol.get(f"/api/v2/projects/{own['id']}")
    assert seen["permissions"]["operator"] and not seen["permissions"]["write"], seen
    assert await upload(carol, own["id"], "x.txt") in (403, 404)


async def test_who_may_manage_a_team(make_user: Any, client: Any) -> None:
    alice, bob = await make_user("alice"), await make_user("bob")
    admin = await make_user("root", admin=True)
    await alice.post("/api/v2/site/teams", json={"username": "ml-ops", "permission": "operator"})
    assert_error(*await bob.put("/api/v2/teams/ml-ops/members/bob", json={"permission": "admin"}), 403)
    assert_error(*await bob.patch("/api/v2/teams/ml-ops", json={"bio": "mine now"}), 403)
    assert_error(*await bob.delete("/api/v2/teams/ml-ops"), 403)
    assert (await admin.put("/api/v2/teams/ml-ops/members/bob", json={}))[0] == 200  # a site admin may
    _, members = await alice.get("/api/v2/teams/ml-ops/members")
    assert {m["username"]: m["permission"] for m in members["members"]}["bob"] == "operator"  # the team's default
    # The last admin stays: no team without one.
    assert_error(*await alice.put("/api/v2/teams/ml-ops/members/alice", json={"permission": "read"}), 400)
    assert_error(*await alice.delete("/api/v2/teams/ml-ops/members/alice"), 400)
    # Names are shared with users; bad input is clear.
    assert_error(*await bob.post("/api/v2/site/teams", json={"username": "alice"}), 409)
    assert_error(*await bob.post("/api/v2/site/teams", json={"username": "Not A Name"}), 400)
    assert_error(*await bob.post("/api/v2/site/teams", json={"username": "synced", "cn": "cn=ds,ou=groups"}), 400)
    assert_error(*await bob.put("/api/v2/teams/ml-ops/members/nobody", json={}), 403)
    assert_error(*await alice.put("/api/v2/teams/ml-ops/members/nobody", json={}), 400)
    assert_error(*await alice.put("/api/v2/teams/ml-ops/members/bob", json={"permission": "owner"}), 400)
    # Synced teams need a directory.
    status, body = await alice.get("/api/v2/sync/teams/status")
    assert_error(status, body, 400)
    assert "directory" in body["message"]
    # A team that owns a project is not deleted with it; an empty one is.
    _, project = await alice.post("/api/v2/projects", json={"name": "pipeline", "team_name": "ml-ops"})
    assert_error(*await alice.delete("/api/v2/teams/ml-ops"), 400)
    await alice.delete(f"/api/v2/projects/{project['id']}")
    assert (await alice.delete("/api/v2/teams/ml-ops"))[0] == 200
    assert_error(*await alice.get("/api/v2/teams/ml-ops"), 404)


async def test_a_team_never_signs_in(make_user: Any, client: Any) -> None:
    alice = await make_user("alice")
    await alice.post("/api/v2/site/teams", json={"username": "analysts"})
    resp = await sign_in(client, "analysts", "whatever-password")
    assert resp.status != 302 or resp.headers.get("Location") != "/projects"
    status, body = await alice.get("/api/v2/users/analysts/v2_keys")
    assert status in (403, 404), body  # nobody holds a team's keys: it has none
