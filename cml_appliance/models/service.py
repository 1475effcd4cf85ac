"""Model rules: models with an access key, builds (immutable snapshots of the project's files plus
the file and function to serve), deployments (replicas as workloads) and calls to /model."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import json
import logging
import os
import secrets
import shutil
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from cml_appliance.api.listing import CREATOR_KEYS, ListQuery, sql_where_and_order
from cml_appliance.auth import api_keys
from cml_appliance.auth.permissions import Role
from cml_appliance.auth.users import User, get_by_id
from cml_appliance.core import audit
from cml_appliance.core.errors import (
    AlreadyExists,
    AppError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from cml_appliance.core.ids import new_public_id
from cml_appliance.core.processes import process_exists
from cml_appliance.core.security import token_digest
from cml_appliance.core.tasks import Supervisor
from cml_appliance.db.pool import try_advisory_lock
from cml_appliance.builds.image import BuildFailed, BuildSpec, ImageBuilder, function_problem
from cml_appliance.builds.queue import ACTIVE as BUILD_ACTIVE
from cml_appliance.builds.queue import BuildQueue
from cml_appliance.experiments.registry import ModelRegistry
from cml_appliance.gitserver.repos import GitError, SnapshotTooLarge
from cml_appliance.models.replica_link import ReplicaLink
from cml_appliance.registry.client import RegistryError
from cml_appliance.projects import files
from cml_appliance.projects import store as project_store
from cml_appliance.projects.service import ProjectService, check_environment, check_name
from cml_appliance.projects.store import Project
from cml_appliance.workloads import states
from cml_appliance.workloads import store as workload_store
from cml_appliance.workloads.checks import (
    check_no_gpus,
    check_runtime,
    resources_within_profiles,
)
from cml_appliance.workloads.service import LaunchRequest, WorkloadService
from cml_appliance.workloads.store import Workload

log = logging.getLogger(__name__)

REPLICA_SERVER = Path(__file__).with_name("replica_server.py")
# Where a local replica's Unix socket is (replica_server.py).
SOCKET_VARIABLE = "CML_MODEL_SOCKET"
SERVER_NAME = ".cml_model_server.py"


def _function_problem_on_disk(directory: Path, file_path: str, function_name: str) -> str:
    try:
        target = files.resolve(Path(os.path.realpath(directory)), file_path)
        source = target.read_bytes() if target.is_file() else None
    except (AppError, OSError):
        source = None
    return function_problem(source, file_path, function_name)


# A build of a registered model version: its files and entry point, in the snapshot only.
REGISTERED_DIR = ".cml/registered-model"
REGISTERED_ENTRY_PATH = f"{REGISTERED_DIR}/predict.py"
REGISTERED_ENTRY = Path(__file__).with_name("registered_model_entry.py")


def _registered_files(version_dir: Path) -> dict[str, bytes]:
    out = {REGISTERED_ENTRY_PATH: REGISTERED_ENTRY.read_bytes()}
    for path in sorted(version_dir.rglob("*")):
        if path.is_file() and not path.is_symlink():
            out[f"{REGISTERED_DIR}/model/{path.relative_to(version_dir).as_posix()}"] = path.read_bytes()
    if f"{REGISTERED_DIR}/model/MLmodel" not in out:
        raise InvalidArgument("the registered model version has no MLmodel file: its files are missing")
    return out


class _NoBuilder:
    """Stands in for the builder when there is no registry: every build fails saying why."""

    def __init__(self, why: str):
        self.why = why

    async def build(self, *args: Any) -> Any:
        raise BuildFailed(f"images cannot be built: {self.why}")


def new_access_key() -> str:
    """CML's model access keys: 32 lower-case letters and digits, starting with m."""
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
    return "m" + "".join(secrets.choice(alphabet) for _ in range(31))


def _record(cls: Any, row: asyncpg.Record, **extra: Any) -> Any:
    names = {f.name for f in dataclasses.fields(cls)} - set(extra)
    return cls(**{k: row[k] for k in names}, **extra)


# search_filter and sort keys of the model lists (CML's), as SQL over models m (u: its creator)...
MODEL_FILTER_KEYS = {"name": "m.name", "description": "m.description", "auth_enabled": "m.auth_enabled"} | CREATOR_KEYS
MODEL_SORT_KEYS = MODEL_FILTER_KEYS | {"created_at": "m.created_at", "updated_at": "m.updated_at"}
# ... and over model_builds b (u: who made it). Builds have no CRN here: it is always "".
BUILD_FILTER_KEYS = {"comment": "b.comment", "status": "b.status", "crn": "''"} | CREATOR_KEYS
BUILD_SORT_KEYS = {k: v for k, v in BUILD_FILTER_KEYS.items() if k != "crn"} | {
    "created_at": "b.created_at", "updated_at": "b.updated_at", "built_at": "b.built_at"}


@dataclasses.dataclass(frozen=True)
class Model:
    id: int
    public_id: str
    project_id: int
    creator_id: int
    name: str
    description: str
    access_key: str
    auth_enabled: bool
    created_at: datetime
    updated_at: datetime


@dataclasses.dataclass(frozen=True)
class Build:
    id: int
    public_id: str
    model_id: int
    creator_id: int
    comment: str
    file_path: str
    function_name: str
    runtime_identifier: str
    status: str
    failure: str
    created_at: datetime
    updated_at: datetime
    built_at: datetime | None
    snapshot_commit: str
    built_image: str
    image_digest: str
    attempts: int
    started_at: datetime | None
    finished_at: datetime | None
    model_root_dir: str
    build_script_path: str
    registered_model_version_id: str

    @property
    def active(self) -> bool:
        return self.status in BUILD_ACTIVE

    @property
    def model_file(self) -> str:
        """file_path within model_root_dir: what the replicas import."""
        return f"{self.model_root_dir}/{self.file_path}" if self.model_root_dir else self.file_path


