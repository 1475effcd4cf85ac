"""Experiment tracking: the real `mlflow` client from PyPI (in .venv-workload, unmodified) logs
into a project's MLflow API, CML's API v2 shows the same runs, and bad input is refused in
MLflow's shape on the MLflow API."""

from __future__ import annotations

import asyncio
import json
import os
import textwrap
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import Api, assert_error, run_mlflow_client, tracking_uri

# Runs in the workloads' Python with MLFLOW_TRACKING_URI/TOKEN set, prints one JSON line.
CLIENT_SCRIPT = textwrap.dedent("""
    import json, os, sys, tempfile
    from pathlib import Path

    import mlflow
    import numpy as np
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param, RunTag
    from sklearn.linear_model import LogisticRegression

    out = {}
    experiment = mlflow.set_experiment("iris / baseline")
    out["experiment_id"] = experiment.experiment_id
    X = np.array([[0.0, 1.0], [1.0, 0.0], [0.2, 0.9], [0.9, 0.1], [0.1, 0.8], [0.8, 0.3]])
    y = np.array([0, 1, 0, 1, 0, 1])
    with mlflow.start_run(run_name="first") as run:
        mlflow.log_param("C", 0.5)
        mlflow.log_params({"solver": "lbfgs", "note": "ünïcode ✓"})
        for step in range(5):
            mlflow.log_metric("loss", 1.0 / (step + 1), step=step)
        mlflow.log_metrics({"accuracy": 0.75, "nan_metric": float("nan")})
        mlflow.set_tag("team", "blue")
        folder = Path(tempfile.mkdtemp())
        (folder / "nested" / "deeper").mkdir(parents=True)
        (folder / "nested" / "deeper" / "odd name (1).txt").write_text("deep")
        (folder / "empty.bin").write_bytes(b"")
        (folder / "binary.bin").write_bytes(bytes(range(256)) * 4096)  # 1 MB
        mlflow.log_artifacts(str(folder), artifact_path="data")
        (folder / "report.md").write_text("# report")
        mlflow.log_artifact(str(folder / "report.md"))
        model = LogisticRegression(C=0.5).fit(X, y)
        info = mlflow.sklearn.log_model(model, name="model", input_example=X[:2])
        out["run_id"] = run.info.run_id
        out["model_uri"] = info.model_uri
    with mlflow.start_run(run_name="second") as second:
        client = MlflowClient()
        client.log_batch(second.info.run_id, metrics=[Metric("loss", 0.9 - i / 100, 1700000000000 + i, i) for i in range(50)],
                         params=[Param("C", "2.0")], tags=[RunTag("team", "red")])
        mlflow.log_metric("accuracy", 0.5)
        out["second_id"] = second.info.run_id
    client = MlflowClient()
    found = mlflow.search_runs(experiment_names=["iris / baseline"], filter_string="metrics.accuracy > 0.6 and params.C = '0.5'",
                               output_format="list")
    out["found"] = [r.info.run_id for r in found]
    ordered = mlflow.search_runs(experiment_names=["iris / baseline"], order_by=["metrics.accuracy DESC"], output_format="list")
    out["ordered"] = [r.info.run_id for r in ordered]
    out["tagged"] = [r.info.run_id for r in mlflow.search_runs(experiment_names=["iris / baseline"],
                                                                filter_string="tags.team = 'red'", output_format="list")]
    out["history"] = [(m.step, m.value) for m in client.get_metric_history(out["run_id"], "loss")]
    out["second_history"] = len(client.get_metric_history(out["second_id"], "loss"))
    got = client.get_run(out["run_id"])
    out["params"] = got.data.params
    out["metrics"] = {k: (v if v == v else "nan") for k, v in got.data.metrics.items()}
    out["tags"] = {k: v for k, v in got.data.tags.items() if not k.startswith("mlflow.")}
    out["status"] = got.info.status
    out["listed"] = sorted(f.path for f in client.list_artifacts(out["run_id"], "data"))
    target = Path(tempfile.mkdtemp())
    local = mlflow.artifacts.download_artifacts(run_id=out["run_id"], artifact_path="data", dst_path=str(target))
    out["downloaded"] = sorted(str(p.relative_to(local)) for p in Path(local).rglob("*") if p.is_file())
    out["binary_ok"] = (Path(local) / "binary.bin").read_bytes() == bytes(range(256)) * 4096
    loaded = mlflow.sklearn.load_model(out["model_uri"])
    out["predicted"] = [int(v) for v in loaded.predict(X[:2])]
    pyfunc = mlflow.pyfunc.load_model(out["model_uri"])
    out["pyfunc"] = [int(v) for v in pyfunc.predict(X[:2])]
    print("RESULT " + json.dumps(out))
""")


