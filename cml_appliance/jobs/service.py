"""Job rules: create, update, delete, run (each run a workload of kind job_run, with a snapshot
of the job's settings), dependencies (a child runs after its parent succeeds; no cycles)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import shlex
import smtplib
from datetime import UTC, datetime
from typing import Any

import asyncpg

from cml_appliance.api.listing import CREATOR_KEYS, ListQuery, sql_where_and_order
from cml_appliance.auth.permissions import Role
from cml_appliance.auth.users import User, get_by_id
from cml_appliance.core import audit
from cml_appliance.core.errors import (
    AlreadyExists,
    AppError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    QuotaExceeded,
    Unavailable,
)
from cml_appliance.core.ids import new_public_id
from cml_appliance.db.pool import try_advisory_lock
from cml_appliance.jobs import notify
from cml_appliance.jobs.schedule import SCHEDULER_LOCK, check_schedule, next_fire
from cml_appliance.projects import files
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
from cml_appliance.workloads.service import FireTaken, LaunchRequest, WorkloadService
from cml_appliance.workloads.store import Workload

log = logging.getLogger(__name__)

JOB_COLUMNS = (
    "name", "script", "arguments", "cpu", "memory", "nvidia_gpu", "runtime_identifier", "environment", "schedule",
    "timezone", "paused", "timeout_seconds", "kill_on_timeout", "retry_enabled", "max_retry", "retry_delay",
    "retry_for_script_failure", "retry_for_system_failure", "retry_for_timedout_runs", "retry_for_skipped_runs",
    "recipients", "attachments",
)


@dataclasses.dataclass(frozen=True)
class Job:
    id: int
    public_id: str
    project_id: int
    creator_id: int
    name: str
    script: str
    arguments: str
    cpu: float
    memory: float
    nvidia_gpu: int
    runtime_identifier: str
    environment: dict[str, str]
    schedule: str
    timezone: str
    paused: bool
    parent_id: int | None
    parent_public_id: str | None
    timeout_seconds: int
    kill_on_timeout: bool
    retry_enabled: bool
    max_retry: int
    retry_delay: int
    retry_for_script_failure: bool
    retry_for_system_failure: bool
    retry_for_timedout_runs: bool
    retry_for_skipped_runs: bool
    recipients: list[dict[str, Any]]
    attachments: list[str]
    created_at: datetime
    updated_at: datetime
    next_fire_at: datetime | None
    creator: dict[str, str]

    @property
    def type(self) -> str:
        return "dependent" if self.parent_id else "cron" if self.schedule else "manual"


_SELECT = """
SELECT j.*, pj.public_id AS parent_public_id, u.username AS cr_username, u.name AS cr_name, u.email AS cr_email
FROM jobs j LEFT JOIN jobs pj ON pj.id = j.parent_id JOIN users u ON u.id = j.creator_id
"""


def _job(row: asyncpg.Record) -> Job:
    fields = {f.name for f in dataclasses.fields(Job)} - {"creator"}
    return Job(**{k: row[k] for k in fields},
               creator={"username": row["cr_username"], "name": row["cr_name"], "email": row["cr_email"]})


# search_filter and sort keys of the job lists (CML's), as SQL over _SELECT (j, and u its creator).
JOB_FILTER_KEYS = {
    "name": "j.name", "script": "j.script", "paused": "j.paused",
    "type": "CASE WHEN j.parent_id IS NOT NULL THEN 'dependent' WHEN j.schedule <> '' THEN 'cron' ELSE 'manual' END",
    "kernel": "(SELECT r.kernel FROM runtimes r WHERE r.image_identifier = j.runtime_identifier)",
} | CREATOR_KEYS
JOB_SORT_KEYS = JOB_FILTER_KEYS | {"created_at": "j.created_at", "updated_at": "j.updated_at"}
# ... and of a job's runs, over workloads (w, and u who started the run).
RUN_FILTER_KEYS = {"id": "w.public_id", "status": "w.status", "name": "w.name", "script": "w.script"} | CREATOR_KEYS
RUN_SORT_KEYS = RUN_FILTER_KEYS | {"created_at": "w.created_at", "updated_at": "w.updated_at",
                                   "scheduling_at": "w.scheduling_at", "running_at": "w.running_at",
                                   "finished_at": "w.finished_at"}

# Cron runs started at once by one scheduler tick.
FIRE_CONCURRENCY = 32
# Due jobs claimed per transaction.
FIRE_BATCH = 200
# A fire that could not start because the engine or the database was away waits this long.
FIRE_RETRY_SECONDS = 10
# A retry that finds the job still running waits at least this long before it looks again.
BUSY_RETRY_SECONDS = 10.0
# Mail taken for sending by a process that then died is sent again after this long; at most
# MAIL_CONCURRENCY mails are taken at a time (each send is bounded by SMTP's 30 s timeout), so
# none waits past its lease behind the others.
MAIL_LEASE_SECONDS = 300
MAIL_CONCURRENCY = 4
# Variables that make an interpreter or the loader run code of the caller's choosing.
LOADER_VARIABLES = frozenset({
    "PYTHONPATH", "PYTHONSTARTUP", "PYTHONWARNINGS", "PYTHONHOME", "PYTHONINSPECT", "PYTHONBREAKPOINT", "BROWSER",
    "PERL5OPT", "PERL5LIB", "RUBYOPT", "RUBYLIB", "NODE_OPTIONS", "NODE_PATH", "BASH_ENV", "ENV", "R_PROFILE",
    "R_PROFILE_USER", "R_LIBS", "R_LIBS_USER", "JAVA_TOOL_OPTIONS", "_JAVA_OPTIONS", "GIT_SSH_COMMAND", "PATH",
})
RECIPIENT_FLAGS = ("notify_on_success", "notify_on_failure", "notify_on_timeout", "notify_on_stop")


def _fire_of(row: asyncpg.Record) -> dict[str, Any]:
    return {"id": row["fire_id"], "creator_id": row["fire_creator_id"], "attempt": row["fire_attempt"],
            "environment": row["fire_environment"], "arguments": row["fire_arguments"]}


def check_recipients(raw: Any) -> list[dict[str, Any]]:
    """CML's JobRecipient list: an email and the endings to be told about."""
    if not isinstance(raw, list):
        raise InvalidArgument("recipients must be a list of {email, notify_on_success, ...}")
    out = []
    for item in raw:
        if not isinstance(item, dict) or not isinstance(item.get("email"), str) or "@" not in item["email"]:
            raise InvalidArgument("each recipient needs an email address")
        unknown = set(item) - {"email", *RECIPIENT_FLAGS}
        if unknown:
            raise InvalidArgument(f"unknown recipient field(s): {', '.join(sorted(unknown))}")
        if any(not isinstance(item.get(f, False), bool) for f in RECIPIENT_FLAGS):
            raise InvalidArgument("notify_on_* must be true or false")
        out.append({"email": item["email"], **{f: bool(item.get(f, False)) for f in RECIPIENT_FLAGS}})
    return out


