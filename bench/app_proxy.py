#!/usr/bin/env python3
"""Benchmark: the application proxy's throughput, against the same application reached directly.

An application (an aiohttp server on 127.0.0.1:$CDSW_APP_PORT) is started on the local engine
through the API of the real `python -m cml_appliance serve` (CML_LOG_LEVEL=WARNING). It has two pages:

- /page: a dashboard-like page: a Jinja2 template renders a 200-row table of in-memory data
  (about 20 kB of HTML), the kind of work a Dash, Flask or Streamlit page does for each request.
  This is the application the target is about.
- /hello: a constant 25-byte answer. It costs the application almost nothing, so it shows the
  proxy's own ceiling: on two cores the load generator, the proxy and the application share the
  CPU, and the proxy's cost per request (printed as appl. CPU ms/req) is then larger than the
  application's.

Then, in interleaved rounds (appliance, direct, direct, appliance, ...) of --seconds each, per page,
--concurrency requests are kept in flight by one aiohttp client with keep-alive:

- appliance: GET http://127.0.0.1:<applications' port>/apps/<subdomain>/<page> with Authorization: Bearer <key>
- direct:    GET http://127.0.0.1:<app port>/<page> (the app's port from workloads.app_port)

Every answer must be 200 with the app's exact body. Printed: req/s, p50, p99 per round and overall,
and the ratio for each page. The last line is `ratio: X` = the appliance's req/s over the direct
req/s for /page (target 0.8 or more).

Usage: DATABASE_URL=... .venv/bin/python bench/app_proxy.py [--rounds N] [--seconds S] [--concurrency C]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

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

TARGET = 0.8
HELLO = b"hello from the bench app\n"
APP_SCRIPT = """\
import os
import random

import jinja2
from aiohttp import web

HELLO = %r
rows = [{"id": i, "name": f"customer {i}", "region": random.Random(i).choice(["north", "south", "east", "west"]),
         "revenue": random.Random(i).uniform(1e3, 1e6), "growth": random.Random(-i).uniform(-0.2, 0.4)}
        for i in range(200)]
page = jinja2.Environment(autoescape=True).from_string(
    "<!doctype html><html><head><title>Revenue by customer</title></head><body><h1>Revenue by customer</h1>"
    "<p>{{ rows|length }} customers, {{ '%%.0f'|format(rows|sum(attribute='revenue')) }} in total</p><table>"
    "<tr><th>#</th><th>Customer</th><th>Region</th><th>Revenue</th><th>Growth</th></tr>"
    "{%% for r in rows %%}<tr class='{{ loop.cycle('odd', 'even') }}'><td>{{ r.id }}</td><td>{{ r.name }}</td>"
    "<td>{{ r.region|title }}</td><td>{{ '%%.2f'|format(r.revenue) }}</td><td>{{ '%%+.1f%%%%'|format(r.growth * 100) }}</td></tr>"
    "{%% endfor %%}</table></body></html>")


async def hello(request):
    return web.Response(body=HELLO, content_type="text/plain")


async def dashboard(request):
    return web.Response(text=page.render(rows=rows), content_type="text/html")


