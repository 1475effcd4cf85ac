"""Shared pieces of the session benchmarks (session_start_local.py, session_start_container.py,
terminal_roundtrip.py, session_memory.py).

The house pattern is bench/api_list.py's and its helpers are reused from there: a fresh database
on DATABASE_URL's server (else an embedded pgserver), migrated with cml_appliance.db.migrate; a
user and an API key made with the appliance's own functions; the real `python -m cml_appliance
serve` in its own process group with CML_* variables; everything undone in `finally`.

What is added here: an API client that fails loudly (the method, the path, the status and the
body), session start / wait / stop helpers that remember every session they started so that the
clean-up can stop it, a Podman service of our own for the container engine, and a last-resort
sweep of the processes and containers that carry this run's site id.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Self

REPO = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
for _path in (str(REPO), str(BENCH)):
    if _path not in sys.path:
        sys.path.insert(0, _path)  # benchmark the working tree, whatever is installed

import aiohttp
import asyncpg
from api_list import (
    BenchError,
    Server,
    _raise_exit,
    _with_database,
    create_database,
    drop_database,
    free_port,
    run_async,
    run_main,
    spawn,
    stop,
    uvloop,
    wait_ready,
)

from cml_appliance.auth import api_keys, users
from cml_appliance.core.settings import redact_dsn
from cml_appliance.db import migrate
from cml_appliance.db.pool import create_pool

__all__ = [
    "ACTIVE",
    "BUSYBOX_IMAGE",
    "FINISHED",
    "Api",
    "BenchError",
    "run_main",
    "Harness",
    "Podman",
    "Server",
    "StatusListener",
    "free_port",
    "install_signal_handlers",
    "interleaved",
    "marked_pids",
    "median",
    "parse_time",
    "percentile",
    "rss_kb",
    "run_async",
    "spawn",
    "stop",
    "uvloop",
    "wait_ready",
]

ACTIVE = ("ENGINE_SCHEDULING", "ENGINE_STARTING", "ENGINE_RUNNING", "ENGINE_STOPPING")
FINISHED = ("ENGINE_STOPPED", "ENGINE_SUCCEEDED", "ENGINE_FAILED", "ENGINE_TIMEDOUT")
BUSYBOX_IMAGE = "localhost/cml-test-busybox:1"
PODMAN_CONF = REPO / "config" / "podman" / "containers.conf"


# --------------------------------------------------------------------------------------------
# Small statistics.


def percentile(values: Iterable[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..1) of the values."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def interleaved(names: tuple[str, ...], rounds: int) -> Iterator[tuple[int, str]]:
    """(round, name) in the order the comparing benchmarks measure: round 0 warms every side up
    and is not counted; then the order alternates (a, b, b, a, ...), so that the machine's drift
    falls on both sides alike."""
    for i in range(rounds + 1):
        for name in names if i % 2 == 0 else names[::-1]:
            yield i, name


def median(values: Iterable[float | None]) -> float:
    """Median of the values that are not None; NaN when there are none."""
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else math.nan


def parse_time(text: str) -> float | None:
    """An RFC 3339 time of the API (ms, Z) as a Unix timestamp; None for ""."""
    if not text:
        return None
    return datetime.fromisoformat(text).timestamp()  # 3.11 reads the trailing Z


def rss_kb(pid: int) -> int:
    """VmRSS of a process, in kB (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise BenchError(f"no VmRSS in /proc/{pid}/status")


def marked_pids(site_id: str, variable: str = "CML_SITE_ID") -> list[int]:
    """Pids whose environment carries CML_SITE_ID=<site_id>: this run's workload processes (with
    variable="BENCH_SITE_ID": the bare baselines' processes, which the benchmarks mark so)."""
    marker = f"{variable}={site_id}".encode()
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = Path(entry.path, "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if marker in environ:
            found.append(int(entry.name))
    return found


def install_signal_handlers() -> None:
    signal.signal(signal.SIGTERM, _raise_exit)
    signal.signal(signal.SIGHUP, _raise_exit)


# --------------------------------------------------------------------------------------------
# The API client: every non-2xx answer is an error that shows the body.


@dataclass
class Api:
    base: str  # http://127.0.0.1:PORT
    secret: str
    server: Server
    http: aiohttp.ClientSession = field(repr=False)
    # Every session started here: (project id, session id); the clean-up stops those still active.
    started: list[tuple[str, str]] = field(default_factory=list)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.secret}"}

    def _fail(self, what: str) -> BenchError:
        alive = "" if self.server.proc.poll() is None else f" (the appliance exited with {self.server.proc.returncode})"
        return BenchError(f"{what}{alive}\n--- appliance log tail ---\n{self.server.log_tail()}")

    async def call(self, method: str, path: str, body: Any = None, *, ok: tuple[int, ...] = (200,)) -> Any:
        try:
            async with self.http.request(method, self.base + path, json=body, headers=self.headers) as resp:
                raw = await resp.read()
                status = resp.status
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise self._fail(f"{method} {path}: {type(exc).__name__}: {exc}") from None
        if status not in ok:
            raise self._fail(f"{method} {path}: HTTP {status}: {raw[:2000].decode(errors='replace')}")
        try:
            return json.loads(raw) if raw else None
        except ValueError:
            raise self._fail(f"{method} {path}: HTTP {status} but not JSON: {raw[:500]!r}") from None

    async def create_project(self, name: str) -> str:
        project = await self.call("POST", "/api/v2/projects", {"name": name})
        if project.get("creation_status") not in ("success", None):
            raise self._fail(f"project {name!r} was not created at once: {project}")
        return str(project["id"])

    def session_path(self, project_id: str, session_id: str = "") -> str:
        base = f"/api/v2/projects/{project_id}/sessions"
        return f"{base}/{session_id}" if session_id else base

    async def start_session(self, project_id: str, **fields: Any) -> dict[str, Any]:
        body = await self.call("POST", self.session_path(project_id), fields)
        if not isinstance(body, dict) or not body.get("id"):
            raise self._fail(f"POST {self.session_path(project_id)}: no session id in {body!r}")
        self.started.append((project_id, body["id"]))
        return body

    async def get_session(self, project_id: str, session_id: str) -> dict[str, Any]:
        return await self.call("GET", self.session_path(project_id, session_id))

    async def session_logs(self, project_id: str, session_id: str) -> str:
        try:
            body = await self.call("GET", self.session_path(project_id, session_id) + "/logs")
            return str(body.get("content", ""))
        except BenchError as exc:
            return f"(could not read the logs: {str(exc).splitlines()[0]})"

    async def wait_status(
        self, project_id: str, session_id: str, wanted: str | tuple[str, ...], *, timeout: float = 30,
        interval: float = 0.01,
    ) -> tuple[dict[str, Any], float]:
        """Poll GET until the status is one of `wanted`; returns (body, perf_counter when it was seen).

        Reaching a finished status that is not wanted is an error (with the reason and the logs).
        """
        wanted = (wanted,) if isinstance(wanted, str) else wanted
        deadline = time.perf_counter() + timeout
        body: dict[str, Any] = {}
        while True:
            body = await self.get_session(project_id, session_id)
            seen = time.perf_counter()
            status = body.get("status")
            if status in wanted:
                return body, seen
            if status in FINISHED:
                logs = await self.session_logs(project_id, session_id)
                raise self._fail(
                    f"session {session_id} ended {status} ({body.get('reason')!r}) while waiting for {wanted}; "
                    f"its logs: {logs[-1000:]!r}"
                )
            if seen > deadline:
                raise self._fail(f"session {session_id} still {status} after {timeout:g} s, waiting for {wanted}")
            await asyncio.sleep(interval)

    async def stop_session(self, project_id: str, session_id: str) -> dict[str, Any]:
        # 400 (FailedPrecondition): it has already ended; fine for a clean-up.
        return await self.call("POST", self.session_path(project_id, session_id) + ":stop", ok=(200, 400))

    async def stop_and_wait(self, project_id: str, session_id: str, *, timeout: float = 30) -> str:
        await self.stop_session(project_id, session_id)
        body, _ = await self.wait_status(project_id, session_id, FINISHED, timeout=timeout, interval=0.05)
        return str(body["status"])

    async def stop_all(self, *, timeout: float = 60) -> dict[str, str]:
        """Stop every session started here that is still active; wait for all to end.

        Returns session id -> final status. Raises if some did not end in time.
        """
        statuses: dict[str, str] = {}
        pending = []
        for project_id, session_id in self.started:
            body = await self.get_session(project_id, session_id)
            if body["status"] in FINISHED:
                statuses[session_id] = body["status"]
            else:
                await self.stop_session(project_id, session_id)
                pending.append((project_id, session_id))
        deadline = time.monotonic() + timeout
        while pending:
            still = []
            for project_id, session_id in pending:
                body = await self.get_session(project_id, session_id)
                if body["status"] in FINISHED:
                    statuses[session_id] = body["status"]
                else:
                    still.append((project_id, session_id))
            pending = still
            if pending and time.monotonic() > deadline:
                raise self._fail(f"{len(pending)} session(s) did not end within {timeout:g} s of being stopped: "
                                 f"{[s for _, s in pending][:10]}")
            if pending:
                await asyncio.sleep(0.1)
        return statuses


class StatusListener:
    """LISTEN on the appliance's status channel (cml_workloads, NOTIFY by a trigger on every status
    change) from this process: when each (session, status) was announced, on perf_counter's clock.
    It costs the appliance nothing, unlike polling."""

    CHANNEL = "cml_workloads"

    def __init__(self, dsn: str):
        self.dsn = dsn
        self.conn: asyncpg.Connection | None = None
        self.seen: dict[tuple[str, str], float] = {}

    def _notified(self, conn: Any, pid: int, channel: str, payload: str) -> None:
        now = time.perf_counter()
        try:
            event = json.loads(payload)
            self.seen.setdefault((str(event["id"]), str(event["status"])), now)
        except (ValueError, KeyError, TypeError):
            pass

    async def __aenter__(self) -> Self:
        self.conn = await asyncpg.connect(self.dsn)
        await self.conn.add_listener(self.CHANNEL, self._notified)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.conn is not None:
            await self.conn.close()

    def at(self, session_id: str, status: str) -> float | None:
        return self.seen.get((session_id, status))

    async def wait_for(self, session_id: str, status: str, timeout: float = 0.5) -> float | None:
        """When (session, status) was announced; waits a little for a NOTIFY still on its way
        (a poll can see the status first). None if it never came."""
        deadline = time.perf_counter() + timeout
        while (found := self.at(session_id, status)) is None and time.perf_counter() < deadline:
            await asyncio.sleep(0.005)
        return found


# --------------------------------------------------------------------------------------------
# Podman: a service of our own on a socket in the work directory.


class Podman:
    def __init__(self, workdir: Path):
        self.dir = workdir / "podman"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.socket = self.dir / "podman.sock"
        self.env = dict(os.environ)
        self.env.setdefault("CONTAINERS_CONF", str(PODMAN_CONF))
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.dir / "service.log"

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def run(self, *args: str, check: bool = True, timeout: float = 60, **kw: Any) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(["podman", *args], check=False, env=self.env, capture_output=True, text=True, timeout=timeout, **kw)
        if check and result.returncode != 0:
            raise BenchError(f"podman {' '.join(args)} failed ({result.returncode}): {result.stderr.strip()[-1500:]}")
        return result

    def start(self, timeout: float = 20) -> None:
        if shutil.which("podman") is None:
            raise BenchError("podman is not installed")
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                ["podman", "system", "service", "--time=0", self.url],
                env=self.env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while not self.socket.exists():
            if self.proc.poll() is not None:
                raise BenchError(f"podman system service exited with {self.proc.returncode}: {self.log_tail()}")
            if time.monotonic() > deadline:
                raise BenchError(f"podman system service made no socket in {timeout:g} s: {self.log_tail()}")
            time.sleep(0.05)

    def log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-1500:]
        except OSError:
            return ""

    def ensure_image(self, image: str = BUSYBOX_IMAGE) -> str:
        """The test image, made from /bin/busybox with podman import when missing (as tests/conftest.py does)."""
        if self.run("image", "exists", image, check=False).returncode == 0:
            return "present"
        busybox = shutil.which("busybox")
        if busybox is None:
            raise BenchError(f"{image} is missing and there is no busybox binary to build it from")
        root = Path(tempfile.mkdtemp(prefix="cml-busybox-"))
        try:
            for sub in ("bin", "etc", "tmp", "home/cdsw"):
                (root / sub).mkdir(parents=True)
            shutil.copy(busybox, root / "bin" / "busybox")
            applets = subprocess.run([busybox, "--list"], capture_output=True, text=True, check=True).stdout.split()
            for applet in applets:
                if applet != "busybox":
                    (root / "bin" / applet).symlink_to("busybox")
            (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
            (root / "tmp").chmod(0o1777)
            tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
            assert tar.stdout is not None
            self.run("import", "--change", "ENV PATH=/bin", "--change", 'CMD ["/bin/sh"]', "-", image, stdin=tar.stdout)
            tar.wait()
        finally:
            shutil.rmtree(root, ignore_errors=True)
        return "built with podman import"

    def remove_labelled(self, label: str) -> int:
        """Remove every container (running or not) with this label; returns how many."""
        ids = self.run("ps", "-aq", "--filter", f"label={label}", check=False).stdout.split()
        if ids:
            self.run("rm", "-f", "-t", "0", *ids, check=False)
        return len(ids)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)
            except ProcessLookupError:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


