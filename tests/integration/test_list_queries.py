"""search_filter and sort on the job, run, model, build and application lists, with the keys CML
documents; and the fields CML clients send that this appliance refuses or maps rather than drops."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp

from tests.conftest import Api, assert_error, wait_build
from tests.integration.test_applications import APP, wait_app
from tests.integration.test_jobs_api import wait_run
from tests.integration.test_models import call_until_served


async def listing(api: Api, path: str, key: str, *, filters: dict[str, Any] | None = None, sort: str = "",
                  page_size: int = 100) -> list[dict[str, Any]]:
    params = {"page_size": str(page_size)}
    if filters is not None:
        params["search_filter"] = json.dumps(filters)
    if sort:
        params["sort"] = sort
    status, body = await api.get(path, params=params)
    assert status == 200, body
    return list(body[key])


async def project_with(api: Api, name: str, files: dict[str, bytes]) -> str:
    _, project = await api.post("/api/v2/projects", json={"name": name})
    form = aiohttp.FormData()
    for filename, content in files.items():
        form.add_field(filename, content, filename=filename)
    await api.post(f"/api/v2/projects/{project['id']}/files", data=form)
    return str(project["id"])


async def test_jobs_and_runs_filter_and_sort(alice: Api, bob: Api) -> None:
    pid = await project_with(alice, "listing jobs", {"a.py": b"print('a')\n", "b.sh": b"echo b\n"})
    jobs = f"/api/v2/projects/{pid}/jobs"
    _, first = await alice.post(jobs, json={"name": "alpha", "script": "a.py"})
    await alice.post(jobs, json={"name": "bravo", "script": "b.sh", "schedule": "0 3 * * *", "paused": True})
    await alice.post(jobs, json={"name": "charlie", "script": "a.py", "parent_id": first["id"]})

    assert [j["name"] for j in await listing(alice, jobs, "jobs", sort="name")] == ["alpha", "bravo", "charlie"]
    assert [j["name"] for j in await listing(alice, jobs, "jobs", sort="-name")] == ["charlie", "bravo", "alpha"]
    assert [j["name"] for j in await listing(alice, jobs, "jobs", filters={"script": "b.sh"})] == ["bravo"]
    assert [j["name"] for j in await listing(alice, jobs, "jobs", filters={"type": "dependent"})] == ["charlie"]
    assert [j["name"] for j in await listing(alice, jobs, "jobs", filters={"paused": "true"})] == ["bravo"]
    assert len(await listing(alice, jobs, "jobs", filters={"creator.username": "alice"})) == 3
    assert await listing(alice, jobs, "jobs", filters={"creator.username": "bob"}) == []
    everywhere = await listing(alice, "/api/v2/jobs", "jobs", filters={"type": "cron"}, sort="-created_at")
    assert [j["name"] for j in everywhere] == ["bravo"]
    assert await listing(bob, "/api/v2/jobs", "jobs", filters={"type": "cron"}) == []  # not bob's project
    status, body = await alice.get(jobs, params={"sort": "colour"})
    assert_error(status, body, 400)
    assert "created_at" in body["message"]  # the supported keys are named

    # The Airflow-style "latest run": newest first, one per page.
    runs = f"{jobs}/{first['id']}/runs"
    _, one = await alice.post(runs, json={})
    await wait_run(alice, pid, first["id"], one["id"], "ENGINE_SUCCEEDED")
    _, two = await alice.post(runs, json={"environment": {"EXIT_CODE": "1"}})
    await wait_run(alice, pid, first["id"], two["id"], "ENGINE_SUCCEEDED")
    assert [r["id"] for r in await listing(alice, runs, "job_runs", sort="-created_at", page_size=1)] == [two["id"]]
    assert [r["id"] for r in await listing(alice, runs, "job_runs", sort="created_at", page_size=1)] == [one["id"]]
    assert len(await listing(alice, runs, "job_runs", filters={"status": "succeeded"})) == 2
    assert await listing(alice, runs, "job_runs", filters={"status": "running"}) == []


async def test_job_fields_cml_clients_send(alice: Api) -> None:
    pid = await project_with(alice, "legacy fields", {"a.py": b"print('a')\n"})
    jobs = f"/api/v2/projects/{pid}/jobs"
    # Quoted int64 and the older comma-separated recipient fields, merged with `recipients` by address.
    status, job = await alice.post(jobs, json={
        "name": "mailer", "script": "a.py", "timeout": "60",
        "recipients": [{"email": "ops@example.com", "notify_on_failure": True}],
        "failure_recipients": "lead@example.com", "success_recipients": "ops@example.com, team@example.com"})
    assert status == 200, job
    assert job["timeout"] == "60"
    by_email = {r["email"]: r for r in job["recipients"]}
    assert by_email["ops@example.com"]["notify_on_failure"] and by_email["ops@example.com"]["notify_on_success"]
    assert by_email["lead@example.com"]["notify_on_failure"] and not by_email["lead@example.com"]["notify_on_success"]
    assert by_email["team@example.com"]["notify_on_success"]
    assert job["failure_recipients"] == "ops@example.com, lead@example.com"
    # A Job sent back as fetched changes nothing.
    status, again = await alice.patch(f"{jobs}/{job['id']}", json=job)
    assert status == 200 and again["recipients"] == job["recipients"], again
    status, body = await alice.post(jobs, json={"name": "other", "script": "a.py", "run_as": 7})
    assert_error(status, body, 400)
    status, body = await alice.post(jobs, json={"name": "other", "script": "a.py", "timeout": "soon"})
    assert_error(status, body, 400)


PREDICT = b"def predict(args):\n    return args\n"


async def test_models_and_builds_filter_sort_creators_and_delete(alice: Api) -> None:
    pid = await project_with(alice, "listing models", {"predict.py": PREDICT})
    models = f"/api/v2/projects/{pid}/models"
    build = {"file_path": "predict.py", "function_name": "predict"}
    _, open_model = await alice.post(models, json={"name": "open", "disable_authentication": True})
    status, scored = await alice.post(models, json={"name": "scorer", "description": "scores rows",
                                                    "auto_build_model": True, "auto_build_config": build})
    assert status == 200, scored
    assert (await wait_build(alice, pid, scored["id"]))["status"] == "built"
    assert scored["creator"]["username"] == "alice"
    assert scored["project"]["name"] == "listing models" and scored["project"]["slug"]
    assert [m["name"] for m in await listing(alice, models, "models", sort="name")] == ["open", "scorer"]
    assert [m["name"] for m in await listing(alice, models, "models", filters={"auth_enabled": "f"})] == ["open"]
    assert [m["name"] for m in await listing(alice, models, "models", filters={"description": "rows"})] == ["scorer"]
    everywhere = await listing(alice, "/api/v2/models", "models", filters={"name": "scorer"})
    assert [m["id"] for m in everywhere] == [scored["id"]] and everywhere[0]["creator"]["username"] == "alice"

    # A Model sent back as fetched is taken; settings with no meaning here are refused.
    status, patched = await alice.patch(f"{models}/{open_model['id']}", json=dict(open_model, description="changed"))
    assert status == 200 and patched["description"] == "changed", patched
    status, body = await alice.patch(f"{models}/{open_model['id']}", json={"visibility": "public"})
    assert_error(status, body, 400)

    builds = f"{models}/{scored['id']}/builds"
    status, broken = await alice.post(builds, json={"file_path": "predict.py", "function_name": "missing", "comment": "oops"})
    assert status == 200 and broken["creator"]["username"] == "alice"
    broken = await wait_build(alice, pid, scored["id"], broken["id"])
    assert broken["status"] == "build failed"
    listed = await listing(alice, builds, "model_builds", sort="-created_at")
    assert [b["id"] for b in listed][0] == broken["id"] and len(listed) == 2
    assert [b["id"] for b in await listing(alice, builds, "model_builds", filters={"status": "failed"})] == [broken["id"]]
    assert [b["id"] for b in await listing(alice, builds, "model_builds", filters={"comment": "oops"})] == [broken["id"]]
    good = next(b for b in listed if b["status"] == "built")

    status, deployment = await alice.post(f"{builds}/{good['id']}/deployments", json={"cpu": 1, "memory": 1})
    assert status == 200 and deployment["deployer"]["username"] == "alice", deployment
    await call_until_served(alice, scored["access_key"], {"x": 1})
    status, body = await alice.call("DELETE", f"{builds}/{good['id']}")
    assert_error(status, body, 400)
    assert "stop its deployments" in body["message"]
    status, body = await alice.call("DELETE", f"{builds}/{broken['id']}")
    assert status == 200 and body == {}
    assert [b["id"] for b in await listing(alice, builds, "model_builds")] == [good["id"]]
    status, body = await alice.get(f"{builds}/{broken['id']}")
    assert_error(status, body, 404)
    # Once its deployment is stopped and its replica gone, the deployed build may go too.
    deployment_path = f"{builds}/{good['id']}/deployments/{deployment['id']}"
    await alice.post(f"{deployment_path}:stop")
    for _ in range(200):
        _, stopped = await alice.get(deployment_path)
        if stopped["status"] == "stopped":
            break
        await asyncio.sleep(0.05)
    status, body = await alice.call("DELETE", f"{builds}/{good['id']}")
    assert status == 200, body
    status, body = await alice.get(deployment_path)
    assert_error(status, body, 404)


async def test_model_create_refuses_bad_auto_settings_before_storing_anything(alice: Api) -> None:
    pid = await project_with(alice, "atomic models", {"predict.py": PREDICT})
    models = f"/api/v2/projects/{pid}/models"
    build = {"file_path": "predict.py", "function_name": "predict"}
    for bad in ({"auto_build_config": {"file_path": "predict.py", "function_name": "not a name"}},
                {"auto_build_config": dict(build, model_root_dir="../outside")},
                {"auto_build_config": build, "auto_deploy_model": True, "auto_deployment_config": {"replicas": 99}},
                {"auto_build_config": build, "auto_deploy_model": True,
                 "auto_deployment_config": {"deployment_secrets": {"TOKEN": "x"}}}):
        status, body = await alice.post(models, json={"name": "careful", "auto_build_model": True, **bad})
        assert_error(status, body, 400)
    assert await listing(alice, models, "models") == []
    status, model = await alice.post(models, json={"name": "careful", "auto_build_model": True, "auto_build_config": build})
    assert status == 200, model


async def test_applications_filter_by_status_and_sort(alice: Api) -> None:
    pid = await project_with(alice, "listing apps", {"app.py": APP})
    apps = f"/api/v2/projects/{pid}/applications"
    made = {}
    for name in ("zeta", "eta"):
        status, app = await alice.post(apps, json={"name": name, "subdomain": f"{name}-list", "script": "app.py",
                                                   "runtime_identifier": "host/python3"})
        assert status == 200, app
        made[name] = app
    for app in made.values():
        await wait_app(alice, pid, app["id"], "APPLICATION_RUNNING")
    await alice.post(f"{apps}/{made['zeta']['id']}:stop")
    await wait_app(alice, pid, made["zeta"]["id"], "APPLICATION_STOPPED")

    assert [a["name"] for a in await listing(alice, apps, "applications", sort="name")] == ["eta", "zeta"]
    assert [a["name"] for a in await listing(alice, apps, "applications", filters={"status": "running"})] == ["eta"]
    assert [a["name"] for a in await listing(alice, apps, "applications", filters={"status": "stopped"})] == ["zeta"]
    assert [a["name"] for a in await listing(alice, apps, "applications", filters={"subdomain": "zeta"})] == ["zeta"]
    status, body = await alice.post(apps, json={"name": "viz", "subdomain": "viz", "script": "app.py", "cdv_app": True})
    assert_error(status, body, 400)


async def test_every_documented_key_filters_and_sorts_without_error(alice: Api) -> None:
    """Each list answers 200 for each of its filter keys and each of its sort keys, both ways."""
    from cml_appliance.applications.service import APP_FILTER_KEYS, APP_SORT_KEYS
    from cml_appliance.jobs.service import (
        JOB_FILTER_KEYS,
        JOB_SORT_KEYS,
        RUN_FILTER_KEYS,
        RUN_SORT_KEYS,
    )
    from cml_appliance.models.service import (
        BUILD_FILTER_KEYS,
        BUILD_SORT_KEYS,
        MODEL_FILTER_KEYS,
        MODEL_SORT_KEYS,
    )

    pid = await project_with(alice, "every key", {"a.py": b"print('a')\n", "predict.py": PREDICT})
    _, job = await alice.post(f"/api/v2/projects/{pid}/jobs", json={"name": "j", "script": "a.py"})
    _, model = await alice.post(f"/api/v2/projects/{pid}/models", json={
        "name": "m", "auto_build_model": True, "auto_build_config": {"file_path": "predict.py", "function_name": "predict"}})
    lists = [
        (f"/api/v2/projects/{pid}/jobs", "jobs", JOB_FILTER_KEYS, JOB_SORT_KEYS),
        ("/api/v2/jobs", "jobs", JOB_FILTER_KEYS, JOB_SORT_KEYS),
        (f"/api/v2/projects/{pid}/jobs/{job['id']}/runs", "job_runs", RUN_FILTER_KEYS, RUN_SORT_KEYS),
        (f"/api/v2/projects/{pid}/models", "models", MODEL_FILTER_KEYS, MODEL_SORT_KEYS),
        ("/api/v2/models", "models", MODEL_FILTER_KEYS, MODEL_SORT_KEYS),
        (f"/api/v2/projects/{pid}/models/{model['id']}/builds", "model_builds", BUILD_FILTER_KEYS, BUILD_SORT_KEYS),
        (f"/api/v2/projects/{pid}/applications", "applications", APP_FILTER_KEYS, APP_SORT_KEYS),
    ]
    for path, key, filter_keys, sort_keys in lists:
        for name in filter_keys:
            await listing(alice, path, key, filters={name: "x"})
        for name in sort_keys:
            await listing(alice, path, key, sort=name)
            await listing(alice, path, key, sort=f"-{name}")
