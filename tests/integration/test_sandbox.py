"""The local engine's sandbox: what a workload's code can reach, tried from inside a real workload.

A job in Bob's project probes, from Python, everything it must not reach: Alice's project (by its
path on the host), the data dir with the secret key and the embedded Postgres, other workloads'
processes and their CDSW_APIV2_KEY, the system (to write), and the appliance's own interpreter
files (read-only). The answers come back in the run's log.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp.test_utils import TestClient

from cml_appliance.core.settings import Settings
from cml_appliance.web.keys import LOCAL_SANDBOX, PROJECTS, WORKLOADS
from tests.conftest import Api, require_tool
from tests.integration.sessions_helpers import wait_status
from tests.integration.test_jobs_api import wait_run

PROBE = r"""
import glob, json, os, socket, sys
target, data_dir, db_socket, own = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
seen = {"uid": os.getuid(), "cwd": os.getcwd(), "home": os.environ.get("HOME")}
def attempt(name, fn):
    try:
        seen[name] = ["ok", fn()]
    except Exception as exc:
        seen[name] = ["refused", type(exc).__name__]
attempt("other_project_file", lambda: open(target).read())
attempt("other_project_dir", lambda: os.listdir(os.path.dirname(target)))
attempt("secret_key", lambda: open(os.path.join(data_dir, "secret_key")).read())
attempt("data_dir", lambda: sorted(os.listdir(data_dir)))
attempt("projects_dir", lambda: sorted(os.listdir(os.path.join(data_dir, "projects"))))
attempt("write_etc", lambda: open("/etc/cml-owned", "w").write("x"))
attempt("write_usr", lambda: open("/usr/cml-owned", "w").write("x"))
attempt("own_file", lambda: open(own).read())
attempt("write_home", lambda: open("/home/cdsw/written-inside.txt", "w").write("from the sandbox"))
def db():
    s = socket.socket(socket.AF_UNIX)
    s.connect(db_socket)
    return "connected"
attempt("database_socket", db)
keys = {}
for path in glob.glob("/proc/[0-9]*/environ"):
    try:
        for item in open(path, "rb").read().split(b"\0"):
            if item.startswith(b"CDSW_APIV2_KEY=") or item.startswith(b"CML_WORKLOAD_ID="):
                keys.setdefault(path, []).append(item.decode())
    except OSError:
        pass
seen["visible_workload_ids"] = sorted({i.split("=", 1)[1] for v in keys.values() for i in v if i.startswith("CML_WORKLOAD_ID=")})
seen["pids"] = sorted(int(p.split("/")[2]) for p in glob.glob("/proc/[0-9]*"))
print("PROBE " + json.dumps(seen), flush=True)
"""


async def test_a_workload_reaches_its_project_and_nothing_else(client: TestClient, settings: Settings, alice: Api,
                                                                bob: Api) -> None:
    require_tool(shutil.which("bwrap") is not None and client.app[LOCAL_SANDBOX] == "bubblewrap",
                 f"a working bubblewrap (the appliance says: {client.app[LOCAL_SANDBOX]})")
    projects = client.app[PROJECTS]
    _, theirs = await alice.post("/api/v2/projects", json={"name": "Alice's"})
    secret_file = projects.projects_dir / theirs["id"] / "secret.txt"
    secret_file.write_text("alice's secret")
    # A running session of Alice's: its process and its key exist while Bob's job probes.
    _, session = await alice.post(f"/api/v2/projects/{theirs['id']}/sessions", json={"runtime_identifier": "host/python3"})
    await wait_status(alice, theirs["id"], session["id"], "ENGINE_RUNNING")

    _, mine = await bob.post("/api/v2/projects", json={"name": "Bob's"})
    pid = mine["id"]
    form = aiohttp.FormData()
    form.add_field("probe.py", PROBE.encode(), filename="probe.py")
    form.add_field("mine.txt", b"bob's own", filename="mine.txt")
    await bob.post(f"/api/v2/projects/{pid}/files", data=form)
    stack = contextlib.ExitStack()
    db_socket = _database_socket(settings, stack)
    own = projects.projects_dir / pid / "mine.txt"
    _, job = await bob.post(f"/api/v2/projects/{pid}/jobs", json={
        "name": "probe", "script": "probe.py", "runtime_identifier": "host/python3",
        "arguments": f"{secret_file} {settings.data_dir} {db_socket} {own}"})
    _, run = await bob.post(f"/api/v2/projects/{pid}/jobs/{job['id']}/runs", json={})
    await wait_run(bob, pid, job["id"], run["id"], "ENGINE_SUCCEEDED")
    _, log = await bob.get(f"/api/v2/projects/{pid}/jobs/{job['id']}/runs/{run['id']}/logs")
    line = next(x for x in log["content"].splitlines() if x.startswith("PROBE "))
    seen: dict[str, Any] = json.loads(line.removeprefix("PROBE "))

    assert seen["uid"] == 8536 and seen["home"] == "/home/cdsw", seen
    assert seen["other_project_file"][0] == "refused" and seen["other_project_dir"][0] == "refused", seen
    assert seen["secret_key"][0] == "refused", seen
    # The data dir holds nothing but the way to the project itself.
    assert seen["data_dir"] == ["ok", ["projects"]], seen
    assert seen["projects_dir"] == ["ok", [pid]], seen
    assert seen["write_etc"][0] == "refused" and seen["write_usr"][0] == "refused", seen
    assert seen["own_file"] == ["ok", "bob's own"], seen
    assert seen["write_home"][0] == "ok" and (projects.projects_dir / pid / "written-inside.txt").read_text() == "from the sandbox"
    assert seen["database_socket"][0] == "refused", seen
    # Its own processes only: no other workload, no other key.
    assert seen["visible_workload_ids"] == [run["id"]], seen
    assert session["id"] not in line and len(seen["pids"]) <= 4, seen
    await alice.post(f"/api/v2/projects/{theirs['id']}/sessions/{session['id']}:stop")
    stack.close()


def _database_socket(settings: Settings, stack: contextlib.ExitStack) -> str:
    """The embedded Postgres's socket in the data dir; with an external database, a listening
    socket in the data dir that must be as unreachable."""
    pgdata = settings.data_dir / "postgres"
    sockets = list(Path(pgdata).glob(".s.PGSQL.*")) if pgdata.exists() else []
    if sockets:
        return str(sockets[0])
    marker = settings.data_dir / "probe.sock"
    listener = stack.enter_context(socket.socket(socket.AF_UNIX))
    listener.bind(str(marker))
    listener.listen(1)
    return str(marker)


async def test_unsandboxed_local_workloads_are_refused_once_there_are_several_users(client: TestClient, alice: Api,
                                                                                    bob: Api) -> None:
    service = client.app[WORKLOADS]
    service.unsandboxed_local = "bubblewrap is not installed"
    try:
        _, project = await alice.post("/api/v2/projects", json={"name": "Refused"})
        status, body = await alice.post(f"/api/v2/projects/{project['id']}/sessions", json={"runtime_identifier": "host/python3"})
        assert status == 503 and "CML_ALLOW_UNSANDBOXED_LOCAL" in body["message"] and "2 users" in body["message"], body
    finally:
        service.unsandboxed_local = ""
