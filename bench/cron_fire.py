#!/usr/bin/env python3
"""Benchmark: 1,000 cron jobs due in the same minute on the local engine, against 1,000 bare spawns.

- Appliance: the real `python -m cml_appliance serve` (CML_LOG_LEVEL=WARNING) is running; a project
  holds ok.sh (`echo ok`, run with /bin/sh: cml_appliance/jobs/service.py command_for). --jobs rows
  (default 1,000) are inserted straight into `jobs` (schedule '* * * * *', UTC) with next_fire_at =
  one instant a few seconds ahead (the "due" time). The scheduler loop, which sleeps until the next
  due fire, starts them.
  Measured from the due instant, on the database server's clock: until all runs exist (the last
  workloads.created_at of kind job_run), until all reached ENGINE_RUNNING (last running_at), until
  all finished (last finished_at); and how many ended ENGINE_SUCCEEDED. This process polls
  count(*) every 0.1 s as a cross-check of "all exist" on its own clock.
- Bare: the same number of `/bin/sh ok.sh` started with asyncio.create_subprocess_exec as fast as
  possible (stdout piped, a new session each, as the engine does), then all waited for: time to all
  started (the last create_subprocess_exec returned) and to all ended. Run before and after the
  appliance round; the median of the two is used.

Target: all runs started (exist) within 10 s of the due time (met / NOT met).
The last line is `ratio: X` = appliance time-to-all-started / bare time-to-all-started.

Usage: DATABASE_URL=... /tmp/venv/bin/python bench/cron_fire.py [--jobs N] [--lead S]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import aiohttp
import asyncpg
from api_list import cpu_seconds
from common import (
    FINISHED,
    BenchError,
    Harness,
    install_signal_handlers,
    marked_pids,
    median,
    run_async,
    run_main,
)

from cml_appliance.core.ids import new_public_id

TARGET_S = 10.0
SCRIPT = b"echo ok\n"


async def bare_round(n: int, workdir: Path, site_id: str) -> tuple[float, float, int]:
    """(seconds to all started, seconds to all ended, how many exited 0)."""
    env = {k: os.environ[k] for k in ("PATH", "LANG") if k in os.environ} | {"BENCH_SITE_ID": site_id,
                                                                           "HOME": str(workdir)}
    t0 = time.perf_counter()
    procs = []
    for _ in range(n):
        procs.append(await asyncio.create_subprocess_exec(
            "/bin/sh", "ok.sh", cwd=workdir, env=env, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, start_new_session=True))
    started = time.perf_counter() - t0
    outs = await asyncio.gather(*(p.communicate() for p in procs))
    ended = time.perf_counter() - t0
    ok = sum(1 for p, (out, _) in zip(procs, outs) if p.returncode == 0 and out == b"ok\n")
    return started, ended, ok


async def appliance_round(h: Harness, args: argparse.Namespace) -> dict[str, float | int | None]:
    async with h.client() as http:
        api = await h.connect(http)
        project = await api.create_project("bench cron fire")
        form = aiohttp.FormData()
        form.add_field("ok.sh", SCRIPT, filename="ok.sh", content_type="text/x-sh")
        async with http.post(f"{api.base}/api/v2/projects/{project}/files", data=form, headers=api.headers) as resp:
            if resp.status != 200:
                raise BenchError(f"upload: HTTP {resp.status}: {(await resp.text())[:1000]}")
    conn = await asyncpg.connect(h.dsn)
    try:
        pid = await conn.fetchval("SELECT id FROM projects WHERE public_id = $1", project)
        uid = await conn.fetchval("SELECT id FROM users WHERE username = 'bench'")
        due = await conn.fetchval("SELECT now()") + timedelta(seconds=args.lead)
        await conn.executemany(
            "INSERT INTO jobs (public_id, project_id, creator_id, name, script, cpu, memory, runtime_identifier,"
            " schedule, timezone, next_fire_at) VALUES ($1, $2, $3, $4, 'ok.sh', 1, 2, 'host/python3',"
            " '* * * * *', 'UTC', $5)",
            [(new_public_id(), pid, uid, f"cron {i:04d}", due) for i in range(args.jobs)],
        )
        wait_s = (due - await conn.fetchval("SELECT now()")).total_seconds()
        if wait_s < 0.5:
            raise BenchError(f"inserting the jobs took too long: the due time is {wait_s:.2f} s away; raise --lead")
        print(f"{args.jobs} jobs inserted; due in {wait_s:.2f} s", flush=True)
        await asyncio.sleep(wait_s)
        t_due = time.perf_counter()
        cpu0 = cpu_seconds(h.server.proc.pid)  # type: ignore[union-attr]
        all_exist_local = None
        progress = []
        next_report = 1.0
        while True:
            row = await conn.fetchrow(
                "SELECT count(DISTINCT job_id) AS n, count(*) FILTER (WHERE status = ANY($1::text[])) AS done,"
                " count(*) FILTER (WHERE NOT status = ANY($1::text[])) AS active"
                " FROM workloads WHERE kind = 'job_run'", list(FINISHED))
            now = time.perf_counter() - t_due
            if all_exist_local is None and row["n"] >= args.jobs:
                all_exist_local = now
            if now >= next_report:
                progress.append(f"{now:.0f}s: {row['n']} exist, {row['done']} finished")
                next_report += 1.0
            if row["n"] >= args.jobs and row["active"] == 0:
                break
            if now > args.timeout:
                print(f"warning: gave up after {args.timeout:g} s: {row['n']} runs exist, {row['done']} finished",
                      file=sys.stderr)
                break
            await asyncio.sleep(0.1)
        # '* * * * *' fires again each minute: runs of jobs fired before a minute boundary may start
        # again; only each job's first run counts, and the jobs are paused now.
        await conn.execute("UPDATE jobs SET paused = true")
        cpu1 = cpu_seconds(h.server.proc.pid)  # type: ignore[union-attr]
        wall = time.perf_counter() - t_due
        if cpu0 is not None and cpu1 is not None:
            print(f"appliance process CPU from the due time to all finished: {cpu1 - cpu0:.2f} s over {wall:.2f} s wall "
                  f"({(cpu1 - cpu0) / wall * 100:.0f}% of one core; its children's CPU not included)")
        print("progress (this process's clock from the due time): " + "; ".join(progress))
        stats = await conn.fetchrow(
            "SELECT count(*) AS n, min(created_at) AS first_created, max(created_at) AS last_created,"
            " max(running_at) AS last_running, max(finished_at) AS last_finished,"
            " count(*) FILTER (WHERE status = 'ENGINE_SUCCEEDED') AS succeeded,"
            " count(*) FILTER (WHERE running_at IS NOT NULL) AS ran"
            " FROM (SELECT DISTINCT ON (job_id) * FROM workloads WHERE kind = 'job_run'"
            " ORDER BY job_id, created_at) AS first_runs")
        refires = await conn.fetchval("SELECT count(*) FROM workloads WHERE kind = 'job_run'") - stats["n"]
        if refires:
            print(f"(not counted: {refires} second run(s) of jobs whose next minute came during the round)")
        others = await conn.fetch(
            "SELECT status, left(regexp_replace(reason, '[0-9]+', 'N', 'g'), 200) AS reason, exit_code, count(*) AS n FROM"
            " (SELECT DISTINCT ON (job_id) * FROM workloads WHERE kind = 'job_run' ORDER BY job_id, created_at) AS w"
            " WHERE kind = 'job_run' AND status <> 'ENGINE_SUCCEEDED' GROUP BY 1, 2, 3 ORDER BY n DESC LIMIT 5")
        for r in others:
            print(f"runs not ENGINE_SUCCEEDED: {r['n']} x {r['status']} exit code {r['exit_code']}: {r['reason']!r}")

        def since(t: object) -> float | None:
            return None if t is None else (t - due).total_seconds()  # type: ignore[operator]

        return {
            "runs": stats["n"], "succeeded": stats["succeeded"], "ran": stats["ran"],
            "first_created": since(stats["first_created"]), "last_created": since(stats["last_created"]),
            "last_running": since(stats["last_running"]), "last_finished": since(stats["last_finished"]),
            "all_exist_local": all_exist_local,
        }
    finally:
        await conn.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=1000, help="cron jobs due at once (1000)")
    parser.add_argument("--lead", type=float, default=4.0, help="seconds from the insert to the due time (4)")
    parser.add_argument("--timeout", type=float, default=180.0, help="give up after this many seconds (180)")
    args = parser.parse_args()
    install_signal_handlers()
    h = Harness("cron-fire")
    bare: list[tuple[float, float, int]] = []
    app: dict[str, float | int | None] = {}
    try:
        h.database()
        h.appliance()
        print(f"database:  {h.where}; dropped at the end")
        print(f"appliance: python -m cml_appliance serve, CML_LOG_LEVEL=WARNING; {args.jobs} cron jobs running "
              "/bin/sh ok.sh, all due at one instant; times from the due instant (database clock)")
        print(f"bare:      {args.jobs} x asyncio.create_subprocess_exec('/bin/sh', 'ok.sh') as fast as possible, "
              "then wait for all; before and after the appliance")
        bare_dir = h.workdir / "bare"
        bare_dir.mkdir()
        (bare_dir / "ok.sh").write_bytes(SCRIPT)
        print()
        bare.append(run_async(bare_round(args.jobs, bare_dir, h.site_id)))
        print(f"bare #1:   all started {bare[-1][0]:.2f} s, all ended {bare[-1][1]:.2f} s, {bare[-1][2]} ok", flush=True)
        app = run_async(appliance_round(h, args))
        bare.append(run_async(bare_round(args.jobs, bare_dir, h.site_id)))
        print(f"bare #2:   all started {bare[-1][0]:.2f} s, all ended {bare[-1][1]:.2f} s, {bare[-1][2]} ok", flush=True)
        left = marked_pids(h.site_id) + marked_pids(h.site_id, "BENCH_SITE_ID")
        print(f"processes of this run still alive before the clean-up (second fires may still run): {len(left)}")
    finally:
        h.close()

    def f(v: object) -> str:
        return "-" if v is None else f"{v:.2f}"

    print()
    print(f"{'target':<9}  {'all started s':>13}  {'all running s':>13}  {'all ended s':>11}  {'ok':>5}")
    b_start, b_end = median([b[0] for b in bare]), median([b[1] for b in bare])
    print(f"{'bare':<9}  {b_start:>13.2f}  {'-':>13}  {b_end:>11.2f}  {min(b[2] for b in bare):>5}")
    print(f"{'appliance':<9}  {f(app['last_created']):>13}  {f(app['last_running']):>13}  "
          f"{f(app['last_finished']):>11}  {app['succeeded']:>5}")
    print(f"appliance: {app['runs']} runs, {app['ran']} reached ENGINE_RUNNING, {app['succeeded']} ENGINE_SUCCEEDED; "
          f"first run created {f(app['first_created'])} s after the due time; all {args.jobs} seen to exist by this "
          f"process at {f(app['all_exist_local'])} s")
    started = app["last_created"] if app["runs"] == args.jobs else None
    met = started is not None and started <= TARGET_S  # type: ignore[operator]
    print(f"target: all {args.jobs} started within {TARGET_S:g} s of the due time: {'met' if met else 'NOT met'} "
          f"({f(started)} s); total time {h.elapsed():.0f} s")
    ratio = (started if started is not None else float("inf")) / b_start  # type: ignore[operator]
    print(f"ratio: {ratio:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    run_main(main)
