"""A site as users really have it, for the browser tests: a project with nested folders, a git
clone, odd file names, empty, binary, large and symlinked files, a README with pictures and
tables; and workloads in each state (sessions running and stopped; job runs that succeeded,
failed, timed out and still run; applications running and failed; a deployed model and a build
that failed).
"""

from __future__ import annotations

import asyncio
import os
import struct
import subprocess
import time
import zlib
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient

from cml_appliance.web.keys import PROJECTS
from tests.conftest import Api, wait_build

README = """# Churn model

Predicts which customers leave. See [the training notes](docs/notes%20on%20training.md) and
[the loader](src/churn/load.py).

![Feature importance](figures/importance.png)

| step | script | schedule |
|------|--------|----------|
| train | `train.py` | nightly |
| score | `score.py` | after train |

```python
import pandas as pd
df = pd.read_csv("data/raw/2024/customers.csv")
```

<script>alert("README scripts never run")</script>
[a link that must not run](javascript:alert(1))
"""

APP_PY = b"""import http.server, os
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = b'<h1>Churn dashboard</h1>'
        self.send_response(200); self.send_header('Content-Type', 'text/html')
        self.send_header('Content-Length', str(len(body))); self.end_headers(); self.wfile.write(body)
    def log_message(self, *args):
        pass
print('dashboard serving', flush=True)
http.server.HTTPServer(('127.0.0.1', int(os.environ['CDSW_APP_PORT'])), H).serve_forever()
"""

PREDICT_PY = b"""def predict(args):
    tenure = args["tenure"]
    plan = args.get("plan", "basic")
    return {"churn": 0.8 if tenure < 6 and plan == "basic" else 0.1}
"""


