#!/usr/bin/env python3
"""Benchmark: the MLflow client logging runs into the appliance's MLflow API, and into a real
`mlflow server` (from PyPI) on the same Postgres, in the same run.

The client is the unmodified mlflow package in the workloads' Python (.venv-workload, made by
scripts/test.sh): per round it creates an experiment, then `--runs` runs, each with `--points`
points of one metric sent with log_batch (1,000 per call, MLflow's limit), a final score and
set_terminated; then one search_runs over the experiment with a metric filter and a metric
order (`metrics.score > 0.5`, ordered by loss). The appliance (`serve`, uvloop, one process) is
reached at <url>/mlflow/<project id> with an API key; MLflow's server as `mlflow server` runs it
by default (its own workers), with its backend store in a database of its own on the same
Postgres server and its artifacts in a temporary folder. Rounds alternate (appliance, mlflow,
mlflow, appliance, ...) after a warm-up round each. The last line is `ratio: X`: the appliance's
points per second (logging and the search, end to end, as the client sees them) over MLflow's,
median of the rounds (target: 1.0 or more).

Usage: DATABASE_URL=... .venv/bin/python bench/tracking.py [--runs N] [--points P] [--rounds R]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from api_list import _with_database, create_database, drop_database, free_port
from common import REPO, Harness, install_signal_handlers, interleaved, median, run_async, run_main

TARGET = 1.0
WORKLOAD_PYTHON = REPO / ".venv-workload" / "bin" / "python"
CLIENT = r"""
import json, sys, time
from mlflow import MlflowClient
from mlflow.entities import Metric

name, runs, points = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
client = MlflowClient()
started = time.perf_counter()
experiment = client.create_experiment(name)
now = int(time.time() * 1000)
for r in range(runs):
    run = client.create_run(experiment, run_name=f"run-{r}")
    metrics = [Metric("loss", 1.0 / (i + 1) + r / 1e4, now + i, i) for i in range(points)]
    for first in range(0, points, 1000):
        client.log_batch(run.info.run_id, metrics=metrics[first:first + 1000])
    client.log_batch(run.info.run_id, metrics=[Metric("score", r / runs, now, 0)])
    client.set_terminated(run.info.run_id)
logged = time.perf_counter()
found = client.search_runs([experiment], filter_string="metrics.score > 0.5", order_by=["metrics.loss ASC"],
                           max_results=1000)
