"""Jobs and job runs over CML API v2 on the local engine, and the legacy v1 start."""

from __future__ import annotations

import asyncio
import base64
import time
from typing import Any

import aiohttp

from cml_appliance.web.keys import POOL, WORKLOADS
from cml_appliance.workloads import states
from tests.conftest import Api, assert_error

SCRIPT = b"""import os, sys
print("args:", sys.argv[1:])
print("env:", os.environ.get("PERIOD"), os.environ.get("CDSW_ENGINE_ID") is not None)
sys.exit(int(os.environ.get("EXIT_CODE", "0")))
"""


async def project_with_script(api: Api) -> str:
    _, project = await api.post("/api/v2/projects", json={"name": "jobs"})
    form = aiohttp.FormData()
    form.add_field("train.py", SCRIPT, filename="train.py")
    form.add_field("slow.py", b"import time\nprint('sleeping', flush=True)\ntime.sleep(60)\n", filename="slow.py")
    status, _ = await api.post(f"/api/v2/projects/{project['id']}/files", data=form)
    assert status == 200
    return project["id"]


async def wait_run(api: Api, pid: str, jid: str, rid: str, wanted: str, timeout: float = 20) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    body: dict[str, Any] = {}
    while time.monotonic() < deadline:
        _, body = await api.get(f"/api/v2/projects/{pid}/jobs/{jid}/runs/{rid}")
        if body.get("status") == wanted:
            return body
        await asyncio.sleep(0.05)
    raise AssertionError(f"run is {body.get('status')} ({body.get('reason')}), wanted {wanted}")


async def wait_until_nothing_is_owed(api: Api, job_id: str, timeout: float = 30) -> None:
    """Until the job owes nothing: no run active or waiting for its follow-up (a retry, a
    dependent), no pending fire, no cron fire due. From then on no run starts without a new fire,
    so what a test counts is final (no "wait a while and see that nothing more comes")."""
    pool = api.client.app[POOL]
    deadline = time.monotonic() + timeout
    while await pool.fetchval(
        "SELECT EXISTS (SELECT 1 FROM workloads w WHERE w.job_id = j.id AND (w.status = ANY($2::text[]) OR w.followup_due))"
        " OR EXISTS (SELECT 1 FROM job_fires f WHERE f.job_id = j.id)"
        " OR (j.schedule <> '' AND NOT j.paused AND j.next_fire_at <= now())"
        " FROM jobs j WHERE j.public_id = $1", job_id, list(states.ACTIVE),
    ):
        assert time.monotonic() < deadline, f"job {job_id} still owes a run after {timeout} s"
        await asyncio.sleep(0.05)


async def test_job_crud_and_runs(alice: Api) -> None:
    pid = await project_with_script(alice)
    status, job = await alice.post(f"/api/v2/projects/{pid}/jobs", json={
        "name": "train", "script": "train.py", "arguments": "--epochs 5", "environment": {"PERIOD": "1"},
        "runtime_identifier": "host/python3", "cpu": 1, "memory": 2, "timeout": 600,
    })
    assert status == 200, job
    assert job["type"] == "manual" and job["timeout"] == "600" and job["project"]["public_identifier"] == pid
    jid = job["id"]

    status, run = await alice.post(f"/api/v2/projects/{pid}/jobs/{jid}/runs", json={"environment": {"PERIOD": "3"}})
    assert status == 200 and run["status"] in ("ENGINE_SCHEDULING", "ENGINE_STARTING", "ENGINE_RUNNING", "ENGINE_SUCCEEDED")
    done = await wait_run(alice, pid, jid, run["id"], "ENGINE_SUCCEEDED")
    assert done["finished_at"] and done["exit_code"] == 0 and done["arguments"] == "--epochs 5"
    status, logs = await alice.get(f"/api/v2/projects/{pid}/jobs/{jid}/runs/{run['id']}/logs")
    assert "args: ['--epochs', '5']" in logs["content"] and "env: 3 True" in logs["content"]

    status, failing = await alice.post(f"/api/v2/projects/{pid}/jobs/{jid}/runs", json={"environment": {"EXIT_CODE": "3"}, "arguments": "x"})
    failed = await wait_run(alice, pid, jid, failing["id"], "ENGINE_FAILED")
    assert failed["exit_code"] == 3 and "exited with code 3" in failed["reason"]

    _, runs = await alice.get(f"/api/v2/projects/{pid}/jobs/{jid}/runs", params={"page_size": "1"})
    assert [r["id"] for r in runs["job_runs"]] == [failing["id"]] and runs["next_page_token"]
    _, runs = await alice.get(f"/api/v2/projects/{pid}/jobs/{jid}/runs", params={"search_filter": '{"status":"succeeded"}'})
    assert [r["id"] for r in runs["job_runs"]] == [run["id"]]

    status, patched = await alice.patch(f"/api/v2/projects/{pid}/jobs/{jid}", json={**job, "name": "train-v2", "timeout": "30"})
    assert status == 200 and patched["name"] == "train-v2" and patched["timeout"] == "30"
    _, listing = await alice.get(f"/api/v2/projects/{pid}/jobs", params={"search_filter": '{"name":"v2"}'})
    assert [j["id"] for j in listing["jobs"]] == [jid]
    _, everything = await alice.get("/api/v2/jobs")
    assert [j["id"] for j in everything["jobs"]] == [jid]

    status, body = await alice.delete(f"/api/v2/projects/{pid}/jobs/{jid}")
    assert (status, body) == (200, {})
    status, body = await alice.get(f"/api/v2/projects/{pid}/jobs/{jid}")
    assert_error(status, body, 404)