# --------------------------------------------------------------------------------------------
# The harness: database, appliance process, clean-up.


class Harness:
    """One benchmark run's resources, set up step by step and all released by close()."""

    def __init__(self, name: str):
        self.name = name
        self.began = time.monotonic()
        self.workdir = Path(tempfile.mkdtemp(prefix=f"cml-bench-{name}-"))
        self.pg: Any = None
        self.server_dsn = os.environ.get("DATABASE_URL", "")
        self.db_name = f"cml_bench_{secrets.token_hex(5)}"
        self.db_created = False
        self.dsn = ""
        self.where = ""
        self.site_id = ""
        self.secret = ""
        self.server: Server | None = None
        self.apps_port = 0
        self.podman: Podman | None = None
        # Containers with any of these labels are removed at the end (set once the site id is known).
        self.container_labels: list[str] = []
        self.problems: list[str] = []

    # Database ----------------------------------------------------------------------------

    def database(self, runtimes: Iterable[Mapping[str, str]] = ()) -> str:
        """Create and migrate a fresh database, a user and an API key; extra runtimes rows."""
        if self.server_dsn:
            self.where = f"{redact_dsn(_with_database(self.server_dsn, self.db_name))} (server from DATABASE_URL)"
        else:
            import pgserver

            self.pg = pgserver.get_server(self.workdir / "pgdata", cleanup_mode="delete")
            self.server_dsn = self.pg.get_uri()
            self.where = f"{self.db_name} on an embedded pgserver in {self.workdir / 'pgdata'}"
        run_async(create_database(self.server_dsn, self.db_name))
        self.db_created = True
        self.dsn = _with_database(self.server_dsn, self.db_name)
        self.secret, self.site_id = run_async(self._seed(list(runtimes)))
        # cml.site: the appliance's containers; cml.bench.site: a benchmark's bare ones.
        self.container_labels += [f"cml.site={self.site_id}", f"cml.bench.site={self.site_id}"]
        return self.dsn

    async def _seed(self, runtimes: list[Mapping[str, str]]) -> tuple[str, str]:
        conn = await asyncpg.connect(self.dsn)
        try:
            await migrate.migrate(conn)
            for rt in runtimes:
                await conn.execute(
                    "INSERT INTO runtimes (image_identifier, editor, kernel, edition, full_version) VALUES ($1, $2, $3, $4, $5)",
                    rt["image_identifier"], rt["editor"], rt["kernel"], rt["edition"], rt["full_version"],
                )
            site_id = str(await conn.fetchval("SELECT site_id FROM site"))
        finally:
            await conn.close()
        pool = await create_pool(self.dsn, 1, 2)
        try:
            user = await users.create_user(pool, "bench", "bench@example.com", secrets.token_urlsafe(16), name="Bench User")
            secret, _ = await api_keys.create(pool, user, comments=f"bench/{self.name}")
        finally:
            await pool.close()
        return secret, site_id

    # Appliance ---------------------------------------------------------------------------

    def appliance(self, cmd: list[str] | None = None, **extra_env: str) -> Server:
        """Start the appliance (`python -m cml_appliance serve` unless `cmd` says otherwise)."""
        port = free_port()
        self.apps_port = free_port()  # the applications' own listener (applications/origin.py)
        env = dict(os.environ)
        env.update(
            CML_DATABASE_URL=self.dsn,
            CML_DATA_DIR=str(self.workdir / "data"),
            CML_HOST="127.0.0.1",
            CML_PORT=str(port),
            CML_APPS_PORT=str(self.apps_port),
            CML_GRPC_PORT="0",
            CML_EDITORS_PORT="0",
            CML_LOG_LEVEL="WARNING",
            PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")])),
        )
        env.update(extra_env)
        self.server = spawn("appliance", cmd or [sys.executable, "-m", "cml_appliance", "serve"], env, port, self.workdir)
        return self.server

    def client(self, *, timeout: float = 60, limit: int = 100) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=limit), timeout=aiohttp.ClientTimeout(total=timeout)
        )

    async def connect(self, http: aiohttp.ClientSession) -> Api:
        """Wait for the appliance to be ready; an Api speaking as the bench user."""
        assert self.server is not None
        await wait_ready(http, self.server)
        return Api(f"http://127.0.0.1:{self.server.port}", self.secret, self.server, http)

    def data_dir(self) -> Path:
        return self.workdir / "data"

    # Clean-up ----------------------------------------------------------------------------

    def _try(self, what: str, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except Exception as exc:  # noqa: BLE001 - keep cleaning up
            self.problems.append(f"{what}: {type(exc).__name__}: {exc}")
            return None

    def close(self) -> None:
        """Kill the appliance's process group, sweep this run's workload processes and containers,
        drop the database, stop Postgres and Podman, remove the work directory. Never raises."""
        if self.server is not None:
            self._try(f"stopping the appliance (pid {self.server.proc.pid})", stop, self.server)
        if self.site_id:
            left = self._try("listing left-over workload processes", marked_pids, self.site_id) or []
            left += self._try("listing left-over bare processes", marked_pids, self.site_id, "BENCH_SITE_ID") or []
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            if left:
                self.problems.append(f"killed {len(left)} process(es) left behind: {left[:10]}")
        if self.podman is not None:
            if self.site_id:
                for label in self.container_labels:
                    removed = self._try("removing containers", self.podman.remove_labelled, label)
                    if removed:
                        print(f"(clean-up: removed {removed} container(s) labelled {label})", file=sys.stderr)
            self._try("stopping podman system service", self.podman.stop)
        if self.db_created:
            self._try(f"dropping database {self.db_name}", run_async, drop_database(self.server_dsn, self.db_name))
        if self.pg is not None:
            self._try("stopping the embedded Postgres", self.pg.cleanup)
        shutil.rmtree(self.workdir, ignore_errors=True)
        for p in self.problems:
            print(f"warning: {p}", file=sys.stderr)

    def elapsed(self) -> float:
        return time.monotonic() - self.began
