"""SIGKILL the appliance while workloads run, start it again: nothing stays stuck in
ENGINE_RUNNING and nothing runs that nobody owns."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import aiodocker
import aiohttp
import asyncpg

from tests.integration.test_cli import CLI, free_port


def marked_pids(workload_id: str) -> list[int]:
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if f"CML_WORKLOAD_ID={workload_id}".encode() in Path(entry.path, "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def serve(env: dict[str, str], port: int, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(CLI + ["serve", "--port", str(port)], env=env, stdout=open(log, "ab"), stderr=subprocess.STDOUT)


async def wait_ready(session: aiohttp.ClientSession, url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    for _ in range(300):
        if proc.poll() is not None:
            raise AssertionError(f"serve exited: {log.read_text()[-3000:]}")
        try:
            async with session.get(url + "/readyz") as resp:
                if resp.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.1)
    raise AssertionError(f"serve not ready: {log.read_text()[-3000:]}")


async def status_of(session: aiohttp.ClientSession, url: str, pid: str, sid: str, wanted: str, timeout: float = 20) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    body: dict[str, Any] = {}
    while time.monotonic() < deadline:
        async with session.get(f"{url}/api/v2/projects/{pid}/sessions/{sid}") as resp:
            body = await resp.json()
        if body.get("status") == wanted:
            return body
        await asyncio.sleep(0.1)
    raise AssertionError(f"{sid} is {body.get('status')} ({body.get('reason')}), wanted {wanted}")


async def test_sigkill_and_restart_leave_nothing_stuck_or_orphaned(
    clean_db: str, tmp_path: Path, podman_url: str, busybox_image: str
) -> None:
    conn = await asyncpg.connect(clean_db)
    try:
        await conn.execute(
            "INSERT INTO runtimes (image_identifier, editor, kernel, edition, full_version) VALUES ($1, 'Workbench', 'Shell', 'Busybox', '1')",
            busybox_image,
        )
    finally:
        await conn.close()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CML_")}
    env.update({
        "CML_DATABASE_URL": clean_db, "CML_DATA_DIR": str(tmp_path / "data"), "CML_CONTAINER_ENGINE_URL": podman_url,
        "CML_LOG_LEVEL": "WARNING", "CML_STOP_GRACE_SECONDS": "2",
        "CML_APPS_PORT": "0", "CML_EDITORS_PORT": "0", "CML_GRPC_PORT": "0",
    })
    assert subprocess.run(CLI + ["users", "create", "kim", "--email", "k@example.com", "--password-stdin"],
                          env=env, input=b"longpassword\n", capture_output=True).returncode == 0
    key = subprocess.run(CLI + ["api-keys", "create", "kim"], env=env, capture_output=True, text=True).stdout.split()[-1]
    port, log = free_port(), tmp_path / "serve.log"
    url = f"http://127.0.0.1:{port}"
    proc = serve(env, port, log)
    docker = aiodocker.Docker(url=podman_url)
    site_id = "unknown"
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as http:
        try:
            await wait_ready(http, url, proc, log)
            conn = await asyncpg.connect(clean_db)
            site_id = await conn.fetchval("SELECT site_id FROM site")
            await conn.close()
            async with http.post(url + "/api/v2/projects", json={"name": "crash"}) as resp:
                pid = (await resp.json())["id"]
            started = {}
            for runtime in ("host/python3", busybox_image):
                async with http.post(f"{url}/api/v2/projects/{pid}/sessions", json={"runtime_identifier": runtime}) as resp:
                    body = await resp.json()
                    assert resp.status == 200, body
                started[runtime] = body["id"]
            local_sid, container_sid = started["host/python3"], started[busybox_image]
            for sid in started.values():
                await status_of(http, url, pid, sid, "ENGINE_RUNNING")
            assert marked_pids(local_sid), "the local session has no process"
            # A container carrying our labels that no row owns.
            orphan = await docker.containers.create(
                {"Image": busybox_image, "Cmd": ["sleep", "600"], "Labels": {"cml.site": site_id, "cml.workload": "zzzorphan"}},
                name=f"cml-zzzorphan-{site_id}",
            )
            await orphan.start()

            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            # The session's shell dies with the appliance; its `sleep` child is left behind.
            await asyncio.sleep(0.5)

            proc = serve(env, port, log)
            await wait_ready(http, url, proc, log)
            failed = await status_of(http, url, pid, local_sid, "ENGINE_FAILED")
            assert "restart" in failed["reason"]
            # Its output survived the crash.
            async with http.get(f"{url}/api/v2/projects/{pid}/sessions/{local_sid}/logs") as resp:
                assert f"Session {local_sid} is running" in (await resp.json())["content"]
            for _ in range(50):
                if not marked_pids(local_sid):
                    break
                await asyncio.sleep(0.1)
            assert marked_pids(local_sid) == [], "a process of the dead local session still runs"
            # Containers survive a restart: the appliance watches its session again, and can stop it.
            adopted = await status_of(http, url, pid, container_sid, "ENGINE_RUNNING")
            assert adopted["status"] == "ENGINE_RUNNING"
            listed = await docker.containers.list(all=True, filters={"label": ["cml.workload=zzzorphan"]})
            assert listed == []
            async with http.post(f"{url}/api/v2/projects/{pid}/sessions/{container_sid}:stop") as resp:
                assert resp.status == 200
            await status_of(http, url, pid, container_sid, "ENGINE_STOPPED")
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(30)
            for container in await docker.containers.list(all=True, filters={"label": [f"cml.site={site_id}"]}):
                await container.delete(force=True)
            await docker.close()
