#!/usr/bin/env python3
"""Benchmark: starting a session on the container engine (Podman), against a bare `podman run`.

N times each (default 8), in interleaved order (appliance, bare, bare, appliance, ...), after
one unmeasured warm-up of each:

- Appliance: POST /api/v2/projects/{p}/sessions {"runtime_identifier": "localhost/cml-test-busybox:1"}
  on the real `python -m cml_appliance serve` (CML_LOG_LEVEL=WARNING) with
  CML_CONTAINER_ENGINE_URL on a `podman system service` of our own, then GET .../sessions/{id}
  every --poll seconds (default 0.02) until "status" is ENGINE_RUNNING (the appliance sets it
  once the Docker API's container start has returned). Time: POST sent -> that GET received.
  Also shown: the POST's round trip, the Postgres NOTIFY of ENGINE_RUNNING as received here
  (LISTEN cml_workloads, no polling delay), and the server's stamps (created_at -> starting_at
  -> running_at). Each session is stopped and its container gone before the next sample.
- Bare: `podman run -d --rm --init` (the CLI, a fresh process each time) of the same image and
  command (/bin/sh -c SESSION_MAIN, imported from cml_appliance/sessions/service.py) with what
  cml_appliance/engines/container.py asks for: user 8536:8536 (the appliance runs as root here),
  a project directory bind-mounted on /home/cdsw as the working directory, memory = memory-swap
  = 2 GiB, 1 CPU, pids limit 1024, no-new-privileges, all capabilities dropped, the bridge
  network, as many labels (cml.bench.site instead of cml.site, which the appliance's
  reconciliation would take for an orphan of its own) and as many environment variables. Time: until `podman run -d`
  has exited (it returns once the container is started), then it is stopped (--rm removes it).

- Informational, not in the ratio: "engine", the appliance's own ContainerEngine.start() called
  in this process (the same container config through the same Docker API, without the HTTP API,
  Postgres or the engine ping). At the end, the time of the Docker API calls GET /version and
  GET /_ping is printed (ContainerEngine.ping() uses /_ping since this benchmark showed that
  Podman 4.3 takes ~0.5 s to answer /version).

Before the samples, one container of each is inspected and their HostConfig limits compared.
The last line is `ratio: X` = the appliance's median over the bare median; the target is 1.5
or less.

- Podman: `podman system service --time=0` on a socket in a temporary directory, with
  CONTAINERS_CONF=config/podman/containers.conf (for the CLI too), stopped at the end; the image
  is made with `podman import` from /bin/busybox when missing (as tests/conftest.py does).
- Clean-up: sessions stopped, the appliance's process group killed, every container labelled
  with this run's cml.site removed, the database dropped, the Podman service stopped.

Usage: /tmp/venv/bin/python bench/session_start_container.py [--samples N] [--warmup N] [--poll S]
       [--no-engine]          (defaults: 8, 1, 0.02: about 25 s)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import aiodocker
from common import (
    BUSYBOX_IMAGE,
    BenchError,
    Harness,
    Podman,
    StatusListener,
    install_signal_handlers,
    median,
    parse_time,
    percentile,
    run_async,
    run_main,
)

from cml_appliance.engines.base import LaunchSpec
from cml_appliance.engines.container import (
    CDSW_UID,
    CONTAINER_HOME,
    PIDS_LIMIT,
    ContainerEngine,
)
from cml_appliance.sessions.service import SESSION_MAIN

RUNNING = "ENGINE_RUNNING"
# Not cml.site: the appliance's reconciliation would stop containers with its site label that no
# row owns. The clean-up removes both labels.
BARE_LABEL = "cml.bench.site"
TARGET_RATIO = 1.5
CPU, MEMORY_GB = 1.0, 2.0  # the smallest default resource profile, which a session gets by default
RUNTIME_ROW = {
    "image_identifier": BUSYBOX_IMAGE, "editor": "Workbench", "kernel": "Shell", "edition": "Busybox",
    "full_version": "1.0",
}


@dataclass
class Sample:
    target: str
    ms: float
    post_ms: float | None = None
    notify_ms: float | None = None
    to_starting_ms: float | None = None
    to_running_ms: float | None = None


def bare_command(site_id: str, project_dir: Path, name: str) -> list[str]:
    memory = int(MEMORY_GB * 1024 * 1024 * 1024)
    env = {
        "CDSW_PROJECT": "bench", "CDSW_PROJECT_ID": "bench", "CDSW_ENGINE_ID": name, "CDSW_API_URL": "http://127.0.0.1:1/api/v1",
        "CDSW_APIV2_KEY": "x" * 43, "CDSW_DOMAIN": "127.0.0.1:1", "CDSW_APP_PORT": "8100", "CDSW_READONLY_PORT": "8101",
        "CDSW_CPU_MILLICORES": "1000", "CDSW_MEMORY_MB": "2048", "HADOOP_USER_NAME": "bench", "HOME": CONTAINER_HOME,
        "BENCH_SITE_ID": site_id, "CML_WORKLOAD_ID": name,
    }
    cmd = [
        "podman", "run", "-d", "--rm", "--init", "--name", name,
        "--user", f"{CDSW_UID}:{CDSW_UID}", "-v", f"{project_dir}:{CONTAINER_HOME}", "-w", CONTAINER_HOME,
        "--memory", str(memory), "--memory-swap", str(memory), "--cpus", f"{CPU:g}", "--pids-limit", str(PIDS_LIMIT),
        "--security-opt", "no-new-privileges", "--cap-drop", "ALL", "--network", "bridge",
        "--label", f"{BARE_LABEL}={site_id}", "--label", f"cml.workload={name}", "--label", "cml.kind=session",
    ]
    for k, v in env.items():
        cmd += ["-e", f"{k}={v}"]
    return cmd + [BUSYBOX_IMAGE, "/bin/sh", "-c", SESSION_MAIN]


async def run_cli(cmd: list[str], env: dict[str, str], scratch: Path, timeout: float = 60) -> tuple[int, str, str]:
    """Run a podman command; its exit is what is awaited. Output goes to files, not pipes: the
    conmon that `podman run -d` leaves behind inherits them and would hold a pipe open for good."""
    out_path, err_path = scratch / "cli.out", scratch / "cli.err"
    with open(out_path, "wb") as out, open(err_path, "wb") as err:  # noqa: ASYNC230 - two empty files
        proc = await asyncio.create_subprocess_exec(*cmd, env=env, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=err)
    try:
        code = await asyncio.wait_for(proc.wait(), timeout)
    except TimeoutError:
        try:
            proc.kill()
        except ProcessLookupError:
            pass
        await proc.wait()
        raise BenchError(f"{' '.join(cmd[:2])}... did not finish in {timeout:g} s") from None
    return code, out_path.read_text(errors="replace"), err_path.read_text(errors="replace")


class Bench:
    def __init__(self, h: Harness, podman: Podman, docker: aiodocker.Docker, api: Any, listener: StatusListener,
                 project: str, args: argparse.Namespace):
        self.h, self.podman, self.docker, self.api, self.listener = h, podman, docker, api, listener
        self.project, self.args = project, args
        self.bare_dir = h.workdir / "bare-project"
        self.bare_dir.mkdir()
        os.chown(self.bare_dir, CDSW_UID, CDSW_UID)

    async def labelled(self, label: str) -> list[dict[str, Any]]:
        containers = await self.docker.containers.list(all=True, filters={"label": [label]})
        return [c._container for c in containers]

    async def wait_gone(self, label: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while await self.labelled(label):
            if time.monotonic() > deadline:
                raise BenchError(f"containers labelled {label} still there {timeout:g} s after the stop")
            await asyncio.sleep(0.05)

    async def appliance(self, inspect: bool = False) -> tuple[Sample, dict[str, Any] | None]:
        api, project = self.api, self.project
        started = time.perf_counter()
        body = await api.start_session(project, runtime_identifier=BUSYBOX_IMAGE)
        posted = time.perf_counter()
        sid = body["id"]
        if body.get("engine") != "container":
            raise BenchError(f"the session went to the {body.get('engine')!r} engine, not container: {body}")
        final, seen = await api.wait_status(project, sid, RUNNING, interval=self.args.poll, timeout=60)
        notified = await self.listener.wait_for(sid, RUNNING)
        info = await self.docker.containers.container(f"cml-{sid}").show() if inspect else None
        status = await api.stop_and_wait(project, sid)
        if status != "ENGINE_STOPPED":
            raise BenchError(f"session {sid} ended {status} after a stop, not ENGINE_STOPPED")
        await self.wait_gone(f"cml.workload={sid}")
        created, starting, running = (parse_time(final[k]) for k in ("created_at", "starting_at", "running_at"))
        return Sample(
            "appliance", (seen - started) * 1000, post_ms=(posted - started) * 1000,
            notify_ms=None if notified is None else (notified - started) * 1000,
            to_starting_ms=None if None in (created, starting) else (starting - created) * 1000,  # type: ignore[operator]
            to_running_ms=None if None in (starting, running) else (running - starting) * 1000,  # type: ignore[operator]
        ), info

    async def bare(self, inspect: bool = False) -> tuple[Sample, dict[str, Any] | None]:
        name = "cml-bare-" + secrets.token_hex(6)
        cmd = bare_command(self.h.site_id, self.bare_dir, name)
        started = time.perf_counter()
        code, _, err = await run_cli(cmd, self.podman.env, self.h.workdir)
        done = time.perf_counter()
        if code != 0:
            raise BenchError(f"podman run failed ({code}): {err.strip()[-1500:]}")
        info = None
        try:
            info = await self.docker.containers.container(name).show()
            state = info.get("State", {})
            if not state.get("Running"):
                raise BenchError(f"the bare container is not running after podman run -d: {state}")
        finally:
            code, _, err = await run_cli(["podman", "stop", "-t", "2", name], self.podman.env, self.h.workdir)
            if code != 0 and "no such container" not in err.lower():
                raise BenchError(f"podman stop {name} failed ({code}): {err.strip()[-500:]}")
            await self.wait_gone(f"cml.workload={name}")
        return Sample("bare", (done - started) * 1000), (info if inspect else None)


async def engine_sample(bench: Bench, engine: ContainerEngine) -> Sample:
    """The appliance's own ContainerEngine.start() called in this process: create + start through the
    Docker API with the appliance's exact container config, without its HTTP API, Postgres or ping."""
    workload_id = "eng" + secrets.token_hex(6)
    spec = LaunchSpec(
        workload_id=workload_id, kind="session", command=["/bin/sh", "-c", SESSION_MAIN],
        env={f"CDSW_VAR_{i}": "x" for i in range(12)}, project_dir=bench.bare_dir, image=BUSYBOX_IMAGE,
        cpu=CPU, memory_mb=int(MEMORY_GB * 1024),
    )
    started = time.perf_counter()
    handle = await engine.start(spec)
    done = time.perf_counter()
    await engine.stop(handle, 2)
    await engine.cleanup(handle)
    await bench.wait_gone(f"cml.workload={workload_id}")
    return Sample("engine", (done - started) * 1000)


