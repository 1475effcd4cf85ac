"""Stop or SIGKILL the appliance and start it again: at a cron fire and while a retry waits out
its delay every fire owed still runs, and none twice; what a run's end owes (dependents, mail)
is still done; model deployments come back."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
from aiosmtpd.controller import Controller

from tests.integration.test_cli import CLI, free_port
from tests.integration.test_job_notifications import Inbox
from tests.integration.test_reconcile_after_crash import serve, wait_ready

JOBS = 200


class Appliance:
    """`cml-appliance serve` in a process of its own, to be killed and started again."""

    def __init__(self, dsn: str, tmp_path: Path):
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("CML_")}
        self.env.update({"CML_DATABASE_URL": dsn, "CML_DATA_DIR": str(tmp_path / "data"), "CML_LOG_LEVEL": "WARNING",
                         "CML_STOP_GRACE_SECONDS": "2", "CML_APPS_PORT": "0", "CML_EDITORS_PORT": "0", "CML_GRPC_PORT": "0"})
        self.port, self.log = free_port(), tmp_path / "serve.log"
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def key_for_new_user(self, name: str) -> str:
        assert subprocess.run(CLI + ["users", "create", name, "--email", f"{name}@example.com", "--password-stdin"],
                              env=self.env, input=b"longpassword\n", capture_output=True).returncode == 0
        return subprocess.run(CLI + ["api-keys", "create", name], env=self.env, capture_output=True, text=True).stdout.split()[-1]

    async def start(self, http: aiohttp.ClientSession) -> None:
        self.proc = serve(self.env, self.port, self.log)
        await wait_ready(http, self.url, self.proc, self.log)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(30)


async def project_with(http: aiohttp.ClientSession, url: str, name: str, files: dict[str, bytes]) -> str:
    async with http.post(url + "/api/v2/projects", json={"name": name}) as resp:
        pid = (await resp.json())["id"]
    form = aiohttp.FormData()
    for filename, content in files.items():
        form.add_field(filename, content, filename=filename)
    async with http.post(f"{url}/api/v2/projects/{pid}/files", data=form) as resp:
        assert resp.status == 200
    return str(pid)


async def until(conn: asyncpg.Connection, query: str, check: Any, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = await conn.fetchval(query)
        if check(value):
            return value
        assert time.monotonic() < deadline, f"{query} is still {value!r}"
        await asyncio.sleep(0.05)


async def test_sigkill_at_a_cron_fire_loses_no_fire_and_doubles_none(clean_db: str, tmp_path: Path) -> None:
    appliance = Appliance(clean_db, tmp_path)
    key = appliance.key_for_new_user("kim")
    conn = await asyncpg.connect(clean_db)
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as http:
        try:
            await appliance.start(http)
            url = appliance.url
            pid = await project_with(http, url, "crash at a fire", {"ok.sh": b"echo ok\n"})
            for n in range(JOBS):
                # Yearly: after this fire the next one is months away, so every run below is this fire's.
                async with http.post(f"{url}/api/v2/projects/{pid}/jobs", json={
                        "name": f"job {n}", "script": "ok.sh", "schedule": "0 0 1 1 *"}) as resp:
                    assert resp.status == 200, await resp.text()
            # All due at one instant, two seconds from now.
            await conn.execute("UPDATE jobs SET next_fire_at = now() + interval '2 seconds'")
            await until(conn, "SELECT count(*) FROM workloads WHERE kind = 'job_run'", lambda n: n > 0)
            appliance.kill()  # the scheduler has claimed the fires and started its first runs
            # A statement the appliance sent just before it died may still commit: wait until its
            # connections are gone before counting.
            await until(conn, "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                              " AND pid <> pg_backend_pid()", lambda n: n == 0)

            runs = await conn.fetchval("SELECT count(*) FROM workloads WHERE kind = 'job_run'")
            pending = await conn.fetchval("SELECT count(*) FROM job_fires")
            # The test is about a kill in the middle of the fire: some runs started, some still owed.
            assert 0 < runs < JOBS and pending > 0, (runs, pending)
            # Nothing is lost at the moment of the kill: every job has its run or its pending fire.
            assert runs + pending == JOBS
            assert await conn.fetchval("SELECT count(*) FROM jobs WHERE next_fire_at < now() + interval '1 day'") == 0

            await appliance.start(http)
            await until(conn, "SELECT count(*) FROM job_fires", lambda n: n == 0)
            await until(conn, "SELECT count(*) FROM workloads WHERE kind = 'job_run' AND status NOT IN"
                              " ('ENGINE_SUCCEEDED', 'ENGINE_FAILED', 'ENGINE_STOPPED', 'ENGINE_TIMEDOUT')", lambda n: n == 0)
            per_job = await conn.fetch(
                "SELECT j.name, count(w.id) AS runs, count(*) FILTER (WHERE w.status = 'ENGINE_SUCCEEDED') AS ok"
                " FROM jobs j LEFT JOIN workloads w ON w.job_id = j.id GROUP BY j.name")
            assert len(per_job) == JOBS
            assert [r["name"] for r in per_job if r["runs"] != 1] == []  # each fire ran exactly once
            # Runs the kill cut short end failed with the reason; all the others succeeded.
            failed = await conn.fetch("SELECT status, reason, created_at, finished_at FROM workloads"
                                      " WHERE kind = 'job_run' AND status <> 'ENGINE_SUCCEEDED'")
            assert all(r["reason"] for r in failed)
            assert sum(r["ok"] for r in per_job) >= JOBS - runs, [dict(r) for r in failed]
        finally:
            appliance.stop()
            await conn.close()


async def test_a_retry_waiting_out_its_delay_survives_a_restart(clean_db: str, tmp_path: Path) -> None:
    appliance = Appliance(clean_db, tmp_path)
    key = appliance.key_for_new_user("kim")
    conn = await asyncpg.connect(clean_db)
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as http:
        try:
            await appliance.start(http)
            url = appliance.url
            # Fails on its first attempt, succeeds on the next (the marker file tells them apart).
            pid = await project_with(http, url, "retry after crash", {
                "flaky.sh": b"if [ -e tried ]; then echo second; else touch tried; echo first; exit 3; fi\n"})
            async with http.post(f"{url}/api/v2/projects/{pid}/jobs", json={
                    "name": "flaky", "script": "flaky.sh", "retry_enabled": True, "max_retry": 2, "retry_delay": 4,
                    "retry_for_script_failure": True}) as resp:
                job = await resp.json()
            async with http.post(f"{url}/api/v2/projects/{pid}/jobs/{job['id']}/runs", json={}) as resp:
                assert resp.status == 200
            await until(conn, "SELECT count(*) FROM job_fires", lambda n: n == 1)  # the retry is owed
            appliance.kill()
            assert await conn.fetchval("SELECT status FROM workloads WHERE kind = 'job_run'") == "ENGINE_FAILED"

            await appliance.start(http)
            await until(conn, "SELECT count(*) FROM workloads WHERE kind = 'job_run' AND status = 'ENGINE_SUCCEEDED'",
                        lambda n: n == 1)
            runs = await conn.fetch("SELECT attempt, status, exit_code FROM workloads WHERE kind = 'job_run' ORDER BY id")
            assert [(r["attempt"], r["status"], r["exit_code"]) for r in runs] == [
                (1, "ENGINE_FAILED", 3), (2, "ENGINE_SUCCEEDED", 0)]
            assert await conn.fetchval("SELECT count(*) FROM job_fires") == 0
        finally:
            appliance.stop()
            await conn.close()


async def test_what_a_run_end_owes_is_done_after_a_crash(clean_db: str, tmp_path: Path) -> None:
    """A crash right after a run ended, before its dependents started and its mail went out:
    the next start does both, once."""
    port = free_port()
    inbox = Inbox()
    smtp = Controller(inbox, hostname="127.0.0.1", port=port)
    smtp.start()
    appliance = Appliance(clean_db, tmp_path)
    appliance.env.update({"CML_SMTP_HOST": "127.0.0.1", "CML_SMTP_PORT": str(port), "CML_SMTP_SENDER": "cml@example.com"})
    key = appliance.key_for_new_user("kim")
    conn = await asyncpg.connect(clean_db)
    child_runs = "SELECT count(*) FROM workloads w JOIN jobs j ON j.id = w.job_id WHERE j.name = 'child' AND w.status = 'ENGINE_SUCCEEDED'"
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as http:
        try:
            await appliance.start(http)
            url = appliance.url
            pid = await project_with(http, url, "chain", {"ok.sh": b"echo ok\n"})
            async with http.post(f"{url}/api/v2/projects/{pid}/jobs", json={
                    "name": "parent", "script": "ok.sh",
                    "recipients": [{"email": "team@example.com", "notify_on_success": True}]}) as resp:
                parent = await resp.json()
            async with http.post(f"{url}/api/v2/projects/{pid}/jobs", json={
                    "name": "child", "script": "ok.sh", "parent_id": parent["id"]}) as resp:
                assert resp.status == 200
            async with http.post(f"{url}/api/v2/projects/{pid}/jobs/{parent['id']}/runs", json={}) as resp:
                assert resp.status == 200
            await until(conn, child_runs, lambda n: n == 1)
            await until(conn, "SELECT count(*) FROM workloads WHERE mail_due_at IS NOT NULL", lambda n: n == 0)
            assert len(inbox.messages) == 1
            appliance.kill()

            # Back to the moment the parent's run ended: its end recorded, nothing done about it.
            await conn.execute("DELETE FROM workloads WHERE job_id = (SELECT id FROM jobs WHERE name = 'child')")
            await conn.execute("UPDATE workloads SET followup_due = true, mail_due_at = NULL")
            inbox.messages.clear()
            await appliance.start(http)
            await until(conn, child_runs, lambda n: n == 1)
            await until(conn, "SELECT count(*) FROM workloads WHERE followup_due OR mail_due_at IS NOT NULL", lambda n: n == 0)
            assert [m["Subject"] for m in inbox.messages] == ["[cml-appliance] Job parent succeeded (chain)"]
            appliance.kill()

            # A mail taken for sending by a process that died (its lease run out) is sent by the next.
            await conn.execute("UPDATE workloads SET mail_due_at = now() - interval '1 second'"
                               " WHERE job_id = (SELECT id FROM jobs WHERE name = 'parent')")
            inbox.messages.clear()
            await appliance.start(http)
            await until(conn, "SELECT count(*) FROM workloads WHERE mail_due_at IS NOT NULL", lambda n: n == 0)
            assert len(inbox.messages) == 1
            assert await conn.fetchval("SELECT count(*) FROM workloads WHERE kind = 'job_run'") == 2  # nothing ran again
        finally:
            appliance.stop()
            smtp.stop()
            await conn.close()


async def call_model(http: aiohttp.ClientSession, url: str, key: str, timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        async with http.post(url + "/model", json={"accessKey": key, "request": {"a": 1, "b": 2}}) as resp:
            body = await resp.json()
        if resp.status == 200:
            return dict(body)
        assert time.monotonic() < deadline, body
        await asyncio.sleep(0.1)


async def test_model_deployments_come_back_after_a_stop_and_a_kill(clean_db: str, tmp_path: Path) -> None:
    appliance = Appliance(clean_db, tmp_path)
    key = appliance.key_for_new_user("kim")
    conn = await asyncpg.connect(clean_db)
    active = ("SELECT count(*) FROM workloads WHERE kind = 'model_replica'"
              " AND status IN ('ENGINE_SCHEDULING', 'ENGINE_STARTING', 'ENGINE_RUNNING')")
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as http:
        try:
            await appliance.start(http)
            url = appliance.url
            pid = await project_with(http, url, "models survive", {
                "predict.py": b"def predict(args):\n    return {'sum': args['a'] + args['b']}\n"})
            async with http.post(f"{url}/api/v2/projects/{pid}/models", json={
                    "name": "adder", "disable_authentication": True, "auto_build_model": True,
                    "auto_build_config": {"file_path": "predict.py", "function_name": "predict"},
                    "auto_deploy_model": True, "auto_deployment_config": {"replicas": 2}}) as resp:
                model = await resp.json()
            first = await call_model(http, url, model["access_key"])
            assert first["response"] == {"sum": 3}

            appliance.stop()  # a clean shutdown stops the local replicas
            assert await conn.fetchval(active) == 0
            await appliance.start(http)
            second = await call_model(http, url, model["access_key"])
            assert second["ReplicaID"] != first["ReplicaID"]
            await until(conn, active, lambda n: n == 2)

            assert appliance.proc is not None
            killed_sockets = list(Path(tempfile.gettempdir()).glob(f"cml-replicas-{appliance.proc.pid}-*"))
            assert len(killed_sockets) == 1
            appliance.kill()  # a crash: the replicas die with the appliance
            await appliance.start(http)
            third = await call_model(http, url, model["access_key"])
            assert not killed_sockets[0].exists()  # the killed process's socket directory is swept
            assert third["ReplicaID"] not in (first["ReplicaID"], second["ReplicaID"])
            # Resumption and the replacements of the killed replicas both settled (none waits out
            # its pause any more): exactly the replicas asked for.
            deadline = time.monotonic() + 30
            while True:
                async with http.get(f"{url}/metrics") as resp:
                    if "cml_model_replacements_pending 0.0" in await resp.text():
                        break
                assert time.monotonic() < deadline, "replacements still pending after 30 s"
                await asyncio.sleep(0.1)
            assert await conn.fetchval(active) == 2
        finally:
            appliance.stop()
            await conn.close()


async def test_a_build_killed_half_way_is_claimed_again_and_finishes(clean_db: str, tmp_path: Path) -> None:
    """kill -9 of the appliance while it builds an image: after the restart the build's lease
    runs out, the queue claims it again, and it ends built, once."""
    appliance = Appliance(clean_db, tmp_path)
    appliance.env["CML_BUILD_LEASE_SECONDS"] = "3"
    key = appliance.key_for_new_user("bo")
    conn = await asyncpg.connect(clean_db)
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as http:
        try:
            await appliance.start(http)
            url = appliance.url
            # 60 MB that does not compress: the layer takes seconds to make and to push.
            pid = await project_with(http, url, "big build", {"predict.py": b"def predict(args):\n    return args\n",
                                                               "weights.bin": os.urandom(60 * 1024 * 1024)})
            async with http.post(f"{url}/api/v2/projects/{pid}/models", json={"name": "heavy"}) as resp:
                model = await resp.json()
            async with http.post(f"{url}/api/v2/projects/{pid}/models/{model['id']}/builds",
                                 json={"file_path": "predict.py", "function_name": "predict"}) as resp:
                build = await resp.json()
                assert resp.status == 200, build
            status = f"SELECT status FROM model_builds WHERE public_id = '{build['id']}'"
            await until(conn, status, lambda s: s in ("pending", "pushing"))
            appliance.kill()
            assert await conn.fetchval(status) in ("pending", "pushing")
            await appliance.start(http)
            await until(conn, status, lambda s: s not in ("queued", "pending", "pushing"), timeout=120)
            row = await conn.fetchrow(f"SELECT status, attempts, built_image, failure FROM model_builds WHERE public_id = '{build['id']}'")
            assert row["status"] == "built" and row["attempts"] == 2, dict(row)
            async with http.get(f"{url}/api/v2/projects/{pid}/models/{model['id']}/builds/{build['id']}/logs") as resp:
                content = (await resp.json())["content"]
            assert "Attempt 2 of 3" in content and "Built " in content, content
        finally:
            appliance.stop()
            await conn.close()
