"""Projects over API v2: create from templates, get, patch, delete, list with paging, filters, sort."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from cml_appliance.web.keys import POOL, SUPERVISOR
from tests.conftest import Api, assert_error


async def test_create_get_patch_delete(alice: Api) -> None:
    status, project = await alice.post(
        "/api/v2/projects",
        json={"name": "Churn model", "description": "first", "template": "blank", "environment": {"A": "1"}},
    )
    assert status == 200, project
    assert project["name"] == "Churn model" and project["slug"] == "churn-model"
    assert project["owner"]["username"] == "alice" and project["creator"]["username"] == "alice"
    assert project["creation_status"] == "success" and project["visibility"] == "private"
    assert json.loads(project["environment"]) == {"A": "1"}
    assert project["permissions"]["admin"] is True
    assert project["created_at"].endswith("Z")

    status, got = await alice.get(f"/api/v2/projects/{project['id']}")
    assert status == 200 and got["id"] == project["id"]

    status, patched = await alice.patch(
        f"/api/v2/projects/{project['id']}",
        json={"description": "second", "environment": json.dumps({"B": "2"}), "id": project["id"], "owner": {"username": "x"}},
    )
    assert status == 200, patched
    assert patched["description"] == "second" and json.loads(patched["environment"]) == {"B": "2"}
    assert patched["owner"]["username"] == "alice"  # output-only fields are ignored

    status, body = await alice.delete(f"/api/v2/projects/{project['id']}")
    assert (status, body) == (200, {})
    status, body = await alice.get(f"/api/v2/projects/{project['id']}")
    assert_error(status, body, 404)


async def test_duplicate_name_is_409_and_slug_stays_unique(alice: Api, bob: Api) -> None:
    status, _ = await alice.post("/api/v2/projects", json={"name": "Demo"})
    assert status == 200
    status, body = await alice.post("/api/v2/projects", json={"name": "Demo"})
    assert_error(status, body, 409)
    status, other = await alice.post("/api/v2/projects", json={"name": "demo!"})
    assert status == 200 and other["slug"] == "demo-2"
    # Names are per owner: bob may have his own Demo.
    status, _ = await bob.post("/api/v2/projects", json={"name": "Demo"})
    assert status == 200


async def test_git_template_clones_the_repository(alice: Api, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q", "-b", "main", str(repo)], check=True)
    (repo / "train.py").write_text("print('hi')\n")
    subprocess.run(["git", "-C", str(repo), "add", "."], check=True)
    subprocess.run(
        ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@e", "commit", "-qm", "init"], check=True
    )
    status, project = await alice.post("/api/v2/projects", json={"name": "From git", "git_url": f"file://{repo}"})
    assert status == 200 and project["creation_status"] == "creating"
    await alice.client.app[SUPERVISOR].wait_idle()
    status, project = await alice.get(f"/api/v2/projects/{project['id']}")
    assert project["creation_status"] == "success", project
    status, listing = await alice.get(f"/api/v2/projects/{project['id']}/files")
    assert "train.py" in [f["path"] for f in listing["files"]]


async def test_git_clone_failure_is_reported(alice: Api, tmp_path: Path) -> None:
    status, project = await alice.post(
        "/api/v2/projects", json={"name": "Broken", "template": "git", "git_url": f"file://{tmp_path}/missing"}
    )
    assert status == 200
    await alice.client.app[SUPERVISOR].wait_idle()
    _, project = await alice.get(f"/api/v2/projects/{project['id']}")
    assert project["creation_status"] == "failure"
    assert "git failed" in project["creation_message"]


async def test_bad_create_requests(alice: Api) -> None:
    cases = [
        ({"name": ""}, "name"),
        ({"name": "x", "template": "Scala"}, "template"),
        ({"name": "x", "template": "git"}, "git_url is required"),
        ({"name": "x", "git_url": "ext::sh -c touch% /tmp/pwned"}, "git URL"),
        ({"name": "x", "git_url": "--upload-pack=touch /tmp/x"}, "git_url"),
        ({"name": "x", "visibility": "secret"}, "visibility"),
        ({"name": "x", "environment": {"1BAD": "v"}}, "environment variable name"),
        ({"name": "x", "environment": {"A": 1}}, "environment"),
        ({"name": 5}, "name"),
        ({"name": "x", "unknown_field": 1}, "unknown field"),
        ({"name": "x", "team_name": "t"}, "no team named 't'"),
        ({"name": "x", "shared_memory_limit": "64"}, "shared_memory_limit"),
    ]
    for payload, fragment in cases:
        status, body = await alice.post("/api/v2/projects", json=payload)
        assert_error(status, body, 400)
        assert fragment in body["message"], (payload, body)
    status, body = await alice.get("/api/v2/projects", params={"page_size": "5"})
    assert body["projects"] == []


async def test_malformed_and_oversized_bodies(alice: Api) -> None:
    for raw in (b"{", b"[1,2]", b"\xff\xfe", b'"text"'):
        status, body = await alice.post("/api/v2/projects", data=raw, headers={"Content-Type": "application/json"})
        assert_error(status, body, 400)
    big = json.dumps({"name": "x", "description": "y" * (2 * 1024 * 1024)})
    status, body = await alice.post("/api/v2/projects", data=big, headers={"Content-Type": "application/json"})
    assert_error(status, body, 413)
    status, body = await alice.get("/api/v2/projects")
    assert body["projects"] == []


async def _make_projects(api: Api, names: list[str]) -> None:
    for name in names:
        status, body = await api.post("/api/v2/projects", json={"name": name, "description": f"about {name}"})
        assert status == 200, body
    # The ordering tests rely on distinct times: each create is a transaction of its own, whose
    # now() (microseconds) follows the last one's.
    pool = api.client.app[POOL]
    assert await pool.fetchval("SELECT count(DISTINCT updated_at) = count(*) FROM projects") is True


async def test_paging_walks_every_project_once(alice: Api) -> None:
    names = [f"p{i:02d}" for i in range(23)]
    await _make_projects(alice, names)
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        params = {"page_size": "10", "sort": "+name"}
        if token:
            params["page_token"] = token
        status, body = await alice.get("/api/v2/projects", params=params)
        assert status == 200, body
        seen += [p["name"] for p in body["projects"]]
        token = body["next_page_token"]
        pages += 1
        if not token:
            break
    assert seen == sorted(names) and pages == 3


async def test_default_page_size_and_sort(alice: Api) -> None:
    await _make_projects(alice, [f"q{i}" for i in range(12)])
    status, body = await alice.get("/api/v2/projects")
    assert len(body["projects"]) == 10 and body["next_page_token"]
    # Default order: most recently updated first.
    assert body["projects"][0]["name"] == "q11"
    status, body = await alice.get("/api/v2/projects", params={"sort": "-name", "page_size": "3"})
    assert [p["name"] for p in body["projects"]] == ["q9", "q8", "q7"]
    # A literal '+' arrives as a space; both spell ascending.
    status, body = await alice.get("/api/v2/projects?sort=%2Bname,-updated_at&page_size=2")
    assert [p["name"] for p in body["projects"]] == ["q0", "q1"]
    status, body = await alice.get("/api/v2/projects?sort=+name&page_size=2")
    assert [p["name"] for p in body["projects"]] == ["q0", "q1"]


async def test_search_filter_substring_and_keys(alice: Api, bob: Api) -> None:
    await _make_projects(alice, ["fraud-demo", "Demo churn", "other"])
    status, body = await alice.get("/api/v2/projects", params={"search_filter": json.dumps({"name": "demo"})})
    assert sorted(p["name"] for p in body["projects"]) == ["Demo churn", "fraud-demo"]
    status, body = await alice.get(
        "/api/v2/projects", params={"search_filter": json.dumps({"owner.username": "ali", "description": "churn"})}
    )
    assert [p["name"] for p in body["projects"]] == ["Demo churn"]
    # Wildcards in the filter are literal.
    status, body = await alice.get("/api/v2/projects", params={"search_filter": json.dumps({"name": "%"})})
    assert body["projects"] == []


async def test_bad_list_parameters(alice: Api) -> None:
    await _make_projects(alice, ["a", "b", "c"])
    _, first = await alice.get("/api/v2/projects", params={"page_size": "1"})
    token = first["next_page_token"]
    cases = [
        {"page_size": "ten"},
        {"page_size": "-1"},
        {"page_size": "100000"},
        {"sort": "password"},
        {"search_filter": "{not json"},
        {"search_filter": "[]"},
        {"search_filter": json.dumps({"secret": "x"})},
        {"search_filter": json.dumps({"name": {"$ne": 1}})},
        {"page_token": "forged"},
        {"page_token": token[:-2] + "00"},
        # A token is bound to its query: another page size or filter is refused.
        {"page_token": token, "page_size": "2"},
        {"page_token": token, "page_size": "1", "sort": "name"},
    ]
    for params in cases:
        status, body = await alice.get("/api/v2/projects", params=params)
        assert_error(status, body, 400)


async def test_public_projects_and_admin_listing(alice: Api, bob: Api, admin: Api) -> None:
    await alice.post("/api/v2/projects", json={"name": "open", "visibility": "public"})
    await alice.post("/api/v2/projects", json={"name": "closed"})
    _, body = await bob.get("/api/v2/projects")
    assert body["projects"] == []
    _, body = await bob.get("/api/v2/projects", params={"include_public_projects": "true"})
    assert [p["name"] for p in body["projects"]] == ["open"]
    assert body["projects"][0]["permissions"]["read"] and not body["projects"][0]["permissions"]["write"]
    _, body = await admin.get("/api/v2/projects", params={"include_all_projects": "true"})
    assert sorted(p["name"] for p in body["projects"]) == ["closed", "open"]