async def engine_calls(docker: aiodocker.Docker, times: int = 3) -> dict[str, float]:
    """Median ms of the Docker API calls around a start: GET /version (the appliance's ping) and
    GET /_ping (the API's own health check)."""
    out: dict[str, float] = {}
    for name in ("version", "_ping"):
        ms = []
        for _ in range(times):
            started = time.perf_counter()
            async with docker._query(name, versioned_api=name != "_ping") as resp:
                await resp.read()
            ms.append((time.perf_counter() - started) * 1000)
        out[name] = median(ms)
    return out


def compare(app: dict[str, Any], bare: dict[str, Any]) -> list[str]:
    """The limits the two containers run with; differences are a broken comparison."""
    keys = ("Memory", "MemorySwap", "NanoCpus", "PidsLimit", "Init", "NetworkMode", "CapDrop", "SecurityOpt")
    lines, differ = [], []
    for key in keys:
        a, b = app["HostConfig"].get(key), bare["HostConfig"].get(key)
        if key == "CapDrop":
            a, b = (sorted(x or []) if x else x for x in (a, b))
            a, b = len(a or []), len(b or [])  # podman expands ALL into the list
        if key == "SecurityOpt":
            a, b = ("no-new-privileges" in " ".join(x or []) for x in (a, b))
        lines.append(f"{key}={a!r}" + ("" if a == b else f" (bare: {b!r})"))
        if a != b:
            differ.append(key)
    for key in ("User", "WorkingDir"):
        a, b = app["Config"].get(key), bare["Config"].get(key)
        lines.append(f"{key}={a!r}" + ("" if a == b else f" (bare: {b!r})"))
        if a != b:
            differ.append(key)
    mounts = [(m.get("Destination"), m.get("Type")) for m in app.get("Mounts", [])]
    bare_mounts = [(m.get("Destination"), m.get("Type")) for m in bare.get("Mounts", [])]
    lines.append(f"mounts={mounts}" + ("" if mounts == bare_mounts else f" (bare: {bare_mounts})"))
    if mounts != bare_mounts:
        differ.append("Mounts")
    if differ:
        raise BenchError("the bare container is not set up like the appliance's: " + "; ".join(lines))
    return lines


