"""Runtime catalog and resource profiles over API v2."""

from __future__ import annotations

import json

from tests.conftest import Api, assert_error


async def test_catalog_is_seeded_from_config_and_filterable(alice: Api) -> None:
    status, body = await alice.get("/api/v2/runtimes")
    assert status == 200
    ids = [r["image_identifier"] for r in body["runtimes"]]
    assert "host/python3" in ids  # runs with no containers
    host = next(r for r in body["runtimes"] if r["image_identifier"] == "host/python3")
    assert set(host) == {"image_identifier", "editor", "kernel", "edition", "description", "full_version", "status", "register_user_id"}

    _, body = await alice.get("/api/v2/runtimes", params={"search_filter": json.dumps({"edition": "host"})})
    assert [r["image_identifier"] for r in body["runtimes"]] == ["host/jupyterlab", "host/python3"]
    _, body = await alice.get("/api/v2/runtimes", params={"search_filter": json.dumps({"editor": "JupyterLab"})})
    assert [r["image_identifier"] for r in body["runtimes"]] == ["host/jupyterlab", "localhost/cml-runtime-jupyterlab:3.11"]
    _, body = await alice.get("/api/v2/runtimes", params={"search_filter": json.dumps({"kernel": "Python 3.11", "editor": "Workbench"})})
    assert [r["image_identifier"] for r in body["runtimes"]] == ["localhost/cml-runtime-python:3.11"]
    _, body = await alice.get("/api/v2/runtimes", params={"sort": "-kernel", "page_size": "1"})
    assert body["runtimes"][0]["kernel"] == "Python 3.11" and body["next_page_token"]
    kernels, token = [body["runtimes"][0]["kernel"]], body["next_page_token"]
    while token:  # one runtime a page, to the end
        _, page = await alice.get("/api/v2/runtimes", params={"sort": "-kernel", "page_size": "1", "page_token": token})
        kernels.append(page["runtimes"][0]["kernel"])
        token = page["next_page_token"]
    assert kernels == sorted(kernels, reverse=True) and kernels[-1] == "Python 3" and len(kernels) == len(ids)

    status, body = await alice.get("/api/v2/runtimes", params={"search_filter": json.dumps({"colour": "x"})})
    assert_error(status, body, 400)


async def test_cpu_profiles_lifecycle(alice: Api, admin: Api) -> None:
    status, body = await alice.get("/api/v2/cpuprofiles")
    assert status == 200
    seeded = [(p["cpu"], p["memory"]) for p in body["cpu_resource_profiles"]]
    assert seeded == [(1.0, 2.0), (2.0, 4.0)]

    status, created = await admin.post("/api/v2/cpuprofiles", json={"cpu": 0.5, "memory": 1})
    assert status == 200 and created["cpu_profile"]["cpu"] == 0.5
    pid = created["cpu_profile"]["id"]
    status, body = await admin.post("/api/v2/cpuprofiles", json={"cpu": 0.5, "memory": 1})
    assert_error(status, body, 409)
    status, body = await admin.patch(f"/api/v2/cpuprofiles/{pid}", json={"memory": 1.5})
    assert (status, body) == (200, {"rows_affected": 1})
    _, listing = await alice.get("/api/v2/cpuprofiles", params={"sort": "cpu"})
    assert listing["cpu_resource_profiles"][0] == {"id": pid, "cpu": 0.5, "memory": 1.5, "resource_group_id": 0}
    status, body = await admin.delete(f"/api/v2/cpuprofiles/{pid}")
    assert (status, body) == (200, {"rows_affected": 1})

    for payload in ({"cpu": 0, "memory": 1}, {"cpu": -1, "memory": 1}, {"cpu": 1}, {"cpu": "1", "memory": 1}, {"cpu": 1, "memory": 1e9}):
        status, body = await admin.post("/api/v2/cpuprofiles", json=payload)
        assert_error(status, body, 400)
    for path, code in (("/api/v2/cpuprofiles/999", 404), ("/api/v2/cpuprofiles/abc", 400)):
        status, body = await admin.delete(path)
        assert_error(status, body, code)
