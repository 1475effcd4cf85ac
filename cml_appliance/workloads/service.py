"""Workload life: launch on an engine, watch to the end, stop, reconcile with what really runs.

Every status change goes through store.transition (the one state machine) and Postgres NOTIFY
(a trigger), so every listener sees it. Each launched workload has one supervised task that
owns it from ENGINE_STARTING to its final status.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import socket
import zlib
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg

from cml_appliance.auth import api_keys
from cml_appliance.auth.users import User
from cml_appliance.core.errors import AlreadyExists, FailedPrecondition, Unavailable
from cml_appliance.core.tasks import Supervisor
from cml_appliance.db.pool import advisory_lock, try_advisory_lock
from cml_appliance.engines.base import (
    Engine,
    EngineError,
    EngineUnavailable,
    LaunchSpec,
)
from cml_appliance.grpc.certificates import WorkloadCertificates
from cml_appliance.projects.store import Project
from cml_appliance.editors.sockets import EditorSockets
from cml_appliance.quotas.service import QuotaService
from cml_appliance.quotas.accelerators import Accelerators
from cml_appliance.runtimes.addons import RuntimeAddons
from cml_appliance.runtimes.custom import CustomRuntimes
from cml_appliance.workloads import states, store
from cml_appliance.workloads.logs import LogStore
from cml_appliance.workloads.store import Workload

log = logging.getLogger(__name__)

HOST_RUNTIME_PREFIX = "host/"
# Ports inside a workload's own network namespace (containers on a bridge network); engines whose
# workloads share the host's network (local, containers on the host network) pick free ones.
CONTAINER_APP_PORT, CONTAINER_READONLY_PORT = 8100, 8101
RECONCILE_LOCK_BASE = 0x434D4C10
# A workload that is still being launched by some appliance process is left alone this long.
LAUNCH_GRACE_SECONDS = 60
# An ended pod that no process here follows is removed after this long (one that follows its
# output, perhaps in another appliance process, removes it as soon as it has read it).
REPORTED_CLEANUP_DELAY = 15
# How long a workload's end waits for its output to be read to the end before it is recorded.
OUTPUT_DRAIN_SECONDS = 5.0
# Variables the platform sets; user environments cannot change them.
PLATFORM_VARIABLES = frozenset(
    {"CDSW_PROJECT", "CDSW_PROJECT_ID", "CDSW_ENGINE_ID", "CDSW_APIV2_KEY", "CDSW_API_URL", "CDSW_DOMAIN",
     "CDSW_APP_PORT", "CDSW_READONLY_PORT", "CDSW_CPU_MILLICORES", "CDSW_MEMORY_MB", "CML_SITE_ID", "CML_WORKLOAD_ID",
     "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_TOKEN", "MLFLOW_REGISTRY_URI"}
)


class FireTaken(Exception):
    """The job fire a launch was to consume was consumed by another launch (no run twice)."""


QUOTA_LOCK = 0x434D4C51  # "CMLQ": quota checks and the inserts they allow, site-wide


def new_engine_id() -> str:
    """CML engine ids are 16 lower-case letters and digits (cwg6wclmg0x482u0)."""
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
    return secrets.choice(alphabet[:26]) + "".join(secrets.choice(alphabet) for _ in range(15))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class LaunchRequest:
    kind: str
    name: str
    runtime_identifier: str
    image: str
    cpu: float
    memory: float
    nvidia_gpu: int
    command: list[str]
    environment: dict[str, str]
    script: str = ""
    arguments: str = ""
    idle_timeout_minutes: float | None = None
    max_duration_minutes: float | None = None
    job_id: int | None = None
    attempt: int = 1
    deployment_id: int | None = None
    application_id: int | None = None
    # Where the workload runs; default: the project's directory (a model build's snapshot differs).
    workdir: Path | None = None
    # The pending job fire (job_fires) this run starts: consumed with the insert, exactly once.
    fire_id: int | None = None
    # A built image to pull (container engine): credentials, and the image's own /home/cdsw.
    registry_auth: dict[str, str] | None = None
    mount_project: bool = True
    # A session's editor ('' or 'JupyterLab'): editors/ serves it, over a Unix socket.
    editor: str = ""
    # The accelerator (kind of GPU) its GPUs are of, when it asks for one (quotas/accelerators.py).
    accelerator_label_id: int | None = None
    # Runtime add-ons to show it, read-only (runtimes/addons.py).
    runtime_addon_identifiers: tuple[str, ...] = ()


class WorkloadService:
    def __init__(
        self,
        pool: asyncpg.Pool,
        engines: Mapping[str, Engine],
        logs: LogStore,
        supervisor: Supervisor,
        *,
        projects_dir: Path,
        base_url: str,
        stop_grace: float,
        runtime_engine: str = "container",
    ):
        self.pool = pool
        self.engines = dict(engines)
        self.logs = logs
        self.supervisor = supervisor
        self.projects_dir = projects_dir
        self.base_url = base_url
        self.stop_grace = stop_grace
        # Where runtimes that are not host/... run: "container" or "kubernetes".
        self.runtime_engine = runtime_engine
        # Reported engines (Kubernetes): rows this process waits on, set when they end.
        self._ended: dict[int, asyncio.Event] = {}
        # ... and set once this process has read all of their output.
        self._drained: dict[int, asyncio.Event] = {}
        # Why local workloads run unsandboxed, when they do and the administrator has not accepted it.
        self.unsandboxed_local = ""
        # Called with each workload that reached its final status (dependent jobs, notifications).
        # Every workload's gRPC client certificate (set by the app when the gRPC port is on).
        self.certificates: WorkloadCertificates | None = None
        # Where session editors listen (set by the app): a socket directory per session.
        self.editors: EditorSockets | None = None
        # Every start is checked against its account's quotas (set by the app).
        self.quotas: QuotaService | None = None
        self._quota_lock = asyncio.Lock()
        # Where custom runtimes' images are pulled from and with which login (set by the app).
        self.runtime_images: CustomRuntimes | None = None
        # Which resource groups take which workloads, and accelerators' limits (set by the app).
        self.accelerators: Accelerators | None = None
        # Runtime add-ons, mounted into the workloads that ask for them (set by the app).
        self.addons: RuntimeAddons | None = None
        self.finish_listeners: list[Callable[[Workload], Coroutine[Any, Any, None]]] = []
        # Workloads this process owns: row id -> the task that watches them.
        self._owned: dict[int, asyncio.Task[Any]] = {}
        self._specs: dict[int, LaunchSpec] = {}

    # Engines -------------------------------------------------------------------------------

    async def _refuse_unsandboxed_for_many(self) -> None:
        """Unsandboxed, a local workload runs with the appliance's rights: fine for one person on
        a laptop, not once the site has several users (unless the administrator accepted it)."""
        users = await self.pool.fetchval("SELECT count(*) FROM users WHERE is_active AND NOT is_team")
        if users > 1:
            raise Unavailable(
                f"the local engine cannot sandbox workloads here ({self.unsandboxed_local}), and this site has "
                f"{users} users: install bubblewrap, or set CML_ALLOW_UNSANDBOXED_LOCAL=true to accept that "
                "every user's code runs with the appliance's own rights"
            )

    def engine_name_for(self, runtime_identifier: str) -> str:
        return "local" if runtime_identifier.startswith(HOST_RUNTIME_PREFIX) else self.runtime_engine

    def engine(self, name: str) -> Engine:
        engine = self.engines.get(name)
        if engine is None and name == "kubernetes":
            raise Unavailable("this workload runs on Kubernetes, which is not configured: set CML_KUBECONFIG "
                              "or CML_KUBERNETES_IN_CLUSTER=true")
        if engine is None:
            raise Unavailable(
                "this runtime needs the container engine, which is not configured: set CML_CONTAINER_ENGINE_URL "
                "to a Docker or Podman socket, or choose a host/ runtime"
            )
        return engine

    # Launch --------------------------------------------------------------------------------

    def _environment(self, row: Workload, project: Project, secret: str, request: LaunchRequest) -> dict[str, str]:
        """CML's precedence: project < workload; the platform's own variables always win."""
        user_env = {k: v for k, v in (project.environment | request.environment).items() if k not in PLATFORM_VARIABLES}
        return user_env | {
            "CDSW_PROJECT": project.slug,
            "CDSW_PROJECT_ID": project.public_id,
            "CDSW_ENGINE_ID": row.public_id,
            "CDSW_API_URL": f"{self.base_url}/api/v1",
            "CDSW_APIV2_KEY": secret,
            "CDSW_DOMAIN": self.base_url.split("://", 1)[-1],
            "CDSW_APP_PORT": str(row.app_port),
            "CDSW_READONLY_PORT": str(row.readonly_port),
            "CDSW_CPU_MILLICORES": str(int(row.cpu * 1000)),
            "CDSW_MEMORY_MB": str(int(row.memory * 1024)),
            "HADOOP_USER_NAME": user_env.get("HADOOP_USER_NAME", row.creator["username"]),
            # The unmodified mlflow client logs into this project's experiments with the workload's key.
            "MLFLOW_TRACKING_URI": f"{self.base_url}/mlflow/{project.public_id}",
            "MLFLOW_REGISTRY_URI": f"{self.base_url}/mlflow/{project.public_id}",  # as CML sets it
            "MLFLOW_TRACKING_TOKEN": secret,
            "HOME": str(self.projects_dir / project.public_id),
            # Workloads run as uid 8536, CML's cdsw, which no passwd file may know: tools that ask
            # who runs them (getpass, mlflow's user tag) read these instead.
            "USER": "cdsw", "LOGNAME": "cdsw",
        }

    def _row_values(self, user: User, project: Project, request: LaunchRequest) -> dict[str, Any]:
        """The columns of a new workload row for `request` (a snapshot of what it runs)."""
        return {
            "public_id": new_engine_id(), "kind": request.kind, "project_id": project.id, "creator_id": user.id,
            "engine": self.engine_name_for(request.runtime_identifier), "name": request.name,
            "runtime_identifier": request.runtime_identifier, "cpu": request.cpu, "memory": request.memory,
            "nvidia_gpu": request.nvidia_gpu, "script": request.script, "arguments": request.arguments,
            "environment": request.environment, "idle_timeout_minutes": request.idle_timeout_minutes,
            "max_duration_minutes": request.max_duration_minutes, "job_id": request.job_id,
            "attempt": request.attempt, "deployment_id": request.deployment_id, "editor": request.editor,
            "application_id": request.application_id, "accelerator_label_id": request.accelerator_label_id,
        }

    async def record_unlaunched(self, user: User, project: Project, request: LaunchRequest, status: str,
                                reason: str) -> Workload | None:
        """Record a workload that ends before it starts (a job run skipped while another runs),
        final from the first; a job run is followed up as transition() marks one that ended.
        Consumes the request's fire in the same statement: None when another process took it."""
        assert status in states.FINISHED
        values = self._row_values(user, project, request) | {
            "status": status, "reason": reason, "finished_at": datetime.now(UTC),
            "followup_due": request.kind == "job_run",
        }
        return await store.insert(self.pool, values, consume_fire=request.fire_id)

    async def launch(self, user: User, project: Project, request: LaunchRequest) -> Workload:
        engine_name = self.engine_name_for(request.runtime_identifier)
        engine = self.engine(engine_name)
        if engine_name == "local" and self.unsandboxed_local:
            await self._refuse_unsandboxed_for_many()
        try:
            await engine.ping()
        except EngineUnavailable as exc:
            raise Unavailable(str(exc)) from None
        image, registry_auth = request.image, request.registry_auth
        if self.runtime_images is not None and registry_auth is None and image == request.runtime_identifier:
            # A custom runtime's image is pulled at each start, with the login it needs.
            image, registry_auth = await self.runtime_images.launch_image(request.runtime_identifier)
        own_ports = engine.shares_host_network
        values = self._row_values(user, project, request) | {
            "app_port": _free_port() if own_ports else CONTAINER_APP_PORT,
            "readonly_port": _free_port() if own_ports else CONTAINER_READONLY_PORT,
        }
        public_id = values["public_id"]
        secret, key = api_keys.workload_key(user.id, project.id, f"{request.kind} {public_id}")
        # The quota check and the insert together: no two starts pass it at once, in this process
        # (the asyncio lock, which also keeps waiters from taking every pool connection) or in
        # another one on the same database (the advisory lock).
        node_selector: dict[str, str] = {}
        mounts = await self.addons.mounts(list(request.runtime_addon_identifiers)) if self.addons is not None else {}
        if self.accelerators is not None:
            await self.accelerators.check_group(engine_name, request.kind)
        async with self._quota_lock, advisory_lock(self.pool, QUOTA_LOCK):
            if self.quotas is not None:
                await self.quotas.check(user, project.id, request.cpu, request.memory, request.nvidia_gpu,
                                        request.kind.replace("_", " "))
            if self.accelerators is not None:
                node_selector = await self.accelerators.check_launch(user, project.id, request.accelerator_label_id,
                                                                     request.nvidia_gpu)
            try:
                row = await store.insert(self.pool, values, api_key=key, consume_fire=request.fire_id)
            except asyncpg.UniqueViolationError:
                raise AlreadyExists("the job already has an active run: stop it or wait for it to end") from None
        if row is None:
            raise FireTaken(f"job fire {request.fire_id} has already started a run")
        env = self._environment(row, project, secret, request)
        if request.editor and self.editors is not None:
            env |= await asyncio.to_thread(self.editors.prepare, public_id, in_pod=engine_name == "kubernetes")
        tls_dir = None
        if self.certificates is not None:
            try:
                tls_dir = await asyncio.to_thread(self.certificates.issue, public_id)
            except OSError as exc:  # a full disk: the workload runs, without gRPC
                log.warning("workload %s starts without its gRPC certificate: %s", public_id, exc)
            else:
                # Shown at /run/cml/tls in a container or the sandbox; an unsandboxed process reads it in place.
                mounted = not (getattr(engine, "name", "") == "local" and getattr(engine, "sandbox", None) is None)
                env |= self.certificates.environment(tls_dir, mounted=mounted)
        spec = LaunchSpec(
            workload_id=public_id,
            kind=request.kind,
            command=request.command,
            env=env,
            project_dir=request.workdir or self.projects_dir / project.public_id,
            image=image,
            cpu=request.cpu,
            memory_mb=int(request.memory * 1024),
            registry_auth=registry_auth,
            mount_project=request.mount_project,
            tls_dir=tls_dir,
            owner=user.username,
            gpus=request.nvidia_gpu,
            node_selector=node_selector,
            readonly_mounts=mounts,
        )
        self._specs[row.id] = spec
        self._owned[row.id] = self.supervisor.spawn(f"workload-{public_id}", self._run(row, engine, spec))
        return row

    async def _run(self, row: Workload, engine: Engine, spec: LaunchSpec) -> None:
        if getattr(engine, "reports_status", False):
            await self._run_reported(row, engine, spec)
            return
        handle = ""
        try:
            if await store.transition(self.pool, row.id, states.STARTING) is None:
                await self._finish(row.id, None)  # stopped before it started
                return
            handle = await engine.start(spec)
            if await store.transition(self.pool, row.id, states.RUNNING, handle=handle) is None:
                await store.update(self.pool, row.id, handle=handle)
                await engine.stop(handle, self.stop_grace)  # a stop came while it was starting
            await self._watch(row, engine, handle)
        except (EngineError, EngineUnavailable) as exc:
            await self._fail(row.id, str(exc))
            if handle:
                await self._cleanup(engine, handle)
        except asyncio.CancelledError:
            raise  # shutdown: the next start's reconciliation settles the row
        except Exception as exc:
            log.exception("workload %s failed inside the appliance", row.public_id)
            await self._fail(row.id, f"internal error: {exc}")
        finally:
            self._owned.pop(row.id, None)

    # Engines whose status comes from a watcher (Kubernetes) ---------------------------------

    async def _run_reported(self, row: Workload, engine: Engine, spec: LaunchSpec) -> None:
        """Create the workload's objects, then keep its output until it ends. Its status moves
        as the pod watcher reports (apply_observed), in whichever appliance process watches."""
        handle = ""
        self._ended[row.id] = asyncio.Event()
        self._drained[row.id] = asyncio.Event()
        try:
            current = await store.get_by_id(self.pool, row.id)
            if current is None or not current.active or current.status == states.STOPPING:
                await self._finish(row.id, None)  # stopped before it started
                return
            handle = await engine.start(spec)
            await store.update(self.pool, row.id, handle=handle)
            current = await store.get_by_id(self.pool, row.id)
            if current is not None and current.status == states.STOPPING:
                await engine.stop(handle, self.stop_grace)  # a stop came while it was created
            elif current is None or not current.active:
                await self._cleanup(engine, handle)  # it ended meanwhile (a stop before it had a handle)
                return
            await self._follow_reported(row, engine, handle)
        except (EngineError, EngineUnavailable) as exc:
            await self._fail(row.id, str(exc))
            if handle:
                await self._cleanup(engine, handle)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("workload %s failed inside the appliance", row.public_id)
            await self._fail(row.id, f"internal error: {exc}")
            if handle:
                await self._cleanup(engine, handle)
        finally:
            self._owned.pop(row.id, None)
            self._ended.pop(row.id, None)
            self._drained.pop(row.id, None)

    async def _follow_reported(self, row: Workload, engine: Engine, handle: str, *, new_only: bool = False) -> None:
        """Keep the pod's output; then wait for the watcher to record how it ended, and remove
        the pod (its output is all read by then)."""
        output = engine.output(handle, new_only=new_only)  # type: ignore[call-arg]
        try:
            async for chunk in output:
                self.logs.append(row.public_id, chunk)
        finally:
            drained = self._drained.get(row.id)
            if drained is not None:
                drained.set()
        ended = self._ended.get(row.id)
        while True:
            current = await store.get_by_id(self.pool, row.id)
            if current is None or not current.active:
                await self._cleanup(engine, handle)
                return
            try:
                if ended is None:
                    await asyncio.sleep(2)
                else:
                    await asyncio.wait_for(ended.wait(), 2)  # ended here, or (by another process) seen in a poll
            except TimeoutError:
                pass

    async def apply_observed(self, engine_name: str, observed: list[Any]) -> None:
        """What the pod watcher saw, applied to Postgres. Progress (scheduling, starting,
        running, a reason, the node) in one statement for the whole batch; an end through _end,
        one by one (the workload's key dies with it, and listeners hear of it)."""
        progress = [o for o in observed if not o.final]
        if progress:
            await self.pool.execute(
                """
                UPDATE workloads w SET status = u.status, reason = u.reason, node = u.node, updated_at = now(),
                  starting_at = CASE WHEN u.status IN ('ENGINE_STARTING', 'ENGINE_RUNNING')
                                     THEN coalesce(w.starting_at, now()) ELSE w.starting_at END,
                  running_at = CASE WHEN u.status = 'ENGINE_RUNNING' THEN coalesce(w.running_at, now()) ELSE w.running_at END
                FROM unnest($1::text[], $2::text[], $3::text[], $4::text[]) AS u(public_id, status, reason, node)
                WHERE w.public_id = u.public_id AND w.engine = $5
                  AND (w.status = u.status OR (w.status = 'ENGINE_SCHEDULING' AND u.status IN ('ENGINE_STARTING', 'ENGINE_RUNNING'))
                       OR (w.status = 'ENGINE_STARTING' AND u.status = 'ENGINE_RUNNING'))
                  AND (w.status, w.reason, w.node) IS DISTINCT FROM (u.status, u.reason, u.node)
                """,
                [o.workload_id for o in progress], [o.status for o in progress], [o.reason for o in progress],
                [o.node for o in progress], engine_name,
            )
        for o in observed:
            if o.final:
                await self._end_observed(engine_name, o)

    async def _end_observed(self, engine_name: str, o: Any) -> None:
        row = await store.get(self.pool, o.workload_id)
        if row is None or row.engine != engine_name:
            return
        engine = self.engines.get(engine_name)
        if row.active:
            # The pod's last lines first: a run that reads as ended has all its output (the
            # follower in this process reads to the end of the log stream; bounded wait).
            drained = self._drained.get(row.id)
            if drained is not None:
                try:
                    await asyncio.wait_for(drained.wait(), OUTPUT_DRAIN_SECONDS)
                except TimeoutError:
                    log.warning("workload %s ended before its output was all read", row.public_id)
            if row.status == states.STOPPING or row.stop_status:
                target, reason = row.stop_status or states.STOPPED, row.reason
            else:
                target, reason = o.status, o.reason
            await self._end(row, target, exit_code=o.exit_code, reason=reason[:2000], node=o.node or row.node)
            event = self._ended.get(row.id)
            if event is not None:
                event.set()
        if engine is not None and row.handle and row.id not in self._owned:
            # Its pod has ended: the pod, Service and Secrets go. A process that follows its
            # output removes them once it has read it all; nobody here does, so give whoever
            # may (another appliance process) time to.
            self.supervisor.spawn(f"cleanup-{row.public_id}", self._cleanup_later(engine, row.handle))

    async def _watch(self, row: Workload, engine: Engine, handle: str, *, follow_output: bool = True) -> None:
        """Keep the output until the main process ends, then record how it ended."""

        async def pump() -> None:
            async for chunk in engine.output(handle):
                self.logs.append(row.public_id, chunk)

        pumping = asyncio.create_task(pump()) if follow_output else None
        try:
            code = await engine.wait(handle)
            if pumping is not None:
                try:
                    await asyncio.wait_for(asyncio.shield(pumping), OUTPUT_DRAIN_SECONDS)
                except TimeoutError:
                    pumping.cancel()
        finally:
            if pumping is not None and not pumping.done():
                pumping.cancel()
        await self._finish(row.id, code)
        await self._cleanup(engine, handle)

    async def _cleanup_later(self, engine: Engine, handle: str, delay: float = REPORTED_CLEANUP_DELAY) -> None:
        await asyncio.sleep(delay)
        await self._cleanup(engine, handle)

    async def _cleanup(self, engine: Engine, handle: str) -> None:
        try:
            await engine.cleanup(handle)
        except (EngineError, EngineUnavailable) as exc:
            log.warning("cleaning up %s failed: %s", handle[:24], exc)

    async def _finish(self, row_id: int, code: int | None) -> None:
        row = await store.get_by_id(self.pool, row_id)
        if row is None or not row.active:
            return
        reason = row.reason
        if row.status == states.STOPPING or row.stop_status:
            target = row.stop_status or states.STOPPED
        elif code == 0:
            target = states.SUCCEEDED
        else:
            target = states.FAILED
            reason = reason or (f"the main process exited with code {code}" if code is not None else "the process ended")
        await self._end(row, target, exit_code=code, reason=reason)

    async def _fail(self, row_id: int, reason: str) -> None:
        row = await store.get_by_id(self.pool, row_id)
        if row is None or not row.active:
            return
        await self._end(row, states.FAILED, reason=reason[:2000])

    async def _end(self, row: Workload, target: str, **fields: Any) -> None:
        """The final status; the workload's own key dies with it (same statement), never after."""
        final = await store.transition(self.pool, row.id, target, revoke_key=row.api_key_id, **fields)
        self.logs.close(row.public_id)
        self._specs.pop(row.id, None)
        if self.certificates is not None:
            self.certificates.remove(row.public_id)
        if self.editors is not None and row.editor:
            await asyncio.to_thread(self.editors.remove, row.public_id)
        if final is None:
            return  # someone else ended it meanwhile, and told the listeners
        # Listeners get the final row (dependent jobs, retries, notifications, replicas).
        for listener in self.finish_listeners:
            self.supervisor.spawn(f"finished-{row.public_id}", listener(final))

    # Stop ----------------------------------------------------------------------------------

    async def stop(self, row: Workload, *, final: str = states.STOPPED, reason: str = "") -> Workload:
        """Ask a workload to end; it reaches `final` once its process is gone."""
        if not row.active:
            raise FailedPrecondition(f"the workload has already ended ({row.status})")
        moved = await store.transition(
            self.pool, row.id, states.STOPPING, stop_status=final, reason=reason or row.reason
        )
        if moved is None:
            current = await store.get_by_id(self.pool, row.id)
            assert current is not None
            return current
        self.supervisor.spawn(f"stop-{row.public_id}", self._stop(moved))
        return moved

    async def _stop(self, row: Workload) -> None:
        owned = row.id in self._owned
        if row.handle:
            try:
                engine = self.engine(row.engine)
                await engine.stop(row.handle, self.stop_grace)
            except (EngineError, EngineUnavailable, Unavailable) as exc:
                await self._fail(row.id, f"could not be stopped: {exc}")
                return
            if getattr(engine, "reports_status", False):
                return  # it ends when the pod watcher sees its pod end
        if not owned:
            # Nobody watches it here (not started yet, or found by reconciliation): settle it now.
            await self._finish(row.id, None)
            if row.handle:
                await self._cleanup(self.engine(row.engine), row.handle)

    # Terminals -----------------------------------------------------------------------------

    def spec_for(self, row: Workload) -> LaunchSpec:
        """The launch spec of a workload; after a restart (an adopted container) one rebuilt from
        its row, without the environment: container terminals do not need it."""
        spec = self._specs.get(row.id)
        if spec is not None:
            return spec
        return LaunchSpec(
            workload_id=row.public_id, kind=row.kind, command=[], env={},
            project_dir=self.projects_dir / row.project_public_id, image=row.runtime_identifier,
            cpu=row.cpu, memory_mb=int(row.memory * 1024),
        )

    async def touch(self, row: Workload) -> None:
        await store.touch(self.pool, row.id)

    # Reconciliation ------------------------------------------------------------------------

    async def reconcile(self, engine_name: str, *, starting_up: bool = False) -> dict[str, int]:
        """Make Postgres and the engine agree: no row active without its process, no process without its row.

        Held by one appliance process at a time (an advisory lock per engine).
        """
        engine = self.engines[engine_name]
        counts = {"failed": 0, "orphans_stopped": 0, "adopted": 0}
        lock = RECONCILE_LOCK_BASE + zlib.crc32(engine_name.encode()) % 1000
        async with try_advisory_lock(self.pool, lock) as held:
            if held is None:
                return counts
            await self._reconcile(engine, counts, starting_up)
        if any(counts.values()):
            log.info("reconciled the %s engine: %s", engine_name, counts)
        return counts

    async def _reconcile(self, engine: Engine, counts: dict[str, int], starting_up: bool) -> None:
        try:
            real = await engine.list_running()
        except EngineUnavailable as exc:
            if getattr(engine, "reports_status", False):
                # Pods run on whether or not the apiserver answers us: nothing is failed for it.
                log.warning("cannot reconcile the %s engine: %s", engine.name, exc)
                return
            for row in await store.list_active(self.pool, engine.name):
                task = self._owned.pop(row.id, None)
                if task is not None:
                    task.cancel()
                await self._fail(row.id, str(exc))
                counts["failed"] += 1
            return
        rows = await store.list_active(self.pool, engine.name)
        for row in rows:
            if row.id in self._owned:
                continue
            launching = row.status in (states.SCHEDULING, states.STARTING)
            if launching and not starting_up and await self._younger_than(row, LAUNCH_GRACE_SECONDS):
                continue  # another appliance process may still be launching it
            handle = real.get(row.public_id)
            if handle is None:
                what = {"local": "process", "container": "container"}.get(engine.name, "pod")
                if row.status == states.STOPPING:
                    await self._finish(row.id, None)  # asked to stop, and it is gone: stopped
                    continue
                if row.status in (states.SCHEDULING, states.STARTING):
                    reason = "interrupted by a restart of the appliance before it started"
                elif engine.name == "local" and starting_up:  # it died with the appliance (a sandbox takes all of it)
                    reason = "the appliance restarted while it ran; local workloads end with it"
                else:
                    reason = f"its {what} is gone (it ended while the appliance was not watching, or was removed)"
                await self._fail(row.id, reason)
                counts["failed"] += 1
            elif getattr(engine, "reports_status", False):
                # Pods outlive the appliance; the watcher reports their status. Keep their output
                # from now on (what came while nobody followed stays in the pod's own log).
                self._owned[row.id] = self.supervisor.spawn(
                    f"workload-{row.public_id}", self._adopt_reported(row, engine, handle))
                counts["adopted"] += 1
            elif engine.name == "container" and row.status == states.RUNNING:
                # Containers outlive the appliance: watch this one again (its earlier output is kept).
                self._owned[row.id] = self.supervisor.spawn(
                    f"workload-{row.public_id}", self._adopt(row, engine, handle)
                )
                counts["adopted"] += 1
            else:
                # A local process cannot be re-attached (its output pipe died with the appliance).
                await engine.stop(handle, 2)
                await self._fail(row.id, "the appliance restarted while it ran; local workloads end with it")
                counts["failed"] += 1
        known = {row.public_id for row in rows}
        for workload_id, handle in real.items():
            if workload_id not in known:
                log.warning("stopping %s workload %s: no active row owns it", engine.name, workload_id)
                await engine.stop(handle, 2)
                await self._cleanup(engine, handle)
                counts["orphans_stopped"] += 1

    async def _younger_than(self, row: Workload, seconds: float) -> bool:
        return bool(await self.pool.fetchval(
            "SELECT updated_at > now() - make_interval(secs => $2) FROM workloads WHERE id = $1", row.id, seconds
        ))

    async def _adopt_reported(self, row: Workload, engine: Engine, handle: str) -> None:
        self._ended[row.id] = asyncio.Event()
        try:
            await self._follow_reported(row, engine, handle, new_only=True)
        finally:
            self._owned.pop(row.id, None)
            self._ended.pop(row.id, None)
            self._drained.pop(row.id, None)

    async def _adopt(self, row: Workload, engine: Engine, handle: str) -> None:
        try:
            await self._watch(row, engine, handle, follow_output=False)
        except EngineUnavailable as exc:
            await self._fail(row.id, str(exc))
        finally:
            self._owned.pop(row.id, None)

    # gRPC certificates ---------------------------------------------------------------------

    async def renew_certificates(self) -> list[str]:
        """Issue again the certificates of active workloads that near their end (and drop those
        of ended ones); a pod's is a Secret, which is replaced too."""
        if self.certificates is None:
            return []
        rows = await self.pool.fetch("SELECT public_id, engine, handle FROM workloads WHERE status = ANY($1::text[])",
                                     list(states.ACTIVE))
        renewed = await asyncio.to_thread(self.certificates.renew_due, {r["public_id"] for r in rows})
        for r in rows:
            engine = self.engines.get(r["engine"])
            if r["public_id"] in renewed and r["handle"] and hasattr(engine, "replace_tls_secret"):
                await engine.replace_tls_secret(r["handle"], self.certificates.directory / r["public_id"])  # type: ignore[union-attr]
        return renewed

    # Session limits ------------------------------------------------------------------------

    async def enforce_time_limits(self) -> int:
        """Stop sessions past their idle timeout or maximum duration, saying which."""
        rows = await self.pool.fetch(
            "SELECT w.id, w.kind, w.idle_timeout_minutes AS idle, w.max_duration_minutes AS max,"
            " w.last_activity_at < now() - make_interval(secs => w.idle_timeout_minutes * 60) AS idle_over,"
            " w.running_at < now() - make_interval(secs => w.max_duration_minutes * 60) AS max_over"
            " FROM workloads w WHERE w.kind IN ('session', 'job_run') AND w.status = 'ENGINE_RUNNING'"
            " AND (w.idle_timeout_minutes IS NOT NULL OR w.max_duration_minutes IS NOT NULL)"
        )
        stopped = 0
        for r in rows:
            if r["max_over"] and r["kind"] == "job_run":
                reason = f"ran longer than its timeout of {r['max'] * 60:g} seconds"
            elif r["max_over"]:
                reason = f"reached the maximum session length of {r['max']:g} minutes (SESSION_MAXIMUM_MINUTES)"
            elif r["idle_over"]:
                reason = f"idle for {r['idle']:g} minutes (IDLE_MAXIMUM_MINUTES)"
            else:
                continue
            row = await store.get_by_id(self.pool, r["id"])
            if row is not None and row.status == states.RUNNING:
                await self.stop(row, final=states.TIMEDOUT, reason=reason)
                stopped += 1
        return stopped

    async def shutdown(self) -> None:
        """Graceful shutdown: local workloads cannot outlive the appliance, so end them cleanly.

        Containers keep running; the next start adopts them.
        """
        for row in await store.list_active(self.pool, "local"):
            if row.id not in self._owned:
                continue
            task = self._owned.pop(row.id)
            task.cancel()
            moved = await store.transition(
                self.pool, row.id, states.STOPPING, stop_status=states.STOPPED, reason="the appliance shut down"
            )
            if moved is not None and moved.handle:
                with contextlib.suppress(EngineError, EngineUnavailable):
                    await self.engines["local"].stop(moved.handle, min(self.stop_grace, 5))
            await self._finish(row.id, None)
        for engine in self.engines.values():
            await engine.close()