async def test_the_mlflow_client_logs_runs_that_cmls_api_shows(alice: Api, workload_python: Path) -> None:
    _, project = await alice.post("/api/v2/projects", json={"name": "tracking"})
    pid = project["id"]
    out = await run_mlflow_client(workload_python, tracking_uri(alice, pid), alice.key, CLIENT_SCRIPT)

    assert out["found"] == [out["run_id"]]  # metrics.accuracy > 0.6 and params.C = '0.5'
    assert out["ordered"] == [out["run_id"], out["second_id"]]
    assert out["tagged"] == [out["second_id"]]
    assert out["history"] == [[0, 1.0], [1, 0.5], [2, 1 / 3], [3, 0.25], [4, 0.2]]
    assert out["second_history"] == 50
    assert out["params"] == {"C": "0.5", "solver": "lbfgs", "note": "ünïcode ✓"}
    assert out["metrics"] == {"loss": 0.2, "accuracy": 0.75, "nan_metric": "nan"}
    assert out["tags"] == {"team": "blue"} and out["status"] == "FINISHED"
    assert out["listed"] == ["data/binary.bin", "data/empty.bin", "data/nested"]
    assert out["downloaded"] == ["binary.bin", "empty.bin", "nested/deeper/odd name (1).txt"] and out["binary_ok"]
    assert out["predicted"] == [0, 1] and out["pyfunc"] == [0, 1]

    # CML's API v2 shows the same experiment and runs.
    status, listed = await alice.get(f"/api/v2/projects/{pid}/experiments")
    assert status == 200, listed
    experiment = next(e for e in listed["experiments"] if e["name"] == "iris / baseline")
    assert experiment["id"] == out["experiment_id"] and experiment["lifecycle_stage"] == "active"
    status, runs = await alice.get(f"/api/v2/projects/{pid}/experiments/{experiment['id']}/runs",
                                   params={"sort": "-metrics.accuracy"})
    assert status == 200, runs
    assert [r["id"] for r in runs["experiment_runs"]] == [out["run_id"], out["second_id"]]
    first = runs["experiment_runs"][0]
    assert first["status"] == "EXPERIMENT_RUN_FINISHED" and first["name"] == "first"
    metrics = {m["key"]: m for m in first["data"]["metrics"]}
    assert metrics["accuracy"]["value"] == 0.75 and metrics["loss"]["step"] == "4"
    assert {p["key"]: p["value"] for p in first["data"]["params"]}["C"] == "0.5"
    status, history = await alice.get(f"/api/v2/projects/{pid}/experiments/{experiment['id']}/runs/{out['run_id']}/metrics/loss")
    assert status == 200 and [m["value"] for m in history["metrics"]] == [1.0, 0.5, 1 / 3, 0.25, 0.2]
    status, filtered = await alice.get(f"/api/v2/projects/{pid}/experiments/{experiment['id']}/runs",
                                       params={"search_filter": json.dumps({"metrics.accuracy": "< 0.6"})})
    assert status == 200 and [r["id"] for r in filtered["experiment_runs"]] == [out["second_id"]]
    status, everywhere = await alice.get("/api/v2/experiments")
    assert status == 200 and out["experiment_id"] in [e["id"] for e in everywhere["experiments"]]


