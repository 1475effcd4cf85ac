"""A full disk under the data dir (a small tmpfs mounted for the test): uploads and logs fail with a
clear error, nothing already stored is damaged, and the appliance keeps serving."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from cml_appliance.app import create_app
from cml_appliance.auth import api_keys, users
from cml_appliance.core.settings import Settings
from cml_appliance.web.keys import POOL
from tests.conftest import Api, require_tool
from tests.integration.test_jobs_api import wait_run

DISK_MB = 6


@pytest.fixture
def small_disk() -> Iterator[Path]:
    where = Path(tempfile.mkdtemp(prefix="cml-small-disk-"))
    mounted = os.geteuid() == 0 and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={DISK_MB}m", "tmpfs", str(where)], capture_output=True).returncode == 0
    require_tool(mounted, "root and tmpfs mounts (for a disk that fills up)")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)
        where.rmdir()


async def test_a_full_disk_refuses_uploads_loses_only_new_output_and_keeps_serving(
        aiohttp_client: Any, settings: Settings, small_disk: Path, caplog: pytest.LogCaptureFixture) -> None:
    client = await aiohttp_client(create_app(dataclasses.replace(settings, data_dir=small_disk, max_upload_mb=64)))
    pool = client.app[POOL]
    user = await users.create_user(pool, "alice", "alice@example.com", "correct horse")
    alice = Api(client, (await api_keys.create(pool, user))[0], "alice")
    _, project = await alice.post("/api/v2/projects", json={"name": "Full"})
    pid = project["id"]

    def upload(name: str, size: int) -> aiohttp.FormData:
        form = aiohttp.FormData()
        form.add_field(name, b"k" * size, filename=name)
        return form

    status, _ = await alice.post(f"/api/v2/projects/{pid}/files", data=upload("keep.bin", 1_000_000))
    assert status == 200
    (small_disk / "projects" / pid / "loud.py").write_text(
        "import sys\nfor i in range(2000):\n    sys.stdout.write(str(i) * 3000 + '\\n')\nprint('the end')\n")

    # Bigger than what is left: a clear error, nothing half-written, the old file whole.
    status, body = await alice.post(f"/api/v2/projects/{pid}/files", data=upload("too-big.bin", 8_000_000))
    assert status == 507 and "data disk is full" in body["message"], body
    _, listing = await alice.get(f"/api/v2/projects/{pid}/files")
    assert sorted(f["path"] for f in listing["files"]) == ["keep.bin", "loud.py"]
    assert (small_disk / "projects" / pid / "keep.bin").read_bytes() == b"k" * 1_000_000
    assert not any((small_disk / "projects" / ".uploads").iterdir())

    # Fill what is left, then run a job whose output has no room: it runs to its end regardless.
    filler = small_disk / "filler"
    with open(filler, "wb") as fh:
        try:
            while True:
                fh.write(b"f" * 65536)
                fh.flush()
        except OSError:
            pass
    _, job = await alice.post(f"/api/v2/projects/{pid}/jobs", json={"name": "loud", "script": "loud.py"})
    _, run = await alice.post(f"/api/v2/projects/{pid}/jobs/{job['id']}/runs", json={})
    assert "id" in run, run
    await wait_run(alice, pid, job["id"], run["id"], "ENGINE_SUCCEEDED", timeout=30)
    assert any("output of workload" in r.getMessage() and "being lost" in r.getMessage() for r in caplog.records)

    # Room again: the appliance serves and stores as before.
    filler.unlink()
    status, _ = await alice.post(f"/api/v2/projects/{pid}/files", data=upload("after.bin", 10_000))
    assert status == 200
    status, listing = await alice.get(f"/api/v2/projects/{pid}/files")
    assert status == 200 and sorted(f["path"] for f in listing["files"]) == ["after.bin", "keep.bin", "loud.py"]
    assert (small_disk / "projects" / pid / "keep.bin").read_bytes() == b"k" * 1_000_000


async def test_a_build_script_that_fills_the_disk_fails_the_build_and_frees_its_space(
        aiohttp_client: Any, settings: Settings, small_disk: Path) -> None:
    """A cdsw-build.sh that writes until the disk is full: the build fails with the script's own
    words (no space left), its work folder is removed, and the appliance goes on serving."""
    import shutil

    from tests.conftest import wait_build

    require_tool(shutil.which("docker-registry") is not None and shutil.which("bwrap") is not None,
                 "docker-registry and bubblewrap")
    client = await aiohttp_client(create_app(dataclasses.replace(settings, data_dir=small_disk)))
    pool = client.app[POOL]
    user = await users.create_user(pool, "bea", "bea@example.com", "correct horse")
    bea = Api(client, (await api_keys.create(pool, user))[0], "bea")
    _, project = await bea.post("/api/v2/projects", json={"name": "Greedy"})
    pid = project["id"]
    directory = small_disk / "projects" / pid
    (directory / "predict.py").write_text("def predict(args):\n    return args\n")
    (directory / "cdsw-build.sh").write_text("dd if=/dev/zero of=/home/cdsw/fill bs=1M count=100\n")
    _, model = await bea.post(f"/api/v2/projects/{pid}/models", json={"name": "greedy"})
    _, made = await bea.post(f"/api/v2/projects/{pid}/models/{model['id']}/builds", json={
        "file_path": "predict.py", "function_name": "predict", "runtime_identifier": "host/python3"})
    build = await wait_build(bea, pid, model["id"], made["id"])
    assert build["status"] == "build failed", build
    assert "exited with" in build["failure_reason"] and "No space left" in build["failure_reason"], build["failure_reason"]
    assert not (small_disk / "build-work" / made["id"]).exists(), "the build's work folder was left behind"
    status, _ = await bea.get(f"/api/v2/projects/{pid}")
    assert status == 200