async def test_one_active_run_stop_and_timeout(alice: Api) -> None:
    pid = await project_with_script(alice)
    _, job = await alice.post(f"/api/v2/projects/{pid}/jobs", json={"name": "slow", "script": "slow.py", "timeout": 1})
    jid = job["id"]
    _, first = await alice.post(f"/api/v2/projects/{pid}/jobs/{jid}/runs", json={})
    await wait_run(alice, pid, jid, first["id"], "ENGINE_RUNNING")
    status, body = await alice.post(f"/api/v2/projects/{pid}/jobs/{jid}/runs", json={})
    assert_error(status, body, 409)
    workloads = alice.client.app[WORKLOADS]
    assert await workloads.enforce_time_limits() == 0  # within its second
    # Its second passes (moved back, not waited for).
    await alice.client.app[POOL].execute(
        "UPDATE workloads SET running_at = running_at - interval '2 seconds' WHERE public_id = $1", first["id"])
    assert await workloads.enforce_time_limits() == 1
    timed = await wait_run(alice, pid, jid, first["id"], "ENGINE_TIMEDOUT")
    assert "timeout of 1 seconds" in timed["reason"]

    _, second = await alice.post(f"/api/v2/projects/{pid}/jobs/{jid}/runs", json={})
    await wait_run(alice, pid, jid, second["id"], "ENGINE_RUNNING")
    status, stopped = await alice.post(f"/api/v2/projects/{pid}/jobs/{jid}/runs/{second['id']}:stop")
    assert status == 200
    await wait_run(alice, pid, jid, second["id"], "ENGINE_STOPPED")


async def test_dependent_jobs_run_after_their_parent_succeeds(alice: Api) -> None:
    pid = await project_with_script(alice)
    _, parent = await alice.post(f"/api/v2/projects/{pid}/jobs", json={"name": "parent", "script": "train.py"})
    _, child = await alice.post(f"/api/v2/projects/{pid}/jobs", json={"name": "child", "script": "train.py", "parent_id": parent["id"]})
    assert child["type"] == "dependent" and child["parent_id"] == parent["id"]
    _, grandchild = await alice.post(f"/api/v2/projects/{pid}/jobs", json={"name": "grandchild", "script": "train.py", "parent_job_id": child["id"]})

    status, body = await alice.patch(f"/api/v2/projects/{pid}/jobs/{parent['id']}", json={"parent_id": grandchild["id"]})
    assert_error(status, body, 400)
    assert "cycle" in body["message"]
    status, body = await alice.post(f"/api/v2/projects/{pid}/jobs", json={"name": "x", "script": "a.py", "parent_id": parent["id"], "schedule": "0 * * * *"})
    assert_error(status, body, 400)

    _, run = await alice.post(f"/api/v2/projects/{pid}/jobs/{parent['id']}/runs", json={})
    await wait_run(alice, pid, parent["id"], run["id"], "ENGINE_SUCCEEDED")
    for job in (child, grandchild):
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            _, runs = await alice.get(f"/api/v2/projects/{pid}/jobs/{job['id']}/runs")
            if runs["job_runs"] and runs["job_runs"][0]["status"] == "ENGINE_SUCCEEDED":
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError(f"{job['name']} did not run after its parent: {runs}")


