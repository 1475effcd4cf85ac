"""Builds, end to end with the real layer-append builder: a snapshot fetched from the git server
becomes one reproducible layer in the registry; an unchanged snapshot pushes nothing; deleting
a build deletes its tag; a container runtime's image is the base, and podman pulls the result
through the appliance with the owner's key and not with another user's."""

from __future__ import annotations

import asyncio
import gzip
import io
import json
import os
import secrets
import shutil
import tarfile
from pathlib import Path
from typing import Any

import aiohttp

from cml_appliance.registry.client import RegistryClient, RegistryError
from cml_appliance.web.keys import POOL, PROJECTS
from tests.conftest import Api, require_tool, wait_build

PREDICT = b"def predict(args):\n    return {'sum': args['a'] + args['b']}\n"


async def project_with_files(api: Api) -> tuple[str, Path]:
    _, project = await api.post("/api/v2/projects", json={"name": "Built"})
    directory = api.client.app[PROJECTS].projects_dir / project["id"]
    (directory / "predict.py").write_bytes(PREDICT)
    (directory / "lib" / "deep").mkdir(parents=True)
    (directory / "lib" / "deep" / "helpers.py").write_text("X = 1\n")
    (directory / "run me.sh").write_text("#!/bin/sh\necho hi\n")
    (directory / "run me.sh").chmod(0o755)
    (directory / "empty.txt").write_text("")
    (directory / "data").mkdir()
    (directory / "data" / "huge.csv").write_text("x\n" * 10000)
    (directory / ".gitignore").write_text("data/\n")
    return project["id"], directory


async def build(api: Api, pid: str, mid: str, **fields: Any) -> dict[str, Any]:
    status, made = await api.post(f"/api/v2/projects/{pid}/models/{mid}/builds",
                                  json={"file_path": "predict.py", "function_name": "predict"} | fields)
    assert status == 200, made
    return await wait_build(api, pid, mid, made["id"])


async def layer_of(registry: RegistryClient, image: str) -> tuple[str, tarfile.TarFile]:
    repository, _, tag = image.rpartition(":")
    raw, _, _ = await registry.manifest(repository, tag)
    top = json.loads(raw)["layers"][-1]
    blob = await registry.blob(repository, top["digest"])
    return top["digest"], tarfile.open(fileobj=io.BytesIO(gzip.decompress(blob)))


async def test_a_build_is_a_reproducible_layer_in_the_registry(alice: Api, bob: Api) -> None:
    require_tool(shutil.which("docker-registry") is not None, "docker-registry (Debian package)")
    pid, directory = await project_with_files(alice)
    _, model = await alice.post(f"/api/v2/projects/{pid}/models", json={"name": "adder"})
    first = await build(alice, pid, model["id"], runtime_identifier="host/python3")
    assert first["status"] == "built", first
    assert first["built_image"] == f"alice/built/model-{model['id']}:{first['id']}" and first["snapshot_commit"]
    base = str(alice.client.make_url("")).rstrip("/")
    async with aiohttp.ClientSession() as http:
        owner = RegistryClient(http, base, username="alice", password=alice.key)
        digest, layer = await layer_of(owner, first["built_image"])
        names = layer.getnames()
        for expected in ("home/cdsw/predict.py", "home/cdsw/lib/deep/helpers.py", "home/cdsw/run me.sh",
                         "home/cdsw/empty.txt", "home/cdsw/.gitignore", "home/cdsw/.cml_model_server.py"):
            assert expected in names, names
        assert not any(n.startswith("home/cdsw/data") for n in names), "an ignored folder got into the image"
        assert names == sorted(names)
        assert {(m.mtime, m.uid, m.gid) for m in layer.getmembers()} == {(0, 8536, 8536)}
        assert layer.getmember("home/cdsw/run me.sh").mode == 0o755
        assert layer.getmember("home/cdsw/predict.py").mode == 0o644
        # The same files again: the same layer, and nothing sent.
        again = await build(alice, pid, model["id"], runtime_identifier="host/python3")
        assert (await layer_of(owner, again["built_image"]))[0] == digest
        _, log = await alice.get(f"/api/v2/projects/{pid}/models/{model['id']}/builds/{again['id']}/logs")
        assert "nothing to send" in log["content"], log["content"]
        # One file changed: a new layer.
        (directory / "lib" / "deep" / "helpers.py").write_text("X = 2\n")
        changed = await build(alice, pid, model["id"], runtime_identifier="host/python3")
        assert (await layer_of(owner, changed["built_image"]))[0] != digest
        # Another user pulls nothing.
        try:
            await layer_of(RegistryClient(http, base, username="bob", password=bob.key), first["built_image"])
        except RegistryError as exc:
            assert exc.status in (401, 403)
        else:
            raise AssertionError("another user pulled the image")
        # Deleting a build deletes its tag (and keeps the others).
        status, _ = await alice.delete(f"/api/v2/projects/{pid}/models/{model['id']}/builds/{first['id']}")
        assert status == 200
        repository = first["built_image"].rpartition(":")[0]
        assert sorted(await owner.tags(repository)) == sorted([again["id"], changed["id"]])