def _run_request(job: Job, environment: dict[str, str] | None, arguments: str | None, attempt: int,
                 fire_id: int | None) -> LaunchRequest:
    """A run of `job`: a snapshot of its settings, with the run's own overrides."""
    env = job.environment | check_environment(environment or {})
    args = job.arguments if arguments is None else arguments
    timeout = job.timeout_seconds if job.kill_on_timeout and job.timeout_seconds else None
    return LaunchRequest(
        kind="job_run", name=job.name, runtime_identifier=job.runtime_identifier, image=job.runtime_identifier,
        cpu=job.cpu, memory=job.memory, nvidia_gpu=0, command=command_for(job.script, args), environment=env,
        script=job.script, arguments=args, max_duration_minutes=timeout / 60 if timeout else None, job_id=job.id,
        attempt=attempt, fire_id=fire_id,
    )


def command_for(script: str, arguments: str) -> list[str]:
    """How a job's script is run, by its kind (CML runs scripts by their kernel)."""
    args = shlex.split(arguments) if arguments else []
    if script.endswith(".py"):
        return ["python3", "-u", script, *args]
    if script.endswith(".R"):
        return ["Rscript", script, *args]
    return ["/bin/sh", script, *args]


class JobService:
    def __init__(self, pool: asyncpg.Pool, projects: ProjectService, workloads: WorkloadService, *,
                 smtp: notify.SmtpSettings | None = None, base_url: str = ""):
        self.pool = pool
        self.projects = projects
        self.workloads = workloads
        self.smtp = smtp
        self.base_url = base_url
        # Set when a run ends: the scheduler loop then follows it up at once, not a tick later.
        self.wake = asyncio.Event()
        self._mailing: set[int] = set()  # runs whose mail this process is sending
        workloads.finish_listeners.append(self._run_ended)

    async def _get_row(self, project: Project, job_id: str) -> Job:
        row = await self.pool.fetchrow(_SELECT + " WHERE j.public_id = $1 AND j.project_id = $2", job_id, project.id)
        if row is None:
            raise NotFound(f"job {job_id!r} not found")
        return _job(row)

    async def get(self, user: User, project_id: str, job_id: str, needed: Role = Role.READ) -> tuple[Project, Job]:
        project = await self.projects.get(user, project_id, needed)
        return project, await self._get_row(project, job_id)

    async def list_for_project(self, user: User, project_id: str, q: ListQuery) -> tuple[Project, list[Job], bool]:
        project = await self.projects.get(user, project_id, Role.READ)
        args: list[Any] = [project.id, q.page_size + 1, q.offset]
        where, order = sql_where_and_order(q, JOB_FILTER_KEYS, JOB_SORT_KEYS, "j.created_at DESC, j.id DESC", args)
        rows = await self.pool.fetch(
            _SELECT + f" WHERE j.project_id = $1 AND {where} ORDER BY {order} LIMIT $2 OFFSET $3", *args)
        return project, [_job(r) for r in rows[:q.page_size]], len(rows) > q.page_size

    async def list_all(self, user: User, q: ListQuery) -> tuple[list[tuple[str, Job]], bool]:
        """Every job in every project the user can read (GET /api/v2/jobs)."""
        args: list[Any] = [user.id, user.is_admin, q.page_size + 1, q.offset, user.scope_project_id]
        where, order = sql_where_and_order(q, JOB_FILTER_KEYS, JOB_SORT_KEYS, "j.created_at DESC, j.id DESC", args)
        rows = await self.pool.fetch(
            _SELECT.replace("FROM jobs j", "FROM jobs j JOIN projects p ON p.id = j.project_id")
            + " LEFT JOIN project_collaborators c ON c.project_id = p.id AND c.user_id = $1"
            " WHERE (p.owner_id = $1 OR c.user_id IS NOT NULL OR p.visibility = 'public' OR $2)"
            f" AND ($5::bigint IS NULL OR p.id = $5) AND {where} ORDER BY {order} LIMIT $3 OFFSET $4",
            *args,
        )
        projects = {r["project_id"]: await self.pool.fetchval("SELECT public_id FROM projects WHERE id = $1", r["project_id"]) for r in rows}
        return [(projects[r["project_id"]], _job(r)) for r in rows[:q.page_size]], len(rows) > q.page_size

    async def _check(self, project: Project, fields: dict[str, Any], job: Job | None = None) -> dict[str, Any]:
        values: dict[str, Any] = {}
        if "name" in fields or job is None:
            values["name"] = check_name(fields.get("name", ""))
        if "script" in fields or job is None:
            values["script"] = check_script(fields.get("script"))
        for key in ("arguments", "paused", "kill_on_timeout", "retry_enabled", "retry_for_script_failure",
                    "retry_for_system_failure", "retry_for_timedout_runs", "retry_for_skipped_runs"):
            if key in fields:
                values[key] = fields[key]
        if "environment" in fields:
            values["environment"] = check_environment(fields["environment"])
        if "recipients" in fields:
            values["recipients"] = check_recipients(fields["recipients"])
        if "attachments" in fields:
            values["attachments"] = [files.clean_relative(a) for a in fields["attachments"]]
        if "timeout" in fields:
            if not 0 <= int(fields["timeout"]) <= 35_000 * 60:
                raise InvalidArgument("timeout must be between 0 (none) and 2100000 seconds")
            values["timeout_seconds"] = int(fields["timeout"])
        for key in ("max_retry", "retry_delay"):
            if key in fields:
                if fields[key] < 0:
                    raise InvalidArgument(f"{key} must not be negative")
                values[key] = fields[key]
        if "runtime_identifier" in fields or job is None:
            values["runtime_identifier"] = await check_runtime(self.pool, fields.get("runtime_identifier"))
        check_no_gpus(fields.get("nvidia_gpu", 0))
        if any(k in fields for k in ("cpu", "memory", "resource_profile_id")) or job is None:
            values["cpu"], values["memory"] = await resources_within_profiles(self.pool, fields)
        schedule = fields.get("schedule", job.schedule if job else "")
        parent_public = fields.get("parent_id") or fields.get("parent_job_id")
        if schedule and (parent_public or (job and job.parent_id and "parent_id" not in fields)):
            raise InvalidArgument("a job runs either on a schedule or after its parent, not both")
        timezone = fields.get("timezone", job.timezone if job else "America/Los_Angeles")
        if "timezone" in fields:
            values["timezone"] = timezone
        if "schedule" in fields:
            values["schedule"] = schedule.strip()
        if schedule and ("schedule" in fields or "timezone" in fields):
            check_schedule(schedule.strip(), timezone)
            values["next_fire_at"] = next_fire(schedule.strip(), timezone, datetime.now(UTC))
        elif "schedule" in fields:
            values["next_fire_at"] = None
        if parent_public is not None:
            values["parent_id"] = await self._parent(project, parent_public, job)
        return values

    async def _parent(self, project: Project, parent_public: str, job: Job | None) -> int | None:
        if parent_public == "":
            return None
        parent = await self.pool.fetchrow("SELECT id, parent_id FROM jobs WHERE public_id = $1 AND project_id = $2",
                                          parent_public, project.id)
        if parent is None:
            raise InvalidArgument(f"parent job {parent_public!r} is not a job of this project")
        if job is not None:
            # Walk up from the new parent: meeting this job means a cycle.
            current: int | None = parent["id"]
            seen = set()
            while current is not None and current not in seen:
                if current == job.id:
                    raise InvalidArgument("that dependency would make a cycle")
                seen.add(current)
                current = await self.pool.fetchval("SELECT parent_id FROM jobs WHERE id = $1", current)
        return int(parent["id"])

    async def create(self, user: User, project_id: str, fields: dict[str, Any]) -> Job:
        project = await self.projects.get(user, project_id, Role.WRITE)
        values = await self._check(project, fields)
        values.update(public_id=new_public_id(), project_id=project.id, creator_id=user.id)
        columns = ", ".join(values)
        placeholders = ", ".join(f"${i}" for i in range(1, len(values) + 1))
        async with self.pool.acquire() as conn, conn.transaction():
            try:
                await conn.execute(f"INSERT INTO jobs ({columns}) VALUES ({placeholders})", *values.values())
            except asyncpg.UniqueViolationError:
                raise AlreadyExists(f"the project already has a job named {values['name']!r}") from None
            await audit.record(conn, user.id, "job.create", "job", values["public_id"], {"name": values["name"]})
        return await self._get_row(project, values["public_id"])

    async def update(self, user: User, project_id: str, job_id: str, fields: dict[str, Any]) -> Job:
        project, job = await self.get(user, project_id, job_id, Role.WRITE)
        values = await self._check(project, fields, job)
        if values:
            sets = ", ".join(f"{k} = ${i}" for i, k in enumerate(values, start=2))
            async with self.pool.acquire() as conn, conn.transaction():
                try:
                    await conn.execute(f"UPDATE jobs SET {sets}, updated_at = now() WHERE id = $1", job.id, *values.values())
                except asyncpg.UniqueViolationError:
                    raise AlreadyExists(f"the project already has a job named {values.get('name')!r}") from None
                await audit.record(conn, user.id, "job.update", "job", job.public_id, {"fields": sorted(values)})
        return await self._get_row(project, job_id)

    async def delete(self, user: User, project_id: str, job_id: str) -> None:
        project, job = await self.get(user, project_id, job_id, Role.WRITE)
        for run in await self._active_runs(job):
            await self.workloads.stop(run, reason="its job was deleted")
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("DELETE FROM jobs WHERE id = $1", job.id)
            await audit.record(conn, user.id, "job.delete", "job", job.public_id, {"name": job.name})

    async def _active_runs(self, job: Job) -> list[Workload]:
        ids = await self.pool.fetch(
            "SELECT id FROM workloads WHERE job_id = $1 AND status = ANY($2::text[])", job.id, list(states.ACTIVE)
        )
        return [w for r in ids if (w := await workload_store.get_by_id(self.pool, r["id"])) is not None]

    # Runs ------------------------------------------------------------------------------------

    async def run(self, user: User, project: Project, job: Job, *, environment: dict[str, str] | None = None,
                  arguments: str | None = None, attempt: int = 1, fire_id: int | None = None) -> Workload:
        """Start a run with a snapshot of the job's settings (and per-run overrides); with
        fire_id, the run consumes that pending fire (see fire_due)."""
        return await self.workloads.launch(user, project, _run_request(job, environment, arguments, attempt, fire_id))

    async def start_run(self, user: User, project_id: str, job_id: str, fields: dict[str, Any]) -> Workload:
        # Operators may start existing jobs (CML's operator role), as the job is: changing what a
        # run does (its environment or arguments) is changing the job, which needs the write role.
        project, job = await self.get(user, project_id, job_id, Role.OPERATOR)
        environment, arguments = fields.get("environment"), fields.get("arguments")
        if (environment or arguments) and project.role < Role.WRITE:
            raise PermissionDenied("operators start jobs as they are: overriding a run's environment or arguments needs the write role")
        if environment:
            environment = check_environment(environment)
            loaders = sorted(name for name in environment if name.upper() in LOADER_VARIABLES or name.upper().startswith("LD_"))
            if loaders:
                raise InvalidArgument(f"a run cannot override {', '.join(loaders)}: they make programs load other code; set them on the job")
        return await self.run(user, project, job, environment=environment, arguments=arguments)

    async def get_run(self, user: User, project_id: str, job_id: str, run_id: str) -> tuple[Project, Job, Workload]:
        project, job = await self.get(user, project_id, job_id)
        run = await workload_store.get(self.pool, run_id)
        if run is None or run.job_id != job.id:
            raise NotFound(f"run {run_id!r} not found")
        return project, job, run

    async def last_runs(self, job_ids: list[int]) -> dict[int, Workload]:
        """The newest run of each of these jobs (the caller has read their project)."""
        rows = await self.pool.fetch(
            "SELECT DISTINCT ON (w.job_id) " + workload_store.SELECT.strip().removeprefix("SELECT ")
            + " WHERE w.job_id = ANY($1::bigint[]) ORDER BY w.job_id, w.created_at DESC, w.id DESC", job_ids)
        return {r["job_id"]: workload_store.from_row(r) for r in rows}

    async def list_runs(self, user: User, project_id: str, job_id: str, q: ListQuery) -> tuple[Job, list[Workload], bool]:
        project, job = await self.get(user, project_id, job_id)
        args: list[Any] = [job.id, q.page_size + 1, q.offset]
        where, order = sql_where_and_order(q, RUN_FILTER_KEYS, RUN_SORT_KEYS, "w.created_at DESC, w.id DESC", args)
        rows = await self.pool.fetch(
            workload_store.SELECT + f" WHERE w.job_id = $1 AND {where} ORDER BY {order} LIMIT $2 OFFSET $3", *args)
        return job, [workload_store.from_row(r) for r in rows[:q.page_size]], len(rows) > q.page_size

    async def stop_run(self, user: User, project_id: str, job_id: str, run_id: str) -> Workload:
        _, _, run = await self.get_run(user, project_id, job_id, run_id)
        await self.projects.get(user, project_id, Role.OPERATOR)
        return await self.workloads.stop(run, reason=f"stopped by {user.username}")

    async def scheduler_tick(self) -> float:
        """Fire what is due; return how long to sleep: until the next cron fire or retry, if that
        is sooner than the loop's interval (a minute's fires then start on time, not a tick late)."""
        if await self.fire_due() is None:
            return 1.0  # another process schedules; look again in a while
        wait = await self.pool.fetchval(
            "SELECT extract(epoch FROM least("
            " (SELECT min(next_fire_at) FROM jobs WHERE schedule <> '' AND NOT paused),"
            " (SELECT min(due_at) FROM job_fires)) - now())"
        )
        # Something still due (a fire that waits to be retried, a job another tick holds) is
        # looked at again after a short pause, not at once.
        return 3600.0 if wait is None else max(0.05, float(wait) + 0.005)

    async def fire_due(self) -> int | None:
        """Start the runs jobs owe: cron jobs that are due, dependents of runs that succeeded,
        retries whose delay has passed, and fires a process that died left behind; then send the
        mail ended runs owe. Returns how many runs started.

        Only the holder of the scheduler lock does this. Due cron jobs are claimed a batch per
        transaction, which moves each one's next fire past now and records a pending fire
        (job_fires); a run consumes its fire in the statement that inserts it. So a crash at any
        point loses no fire (the next holder starts what is still pending) and starts none twice.
        Fires missed while the appliance was down collapse into one. None when another process
        holds the scheduler lock.
        """
        async with try_advisory_lock(self.pool, SCHEDULER_LOCK) as conn:
            if conn is None:
                return None
            await self._follow_up_ended_runs(conn)
            await self._claim_due_jobs(conn)
            started = await self._start_pending_fires(conn)
            await self._send_due_mail(conn)
            return started

    async def _claim_due_jobs(self, conn: asyncpg.Connection) -> None:
        while True:
            async with conn.transaction():
                rows = await conn.fetch(
                    "SELECT id, creator_id, schedule, timezone, next_fire_at, now() AS db_now FROM jobs"
                    " WHERE schedule <> '' AND NOT paused AND next_fire_at <= now()"
                    " ORDER BY next_fire_at LIMIT $1 FOR UPDATE SKIP LOCKED", FIRE_BATCH,
                )
                if not rows:
                    return
                # The database's clock decides what is due, so the next fire is counted from it too
                # (an appliance clock behind it would leave the job due, and fire it again).
                now = max(datetime.now(UTC), rows[0]["db_now"])
                await conn.execute(
                    "UPDATE jobs SET next_fire_at = due.at FROM unnest($1::bigint[], $2::timestamptz[])"
                    " AS due(id, at) WHERE jobs.id = due.id",
                    [r["id"] for r in rows], [next_fire(r["schedule"], r["timezone"], now) for r in rows],
                )
                await conn.execute(
                    "INSERT INTO job_fires (job_id, creator_id, due_at)"
                    " SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::timestamptz[])",
                    [r["id"] for r in rows], [r["creator_id"] for r in rows], [r["next_fire_at"] for r in rows],
                )

    async def _start_pending_fires(self, conn: asyncpg.Connection) -> int:
        limit = asyncio.Semaphore(FIRE_CONCURRENCY)
        # Who a run starts as, and where, looked up once per tick, not once per fire.
        launchers: dict[tuple[int, int], asyncio.Future[tuple[User, Project] | None]] = {}

        async def start(fire: asyncpg.Record, job: Job) -> bool:
            async with limit:
                key = (fire["creator_id"], job.project_id)
                if key not in launchers:
                    launchers[key] = asyncio.ensure_future(self._launcher(fire["creator_id"], job))
                found = await launchers[key]
                return await self._start_fire(fire, job, found)

        starts: list[asyncio.Task[bool]] = []
        last = 0
        while True:
            fires = await conn.fetch(
                "SELECT f.id AS fire_id, f.creator_id AS fire_creator_id, f.attempt AS fire_attempt,"
                " f.environment AS fire_environment, f.arguments AS fire_arguments, " + _SELECT.strip()[len("SELECT "):]
                + " JOIN job_fires f ON f.job_id = j.id WHERE f.due_at <= now() AND f.id > $1 ORDER BY f.id LIMIT $2",
                last, FIRE_BATCH,
            )
            if not fires:
                break
            last = fires[-1]["fire_id"]
            starts += [asyncio.create_task(start(_fire_of(r), _job(r))) for r in fires]
        return sum(await asyncio.gather(*starts))

    async def _launcher(self, creator_id: int, job: Job) -> tuple[User, Project] | None:
        """Who a scheduled run starts as (still an operator of the job's project), and where."""
        owner = await get_by_id(self.pool, creator_id)
        project_id = await self.pool.fetchval("SELECT public_id FROM projects WHERE id = $1", job.project_id)
        if owner is None or project_id is None:
            return None
        try:
            return owner, await self.projects.get(owner, project_id, Role.OPERATOR)
        except AppError as exc:
            log.warning("job %s cannot start as %s: %s", job.public_id, owner.username, exc)
            return None

    async def _start_fire(self, fire: dict[str, Any], job: Job, launcher: tuple[User, Project] | None) -> bool:
        try:
            if job.paused:
                raise FailedPrecondition("the job is paused")
            if launcher is None:
                raise FailedPrecondition("its user or project is gone, or the user may no longer run it")
            await self.run(*launcher, job, environment=fire["environment"], arguments=fire["arguments"],
                           attempt=fire["attempt"], fire_id=fire["id"])
            return True
        except FireTaken:
            return False  # another scheduler started it meanwhile
        except AlreadyExists:
            try:
                if await self._job_busy(fire, job, launcher):
                    return False
            except (asyncpg.PostgresConnectionError, OSError) as exc:
                log.warning("job %s: its fire is tried again in %d s: %s", job.public_id, FIRE_RETRY_SECONDS, exc)
                await self._postpone(fire, FIRE_RETRY_SECONDS)
                return False
        except QuotaExceeded as exc:
            # Over its quota: a failed run that says so, rather than a fire dropped unseen.
            if launcher is not None:
                request = _run_request(job, fire["environment"], fire["arguments"], fire["attempt"], fire["id"])
                try:
                    await self.workloads.record_unlaunched(*launcher, request, states.FAILED, exc.message[:2000])
                    return True
                except asyncpg.PostgresError as record_error:
                    log.warning("job %s: could not record its run refused by a quota: %s", job.public_id, record_error)
        except (Unavailable, asyncpg.PostgresConnectionError, OSError) as exc:
            # The engine or the database is away for now: the fire is owed still, tried again later.
            log.warning("job %s did not start (tried again in %d s): %s", job.public_id, FIRE_RETRY_SECONDS, exc)
            await self._postpone(fire, FIRE_RETRY_SECONDS)
            return False
        except Exception as exc:  # one job failing to start must not stop the others
            log.warning("job %s did not start: %s", job.public_id, exc)
        # The fire is settled (skipped, or could not start): it is not tried again.
        await self.pool.execute("DELETE FROM job_fires WHERE id = $1", fire["id"])
        return False

    async def _postpone(self, fire: dict[str, Any], seconds: float) -> None:
        await self.pool.execute("UPDATE job_fires SET due_at = now() + make_interval(secs => $2) WHERE id = $1",
                                fire["id"], float(seconds))

    async def _job_busy(self, fire: dict[str, Any], job: Job, launcher: tuple[User, Project] | None) -> bool:
        """A fire found the job's previous run still going. A retry waits for it to end (it is
        owed a run, and skipping it would only owe another); a cron or dependent fire is recorded
        as an ENGINE_SKIPPED run, as CML does, in the statement that consumes the fire. True when
        the fire is dealt with; False when it is to be settled (dropped) by the caller."""
        if fire["attempt"] > 1:
            await self._postpone(fire, max(float(job.retry_delay), BUSY_RETRY_SECONDS))
            return True
        if launcher is None:
            return False
        request = _run_request(job, fire["environment"], fire["arguments"], fire["attempt"], fire["id"])
        try:
            row = await self.workloads.record_unlaunched(
                *launcher, request, states.SKIPPED, "skipped: the job's previous run was still running")
        except asyncpg.PostgresConnectionError:
            raise
        except asyncpg.PostgresError as exc:
            log.warning("job %s: could not record its skipped run: %s", job.public_id, exc)
            return False
        if row is not None:
            log.info("job %s is still running: this fire is recorded as skipped (%s)", job.public_id, row.public_id)
            self.wake.set()  # its follow-up (a retry) is due
        return True  # recorded, or another scheduler took the fire meanwhile

    def _should_retry(self, job: Job, run: Workload) -> bool:
        if not job.retry_enabled or run.attempt > job.max_retry:
            return False
        if run.status == states.TIMEDOUT:
            return job.retry_for_timedout_runs
        if run.status == states.SKIPPED:
            return job.retry_for_skipped_runs
        if run.status == states.FAILED:
            # An exit code means the script failed; none means the platform did (start, engine).
            return job.retry_for_script_failure if run.exit_code is not None else job.retry_for_system_failure
        return False

    async def _run_ended(self, run: Workload) -> None:
        if run.kind == "job_run":
            self.wake.set()

    async def _follow_up_ended_runs(self, conn: asyncpg.Connection) -> None:
        """Record what ended runs lead to: fires for the dependents of a run that succeeded, a
        retry fire (due after its delay) for one that failed as the job allows, and mail owed.

        The run's end marked it (followup_due, in the statement that ended it); marking it done
        and recording its fires share one transaction, so a crash loses none and doubles none.
        """
        while True:
            async with conn.transaction():
                ended = [workload_store.from_row(r) for r in await conn.fetch(
                    workload_store.SELECT + " WHERE w.followup_due ORDER BY w.id LIMIT $1 FOR UPDATE OF w SKIP LOCKED",
                    FIRE_BATCH,
                )]
                if not ended:
                    return
                job_ids = list({run.job_id for run in ended if run.job_id is not None})
                jobs = {r["id"]: _job(r) for r in await conn.fetch(_SELECT + " WHERE j.id = ANY($1::bigint[])", job_ids)}
                children: dict[int, list[Job]] = {}
                for r in await conn.fetch(_SELECT + " WHERE j.parent_id = ANY($1::bigint[]) AND NOT j.paused", job_ids):
                    children.setdefault(r["parent_id"], []).append(_job(r))
                fires: list[tuple[int, int, float, int, dict[str, str], str | None]] = []
                mail: list[bool] = []
                for run in ended:
                    job = jobs.get(run.job_id or 0)  # None: the job was deleted
                    if job is not None and run.status == states.SUCCEEDED:
                        fires += [(child.id, child.creator_id, 0.0, 1, {}, None) for child in children.get(job.id, [])]
                    elif job is not None and self._should_retry(job, run):
                        # A retry starts as the failed run did, with its overrides.
                        fires.append((job.id, run.creator_id, float(job.retry_delay), run.attempt + 1,
                                      run.environment, run.arguments))
                    mail.append(job is not None and self._wants_mail(job, run))
                if fires:
                    await conn.execute(
                        "INSERT INTO job_fires (job_id, creator_id, due_at, attempt, environment, arguments)"
                        " SELECT job_id, creator_id, now() + make_interval(secs => delay), attempt, environment, arguments"
                        " FROM unnest($1::bigint[], $2::bigint[], $3::float8[], $4::int[], $5::jsonb[], $6::text[])"
                        " AS f(job_id, creator_id, delay, attempt, environment, arguments)",
                        *(list(column) for column in zip(*fires, strict=True)),
                    )
                await conn.execute(
                    "UPDATE workloads SET followup_due = false, mail_due_at = CASE WHEN e.mail THEN now() END"
                    " FROM unnest($1::bigint[], $2::bool[]) AS e(id, mail) WHERE workloads.id = e.id",
                    [run.id for run in ended], mail,
                )

    def _wants_mail(self, job: Job, run: Workload) -> bool:
        if not notify.recipients_for(job.recipients, run.status):
            return False
        if self.smtp is None:
            log.warning("job %s has recipients but no SMTP server is configured (CML_SMTP_HOST)", job.public_id)
            return False
        return True

    async def _send_due_mail(self, conn: asyncpg.Connection) -> None:
        """Send the mail ended runs owe, each in a task of its own (a slow SMTP server holds up no
        fire), MAIL_CONCURRENCY at a time. Taking one pushes its due time on by MAIL_LEASE_SECONDS,
        cleared once it is sent: a process that dies meanwhile leaves it to be sent again after
        that, never lost."""
        free = MAIL_CONCURRENCY - len(self._mailing)
        if free <= 0:
            return
        taken = await conn.fetch(
            "UPDATE workloads SET mail_due_at = now() + make_interval(secs => $2) WHERE id IN"
            " (SELECT id FROM workloads WHERE mail_due_at <= now() AND NOT (id = ANY($3::bigint[]))"
            " ORDER BY mail_due_at LIMIT $1 FOR UPDATE SKIP LOCKED) RETURNING id, mail_due_at",
            free, MAIL_LEASE_SECONDS, list(self._mailing),
        )
        for r in taken:
            self._mailing.add(r["id"])
            self.workloads.supervisor.spawn(f"mail-{r['id']}", self._mail_run_end(r["id"], r["mail_due_at"]))

    async def _mail_run_end(self, run_id: int, lease: datetime) -> None:
        try:
            run = await workload_store.get_by_id(self.pool, run_id)
            row = await self.pool.fetchrow(_SELECT + " WHERE j.id = $1", run.job_id) if run and run.job_id else None
            if run is not None and row is not None:
                await self._notify(_job(row), run)
            # Sent, or refused by the server (logged; not tried again), or its job is gone. Only
            # this lease is cleared: one that ran out meanwhile belongs to whoever took it next.
            await self.pool.execute("UPDATE workloads SET mail_due_at = NULL WHERE id = $1 AND mail_due_at = $2",
                                    run_id, lease)
        finally:
            self._mailing.discard(run_id)
            self.wake.set()  # more mail may be waiting for a free slot

    async def _notify(self, job: Job, run: Workload) -> None:
        """Mail the job's recipients that asked to hear about this ending."""
        to = notify.recipients_for(job.recipients, run.status)
        if not to or self.smtp is None:
            return
        project = await self.pool.fetchrow("SELECT public_id, name FROM projects WHERE id = $1", job.project_id)
        message = notify.build_message(
            sender=self.smtp.sender, to=to, job_name=job.name, project_name=project["name"], status=run.status,
            reason=run.reason, run_url=f"{self.base_url}/projects/{project['public_id']}/jobs/{job.public_id}/runs/{run.public_id}",
            log_tail=self._log_tail(run), project_dir=self.workloads.projects_dir / project["public_id"],
            attachments=job.attachments,
        )
        try:
            await notify.send(self.smtp, message)
        except (OSError, smtplib.SMTPException) as exc:
            log.warning("could not mail the end of run %s: %s", run.public_id, exc)

    def _log_tail(self, run: Workload) -> str:
        size = self.workloads.logs.size(run.public_id)
        data = self.workloads.logs.read(run.public_id, max(0, size - notify.LOG_TAIL_BYTES), notify.LOG_TAIL_BYTES)
        return data.decode("utf-8", errors="replace")
