"""Application rules: create (which starts it), restart, stop, update, delete; readiness; status.

Each start is a workload of kind application. The app must listen on 127.0.0.1:$CDSW_APP_PORT;
it counts as running once it answers on its polling endpoint (CDSW_APP_POLLING_ENDPOINT,
default /), and as failed if it does not within app_ready_timeout_seconds.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import time
from datetime import datetime
from typing import Any

import aiohttp
import asyncpg

from cml_appliance.api.listing import CREATOR_KEYS, ListQuery, sql_where_and_order
from cml_appliance.auth import api_keys, login_sessions
from cml_appliance.auth.permissions import Role
from cml_appliance.auth.users import User
from cml_appliance.core import audit
from cml_appliance.core.errors import (
    AlreadyExists,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from cml_appliance.core.ids import new_public_id
from cml_appliance.core.security import token_digest
from cml_appliance.core.tasks import Supervisor
from cml_appliance.engines.base import EngineError, EngineUnavailable
from cml_appliance.jobs.service import command_for
from cml_appliance.projects.service import ProjectService, check_environment, check_name
from cml_appliance.projects.store import Project
from cml_appliance.workloads import states
from cml_appliance.workloads import store as workload_store
from cml_appliance.workloads.checks import (
    check_no_gpus,
    check_runtime,
    check_script,
    resources_within_profiles,
)
from cml_appliance.workloads.service import LaunchRequest, WorkloadService
from cml_appliance.workloads.store import Workload

log = logging.getLogger(__name__)
SUBDOMAIN_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
# Hosts of the appliance itself, as in CML: modelservice.<domain> serves POST /model.
RESERVED_SUBDOMAINS = frozenset({"modelservice", "www", "api"})


@dataclasses.dataclass(frozen=True)
class Application:
    id: int
    public_id: str
    project_id: int
    creator_id: int
    name: str
    subdomain: str
    description: str
    script: str
    cpu: float
    memory: float
    runtime_identifier: str
    environment: dict[str, str]
    bypass_authentication: bool
    workload_id: int | None
    ready_at: datetime | None
    created_at: datetime
    updated_at: datetime
    creator: dict[str, str]


_SELECT = """
SELECT a.*, u.username AS cr_username, u.name AS cr_name, u.email AS cr_email
FROM applications a JOIN users u ON u.id = a.creator_id
"""


def _app(row: asyncpg.Record) -> Application:
    fields = {f.name for f in dataclasses.fields(Application)} - {"creator"}
    return Application(**{k: row[k] for k in fields},
                       creator={"username": row["cr_username"], "name": row["cr_name"], "email": row["cr_email"]})


# app_status in SQL (a: the application, w: its current workload), for search_filter and sort.
# The two must agree: tests/integration/test_applications.py filters by each status.
STATUS_SQL = """CASE
 WHEN w.id IS NULL THEN 'APPLICATION_STOPPED'
 WHEN w.status IN ('ENGINE_SCHEDULING', 'ENGINE_STARTING') THEN 'APPLICATION_STARTING'
 WHEN w.status = 'ENGINE_RUNNING' THEN CASE WHEN a.ready_at IS NULL THEN 'APPLICATION_STARTING' ELSE 'APPLICATION_RUNNING' END
 WHEN w.status = 'ENGINE_STOPPING' THEN 'APPLICATION_STOPPING'
 WHEN w.status = 'ENGINE_STOPPED' THEN 'APPLICATION_STOPPED'
 ELSE 'APPLICATION_FAILED' END"""
APP_FILTER_KEYS = {
    "name": "a.name", "description": "a.description", "script": "a.script", "subdomain": "a.subdomain",
    "bypass_authentication": "a.bypass_authentication", "status": STATUS_SQL,
    "kernel": "(SELECT r.kernel FROM runtimes r WHERE r.image_identifier = a.runtime_identifier)",
} | CREATOR_KEYS
APP_SORT_KEYS = APP_FILTER_KEYS | {"created_at": "a.created_at", "updated_at": "a.updated_at"}


def app_status(app: Application, run: Workload | None) -> str:
    """CML's ApplicationStatus, from the current workload and whether the app has answered."""
    if run is None:
        return "APPLICATION_STOPPED"
    if run.status in (states.SCHEDULING, states.STARTING):
        return "APPLICATION_STARTING"
    if run.status == states.RUNNING:
        return "APPLICATION_RUNNING" if app.ready_at is not None else "APPLICATION_STARTING"
    if run.status == states.STOPPING:
        return "APPLICATION_STOPPING"
    if run.status == states.STOPPED:
        return "APPLICATION_STOPPED"
    return "APPLICATION_FAILED"  # an app that ended by itself, failed or timed out has failed


