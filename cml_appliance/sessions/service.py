"""Session rules: who may start, see and stop sessions; runtime, resources and time limits."""

from __future__ import annotations

import shutil
from typing import Any

import asyncpg

from cml_appliance.auth.permissions import Role
from cml_appliance.auth.users import User
from cml_appliance.core.errors import InvalidArgument, NotFound, PermissionDenied
from cml_appliance.core.settings import Settings
from cml_appliance.projects.service import ProjectService, check_environment
from cml_appliance.projects.store import Project
from cml_appliance.runtimes import catalog
from cml_appliance.workloads import store
from cml_appliance.workloads.checks import resources_within_profiles
from cml_appliance.workloads.service import LaunchRequest, WorkloadService
from cml_appliance.workloads.store import Workload

# A session's main process: says hello, then keeps the engine up until asked to stop.
# Terminals are shells opened beside it.
SESSION_MAIN = (
    'echo "Session $CDSW_ENGINE_ID is running in project $CDSW_PROJECT ($CDSW_CPU_MILLICORES millicores, '
    '$CDSW_MEMORY_MB MB)"; trap "echo Session stopping; exit 0" TERM INT; '
    "while :; do sleep 3600 & wait $!; done"
)


# A JupyterLab session's main process: the runtime's own JupyterLab, on the Unix socket and under
# the base URL the appliance gives it (editors/sockets.py), with the token from JUPYTER_TOKEN.
JUPYTERLAB_MAIN = (
    'echo "Session $CDSW_ENGINE_ID is running JupyterLab in project $CDSW_PROJECT ($CDSW_CPU_MILLICORES millicores, '
    '$CDSW_MEMORY_MB MB)"; '
    # jupyter-lab where it is installed with its scripts, else the module (an image's copy).
    'if command -v jupyter-lab >/dev/null; then set -- jupyter-lab; else set -- python3 -m jupyterlab; fi; '
    # On a Unix socket (local and container engines), or on the pod's own 127.0.0.1 (Kubernetes).
    'if [ -n "$CML_EDITOR_SOCKET" ]; then set -- "$@" --ServerApp.sock="$CML_EDITOR_SOCKET" --ServerApp.sock_mode=0600; '
    'else set -- "$@" --ServerApp.ip=127.0.0.1 --ServerApp.port="$CML_EDITOR_PORT" --ServerApp.port_retries=0; fi; '
    'exec "$@" --no-browser --ServerApp.base_url="$CML_EDITOR_BASE_URL" --ServerApp.root_dir="$HOME" '
    "--ServerApp.allow_remote_access=True --ServerApp.quit_button=False --LabApp.news_url=None "
    "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"
)
JUPYTERLAB = "JupyterLab"