@dataclasses.dataclass(frozen=True)
class Deployment:
    id: int
    public_id: str
    model_id: int
    build_id: int
    deployer_id: int
    cpu: float
    memory: float
    replicas: int
    environment: dict[str, str]
    stopped: bool
    created_at: datetime
    updated_at: datetime
    stopped_at: datetime | None


def deployment_status(deployment: Deployment, runs: list[Workload]) -> str:
    """CML's deployment status words: deployed, deploying, stopping, stopped, failed."""
    active = [r for r in runs if r.active]
    if deployment.stopped:
        return "stopping" if active else "stopped"
    running = [r for r in active if r.status == states.RUNNING]
    if len(running) >= deployment.replicas:
        return "deployed"
    if active:
        return "deploying"
    return "failed"


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


# Replacing replicas that die: a pause of 1 s, doubling with each one lost lately, and at most
# MAX_REPLACEMENTS within REPLACE_WINDOW (a crash loop).
REPLACE_PAUSE_SECONDS = 1.0
MAX_REPLACEMENTS = 5
REPLACE_WINDOW = timedelta(minutes=5)
RESUME_LOCK = 0x434D4C30
CALL_CACHE_SECONDS = 2.0
MAX_REMEMBERED = 10_000


SOCKETS_DIR_PREFIX = "cml-replicas-"


