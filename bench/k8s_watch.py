#!/usr/bin/env python3
"""Benchmark: the pod watcher against the real apiserver of the test cluster
(scripts/test-cluster.sh up): a relist of 10,000 pods, and a burst of status events applied to
Postgres.

--pods pods (10,000) are created in a namespace of the run's own, labelled as workloads of a site
of the run's own and bound to a node with no kubelet (a Node object the bench makes, so that the
controller-manager's pod garbage collector does not take them for orphans; nothing runs them;
the apiserver and etcd hold them like any others), each with a workload row in Postgres.

1. Relist: the appliance's PodWatcher lists them (raw JSON, pages of 2,000) and applies what it
   sees to Postgres. Baseline, in the same run: a bare kubernetes-asyncio
   list_pod_for_all_namespaces of the same pods (client models, one request), nothing applied.
   Interleaved rounds; `ratio: X` = the bare list's median time over the watcher's relist's
   (target: the relist under 2 s).
2. Burst: with the watch stopped, every pod's status is patched to Running (the kubelet's part,
   done by the bench: there is no such node); then the watcher watches from the resourceVersion
   it had, so the apiserver replays the 10,000 MODIFIED events as fast as it can send them, and
   the time until all 10,000 rows read ENGINE_RUNNING in Postgres gives the events applied per
   second (target: at least 5,000).

Usage: DATABASE_URL=... KUBECONFIG=<admin kubeconfig> .venv/bin/python bench/k8s_watch.py [--pods N]
(without KUBECONFIG, scripts/test-cluster.sh up is run and its kubeconfig used)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import asyncpg
from common import REPO, Harness, install_signal_handlers, interleaved, median, run_async, run_main
from kubernetes_asyncio import client
from kubernetes_asyncio.client.rest import ApiException

from cml_appliance.core.tasks import Supervisor
from cml_appliance.db.pool import create_pool
from cml_appliance.engines.kubernetes import objects
from cml_appliance.engines.kubernetes.engine import KubernetesEngine, KubernetesSettings, load_configuration
from cml_appliance.engines.kubernetes.watcher import PodWatcher
from cml_appliance.workloads.logs import LogStore
from cml_appliance.workloads.service import WorkloadService

RELIST_TARGET_SECONDS = 2.0
EVENTS_TARGET = 5000
NOWHERE = "bench-no-such-node"


def kubeconfig() -> str:
    if os.environ.get("KUBECONFIG"):
        return os.environ["KUBECONFIG"]
    proc = subprocess.run([str(REPO / "scripts" / "test-cluster.sh"), "up"], capture_output=True, text=True, check=True)
    return proc.stdout.strip().splitlines()[-1]


def pod(site: str, workload_id: str) -> dict:
    return {"metadata": {"name": objects.pod_name(workload_id),
                         "labels": {objects.SITE_LABEL: site, objects.WORKLOAD_LABEL: workload_id}},
            "spec": {"nodeName": NOWHERE, "automountServiceAccountToken": False,
                     "containers": [{"name": objects.MAIN_CONTAINER, "image": "localhost/none:1"}]}}


async def in_parallel(calls, width: int = 32) -> None:
    queue = list(calls)
    queue.reverse()

    async def worker() -> None:
        while queue:
            await queue.pop()()

    await asyncio.gather(*(worker() for _ in range(width)))


async def seed_rows(pool: asyncpg.Pool, ids: list[str]) -> None:
    async with pool.acquire() as conn:
        user_id = await conn.fetchval("SELECT id FROM users WHERE username = 'bench'")
        project_id = await conn.fetchval(
            "INSERT INTO projects (public_id, name, slug, owner_id, creator_id) VALUES ($1, 'bench', 'bench', $2, $2) RETURNING id",
            secrets.token_hex(8), user_id)
        await conn.execute(
            "INSERT INTO workloads (public_id, kind, project_id, creator_id, engine, runtime_identifier, cpu, memory, handle)"
            " SELECT w, 'job_run', $2, $3, 'kubernetes', 'localhost/none:1', 1, 1, 'bench/' || w FROM unnest($1::text[]) AS w",
            ids, project_id, user_id)


async def running_rows(pool: asyncpg.Pool) -> int:
    return int(await pool.fetchval("SELECT count(*) FROM workloads WHERE status = 'ENGINE_RUNNING'"))


async def run(h: Harness, args: argparse.Namespace) -> dict[str, object]:
    site = f"bench{secrets.token_hex(4)}"
    namespace = f"cml-bench-{secrets.token_hex(3)}"
    settings = KubernetesSettings(kubeconfig=kubeconfig())
    configuration = await load_configuration(settings)
    engine = KubernetesEngine(site, settings, configuration, projects_dir=h.workdir, stop_grace=1)
    pool = await create_pool(h.dsn, 1, 4)
    results: dict[str, object] = {}
    core = engine.core
    try:
        ids = [f"b{i:06d}{secrets.token_hex(2)}" for i in range(args.pods)]
        await core.create_namespace({"metadata": {"name": namespace}})
        try:
            await core.create_node({"metadata": {"name": NOWHERE, "labels": {"cml.bench": "k8s-watch"}}})
        except ApiException as exc:
            if exc.status != 409:
                raise
        started = time.perf_counter()
        await in_parallel(lambda w=w: core.create_namespaced_pod(namespace, pod(site, w)) for w in ids)
        print(f"created {len(ids)} pods in {time.perf_counter() - started:.1f} s (namespace {namespace})", flush=True)
        await seed_rows(pool, ids)
        service = WorkloadService(pool, {"kubernetes": engine}, LogStore(h.workdir / "logs", 1 << 20), Supervisor(),
                                  projects_dir=h.workdir, base_url="http://127.0.0.1", stop_grace=1,
                                  runtime_engine="kubernetes")

        async def apply(observed):
            await service.apply_observed("kubernetes", observed)

        relists, bare = [], []
        selector = f"{objects.SITE_LABEL}={site}"
        async with client.ApiClient(configuration) as api:
            plain = client.CoreV1Api(api)
            for i, name in interleaved(("watcher", "bare"), args.rounds):
                started = time.perf_counter()
                if name == "watcher":
                    watcher = PodWatcher(engine, pool, apply)
                    await watcher._list()
                    count = len(watcher.pods)
                else:
                    count = len((await plain.list_pod_for_all_namespaces(label_selector=selector)).items)
                seconds = time.perf_counter() - started
                if count != len(ids):
                    raise RuntimeError(f"{name} listed {count} pods of {len(ids)}")
                if i:
                    (relists if name == "watcher" else bare).append(seconds)
                print(f"{i:>3}  {name:<8} {seconds:.3f} s{'' if i else '  (warm-up)'}", flush=True)
        results["relist"], results["bare"] = median(relists), median(bare)

        # The burst: statuses change while nobody watches; the watch then replays them all.
        watcher = PodWatcher(engine, pool, apply, timeout_seconds=120)
        await watcher._list()
        status = {"status": {"phase": "Running", "containerStatuses": [{
            "name": objects.MAIN_CONTAINER, "image": "localhost/none:1", "imageID": "", "ready": True,
            "restartCount": 0, "state": {"running": {"startedAt": "2026-01-01T00:00:00Z"}}}]}}
        started = time.perf_counter()
        await in_parallel(lambda w=w: core.patch_namespaced_pod_status(objects.pod_name(w), namespace, status) for w in ids)
        print(f"patched {len(ids)} pod statuses in {time.perf_counter() - started:.1f} s (not watched)", flush=True)
        started = time.perf_counter()
        watching = asyncio.create_task(watcher._watch_once())
        while await running_rows(pool) < len(ids):
            if watching.done():
                watching.result()  # raises what stopped it (410: the history was too short)
                raise RuntimeError("the watch ended before every event was applied")
            await asyncio.sleep(0.02)
        seconds = time.perf_counter() - started
        watching.cancel()
        results["burst_seconds"] = seconds
        results["events_per_second"] = len(ids) / seconds
        print(f"burst: {len(ids)} events applied to Postgres in {seconds:.2f} s = {len(ids) / seconds:.0f} events/s", flush=True)
    finally:
        try:
            await core.delete_collection_namespaced_pod(namespace, grace_period_seconds=0)
            await core.delete_namespace(namespace)
            await core.delete_node(NOWHERE)
        except ApiException as exc:
            print(f"clean-up: {exc.status} {exc.reason}")
        await engine.close()
        await pool.close()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pods", type=int, default=10_000, help="pods to list and watch (10000)")
    parser.add_argument("--rounds", type=int, default=5, help="relist rounds per side, after one warm-up (5)")
    args = parser.parse_args()
    install_signal_handlers()
    h = Harness("k8s-watch")
    try:
        h.database()
        print(f"database: {h.where}; dropped at the end")
        results = run_async(run(h, args))
    finally:
        h.close()
    print()
    relist, bare = results["relist"], results["bare"]
    events = results["events_per_second"]
    print(f"relist of {args.pods} pods, applied to Postgres: median {relist:.3f} s; bare kubernetes-asyncio list: {bare:.3f} s")
    print(f"target: relist under {RELIST_TARGET_SECONDS:g} s: {'met' if relist < RELIST_TARGET_SECONDS else 'NOT met'}; "
          f"events applied {events:.0f}/s, target {EVENTS_TARGET}: {'met' if events >= EVENTS_TARGET else 'NOT met'}; "
          f"total time {h.elapsed():.0f} s")
    print(f"ratio: {bare / relist:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    run_main(main)
