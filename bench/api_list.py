#!/usr/bin/env python3
"""Benchmark: GET /api/v2/projects?page_size=10 on the appliance against a bare aiohttp handler.

With N projects (default 1,000) seeded in a fresh database, the load generator (this process)
drives both servers at the same concurrency (default 32), in interleaved rounds
(appliance, bare, bare, appliance, appliance, bare, ...) so that machine noise hits both alike,
and reports requests/s, p50 and p99 for each: the medians over the rounds, with each server
process's CPU time per request (read from /proc; steadier than requests/s on a busy machine).
The last line is `ratio: X`: the appliance's median requests/s over the bare handler's. The
target is at least 0.8. The per-round ratios and their median are printed just above it.

- Appliance: the real `python -m cml_appliance serve` (uvloop) in its own process, with
  CML_LOG_LEVEL=WARNING.
- Bare: `python bench/api_list.py --bare-server PORT DSN` in its own process: a minimal aiohttp
  app on uvloop with an asyncpg pool of the appliance's size, whose one handler runs the SQL the
  appliance runs for this request (API key by digest, its user by id, one page of projects) and
  json.dumps a response of the same shape. The SQL text is not copied: it is captured by calling
  the appliance's own functions (api_keys.check, users.get_by_id, store.list_visible) on a
  recording stand-in for the pool, so it cannot drift. Before measuring, one response from each
  server is compared: the project lists must be identical.
- Database: DATABASE_URL's server if set, else an embedded pgserver; either way a fresh
  database cml_bench_<random>, migrated with cml_appliance.db.migrate and dropped at the end.

Usage: /tmp/venv/bin/python bench/api_list.py [--duration S] [--rounds N] [--concurrency C]
       [--projects N] [--warmup S]        (defaults: 2 s x 12 rounds, 32, 1000, 2 s: about 60 s)
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import hmac
import json
import math
import os
import random
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlsplit, urlunsplit

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # benchmark the working tree, whatever is installed

import aiohttp
import asyncpg
from aiohttp import web

from cml_appliance.api.listing import parse_list_query
from cml_appliance.auth import api_keys, users
from cml_appliance.core.ids import new_public_id, slugify
from cml_appliance.core.settings import load_settings, redact_dsn
from cml_appliance.db import migrate
from cml_appliance.db.pool import create_pool
from cml_appliance.projects import store

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is a dependency of the appliance
    uvloop = None  # type: ignore[assignment]

PAGE_SIZE = 10
LIST_PATH = "/api/v2/projects"
QUERY = f"?page_size={PAGE_SIZE}"


def run_main(main: Callable[[], int]) -> NoReturn:
    """Every benchmark's entry point: a BenchError is a readable failure with exit code 1."""
    try:
        sys.exit(main())
    except BenchError as exc:
        print(f"{Path(sys.argv[0]).name}: FAILED: {exc}", file=sys.stderr)
        sys.exit(1)


class BenchError(Exception):
    """The benchmark cannot give a meaningful figure (a bad response, a server that died...)."""


# --------------------------------------------------------------------------------------------
# The SQL the appliance runs for GET /api/v2/projects?page_size=10 with a Bearer key, captured
# from the appliance's own code.