async def test_legacy_v1_start_with_basic_auth(alice: Api) -> None:
    pid = await project_with_script(alice)
    _, job = await alice.post(f"/api/v2/projects/{pid}/jobs", json={"name": "legacy", "script": "train.py"})
    basic = "Basic " + base64.b64encode(f"{alice.key}:".encode()).decode()
    resp = await alice.client.post(f"/api/v1/projects/alice/jobs/jobs/{job['id']}/start", json={"environment": {"PERIOD": "9"}},
                                   headers={"Authorization": basic})
    assert resp.status == 200, await resp.text()
    engine_id = (await resp.json())["engine_id"]
    done = await wait_run(alice, pid, job["id"], engine_id, "ENGINE_SUCCEEDED")
    assert done["id"] == engine_id
    resp = await alice.client.post(f"/api/v1/projects/alice/jobs/jobs/{job['id']}/start",
                                   headers={"Authorization": "Basic " + base64.b64encode(b"wrong:").decode()})
    assert_error(resp.status, await resp.json(), 401)
    resp = await alice.client.post(f"/api/v1/projects/alice/nope/jobs/{job['id']}/start", headers={"Authorization": basic})
    assert_error(resp.status, await resp.json(), 404)
    # The same under /api/v2, as CDSW 1.10's documentation prints it; a Bearer key is taken too.
    resp = await alice.client.post(f"/api/v2/projects/alice/jobs/jobs/{job['id']}/start", headers={"Authorization": basic})
    assert resp.status == 200, await resp.text()
    await wait_run(alice, pid, job["id"], (await resp.json())["engine_id"], "ENGINE_SUCCEEDED")
    resp = await alice.client.post(f"/api/v2/projects/alice/jobs/jobs/{job['id']}/start",
                                   headers={"Authorization": f"Bearer {alice.key}"})
    assert resp.status == 200, await resp.text()
    await wait_run(alice, pid, job["id"], (await resp.json())["engine_id"], "ENGINE_SUCCEEDED")


async def test_legacy_start_in_a_project_whose_slug_is_files(alice: Api) -> None:
    _, project = await alice.post("/api/v2/projects", json={"name": "files"})
    form = aiohttp.FormData()
    form.add_field("train.py", b"print('trained')\n", filename="train.py")
    await alice.post(f"/api/v2/projects/{project['id']}/files", data=form)
    _, job = await alice.post(f"/api/v2/projects/{project['id']}/jobs", json={"name": "j", "script": "train.py"})
    basic = "Basic " + base64.b64encode(f"{alice.key}:".encode()).decode()
    resp = await alice.client.post(f"/api/v2/projects/alice/files/jobs/{job['id']}/start", headers={"Authorization": basic})
    assert resp.status == 200, await resp.text()
    await wait_run(alice, project["id"], job["id"], (await resp.json())["engine_id"], "ENGINE_SUCCEEDED")