@dataclasses.dataclass(frozen=True)
class Route:
    """Where the proxy sends an application's requests, as of `at` (monotonic seconds)."""

    app: Application
    project_public_id: str
    status: str
    address: str | None  # None unless the app is running and ready
    at: float


# The proxy answers many requests a second: it reuses a route or a permission this long.
ROUTE_TTL_SECONDS = 2.0
MAX_REMEMBERED_VISITORS = 10_000


class ApplicationService:
    def __init__(self, pool: asyncpg.Pool, projects: ProjectService, workloads: WorkloadService, supervisor: Supervisor,
                 *, ready_timeout: float, allow_unauthenticated: bool):
        self.pool = pool
        self.projects = projects
        self.workloads = workloads
        self.supervisor = supervisor
        self.ready_timeout = ready_timeout
        self.allow_unauthenticated = allow_unauthenticated
        self._routes: dict[str, Route] = {}
        self._permissions: dict[tuple[int, int], float] = {}
        self._visitors: dict[str, tuple[float, User | None]] = {}
        workloads.finish_listeners.append(self._workload_ended)

    async def _workload_ended(self, run: Workload) -> None:
        if run.kind == "application":
            self.forget_routes()

    def forget_routes(self) -> None:
        """After any start, stop or change: the proxy looks everything up again."""
        self._routes.clear()
        self._permissions.clear()
        self._visitors.clear()

    async def route(self, subdomain: str) -> Route | None:
        cached = self._routes.get(subdomain)
        if cached is not None and time.monotonic() - cached.at < ROUTE_TTL_SECONDS:
            return cached
        app = await self.by_subdomain(subdomain)
        if app is None:
            return None
        run = await self.current_run(app)
        status = app_status(app, run)
        address = None
        if run is not None and status == "APPLICATION_RUNNING":
            try:
                address = await self.workloads.engine(run.engine).address(run.handle, run.app_port or 0)
            except (EngineError, EngineUnavailable):
                address = None
        project_public_id = await self.pool.fetchval("SELECT public_id FROM projects WHERE id = $1", app.project_id)
        route = Route(app, project_public_id, status, address, time.monotonic())
        if address is not None:  # only a working route is worth keeping
            self._routes[subdomain] = route
        return route

    def signed_out(self, login_digest: str) -> None:
        """A sign-out closes the user's applications at once, not ROUTE_TTL_SECONDS later."""
        self._visitors.pop("login:" + login_digest, None)

    async def visitor(self, bearer: str | None, login_digest: str | None) -> User | None:
        """Who calls an application: a key made for the Application audience if one is sent, else
        the sign-in session named by the applications' origin cookie (applications/origin.py).
        The answer for a credential is kept ROUTE_TTL_SECONDS: a sign-out or a revoked key
        reaches open applications that much later."""
        if bearer is None and login_digest is None:
            return None
        cache_key = "key:" + token_digest(bearer) if bearer is not None else "login:" + (login_digest or "")
        now = time.monotonic()
        seen = self._visitors.get(cache_key)
        if seen is not None and now - seen[0] < ROUTE_TTL_SECONDS:
            return seen[1]
        if bearer is not None:
            check = await api_keys.check(self.pool, bearer, "Application")
            user = None if check.problem else check.user
        else:
            login = await login_sessions.resolve_digest(self.pool, login_digest or "")
            user = login.user if login else None
        if len(self._visitors) >= MAX_REMEMBERED_VISITORS:
            self._visitors.clear()
        self._visitors[cache_key] = (now, user)
        return user

    async def may_open(self, user: User, route: Route) -> bool:
        """Any viewer of the project may open its applications."""
        key = (user.id, route.app.project_id)
        cached = self._permissions.get(key)
        if cached is not None and time.monotonic() - cached < ROUTE_TTL_SECONDS:
            return True
        try:
            await self.projects.get(user, route.project_public_id, Role.READ)
        except (NotFound, PermissionDenied):
            return False  # a refusal is not kept: access granted a moment later works at once
        # A grant is kept briefly: access taken away can last up to ROUTE_TTL_SECONDS more.
        self._permissions[key] = time.monotonic()
        return True

    async def _get_row(self, where: str, *args: Any) -> Application | None:
        row = await self.pool.fetchrow(_SELECT + " WHERE " + where, *args)
        return _app(row) if row else None

    async def get(self, user: User, project_id: str, app_id: str, needed: Role = Role.READ) -> tuple[Project, Application, Workload | None]:
        project = await self.projects.get(user, project_id, needed)
        app = await self._get_row("a.public_id = $1 AND a.project_id = $2", app_id, project.id)
        if app is None:
            raise NotFound(f"application {app_id!r} not found")
        return project, app, await self.current_run(app)

    async def by_subdomain(self, subdomain: str) -> Application | None:
        return await self._get_row("a.subdomain = $1", subdomain)

    async def current_run(self, app: Application) -> Workload | None:
        return await workload_store.get_by_id(self.pool, app.workload_id) if app.workload_id else None

    async def list_for_project(self, user: User, project_id: str, q: ListQuery) -> tuple[Project, list[tuple[Application, Workload | None]], bool]:
        project = await self.projects.get(user, project_id, Role.READ)
        args: list[Any] = [project.id, q.page_size + 1, q.offset]
        where, order = sql_where_and_order(q, APP_FILTER_KEYS, APP_SORT_KEYS, "a.created_at DESC, a.id DESC", args)
        rows = await self.pool.fetch(
            _SELECT + f" LEFT JOIN workloads w ON w.id = a.workload_id WHERE a.project_id = $1 AND {where}"
            f" ORDER BY {order} LIMIT $2 OFFSET $3", *args)
        apps = [_app(r) for r in rows[:q.page_size]]
        return project, [(a, await self.current_run(a)) for a in apps], len(rows) > q.page_size

    async def _check(self, fields: dict[str, Any], app: Application | None = None) -> dict[str, Any]:
        values: dict[str, Any] = {}
        if "name" in fields or app is None:
            values["name"] = check_name(fields.get("name", ""))
        if "subdomain" in fields or app is None:
            sub = (fields.get("subdomain") or "").strip().lower()
            if not SUBDOMAIN_RE.match(sub):
                raise InvalidArgument("subdomain must be 1-63 lower-case letters, digits or '-', not starting or ending with '-'")
            if sub in RESERVED_SUBDOMAINS:
                raise InvalidArgument(f"the subdomain {sub!r} is the appliance's own; choose another")
            values["subdomain"] = sub
        if "script" in fields or app is None:
            values["script"] = check_script(fields.get("script"))
        if "description" in fields:
            values["description"] = fields["description"]
        if "environment" in fields:
            values["environment"] = check_environment(fields["environment"])
        if "bypass_authentication" in fields:
            if fields["bypass_authentication"] and not self.allow_unauthenticated:
                raise InvalidArgument("this site does not allow applications open to people who are not signed in")
            values["bypass_authentication"] = fields["bypass_authentication"]
        if "runtime_identifier" in fields or app is None:
            values["runtime_identifier"] = await check_runtime(self.pool, fields.get("runtime_identifier"))
        check_no_gpus(fields.get("nvidia_gpu", 0))
        if any(k in fields for k in ("cpu", "memory", "resource_profile_id")) or app is None:
            values["cpu"], values["memory"] = await resources_within_profiles(self.pool, fields)
        return values

    async def create(self, user: User, project_id: str, fields: dict[str, Any]) -> tuple[Application, Workload | None]:
        project = await self.projects.get(user, project_id, Role.WRITE)
        values = await self._check(fields)
        values.update(public_id=new_public_id(), project_id=project.id, creator_id=user.id)
        columns = ", ".join(values)
        placeholders = ", ".join(f"${i}" for i in range(1, len(values) + 1))
        async with self.pool.acquire() as conn, conn.transaction():
            try:
                await conn.execute(f"INSERT INTO applications ({columns}) VALUES ({placeholders})", *values.values())
            except asyncpg.UniqueViolationError as exc:
                what = "subdomain" if "subdomain" in str(exc) else "name"
                raise AlreadyExists(f"an application with that {what} already exists") from None
            await audit.record(conn, user.id, "application.create", "application", values["public_id"], {"name": values["name"]})
        app = await self._get_row("a.public_id = $1", values["public_id"])
        assert app is not None
        run = await self._start(user, project, app)  # creating an application starts it, as in CML
        return app, run

    async def _start(self, user: User, project: Project, app: Application) -> Workload:
        run = await self.workloads.launch(user, project, LaunchRequest(
            kind="application", name=app.name, runtime_identifier=app.runtime_identifier, image=app.runtime_identifier,
            cpu=app.cpu, memory=app.memory, nvidia_gpu=0, command=command_for(app.script, ""),
            environment=app.environment, script=app.script, application_id=app.id,
        ))
        await self.pool.execute("UPDATE applications SET workload_id = $2, ready_at = NULL, updated_at = now() WHERE id = $1",
                                app.id, run.id)
        self.forget_routes()
        self.supervisor.spawn(f"ready-{app.public_id}", self._wait_ready(app, run, project))
        return run

    async def _wait_ready(self, app: Application, run: Workload, project: Project) -> None:
        """Poll the app until it answers; fail it with the reason if it never does."""
        endpoint = (project.environment | app.environment).get("CDSW_APP_POLLING_ENDPOINT", "/")
        endpoint = endpoint if endpoint.startswith("/") else "/" + endpoint
        deadline = time.monotonic() + self.ready_timeout
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
            while time.monotonic() < deadline:
                current = await workload_store.get_by_id(self.pool, run.id)
                if current is None or current.status in states.FINISHED or current.status == states.STOPPING:
                    return
                if current.status == states.RUNNING:
                    try:
                        address = await self.workloads.engine(current.engine).address(current.handle, current.app_port or 0)
                        async with http.get(f"http://{address}{endpoint}", allow_redirects=False) as resp:
                            if resp.status < 500:
                                await self.pool.execute("UPDATE applications SET ready_at = now() WHERE id = $1 AND workload_id = $2",
                                                        app.id, run.id)
                                self.forget_routes()
                                return
                    except (aiohttp.ClientError, OSError, asyncio.TimeoutError, EngineError, EngineUnavailable):
                        pass
                await asyncio.sleep(0.25)
        current = await workload_store.get_by_id(self.pool, run.id)
        if current is not None and current.active:
            await self.workloads.stop(current, final=states.FAILED, reason=(
                f"the application did not answer on 127.0.0.1:$CDSW_APP_PORT{endpoint} within {self.ready_timeout:g} s"
            ))

    async def restart(self, user: User, project_id: str, app_id: str) -> tuple[Application, Workload | None]:
        project, app, run = await self.get(user, project_id, app_id, Role.WRITE)
        if run is not None and run.active:
            await self.workloads.stop(run, reason=f"restarted by {user.username}")
            for _ in range(200):  # the old process must be gone before the new one takes the name
                current = await workload_store.get_by_id(self.pool, run.id)
                if current is None or not current.active:
                    break
                await asyncio.sleep(0.05)
        new_run = await self._start(user, project, app)
        refreshed = await self._get_row("a.id = $1", app.id)
        assert refreshed is not None
        return refreshed, new_run

    async def stop(self, user: User, project_id: str, app_id: str) -> tuple[Application, Workload | None]:
        _, app, run = await self.get(user, project_id, app_id, Role.WRITE)
        if run is not None and run.active:
            run = await self.workloads.stop(run, reason=f"stopped by {user.username}")
        self.forget_routes()
        return app, run

    async def update(self, user: User, project_id: str, app_id: str, fields: dict[str, Any]) -> tuple[Application, Workload | None]:
        _, app, run = await self.get(user, project_id, app_id, Role.WRITE)
        values = await self._check(fields, app)
        if values:
            sets = ", ".join(f"{k} = ${i}" for i, k in enumerate(values, start=2))
            try:
                await self.pool.execute(f"UPDATE applications SET {sets}, updated_at = now() WHERE id = $1", app.id, *values.values())
            except asyncpg.UniqueViolationError:
                raise AlreadyExists("an application with that name or subdomain already exists") from None
        refreshed = await self._get_row("a.id = $1", app.id)
        assert refreshed is not None
        self.forget_routes()
        return refreshed, run

    async def delete(self, user: User, project_id: str, app_id: str) -> None:
        _, app, run = await self.get(user, project_id, app_id, Role.WRITE)
        if run is not None and run.active:
            await self.workloads.stop(run, reason="its application was deleted")
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("DELETE FROM applications WHERE id = $1", app.id)
            await audit.record(conn, user.id, "application.delete", "application", app.public_id, {"name": app.name})
        self.forget_routes()