searched = time.perf_counter()
expected = sum(1 for r in range(runs) if r / runs > 0.5)
assert len(found) == expected, (len(found), expected)
assert [run.data.metrics["loss"] for run in found] == sorted(run.data.metrics["loss"] for run in found)
print("RESULT " + json.dumps({"log_s": logged - started, "search_s": searched - logged, "found": len(found)}))
"""


def run_client(tracking_uri: str, token: str, name: str, args: argparse.Namespace) -> dict[str, float]:
    env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/root"), "MLFLOW_TRACKING_URI": tracking_uri,
           "GIT_PYTHON_REFRESH": "quiet"}
    if token:
        env["MLFLOW_TRACKING_TOKEN"] = token
    proc = subprocess.run([str(WORKLOAD_PYTHON), "-c", CLIENT, name, str(args.runs), str(args.points)], env=env,
                          capture_output=True, text=True, timeout=1800)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"the mlflow client failed against {tracking_uri}:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return dict(json.loads(line.removeprefix("RESULT ")))


def start_mlflow_server(dsn: str, folder: Path, port: int) -> subprocess.Popen[bytes]:
    mlflow = WORKLOAD_PYTHON.parent / "mlflow"
    log = open(folder / "mlflow-server.log", "wb")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(
        [str(mlflow), "server", "--backend-store-uri", dsn.replace("postgresql://", "postgresql+psycopg2://", 1),
         "--artifacts-destination", str(folder / "mlflow-artifacts"), "--host", "127.0.0.1", "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=folder)


def wait_http(url: str, proc: subprocess.Popen[bytes] | None, log: Path | None, timeout: float = 180) -> None:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited {proc.returncode}:\n{log.read_text()[-4000:] if log else ''}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} not ready after {timeout:g} s:\n{log.read_text()[-4000:] if log else ''}")
        time.sleep(0.5)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=100, help="runs per round (100)")
    parser.add_argument("--points", type=int, default=1000, help="metric points per run (1000)")
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds per server, after a warm-up (3)")
    args = parser.parse_args()
    if not WORKLOAD_PYTHON.exists():
        raise SystemExit(f"{WORKLOAD_PYTHON} is missing: scripts/test.sh makes it (requirements-workload.txt)")
    install_signal_handlers()
    h = Harness("tracking")
    mlflow_proc = None
    mlflow_db = ""
    results: dict[str, list[dict[str, float]]] = {"appliance": [], "mlflow": []}
    try:
        h.database()
        h.appliance(None)
        run_async(_connect(h))
        assert h.server is not None
        base = f"http://127.0.0.1:{h.server.port}"
        project = run_async(_project(h))
        mlflow_db = f"{h.db_name}_mlflow"
        run_async(create_database(h.server_dsn, mlflow_db))
        port = free_port()
        mlflow_proc = start_mlflow_server(_with_database(h.server_dsn, mlflow_db), h.workdir, port)
        wait_http(f"http://127.0.0.1:{port}/health", mlflow_proc, h.workdir / "mlflow-server.log")
        targets = {"appliance": (f"{base}/mlflow/{project}", h.secret), "mlflow": (f"http://127.0.0.1:{port}", "")}
        print(f"database:  {h.where} (mlflow server: database {mlflow_db}); dropped at the end")
        print(f"client:    mlflow {_mlflow_version()} from {WORKLOAD_PYTHON}; {args.runs} runs x {args.points} points "
              f"(log_batch), then search_runs with a metric filter and order")
        order = ["appliance", "mlflow"]
        for i, name in interleaved(tuple(order), args.rounds):
            uri, token = targets[name]
            result = run_client(uri, token, f"bench-{name}-{i}", args)
            rate = args.runs * args.points / (result["log_s"] + result["search_s"])
            result["rate"] = rate
            if i:
                results[name].append(result)
            print(f"{i:>3}  {name:<9} log {result['log_s']:6.2f} s  search {result['search_s'] * 1000:7.1f} ms  "
                  f"{rate:9.0f} points/s{'' if i else '  (warm-up)'}", flush=True)
    finally:
        if mlflow_proc is not None:
            os.killpg(mlflow_proc.pid, 15)
            try:
                mlflow_proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(mlflow_proc.pid, 9)
        if mlflow_db:
            try:
                run_async(drop_database(h.server_dsn, mlflow_db))
            except Exception as exc:  # noqa: BLE001 - keep cleaning up
                print(f"warning: dropping {mlflow_db}: {exc}", file=sys.stderr)
        h.close()
    print()
    for name, values in results.items():
        print(f"{name:<9} median {median(v['rate'] for v in values):.0f} points/s, log {median(v['log_s'] for v in values):.2f} s, "
              f"search {median(v['search_s'] for v in values) * 1000:.1f} ms over {len(values)} rounds")
    ratio = median(v["rate"] for v in results["appliance"]) / median(v["rate"] for v in results["mlflow"])
    search_ratio = median(v["search_s"] for v in results["mlflow"]) / median(v["search_s"] for v in results["appliance"])
    print(f"search alone: the appliance is {search_ratio:.2f} x MLflow's speed")
    print(f"target: appliance/mlflow {TARGET:g} or more: {'met' if ratio >= TARGET else 'NOT met'}; total time {h.elapsed():.0f} s")
    print(f"ratio: {ratio:.2f}", flush=True)
    return 0


def _mlflow_version() -> str:
    out = subprocess.run([str(WORKLOAD_PYTHON), "-c", "import mlflow; print(mlflow.__version__)"], capture_output=True, text=True)
    return out.stdout.strip()


async def _connect(h: Harness) -> None:
    async with h.client() as http:
        await h.connect(http)


async def _project(h: Harness) -> str:
    async with h.client() as http:
        api = await h.connect(http)
        return await api.create_project("tracking bench")


if __name__ == "__main__":
    run_main(main)