async def test_a_container_runtime_is_the_base_and_podman_runs_the_image(container_client: Any, make_container_user: Any,
                                                                         busybox_image: str, tmp_path: Path) -> None:
    from tests.conftest import _podman_env, podman_cli

    require_tool(shutil.which("docker-registry") is not None, "docker-registry (Debian package)")
    dana, erin = await make_container_user("dana"), await make_container_user("erin")
    pid, directory = await project_with_files(dana)
    # The build script runs in a container of the runtime's image, unprivileged.
    (directory / "cdsw-build.sh").write_text("echo built-in-a-container > made.txt\nid -u > uid.txt\ncat /proc/self/status | grep CapEff > caps.txt\n")
    _, model = await dana.post(f"/api/v2/projects/{pid}/models", json={"name": "boxed"})
    built = await build(dana, pid, model["id"], runtime_identifier=busybox_image)
    assert built["status"] == "built", built
    _, log = await dana.get(f"/api/v2/projects/{pid}/models/{model['id']}/builds/{built['id']}/logs")
    assert "exported from the container engine" in log["content"] or "in the registry as" in log["content"], log["content"]
    host = f"127.0.0.1:{container_client.server.port}"
    env = {**_podman_env(), "REGISTRY_AUTH_FILE": str(tmp_path / "auth.json")}

    def podman(*args: str, stdin: str = "") -> Any:
        return podman_cli(env, *args, stdin=stdin)

    image = f"{host}/{built['built_image']}"
    code, out = await podman("login", "--tls-verify=false", "-u", "dana", "--password-stdin", host, stdin=dana.key)
    assert code == 0, out
    code, out = await podman("pull", "--tls-verify=false", image)
    assert code == 0, out
    code, out = await podman("run", "--rm", image, "cat", "/home/cdsw/predict.py", "/home/cdsw/made.txt",
                             "/home/cdsw/uid.txt", "/home/cdsw/caps.txt")
    assert code == 0 and "def predict" in out and "built-in-a-container" in out, out
    uid = 8536 if os.geteuid() == 0 else os.getuid()  # as the containers' user, without capabilities
    assert f"\n{uid}\n" in out and "CapEff:\t0000000000000000" in out, out
    code, out = await podman("run", "--rm", image, "sh", "-c", "echo $PWD")
    assert code == 0 and out.strip().endswith("/home/cdsw"), out
    await podman("rmi", image)
    code, out = await podman("login", "--tls-verify=false", "-u", "erin", "--password-stdin", host, stdin=erin.key)
    assert code == 0, out
    code, out = await podman("pull", "--tls-verify=false", image)
    assert code != 0, out


async def test_site_admins_see_the_queue_and_cancel_from_it(aiohttp_client: Any, settings: Any) -> None:
    """With one build at a time, a slow build runs and the next waits: the admin page lists both
    with their words and ages, and cancels the waiting one; the model page offers its log."""
    import dataclasses
    import os
    import re

    from cml_appliance.app import create_app
    from tests.conftest import user_maker
    from tests.integration.test_web_ui import csrf_of, sign_in

    require_tool(shutil.which("docker-registry") is not None, "docker-registry (Debian package)")
    client = await aiohttp_client(create_app(dataclasses.replace(settings, build_concurrency=1), allow_local_git=True))
    make = user_maker(client)
    admin, alice = await make("root", admin=True), await make("alice")
    pid, directory = await project_with_files(alice)
    (directory / "weights.bin").write_bytes(os.urandom(40 * 1024 * 1024))  # a slow first build
    _, model = await alice.post(f"/api/v2/projects/{pid}/models", json={"name": "slow"})
    builds = f"/api/v2/projects/{pid}/models/{model['id']}/builds"
    _, first = await alice.post(builds, json={"file_path": "predict.py", "function_name": "predict"})
    _, second = await alice.post(builds, json={"file_path": "predict.py", "function_name": "predict"})
    await sign_in(client, "root")
    resp = await client.get("/admin/builds")
    text = await resp.text()
    assert resp.status == 200
    row = re.search(rf'<tr data-build="{second["id"]}">.*?</tr>', text, re.S)
    assert row and "Queued" in row.group(0) and "alice/Built" in row.group(0), text
    token = await csrf_of(client, "/admin/builds")
    resp = await client.post(f"/admin/builds/{second['id']}/cancel", data={"csrf_token": token})
    assert resp.status == 200 and "cancelled" in await resp.text()
    cancelled = await wait_build(alice, pid, model["id"], second["id"])
    assert (cancelled["status"], cancelled["failure_reason"]) == ("build failed", "cancelled")
    assert (await wait_build(alice, pid, model["id"], first["id"]))["status"] == "built"
    # Not for other users.
    await sign_in(client, "alice")
    resp = await client.get("/admin/builds")
    assert resp.status == 403