def png(width: int = 4, height: int = 3) -> bytes:
    """A real PNG (solid blue), made here so the test needs no image library."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    rows = b"".join(b"\x00" + b"\x1f\x6f\xeb" * width for _ in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def write_files(root: Path) -> None:
    """The files of the realistic project, written straight into its directory."""
    (root / "data/raw/2024").mkdir(parents=True)
    (root / "data/processed").mkdir(parents=True)
    (root / "src/churn").mkdir(parents=True)
    (root / "docs").mkdir()
    (root / "figures").mkdir()
    (root / "empty folder").mkdir()
    (root / "README.md").write_text(README)
    (root / "train.py").write_text("print('training on', 3, 'folds')\n")
    (root / "fail.py").write_text("import sys\nprint('about to fail')\nsys.exit(3)\n")
    (root / "slow.py").write_text("import time\nprint('working', flush=True)\ntime.sleep(600)\n")
    (root / "app.py").write_bytes(APP_PY)
    (root / "broken_app.py").write_text("raise SystemExit('the dashboard cannot start: no data')\n")
    (root / "predict.py").write_bytes(PREDICT_PY)
    (root / "src/churn/__init__.py").write_text("")
    (root / "src/churn/load.py").write_text("def load(path):\n    return open(path).read()\n")
    (root / "docs/notes on training.md").write_text("# Notes\n\nFive folds, *stratified*.\n")
    (root / "figures/importance.png").write_bytes(png())
    (root / "data/raw/2024/customers.csv").write_text("id,tenure,plan\n" + "".join(f"{i},{i % 48},basic\n" for i in range(2000)))
    # Large: more than the 512 KB the file view shows.
    (root / "data/processed/features.csv").write_text("x,y\n" + "".join(f"{i},{i * i}\n" for i in range(120_000)))
    (root / "empty.txt").write_bytes(b"")
    (root / "model.bin").write_bytes(os.urandom(4096) + b"\x00" * 100)
    (root / "weird name (copy) [1] #&%;'\".txt").write_text("odd names must work\n")
    (root / "ünïcødé ✓ 数据.md").write_text("# Ünïcødé\n")
    (root / "<b>not bold.txt").write_text("<b>still text</b>\n")
    (root / "link-to-src").symlink_to("src")
    (root / "link-to-readme.md").symlink_to("README.md")
    (root / "escape").symlink_to("/etc")  # leads out of the project: never shown


def make_git_repo(where: Path) -> Path:
    repo = where / "upstream.git-src"
    (repo / "notebooks/eda").mkdir(parents=True)
    (repo / "README.md").write_text("# Cloned\n\nA project that came from git.\n")
    (repo / "notebooks/eda/explore.py").write_text("print('explore')\n")
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}
    for args in (["init", "-q", "-b", "main"], ["add", "-A"], ["commit", "-q", "-m", "first"]):
        subprocess.run(["git", *args], cwd=repo, env=env, check=True)
    return repo


async def wait_for(get: Any, check: Any, timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = await get()
        if check(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting; last seen: {value}")
        await asyncio.sleep(0.2)


async def build_site(client: TestClient, alice: Api, bob: Api, tmp_path: Path) -> dict[str, Any]:
    """Everything the crawler visits; returns the ids it may want."""
    _, project = await alice.post("/api/v2/projects", json={"name": "Churn Model", "description": "Who leaves, and why"})
    pid = project["id"]
    service = client.app[PROJECTS]
    write_files(service.projects_dir / pid)
    await alice.put(f"/api/v2/projects/{pid}/collaborators/bob", json={"permission": "write"})

    repo = make_git_repo(tmp_path)
    _, cloned = await alice.post("/api/v2/projects", json={"name": "From Git", "template": "git", "git_url": f"file://{repo}"})
    await wait_for(lambda: alice.get(f"/api/v2/projects/{cloned['id']}"), lambda r: r[1]["creation_status"] != "creating")
    _, failed_clone = await alice.post("/api/v2/projects", json={"name": "Bad Clone", "template": "git",
                                                                 "git_url": f"file://{tmp_path}/no-such-repo"})
    await alice.post("/api/v2/projects", json={"name": "Empty"})

    base = f"/api/v2/projects/{pid}"

    async def session(name: str) -> str:
        status, row = await alice.post(f"{base}/sessions", json={"name": name, "runtime_identifier": "host/python3"})
        assert status == 200, row
        await wait_for(lambda: alice.get(f"{base}/sessions/{row['id']}"), lambda r: r[1]["status"] == "ENGINE_RUNNING")
        return row["id"]

    running_session = await session("Exploring")
    stopped_session = await session("Yesterday")
    await alice.post(f"{base}/sessions/{stopped_session}:stop")

    async def job_run(name: str, script: str, wanted: str, **extra: Any) -> tuple[str, str]:
        status, job = await alice.post(f"{base}/jobs", json={"name": name, "script": script, "runtime_identifier": "host/python3", **extra})
        assert status == 200, job
        status, run = await alice.post(f"{base}/jobs/{job['id']}/runs", json={})
        assert status == 200, run
        await wait_for(lambda: alice.get(f"{base}/jobs/{job['id']}/runs/{run['id']}"), lambda r: r[1]["status"] == wanted)
        return job["id"], run["id"]

    await job_run("Nightly train", "train.py", "ENGINE_SUCCEEDED", schedule="0 2 * * *", timezone="Europe/Berlin")
    await job_run("Flaky import", "fail.py", "ENGINE_FAILED")
    await job_run("Too slow", "slow.py", "ENGINE_TIMEDOUT", timeout=1, kill_on_timeout=True)
    await job_run("Backfill", "slow.py", "ENGINE_RUNNING")
    await alice.post(f"{base}/jobs", json={"name": "Never run yet", "script": "train.py", "runtime_identifier": "host/python3"})

    async def application(name: str, subdomain: str, script: str, wanted: str) -> str:
        status, app = await alice.post(f"{base}/applications", json={
            "name": name, "subdomain": subdomain, "script": script, "runtime_identifier": "host/python3"})
        assert status == 200, app
        await wait_for(lambda: alice.get(f"{base}/applications/{app['id']}"), lambda r: r[1]["status"] == wanted)
        return app["id"]

    await application("Dashboard", "churn-dash", "app.py", "APPLICATION_RUNNING")
    await application("Broken dashboard", "churn-broken", "broken_app.py", "APPLICATION_FAILED")

    status, model = await alice.post(f"{base}/models", json={
        "name": "Churn scorer", "description": "scores one customer",
        "auto_build_model": True, "auto_build_config": {"file_path": "predict.py", "function_name": "predict"},
        "auto_deploy_model": True, "auto_deployment_config": {"replicas": 1}})
    assert status == 200, model
    built = await wait_build(alice, pid, model["id"], deployed=True)
    assert built["status"] == "built", built
    await alice.post(f"{base}/models/{model['id']}/builds", json={"file_path": "predict.py", "function_name": "absent"})
    await wait_for(lambda: alice.get(f"{base}/models/{model['id']}/builds/{built['id']}/deployments"),
                   lambda r: r[1]["model_deployments"] and r[1]["model_deployments"][0]["status"] == "deployed")
    # Experiments in the git-cloned project: runs with params, a metric's history and artifacts in
    # nested folders with odd names (as the MLflow client uploads them), one registered; a team
    # that owns a project; quotas.
    cid = cloned["id"]
    _, experiment = await alice.post(f"/api/v2/projects/{cid}/experiments", json={"name": "churn / baseline"})
    eid = experiment["id"]
    run_ids = []
    for n, (depth, name) in enumerate(((3, "shallow trees"), (8, "deep trees"), (12, "deepest trees"))):
        _, run = await alice.post(f"/api/v2/projects/{cid}/experiments/{eid}/runs", json={"run_name": name})
        await alice.post(f"/api/v2/projects/{cid}/experiments/{eid}/runs/{run['id']}:logbatch", json={
            "params": [{"key": "max_depth", "value": str(depth)}, {"key": "criterion", "value": "gini"}],
            "metrics": [{"key": "auc", "value": 0.6 + n / 10 - step / 100, "step": str(step)} for step in range(5)]})
        if n < 2:
            await alice.patch(f"/api/v2/projects/{cid}/experiments/{eid}/runs/{run['id']}", json={"status": "EXPERIMENT_RUN_FINISHED"})
        run_ids.append(run["id"])
    artifacts = f"/mlflow/{cid}/api/2.0/mlflow-artifacts/artifacts/{eid}/{run_ids[1]}/artifacts"
    for name, body in (("plots/2026 Q4/roc (final).svg", b"<svg xmlns='http://www.w3.org/2000/svg'/>"),
                       ("data/empty.csv", b""), ("model/MLmodel", b"flavors: {}\n"), ("notes ünïcode.txt", b"hello")):
        await alice.put(f"{artifacts}/{name}", data=body)
    _, registered = await alice.post("/api/v2/registry/models", json={
        "project_id": cid, "run_id": run_ids[1], "model_path": "model", "model_name": "churn classifier"})
    await alice.post("/api/v2/site/teams", json={"username": "data-science", "bio": "churn and forecasting"})
    await alice.put("/api/v2/teams/data-science/members/bob", json={"permission": "write"})
    await alice.post("/api/v2/projects", json={"name": "Forecast", "team_name": "data-science"})
    await alice.post("/api/v2/default-quota/user", json={"quota": {"requests_cpu": "16", "requests_memory": "64"}})

    return {"project": pid, "cloned": cloned["id"], "failed_clone": failed_clone["id"], "model": model["id"],
            "running_session": running_session, "stopped_session": stopped_session, "experiment": eid,
            "run": run_ids[1], "registered": registered["model_id"]}
