"""AMPs (Applied ML Prototypes): a project cloned from git and set up by its .project-metadata.yaml.

CreateAmp clones like CreateProject's git template. Once the clone is there (creation_status
"success": the project's files and git history are usable), the AMP is set up, and its
creation_message says how far it got: the metadata's environment variables become the project's
(their defaults, under what the request gave) and, when the request asks for the AMP's steps,
its tasks run in order as the user who asked: create_job, run_job (waited
for: a failed run fails the AMP), create_model (its access key goes into the variable the task
names), build_model (waited for), deploy_model, start_application. A task this appliance cannot
do, or a bad metadata file, ends the set-up with a message that names the task ("AMP set-up
failed: ..."); what was made until then stays for the user to look at.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

import yaml

from cml_appliance.auth.users import User
from cml_appliance.core.errors import FailedPrecondition, InvalidArgument
from cml_appliance.projects.service import ProjectService
from cml_appliance.projects.store import Project
from cml_appliance.web.status_words import status_word
from cml_appliance.workloads import states
from cml_appliance.workloads.checks import DEFAULT_RUNTIME, check_runtime

log = logging.getLogger(__name__)

METADATA = ".project-metadata.yaml"
MAX_METADATA_BYTES = 1024 * 1024
TASK_TYPES = ("create_job", "run_job", "create_model", "build_model", "deploy_model", "start_application")
JOB_WAIT_SECONDS = 6 * 3600
BUILD_WAIT_SECONDS = 3600
POLL_SECONDS = 0.5


def _text(value: Any) -> str:
    """A metadata value as text; YAML's None and the AMPs' literal "None" mean nothing."""
    if value is None or str(value).strip() == "None":
        return ""
    return str(value).strip()


def read_metadata(project_dir: Path) -> dict[str, Any]:
    path = project_dir / METADATA
    if not path.is_file():
        raise FailedPrecondition(f"the repository has no {METADATA} at its root: it is not an AMP")
    if path.stat().st_size > MAX_METADATA_BYTES:
        raise FailedPrecondition(f"{METADATA} is larger than {MAX_METADATA_BYTES // 1024} KB")
    try:
        metadata = yaml.safe_load(path.read_text(errors="replace"))
    except yaml.YAMLError as exc:
        raise FailedPrecondition(f"{METADATA} is not valid YAML: {exc}") from None
    if not isinstance(metadata, dict):
        raise FailedPrecondition(f"{METADATA} must be a mapping (name, runtimes, environment_variables, tasks...)")
    tasks = metadata.get("tasks") or []
    if not isinstance(tasks, list) or not all(isinstance(t, dict) for t in tasks):
        raise FailedPrecondition(f"{METADATA}: tasks must be a list of mappings")
    for number, task in enumerate(tasks, 1):
        if task.get("type") not in TASK_TYPES:
            raise FailedPrecondition(f"{METADATA}: task {number} has type {task.get('type')!r}; this appliance runs "
                                     f"{', '.join(TASK_TYPES)}")
    variables = metadata.get("environment_variables") or {}
    if not isinstance(variables, dict):
        raise FailedPrecondition(f"{METADATA}: environment_variables must be a mapping of names")
    return metadata


class AmpService:
    def __init__(self, projects: ProjectService, jobs: Any, models: Any, applications: Any):
        self.projects = projects
        self.jobs = jobs
        self.models = models
        self.applications = applications

    async def create(self, user: User, body: dict[str, Any]) -> Project:
        request = dict(body.get("create_project_request") or {})
        configure = dict(body.get("configure_prototype_request") or {})
        if not request.get("git_url"):
            raise InvalidArgument("create_project_request.git_url is required: the AMP's git repository")
        # CML ignores these for an AMP: it is always a git project on runtimes.
        request |= {"template": "git", "default_project_engine_type": "ml_runtime"}
        runtime = await check_runtime(self.projects.pool, configure["runtime_identifier"]) \
            if configure.get("runtime_identifier") else ""
        given = dict(request.get("environment") or {})
        steps = bool(configure.get("execute_amp_steps"))

        async def set_up(public_id: str) -> None:
            await self._set_up(user, public_id, given, runtime, steps)

        return await self.projects.create(user, request, then=set_up)

    async def _say(self, public_id: str, message: str) -> None:
        await self.projects.pool.execute(
            "UPDATE projects SET creation_message = $2, updated_at = now() WHERE public_id = $1", public_id, message[:2000])

    async def _set_up(self, user: User, public_id: str, given: dict[str, str], runtime: str, steps: bool) -> None:
        await self._say(public_id, "Setting up the AMP")
        try:
            await self._steps(user, public_id, given, runtime, steps)
        except Exception as exc:
            reason = getattr(exc, "message", None) or str(exc) or type(exc).__name__
            log.warning("setting up the AMP of project %s failed: %s", public_id, reason)
            await self._say(public_id, f"AMP set-up failed: {reason}")

    async def _steps(self, user: User, public_id: str, given: dict[str, str], runtime: str, steps: bool) -> None:
        metadata = await asyncio.to_thread(read_metadata, self.projects.projects_dir / public_id)
        variables = metadata.get("environment_variables") or {}
        environment = {str(k): _text(v.get("default") if isinstance(v, dict) else v) for k, v in variables.items()}
        environment |= given
        missing = [k for k, v in variables.items() if isinstance(v, dict) and v.get("required") and not environment.get(k)]
        if missing:
            raise FailedPrecondition(f"the AMP needs values for {', '.join(missing)} (create_project_request.environment)")
        if environment:
            await self.projects.set_environment(user, public_id, environment)
        if not steps:
            await self._say(public_id, "AMP set up without its tasks (execute_amp_steps was not asked for)")
            return
        runtime = runtime or await self._runtime_for(metadata)
        tasks = metadata.get("tasks") or []
        labels: dict[str, Any] = {}  # entity_label -> the job, or the model and its latest build
        for number, task in enumerate(tasks, 1):
            what = _text(task.get("short_summary")) or _text(task.get("name")) or task["type"]
            await self._say(public_id, f"Setting up the AMP: task {number} of {len(tasks)}: {what}")
            try:
                await self._task(user, public_id, task, runtime, labels)
            except Exception as exc:
                reason = getattr(exc, "message", None) or str(exc) or type(exc).__name__
                raise FailedPrecondition(f"AMP task {number} of {len(tasks)} ({task['type']}: {what}) failed: {reason}") from exc
        await self._say(public_id, f"AMP set up: {len(tasks)} task(s) done")

    async def _runtime_for(self, metadata: dict[str, Any]) -> str:
        """The catalog's runtime that matches the AMP's first wish (editor, kernel, edition), else
        the default one."""
        for wish in metadata.get("runtimes") or []:
            if not isinstance(wish, dict):
                continue
            row = await self.projects.pool.fetchrow(
                "SELECT image_identifier FROM runtimes WHERE status <> 'DISABLED' AND lower(editor) = lower($1)"
                " AND lower(kernel) = lower($2) AND ($3 = '' OR lower(edition) = lower($3)) ORDER BY image_identifier LIMIT 1",
                _text(wish.get("editor")), _text(wish.get("kernel")), _text(wish.get("edition")))
            if row is not None:
                return str(row["image_identifier"])
        return DEFAULT_RUNTIME

    async def _task(self, user: User, pid: str, task: dict[str, Any], runtime: str, labels: dict[str, Any]) -> None:
        kind, label = task["type"], _text(task.get("entity_label"))
        if kind == "create_job":
            fields: dict[str, Any] = {"name": _text(task.get("name")) or label, "script": _text(task.get("script")),
                                      "arguments": _text(task.get("arguments")), "runtime_identifier": runtime}
            for key in ("cpu", "memory", "timeout"):
                if task.get(key) is not None:
                    fields[key] = task[key]
            labels[label] = await self.jobs.create(user, pid, fields)
        elif kind == "run_job":
            job = self._labelled(labels, label, "create_job")
            run = await self.jobs.start_run(user, pid, job.public_id, {})
            deadline = time.monotonic() + JOB_WAIT_SECONDS
            while run.status not in states.FINISHED:
                if time.monotonic() > deadline:
                    raise FailedPrecondition(f"its run {run.public_id} did not end within {JOB_WAIT_SECONDS // 3600} h")
                await asyncio.sleep(POLL_SECONDS)
                _, _, run = await self.jobs.get_run(user, pid, job.public_id, run.public_id)
            if run.status != states.SUCCEEDED:
                raise FailedPrecondition(f"its run {run.public_id} ended {status_word(run.status).word}: {run.reason}".rstrip(": "))
        elif kind == "create_model":
            model, _, _ = await self.models.create_model(user, pid, {
                "name": _text(task.get("name")) or label, "description": _text(task.get("description"))})
            labels[label] = {"model": model, "resources": task.get("default_resources") or {},
                             "replicas": (task.get("default_replication_policy") or {}).get("num_replicas", 1)}
            variable = _text(task.get("access_key_environment_variable"))
            if variable:
                project = await self.projects.get(user, pid)
                await self.projects.set_environment(user, pid, project.environment | {variable: model.access_key})
        elif kind == "build_model":
            entry = self._labelled(labels, label, "create_model")
            build = await self.models.create_build(user, pid, entry["model"].public_id, {
                "file_path": _text(task.get("target_file_path")), "function_name": _text(task.get("target_function_name")),
                "comment": _text(task.get("comment")), "runtime_identifier": runtime})
            deadline = time.monotonic() + BUILD_WAIT_SECONDS
            while build.status not in ("built", "build failed", "timedout"):
                if time.monotonic() > deadline:
                    raise FailedPrecondition(f"build {build.public_id} did not end within {BUILD_WAIT_SECONDS // 60} min")
                await asyncio.sleep(POLL_SECONDS)
                _, _, build = await self.models.get_build(user, pid, entry["model"].public_id, build.public_id)
            if build.status != "built":
                raise FailedPrecondition(f"build {build.public_id} {build.status}: {build.failure}".rstrip(": "))
            entry["build"] = build
        elif kind == "deploy_model":
            entry = self._labelled(labels, label, "create_model")
            if "build" not in entry:
                raise FailedPrecondition(f"model {label!r} has no build: a build_model task must come first")
            resources = entry["resources"]
            fields = {"cpu": task.get("cpu", resources.get("cpu", 1)), "memory": task.get("memory", resources.get("memory", 2)),
                      "replicas": task.get("replicas", entry["replicas"])}
            if task.get("gpu"):
                fields["nvidia_gpu"] = task["gpu"]
            await self.models.create_deployment(user, pid, entry["model"].public_id, entry["build"].public_id, fields)
        elif kind == "start_application":
            fields = {"name": _text(task.get("name")) or label, "subdomain": _text(task.get("subdomain")),
                      "script": _text(task.get("script")), "runtime_identifier": runtime,
                      "description": _text(task.get("short_summary"))}
            for key in ("cpu", "memory"):
                if task.get(key) is not None:
                    fields[key] = task[key]
            variables = task.get("environment_variables") or {}
            if isinstance(variables, dict) and variables:
                fields["environment"] = {str(k): _text(v) for k, v in variables.items()}
            await self.applications.create(user, pid, fields)

    @staticmethod
    def _labelled(labels: dict[str, Any], label: str, maker: str) -> Any:
        if label not in labels:
            raise FailedPrecondition(f"no earlier {maker} task has entity_label {label!r}")
        return labels[label]
