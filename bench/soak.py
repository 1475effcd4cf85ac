#!/usr/bin/env python3
"""Soak: the appliance under a mixed, steady load for a while, on the real `serve`.

Held at once, for --seconds (default 300; the CI test runs 60):
- --api-clients (200) API clients, each a loop of GET /api/v2/projects then GET one project,
  with --think seconds (1.0) between calls;
- --terminals (50) terminal WebSockets over --sessions (5) local sessions, each typing one
  character every 0.2 s into `cat` and timing its echo;
- --model-callers (20) loops calling POST /model on a deployed model (2 replicas);
- one job run started every second through the API (cron's finest grain is a minute; this
  is the load a cron job a second would be), plus a real cron job due every minute.

Every answer must be a success: any error fails the run. Printed per kind: count, errors, p50
and p99 latency; the appliance's RSS at the start of the load and at its end; and a chart
(SVG, --chart) of each kind's p99 over 10-second windows. The last line is `ratio: X`, the
RSS at the end over the RSS at the start (the bound: 1.5).

Usage: python bench/soak.py [--seconds 300] [--api-clients 200] [--terminals 50] [--sessions 5]
       [--model-callers 20] [--think 1.0] [--chart docs/soak.svg]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import aiohttp
from common import BenchError, Harness, install_signal_handlers, percentile, rss_kb, run_async, run_main

PREDICT = b"def predict(args):\n    return {'sum': args.get('a', 0) + args.get('b', 0)}\n"
JOB = b"print('tick')\n"
WINDOW = 10.0
RSS_BOUND = 1.5


class Recorder:
    """Latencies and errors per kind, and per time window for the chart."""

    def __init__(self, start: float):
        self.start = start
        self.latencies: dict[str, list[float]] = defaultdict(list)
        self.windows: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
        self.errors: dict[str, list[str]] = defaultdict(list)

    def ok(self, kind: str, began: float) -> None:
        now = time.monotonic()
        ms = (now - began) * 1000
        self.latencies[kind].append(ms)
        self.windows[kind][int((now - self.start) // WINDOW)].append(ms)

    def fail(self, kind: str, what: str) -> None:
        self.errors[kind].append(what)


async def api_client(api: Any, http: aiohttp.ClientSession, project_id: str, rec: Recorder, until: float, think: float) -> None:
    headers = {"Authorization": f"Bearer {api.secret}"}
    while time.monotonic() < until:
        for path in ("/api/v2/projects?page_size=10", f"/api/v2/projects/{project_id}"):
            began = time.monotonic()
            try:
                async with http.get(api.base + path, headers=headers) as resp:
                    await resp.read()
                    if resp.status == 200:
                        rec.ok("api", began)
                    else:
                        rec.fail("api", f"GET {path}: {resp.status}")
            except (aiohttp.ClientError, TimeoutError) as exc:
                rec.fail("api", f"GET {path}: {exc!r}")
        await asyncio.sleep(think)


async def terminal(api: Any, http: aiohttp.ClientSession, project_id: str, session_id: str, rec: Recorder, until: float) -> None:
    url = api.base.replace("http://", "ws://") + f"/api/v2/projects/{project_id}/sessions/{session_id}/terminal"
    try:
        async with http.ws_connect(url, headers={"Authorization": f"Bearer {api.secret}", "Origin": api.base}) as ws:
            await ws.send_bytes(b"stty raw -echo; echo RE''ADY; exec cat\r")
            seen = b""
            while b"READY" not in seen:
                msg = await ws.receive(timeout=20)
                if msg.type != aiohttp.WSMsgType.BINARY:
                    raise BenchError(f"terminal closed while starting: {msg.type} {msg.data!r}")
                seen += msg.data
            n = 0
            while time.monotonic() < until:
                n += 1
                char = bytes([97 + n % 26])
                began = time.monotonic()
                await ws.send_bytes(char)
                got = b""
                while char not in got:
                    msg = await ws.receive(timeout=10)
                    if msg.type != aiohttp.WSMsgType.BINARY:
                        raise BenchError(f"terminal closed: {msg.type} {msg.data!r}")
                    got += msg.data
                rec.ok("terminal", began)
                await asyncio.sleep(0.2)
    except (BenchError, aiohttp.ClientError, TimeoutError) as exc:
        rec.fail("terminal", repr(exc))


async def model_caller(api: Any, http: aiohttp.ClientSession, access_key: str, rec: Recorder, until: float) -> None:
    headers = {"Authorization": f"Bearer {api.secret}"}
    while time.monotonic() < until:
        began = time.monotonic()
        try:
            async with http.post(api.base + "/model", json={"accessKey": access_key, "request": {"a": 1, "b": 2}},
                                 headers=headers) as resp:
                body = await resp.json(content_type=None)
                if resp.status == 200 and body.get("response") == {"sum": 3}:
                    rec.ok("model", began)
                else:
                    rec.fail("model", f"{resp.status}: {str(body)[:120]}")
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            rec.fail("model", repr(exc))
        await asyncio.sleep(0.1)


async def job_starter(api: Any, project_id: str, job_id: str, rec: Recorder, until: float) -> None:
    """A run a second; a run still going when the next is due is not an error (CML skips it)."""
    while time.monotonic() < until:
        began = time.monotonic()
        try:
            await api.call("POST", f"/api/v2/projects/{project_id}/jobs/{job_id}/runs", {}, ok=(200, 409))
            rec.ok("job start", began)
        except BenchError as exc:
            rec.fail("job start", str(exc)[:200])
        await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - began)))


async def soak(h: Harness, args: argparse.Namespace) -> tuple[Recorder, int, int, dict[str, int]]:
    async with h.client(limit=0, timeout=60) as http:
        api = await h.connect(http)
        project_id = await api.create_project("soak")
        form = aiohttp.FormData()
        form.add_field("predict.py", PREDICT, filename="predict.py")
        form.add_field("tick.py", JOB, filename="tick.py")
        async with http.post(api.base + f"/api/v2/projects/{project_id}/files", data=form, headers=api.headers) as resp:
            if resp.status != 200:
                raise BenchError(f"upload: {resp.status} {await resp.text()}")
        model = await api.call("POST", f"/api/v2/projects/{project_id}/models", {
            "name": "adder", "auto_build_model": True, "auto_build_config": {"file_path": "predict.py", "function_name": "predict"},
            "auto_deploy_model": True, "auto_deployment_config": {"replicas": 2}})
        job = await api.call("POST", f"/api/v2/projects/{project_id}/jobs", {"name": "tick", "script": "tick.py"})
        cron = await api.call("POST", f"/api/v2/projects/{project_id}/jobs",
                              {"name": "cron", "script": "tick.py", "schedule": "* * * * *", "timezone": "UTC"})
        sessions = [await api.start_session(project_id) for _ in range(args.sessions)]
        for s in sessions:
            await api.wait_status(project_id, s["id"], "ENGINE_RUNNING", timeout=30)
        # The model serves before the load begins.
        deadline = time.monotonic() + 60
        while True:
            async with http.post(api.base + "/model", json={"accessKey": model["access_key"], "request": {"a": 1, "b": 2}},
                                 headers=api.headers) as resp:
                if resp.status == 200:
                    break
            if time.monotonic() > deadline:
                raise BenchError("the model never served")
            await asyncio.sleep(0.2)

        assert h.server is not None
        rss_start = rss_kb(h.server.proc.pid)
        start = time.monotonic()
        until = start + args.seconds
        rec = Recorder(start)
        tasks = [api_client(api, http, project_id, rec, until, args.think) for _ in range(args.api_clients)]
        tasks += [terminal(api, http, project_id, sessions[i % len(sessions)]["id"], rec, until) for i in range(args.terminals)]
        tasks += [model_caller(api, http, model["access_key"], rec, until) for _ in range(args.model_callers)]
        tasks.append(job_starter(api, project_id, job["id"], rec, until))
        await asyncio.gather(*tasks)
        rss_end = rss_kb(h.server.proc.pid)
        runs = await api.call("GET", f"/api/v2/projects/{project_id}/jobs/{cron['id']}/runs")
        counts = {"cron runs": len(runs["job_runs"])}
        await api.stop_all()
        return rec, rss_start, rss_end, counts


def chart(rec: Recorder, path: Path, seconds: float) -> None:
    """Each kind's p99 per 10-second window, as an SVG line chart (no plotting library needed)."""
    width, height, pad = 720, 300, 44
    colours = {"api": "#1f6feb", "terminal": "#1a7f37", "model": "#9a6700", "job start": "#a3211a"}
    windows = max(1, int(seconds // WINDOW))
    series = {kind: [percentile(rec.windows[kind].get(i, [0.0]), 0.99) for i in range(windows)] for kind in rec.windows}
    top = max([v for values in series.values() for v in values] + [1.0]) * 1.1
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">',
             f'<rect width="{width}" height="{height}" fill="#fff"/>',
             f'<text x="{pad}" y="18">p99 latency (ms) per {WINDOW:.0f} s window, soak of {seconds:.0f} s</text>',
             f'<line x1="{pad}" y1="{height - pad}" x2="{width - 10}" y2="{height - pad}" stroke="#888"/>',
             f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" stroke="#888"/>',
             f'<text x="4" y="{pad + 4}">{top:.0f}</text><text x="4" y="{height - pad}">0</text>']
    for n, (kind, values) in enumerate(sorted(series.items())):
        points = " ".join(
            f"{pad + (width - pad - 10) * i / max(1, windows - 1):.1f},{height - pad - (height - 2 * pad) * v / top:.1f}"
            for i, v in enumerate(values))
        colour = colours.get(kind, "#444")
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{points}"/>')
        parts.append(f'<text x="{pad + 10 + n * 120}" y="{height - 12}" fill="{colour}">{kind}</text>')
    parts.append("</svg>")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=300)
    parser.add_argument("--api-clients", type=int, default=200)
    parser.add_argument("--terminals", type=int, default=50)
    parser.add_argument("--sessions", type=int, default=5)
    parser.add_argument("--model-callers", type=int, default=20)
    parser.add_argument("--think", type=float, default=1.0)
    parser.add_argument("--chart", type=Path, default=None)
    args = parser.parse_args()
    install_signal_handlers()
    h = Harness("soak")
    try:
        h.database()
        h.appliance()
        print(f"soak of {args.seconds:.0f} s: {args.api_clients} API clients, {args.terminals} terminals over "
              f"{args.sessions} sessions, {args.model_callers} model callers, a job run a second; database {h.where}")
        rec, rss_start, rss_end, counts = run_async(soak(h, args))
    finally:
        h.close()
    print(f"{'kind':<10} {'count':>8} {'errors':>7} {'p50 ms':>8} {'p99 ms':>8}")
    for kind in ("api", "terminal", "model", "job start"):
        values = rec.latencies.get(kind, [])
        p50 = percentile(values, 0.5) if values else float("nan")
        p99 = percentile(values, 0.99) if values else float("nan")
        print(f"{kind:<10} {len(values):>8} {len(rec.errors.get(kind, [])):>7} {p50:>8.1f} {p99:>8.1f}")
    print(f"cron job (every minute): {counts['cron runs']} run(s)")
    print(f"appliance RSS: {rss_start / 1024:.1f} MB at the start of the load, {rss_end / 1024:.1f} MB at its end")
    if args.chart:
        chart(rec, args.chart, args.seconds)
        print(f"chart: {args.chart}")
    errors = {k: v for k, v in rec.errors.items() if v}
    ratio = rss_end / max(1, rss_start)
    if errors:
        for kind, items in errors.items():
            print(f"errors ({kind}): {len(items)}, first: {items[:3]}")
    print(f"memory bound ({RSS_BOUND}): {'met' if ratio <= RSS_BOUND else 'NOT met'}; errors: {'none' if not errors else 'SOME'}")
    print(f"ratio: {ratio:.2f}", flush=True)
    return 0 if not errors and ratio <= RSS_BOUND else 1


if __name__ == "__main__":
    run_main(main)
