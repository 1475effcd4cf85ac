"""AMPs: CreateAmp clones a git repository and sets the project up by its .project-metadata.yaml
(written as Cloudera's own AMPs are: literal "None" arguments, a model's access key into a
variable, examples in the build task). The tasks really run: a job trains, a model is built from
what it wrote and answers, an application starts. A broken AMP fails the project with a message
that names the task."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import time
from pathlib import Path
from typing import Any

from tests.conftest import Api
from tests.integration.test_models import call_until_served

METADATA = """\
name: Tiny Churn Prototype
description: Trains a model, serves it, and shows a page
author: Tests
specification_version: 1.0
prototype_version: 1.0
date: "2026-12-01"
api_version: 1

runtimes:
  - editor: Workbench
    kernel: Python 3
    edition: Host

environment_variables:
  FACTOR:
    default: "2"
    description: What the model multiplies by
  GREETING:
    default: hello
    description: Said by the application

tasks:
  - type: create_job
    name: Train the model
    entity_label: train
    script: code/train.py
    arguments: None
    short_summary: Job to train the model
    kernel: python3

  - type: run_job
    entity_label: train
    short_summary: Running the training job

  - type: create_model
    name: Churn Model Endpoint
    entity_label: churn
    description: Multiplies by the trained factor
    access_key_environment_variable: CHURN_ACCESS_KEY
    default_resources:
      cpu: 1
      memory: 2
    default_replication_policy:
      type: fixed
      num_replicas: 1

  - type: build_model
    name: Build the model
    entity_label: churn
    comment: Build from the trained factor
    examples:
      - request: {"x": 21}
        response: ""
    target_file_path: code/serve.py
    target_function_name: predict
    kernel: python3

  - type: deploy_model
    name: churn
    entity_label: churn
    cpu: 1
    gpu: 0

  - type: start_application
    name: Churn UI
    subdomain: churnui
    script: code/app.py
    kernel: python3
"""

TRAIN = """\
import json, os
os.makedirs("model", exist_ok=True)
with open("model/factor.json", "w") as f:
    json.dump({"factor": int(os.environ["FACTOR"])}, f)
print("trained with factor", os.environ["FACTOR"])
"""

SERVE = """\
import json
with open("model/factor.json") as f:
    FACTOR = json.load(f)["factor"]

def predict(args):
    return {"y": args["x"] * FACTOR}