async def test_a_build_script_runs_in_the_sandbox_and_its_home_is_the_layer(aiohttp_client: Any, settings: Any) -> None:
    """cdsw-build.sh (in the model root) runs with the snapshot as /home/cdsw; what it leaves
    there is the image; a failing script fails the build with its output, a script that never
    ends is stopped by the time limit, and neither leaves a process behind."""
    import dataclasses
    import subprocess

    from cml_appliance.app import create_app
    from tests.conftest import user_maker

    require_tool(shutil.which("docker-registry") is not None and shutil.which("bwrap") is not None,
                 "docker-registry and bubblewrap")
    client = await aiohttp_client(create_app(dataclasses.replace(settings, build_timeout_seconds=4), allow_local_git=True))
    alice = await user_maker(client)("alice")
    pid, directory = await project_with_files(alice)
    (directory / "model").mkdir()
    (directory / "model" / "predict.py").write_bytes(PREDICT)
    (directory / "model" / "cdsw-build.sh").write_text(
        "echo building in $(pwd) as $(id -u)\nmkdir -p /home/cdsw/.local/lib\necho 'VALUE = 42' > /home/cdsw/.local/lib/dep.py\n"
        "echo made > made-by-script.txt\n")
    (directory / "fail.sh").write_text("echo about to fail\necho boom >&2\nexit 3\n")
    # A sleep of its own length, so that no other test's process is taken for this one's.
    forever = f"sleep {600 + secrets.randbelow(1000) / 1000:.3f}"
    (directory / "forever.sh").write_text(f"echo starting; {forever}\n")
    _, model = await alice.post(f"/api/v2/projects/{pid}/models", json={"name": "scripted"})
    built = await build(alice, pid, model["id"], runtime_identifier="host/python3", model_root_dir="model")
    assert built["status"] == "built", built["failure_reason"]
    assert built["model_root_dir"] == "model" and built["build_script_path"] == ""
    _, log = await alice.get(f"/api/v2/projects/{pid}/models/{model['id']}/builds/{built['id']}/logs")
    assert "running model/cdsw-build.sh in /home/cdsw/model" in log["content"], log["content"]
    assert "| building in /home/cdsw/model as 8536" in log["content"], log["content"]
    base = str(client.make_url("")).rstrip("/")
    async with aiohttp.ClientSession() as http:
        _, layer = await layer_of(RegistryClient(http, base, username="alice", password=alice.key), built["built_image"])
        names = layer.getnames()
        assert "home/cdsw/model/made-by-script.txt" in names and "home/cdsw/.local/lib/dep.py" in names, names
    # The script's own failure: the build fails with what it printed; never retried.
    failed = await build(alice, pid, model["id"], runtime_identifier="host/python3", model_root_dir="model",
                         build_script_path="fail.sh")
    assert failed["status"] == "build failed" and "fail.sh exited with 3" in failed["failure_reason"], failed
    assert "boom" in failed["failure_reason"]
    assert await client.app[POOL].fetchval("SELECT attempts FROM model_builds WHERE public_id = $1", failed["id"]) == 1
    # A script that does not end: timedout, and its processes are gone.
    slow = await build(alice, pid, model["id"], runtime_identifier="host/python3", model_root_dir="model",
                       build_script_path="forever.sh")
    assert slow["status"] == "timedout", slow
    left = subprocess.run(["pgrep", "-f", f"^{forever}$"], capture_output=True, text=True).stdout.split()
    assert not left, f"the build script's processes outlived it: {left}"
    # A script path that is not in the snapshot, or that leaves the project: refused.
    missing = await build(alice, pid, model["id"], runtime_identifier="host/python3", build_script_path="nope.sh",
                          file_path="model/predict.py")
    assert missing["status"] == "build failed" and "nope.sh is not a file" in missing["failure_reason"], missing
    status, body = await alice.post(f"/api/v2/projects/{pid}/models/{model['id']}/builds", json={
        "file_path": "predict.py", "function_name": "predict", "build_script_path": "../../etc/passwd"})
    assert status == 400, body
