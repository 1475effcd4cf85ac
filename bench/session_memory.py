#!/usr/bin/env python3
"""Benchmark: the appliance's memory with 0 and with 50 running local sessions.

The real `python -m cml_appliance serve` (uvloop, CML_LOG_LEVEL=WARNING) in its own process; its
resident memory is VmRSS from /proc/<pid>/status (the serve process only: each session's own
processes, /bin/sh and its sleep, are reported apart, as PSS from /proc/<pid>/smaps_rollup).

1. Idle: the appliance ready, a project made, one session started and stopped (so what a first
   session loads once, modules and pool connections, is not charged to the 50), then --settle
   seconds of quiet. RSS(0) is the median of 5 readings 0.2 s apart.
2. --sessions local sessions (default 50) are started (POST, one after another), every one is
   waited for until ENGINE_RUNNING, then --settle seconds of quiet; RSS(50) likewise.
3. All are stopped (POST ...:stop); every one must end ENGINE_STOPPED and no process of this
   run's site (CML_SITE_ID in its environment) may be left. RSS after the stop is shown too.

Printed: MB at 0 and at 50, MB per session ((RSS(50) - RSS(0)) / 50), the sessions' own processes,
and the last line `ratio: X` = RSS(50) / RSS(0). No target is set; a per-session cost of a few
hundred kB at most (a task, a pipe, a few records) is what to expect of an asyncio process, and
anything that grows with sessions by MBs is a leak or a buffer to look at. (The machine: 24 GB,
2 cores.)

Usage: /tmp/venv/bin/python bench/session_memory.py [--sessions N] [--settle S]
       (defaults: 50, 3: about 25 s)
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    BenchError,
    Harness,
    install_signal_handlers,
    marked_pids,
    median,
    rss_kb,
    run_async,
    run_main,
)

RUNNING = "ENGINE_RUNNING"


async def read_rss(pid: int, times: int = 5, gap: float = 0.2) -> int:
    values = []
    for i in range(times):
        if i:
            await asyncio.sleep(gap)
        values.append(rss_kb(pid))
    return int(median(values))


def processes_pss_kb(pids: list[int]) -> int:
    """Proportional set size (shared pages split among their users) of the processes, in kB:
    unlike a sum of RSS, it does not count the shared libc and shell pages 100 times."""
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
                    break
        except OSError:
            pass
    return total


async def measure(h: Harness, args: argparse.Namespace) -> dict[str, float]:
    assert h.server is not None
    pid = h.server.proc.pid
    out: dict[str, float] = {}
    n = args.sessions
    async with h.client() as http:
        api = await h.connect(http)
        try:
            out["rss_ready"] = rss_kb(pid)
            project = await api.create_project("bench memory")
            # One session first: what the first one loads once is not the 50's.
            first = await api.start_session(project, runtime_identifier="host/python3")
            await api.wait_status(project, first["id"], RUNNING, interval=0.02)
            if await api.stop_and_wait(project, first["id"]) != "ENGINE_STOPPED":
                raise BenchError("the warm-up session did not end ENGINE_STOPPED")
            await asyncio.sleep(args.settle)
            out["rss0"] = await read_rss(pid)
            print(f"RSS ready {out['rss_ready'] / 1024:.1f} MB; after one session started and stopped and "
                  f"{args.settle:g} s: {out['rss0'] / 1024:.1f} MB", flush=True)

            started = time.monotonic()
            ids = []
            for _ in range(args.sessions):
                body = await api.start_session(project, runtime_identifier="host/python3")
                if body.get("engine") != "local":
                    raise BenchError(f"a session went to the {body.get('engine')!r} engine: {body}")
                ids.append(body["id"])
            for sid in ids:
                await api.wait_status(project, sid, RUNNING, interval=0.05, timeout=60)
            out["start_s"] = time.monotonic() - started
            await asyncio.sleep(args.settle)
            for sid in ids:  # still running after the settle
                body = await api.get_session(project, sid)
                if body["status"] != RUNNING:
                    raise BenchError(f"session {sid} is {body['status']} ({body.get('reason')!r}) after the settle")
            out["rss50"] = await read_rss(pid)
            procs = await asyncio.to_thread(marked_pids, h.site_id)
            out["procs"] = len(procs)
            out["procs_kb"] = processes_pss_kb(procs)
            print(f"{args.sessions} sessions ENGINE_RUNNING after {out['start_s']:.1f} s; after {args.settle:g} s: "
                  f"RSS {out['rss50'] / 1024:.1f} MB; their own {len(procs)} processes: "
                  f"{out['procs_kb'] / 1024:.1f} MB PSS in all", flush=True)

            stopping = time.monotonic()
            statuses = await api.stop_all(timeout=120)
            out["stop_s"] = time.monotonic() - stopping
            bad = {k: v for k, v in statuses.items() if v != "ENGINE_STOPPED"}
            if bad:
                raise BenchError(f"sessions that did not end ENGINE_STOPPED: {bad}")
            deadline = time.monotonic() + 10
            left = await asyncio.to_thread(marked_pids, h.site_id)
            while left and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
                left = await asyncio.to_thread(marked_pids, h.site_id)
            if left:
                raise BenchError(f"{len(left)} process(es) of stopped sessions are still there: {left[:10]}")
            await asyncio.sleep(args.settle)
            out["rss_after"] = await read_rss(pid)
            print(f"all {len(statuses)} sessions (the {n} and the warm-up one) ENGINE_STOPPED {out['stop_s']:.1f} s after the stops were sent, "
                  f"no session process left; RSS {out['rss_after'] / 1024:.1f} MB", flush=True)
        finally:
            try:
                await api.stop_all(timeout=120)
            except BenchError as exc:
                h.problems.append(f"stopping the sessions: {exc}")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=50, help="running sessions to measure with (50)")
    parser.add_argument("--settle", type=float, default=3.0, help="seconds of quiet before each reading (3)")
    args = parser.parse_args()
    if args.sessions < 1 or args.settle < 0:
        parser.error("--sessions must be at least 1, --settle not negative")

    install_signal_handlers()
    h = Harness("memory")
    out: dict[str, float] = {}
    try:
        h.database()
        h.appliance()
        print(f"appliance RSS with 0 and {args.sessions} running local sessions (host/python3)")
        print(f"database:  {h.where}; dropped at the end")
        print("appliance: python -m cml_appliance serve (uvloop), CML_LOG_LEVEL=WARNING; VmRSS of its process")
        print()
        out = run_async(measure(h, args))
    finally:
        h.close()

    n = args.sessions
    rss0, rss50 = out["rss0"] / 1024, out["rss50"] / 1024
    print()
    print(f"{'running sessions':<18}  {'RSS MB':>7}")
    print(f"{0:<18}  {rss0:>7.1f}")
    print(f"{n:<18}  {rss50:>7.1f}")
    print(f"{'0 (after stop)':<18}  {out['rss_after'] / 1024:>7.1f}")
    print(f"per session: {(rss50 - rss0) / n * 1024:.0f} kB in the appliance "
          f"(+{(rss50 - rss0):.1f} MB for {n}); the sessions' own processes: "
          f"{out['procs_kb'] / max(1, n):.0f} kB PSS per session ({int(out['procs'])} processes); total time {h.elapsed():.0f} s")
    print(f"ratio: {rss50 / rss0:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    run_main(main)