class _Recorder:
    """Stands in for an asyncpg pool: records each query and answers 'nothing found'."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []

    async def fetchrow(self, query: str, *args: Any) -> None:
        self.calls.append((query, args))

    async def fetch(self, query: str, *args: Any) -> list[Any]:
        self.calls.append((query, args))
        return []


@dataclass(frozen=True)
class RequestSql:
    key_by_digest: str  # $1 = sha256 hex of the key
    user_by_id: str  # $1 = the key's user_id
    project_page: str  # $1 user id, $2 is_admin, $3 page_size + 1, $4 offset


def capture_sql(page_size: int = PAGE_SIZE) -> RequestSql:
    async def capture() -> RequestSql:
        rec = _Recorder()
        await api_keys.check(rec, "not-a-key", "API")  # type: ignore[arg-type]
        await users.get_by_id(rec, 1)  # type: ignore[arg-type]
        user = users.User(1, "bench", "bench@example.com", "Bench", False, True, datetime.now(UTC))
        q = parse_list_query(
            {"page_size": str(page_size)},
            secret="x" * 32,
            scope=LIST_PATH,
            filter_keys=store.FILTER_KEYS,
            sort_keys=store.SORT_KEYS,
        )
        # The handler's defaults: include_public_projects and include_all_projects absent.
        await store.list_visible(rec, user, q, include_public=False, include_all=False)  # type: ignore[arg-type]
        (key_sql, _), (user_sql, _), (list_sql, list_args) = rec.calls
        if list(list_args) != [1, False, page_size + 1, 0]:
            raise BenchError(f"store.list_visible now takes other parameters {list_args!r}: update the bare handler")
        return RequestSql(key_sql, user_sql, list_sql)

    return asyncio.run(capture())


# --------------------------------------------------------------------------------------------
# The bare server (its own process).

BARE_POOL = web.AppKey("pool", asyncpg.Pool)
_PERMS = ("read", "operator", "write", "admin")


def _rfc3339(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"


def _bare_project(row: asyncpg.Record) -> dict[str, Any]:
    level = _PERMS.index(row["role"]) + 1 if row["role"] in _PERMS else 0
    data = {
        "id": row["public_id"],
        "name": row["name"],
        "owner": {"username": row["ow_username"], "name": row["ow_name"], "email": row["ow_email"]},
        "creator": {"username": row["cr_username"], "name": row["cr_name"], "email": row["cr_email"]},
        "description": row["description"],
        "visibility": row["visibility"],
        "default_engine_type": row["default_engine_type"],
        "created_at": _rfc3339(row["created_at"]),
        "updated_at": _rfc3339(row["updated_at"]),
        "creation_status": row["creation_status"],
        "permissions": {
            "read": level >= 1, "operator": level >= 2, "write": level >= 3, "admin": level >= 4,
            "business_user": False, "inherit": False,
        },
        "shared_memory_limit": row["shared_memory_limit"],
        "environment": json.dumps(row["environment"]),
        "ephemeral_storage_request": row["ephemeral_storage_request"],
        "ephemeral_storage_limit": row["ephemeral_storage_limit"],
        "slug": row["slug"],
    }
    if row["creation_message"]:
        data["creation_message"] = row["creation_message"]
    return data


def bare_app(dsn: str, pool_min: int, pool_max: int) -> web.Application:
    sql = capture_sql()
    token_secret = secrets.token_bytes(32)

    def unauthorized(message: str) -> web.Response:
        return web.json_response({"error": message, "code": 16, "message": message, "details": []}, status=401)

    async def list_projects(request: web.Request) -> web.Response:
        pool = request.app[BARE_POOL]
        scheme, _, secret = request.headers.get("Authorization", "").partition(" ")
        secret = secret.strip()
        if scheme.lower() != "bearer" or not secret:
            return unauthorized("no API key")
        key = await pool.fetchrow(sql.key_by_digest, hashlib.sha256(secret.encode()).hexdigest())
        if key is None:
            return unauthorized("API key is not valid")
        user = await pool.fetchrow(sql.user_by_id, key["user_id"])
        if (
            user is None
            or not user["is_active"]
            or (key["expires_at"] is not None and key["expires_at"] <= datetime.now(UTC))
            or "API" not in key["audiences"]
        ):
            return unauthorized("API key is not valid")
        page_size = int(request.query.get("page_size") or PAGE_SIZE)
        rows = await pool.fetch(sql.project_page, user["id"], user["is_admin"], page_size + 1, 0)
        token = ""
        if len(rows) > page_size:
            payload = base64.urlsafe_b64encode(json.dumps({"o": page_size, "f": "0" * 16}).encode()).decode().rstrip("=")
            token = payload + "." + hmac.new(token_secret, payload.encode(), hashlib.sha256).hexdigest()[:32]
        body = {"projects": [_bare_project(r) for r in rows[:page_size]], "next_page_token": token}
        return web.Response(text=json.dumps(body), content_type="application/json")

    async def readyz(request: web.Request) -> web.Response:
        await request.app[BARE_POOL].fetchval("SELECT 1")
        return web.json_response({"status": "ready"})

    async def database(app: web.Application) -> Any:
        # The appliance's own create_pool: same size and the same per-connection set-up (jsonb codec).
        app[BARE_POOL] = await create_pool(dsn, pool_min, pool_max)
        yield
        await app[BARE_POOL].close()

    app = web.Application()
    app.cleanup_ctx.append(database)
    app.router.add_get(LIST_PATH, list_projects)
    app.router.add_get("/readyz", readyz)
    return app


def serve_bare(port: int, dsn: str, pool_min: int, pool_max: int) -> None:
    web.run_app(
        bare_app(dsn, pool_min, pool_max),
        host="127.0.0.1",
        port=port,
        print=None,
        access_log=None,
        shutdown_timeout=5,
        loop=uvloop.new_event_loop() if uvloop else None,
    )


# --------------------------------------------------------------------------------------------
# Database: a fresh one on DATABASE_URL's server or on an embedded pgserver.


def _with_database(dsn: str, name: str) -> str:
    return urlunsplit(urlsplit(dsn)._replace(path="/" + name))


async def create_database(server_dsn: str, name: str) -> None:
    conn = await asyncpg.connect(server_dsn)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


async def drop_database(server_dsn: str, name: str) -> None:
    conn = await asyncpg.connect(server_dsn)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


async def seed(dsn: str, projects: int) -> str:
    """Migrate, create a user, an API key and the projects; return the key."""
    conn = await asyncpg.connect(dsn)
    try:
        await migrate.migrate(conn)
    finally:
        await conn.close()
    pool = await create_pool(dsn, 1, 2)
    try:
        user = await users.create_user(
            pool, "bench", "bench@example.com", secrets.token_urlsafe(16), name="Bench User"
        )
        secret, _ = await api_keys.create(pool, user, comments="bench/api_list.py")
        rng = random.Random(20261128)
        now = datetime.now(UTC)
        rows = []
        for i in range(projects):
            created = now - timedelta(days=rng.uniform(1, 400))
            updated = created + (now - created) * rng.random()  # varied: the page is the 10 latest
            name = f"Bench project {i:04d}"
            env = {"MODEL_VERSION": f"v{i % 7}", "REGION": "eu-west-1"} if i % 3 == 0 else {}
            rows.append((
                new_public_id(), name, slugify(name), user.id, user.id,
                f"Project {i} of the list benchmark", rng.choice(("private", "private", "public")),
                env, created, updated,
            ))
        await pool.executemany(
            "INSERT INTO projects (public_id, name, slug, owner_id, creator_id, description, visibility,"
            " environment, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
            rows,
        )
        await pool.execute("ANALYZE")
    finally:
        await pool.close()
    return secret


# --------------------------------------------------------------------------------------------
# Server processes.


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    name: str
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{LIST_PATH}{QUERY}"

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def spawn(name: str, cmd: list[str], env: dict[str, str], port: int, workdir: Path) -> Server:
    log_path = workdir / f"{name}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd, env=env, cwd=REPO, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, killed as a whole
        )
    return Server(name, proc, port, log_path)


def stop(server: Server) -> None:
    if server.proc.poll() is None:
        try:
            os.killpg(server.proc.pid, signal.SIGTERM)
            server.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(server.proc.pid, signal.SIGKILL)
            server.proc.wait(timeout=5)
        except ProcessLookupError:
            pass
    # Anything left in the group (there should be nothing).
    try:
        os.killpg(server.proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


async def wait_ready(session: aiohttp.ClientSession, server: Server, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise BenchError(f"the {server.name} server exited with {server.proc.returncode}:\n{server.log_tail()}")
        try:
            async with session.get(f"http://127.0.0.1:{server.port}/readyz") as resp:
                if resp.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.1)
    raise BenchError(f"the {server.name} server was not ready after {timeout:.0f} s:\n{server.log_tail()}")


# --------------------------------------------------------------------------------------------
# Load generation.


@dataclass
class Round:
    target: str
    requests: int
    seconds: float
    latencies: list[float] = field(repr=False)
    cpu_seconds: float | None = None  # the server process's user + system CPU time during the round
    load_cpu_seconds: float = 0.0  # the load generator's (this process's) CPU time during the round

    @property
    def cpu_ms_per_request(self) -> float | None:
        if self.cpu_seconds is None or not self.latencies:
            return None
        return self.cpu_seconds * 1000 / len(self.latencies)

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    def percentile(self, q: float) -> float:
        """Nearest-rank percentile, in milliseconds."""
        ordered = sorted(self.latencies)
        return ordered[max(0, math.ceil(q * len(ordered)) - 1)] * 1000


_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process (Linux /proc), or None where unavailable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / _TICK


def check_response(target: str, status: int, body: bytes, expected: int, more: bool) -> dict[str, Any]:
    if status != 200:
        raise BenchError(f"{target}: HTTP {status}: {body[:500]!r}")
    try:
        data = json.loads(body)
        count = len(data["projects"])
        token = data["next_page_token"]
    except (ValueError, KeyError, TypeError) as exc:
        raise BenchError(f"{target}: not a project list ({exc}): {body[:500]!r}") from None
    if count != expected or bool(token) != more:
        raise BenchError(f"{target}: {count} projects, next_page_token {token!r}; expected {expected} and more={more}")
    return data


async def load(
    session: aiohttp.ClientSession, server: Server, headers: dict[str, str], concurrency: int,
    seconds: float, expected: int, more: bool,
) -> Round:
    """Keep `concurrency` requests in flight for `seconds`. Throughput counts the requests completed
    by the deadline over `seconds`; the latencies of those still in flight then are kept too."""
    latencies: list[float] = []
    clock = time.perf_counter
    completed = 0
    started = clock()
    deadline = started + seconds

    async def worker() -> None:
        nonlocal completed
        while clock() < deadline:
            sent = clock()
            async with session.get(server.url, headers=headers) as resp:
                body = await resp.read()
                status = resp.status
            done = clock()
            latencies.append(done - sent)
            if done <= deadline:
                completed += 1
            check_response(server.name, status, body, expected, more)

    tasks = [asyncio.ensure_future(worker()) for _ in range(concurrency)]
    try:
        await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()
    return Round(server.name, completed, seconds, latencies)


def _median(values: list[float]) -> float:
    return statistics.median(values)


async def measure(
    servers: list[Server], secret: str, args: argparse.Namespace, on_round: Callable[[int, Round], None]
) -> list[Round]:
    headers = {"Authorization": f"Bearer {secret}"}
    expected, more = min(PAGE_SIZE, args.projects), args.projects > PAGE_SIZE
    timeout = aiohttp.ClientTimeout(total=60)
    sessions = {
        s.name: aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=args.concurrency), timeout=timeout)
        for s in servers
    }
    try:
        for s in servers:
            await wait_ready(sessions[s.name], s)
        # Same work, same shape: the two servers must return the same projects.
        pages = []
        for s in servers:
            async with sessions[s.name].get(s.url, headers=headers) as resp:
                pages.append(check_response(s.name, resp.status, await resp.read(), expected, more)["projects"])
        if pages[0] != pages[1]:
            raise BenchError(
                "the bare handler's projects differ from the appliance's:\n"
                f"  appliance: {json.dumps(pages[0][:1])}\n  bare:      {json.dumps(pages[1][:1])}"
            )
        # Warm-up: open the client's and the pools' connections, fill asyncpg's statement caches.
        for s in servers:
            if args.warmup > 0:
                await load(sessions[s.name], s, headers, args.concurrency, args.warmup, expected, more)
        rounds: list[Round] = []
        for i in range(args.rounds):
            # ABBA order: A B, B A, A B... so a drift in machine speed favours neither; short rounds
            # so that bursts of noise from elsewhere hit both targets.
            order = servers if i % 2 == 0 else servers[::-1]
            for s in order:
                cpu_before, load_before = cpu_seconds(s.proc.pid), time.process_time()
                r = await load(sessions[s.name], s, headers, args.concurrency, args.duration, expected, more)
                cpu_after, r.load_cpu_seconds = cpu_seconds(s.proc.pid), time.process_time() - load_before
                if cpu_before is not None and cpu_after is not None:
                    r.cpu_seconds = cpu_after - cpu_before
                rounds.append(r)
                on_round(i + 1, r)
                if s.proc.poll() is not None:
                    raise BenchError(f"the {s.name} server exited:\n{s.log_tail()}")
        return rounds
    finally:
        for session in sessions.values():
            await session.close()


def run_async(coro: Awaitable[Any]) -> Any:
    if uvloop is not None:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(coro)  # type: ignore[arg-type]
    return asyncio.run(coro)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------


def _raise_exit(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # so that the finally blocks clean up


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=2.0, help="measured seconds per round and target (2)")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds per target before the rounds (2)")
    parser.add_argument("--rounds", type=int, default=12, help="rounds per target, interleaved (12)")
    parser.add_argument("--concurrency", type=int, default=32, help="concurrent requests (32)")
    parser.add_argument("--projects", type=int, default=1000, help="projects to seed (1000)")
    parser.add_argument("--bare-server", nargs=2, metavar=("PORT", "DSN"), help=argparse.SUPPRESS)
    parser.add_argument("--pool-min", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--pool-max", type=int, default=10, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.bare_server:
        serve_bare(int(args.bare_server[0]), args.bare_server[1], args.pool_min, args.pool_max)
        return 0
    if args.rounds < 1 or args.duration <= 0 or args.concurrency < 1 or args.projects < 1:
        parser.error("--rounds, --duration, --concurrency and --projects must be positive")

    signal.signal(signal.SIGTERM, _raise_exit)
    signal.signal(signal.SIGHUP, _raise_exit)
    began = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="cml-bench-"))
    pg = None
    server_dsn = os.environ.get("DATABASE_URL", "")
    db_name = f"cml_bench_{secrets.token_hex(5)}"
    db_created = False
    servers: list[Server] = []
    rounds: list[Round] = []
    problems: list[str] = []
    out = sys.stdout
    try:
        if server_dsn:
            where = f"{redact_dsn(_with_database(server_dsn, db_name))} (server from DATABASE_URL)"
        else:
            import pgserver

            pg = pgserver.get_server(workdir / "pgdata", cleanup_mode="delete")
            server_dsn = pg.get_uri()
            where = f"{db_name} on an embedded pgserver in {workdir / 'pgdata'}"
        run_async(create_database(server_dsn, db_name))
        db_created = True
        dsn = _with_database(server_dsn, db_name)
        seeded = time.monotonic()
        secret = run_async(seed(dsn, args.projects))
        seed_seconds = time.monotonic() - seeded

        env = dict(os.environ)
        env.update(
            CML_DATABASE_URL=dsn,
            CML_DATA_DIR=str(workdir / "data"),
            CML_HOST="127.0.0.1",
            CML_PORT=str(free_port()),
            CML_APPS_PORT="0",
            CML_GRPC_PORT="0",
            CML_LOG_LEVEL="WARNING",
            PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")])),
        )
        # The appliance's settings under this environment: the bare pool gets the same size.
        settings = load_settings(environ=env)
        servers.append(spawn("appliance", [sys.executable, "-m", "cml_appliance", "serve"], env,
                             settings.port, workdir))
        bare_port = free_port()
        servers.append(spawn(
            "bare",
            [sys.executable, str(Path(__file__).resolve()), "--bare-server", str(bare_port), dsn,
             "--pool-min", str(settings.database_pool_min), "--pool-max", str(settings.database_pool_max)],
            env, bare_port, workdir,
        ))

        print(f"GET {LIST_PATH}{QUERY}: {args.projects} projects, concurrency {args.concurrency}, "
              f"{args.rounds} rounds x {args.duration:g} s per target after {args.warmup:g} s of warm-up each, "
              f"interleaved A B B A A B...", file=out)
        print(f"database:  {where}; seeded in {seed_seconds:.1f} s; dropped at the end", file=out)
        print(f"appliance: python -m cml_appliance serve (uvloop), pool {settings.database_pool_min}.."
              f"{settings.database_pool_max}, CML_LOG_LEVEL=WARNING: the access log lines (INFO on "
              f"cml_appliance.access) are not emitted; metrics are still recorded", file=out)
        print(f"bare:      aiohttp + uvloop, asyncpg pool {settings.database_pool_min}..{settings.database_pool_max} "
              f"(same create_pool), the same 3 queries (API key by digest, user by id, project page; SQL "
              f"captured from the appliance's code), json.dumps of the same shape", file=out)
        print(f"load:      this process, aiohttp client on {'uvloop' if uvloop else 'asyncio'}, "
              f"{args.concurrency} workers, keep-alive; it shares the machine's {os.cpu_count()} CPU(s) with both "
              f"servers and Postgres, so the figures are lower bounds for either server", file=out)
        print(file=out)
        print(f"{'round':>5}  {'target':<9}  {'requests':>8}  {'req/s':>8}  {'p50 ms':>7}  {'p99 ms':>7}  "
              f"{'CPU ms/req':>10}", file=out)

        def on_round(i: int, r: Round) -> None:
            cpu = r.cpu_ms_per_request
            print(f"{i:>5}  {r.target:<9}  {r.requests:>8}  {r.rps:>8.1f}  {r.percentile(0.50):>7.2f}  "
                  f"{r.percentile(0.99):>7.2f}  {'n/a' if cpu is None else f'{cpu:.2f}':>10}", file=out, flush=True)

        rounds = run_async(measure(servers, secret, args, on_round))
    finally:
        for s in servers:
            try:
                stop(s)
            except Exception as exc:  # noqa: BLE001 - keep cleaning up
                problems.append(f"could not stop the {s.name} server (pid {s.proc.pid}): {exc}")
        if db_created:
            try:
                run_async(drop_database(server_dsn, db_name))
            except Exception as exc:  # noqa: BLE001
                problems.append(f"could not drop database {db_name}: {exc}")
        if pg is not None:
            try:
                pg.cleanup()
            except Exception as exc:  # noqa: BLE001
                problems.append(f"could not stop the embedded Postgres: {exc}")
        shutil.rmtree(workdir, ignore_errors=True)
        for p in problems:
            print(f"warning: {p}", file=sys.stderr)

    by_target = {s.name: [r for r in rounds if r.target == s.name] for s in servers}
    summary = {
        name: (
            _median([r.rps for r in rs]),
            _median([r.percentile(0.50) for r in rs]),
            _median([r.percentile(0.99) for r in rs]),
            _median(cpus) if (cpus := [c for r in rs if (c := r.cpu_ms_per_request) is not None]) else None,
        )
        for name, rs in by_target.items()
    }
    print(file=out)
    print(f"median of {args.rounds} rounds:", file=out)
    print(f"{'target':<9}  {'req/s':>8}  {'p50 ms':>7}  {'p99 ms':>7}  {'CPU ms/req':>10}", file=out)
    for name, (rps, p50, p99, cpu) in summary.items():
        print(f"{name:<9}  {rps:>8.1f}  {p50:>7.2f}  {p99:>7.2f}  {'n/a' if cpu is None else f'{cpu:.2f}':>10}",
              file=out)
    load_cpu = _median([r.load_cpu_seconds * 1000 / len(r.latencies) for r in rounds if r.latencies])
    print(f"(CPU ms/req: the server process's own CPU time per request, Postgres and the load generator "
          f"excluded; steadier than req/s on a busy machine. The load generator used {load_cpu:.2f} ms "
          f"of CPU per request.)", file=out)
    pair_ratios = [a.rps / b.rps for a, b in zip(by_target["appliance"], by_target["bare"])]
    print(f"per-round ratios: {' '.join(f'{x:.2f}' for x in pair_ratios)} (median {_median(pair_ratios):.2f}); "
          f"total time {time.monotonic() - began:.0f} s", file=out)
    print(f"ratio: {summary['appliance'][0] / summary['bare'][0]:.2f}", file=out, flush=True)
    return 0


if __name__ == "__main__":
    run_main(main)
