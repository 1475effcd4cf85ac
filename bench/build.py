#!/usr/bin/env python3
"""Benchmark: a model build with the appliance's layer-append builder, against `podman build` of
the equivalent Dockerfile, in the same run.

The project: --files files (1,000) of --kib KiB each (10: 10 MB in all), in nested folders, with
a predict.py. Both builds start from the same runtime image (the bench's busybox image) and
produce an image with the project at /home/cdsw:

- appliance: POST …/models/{id}/builds on the real `python -m cml_appliance serve` (container
  engine: a `podman system service` of our own; registry: the embedded docker-registry), timed
  from the POST to the build reading `built` (polled every 20 ms). The snapshot is taken from the
  files on disk, fetched from the git server, made into one layer and pushed.
- podman:    `podman build --pull=never` of `FROM <runtime>` + `COPY . /home/cdsw` in a copy of
  the project, timed by the CLI's wall clock.

Cold: the first build of the project (for the appliance, the base image is already in the
registry: the one-time export is measured separately and printed). Changed: after one file
changed, --rounds times, interleaved (appliance, podman, podman, appliance, …). Printed: every
time, the medians, and `ratio: X` = podman's median over the appliance's median after one file
changed (target: 20 or more, and the appliance under 1 s).

With --queue N (200) instead: N builds of a small project (predict.py and 20 files) are queued at
once on an appliance started with CML_BUILD_CONCURRENCY=--concurrency (4), and the queue's
throughput (builds a second) and the time each build took from its POST to `built` (p50, p99)
are printed; the last line is `ratio: X` = builds a second over --concurrency (what a build's
overhead leaves of the workers).

Usage: DATABASE_URL=... .venv/bin/python bench/build.py [--files N] [--kib K] [--rounds R]
       DATABASE_URL=... .venv/bin/python bench/build.py --queue 200 [--concurrency 4]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    BUSYBOX_IMAGE,
    Api,
    BenchError,
    Harness,
    Podman,
    install_signal_handlers,
    median,
    run_async,
    run_main,
)

TARGET_RATIO = 20.0
TARGET_SECONDS = 1.0
RUNTIME_ROW = {"image_identifier": BUSYBOX_IMAGE, "editor": "Workbench", "kernel": "Shell", "edition": "Busybox",
               "full_version": "1.0"}
PREDICT = b"def predict(args):\n    return args\n"
SHOW_LOG = False


def write_project(root: Path, files: int, kib: int) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "predict.py").write_bytes(PREDICT)
    for i in range(files):
        folder = root / f"pkg{i % 10}" / f"sub{i % 7}"
        folder.mkdir(parents=True, exist_ok=True)
        # Text-like content: compresses as source and data files do (not random bytes).
        line = f"row {i}, value {i * 37 % 1009}, label item-{i}\n".encode()
        (folder / f"file{i}.txt").write_bytes((line * (kib * 1024 // len(line) + 1))[: kib * 1024])


async def appliance_build(api: Api, pid: str, mid: str) -> float:
    started = time.perf_counter()
    build = await api.call("POST", f"/api/v2/projects/{pid}/models/{mid}/builds",
                           {"file_path": "predict.py", "function_name": "predict", "runtime_identifier": BUSYBOX_IMAGE})
    path = f"/api/v2/projects/{pid}/models/{mid}/builds/{build['id']}"
    while True:
        build = await api.call("GET", path)
        if build["status"] not in ("queued", "pending", "pushing"):
            break
        await asyncio.sleep(0.02)
    elapsed = time.perf_counter() - started
    if SHOW_LOG:
        print((await api.call("GET", path + "/logs"))["content"], flush=True)
    if build["status"] != "built":
        log = await api.call("GET", path + "/logs")
        raise BenchError(f"the build ended {build['status']}: {build.get('failure_reason')}\n{log['content'][-2000:]}")
    return elapsed


def podman_build(podman: Podman, context: Path, tag: str) -> float:
    started = time.perf_counter()
    podman.run("build", "--pull=never", "-q", "-t", tag, str(context), timeout=600)
    return time.perf_counter() - started


async def measure(h: Harness, podman: Podman, args: argparse.Namespace) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {"appliance cold": [], "podman cold": [], "appliance changed": [], "podman changed": [],
                                     "appliance base export": []}
    async with h.client() as http:
        api = await h.connect(http)
        pid = await api.create_project("bench build")
        project = h.data_dir() / "projects" / pid
        write_project(project, args.files, args.kib)
        context = Path(tempfile.mkdtemp(prefix="cml-bench-build-ctx-"))
        try:
            write_project(context / "project", args.files, args.kib)
            (context / "project" / "Dockerfile").write_text(f"FROM {BUSYBOX_IMAGE}\nCOPY . /home/cdsw\n")
            (context / "project" / ".dockerignore").write_text("Dockerfile\n.dockerignore\n")
            model = await api.call("POST", f"/api/v2/projects/{pid}/models", {"name": "bench"})
            # The base image goes into the registry once, with the first build of any model on it:
            # a model of its own pays for that, so that the project's cold build is like any other's.
            warm_pid = await api.create_project("bench base export")
            (h.data_dir() / "projects" / warm_pid / "predict.py").write_bytes(PREDICT)
            warm_model = await api.call("POST", f"/api/v2/projects/{warm_pid}/models", {"name": "warm"})
            times["appliance base export"].append(await appliance_build(api, warm_pid, warm_model["id"]))
            times["appliance cold"].append(await appliance_build(api, pid, model["id"]))
            times["podman cold"].append(podman_build(podman, context / "project", "localhost/cml-bench-build:cold"))
            print(f"cold: appliance {times['appliance cold'][0]:.3f} s (base export before it: "
                  f"{times['appliance base export'][0]:.2f} s), podman build {times['podman cold'][0]:.3f} s", flush=True)
            order = ["appliance", "podman"]
            for i in range(args.rounds):
                marker = f"# changed in round {i}\n".encode()
                for where in (project, context / "project"):
                    with open(where / "pkg3" / "sub3" / "file3.txt", "ab") as fh:
                        fh.write(marker)
                for name in order if i % 2 == 0 else order[::-1]:
                    if name == "appliance":
                        seconds = await appliance_build(api, pid, model["id"])
                    else:
                        seconds = podman_build(podman, context / "project", f"localhost/cml-bench-build:{i}")
                    times[f"{name} changed"].append(seconds)
                    print(f"{i + 1:>3}  {name:<10} one file changed: {seconds:.3f} s", flush=True)
        finally:
            shutil.rmtree(context, ignore_errors=True)
            for tag in ["cold", *map(str, range(args.rounds))]:
                podman.run("rmi", "-f", f"localhost/cml-bench-build:{tag}", check=False)
    return times


async def queue_throughput(h: Harness, builds: int) -> tuple[float, list[float]]:
    async with h.client(limit=50) as http:
        api = await h.connect(http)
        pid = await api.create_project("bench queue")
        write_project(h.data_dir() / "projects" / pid, 20, 4)
        model = await api.call("POST", f"/api/v2/projects/{pid}/models", {"name": "queued"})
        base = f"/api/v2/projects/{pid}/models/{model['id']}/builds"
        started = time.perf_counter()
        posted: dict[str, float] = {}
        for _ in range(builds):
            made = await api.call("POST", base, {"file_path": "predict.py", "function_name": "predict",
                                                 "runtime_identifier": BUSYBOX_IMAGE})
            posted[made["id"]] = time.perf_counter()
        done: dict[str, float] = {}
        while len(done) < builds:
            page = await api.call("GET", f"{base}?page_size=1000")
            for build in page["model_builds"]:
                if build["id"] in posted and build["id"] not in done and build["status"] not in ("queued", "pending", "pushing"):
                    if build["status"] != "built":
                        raise BenchError(f"build {build['id']} ended {build['status']}: {build.get('failure_reason')}")
                    done[build["id"]] = time.perf_counter()
            await asyncio.sleep(0.05)
        total = time.perf_counter() - started
        return builds / total, [done[b] - posted[b] for b in posted]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=1000, help="files in the project (1000)")
    parser.add_argument("--kib", type=int, default=10, help="KiB per file (10)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds after one file changed (5)")
    parser.add_argument("--show-log", action="store_true", help="print each appliance build's log (its steps, timed)")
    parser.add_argument("--queue", type=int, default=0, help="measure the queue's throughput with this many builds")
    parser.add_argument("--concurrency", type=int, default=4, help="CML_BUILD_CONCURRENCY for --queue (4)")
    args = parser.parse_args()
    global SHOW_LOG
    SHOW_LOG = args.show_log
    install_signal_handlers()
    if args.queue:
        return queue_main(args)
    h = Harness("build")
    times: dict[str, list[float]] = {}
    try:
        podman = h.podman = Podman(h.workdir)
        podman.start()
        made = podman.ensure_image()
        h.database(runtimes=[RUNTIME_ROW])
        h.appliance(None, CML_CONTAINER_ENGINE_URL=podman.url)
        print(f"project: {args.files} files of {args.kib} KiB ({args.files * args.kib / 1024:.1f} MiB) in nested folders; "
              f"runtime {BUSYBOX_IMAGE} ({made})")
        print(f"database:  {h.where}; dropped at the end")
        print("appliance: python -m cml_appliance serve, container engine = podman system service, embedded docker-registry; "
              "time = POST …/builds -> GET reads built (polled every 20 ms)")
        print("podman:    podman build --pull=never of FROM <runtime> + COPY . /home/cdsw; time = the CLI's wall clock")
        times = run_async(measure(h, podman, args))
    finally:
        h.close()
    print()
    for name, values in times.items():
        print(f"{name:<24} median {median(values):.3f} s over {len(values)}")
    cold = median(times["podman cold"]) / median(times["appliance cold"])
    ratio = median(times["podman changed"]) / median(times["appliance changed"])
    appliance = median(times["appliance changed"])
    print(f"cold: podman/appliance {cold:.1f}")
    met = ratio >= TARGET_RATIO and appliance < TARGET_SECONDS
    print(f"target: {TARGET_RATIO:g}x faster than podman build and under {TARGET_SECONDS:g} s after one file changed: "
          f"{'met' if met else 'NOT met'} ({appliance:.3f} s); total time {h.elapsed():.0f} s")
    print(f"ratio: {ratio:.1f}", flush=True)
    return 0


def queue_main(args: argparse.Namespace) -> int:
    h = Harness("build-queue")
    try:
        podman = h.podman = Podman(h.workdir)
        podman.start()
        podman.ensure_image()
        h.database(runtimes=[RUNTIME_ROW])
        h.appliance(None, CML_CONTAINER_ENGINE_URL=podman.url, CML_BUILD_CONCURRENCY=str(args.concurrency))
        print(f"queue: {args.queue} builds of a 20-file project queued at once, CML_BUILD_CONCURRENCY={args.concurrency}")
        print(f"database:  {h.where}; dropped at the end")
        rate, latencies = run_async(queue_throughput(h, args.queue))
    finally:
        h.close()
    from common import percentile

    print(f"throughput: {rate:.2f} builds/s; POST -> built: p50 {percentile(latencies, 0.5):.2f} s, "
          f"p99 {percentile(latencies, 0.99):.2f} s; total time {h.elapsed():.0f} s")
    print(f"ratio: {rate / args.concurrency:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    run_main(main)
