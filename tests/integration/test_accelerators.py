"""Resource groups and accelerators without a cluster: each engine is a resource group whose
kinds of workload an administrator opens and closes (a closed one refuses starts and says why);
GPU profiles per group; accelerator quotas are refused for accelerators that do not exist.
With the real cluster (a node made to offer GPUs): tests/integration/test_kubernetes.py."""

from __future__ import annotations

from tests.conftest import Api, assert_error


async def test_resource_groups_say_which_workloads_they_take(admin: Api, alice: Api) -> None:
    status, listed = await alice.get("/api/v2/resourcegroups")
    assert status == 200, listed
    (local,) = listed["resource_group"]
    assert local["name"] == "local" and local["cpu_count"] >= 1 and local["memory_in_gib"] >= 1 and local["gpu_count"] == "0"
    assert local["allow_sessions"] and local["allow_jobs"]

    _, project = await alice.post("/api/v2/projects", json={"name": "groups"})
    pid = project["id"]
    assert_error(*await alice.patch("/api/v2/resourcegroup", json={"id": local["id"], "allow_sessions": False}), 403)
    status, changed = await admin.patch("/api/v2/resourcegroup", json={"id": local["id"], "allow_sessions": False})
    assert status == 200 and changed["allow_sessions"] is False and changed["allow_jobs"] is True, changed
    status, body = await alice.post(f"/api/v2/projects/{pid}/sessions", json={"name": "refused"})
    assert_error(status, body, 400)
    assert "local resource group does not take sessions" in body["message"], body
    # Jobs still run there.
    _, job = await alice.post(f"/api/v2/projects/{pid}/jobs", json={"name": "j", "script": "j.py"})
    status, run = await alice.post(f"/api/v2/projects/{pid}/jobs/{job['id']}/runs", json={})
    assert status == 200, run
    await admin.patch("/api/v2/resourcegroup", json={"id": local["id"], "allow_sessions": True})
    status, body = await alice.post(f"/api/v2/projects/{pid}/sessions", json={"name": "allowed again"})
    assert status == 200, body
    assert_error(*await admin.patch("/api/v2/resourcegroup", json={"id": 9999, "allow_jobs": False}), 404)


async def test_gpu_profiles_and_accelerator_quotas(admin: Api, alice: Api) -> None:
    _, groups = await admin.get("/api/v2/resourcegroups")
    group = groups["resource_group"][0]["id"]
    status, made = await admin.post(f"/api/v2/nodelabels/{group}", json={"gpu_count": "2", "cpu": 8, "memory": 32})
    assert status == 200, made
    profile = made["accelerator_node_label"]
    assert profile["max_gpu_count"] == "2" and profile["cpu"] == 8 and profile["resource_group_id"] == str(group)
    assert_error(*await admin.post(f"/api/v2/nodelabels/{group}", json={"gpu_count": "2", "cpu": 4, "memory": 8}), 400)
    assert_error(*await admin.post(f"/api/v2/nodelabels/{group}", json={"gpu_count": "0", "cpu": 4, "memory": 8}), 400)
    assert_error(*await admin.post("/api/v2/nodelabels/777", json={"gpu_count": "1", "cpu": 4, "memory": 8}), 404)
    status, body = await admin.patch(f"/api/v2/nodelabels/{group}/gpuprofile",
                                     json={"id": profile["id"], "gpu_count": "4", "cpu": 16, "memory": 64})
    assert status == 200 and body == {"rows_affected": 1}, body
    _, labels = await alice.get("/api/v2/nodelabels")
    assert [(l["id"], l["max_gpu_count"]) for l in labels["accelerator_node_label"]] == [(profile["id"], "4")]
    status, body = await admin.call("DELETE", f"/api/v2/nodelabels/{group}/gpuprofile", params={"id": profile["id"]})
    assert status == 200 and body == {"rows_affected": 1}, body
    assert_error(*await admin.call("DELETE", f"/api/v2/nodelabels/{group}/gpuprofile", params={"id": profile["id"]}), 404)

    # No accelerator exists without a cluster: quotas for one are refused, and sessions asking for one.
    status, body = await admin.patch("/api/v2/nodelabels/quota", json={"accelerator_based_user_quota": [
        {"user_id": "1", "accelerator_id": "424242", "gpu_quota": "1"}]})
    assert_error(status, body, 404)
    _, project = await alice.post("/api/v2/projects", json={"name": "gpus"})
    status, body = await alice.post(f"/api/v2/projects/{project['id']}/sessions", json={"accelerator_label_id": 424242,
                                                                                       "nvidia_gpu": 0})
    assert_error(status, body, 400)
    assert "no accelerator 424242" in body["message"], body
    status, body = await alice.get("/api/v2/userslabels/quota")
    assert status == 200 and body["user_accelerator_quota"] == [], body