async def test_job_permissions_and_bad_input(alice: Api, make_user: Any) -> None:
    pid = await project_with_script(alice)
    operator = await make_user("oper")
    viewer = await make_user("viewer")
    await alice.put(f"/api/v2/projects/{pid}/collaborators/oper", json={"permission": "operator"})
    await alice.put(f"/api/v2/projects/{pid}/collaborators/viewer", json={"permission": "read"})
    _, job = await alice.post(f"/api/v2/projects/{pid}/jobs", json={"name": "j", "script": "train.py"})
    status, body = await operator.post(f"/api/v2/projects/{pid}/jobs", json={"name": "k", "script": "train.py"})
    assert_error(status, body, 403)
    status, run = await operator.post(f"/api/v2/projects/{pid}/jobs/{job['id']}/runs", json={})
    assert status == 200
    await wait_run(alice, pid, job["id"], run["id"], "ENGINE_SUCCEEDED")
    status, body = await viewer.post(f"/api/v2/projects/{pid}/jobs/{job['id']}/runs", json={})
    assert_error(status, body, 403)
    for payload, fragment in (
        ({"name": "j", "script": "train.py"}, "already has a job"),
        ({"name": "n", "script": ""}, "script"),
        ({"name": "n", "script": "../x.py"}, "script"),
        ({"name": "n", "script": "a.py", "runtime_identifier": "no/such"}, "unknown runtime"),
        ({"name": "n", "script": "a.py", "parent_id": "zzzz-zzzz-zzzz-zzzz"}, "parent job"),
        ({"name": "n", "script": "a.py", "timeout": -1}, "timeout"),
        ({"name": "n", "script": "a.py", "cpu": 99}, "more than this site allows"),
        ({"name": "n", "script": "a.py", "colour": 1}, "unknown field"),
    ):
        status, body = await alice.post(f"/api/v2/projects/{pid}/jobs", json=payload)
        assert status in (400, 409), (payload, body)
        assert fragment in body["message"], (payload, body)


async def test_cron_jobs_fire_once_per_due_time(alice: Api) -> None:
    from cml_appliance.web.keys import JOBS, POOL

    pid = await project_with_script(alice)
    for payload, fragment in (
        ({"schedule": "61 * * * *"}, "cron expression"),
        ({"schedule": "* * * *"}, "cron expression"),
        ({"schedule": "0 13 * * 1", "timezone": "Mars/Olympus"}, "time zone"),
    ):
        status, body = await alice.post(f"/api/v2/projects/{pid}/jobs", json={"name": "c", "script": "train.py", **payload})
        assert_error(status, body, 400)
        assert fragment in body["message"]
    status, job = await alice.post(f"/api/v2/projects/{pid}/jobs", json={
        "name": "nightly", "script": "train.py", "schedule": "*/5 * * * *", "timezone": "Europe/Berlin",
    })
    assert status == 200 and job["type"] == "cron" and job["timezone"] == "Europe/Berlin"
    assert job["english_schedule"] == "Every 5 minutes"
    _, paused = await alice.post(f"/api/v2/projects/{pid}/jobs", json={
        "name": "paused", "script": "train.py", "schedule": "* * * * *", "paused": True,
    })
    pool = alice.client.app[POOL]
    jobs = alice.client.app[JOBS]
    assert await jobs.fire_due() in (0, None)  # nothing due yet (None: the app's own scheduler holds the lock)
    # As after a long downtime: many fires were missed. They collapse into one run.
    await pool.execute("UPDATE jobs SET next_fire_at = now() - interval '3 hours'")
    # Two schedulers at once, besides the app's own loop: one of the three starts the run.
    results = await asyncio.gather(jobs.fire_due(), jobs.fire_due())
    assert sum(r or 0 for r in results) <= 1, results  # never both
    for _ in range(50):
        _, runs = await alice.get(f"/api/v2/projects/{pid}/jobs/{job['id']}/runs")
        if runs["job_runs"]:
            break
        await asyncio.sleep(0.1)
    await wait_until_nothing_is_owed(alice, job["id"])
    assert await jobs.fire_due() in (0, None)
    _, runs = await alice.get(f"/api/v2/projects/{pid}/jobs/{job['id']}/runs")
    assert len(runs["job_runs"]) == 1
    await wait_run(alice, pid, job["id"], runs["job_runs"][0]["id"], "ENGINE_SUCCEEDED")
    _, paused_runs = await alice.get(f"/api/v2/projects/{pid}/jobs/{paused['id']}/runs")
    assert paused_runs["job_runs"] == []
    next_fire = await pool.fetchval("SELECT next_fire_at FROM jobs WHERE public_id = $1", job["id"])
    assert next_fire.minute % 5 == 0 and next_fire.timestamp() > time.time()


