"""SIGKILL of the appliance at random moments under a mixed load (API writes, uploads, session
starts, job runs, model calls), ten times in a row, on the local engine. After each restart:
every acknowledged project and upload is there once and whole, nothing half-written is in a
project, and no workload is left active without a process. (Cron fires across a kill are
tests/integration/test_restarts.py's.)"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from tests.integration.test_cli import CLI, free_port
from tests.integration.test_reconcile_after_crash import marked_pids, serve, wait_ready

ROUNDS = 10
PREDICT = b"def predict(args):\n    return {'ok': True}\n"


async def test_ten_kills_under_mixed_load_leave_nothing_half_done(clean_db: str, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CML_")}
    data_dir = tmp_path / "data"
    env.update({"CML_DATABASE_URL": clean_db, "CML_DATA_DIR": str(data_dir), "CML_LOG_LEVEL": "WARNING",
                "CML_STOP_GRACE_SECONDS": "2", "CML_MAX_UPLOAD_MB": "8",
                "CML_APPS_PORT": "0", "CML_EDITORS_PORT": "0", "CML_GRPC_PORT": "0"})
    assert subprocess.run(CLI + ["users", "create", "kim", "--email", "k@example.com", "--password-stdin"],
                          env=env, input=b"longpassword\n", capture_output=True).returncode == 0
    key = subprocess.run(CLI + ["api-keys", "create", "kim"], env=env, capture_output=True, text=True).stdout.split()[-1]
    port, log = free_port(), tmp_path / "serve.log"
    url = f"http://127.0.0.1:{port}"
    rng = random.Random(20261206)
    projects_made: list[str] = []
    uploads_made: dict[str, int] = {}
    proc = serve(env, port, log)
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"},
                                     timeout=aiohttp.ClientTimeout(total=20)) as http:
        try:
            await wait_ready(http, url, proc, log)
            async with http.post(url + "/api/v2/projects", json={"name": "load"}) as resp:
                pid = (await resp.json())["id"]
            form = aiohttp.FormData()
            form.add_field("predict.py", PREDICT, filename="predict.py")
            form.add_field("job.py", b"print('run')\n", filename="job.py")
            async with http.post(f"{url}/api/v2/projects/{pid}/files", data=form) as resp:
                assert resp.status == 200
            async with http.post(f"{url}/api/v2/projects/{pid}/models", json={
                    "name": "m", "auto_build_model": True, "auto_build_config": {"file_path": "predict.py", "function_name": "predict"},
                    "auto_deploy_model": True, "auto_deployment_config": {"replicas": 1}}) as resp:
                access_key = (await resp.json())["access_key"]
            async with http.post(f"{url}/api/v2/projects/{pid}/jobs", json={"name": "j", "script": "job.py"}) as resp:
                job_id = (await resp.json())["id"]

            async def writer(round_no: int) -> None:
                for i in range(10_000):
                    name = f"r{round_no}-{i}"
                    async with http.post(url + "/api/v2/projects", json={"name": name}) as resp:
                        if resp.status == 200:
                            projects_made.append(name)

            async def uploader(round_no: int) -> None:
                for i in range(10_000):
                    name, size = f"u{round_no}-{i}.bin", rng.randrange(1, 3_000_000)
                    form = aiohttp.FormData()
                    form.add_field(name, b"u" * size, filename=name)
                    async with http.post(f"{url}/api/v2/projects/{pid}/files", data=form) as resp:
                        if resp.status == 200:
                            uploads_made[name] = size

            async def starter() -> None:
                while True:
                    async with http.post(f"{url}/api/v2/projects/{pid}/sessions", json={"runtime_identifier": "host/python3"}):
                        pass
                    async with http.post(f"{url}/api/v2/projects/{pid}/jobs/{job_id}/runs", json={}):
                        pass
                    await asyncio.sleep(0.1)

            async def caller() -> None:
                while True:
                    async with http.post(url + "/model", json={"accessKey": access_key, "request": {}}):
                        pass

            for round_no in range(ROUNDS):
                load = [asyncio.ensure_future(f) for f in (writer(round_no), uploader(round_no), starter(), caller())]
                await asyncio.sleep(rng.uniform(0.3, 2.0))
                proc.send_signal(signal.SIGKILL)
                proc.wait(10)
                await asyncio.gather(*load, return_exceptions=True)  # they fail as the server goes
                proc = serve(env, port, log)
                await wait_ready(http, url, proc, log)
                await _check(clean_db, data_dir, pid, projects_made, uploads_made, round_no)
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(30)
    assert len(projects_made) > ROUNDS and len(uploads_made) > ROUNDS, (len(projects_made), len(uploads_made))


async def _check(dsn: str, data_dir: Path, pid: str, projects: list[str], uploads: dict[str, int], round_no: int) -> None:
    where = f"after kill {round_no + 1}"
    conn = await asyncpg.connect(dsn)
    try:
        names = Counter(r["name"] for r in await conn.fetch("SELECT name FROM projects"))
        active: list[Any] = await conn.fetch(
            "SELECT public_id, kind, status FROM workloads WHERE engine = 'local'"
            " AND status IN ('ENGINE_SCHEDULING', 'ENGINE_STARTING', 'ENGINE_RUNNING', 'ENGINE_STOPPING')")
    finally:
        await conn.close()
    assert all(names[n] == 1 for n in projects), (where, [n for n in projects if names[n] != 1])
    assert max(names.values()) == 1, where
    root = data_dir / "projects" / pid
    for name, size in uploads.items():
        assert (root / name).stat().st_size == size, (where, name)
    for path in root.iterdir():  # whatever is there is whole: an upload appears complete or not at all
        if path.name.startswith("u") and path.name.endswith(".bin"):
            assert path.read_bytes() == b"u" * path.stat().st_size and path.stat().st_size > 0, (where, path.name)
    assert not list((data_dir / "projects" / ".uploads").glob("*")), (where, "an upload's leftovers were not swept")
    # Nothing the appliance lists as active is without a process (the start-up reconcile ended
    # what died with it; a model's replica was started again).
    for row in active:
        for _ in range(50):
            if marked_pids(row["public_id"]) or row["status"] in ("ENGINE_SCHEDULING", "ENGINE_STARTING"):
                break
            await asyncio.sleep(0.1)
        assert marked_pids(row["public_id"]) or row["status"] != "ENGINE_RUNNING", (where, dict(row))