def _f(value: float | None, width: int = 7) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}.1f}"


async def measure(h: Harness, podman: Podman, args: argparse.Namespace) -> list[Sample]:
    samples: list[Sample] = []
    docker = aiodocker.Docker(url=podman.url)
    try:
        async with h.client() as http, StatusListener(h.dsn) as listener:
            api = await h.connect(http)
            try:
                project = await api.create_project("bench container sessions")
                bench = Bench(h, podman, docker, api, listener, project, args)
                engine_site = f"engine-{h.site_id}"  # not the appliance's site: its reconciliation leaves these alone
                h.container_labels.append(f"cml.site={engine_site}")
                engine = ContainerEngine(engine_site, podman.url, network="bridge")
                targets = ("appliance", "bare") + (("engine",) if args.engine else ())

                async def one(target: str) -> Sample:
                    if target == "appliance":
                        return (await bench.appliance())[0]
                    if target == "bare":
                        return (await bench.bare())[0]
                    return await engine_sample(bench, engine)

                # Warm-up, and one container of each inspected: same limits, user, mount.
                a, app_info = await bench.appliance(inspect=True)
                b, bare_info = await bench.bare(inspect=True)
                assert app_info is not None and bare_info is not None
                print("same set-up: " + ", ".join(compare(app_info, bare_info)))
                print(f"warm-up: appliance {a.ms:.0f} ms, bare {b.ms:.0f} ms")
                for _ in range(args.warmup - 1):
                    await bench.appliance()
                    await bench.bare()
                if args.engine:
                    for _ in range(args.warmup):
                        await engine_sample(bench, engine)
                print()
                print(f"{'#':>3}  {'target':<9}  {'total ms':>8}  {'POST ms':>7}  {'NOTIFY':>7}  {'->STARTING':>9}  "
                      f"{'->RUNNING':>9}")
                for i in range(args.samples):
                    order = targets if i % 2 == 0 else targets[::-1]  # A B, B A, A B...
                    for target in order:
                        s = await one(target)
                        samples.append(s)
                        print(f"{i + 1:>3}  {s.target:<9}  {s.ms:>8.1f}  {_f(s.post_ms)}  {_f(s.notify_ms)}  "
                              f"{_f(s.to_starting_ms, 9)}  {_f(s.to_running_ms, 9)}", flush=True)
                calls = await engine_calls(docker)
                print(f"\nDocker API calls on this Podman (median of 3): GET /version {calls['version']:.1f} ms "
                      f"(what ContainerEngine.ping() used to call), GET /_ping {calls['_ping']:.1f} ms (what it calls now)")
                await engine.close()
            finally:
                try:
                    statuses = await api.stop_all()
                    bad = {k: v for k, v in statuses.items() if v != "ENGINE_STOPPED"}
                    if bad:
                        print(f"warning: sessions that did not end ENGINE_STOPPED: {bad}", file=sys.stderr)
                except BenchError as exc:
                    h.problems.append(f"stopping the sessions: {exc}")
    finally:
        await docker.close()
    return samples


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=8, help="sessions per target, interleaved (8)")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured starts per target first, at least 1 (1)")
    parser.add_argument("--poll", type=float, default=0.02, help="seconds between status polls (0.02)")
    parser.add_argument("--no-engine", dest="engine", action="store_false",
                        help="leave out the informational target that calls ContainerEngine.start() directly")
    args = parser.parse_args()
    if args.samples < 1 or args.warmup < 1 or args.poll <= 0:
        parser.error("--samples and --warmup must be at least 1, --poll positive")

    install_signal_handlers()
    h = Harness("start-container")
    samples: list[Sample] = []
    try:
        podman = h.podman = Podman(h.workdir)
        podman.start()
        image = podman.ensure_image()
        version = podman.run("--version").stdout.strip()
        h.database(runtimes=[RUNTIME_ROW])
        h.appliance(None, CML_CONTAINER_ENGINE_URL=podman.url)
        print(f"session start on the container engine ({BUSYBOX_IMAGE}, {image}): {args.samples} samples per target "
              f"after {args.warmup} warm-up each, interleaved A B B A...; polling every {args.poll * 1000:g} ms")
        print(f"engine:    {version}, `podman system service` on {podman.socket}, CONTAINERS_CONF={podman.env['CONTAINERS_CONF']}")
        print(f"database:  {h.where}; dropped at the end")
        print("appliance: python -m cml_appliance serve (uvloop), CML_LOG_LEVEL=WARNING, Docker API via aiodocker; "
              "time = POST sent -> GET showing ENGINE_RUNNING received")
        print("bare:      podman run -d --rm --init (CLI) with the same limits, user, mount, network, labels; "
              "time = until it exits (container started)")
        samples = run_async(measure(h, podman, args))
    finally:
        h.close()

    app = [s for s in samples if s.target == "appliance"]
    bare = [s for s in samples if s.target == "bare"]
    eng = [s for s in samples if s.target == "engine"]
    print()
    print(f"{'target':<9}  {'median ms':>9}  {'p90 ms':>7}  {'min':>6}  {'max':>6}")
    for name, ss in (("appliance", app), ("bare", bare), ("engine", eng)):
        if not ss:
            continue
        ms = [s.ms for s in ss]
        print(f"{name:<9}  {median(ms):>9.1f}  {percentile(ms, 0.9):>7.1f}  {min(ms):>6.1f}  {max(ms):>6.1f}")
    print(f"appliance breakdown (medians): POST round trip {median([s.post_ms for s in app]):.1f} ms; "
          f"NOTIFY of RUNNING at {median([s.notify_ms for s in app if s.notify_ms is not None]):.1f} ms; "
          f"server created->starting {median([s.to_starting_ms for s in app if s.to_starting_ms is not None]):.1f} ms, "
          f"starting->running {median([s.to_running_ms for s in app if s.to_running_ms is not None]):.1f} ms")
    ratio = median([s.ms for s in app]) / median([s.ms for s in bare])
    pairs = [a.ms / b.ms for a, b in zip(app, bare)]
    print(f"per-pair ratios: {' '.join(f'{x:.2f}' for x in pairs)}; total time {h.elapsed():.0f} s")
    print(f"target: ratio {TARGET_RATIO:g} or less: {'met' if ratio <= TARGET_RATIO else 'NOT met'}")
    print(f"ratio: {ratio:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    run_main(main)
