#!/usr/bin/env python3
"""Benchmark: calls to a deployed model through the appliance's POST /model, against calling its
replicas directly.

A project holds model.py with two functions; each is deployed as a model of its own with
--replicas replicas (default 1, CML's default deployment) on the local engine, through the API of the real
`python -m cml_appliance serve` (CML_LOG_LEVEL=WARNING), model authentication on (the default):

- score: a 100-tree random forest (depth 8, built from a fixed seed at import) scoring a batch of
  10 rows of 20 features in pure Python, about 0.4 ms of work: the size of a small scikit-learn
  model's predict, the kind of function CML models serve. The target is about this one.
- echo: returns its argument. The function costs nothing, so this shows the appliance's own
  ceiling: each call then costs the appliance more CPU (printed) than the replica.

Then, in interleaved rounds (appliance, direct, direct, appliance, ...) of --seconds each, per
function, --concurrency calls (default: two per replica) are kept in flight by one aiohttp client
with keep-alive. Each replica serves one call at a time: the others wait for it in the appliance
(appliance) or in the replica's own queue (direct), as many clients calling one model do:

- appliance: POST /model {"accessKey", "request"} with Authorization: Bearer <key>, as Cloudera's
  docs show it; the answer must be {"success": true, "response": <the function's answer>, "ReplicaID"}.
- direct:    POST http://127.0.0.1:<replica port>/ with the request, caller i to replica i mod N;
  the answer must be the function's answer itself (what the replica server sends).

Printed: calls/s, p50 and p99 per round and overall, and the latency the appliance adds at p50 and
p99. The last line is `ratio: X` = the appliance's calls/s over the direct calls/s for score
(target 0.7 or more).

Usage: DATABASE_URL=... .venv/bin/python bench/model_call.py [--rounds N] [--seconds S] [--replicas R]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import aiohttp
import asyncpg
from api_list import Round, cpu_seconds
from common import (
    BenchError,
    Harness,
    install_signal_handlers,
    median,
    run_async,
    run_main,
)

TARGET = 0.7
FUNCTIONS = ("score", "echo")
MODEL_FILE = b'''import random

_rng = random.Random(7)


def _tree(depth):
    if depth == 0:
        return _rng.random()
    return (_rng.randrange(20), _rng.random(), _tree(depth - 1), _tree(depth - 1))


FOREST = [_tree(8) for _ in range(100)]


def _leaf(node, row):
    while isinstance(node, tuple):
        feature, threshold, low, high = node
        node = low if row[feature] < threshold else high
    return node


def score(args):
    return {"scores": [round(sum(_leaf(tree, row) for tree in FOREST) / len(FOREST), 6) for row in args["rows"]]}


def echo(args):
    return args
'''
REQUEST = {"rows": [[round((7 * r + 13 * f) % 100 / 100, 2) for f in range(20)] for r in range(10)]}


async def load(http: aiohttp.ClientSession, name: str, calls: list[tuple[str, dict[str, str], Any]],
               check: Any, seconds: float) -> Round:
    """Keep len(calls) calls in flight for `seconds`; worker i always makes calls[i]."""
    latencies: list[float] = []
    clock = time.perf_counter
    completed = 0
    deadline = clock() + seconds

    async def worker(url: str, headers: dict[str, str], body: Any) -> None:
        nonlocal completed
        while clock() < deadline:
            sent = clock()
            async with http.post(url, json=body, headers=headers) as resp:
                answer = await resp.json(content_type=None)
                status = resp.status
            done = clock()
            if status != 200 or not check(answer):
                raise BenchError(f"{name}: HTTP {status}: {str(answer)[:500]}")
            latencies.append(done - sent)
            if done <= deadline:
                completed += 1

    tasks = [asyncio.ensure_future(worker(*call)) for call in calls]
    try:
        await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()
    return Round(name, completed, seconds, latencies)


async def deploy(h: Harness, api: Any, project: str, function: str, replicas: int) -> tuple[str, list[int]]:
    """Create, build and deploy one function; (its access key, its replicas' ports) once all answer."""
    model = await api.call("POST", f"/api/v2/projects/{project}/models", {
        "name": function, "auto_build_model": True,
        "auto_build_config": {"file_path": "model.py", "function_name": function},
        "auto_deploy_model": True, "auto_deployment_config": {"cpu": 1, "memory": 1, "replicas": replicas},
    })
    conn = await asyncpg.connect(h.dsn)
    try:
        t0 = time.perf_counter()
        while True:
            ports = [r["app_port"] for r in await conn.fetch(
                "SELECT w.app_port FROM workloads w JOIN model_deployments d ON d.id = w.deployment_id"
                " JOIN models m ON m.id = d.model_id WHERE m.public_id = $1 AND w.status = 'ENGINE_RUNNING'"
                " ORDER BY w.id", model["id"])]
            if len(ports) == replicas:
                break
            if time.perf_counter() - t0 > 60:
                raise BenchError(f"model {function}: {len(ports)} of {replicas} replicas running after 60 s")
            await asyncio.sleep(0.1)
    finally:
        await conn.close()
    return model["access_key"], ports


async def measure(h: Harness, args: argparse.Namespace) -> list[Round]:
    rounds: list[Round] = []
    async with h.client(limit=args.concurrency * 2) as http:
        api = await h.connect(http)
        project = await api.create_project("bench model calls")
        form = aiohttp.FormData()
        form.add_field("model.py", MODEL_FILE, filename="model.py", content_type="text/x-python")
        async with http.post(f"{api.base}/api/v2/projects/{project}/files", data=form, headers=api.headers) as resp:
            if resp.status != 200:
                raise BenchError(f"upload: HTTP {resp.status}: {(await resp.text())[:1000]}")
        server_pid = h.server.proc.pid  # type: ignore[union-attr]
        for function in FUNCTIONS:
            key, ports = await deploy(h, api, project, function, args.replicas)
            expected = None
            for port in ports:  # a replica listens a moment after it runs
                for _ in range(100):
                    try:
                        async with http.post(f"http://127.0.0.1:{port}/", json=REQUEST) as resp:
                            expected = await resp.json()
                        break
                    except aiohttp.ClientConnectorError:
                        await asyncio.sleep(0.1)
            targets = {
                "appliance": ([(f"{api.base}/model", api.headers, {"accessKey": key, "request": REQUEST})] * args.concurrency,
                              lambda a: a.get("success") is True and a.get("response") == expected and bool(a.get("ReplicaID"))),
                "direct": ([(f"http://127.0.0.1:{port}/", {}, REQUEST) for port in itertools.islice(itertools.cycle(ports), args.concurrency)],
                           lambda a: a == expected),
            }
            for name, (calls, check) in targets.items():  # warm-up, and a check that both answer
                await load(http, name, calls, check, 0.5)
            print(f"{function}: {args.replicas} replicas on ports {ports}, {args.concurrency} calls in flight, "
                  f"answer {str(expected)[:60]}")
            print(f"{'#':>3}  {'target':<16}  {'calls/s':>8}  {'p50 ms':>7}  {'p99 ms':>7}  {'appl. CPU ms/call':>17}")
            order = list(targets)
            for i in range(args.rounds):
                for name in order if i % 2 == 0 else order[::-1]:
                    cpu0 = cpu_seconds(server_pid)
                    r = await load(http, f"{name} {function}", *targets[name], args.seconds)
                    cpu1 = cpu_seconds(server_pid)
                    if cpu0 is not None and cpu1 is not None:
                        r.cpu_seconds = cpu1 - cpu0
                    rounds.append(r)
                    cpu = r.cpu_ms_per_request
                    print(f"{i + 1:>3}  {r.target:<16}  {r.rps:>8.0f}  {r.percentile(0.5):>7.2f}  {r.percentile(0.99):>7.2f}  "
                          f"{'-' if cpu is None else f'{cpu:.3f}':>17}", flush=True)
    return rounds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=4, help="rounds per target and function, interleaved (4)")
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds per round (3)")
    parser.add_argument("--replicas", type=int, default=1, help="replicas per model (1)")
    parser.add_argument("--concurrency", type=int, default=0, help="calls in flight (two per replica)")
    args = parser.parse_args()
    args.concurrency = args.concurrency or 2 * args.replicas
    install_signal_handlers()
    h = Harness("model-call")
    rounds: list[Round] = []
    try:
        h.database()
        h.appliance()
        print(f"database:  {h.where}; dropped at the end")
        print("appliance: python -m cml_appliance serve, CML_LOG_LEVEL=WARNING; POST /model with the access key and a Bearer key")
        print("direct:    POST http://127.0.0.1:<replica port>/ (the same replicas, no appliance)")
        rounds = run_async(measure(h, args))
    finally:
        h.close()
    print()
    print(f"{'target':<16}  {'median calls/s':>14}  {'p50 ms':>7}  {'p99 ms':>7}")
    rps: dict[str, float] = {}
    lat: dict[str, Round] = {}
    for function in FUNCTIONS:
        for name in ("appliance", "direct"):
            label = f"{name} {function}"
            rs = [r for r in rounds if r.target == label]
            lat[label] = Round(label, 0, 1, [x for r in rs for x in r.latencies])
            rps[label] = median([r.rps for r in rs])
            print(f"{label:<16}  {rps[label]:>14.0f}  {lat[label].percentile(0.5):>7.2f}  {lat[label].percentile(0.99):>7.2f}")
    for function in FUNCTIONS:
        a, d = lat[f"appliance {function}"], lat[f"direct {function}"]
        print(f"{function}: the appliance adds {a.percentile(0.5) - d.percentile(0.5):.2f} ms at p50 and "
              f"{a.percentile(0.99) - d.percentile(0.99):.2f} ms at p99; calls/s ratio "
              f"{rps[f'appliance {function}'] / rps[f'direct {function}']:.2f}")
    ratio = rps["appliance score"] / rps["direct score"]
    print(f"target: score appliance/direct calls/s {TARGET:g} or more: {'met' if ratio >= TARGET else 'NOT met'}; "
          f"total time {h.elapsed():.0f} s")
    print(f"ratio: {ratio:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    run_main(main)