"""

APP = """\
import http.server, os
class Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(os.environ["GREETING"].encode())
http.server.HTTPServer(("127.0.0.1", int(os.environ["CDSW_APP_PORT"])), Hello).serve_forever()
"""


def git_repo(path: Path, files: dict[str, str]) -> str:
    path.mkdir()
    subprocess.run(["git", "init", "-q", "-b", "main", str(path)], check=True)
    for name, text in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(text)
    subprocess.run(["git", "-C", str(path), "add", "."], check=True)
    subprocess.run(["git", "-C", str(path), "-c", "user.name=t", "-c", "user.email=t@e", "commit", "-qm", "amp"], check=True)
    return f"file://{path}"


async def set_up(api: Api, project_id: str, timeout: float = 240) -> dict[str, Any]:
    """The project once its AMP set-up has ended (or its clone failed)."""
    deadline = time.monotonic() + timeout
    while True:
        _, project = await api.get(f"/api/v2/projects/{project_id}")
        message = project.get("creation_message", "")
        if project["creation_status"] == "failure" or message.startswith(("AMP set up", "AMP set-up failed")):
            return project
        assert time.monotonic() < deadline, project
        await asyncio.sleep(0.2)


async def test_an_amp_is_cloned_and_its_tasks_run(alice: Api, bob: Api, tmp_path: Path) -> None:
    url = git_repo(tmp_path / "amp", {".project-metadata.yaml": METADATA, "code/train.py": TRAIN,
                                      "code/serve.py": SERVE, "code/app.py": APP, "README.md": "# Tiny churn\n"})
    status, project = await alice.post("/api/v2/amps", json={
        "create_project_request": {"name": "Churn AMP", "git_url": url, "template": "blank", "environment": {"FACTOR": "3"}},
        "configure_prototype_request": {"execute_amp_steps": True, "run_import_tasks": True}})
    assert status == 200 and project["creation_status"] == "creating", project
    pid = project["id"]
    project = await set_up(alice, pid)
    assert project["creation_status"] == "success", project
    assert project["creation_message"] == "AMP set up: 6 task(s) done"

    _, jobs = await alice.get(f"/api/v2/projects/{pid}/jobs")
    (job,) = jobs["jobs"]
    assert job["name"] == "Train the model" and job["arguments"] == "" and job["runtime_identifier"] == "host/python3"
    _, runs = await alice.get(f"/api/v2/projects/{pid}/jobs/{job['id']}/runs")
    assert [r["status"] for r in runs["job_runs"]] == ["ENGINE_SUCCEEDED"]

    _, models = await alice.get(f"/api/v2/projects/{pid}/models")
    (model,) = models["models"]
    assert model["name"] == "Churn Model Endpoint"
    environment = json.loads(project["environment"])
    # The metadata's defaults, the request's value over them, and the model's key.
    assert environment == {"FACTOR": "3", "GREETING": "hello", "CHURN_ACCESS_KEY": model["access_key"]}
    answer = await call_until_served(alice, model["access_key"], {"x": 14}, timeout=60)
    assert answer["response"] == {"y": 42}  # the factor the job trained with

    _, apps = await alice.get(f"/api/v2/projects/{pid}/applications")
    (app,) = apps["applications"]
    assert app["name"] == "Churn UI" and app["subdomain"] == "churnui"

    # Another user's AMP of the same repository without its steps: cloned and configured only.
    status, other = await bob.post("/api/v2/amps", json={"create_project_request": {"name": "Just files", "git_url": url}})
    other = await set_up(bob, other["id"])
    assert other["creation_status"] == "success" and "without its tasks" in other["creation_message"], other
    _, jobs = await bob.get(f"/api/v2/projects/{other['id']}/jobs")
    assert jobs["jobs"] == []


async def test_a_broken_amp_says_which_task_failed(alice: Api, tmp_path: Path) -> None:
    failing = METADATA.replace("script: code/train.py", "script: code/missing.py")
    url = git_repo(tmp_path / "broken", {".project-metadata.yaml": failing, "code/train.py": TRAIN})
    _, project = await alice.post("/api/v2/amps", json={
        "create_project_request": {"name": "Broken AMP", "git_url": url},
        "configure_prototype_request": {"execute_amp_steps": True}})
    project = await set_up(alice, project["id"])
    assert project["creation_status"] == "success"  # its files are there, to be fixed
    assert re.fullmatch(r"AMP set-up failed: AMP task 2 of 6 \(run_job: Running the training job\) failed: its run \w+ "
                        r"ended Failed: the main process exited with code 2", project["creation_message"]), project

    url = git_repo(tmp_path / "plain", {"README.md": "no metadata\n"})
    _, project = await alice.post("/api/v2/amps", json={"create_project_request": {"name": "Not an AMP", "git_url": url}})
    project = await set_up(alice, project["id"])
    assert project["creation_message"].startswith("AMP set-up failed: the repository has no .project-metadata.yaml"), project

    url = git_repo(tmp_path / "unknown", {".project-metadata.yaml": "tasks:\n  - type: run_session\n    script: a.py\n"})
    _, project = await alice.post("/api/v2/amps", json={"create_project_request": {"name": "Unknown task", "git_url": url},
                                                        "configure_prototype_request": {"execute_amp_steps": True}})
    project = await set_up(alice, project["id"])
    assert project["creation_message"].startswith("AMP set-up failed:") and "'run_session'" in project["creation_message"]

    status, body = await alice.post("/api/v2/amps", json={"create_project_request": {"name": "No URL"}})
    assert status == 400 and "git_url" in body["message"], body
    status, body = await alice.post("/api/v2/amps", json={"create_project_request": {"name": "x", "git_url": url},
                                                          "configure_prototype_request": {"runtime_identifier": "nope:1"}})
    assert status == 400 and "unknown runtime" in body["message"], body