def _minutes(name: str, raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise InvalidArgument(f"{name} must be a number of minutes, got {raw!r}") from None
    if not 0 < value <= 35_000:
        raise InvalidArgument(f"{name} must be more than 0 and at most 35000 minutes")
    return value


class SessionService:
    def __init__(self, pool: asyncpg.Pool, projects: ProjectService, workloads: WorkloadService, settings: Settings):
        self.pool = pool
        self.projects = projects
        self.workloads = workloads
        self.settings = settings

    async def _resources(self, fields: dict[str, Any]) -> tuple[float, float]:
        return await resources_within_profiles(self.pool, fields)

    async def start(self, user: User, project_id: str, fields: dict[str, Any]) -> Workload:
        project = await self.projects.get(user, project_id, Role.WRITE)
        runtime_id = fields.get("runtime_identifier") or "host/python3"
        try:
            runtime = await catalog.get_runtime(self.pool, runtime_id)
        except NotFound:
            raise InvalidArgument(f"unknown runtime {runtime_id!r}: see GET /api/v2/runtimes") from None
        if runtime["status"] == "DISABLED":
            raise InvalidArgument(f"runtime {runtime_id!r} is disabled")
        # JupyterLab is served by the appliance; any other editor (Workbench, a custom runtime's)
        # gets what Workbench has: the terminal and the console.
        editor = runtime["editor"]
        if editor == JUPYTERLAB:
            self._check_jupyterlab(runtime_id)
        gpus = fields.get("nvidia_gpu", 0)
        if gpus < 0:
            raise InvalidArgument("nvidia_gpu must not be negative")
        if gpus > 0 and self.workloads.engine_name_for(runtime_id) != "kubernetes":
            # Only pods can ask for GPUs (nvidia.com/gpu); a cluster without any leaves the
            # session waiting for a node, with the scheduler's reason.
            raise InvalidArgument("GPUs need a runtime that runs on Kubernetes: nvidia_gpu must be 0 here")
        cpu, memory = await self._resources(fields)
        environment = check_environment(fields.get("environment", {}))
        merged = project.environment | environment
        idle = _minutes("IDLE_MAXIMUM_MINUTES", merged.get("IDLE_MAXIMUM_MINUTES", str(self.settings.idle_maximum_minutes)))
        longest = _minutes(
            "SESSION_MAXIMUM_MINUTES", merged.get("SESSION_MAXIMUM_MINUTES", str(self.settings.session_maximum_minutes))
        )
        request = LaunchRequest(
            kind="session",
            name=(fields.get("name") or "Session")[:200],
            runtime_identifier=runtime_id,
            image=runtime_id,
            cpu=cpu,
            memory=memory,
            nvidia_gpu=gpus,
            command=["/bin/sh", "-c", JUPYTERLAB_MAIN if editor == JUPYTERLAB else SESSION_MAIN],
            environment=environment,
            editor=JUPYTERLAB if editor == JUPYTERLAB else "",
            idle_timeout_minutes=idle,
            max_duration_minutes=longest,
            accelerator_label_id=fields.get("accelerator_label_id") or None,
            runtime_addon_identifiers=tuple(fields.get("runtime_addon_identifiers") or ()),
        )
        return await self.workloads.launch(user, project, request)

    def _check_jupyterlab(self, runtime_id: str) -> None:
        """A host runtime offers JupyterLab when the host's Python has it: said before a start,
        not as a session that fails."""
        if self.workloads.engine_name_for(runtime_id) == "local" and shutil.which("jupyter-lab") is None:
            raise InvalidArgument(f"runtime {runtime_id!r} needs JupyterLab in the host's Python, which has none: "
                                  "pip install jupyterlab (on the appliance's PATH), or use a Workbench runtime")

    async def get(self, user: User, project_id: str, session_id: str) -> tuple[Project, Workload]:
        project = await self.projects.get(user, project_id, Role.READ)
        row = await store.get(self.pool, session_id)
        if row is None or row.project_id != project.id or row.kind != "session":
            raise NotFound(f"session {session_id!r} not found")
        return project, row

    def may_control(self, user: User, project: Project, row: Workload) -> bool:
        """The session's owner and project admins may use its terminal and stop it."""
        return row.creator_id == user.id or project.role >= Role.ADMIN

    async def stop(self, user: User, project_id: str, session_id: str) -> Workload:
        project, row = await self.get(user, project_id, session_id)
        if not self.may_control(user, project, row):
            raise PermissionDenied("only the session's owner or a project admin may stop it")
        return await self.workloads.stop(row, reason=f"stopped by {user.username}")

    async def list_for_project(self, user: User, project_id: str, limit: int, offset: int, status: str = "") -> tuple[Project, list[Workload], bool]:
        project = await self.projects.get(user, project_id, Role.READ)
        rows, more = await store.list_for_project(self.pool, project.id, "session", limit, offset, status)
        return project, rows, more

    async def list_for_user(self, user: User, limit: int, offset: int) -> tuple[list[Workload], bool]:
        rows, more = await store.list_for_user(self.pool, user.id, "session", limit, offset)
        if user.scope_project_id is not None:
            rows = [r for r in rows if r.project_id == user.scope_project_id]
        return rows, more