async def test_failed_runs_are_retried_as_configured(alice: Api) -> None:
    pid = await project_with_script(alice)
    _, job = await alice.post(f"/api/v2/projects/{pid}/jobs", json={
        "name": "flaky", "script": "train.py", "environment": {"EXIT_CODE": "1"},
        "retry_enabled": True, "max_retry": 2, "retry_delay": 0, "retry_for_script_failure": True,
    })
    _, first = await alice.post(f"/api/v2/projects/{pid}/jobs/{job['id']}/runs", json={})
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        _, runs = await alice.get(f"/api/v2/projects/{pid}/jobs/{job['id']}/runs")
        finished = [r for r in runs["job_runs"] if r["status"] == "ENGINE_FAILED"]
        if len(finished) == 3:
            break
        await asyncio.sleep(0.1)
    assert sorted(r["attempt"] for r in finished) == [1, 2, 3]  # the first try and two retries
    await wait_until_nothing_is_owed(alice, job["id"])
    _, runs = await alice.get(f"/api/v2/projects/{pid}/jobs/{job['id']}/runs")
    assert len(runs["job_runs"]) == 3  # and no more
    # Without retry_for_script_failure a script failure is not retried.
    _, other = await alice.post(f"/api/v2/projects/{pid}/jobs", json={
        "name": "once", "script": "train.py", "environment": {"EXIT_CODE": "1"}, "retry_enabled": True, "max_retry": 2,
    })
    _, run = await alice.post(f"/api/v2/projects/{pid}/jobs/{other['id']}/runs", json={})
    await wait_run(alice, pid, other["id"], run["id"], "ENGINE_FAILED")
    await wait_until_nothing_is_owed(alice, other["id"])
    _, runs = await alice.get(f"/api/v2/projects/{pid}/jobs/{other['id']}/runs")
    assert len(runs["job_runs"]) == 1


async def test_a_fire_during_a_run_is_recorded_as_skipped_and_retried_as_configured(alice: Api, monkeypatch: Any) -> None:
    from cml_appliance.jobs import service as job_service

    # A retry that finds the job busy waits for it, looking again this often (not skipped again,
    # which with retry_delay 0 would owe another retry at once, and so on).
    monkeypatch.setattr(job_service, "BUSY_RETRY_SECONDS", 0.3)
    pid = await project_with_script(alice)
    form = aiohttp.FormData()
    form.add_field("nap.py", b"import time\ntime.sleep(2)\nprint('rested')\n", filename="nap.py")
    await alice.post(f"/api/v2/projects/{pid}/files", data=form)
    _, job = await alice.post(f"/api/v2/projects/{pid}/jobs", json={
        "name": "hourly", "script": "nap.py", "schedule": "0 * * * *", "retry_enabled": True, "max_retry": 5,
        "retry_delay": 0, "retry_for_skipped_runs": True})
    runs_path = f"/api/v2/projects/{pid}/jobs/{job['id']}/runs"
    _, manual = await alice.post(runs_path, json={})
    await wait_run(alice, pid, job["id"], manual["id"], "ENGINE_RUNNING")
    await alice.client.app[POOL].execute("UPDATE jobs SET next_fire_at = now() WHERE public_id = $1", job["id"])

    deadline = time.monotonic() + 20
    while True:
        _, runs = await alice.get(runs_path, params={"sort": "created_at"})
        if len(runs["job_runs"]) == 3 and runs["job_runs"][2]["status"] == "ENGINE_SUCCEEDED":
            break
        assert time.monotonic() < deadline, runs
        await asyncio.sleep(0.1)
    first, skipped, retry = runs["job_runs"]
    assert first["id"] == manual["id"] and first["status"] == "ENGINE_SUCCEEDED"
    assert skipped["status"] == "ENGINE_SKIPPED" and skipped["attempt"] == 1 and "still running" in skipped["reason"]
    assert skipped["finished_at"] and "running_at" not in skipped
    assert retry["attempt"] == 2  # the retry waited for the manual run to end
    await wait_until_nothing_is_owed(alice, job["id"])
    _, runs = await alice.get(runs_path)
    assert len(runs["job_runs"]) == 3  # and nothing more
    _, listed = await alice.get(runs_path, params={"search_filter": '{"status": "skipped"}'})
    assert [r["id"] for r in listed["job_runs"]] == [skipped["id"]]