def _new_sockets_dir() -> Path:
    """A directory for local replicas' sockets, named after this process; those of processes that
    are gone (killed, so they could not remove theirs) are removed. Kept in the temporary
    directory, not the data directory: a socket's path must stay under about 100 bytes."""
    for old in Path(tempfile.gettempdir()).glob(f"{SOCKETS_DIR_PREFIX}*-*"):
        pid = old.name[len(SOCKETS_DIR_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not process_exists(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"{SOCKETS_DIR_PREFIX}{os.getpid()}-"))



@dataclasses.dataclass(frozen=True)
class BuildSettings:
    builder: ImageBuilder | None  # None: no registry, and why not in no_builder
    no_builder: str
    internal_url: str  # the git server, on the internal listener
    snapshot_max_bytes: int
    concurrency: int
    timeout_seconds: float
    lease_seconds: float = 30.0


class ModelService:
    def __init__(self, pool: asyncpg.Pool, projects: ProjectService, workloads: WorkloadService, supervisor: Supervisor,
                 *, builds_dir: Path, builds: BuildSettings, registry: ModelRegistry | None = None):
        self.pool = pool
        self.registry = registry
        self.projects = projects
        self.workloads = workloads
        self.supervisor = supervisor
        self.builds_dir = builds_dir
        self.build_settings = builds
        self.queue = BuildQueue(pool, builds.builder or _NoBuilder(builds.no_builder), workloads.logs, supervisor,  # type: ignore[arg-type]
                                concurrency=builds.concurrency, timeout_seconds=builds.timeout_seconds,
                                lease_seconds=builds.lease_seconds,
                                spec_for=self._build_spec, release=self._release_build_key, finished=self._build_finished)
        self._build_keys: dict[str, str] = {}  # build id -> the key_id of its fetch key
        self._next_replica: dict[int, int] = {}
        self._busy: dict[int, asyncio.Lock] = {}
        # Local replicas also listen on a Unix socket in this (short: sun_path has 108 bytes)
        # directory, and calls reach them through it, in frames; one connection per socket.
        self._sockets_dir: Path | None = None
        self._links: dict[str, ReplicaLink] = {}
        # Calls waiting for a free replica, per model, longest waiting first.
        self._waiters: dict[int, collections.deque[asyncio.Future[None]]] = {}
        # Lost replicas being replaced, per deployment (see _replace).
        self._replacing: collections.Counter[int] = collections.Counter()
        # Calls come many a second: what they look up is kept CALL_CACHE_SECONDS, and forgotten
        # at once when this process changes a model, a deployment or a replica ends.
        self._by_key: dict[str, tuple[float, Model | None]] = {}
        self._serving: dict[int, tuple[float, list[Workload]]] = {}
        self._callers: dict[tuple[str, int], float] = {}
        workloads.finish_listeners.append(self._workload_ended)

    # Models ------------------------------------------------------------------------------------

    async def get_model(self, user: User, project_id: str, model_id: str, needed: Role = Role.READ) -> tuple[Project, Model]:
        project = await self.projects.get(user, project_id, needed)
        row = await self.pool.fetchrow("SELECT * FROM models WHERE public_id = $1 AND project_id = $2", model_id, project.id)
        if row is None:
            raise NotFound(f"model {model_id!r} not found")
        return project, _record(Model, row)

    async def list_models(self, user: User, project_id: str | None, q: ListQuery) -> tuple[list[tuple[str, Model]], bool]:
        select = ("SELECT m.*, p.public_id AS project_public_id FROM models m JOIN projects p ON p.id = m.project_id"
                  " JOIN users u ON u.id = m.creator_id")
        if project_id is not None:
            project = await self.projects.get(user, project_id, Role.READ)
            args: list[Any] = [project.id, q.page_size + 1, q.offset]
            where, order = sql_where_and_order(q, MODEL_FILTER_KEYS, MODEL_SORT_KEYS, "m.created_at DESC, m.id DESC", args)
            rows = await self.pool.fetch(select + f" WHERE m.project_id = $1 AND {where} ORDER BY {order} LIMIT $2 OFFSET $3", *args)
        else:
            args = [user.id, user.is_admin, q.page_size + 1, q.offset, user.scope_project_id]
            where, order = sql_where_and_order(q, MODEL_FILTER_KEYS, MODEL_SORT_KEYS, "m.created_at DESC, m.id DESC", args)
            rows = await self.pool.fetch(
                select + " LEFT JOIN project_collaborators c ON c.project_id = p.id AND c.user_id = $1"
                " WHERE (p.owner_id = $1 OR c.user_id IS NOT NULL OR p.visibility = 'public' OR $2)"
                f" AND ($5::bigint IS NULL OR p.id = $5) AND {where} ORDER BY {order} LIMIT $3 OFFSET $4", *args)
        return [(r["project_public_id"], _record(Model, r)) for r in rows[:q.page_size]], len(rows) > q.page_size

    async def create_model(self, user: User, project_id: str, fields: dict[str, Any]) -> tuple[Model, Build | None, Deployment | None]:
        project = await self.projects.get(user, project_id, Role.WRITE)
        name = check_name(fields.get("name", ""))
        if fields.get("auto_build_model"):
            # Bad build or deployment settings are refused before the model exists (a retry
            # would otherwise find its name taken).
            await self._check_build_fields(fields.get("auto_build_config") or {})
            if fields.get("auto_deploy_model"):
                await self._check_deployment_fields(fields.get("auto_deployment_config") or {})
        public_id = new_public_id()
        async with self.pool.acquire() as conn, conn.transaction():
            try:
                await conn.execute(
                    "INSERT INTO models (public_id, project_id, creator_id, name, description, access_key, auth_enabled)"
                    " VALUES ($1, $2, $3, $4, $5, $6, $7)",
                    public_id, project.id, user.id, name, fields.get("description", ""), new_access_key(),
                    not fields.get("disable_authentication", False))
            except asyncpg.UniqueViolationError:
                raise AlreadyExists(f"the project already has a model named {name!r}") from None
            await audit.record(conn, user.id, "model.create", "model", public_id, {"name": name})
        _, model = await self.get_model(user, project_id, public_id)
        build = deployment = None
        if fields.get("auto_build_model"):
            build_fields = dict(fields.get("auto_build_config") or {})
            if fields.get("auto_deploy_model"):
                build_fields["auto_deploy_model"] = True
                build_fields["auto_deployment_config"] = fields.get("auto_deployment_config") or {}
            build = await self.create_build(user, project_id, model.public_id, build_fields)
        return model, build, deployment

    async def summaries(self, user: User, project_id: str) -> list[dict[str, Any]]:
        """Each model of a project with its newest build and deployment and the status to show."""
        pairs, _ = await self.list_models(user, project_id, ListQuery.first(500))
        ids = [m.id for _, m in pairs]
        latest = {r["model_id"]: _record(Deployment, r) for r in await self.pool.fetch(
            "SELECT DISTINCT ON (model_id) * FROM model_deployments WHERE model_id = ANY($1::bigint[])"
            " ORDER BY model_id, created_at DESC, id DESC", ids)}
        builds = {r["model_id"]: _record(Build, r) for r in await self.pool.fetch(
            "SELECT DISTINCT ON (model_id) * FROM model_builds WHERE model_id = ANY($1::bigint[])"
            " ORDER BY model_id, created_at DESC, id DESC", ids)}
        rows = []
        for _, model in pairs:
            deployment, build = latest.get(model.id), builds.get(model.id)
            if deployment is not None:
                shown = await self.status_of(deployment)
            else:
                shown = build.status if build is not None else "not built"
            rows.append({"model": model, "deployment": deployment, "build": build, "status": shown})
        return rows

    async def update_model(self, user: User, project_id: str, model_id: str, fields: dict[str, Any]) -> Model:
        _, model = await self.get_model(user, project_id, model_id, Role.WRITE)
        name = check_name(fields["name"]) if "name" in fields else model.name
        try:
            await self.pool.execute("UPDATE models SET name = $2, description = $3, updated_at = now() WHERE id = $1",
                                    model.id, name, fields.get("description", model.description))
        except asyncpg.UniqueViolationError:
            raise AlreadyExists(f"the project already has a model named {name!r}") from None
        return (await self.get_model(user, project_id, model_id))[1]

    async def regenerate_key(self, user: User, project_id: str, model_id: str) -> Model:
        _, model = await self.get_model(user, project_id, model_id, Role.WRITE)
        await self.pool.execute("UPDATE models SET access_key = $2, updated_at = now() WHERE id = $1", model.id, new_access_key())
        self.forget_calls()  # the old key stops working here at once
        return (await self.get_model(user, project_id, model_id))[1]

    async def delete_model(self, user: User, project_id: str, model_id: str) -> None:
        _, model = await self.get_model(user, project_id, model_id, Role.WRITE)
        for run in await self._runs("d.model_id = $1", model.id):
            if run.active:
                await self.workloads.stop(run, reason="its model was deleted")
        builds = [r["public_id"] for r in await self.pool.fetch("SELECT public_id FROM model_builds WHERE model_id = $1", model.id)]
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("DELETE FROM models WHERE id = $1", model.id)
            await audit.record(conn, user.id, "model.delete", "model", model.public_id, {"name": model.name})
        self.forget_calls()
        for build in builds:
            await asyncio.to_thread(shutil.rmtree, self.builds_dir / build, True)

    # Builds ------------------------------------------------------------------------------------

    async def get_build(self, user: User, project_id: str, model_id: str, build_id: str) -> tuple[Project, Model, Build]:
        project, model = await self.get_model(user, project_id, model_id)
        row = await self.pool.fetchrow("SELECT * FROM model_builds WHERE public_id = $1 AND model_id = $2", build_id, model.id)
        if row is None:
            raise NotFound(f"build {build_id!r} not found")
        return project, model, _record(Build, row)

    async def list_builds(self, user: User, project_id: str, model_id: str, q: ListQuery) -> tuple[Model, list[Build], bool]:
        _, model = await self.get_model(user, project_id, model_id)
        args: list[Any] = [model.id, q.page_size + 1, q.offset]
        where, order = sql_where_and_order(q, BUILD_FILTER_KEYS, BUILD_SORT_KEYS, "b.created_at DESC, b.id DESC", args)
        rows = await self.pool.fetch(
            "SELECT b.* FROM model_builds b JOIN users u ON u.id = b.creator_id"
            f" WHERE b.model_id = $1 AND {where} ORDER BY {order} LIMIT $2 OFFSET $3", *args)
        return model, [_record(Build, r) for r in rows[:q.page_size]], len(rows) > q.page_size

    async def delete_build(self, user: User, project_id: str, model_id: str, build_id: str) -> None:
        """A build and its deployments go; one still building, or with a deployment not stopped
        or a replica not ended, stays. The build's row is locked while that is checked: a
        deployment made meanwhile waits, then finds the build gone."""
        _, model, build = await self.get_build(user, project_id, model_id, build_id)
        await self.projects.get(user, project_id, Role.WRITE)
        if build.active:  # a build being made is cancelled first
            await self.queue.cancel(build.public_id)
            await self._wait_ended(build.public_id)
        async with self.pool.acquire() as conn, conn.transaction():
            status = await conn.fetchval("SELECT status FROM model_builds WHERE id = $1 FOR UPDATE", build.id)
            if status is None:
                raise NotFound(f"build {build_id!r} not found")
            if status in BUILD_ACTIVE:
                raise FailedPrecondition(f"build {build.public_id} is still being made ({status}): cancel it, or delete it once it is done")
            serving = await conn.fetchval(
                "SELECT count(*) FROM model_deployments d LEFT JOIN workloads w ON w.deployment_id = d.id"
                " AND w.status = ANY($2::text[]) WHERE d.build_id = $1 AND (NOT d.stopped OR w.id IS NOT NULL)",
                build.id, list(states.ACTIVE))
            if serving:
                raise FailedPrecondition(f"build {build.public_id} is deployed: stop its deployments first")
            await conn.execute("DELETE FROM model_builds WHERE id = $1", build.id)
            await audit.record(conn, user.id, "model_build.delete", "model_build", build.public_id, {"model": model.public_id})
        self.forget_calls()
        await asyncio.to_thread(shutil.rmtree, self.builds_dir / build.public_id, True)
        await self._forget_build_artifacts(model, build)

    async def _forget_build_artifacts(self, model: Model, build: Build) -> None:
        """A deleted build's tag in the registry and its snapshot ref go too (best effort: a
        registry that is away leaves an orphan tag, said in the log)."""
        builder = self.build_settings.builder
        if build.built_image and builder is not None:
            repository, _, tag = build.built_image.rpartition(":")
            try:
                await builder.registry.delete_manifest(repository, tag)
            except (RegistryError, OSError, aiohttp.ClientError) as exc:
                log.warning("could not delete the image of build %s: %s", build.public_id, exc)
        project = await self.pool.fetchrow("SELECT public_id FROM projects WHERE id = $1", model.project_id)
        if project is not None:
            await self.projects.repos.forget_snapshot(self.projects.projects_dir / project["public_id"], build.public_id)
        self.workloads.logs.delete(build.public_id)

    async def create_build(self, user: User, project_id: str, model_id: str, fields: dict[str, Any]) -> Build:
        """Snapshot the project's files (a hidden commit) and queue the build; the queue makes the
        image, and deploys it when the create asked for that. A build of a registered model
        version adds that version's files and an entry point that serves them (the snapshot
        only: the project's files stay as they are)."""
        project, model = await self.get_model(user, project_id, model_id, Role.WRITE)
        version_id = str(fields.get("registered_model_version_id") or "")
        extra: dict[str, bytes] = {}
        if version_id:
            extra = await self._registered_version_files(user, version_id)
            fields["file_path"] = fields.get("file_path") or REGISTERED_ENTRY_PATH
            fields["function_name"] = fields.get("function_name") or "predict"
        file_path, function_name, runtime_id = await self._check_build_fields(fields)
        deploy = fields.get("auto_deployment_config") if fields.get("auto_deploy_model") else None
        if deploy is not None:
            await self._check_deployment_fields(deploy or {})
        public_id = new_public_id()
        commit, failure = "", ""
        directory = self.projects.directory(project)
        root, script = fields.get("model_root_dir") or "", fields.get("build_script_path") or ""
        model_file = f"{root}/{file_path}" if root else file_path
        try:
            # What the builder checks again on the snapshot, said at once: a missing file or function.
            if model_file in extra:
                failure = function_problem(extra[model_file], model_file, function_name)
            else:
                failure = await asyncio.to_thread(_function_problem_on_disk, directory, model_file, function_name)
            if not failure:
                snapshot = await self.projects.repos.snapshot(directory, public_id, extra=extra,
                                                              max_bytes=self.build_settings.snapshot_max_bytes)
                commit = snapshot.commit
        except SnapshotTooLarge as exc:
            failure = str(exc)
        except GitError as exc:
            failure = f"could not snapshot the project's files: {exc}"[:2000]
        await self.pool.execute(
            "INSERT INTO model_builds (public_id, model_id, creator_id, comment, file_path, function_name, runtime_identifier,"
            " status, failure, snapshot_commit, deploy_config, finished_at, model_root_dir, build_script_path,"
            " registered_model_version_id)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11::jsonb, CASE WHEN $8 = 'build failed' THEN now() END, $12, $13, $14)",
            public_id, model.id, user.id, fields.get("comment", ""), file_path, function_name, runtime_id,
            "build failed" if failure else "queued", failure, commit, json.dumps(deploy) if deploy is not None else None,
            root, script, version_id)
        if failure:
            self.queue.say(public_id, f"Failed: {failure}")
            self.workloads.logs.close(public_id)
        else:
            self.queue.say(public_id, f"Snapshot of the project's files: commit {commit[:12]} "
                                      f"({snapshot.files} files, {snapshot.bytes / 1e6:.1f} MB)")
            await self.queue.enqueue(public_id)
        return (await self.get_build(user, project_id, model_id, public_id))[2]

    async def _registered_version_files(self, user: User, version_id: str) -> dict[str, bytes]:
        """A registered model version's files and the entry point that serves them, as snapshot
        paths under REGISTERED_DIR."""
        if self.registry is None:
            raise InvalidArgument("this appliance has no model registry")
        _, version = await self.registry.version_by_id(user, version_id)
        return await asyncio.to_thread(_registered_files, self.registry.files_of(version))

    async def _check_build_fields(self, fields: dict[str, Any]) -> tuple[str, str, str]:
        """(file_path, function_name, runtime) of a build to be made, or a 400 saying what is wrong.
        model_root_dir and build_script_path are checked here too (paths inside the project)."""
        for name in ("model_root_dir", "build_script_path"):
            if fields.get(name):
                fields[name] = files.clean_relative(str(fields[name]))
        file_path = files.clean_relative(fields.get("file_path", ""))
        function_name = (fields.get("function_name") or "").strip()
        if not file_path or not function_name.isidentifier():
            raise InvalidArgument("file_path (a .py file in the project) and function_name (a Python name) are required")
        return file_path, function_name, await check_runtime(self.pool, fields.get("runtime_identifier"))

    async def _check_deployment_fields(self, fields: dict[str, Any]) -> tuple[float, float, int, dict[str, str]]:
        """(cpu, memory, replicas, environment) of a deployment to be made, or a 400."""
        check_no_gpus(fields.get("nvidia_gpus", 0))
        if fields.get("deployment_secrets"):
            raise InvalidArgument("deployment_secrets are not supported yet: pass them in environment")
        replicas = fields.get("replicas", 1)
        if not 1 <= replicas <= 32:
            raise InvalidArgument("replicas must be between 1 and 32")
        cpu, memory = await resources_within_profiles(self.pool, fields)
        return cpu, memory, replicas, check_environment(fields.get("environment", {}))

    async def _wait_ended(self, build_id: str, timeout: float = 30) -> None:
        """Until a cancelled build has ended (at once here; a worker in another process hears of
        it when it next renews its lease)."""
        deadline = time.monotonic() + timeout
        while await self.pool.fetchval("SELECT status = ANY($2::text[]) FROM model_builds WHERE public_id = $1",
                                       build_id, list(BUILD_ACTIVE)):
            if time.monotonic() > deadline:
                raise Unavailable(f"build {build_id} is still stopping: try again in a moment")
            await asyncio.sleep(0.1)

    async def cancel_build(self, user: User, project_id: str, model_id: str, build_id: str) -> Build:
        _, _, build = await self.get_build(user, project_id, model_id, build_id)
        await self.projects.get(user, project_id, Role.WRITE)
        if not await self.queue.cancel(build.public_id):
            raise FailedPrecondition(f"build {build.public_id} has already ended ({build.status})")
        return (await self.get_build(user, project_id, model_id, build_id))[2]

    async def _build_spec(self, row: asyncpg.Record) -> BuildSpec:
        """What the builder needs for a claimed build, with a key of its own to fetch the
        snapshot from the git server (the creator's, reaching this project only, for an hour)."""
        info = await self.pool.fetchrow(
            "SELECT m.public_id AS model_id, p.id AS project_id, p.slug, ow.username AS owner, u.username AS creator"
            " FROM models m JOIN projects p ON p.id = m.project_id JOIN users ow ON ow.id = p.owner_id"
            " JOIN users u ON u.id = $2 WHERE m.id = $1", row["model_id"], row["creator_id"])
        if info is None:
            raise BuildFailed("the model or its project is gone")
        secret, self._build_keys[row["public_id"]] = await api_keys.short_lived_key(
            self.pool, row["creator_id"], info["project_id"], f"build {row['public_id']}", 3600)
        return BuildSpec(
            build_id=row["public_id"], model_id=info["model_id"], owner=info["owner"], project_slug=info["slug"],
            commit=row["snapshot_commit"], runtime_identifier=row["runtime_identifier"], file_path=row["file_path"],
            function_name=row["function_name"], git_url=f"{self.build_settings.internal_url}/git/{info['owner']}/{info['slug']}.git",
            git_user=info["creator"], git_password=secret, model_root_dir=row["model_root_dir"],
            build_script_path=row["build_script_path"])

    async def _release_build_key(self, row: asyncpg.Record) -> None:
        key_id = self._build_keys.pop(row["public_id"], None)
        if key_id is not None:
            await api_keys.revoke(self.pool, key_id)

    async def _build_finished(self, build_id: str, status: str) -> None:
        """A build ended: deploy it if its create asked for that."""
        row = await self.pool.fetchrow(
            "SELECT b.deploy_config, b.creator_id, m.public_id AS model_id, p.public_id AS project_id FROM model_builds b"
            " JOIN models m ON m.id = b.model_id JOIN projects p ON p.id = m.project_id WHERE b.public_id = $1", build_id)
        if row is None or status != "built" or row["deploy_config"] is None:
            return
        user = await get_by_id(self.pool, row["creator_id"])
        if user is None:
            return
        try:
            await self.create_deployment(user, row["project_id"], row["model_id"], build_id, dict(json.loads(row["deploy_config"])))
        except AppError as exc:
            self.queue.say(build_id, f"Built, but not deployed: {exc.message}")
            log.warning("build %s: the automatic deployment failed: %s", build_id, exc.message)

    # Deployments -------------------------------------------------------------------------------

    async def get_deployment(self, user: User, project_id: str, model_id: str, build_id: str, deployment_id: str) -> tuple[Project, Model, Build, Deployment]:
        project, model, build = await self.get_build(user, project_id, model_id, build_id)
        row = await self.pool.fetchrow("SELECT * FROM model_deployments WHERE public_id = $1 AND build_id = $2", deployment_id, build.id)
        if row is None:
            raise NotFound(f"deployment {deployment_id!r} not found")
        return project, model, build, _record(Deployment, row)

    async def list_deployments(self, user: User, project_id: str, model_id: str, build_id: str) -> tuple[Build, list[Deployment]]:
        _, _, build = await self.get_build(user, project_id, model_id, build_id)
        rows = await self.pool.fetch("SELECT * FROM model_deployments WHERE build_id = $1 ORDER BY created_at DESC, id DESC", build.id)
        return build, [_record(Deployment, r) for r in rows]

    async def status_of(self, deployment: Deployment, runs: list[Workload] | None = None) -> str:
        """The deployment's status; "deploying", not "failed", while a lost replica is being replaced."""
        status = deployment_status(deployment, await self.replicas(deployment) if runs is None else runs)
        return "deploying" if status == "failed" and deployment.id in self._replacing else status

    async def replicas(self, deployment: Deployment) -> list[Workload]:
        return await self._runs("w.deployment_id = $1", deployment.id)

    async def _runs(self, where: str, value: int) -> list[Workload]:
        rows = await self.pool.fetch(
            workload_store.SELECT + f" LEFT JOIN model_deployments d ON d.id = w.deployment_id WHERE {where} ORDER BY w.id", value)
        return [workload_store.from_row(r) for r in rows]

    async def create_deployment(self, user: User, project_id: str, model_id: str, build_id: str, fields: dict[str, Any]) -> Deployment:
        project, model, build = await self.get_build(user, project_id, model_id, build_id)
        await self.projects.get(user, project_id, Role.WRITE)
        if build.status != "built":
            raise FailedPrecondition(f"build {build.public_id} cannot be deployed: {build.status} {build.failure}".strip())
        cpu, memory, replicas, environment = await self._check_deployment_fields(fields)
        public_id = new_public_id()
        # A new deployment replaces the model's running ones once it is up (no downtime gap).
        previous = await self.pool.fetch("SELECT id FROM model_deployments WHERE model_id = $1 AND NOT stopped", model.id)
        try:
            row = await self.pool.fetchrow(
                "INSERT INTO model_deployments (public_id, model_id, build_id, deployer_id, cpu, memory, replicas, environment)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING *",
                public_id, model.id, build.id, user.id, cpu, memory, replicas, environment)
        except asyncpg.ForeignKeyViolationError:
            raise NotFound(f"build {build_id!r} was deleted") from None
        deployment = _record(Deployment, row)
        await self._start_replicas(user, project, build, deployment)
        if previous:
            self.supervisor.spawn(f"replace-{public_id}", self._retire_when_up(deployment, [r["id"] for r in previous]))
        return deployment

    async def _start_replicas(self, user: User, project: Project, build: Build, deployment: Deployment) -> None:
        for n in range(deployment.replicas):
            await self._start_replica(user, project, build, deployment, f"replica {n + 1}")

    async def _start_replica(self, user: User, project: Project, build: Build, deployment: Deployment, name: str) -> Workload:
        environment = dict(deployment.environment)
        # Built images run on the container engine and on Kubernetes; local replicas run the snapshot.
        on_containers = self.workloads.engine_name_for(build.runtime_identifier) != "local"
        if on_containers and build.built_image:
            # The built image, pulled through the registry proxy on the internal listener with a
            # key of the deployer's that reaches this project only and lasts ten minutes.
            secret, _ = await api_keys.short_lived_key(self.pool, user.id, project.id, f"pull of build {build.public_id}", 600)
            registry = self.build_settings.internal_url.removeprefix("http://")
            return await self.workloads.launch(user, project, LaunchRequest(
                kind="model_replica", name=f"{build.public_id} {name}", runtime_identifier=build.runtime_identifier,
                image=f"{registry}/{build.built_image}", cpu=deployment.cpu, memory=deployment.memory, nvidia_gpu=0,
                command=["python3", "-u", SERVER_NAME, build.model_file, build.function_name],
                environment=environment, deployment_id=deployment.id, mount_project=False,
                registry_auth={"username": user.username, "password": secret, "serveraddress": registry},
            ))
        if not on_containers:
            if self._sockets_dir is None:
                self._sockets_dir = _new_sockets_dir()
            # A folder per replica: a sandboxed replica sees its own socket's folder only.
            folder = self._sockets_dir / secrets.token_hex(6)
            folder.mkdir(mode=0o700)
            environment[SOCKET_VARIABLE] = str(folder / "model.sock")
        return await self.workloads.launch(user, project, LaunchRequest(
            kind="model_replica", name=f"{build.public_id} {name}", runtime_identifier=build.runtime_identifier,
            image=build.runtime_identifier, cpu=deployment.cpu, memory=deployment.memory, nvidia_gpu=0,
            command=["python3", "-u", SERVER_NAME, build.model_file, build.function_name],
            environment=environment, deployment_id=deployment.id, workdir=self.builds_dir / build.public_id,
        ))

    async def resume_deployments(self) -> int:
        """At start-up: deployments that are not stopped get back the replicas they miss (local
        replicas end with the appliance, and a shutdown stops them). Returns how many started."""
        started = 0
        async with try_advisory_lock(self.pool, RESUME_LOCK) as held:
            if held is None:
                return 0  # another appliance process is doing it
            rows = await self.pool.fetch(
                "SELECT d.*, p.public_id AS project_public_id FROM model_deployments d"
                " JOIN models m ON m.id = d.model_id JOIN projects p ON p.id = m.project_id WHERE NOT d.stopped")
            for row in rows:
                deployment = _record(Deployment, row)
                runs = await self.replicas(deployment)
                missing = deployment.replicas - sum(r.active for r in runs)
                owner = await get_by_id(self.pool, deployment.deployer_id)
                build_row = await self.pool.fetchrow("SELECT * FROM model_builds WHERE id = $1", deployment.build_id)
                if missing <= 0 or owner is None or build_row is None:
                    continue
                try:
                    project = await self.projects.get(owner, row["project_public_id"], Role.READ)
                    for n in range(missing):
                        await self._start_replica(owner, project, _record(Build, build_row), deployment,
                                                  f"replica {len(runs) + n + 1}")
                        started += 1
                except AppError as exc:
                    log.warning("could not resume deployment %s: %s", deployment.public_id, exc)
        return started

    async def _replace(self, dead: Workload) -> None:
        """A replica that ended by itself (crashed, killed, lost in a restart) is replaced, after a
        pause that doubles with each replica the deployment lost lately. A deployment gets at most
        MAX_REPLACEMENTS new replicas per replica within REPLACE_WINDOW (a crash loop); then it
        shows failed."""
        deployment_id = dead.deployment_id or 0
        self._replacing[deployment_id] += 1
        try:
            await self._replace_after_pause(dead)
        finally:
            self._replacing[deployment_id] -= 1
            if self._replacing[deployment_id] <= 0:
                del self._replacing[deployment_id]

    @property
    def replacements_pending(self) -> int:
        """Lost replicas whose replacement is waiting out its pause or starting (a metric)."""
        return sum(self._replacing.values())

    async def _replace_after_pause(self, dead: Workload) -> None:
        for attempt in range(2):  # look again after the pause: stopped or restarted meanwhile?
            row = await self.pool.fetchrow("SELECT * FROM model_deployments WHERE id = $1", dead.deployment_id)
            if row is None or row["stopped"]:
                return
            deployment = _record(Deployment, row)
            runs = await self.replicas(deployment)
            if sum(r.active for r in runs) >= deployment.replicas:
                return
            since = datetime.now(UTC) - REPLACE_WINDOW
            lost = [r for r in runs if r.status in (states.FAILED, states.SUCCEEDED) and r.finished_at and r.finished_at > since]
            if len(lost) > MAX_REPLACEMENTS * deployment.replicas:
                log.warning("deployment %s lost %d replicas in %s: not replacing them any more",
                            deployment.public_id, len(lost), REPLACE_WINDOW)
                return
            if attempt == 0:
                await asyncio.sleep(REPLACE_PAUSE_SECONDS * 2 ** max(0, len(lost) - 1))
        owner = await get_by_id(self.pool, dead.creator_id)
        build_row = await self.pool.fetchrow("SELECT * FROM model_builds WHERE id = $1", deployment.build_id)
        if owner is None or build_row is None:
            return
        try:
            project = await self.projects.get(owner, dead.project_public_id, Role.READ)
            replica = await self._start_replica(owner, project, _record(Build, build_row), deployment, f"replica {len(runs) + 1}")
        except AppError as exc:
            log.warning("could not replace replica %s of deployment %s: %s", dead.public_id, deployment.public_id, exc)
            return
        # A stop that came while this one started would not have seen it: stop it now.
        if await self.pool.fetchval("SELECT stopped FROM model_deployments WHERE id = $1", deployment.id) is not False:
            await self.workloads.stop(replica, reason="its deployment was stopped")

    async def _retire_when_up(self, deployment: Deployment, previous: list[int]) -> None:
        for _ in range(600):
            if deployment_status(deployment, await self.replicas(deployment)) in ("deployed", "failed", "stopped"):
                break
            await asyncio.sleep(0.2)
        for deployment_id in previous:
            await self._stop_deployment_id(deployment_id, "replaced by a newer deployment")

    async def _stop_deployment_id(self, deployment_id: int, reason: str) -> None:
        await self.pool.execute("UPDATE model_deployments SET stopped = true, stopped_at = now(), updated_at = now() WHERE id = $1",
                                deployment_id)
        self.forget_calls()
        for run in await self._runs("w.deployment_id = $1", deployment_id):
            if run.active:
                await self.workloads.stop(run, reason=reason)

    async def stop_deployment(self, user: User, project_id: str, model_id: str, build_id: str, deployment_id: str) -> Deployment:
        _, _, _, deployment = await self.get_deployment(user, project_id, model_id, build_id, deployment_id)
        await self.projects.get(user, project_id, Role.WRITE)
        await self._stop_deployment_id(deployment.id, f"stopped by {user.username}")
        return (await self.get_deployment(user, project_id, model_id, build_id, deployment_id))[3]

    async def restart_deployment(self, user: User, project_id: str, model_id: str, build_id: str, deployment_id: str) -> Deployment:
        project, model, build, deployment = await self.get_deployment(user, project_id, model_id, build_id, deployment_id)
        await self.projects.get(user, project_id, Role.WRITE)
        old = [r for r in await self.replicas(deployment) if r.active]
        # Restarting an older deployment makes it the model's one: the others go once it is up.
        others = await self.pool.fetch(
            "SELECT id FROM model_deployments WHERE model_id = $1 AND NOT stopped AND id <> $2", model.id, deployment.id)
        await self.pool.execute("UPDATE model_deployments SET stopped = false, stopped_at = NULL, updated_at = now() WHERE id = $1",
                                deployment.id)
        refreshed = (await self.get_deployment(user, project_id, model_id, build_id, deployment_id))[3]
        for run in old:
            await self.workloads.stop(run, reason=f"restarted by {user.username}")
        self.forget_calls()
        await self._start_replicas(user, project, build, refreshed)
        if others:
            self.supervisor.spawn(f"replace-{deployment.public_id}", self._retire_when_up(refreshed, [r["id"] for r in others]))
        return refreshed

    # Calls ---------------------------------------------------------------------------------------

    def forget_calls(self) -> None:
        self._by_key.clear()
        self._serving.clear()
        self._callers.clear()

    def link_for(self, replica: Workload) -> ReplicaLink | None:
        """The connection to a local replica through its Unix socket, else None (call it over HTTP)."""
        path = replica.environment.get(SOCKET_VARIABLE) if replica.engine == "local" else None
        if path is None:
            return None
        link = self._links.get(path)
        if link is None:
            link = self._links[path] = ReplicaLink(path)
        return link

    async def close(self) -> None:
        links, self._links = list(self._links.values()), {}
        for link in links:
            link.close()
        if self._sockets_dir is not None:
            shutil.rmtree(self._sockets_dir, ignore_errors=True)

    async def _workload_ended(self, run: Workload) -> None:
        if run.kind != "model_replica":
            return
        self.forget_calls()
        path = run.environment.get(SOCKET_VARIABLE)
        if path is not None:
            with contextlib.suppress(OSError):
                os.unlink(path)
            with contextlib.suppress(OSError):
                os.rmdir(os.path.dirname(path))
            link = self._links.pop(path, None)
            if link is not None:
                link.close()  # a call on it now sees the connection lost, and moves on to another replica
        if run.status in (states.FAILED, states.SUCCEEDED) and run.deployment_id is not None:
            await self._replace(run)

    async def model_by_key(self, access_key: str) -> Model | None:
        now = time.monotonic()
        seen = self._by_key.get(access_key)
        if seen is not None and now - seen[0] < CALL_CACHE_SECONDS:
            return seen[1]
        row = await self.pool.fetchrow("SELECT * FROM models WHERE access_key = $1", access_key)
        model = _record(Model, row) if row else None
        if len(self._by_key) >= MAX_REMEMBERED:
            self._by_key.clear()
        self._by_key[access_key] = (now, model)
        return model

    async def caller_known(self, api_key: str) -> int:
        """For a call with an unknown access key: 401 for a bad API key, else 403 (as may_call)."""
        checked = await api_keys.check(self.pool, api_key, "API")
        return 401 if checked.problem or checked.user is None else 403

    async def may_call(self, model: Model, api_key: str) -> int:
        """0 when the key's user may call the model (a collaborator of its project), else 401 or 403.
        A yes is kept CALL_CACHE_SECONDS; access taken away can last that much longer."""
        grant = (token_digest(api_key), model.project_id)
        now = time.monotonic()
        if now - self._callers.get(grant, -CALL_CACHE_SECONDS) < CALL_CACHE_SECONDS:
            return 0
        checked = await api_keys.check(self.pool, api_key, "API")
        if checked.problem or checked.user is None:
            return 401
        project_id = await self.pool.fetchval("SELECT public_id FROM projects WHERE id = $1", model.project_id)
        project = await project_store.get(self.pool, checked.user, project_id)
        if project is None or project.role < Role.READ:
            return 403
        if len(self._callers) >= MAX_REMEMBERED:
            self._callers.clear()
        self._callers[grant] = now
        return 0

    async def serving_replicas(self, model: Model) -> list[Workload]:
        now = time.monotonic()
        seen = self._serving.get(model.id)
        if seen is not None and now - seen[0] < CALL_CACHE_SECONDS:
            return seen[1]
        rows = await self.pool.fetch(
            workload_store.SELECT + " JOIN model_deployments d ON d.id = w.deployment_id"
            " WHERE d.model_id = $1 AND NOT d.stopped AND w.status = 'ENGINE_RUNNING' ORDER BY w.id", model.id)
        replicas = [workload_store.from_row(r) for r in rows]
        if replicas:  # none yet is not kept: a deployment's first replica is used as soon as it runs
            self._serving[model.id] = (now, replicas)
        return replicas

    def replica_released(self, model: Model) -> None:
        """A replica of the model is free: wake the call that has waited longest for one."""
        waiters = self._waiters.get(model.id)
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def replica_freed(self, model: Model, timeout: float) -> None:
        """Wait until a replica of the model is released, or `timeout` seconds."""
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiters.setdefault(model.id, collections.deque()).append(waiter)
        timer = loop.call_later(timeout, _wake, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            with contextlib.suppress(ValueError):  # woken by the timer (or cancelled): leave the queue
                self._waiters[model.id].remove(waiter)

    def lock_for(self, replica: Workload) -> asyncio.Lock:
        """Each replica serves one request at a time, as in CML."""
        return self._busy.setdefault(replica.id, asyncio.Lock())

    def order(self, model: Model, replicas: list[Workload]) -> list[Workload]:
        """Round robin: start with the next replica after the one used last."""
        start = self._next_replica.get(model.id, 0) % max(1, len(replicas))
        self._next_replica[model.id] = start + 1
        return replicas[start:] + replicas[:start]