async def test_mlflow_errors_have_mlflows_shape(alice: Api, bob: Api, make_user: Any) -> None:
    _, project = await alice.post("/api/v2/projects", json={"name": "errors"})
    pid = project["id"]
    base = f"/mlflow/{pid}/api/2.0/mlflow"

    async def call(api: Api | None, method: str, path: str, **kw: Any) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {api.key}"} if api else {}
        resp = await alice.client.request(method, path, headers=headers, **kw)
        return resp.status, await resp.json()

    status, body = await call(None, "POST", base + "/experiments/create", json={"name": "x"})
    assert status == 401 and body["error_code"] == "UNAUTHENTICATED", body
    status, body = await call(alice, "POST", base + "/experiments/create", json={"name": "x"})
    assert status == 200, body
    eid = body["experiment_id"]
    status, body = await call(alice, "POST", base + "/experiments/create", json={"name": "x"})
    assert status == 400 and body["error_code"] == "RESOURCE_ALREADY_EXISTS", body
    status, body = await call(alice, "GET", base + "/experiments/get", params={"experiment_id": "nope"})
    assert status == 404 and body["error_code"] == "RESOURCE_DOES_NOT_EXIST", body
    status, body = await call(alice, "POST", base + "/runs/create", json={"experiment_id": eid})
    run_id = body["run"]["info"]["run_id"]

    # MLflow's limits per log-batch call: 1,000 metrics, 100 params, 100 tags.
    metrics = [{"key": "m", "value": i, "timestamp": 1, "step": i} for i in range(1001)]
    status, body = await call(alice, "POST", base + "/runs/log-batch", json={"run_id": run_id, "metrics": metrics})
    assert status == 400 and body["error_code"] == "INVALID_PARAMETER_VALUE" and "1000" in body["message"], body
    params = [{"key": f"p{i}", "value": "v"} for i in range(101)]
    status, body = await call(alice, "POST", base + "/runs/log-batch", json={"run_id": run_id, "params": params})
    assert status == 400 and body["error_code"] == "INVALID_PARAMETER_VALUE" and "100" in body["message"], body
    status, body = await call(alice, "POST", base + "/runs/log-batch", json={"run_id": run_id, "metrics": metrics[:1000]})
    assert status == 200, body
    # A param is immutable once logged, as in MLflow.
    await call(alice, "POST", base + "/runs/log-parameter", json={"run_id": run_id, "key": "lr", "value": "0.1"})
    status, body = await call(alice, "POST", base + "/runs/log-parameter", json={"run_id": run_id, "key": "lr", "value": "0.2"})
    assert status == 400 and body["error_code"] == "INVALID_PARAMETER_VALUE", body
    status, body = await call(alice, "POST", base + "/runs/log-metric", json={"run_id": run_id, "key": "m", "value": "abc",
                                                                             "timestamp": 1})
    assert status == 400 and body["error_code"] == "INVALID_PARAMETER_VALUE", body
    status, body = await call(alice, "POST", base + "/runs/search", json={"experiment_ids": [eid], "filter": "metrics.m >>> 1"})
    assert status == 400 and body["error_code"] == "INVALID_PARAMETER_VALUE", body
    resp = await alice.client.post(base + "/runs/search", data=b"{not json",
                                   headers={"Content-Type": "application/json", "Authorization": f"Bearer {alice.key}"})
    assert resp.status == 400 and (await resp.json())["error_code"] == "INVALID_PARAMETER_VALUE"
    status, body = await call(alice, "GET", base + "/no/such/endpoint")
    assert status == 404 and body["error_code"] == "ENDPOINT_NOT_FOUND", body

    # Another user's project, and a run of another project, do not exist for the caller.
    status, body = await call(bob, "GET", base + "/runs/get", params={"run_id": run_id})
    assert status == 404 and body["error_code"] == "RESOURCE_DOES_NOT_EXIST", body
    _, other = await alice.post("/api/v2/projects", json={"name": "other"})
    status, body = await call(alice, "GET", f"/mlflow/{other['id']}/api/2.0/mlflow/runs/get", params={"run_id": run_id})
    assert status == 404 and body["error_code"] == "RESOURCE_DOES_NOT_EXIST", body
    # bob cannot write into alice's experiments even knowing the ids.
    status, body = await call(bob, "POST", base + "/runs/log-metric", json={"run_id": run_id, "key": "x", "value": 1, "timestamp": 1})
    assert status == 404, body

    # Artifact paths stay inside a run's root.
    artifacts = f"/mlflow/{pid}/api/2.0/mlflow-artifacts/artifacts"
    for path in (f"{eid}/{run_id}/artifacts/../../../../etc/passwd", "../../secret", f"{eid}/%2e%2e/x",
                 f"{eid}/{run_id}/artifacts/a/../../../b", "/etc/passwd", f"{eid}/not-a-run/artifacts/x"):
        resp = await alice.client.put(f"{artifacts}/{path}", data=b"x", headers={"Authorization": f"Bearer {alice.key}"})
        assert resp.status in (400, 404), (path, resp.status, await resp.text())
        assert (await resp.json())["error_code"] in ("INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "ENDPOINT_NOT_FOUND")
    resp = await alice.client.put(f"{artifacts}/{eid}/{run_id}/artifacts/ok.txt", data=b"fine",
                                  headers={"Authorization": f"Bearer {alice.key}"})
    assert resp.status == 200, await resp.text()
    resp = await alice.client.get(f"{artifacts}/{eid}/{run_id}/artifacts/ok.txt", headers={"Authorization": f"Bearer {bob.key}"})
    assert resp.status == 404
    resp = await alice.client.get(f"{artifacts}/{eid}/{run_id}/artifacts/ok.txt", headers={"Authorization": f"Bearer {alice.key}"})
    assert resp.status == 200 and await resp.read() == b"fine"
    assert resp.headers["Content-Disposition"].startswith("attachment")
    # The UI's cookie is not a credential here: only API keys are.
    resp = await alice.client.get(base + "/experiments/search")
    assert resp.status == 401

    # A viewer reads the project's runs and artifacts but logs nothing.
    carol = await make_user("carol")
    await alice.put(f"/api/v2/projects/{pid}/collaborators/carol", json={"permission": "read"})
    status, body = await call(carol, "GET", base + "/runs/get", params={"run_id": run_id})
    assert status == 200 and body["run"]["info"]["run_id"] == run_id, body
    status, body = await call(carol, "POST", base + "/runs/log-metric", json={"run_id": run_id, "key": "x", "value": 1, "timestamp": 1})
    assert status in (403, 404) and body["error_code"] in ("PERMISSION_DENIED", "RESOURCE_DOES_NOT_EXIST"), body
    status, body = await call(carol, "POST", base + "/experiments/create", json={"name": "mine"})
    assert status in (403, 404), body
    resp = await alice.client.put(f"{artifacts}/{eid}/{run_id}/artifacts/carol.txt", data=b"x",
                                  headers={"Authorization": f"Bearer {carol.key}"})
    assert resp.status in (403, 404)


async def test_cml_api_v2_errors_keep_cmls_shape(alice: Api, bob: Api) -> None:
    _, project = await alice.post("/api/v2/projects", json={"name": "cml errors"})
    pid = project["id"]
    status, body = await alice.post(f"/api/v2/projects/{pid}/experiments", json={})
    assert_error(status, body, 400)
    status, experiment = await alice.post(f"/api/v2/projects/{pid}/experiments", json={"name": "e1"})
    assert status == 200, experiment
    status, body = await alice.get(f"/api/v2/projects/{pid}/experiments/{experiment['id']}/runs",
                                   params={"search_filter": "not json"})
    assert_error(status, body, 400)
    status, body = await alice.get(f"/api/v2/projects/{pid}/experiments/{experiment['id']}/runs", params={"sort": "colour"})
    assert_error(status, body, 400)
    status, body = await bob.get(f"/api/v2/projects/{pid}/experiments/{experiment['id']}")
    assert_error(status, body, 404)
    status, run = await alice.post(f"/api/v2/projects/{pid}/experiments/{experiment['id']}/runs",
                                   json={"project_id": pid, "experiment_id": experiment["id"], "run_name": "r"})
    assert status == 200, run
    status, body = await alice.post(f"/api/v2/projects/{pid}/experiments/{experiment['id']}/runs/{run['id']}:logbatch",
                                    json={"metrics": [{"key": "m", "value": i} for i in range(1001)]})
    assert_error(status, body, 400)


@pytest.fixture
def workload_python_on_path(workload_python: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The host runtime runs what PATH finds: the workloads' Python first (before the app starts,
    so that its sandbox binds that venv in)."""
    monkeypatch.setenv("PATH", f"{workload_python.parent}:{os.environ.get('PATH', '')}")
    return workload_python


@pytest.fixture
async def reachable(aiohttp_client: Any, settings: Any, workload_python_on_path: Path) -> Any:
    """An appliance whose public URL is the port it really listens on, so that what it gives its
    workloads (MLFLOW_TRACKING_URI) reaches it."""
    import dataclasses
    import socket

    from cml_appliance.app import create_app
    from tests.conftest import user_maker

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    client = await aiohttp_client(create_app(dataclasses.replace(settings, host="127.0.0.1", port=port), allow_local_git=True),
                                  server_kwargs={"port": port})
    return user_maker(client)


async def test_a_job_logs_with_the_variables_every_workload_gets(reachable: Any) -> None:
    """A job's own MLFLOW_TRACKING_URI and MLFLOW_TRACKING_TOKEN (its workload key) are enough."""
    alice = await reachable("alice")
    _, project = await alice.post("/api/v2/projects", json={"name": "job tracking"})
    pid = project["id"]
    script = ("import mlflow, os\n"
              "with mlflow.start_run(run_name='from-a-job'):\n"
              "    mlflow.log_metric('rows', 42)\n"
              "print('tracking at', os.environ['MLFLOW_TRACKING_URI'])\n")
    form = aiohttp.FormData()
    form.add_field("train.py", script.encode(), filename="train.py")
    status, body = await alice.post(f"/api/v2/projects/{pid}/files", data=form)
    assert status == 200, body
    status, job = await alice.post(f"/api/v2/projects/{pid}/jobs", json={
        "project_id": pid, "name": "train", "script": "train.py", "runtime_identifier": "host/python3"})
    assert status == 200, job
    _, run = await alice.post(f"/api/v2/projects/{pid}/jobs/{job['id']}/runs", json={"project_id": pid, "job_id": job["id"]})
    for _ in range(600):
        _, run = await alice.get(f"/api/v2/projects/{pid}/jobs/{job['id']}/runs/{run['id']}")
        if run["status"] not in ("ENGINE_SCHEDULING", "ENGINE_STARTING", "ENGINE_RUNNING"):
            break
        await asyncio.sleep(0.2)
    _, logs = await alice.get(f"/api/v2/projects/{pid}/jobs/{job['id']}/runs/{run['id']}/logs")
    assert run["status"] == "ENGINE_SUCCEEDED", (run, logs)
    _, listed = await alice.get(f"/api/v2/projects/{pid}/experiments")
    default = next(e for e in listed["experiments"] if e["name"] == "Default")
    _, runs = await alice.get(f"/api/v2/projects/{pid}/experiments/{default['id']}/runs")
    (only,) = runs["experiment_runs"]
    assert only["name"] == "from-a-job" and only["data"]["metrics"][0]["value"] == 42
    assert only["user"]["username"] == "alice"


REGISTER_SCRIPT = textwrap.dedent("""
    import json

    import mlflow
    import numpy as np
    from mlflow import MlflowClient
    from sklearn.linear_model import LogisticRegression

    X = np.array([[0.0, 1.0], [1.0, 0.0], [0.2, 0.9], [0.9, 0.1]])
    y = np.array([0, 1, 0, 1])
    mlflow.set_experiment("registry")
    with mlflow.start_run() as run:
        mlflow.log_metric("accuracy", 1.0)
        info = mlflow.sklearn.log_model(LogisticRegression().fit(X, y), name="model", input_example=X[:1])
    first = mlflow.register_model(f"runs:/{run.info.run_id}/model", "iris classifier")
    second = mlflow.register_model(info.model_uri, "iris classifier")
    client = MlflowClient()
    client.update_model_version("iris classifier", second.version, description="the same model, by its id")
    loaded = mlflow.pyfunc.load_model("models:/iris classifier/1")
    client.set_registered_model_alias("iris classifier", "champion", "1")
    champion = mlflow.pyfunc.load_model("models:/iris classifier@champion")
    by_alias = client.get_model_version_by_alias("iris classifier", "champion")
    out = {
        "run_id": run.info.run_id, "versions": [first.version, second.version], "status": first.status,
        "predicted": [int(v) for v in loaded.predict(X[:2])],
        "searched": sorted(v.version for v in client.search_model_versions("name = 'iris classifier'")),
        "latest": [v.version for v in client.get_registered_model("iris classifier").latest_versions],
        "described": client.get_model_version("iris classifier", "2").description,
        "models": [m.name for m in client.search_registered_models(filter_string="name LIKE 'iris%'")],
        "champion": [int(v) for v in champion.predict(X[:2])], "alias_version": by_alias.version,
        "aliases": client.get_registered_model("iris classifier").aliases,
    }
    print("RESULT " + json.dumps(out))
""")


async def test_register_build_and_deploy_a_logged_model(workload_python_on_path: Path, alice: Api, bob: Api) -> None:
    """mlflow.register_model registers what a run logged; a build of that version deploys it and
    it answers on /model in CML's shapes."""
    from tests.conftest import wait_build
    from tests.integration.test_models import call_until_served

    _, project = await alice.post("/api/v2/projects", json={"name": "registry"})
    pid = project["id"]
    out = await run_mlflow_client(workload_python_on_path, tracking_uri(alice, pid), alice.key, REGISTER_SCRIPT)
    assert out["versions"] == ["1", "2"] and out["status"] == "READY", out
    assert out["predicted"] == [0, 1] and out["searched"] == ["1", "2"] and out["latest"] == ["2"], out
    assert out["described"] == "the same model, by its id" and out["models"] == ["iris classifier"]
    assert out["champion"] == [0, 1] and out["alias_version"] == "1" and out["aliases"] == {"champion": "1"}, out

    status, listed = await alice.get("/api/v2/registry/models", params={"search_filter": json.dumps({"name": "iris"})})
    assert status == 200, listed
    (model,) = listed["models"]
    assert model["count"] == 2 and model["owner"]["username"] == "alice" and model["visibility"] == "PRIVATE"
    status, detail = await alice.get(f"/api/v2/registry/models/{model['model_id']}", params={"sort": "number"})
    assert [v["number"] for v in detail["model_versions"]] == [1, 2]
    version = detail["model_versions"][0]
    metadata = version["model_version_metadata"]
    assert metadata["project_id"] == pid and metadata["mlflow_metadata"]["run_id"] == out["run_id"]
    assert metadata["mlflow_metadata"]["metrics"][0]["key"] == "accuracy"

    # Private: bob sees nothing; public: bob reads it but cannot change or delete it.
    status, body = await bob.get(f"/api/v2/registry/models/{model['model_id']}")
    assert_error(status, body, 404)
    status, body = await alice.patch("/api/v2/registry/models", json={"model_id": model["model_id"], "visibility": "PUBLIC"})
    assert status == 200 and body["visibility"] == "PUBLIC", body
    status, body = await bob.get(f"/api/v2/registry/models/{model['model_id']}/versions/{version['model_version_id']}")
    assert status == 200 and body["number"] == 1, body
    status, body = await bob.delete(f"/api/v2/registry/models/{model['model_id']}")
    assert_error(status, body, 403)

    # A model built from version 1 serves it through /model.
    _, served = await alice.post(f"/api/v2/projects/{pid}/models", json={"name": "iris", "disable_authentication": True})
    status, build = await alice.post(f"/api/v2/projects/{pid}/models/{served['id']}/builds", json={
        "registered_model_version_id": version["model_version_id"], "runtime_identifier": "host/python3",
        "auto_deploy_model": True, "auto_deployment_config": {"cpu": 1, "memory": 2, "replicas": 1}})
    assert status == 200, build
    assert build["registered_model_version_id"] == version["model_version_id"]
    assert build["file_path"] == ".cml/registered-model/predict.py" and build["function_name"] == "predict"
    finished = await wait_build(alice, pid, served["id"], build["id"], deployed=True, timeout=180)
    assert finished["status"] == "built", finished
    answer = await call_until_served(alice, served["access_key"], {"inputs": [[0.0, 1.0], [1.0, 0.0]]}, timeout=120)
    assert answer["success"] is True and answer["response"] == [0, 1], answer
    answer = await call_until_served(alice, served["access_key"], {"columns": ["a", "b"], "data": [[0.9, 0.1]]})
    assert answer["response"] == [1], answer
    # The project's own files were not touched by the build.
    status, files_listed = await alice.get(f"/api/v2/projects/{pid}/files")
    assert ".cml" not in [f["path"] for f in files_listed.get("files", [])]

    # Bad input on both APIs.
    status, body = await alice.post(f"/api/v2/projects/{pid}/models/{served['id']}/builds", json={
        "registered_model_version_id": "nope", "runtime_identifier": "host/python3"})
    assert_error(status, body, 404)
    status, body = await alice.post("/api/v2/registry/models", json={
        "project_id": pid, "run_id": out["run_id"], "model_path": "no-such-model", "model_name": "broken"})
    assert_error(status, body, 400)
    resp = await alice.client.post(f"/mlflow/{pid}/api/2.0/mlflow/model-versions/create",
                                   json={"name": "iris classifier", "source": "mlflow-artifacts:/../../etc"},
                                   headers={"Authorization": f"Bearer {alice.key}"})
    assert resp.status in (400, 404) and (await resp.json())["error_code"] in ("INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST")
    registry = f"/mlflow/{pid}/api/2.0/mlflow/registered-models"
    auth = {"Authorization": f"Bearer {alice.key}"}
    resp = await alice.client.post(f"{registry}/alias", json={"name": "iris classifier", "alias": "latest", "version": "1"},
                                   headers=auth)
    assert resp.status == 400 and (await resp.json())["error_code"] == "INVALID_PARAMETER_VALUE"  # MLflow reserves it
    resp = await alice.client.delete(f"{registry}/alias", json={"name": "iris classifier", "alias": "champion"}, headers=auth)
    assert resp.status == 200
    resp = await alice.client.get(f"{registry}/alias", params={"name": "iris classifier", "alias": "champion"}, headers=auth)
    assert resp.status == 404 and (await resp.json())["error_code"] == "RESOURCE_DOES_NOT_EXIST"
    resp = await alice.client.get(f"/mlflow/{pid}/api/2.0/mlflow/registered-models/get", params={"name": "missing"},
                                  headers={"Authorization": f"Bearer {bob.key}"})
    assert resp.status == 404 and (await resp.json())["error_code"] == "RESOURCE_DOES_NOT_EXIST"

    # A version being deleted leaves the model; deleting the model removes its files.
    status, _ = await alice.delete(f"/api/v2/registry/models/{model['model_id']}/versions/{detail['model_versions'][1]['model_version_id']}")
    assert status == 200
    _, detail = await alice.get(f"/api/v2/registry/models/{model['model_id']}")
    assert [v["number"] for v in detail["model_versions"]] == [1]
    status, _ = await alice.delete(f"/api/v2/registry/models/{model['model_id']}")
    assert status == 200
    from cml_appliance.web.keys import MODEL_REGISTRY

    assert not (alice.client.app[MODEL_REGISTRY].storage / model["model_id"]).exists()
