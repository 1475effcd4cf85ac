#!/usr/bin/env python3
"""Benchmark: starting a session on the local engine, against a bare subprocess of the same command.

N times (default 20), in interleaved order (appliance, bare, bare, appliance, ...):

- Appliance: POST /api/v2/projects/{p}/sessions {"runtime_identifier": "host/python3"} on the real
  `python -m cml_appliance serve` (CML_LOG_LEVEL=WARNING), then GET .../sessions/{id} every
  --poll seconds (default 0.01) until "status" is ENGINE_RUNNING. The time is from sending the
  POST to receiving the GET that shows ENGINE_RUNNING: what an API client sees. Each session is
  stopped (POST ...:stop, wait for ENGINE_STOPPED) before the next sample, outside the timing.
  Also shown per sample: the POST's own round trip, the moment this process got Postgres's NOTIFY
  of ENGINE_RUNNING (LISTEN cml_workloads: the status change itself, without polling's delay),
  and the server's own stamps (created_at -> starting_at -> running_at, millisecond resolution).
- Bare: asyncio.create_subprocess_exec of the command the appliance runs for a session (the
  /bin/sh -c SESSION_MAIN of cml_appliance/sessions/service.py, imported, not copied), with the
  same kind of environment, a working directory, stdout piped and a new session, timed until
  the process has printed its first line ("Session ... is running ..."), then killed.
- Informational, not in the ratio: "preexec", the bare spawn plus the appliance's preexec_fn
  (cml_appliance.engines.local._child_setup: PR_SET_PDEATHSIG, RLIMIT_DATA), which makes
  Python fork() instead of using vfork/posix_spawn.

The last line is `ratio: X` = the appliance's median over the bare median. The absolute target
is a median of 300 ms or less (printed as met / NOT met); there is no target for the ratio, which
mostly says how much the API, Postgres round trips and polling add to a bare fork+exec.

- Database: DATABASE_URL's server if set, else an embedded pgserver; a fresh database
  cml_bench_<random>, dropped at the end.

Usage: /tmp/venv/bin/python bench/session_start_local.py [--samples N] [--warmup N] [--poll S]
       [--no-preexec]                               (defaults: 20, 2, 0.01: about 15 s)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    BenchError,
    Harness,
    StatusListener,
    install_signal_handlers,
    median,
    parse_time,
    percentile,
    run_async,
    run_main,
)

from cml_appliance.engines.local import _child_setup
from cml_appliance.sessions.service import SESSION_MAIN

RUNNING = "ENGINE_RUNNING"
RUNTIME = "host/python3"
TARGET_MS = 300.0


@dataclass
class Sample:
    target: str
    ms: float  # the headline time of the sample
    post_ms: float | None = None  # appliance: the POST's round trip
    notify_ms: float | None = None  # appliance: POST sent -> NOTIFY of ENGINE_RUNNING received
    to_starting_ms: float | None = None  # appliance: created_at -> starting_at (server clock)
    to_running_ms: float | None = None  # appliance: starting_at -> running_at (server clock)
    spawn_ms: float | None = None  # bare: create_subprocess_exec returned


def bare_env(project_dir: Path, site_id: str) -> dict[str, str]:
    """What the local engine gives a session, with placeholder values; BENCH_SITE_ID instead of
    CML_SITE_ID (the appliance's reconciliation must not take these processes for its own, the
    clean-up finds them by it)."""
    base = {k: os.environ[k] for k in ("PATH", "LANG", "TZ") if k in os.environ}
    return base | {
        "CDSW_PROJECT": "bench", "CDSW_PROJECT_ID": "bench", "CDSW_ENGINE_ID": "bare0000000000000",
        "CDSW_API_URL": "http://127.0.0.1:1/api/v1", "CDSW_APIV2_KEY": "x" * 43, "CDSW_DOMAIN": "127.0.0.1:1",
        "CDSW_APP_PORT": "1", "CDSW_READONLY_PORT": "2", "CDSW_CPU_MILLICORES": "1000", "CDSW_MEMORY_MB": "2048",
        "HADOOP_USER_NAME": "bench", "HOME": str(project_dir), "BENCH_SITE_ID": site_id,
    }


async def bare_sample(target: str, project_dir: Path, env: dict[str, str], preexec: bool) -> Sample:
    extra: dict[str, Any] = {"preexec_fn": _child_setup(2048 * 1024 * 1024)} if preexec else {}
    started = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        "/bin/sh", "-c", SESSION_MAIN, cwd=project_dir, env=env, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, start_new_session=True, **extra,
    )
    spawned = time.perf_counter()
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 10)
        done = time.perf_counter()
        if not line.startswith(b"Session "):
            raise BenchError(f"the bare session printed {line!r}, not its 'Session ... is running' line")
    finally:
        # The group, as the local engine's stop does. A SIGTERM that lands between the shell's trap
        # and its `sleep 3600 &` runs the trap after the fork: the shell exits and the new sleep,
        # which got no signal, stays in the group. So the group is killed again once the shell is gone.
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            await asyncio.wait_for(proc.wait(), 5)
        except TimeoutError:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        await proc.wait()
    return Sample(target, (done - started) * 1000, spawn_ms=(spawned - started) * 1000)


async def appliance_sample(api: Any, listener: StatusListener, project: str, poll: float) -> Sample:
    started = time.perf_counter()
    body = await api.start_session(project, runtime_identifier=RUNTIME)
    posted = time.perf_counter()
    sid = body["id"]
    if body.get("engine") != "local":
        raise BenchError(f"the session went to the {body.get('engine')!r} engine, not local: {body}")
    final, seen = await api.wait_status(project, sid, RUNNING, interval=poll)
    notified = await listener.wait_for(sid, RUNNING)
    created, starting, running = (parse_time(final[k]) for k in ("created_at", "starting_at", "running_at"))
    status = await api.stop_and_wait(project, sid)
    if status != "ENGINE_STOPPED":
        raise BenchError(f"session {sid} ended {status} after a stop, not ENGINE_STOPPED")
    return Sample(
        "appliance", (seen - started) * 1000, post_ms=(posted - started) * 1000,
        notify_ms=None if notified is None else (notified - started) * 1000,
        to_starting_ms=None if None in (created, starting) else (starting - created) * 1000,  # type: ignore[operator]
        to_running_ms=None if None in (starting, running) else (running - starting) * 1000,  # type: ignore[operator]
    )


def _f(value: float | None, width: int = 7) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}.1f}"


def print_row(i: int, s: Sample) -> None:
    print(f"{i:>4}  {s.target:<9}  {s.ms:>8.1f}  {_f(s.post_ms)}  {_f(s.notify_ms)}  {_f(s.to_starting_ms, 9)}  "
          f"{_f(s.to_running_ms, 9)}  {_f(s.spawn_ms)}", flush=True)


async def measure(h: Harness, args: argparse.Namespace) -> list[Sample]:
    samples: list[Sample] = []
    async with h.client() as http, StatusListener(h.dsn) as listener:
        api = await h.connect(http)
        try:
            project = await api.create_project("bench local sessions")
            project_dir = h.data_dir() / "projects" / project
            bare_dir = h.workdir / "bare-project"
            bare_dir.mkdir()
            env = bare_env(bare_dir, h.site_id)
            targets = ["appliance", "bare"] + (["preexec"] if args.preexec else [])

            async def one(target: str) -> Sample:
                if target == "appliance":
                    return await appliance_sample(api, listener, project, args.poll)
                return await bare_sample(target, bare_dir, env, target == "preexec")

            for _ in range(args.warmup):
                for t in targets:
                    await one(t)
            if not project_dir.is_dir():
                raise BenchError(f"the project directory {project_dir} does not exist")
            print(f"{'#':>4}  {'target':<9}  {'total ms':>8}  {'POST ms':>7}  {'NOTIFY':>7}  {'->STARTING':>9}  "
                  f"{'->RUNNING':>9}  {'spawn':>7}")
            for i in range(args.samples):
                order = targets if i % 2 == 0 else targets[::-1]  # A B, B A, A B...
                for t in order:
                    s = await one(t)
                    samples.append(s)
                    print_row(i + 1, s)
        finally:
            try:
                statuses = await api.stop_all()
                bad = {k: v for k, v in statuses.items() if v != "ENGINE_STOPPED"}
                if bad:
                    print(f"warning: sessions that did not end ENGINE_STOPPED: {bad}", file=sys.stderr)
            except BenchError as exc:
                h.problems.append(f"stopping the sessions: {exc}")
    return samples


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=20, help="sessions per target, interleaved (20)")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured starts per target first (2)")
    parser.add_argument("--poll", type=float, default=0.01, help="seconds between status polls (0.01)")
    parser.add_argument("--no-preexec", dest="preexec", action="store_false",
                        help="leave out the informational bare+preexec_fn target")
    args = parser.parse_args()
    if args.samples < 1 or args.warmup < 0 or args.poll <= 0:
        parser.error("--samples must be at least 1, --warmup not negative, --poll positive")

    install_signal_handlers()
    h = Harness("start-local")
    samples: list[Sample] = []
    try:
        h.database()
        h.appliance()
        print(f"session start on the local engine ({RUNTIME}): {args.samples} samples per target after "
              f"{args.warmup} warm-up each, interleaved A B B A...; polling every {args.poll * 1000:g} ms")
        print(f"database:  {h.where}; dropped at the end")
        print("appliance: python -m cml_appliance serve (uvloop), CML_LOG_LEVEL=WARNING; time = POST sent -> "
              "GET showing ENGINE_RUNNING received")
        print("bare:      asyncio.create_subprocess_exec('/bin/sh', '-c', SESSION_MAIN) in this process (uvloop), "
              "time = until its first line is read" + ("; preexec = the same plus the appliance's preexec_fn"
                                                          if args.preexec else ""))
        print("columns:   NOTIFY = POST sent -> Postgres NOTIFY of ENGINE_RUNNING here; ->STARTING = created_at "
              "-> starting_at, ->RUNNING = starting_at -> running_at (server stamps, 1 ms resolution); "
              "spawn = create_subprocess_exec returned")
        print()
        samples = run_async(measure(h, args))
    finally:
        h.close()

    by: dict[str, list[Sample]] = {}
    for s in samples:
        by.setdefault(s.target, []).append(s)
    print()
    print(f"{'target':<9}  {'median ms':>9}  {'p90 ms':>7}  {'min':>6}  {'max':>6}")
    for name, ss in by.items():
        ms = [s.ms for s in ss]
        print(f"{name:<9}  {median(ms):>9.1f}  {percentile(ms, 0.9):>7.1f}  {min(ms):>6.1f}  {max(ms):>6.1f}")
    app = by["appliance"]
    print(f"appliance breakdown (medians): POST round trip {median([s.post_ms for s in app]):.1f} ms; "
          f"NOTIFY of RUNNING at {median([s.notify_ms for s in app if s.notify_ms is not None]):.1f} ms; "
          f"server created->starting {median([s.to_starting_ms for s in app if s.to_starting_ms is not None]):.1f} ms, "
          f"starting->running {median([s.to_running_ms for s in app if s.to_running_ms is not None]):.1f} ms")
    if "preexec" in by:
        print(f"bare spawn (create_subprocess_exec returned): median {median([s.spawn_ms for s in by['bare']]):.2f} ms "
              f"plain, {median([s.spawn_ms for s in by['preexec']]):.2f} ms with preexec_fn")
    app_median = median([s.ms for s in app])
    bare_median = median([s.ms for s in by["bare"]])
    met = "met" if app_median <= TARGET_MS else "NOT met"
    print(f"target: appliance median {TARGET_MS:g} ms or less: {met} ({app_median:.1f} ms); total time {h.elapsed():.0f} s")
    print(f"ratio: {app_median / bare_median:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    run_main(main)