app = web.Application()
app.router.add_get("/", hello)  # the readiness check
app.router.add_get("/hello", hello)
app.router.add_get("/page", dashboard)
web.run_app(app, host="127.0.0.1", port=int(os.environ["CDSW_APP_PORT"]), access_log=None, print=None)
""" % HELLO
PAGES = ("page", "hello")


async def load(http: aiohttp.ClientSession, name: str, url: str, headers: dict[str, str], expected: bytes,
               concurrency: int, seconds: float) -> Round:
    latencies: list[float] = []
    clock = time.perf_counter
    completed = 0
    deadline = clock() + seconds

    async def worker() -> None:
        nonlocal completed
        while clock() < deadline:
            sent = clock()
            async with http.get(url, headers=headers) as resp:
                body = await resp.read()
                status = resp.status
            done = clock()
            if status != 200 or body != expected:
                raise BenchError(f"{name}: HTTP {status}: {body[:500]!r}")
            latencies.append(done - sent)
            if done <= deadline:
                completed += 1

    tasks = [asyncio.ensure_future(worker()) for _ in range(concurrency)]
    try:
        await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()
    return Round(name, completed, seconds, latencies)


async def measure(h: Harness, args: argparse.Namespace) -> list[Round]:
    rounds: list[Round] = []
    async with h.client(limit=args.concurrency * 2) as http:
        api = await h.connect(http)
        project = await api.create_project("bench app proxy")
        form = aiohttp.FormData()
        form.add_field("app.py", APP_SCRIPT.encode(), filename="app.py", content_type="text/x-python")
        async with http.post(f"{api.base}/api/v2/projects/{project}/files", data=form, headers=api.headers) as resp:
            if resp.status != 200:
                raise BenchError(f"upload: HTTP {resp.status}: {(await resp.text())[:1000]}")
        env = {"PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
        app = await api.call("POST", f"/api/v2/projects/{project}/applications",
                             {"name": "bench app", "subdomain": "benchapp", "script": "app.py", "environment": env})
        app_path = f"/api/v2/projects/{project}/applications/{app['id']}"
        try:
            t0 = time.perf_counter()
            while True:
                body = await api.call("GET", app_path)
                if body["status"] == "APPLICATION_RUNNING":
                    break
                if time.perf_counter() - t0 > 60:
                    logs = await api.call("GET", app_path + "/logs", ok=(200, 404))
                    raise BenchError(f"the application is still {body['status']} after 60 s; logs: {logs!r:.1500}")
                await asyncio.sleep(0.1)
            print(f"application running after {time.perf_counter() - t0:.2f} s")
            conn = await asyncpg.connect(h.dsn)
            try:
                app_port = await conn.fetchval(
                    "SELECT app_port FROM workloads WHERE kind='application' ORDER BY id DESC LIMIT 1")
            finally:
                await conn.close()
            async with http.get(f"http://127.0.0.1:{app_port}/page") as resp:
                expected = {"page": await resp.read(), "hello": HELLO}
            print(f"app port {app_port}; /page is {len(expected['page'])} bytes; {args.rounds} rounds per target "
                  f"and page of {args.seconds:g} s, concurrency {args.concurrency}, interleaved A B B A...")
            order = ["appliance", "direct"]
            bases = {"appliance": (f"http://127.0.0.1:{h.apps_port}/apps/benchapp/", api.headers), "direct": (f"http://127.0.0.1:{app_port}/", {})}
            server_pid = h.server.proc.pid  # type: ignore[union-attr]
            for page in PAGES:
                for name in order:  # warm-up, and a check that both answer
                    await load(http, name, bases[name][0] + page, bases[name][1], expected[page], args.concurrency, 0.5)
                print(f"{'#':>3}  {'target':<15}  {'req/s':>8}  {'p50 ms':>7}  {'p99 ms':>7}  {'appl. CPU ms/req':>16}")
                for i in range(args.rounds):
                    for name in order if i % 2 == 0 else order[::-1]:
                        cpu0 = cpu_seconds(server_pid)
                        r = await load(http, f"{name} /{page}", bases[name][0] + page, bases[name][1], expected[page],
                                       args.concurrency, args.seconds)
                        cpu1 = cpu_seconds(server_pid)
                        if cpu0 is not None and cpu1 is not None:
                            r.cpu_seconds = cpu1 - cpu0
                        rounds.append(r)
                        cpu = r.cpu_ms_per_request
                        print(f"{i + 1:>3}  {r.target:<15}  {r.rps:>8.0f}  {r.percentile(0.5):>7.2f}  "
                              f"{r.percentile(0.99):>7.2f}  {'-' if cpu is None else f'{cpu:.3f}':>16}", flush=True)
        finally:
            try:
                await api.call("POST", app_path + ":stop", ok=(200, 400))
            except BenchError as exc:
                h.problems.append(f"stopping the application: {exc}")
    return rounds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="rounds per target, interleaved (5)")
    parser.add_argument("--seconds", type=float, default=2.0, help="seconds per round (2)")
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight (32)")
    args = parser.parse_args()
    install_signal_handlers()
    h = Harness("app-proxy")
    rounds: list[Round] = []
    try:
        h.database()
        h.appliance()
        print(f"database:  {h.where}; dropped at the end")
        print("appliance: python -m cml_appliance serve, CML_LOG_LEVEL=WARNING; GET /apps/benchapp/<page> with a Bearer key")
        print("direct:    GET http://127.0.0.1:<app port>/<page> (the same aiohttp app, no proxy)")
        rounds = run_async(measure(h, args))
    finally:
        h.close()
    print()
    print(f"{'target':<15}  {'median req/s':>12}  {'p50 ms':>7}  {'p99 ms':>7}")
    rps: dict[str, float] = {}
    for page in PAGES:
        for name in ("appliance", "direct"):
            label = f"{name} /{page}"
            rs = [r for r in rounds if r.target == label]
            lat = Round(label, 0, 1, [x for r in rs for x in r.latencies])
            rps[label] = median([r.rps for r in rs])
            print(f"{label:<15}  {rps[label]:>12.0f}  {lat.percentile(0.5):>7.2f}  {lat.percentile(0.99):>7.2f}")
    hello = rps["appliance /hello"] / rps["direct /hello"]
    ratio = rps["appliance /page"] / rps["direct /page"]
    print(f"/hello (the proxy's ceiling, for information): appliance/direct req/s {hello:.2f}")
    print(f"target: /page appliance/direct req/s {TARGET:g} or more: {'met' if ratio >= TARGET else 'NOT met'}; "
          f"total time {h.elapsed():.0f} s")
    print(f"ratio: {ratio:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    run_main(main)
