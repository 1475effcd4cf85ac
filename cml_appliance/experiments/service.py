"""Experiments, runs, metrics, params, tags and logged models: the rules MLflow keeps (limits,
immutable params, the latest metric value), the project permissions of the appliance (read to
look, write to log), and the SQL. Both APIs (mlflow_api.py, api.py) call this.

Every experiment belongs to a project; MLflow's experiment "0" (what the client uses when none
is set) is the project's "Default" experiment, made on first use.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import math
import re
import secrets
import time
import uuid
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg

from cml_appliance.auth.permissions import Role
from cml_appliance.auth.users import User
from cml_appliance.core.errors import AlreadyExists, InvalidArgument, NotFound
from cml_appliance.core.ids import new_public_id
from cml_appliance.experiments import search
from cml_appliance.projects import store as project_store
from cml_appliance.projects.service import ProjectService
from cml_appliance.projects.store import Project

DEFAULT_EXPERIMENT_ID = "0"
DEFAULT_EXPERIMENT_NAME = "Default"
RUN_STATUSES = ("RUNNING", "SCHEDULED", "FINISHED", "FAILED", "KILLED")
RUN_NAME_TAG = "mlflow.runName"
# MLflow's own limits (mlflow/utils/validation.py), so that what its server refuses is refused here.
MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_TAGS_PER_BATCH = 100
MAX_ENTITIES_PER_BATCH = 1000
MAX_PARAM_VALUE_LENGTH = 6000
MAX_TAG_VALUE_LENGTH = 8000
MAX_EXPERIMENT_TAG_VALUE_LENGTH = 20000
MAX_KEY_LENGTH = 250
MAX_EXPERIMENT_NAME_LENGTH = 500
MAX_RESULTS = 50000
_KEY_RE = re.compile(r"^[/\w.\- :]+$")
_NAME_WORDS = (
    ("amber", "brisk", "calm", "deft", "eager", "fleet", "gentle", "hardy", "keen", "lucid", "merry", "noble",
     "quiet", "rapid", "sunny", "tidy", "vivid", "witty"),
    ("badger", "crane", "dolphin", "falcon", "gecko", "heron", "ibis", "jay", "koala", "lynx", "marten", "newt",
     "otter", "panda", "quail", "robin", "swift", "wren"),
)


def now_ms() -> int:
    return int(time.time() * 1000)


def _ms(when: datetime) -> int:
    return int(when.timestamp() * 1000)


def number_out(value: float) -> float | str:
    """A metric value as JSON can carry it: NaN and the infinities as protobuf's JSON spells them."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return value


def number_in(value: Any, what: str) -> float:
    if isinstance(value, bool):
        raise InvalidArgument(f"{what} must be a number, got {value!r}")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and value in ("NaN", "Infinity", "-Infinity", "nan", "inf", "-inf"):
        return float(value)
    raise InvalidArgument(f"{what} must be a number, got {value!r}")


def whole(value: Any, what: str, default: int | None = None) -> int:
    if value is None or value == "":
        if default is None:
            raise InvalidArgument(f"missing value for required parameter {what!r}")
        return default
    if isinstance(value, bool):
        raise InvalidArgument(f"{what} must be a whole number, got {value!r}")
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise InvalidArgument(f"{what} must be a whole number, got {value!r}") from None
    if isinstance(value, float) and value != number:
        raise InvalidArgument(f"{what} must be a whole number, got {value!r}")
    return number


def check_key(key: Any, what: str) -> str:
    """MLflow's rule for metric, param and tag names: letters, digits, _ - . space : /, not a path out."""
    if not isinstance(key, str) or not key:
        raise InvalidArgument(f"{what} name must be a non-empty string, got {key!r}")
    if len(key) > MAX_KEY_LENGTH:
        raise InvalidArgument(f"{what} name {key[:40]!r}… is longer than {MAX_KEY_LENGTH} characters")
    if not _KEY_RE.match(key):
        raise InvalidArgument(f"invalid {what} name {key!r}: names may only contain letters, digits, "
                              "underscores (_), dashes (-), periods (.), spaces, colons (:) and slashes (/)")
    if key.startswith("/") or ".." in key.split("/"):
        raise InvalidArgument(f"invalid {what} name {key!r}: it may not be an absolute path or climb with '..'")
    return key


def check_value(value: Any, what: str, limit: int) -> str:
    if value is None:
        value = ""
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        raise InvalidArgument(f"{what} value must be a string, got {value!r}")
    text = str(value)
    if len(text) > limit:
        raise InvalidArgument(f"{what} value is {len(text)} characters long; the limit is {limit}")
    if "\x00" in text:
        raise InvalidArgument(f"{what} value may not contain NUL characters")
    return text


def pairs(items: Any, what: str) -> list[tuple[Any, Any]]:
    if items is None:
        return []
    if not isinstance(items, list):
        raise InvalidArgument(f"{what} must be a list of {{key, value}} objects")
    out = []
    for item in items:
        if not isinstance(item, dict):
            raise InvalidArgument(f"{what} must be a list of {{key, value}} objects")
        out.append((item.get("key"), item.get("value")))
    return out


def page_token_out(offset: int) -> str:
    return base64.urlsafe_b64encode(json.dumps({"offset": offset}).encode()).decode()


def page_token_in(token: str | None) -> int:
    if not token:
        return 0
    try:
        offset = int(json.loads(base64.urlsafe_b64decode(token.encode() + b"=" * (-len(token) % 4)))["offset"])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise InvalidArgument(f"invalid page token {token[:40]!r}") from None
    if offset < 0:
        raise InvalidArgument("invalid page token")
    return offset


def max_results(value: Any, default: int, limit: int = MAX_RESULTS) -> int:
    count = whole(value, "max_results", default)
    if not 1 <= count <= limit:
        raise InvalidArgument(f"max_results must be between 1 and {limit}, got {count}")
    return count


def random_run_name() -> str:
    return f"{secrets.choice(_NAME_WORDS[0])}-{secrets.choice(_NAME_WORDS[1])}-{secrets.randbelow(1000)}"


@dataclasses.dataclass(frozen=True)
class Experiment:
    id: int
    public_id: str
    project_id: int
    project_public_id: str
    name: str
    lifecycle_stage: str
    tags: dict[str, str]
    created_at: datetime
    updated_at: datetime
    creator: dict[str, str]

    @property
    def artifact_location(self) -> str:
        return f"mlflow-artifacts:/{self.public_id}"

    @property
    def creation_time(self) -> int:
        return _ms(self.created_at)

    @property
    def last_update_time(self) -> int:
        return _ms(self.updated_at)


@dataclasses.dataclass(frozen=True)
class Metric:
    key: str
    value: float
    timestamp: int
    step: int

    def sort_key(self) -> tuple[int, int, float]:
        """MLflow's "latest": the highest step, then the newest timestamp, then the largest value."""
        return (self.step, self.timestamp, -math.inf if math.isnan(self.value) else self.value)


@dataclasses.dataclass(frozen=True)
class Run:
    id: int
    run_id: str
    experiment_id: int
    experiment_public_id: str
    project_id: int
    user: str
    run_name: str
    status: str
    start_time: int
    end_time: int | None
    lifecycle_stage: str
    params: dict[str, str]
    tags: dict[str, str]
    latest_metrics: dict[str, dict[str, Any]]
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    creator: dict[str, str]

    @property
    def artifact_uri(self) -> str:
        return f"mlflow-artifacts:/{self.experiment_public_id}/{self.run_id}/artifacts"

    def metrics(self) -> list[Metric]:
        return [Metric(k, float(v["value"]), int(v["timestamp"]), int(v["step"])) for k, v in sorted(self.latest_metrics.items())]


@dataclasses.dataclass(frozen=True)
class LoggedModel:
    id: int
    model_id: str
    experiment_id: int
    experiment_public_id: str
    source_run_id: str | None
    name: str
    model_type: str
    status: str
    status_message: str
    params: dict[str, str]
    tags: dict[str, str]
    creation_timestamp: int
    last_updated_timestamp: int

    @property
    def artifact_uri(self) -> str:
        return f"mlflow-artifacts:/{self.experiment_public_id}/models/{self.model_id}/artifacts"


_EXPERIMENT_SELECT = """
SELECT e.*, p.public_id AS project_public_id,
       coalesce(u.username, '') AS username, coalesce(u.name, '') AS user_name, coalesce(u.email, '') AS user_email
FROM experiments e JOIN projects p ON p.id = e.project_id LEFT JOIN users u ON u.id = e.creator_id
"""
_RUN_SELECT = """
SELECT r.*, e.public_id AS experiment_public_id, e.project_id,
       coalesce(u.username, '') AS username, coalesce(u.name, '') AS user_name, coalesce(u.email, '') AS user_email
FROM experiment_runs r JOIN experiments e ON e.id = r.experiment_id LEFT JOIN users u ON u.id = r.user_id
"""
_MODEL_SELECT = """
SELECT m.*, e.public_id AS experiment_public_id, e.project_id
FROM logged_models m JOIN experiments e ON e.id = m.experiment_id
"""


def _creator(row: asyncpg.Record) -> dict[str, str]:
    return {"username": row["username"], "name": row["user_name"], "email": row["user_email"]}


def _experiment(row: asyncpg.Record) -> Experiment:
    return Experiment(row["id"], row["public_id"], row["project_id"], row["project_public_id"], row["name"],
                      row["lifecycle_stage"], row["tags"], row["created_at"], row["updated_at"], _creator(row))


def _run(row: asyncpg.Record) -> Run:
    return Run(row["id"], row["run_id"], row["experiment_id"], row["experiment_public_id"], row["project_id"],
               row["username"], row["run_name"], row["status"], row["start_time"], row["end_time"],
               row["lifecycle_stage"], row["params"], row["tags"], row["latest_metrics"], row["inputs"], row["outputs"],
               _creator(row))


def _model(row: asyncpg.Record) -> LoggedModel:
    return LoggedModel(row["id"], row["model_id"], row["experiment_id"], row["experiment_public_id"],
                       row["source_run_id"], row["name"], row["model_type"], row["status"], row["status_message"],
                       row["params"], row["tags"], row["creation_timestamp"], row["last_updated_timestamp"])


def _view_condition(view: str, column: str) -> str:
    view = (view or "ACTIVE_ONLY").upper()
    if view == "ACTIVE_ONLY":
        return f"{column} = 'active'"
    if view == "DELETED_ONLY":
        return f"{column} = 'deleted'"
    if view == "ALL":
        return "TRUE"
    raise InvalidArgument(f"view type must be ACTIVE_ONLY, DELETED_ONLY or ALL, got {view!r}")


def _merge_latest(latest: dict[str, dict[str, Any]], metrics: Iterable[Metric]) -> dict[str, dict[str, Any]]:
    merged = dict(latest)
    for metric in metrics:
        current = merged.get(metric.key)
        if current is not None:
            old = Metric(metric.key, float(current["value"]), int(current["timestamp"]), int(current["step"]))
            if old.sort_key() >= metric.sort_key():
                continue
        merged[metric.key] = {"value": number_out(metric.value), "timestamp": metric.timestamp, "step": metric.step}
    return merged


class TrackingService:
    def __init__(self, pool: asyncpg.Pool, projects: ProjectService, artifacts_dir: Path):
        self.pool = pool
        self.projects = projects
        self.artifacts_dir = artifacts_dir

    def artifact_root(self, project: Project | str) -> Path:
        public_id = project if isinstance(project, str) else project.public_id
        return self.artifacts_dir / public_id

    # Experiments ---------------------------------------------------------------------------

    async def _default_experiment(self, project: Project) -> Experiment:
        row = await self.pool.fetchrow(
            _EXPERIMENT_SELECT + " WHERE e.project_id = $1 AND e.name = $2", project.id, DEFAULT_EXPERIMENT_NAME)
        if row is None:
            await self.pool.execute(
                "INSERT INTO experiments (public_id, project_id, name) VALUES ($1, $2, $3)"
                " ON CONFLICT (project_id, name) DO NOTHING", new_public_id(), project.id, DEFAULT_EXPERIMENT_NAME)
            row = await self.pool.fetchrow(
                _EXPERIMENT_SELECT + " WHERE e.project_id = $1 AND e.name = $2", project.id, DEFAULT_EXPERIMENT_NAME)
        assert row is not None
        return _experiment(row)

    async def experiment(self, user: User, project_id: str, experiment_id: str, needed: Role = Role.READ) -> tuple[Project, Experiment]:
        project = await self.projects.get(user, project_id, needed)
        experiment_id = str(experiment_id or "")
        if experiment_id == DEFAULT_EXPERIMENT_ID:
            return project, await self._default_experiment(project)
        row = await self.pool.fetchrow(
            _EXPERIMENT_SELECT + " WHERE e.project_id = $1 AND e.public_id = $2", project.id, experiment_id)
        if row is None:
            raise NotFound(f"no experiment with id={experiment_id!r} in this project")
        return project, _experiment(row)

    async def experiment_by_name(self, user: User, project_id: str, name: str) -> Experiment:
        project = await self.projects.get(user, project_id)
        if name == DEFAULT_EXPERIMENT_NAME:
            return await self._default_experiment(project)
        row = await self.pool.fetchrow(_EXPERIMENT_SELECT + " WHERE e.project_id = $1 AND e.name = $2", project.id, name)
        if row is None:
            raise NotFound(f"no experiment named {name!r} in this project")
        return _experiment(row)

    def _check_experiment_name(self, name: Any) -> str:
        if not isinstance(name, str) or not name.strip():
            raise InvalidArgument("an experiment needs a name (a non-empty string)")
        if len(name) > MAX_EXPERIMENT_NAME_LENGTH:
            raise InvalidArgument(f"an experiment name may be at most {MAX_EXPERIMENT_NAME_LENGTH} characters long")
        return check_value(name, "experiment name", MAX_EXPERIMENT_NAME_LENGTH)

    def _experiment_tags(self, tags: Any) -> dict[str, str]:
        return {check_key(k, "tag"): check_value(v, f"tag {k!r}", MAX_EXPERIMENT_TAG_VALUE_LENGTH) for k, v in pairs(tags, "tags")}

    async def create_experiment(self, user: User, project_id: str, name: Any, tags: Any = None,
                                artifact_location: Any = None) -> Experiment:
        project = await self.projects.get(user, project_id, Role.WRITE)
        name = self._check_experiment_name(name)
        if artifact_location:
            raise InvalidArgument("artifact_location cannot be chosen here: every experiment keeps its artifacts "
                                  "in the appliance (mlflow-artifacts:/<experiment id>)")
        tag_map = self._experiment_tags(tags)
        if name == DEFAULT_EXPERIMENT_NAME:
            await self._default_experiment(project)
            raise AlreadyExists(f"experiment {name!r} already exists")
        try:
            row = await self.pool.fetchrow(
                "INSERT INTO experiments (public_id, project_id, creator_id, name, tags) VALUES ($1, $2, $3, $4, $5)"
                " RETURNING id", new_public_id(), project.id, user.id, name, tag_map)
        except asyncpg.UniqueViolationError:
            raise AlreadyExists(f"experiment {name!r} already exists") from None
        assert row is not None
        found = await self.pool.fetchrow(_EXPERIMENT_SELECT + " WHERE e.id = $1", row["id"])
        return _experiment(found)

    async def search_experiments(self, user: User, project_id: str | None, *, filter_text: str = "",
                                 order_by: list[str] | None = None, view: str = "ACTIVE_ONLY", limit: int = 1000,
                                 offset: int = 0) -> tuple[list[Experiment], bool]:
        """Experiments of one project, or (project_id None) of every project the user can see."""
        q = search.Query()
        if project_id is not None:
            project = await self.projects.get(user, project_id)
            await self._default_experiment(project)
            q.where.append(f"e.project_id = {q.bind(project.id)}")
        else:
            q.where.append(f"e.project_id = ANY({q.bind(await self._visible_project_ids(user))}::bigint[])")
        q.where.append(_view_condition(view, "e.lifecycle_stage"))
        rows, more = await search.fetch_page(self.pool, _EXPERIMENT_SELECT, q, search.EXPERIMENTS, filter_text=filter_text,
                                             order_by=order_by or [], tiebreak=["e.updated_at DESC", "e.id DESC"],
                                             limit=limit, offset=offset)
        return [_experiment(r) for r in rows], more

    async def _visible_project_ids(self, user: User) -> list[int]:
        return await project_store.visible_ids(self.pool, user)

    async def update_experiment(self, user: User, project_id: str, experiment_id: str, *, new_name: Any = None,
                                tags: Any = None) -> Experiment:
        _, experiment = await self.experiment(user, project_id, experiment_id, Role.WRITE)
        name = experiment.name
        if new_name is not None and new_name != experiment.name:
            if experiment.name == DEFAULT_EXPERIMENT_NAME:
                raise InvalidArgument("the Default experiment cannot be renamed")
            name = self._check_experiment_name(new_name)
        tag_map = experiment.tags | self._experiment_tags(tags)
        try:
            await self.pool.execute("UPDATE experiments SET name = $2, tags = $3, updated_at = now() WHERE id = $1",
                                    experiment.id, name, tag_map)
        except asyncpg.UniqueViolationError:
            raise AlreadyExists(f"experiment {name!r} already exists") from None
        _, updated = await self.experiment(user, project_id, experiment.public_id)
        return updated

    async def delete_experiment_tag(self, user: User, project_id: str, experiment_id: str, key: str) -> None:
        _, experiment = await self.experiment(user, project_id, experiment_id, Role.WRITE)
        await self.pool.execute("UPDATE experiments SET tags = tags - $2, updated_at = now() WHERE id = $1",
                                experiment.id, key)

    async def set_experiment_stage(self, user: User, project_id: str, experiment_id: str, stage: str) -> None:
        """Delete (stage 'deleted') or restore an experiment and its runs, as MLflow does: softly."""
        _, experiment = await self.experiment(user, project_id, experiment_id, Role.WRITE)
        if experiment.name == DEFAULT_EXPERIMENT_NAME and stage == "deleted":
            raise InvalidArgument("the Default experiment cannot be deleted")
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("UPDATE experiments SET lifecycle_stage = $2, updated_at = now() WHERE id = $1",
                               experiment.id, stage)
            await conn.execute("UPDATE experiment_runs SET lifecycle_stage = $2 WHERE experiment_id = $1",
                               experiment.id, stage)

    # Runs ----------------------------------------------------------------------------------

    async def run(self, user: User, project_id: str, run_id: str, needed: Role = Role.READ) -> Run:
        project = await self.projects.get(user, project_id, needed)
        row = await self.pool.fetchrow(_RUN_SELECT + " WHERE r.run_id = $1 AND e.project_id = $2", str(run_id or ""), project.id)
        if row is None:
            raise NotFound(f"run with id={run_id!r} not found")
        return _run(row)

    async def _active_run(self, user: User, project_id: str, run_id: str) -> Run:
        run = await self.run(user, project_id, run_id, Role.WRITE)
        if run.lifecycle_stage != "active":
            raise InvalidArgument(f"the run {run_id} must be in the 'active' state; it is {run.lifecycle_stage!r}")
        return run

    async def create_run(self, user: User, project_id: str, experiment_id: str, *, run_name: Any = None,
                         start_time: Any = None, tags: Any = None) -> Run:
        _, experiment = await self.experiment(user, project_id, experiment_id or DEFAULT_EXPERIMENT_ID, Role.WRITE)
        if experiment.lifecycle_stage != "active":
            raise InvalidArgument(f"the experiment {experiment.public_id} must be in the 'active' state to add runs")
        tag_map = {check_key(k, "tag"): check_value(v, f"tag {k!r}", MAX_TAG_VALUE_LENGTH) for k, v in pairs(tags, "tags")}
        name = check_value(run_name or tag_map.get(RUN_NAME_TAG) or random_run_name(), "run name", MAX_TAG_VALUE_LENGTH)
        tag_map[RUN_NAME_TAG] = name
        start = whole(start_time, "start_time", now_ms())
        run_id = uuid.uuid4().hex
        await self.pool.execute(
            "INSERT INTO experiment_runs (run_id, experiment_id, user_id, run_name, start_time, tags)"
            " VALUES ($1, $2, $3, $4, $5, $6)", run_id, experiment.id, user.id, name, start, tag_map)
        await self.pool.execute("UPDATE experiments SET updated_at = now() WHERE id = $1", experiment.id)
        return await self.run(user, project_id, run_id)

    async def update_run(self, user: User, project_id: str, run_id: str, *, status: Any = None, end_time: Any = None,
                         run_name: Any = None) -> Run:
        run = await self._active_run(user, project_id, run_id)
        new_status = run.status
        if status is not None and status != "":
            if status not in RUN_STATUSES:
                raise InvalidArgument(f"status must be one of {', '.join(RUN_STATUSES)}, got {status!r}")
            new_status = status
        end = run.end_time if end_time in (None, "") else whole(end_time, "end_time")
        name = run.run_name if not run_name else check_value(run_name, "run name", MAX_TAG_VALUE_LENGTH)
        await self.pool.execute(
            "UPDATE experiment_runs SET status = $2, end_time = $3, run_name = $4,"
            " tags = tags || jsonb_build_object($5::text, $4::text) WHERE id = $1",
            run.id, new_status, end, name, RUN_NAME_TAG)
        return await self.run(user, project_id, run_id)

    async def set_run_stage(self, user: User, project_id: str, run_id: str, stage: str) -> None:
        run = await self.run(user, project_id, run_id, Role.WRITE)
        await self.pool.execute("UPDATE experiment_runs SET lifecycle_stage = $2 WHERE id = $1", run.id, stage)

    async def search_runs(self, user: User, project_id: str, experiment_ids: list[str], *, filter_text: str = "",
                          order_by: list[str] | None = None, view: str = "ACTIVE_ONLY", limit: int = 1000,
                          offset: int = 0) -> tuple[list[Run], bool]:
        project = await self.projects.get(user, project_id)
        ids = []
        for experiment_id in experiment_ids:
            _, experiment = await self.experiment(user, project_id, experiment_id)
            ids.append(experiment.id)
        q = search.Query()
        q.where.append(f"e.project_id = {q.bind(project.id)}")
        q.where.append(f"r.experiment_id = ANY({q.bind(ids)}::bigint[])")
        q.where.append(_view_condition(view, "r.lifecycle_stage"))
        rows, more = await search.fetch_page(self.pool, _RUN_SELECT, q, search.RUNS, filter_text=filter_text,
                                             order_by=order_by or [], tiebreak=["r.start_time DESC", "r.run_id"],
                                             limit=limit, offset=offset)
        return [_run(r) for r in rows], more

    # Logging -------------------------------------------------------------------------------

    @staticmethod
    def parse_metrics(items: Any) -> list[Metric]:
        if items is None:
            return []
        if not isinstance(items, list):
            raise InvalidArgument("metrics must be a list of {key, value, timestamp, step} objects")
        out = []
        for item in items:
            if not isinstance(item, dict):
                raise InvalidArgument("metrics must be a list of {key, value, timestamp, step} objects")
            key = check_key(item.get("key"), "metric")
            if "value" not in item:
                raise InvalidArgument(f"metric {key!r} has no value")
            out.append(Metric(key, number_in(item["value"], f"metric {key!r}"),
                              whole(item.get("timestamp"), "timestamp", now_ms()), whole(item.get("step"), "step", 0)))
        return out

    async def log_batch(self, user: User, project_id: str, run_id: str, *, metrics: Any = None, params: Any = None,
                        tags: Any = None, model_id: str | None = None) -> None:
        """Metrics, params and tags in one transaction, within MLflow's limits; a param, once
        logged, keeps its value (logging the same value again is allowed)."""
        metric_list = self.parse_metrics(metrics)
        param_pairs = pairs(params, "params")
        tag_pairs = pairs(tags, "tags")
        if len(metric_list) > MAX_METRICS_PER_BATCH:
            raise InvalidArgument(f"A batch logging request can contain at most {MAX_METRICS_PER_BATCH} metrics. "
                                  f"Got {len(metric_list)} metrics. Please split up metrics across multiple requests and try again.")
        if len(param_pairs) > MAX_PARAMS_TAGS_PER_BATCH:
            raise InvalidArgument(f"A batch logging request can contain at most {MAX_PARAMS_TAGS_PER_BATCH} params. "
                                  f"Got {len(param_pairs)} params. Please split up params across multiple requests and try again.")
        if len(tag_pairs) > MAX_PARAMS_TAGS_PER_BATCH:
            raise InvalidArgument(f"A batch logging request can contain at most {MAX_PARAMS_TAGS_PER_BATCH} tags. "
                                  f"Got {len(tag_pairs)} tags. Please split up tags across multiple requests and try again.")
        total = len(metric_list) + len(param_pairs) + len(tag_pairs)
        if total > MAX_ENTITIES_PER_BATCH:
            raise InvalidArgument(f"A batch logging request can contain at most {MAX_ENTITIES_PER_BATCH} total "
                                  f"metrics, params and tags. Got {total}. Please split up across multiple requests and try again.")
        new_params: dict[str, str] = {}
        for key, value in param_pairs:
            key = check_key(key, "param")
            text = check_value(value, f"param {key!r}", MAX_PARAM_VALUE_LENGTH)
            if new_params.get(key, text) != text:
                raise InvalidArgument(f"duplicate param {key!r} with different values in one batch")
            new_params[key] = text
        new_tags = {check_key(k, "tag"): check_value(v, f"tag {k!r}", MAX_TAG_VALUE_LENGTH) for k, v in tag_pairs}
        run = await self._active_run(user, project_id, run_id)
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow("SELECT params, latest_metrics, run_name FROM experiment_runs WHERE id = $1 FOR UPDATE", run.id)
            changed = {k: (row["params"][k], v) for k, v in new_params.items() if k in row["params"] and row["params"][k] != v}
            if changed:
                key, (old, new) = next(iter(changed.items()))
                raise InvalidArgument(f"Changing param values is not allowed. Param with key={key!r} was already "
                                      f"logged with value={old!r} for run ID={run.run_id!r}. Attempted logging new value {new!r}.")
            if metric_list:
                await self._insert_points(conn, run.id, metric_list, model_id)
            run_name = new_tags.get(RUN_NAME_TAG, row["run_name"])
            await conn.execute(
                "UPDATE experiment_runs SET params = params || $2, tags = tags || $3, latest_metrics = $4, run_name = $5"
                " WHERE id = $1", run.id, new_params, new_tags, _merge_latest(row["latest_metrics"], metric_list), run_name)

    @staticmethod
    async def _insert_points(conn: asyncpg.Connection, run_pk: int, metrics: list[Metric], model_id: str | None) -> None:
        """Metric points, each stored once: a point the run already has (same key, step,
        timestamp and value) is not added again, as in MLflow. The client sends a run's metrics
        once more when it logs a model, with the model's id: those points are then linked to it."""
        columns = ([m.key for m in metrics], [m.value for m in metrics], [m.timestamp for m in metrics],
                   [m.step for m in metrics])
        points = "SELECT DISTINCT * FROM unnest($2::text[], $3::float8[], $4::int8[], $5::int8[]) AS p(key, value, ts, step)"
        same = ("r.run_id = $1 AND r.key = p.key AND r.step = p.step AND r.timestamp = p.ts AND r.value = p.value")
        if model_id is not None:
            await conn.execute(f"UPDATE run_metrics r SET model_id = $6 FROM ({points}) p WHERE {same} AND r.model_id IS NULL",
                               run_pk, *columns, model_id)
        await conn.execute(
            f"INSERT INTO run_metrics (run_id, key, value, timestamp, step, model_id)"
            f" SELECT $1, p.key, p.value, p.ts, p.step, $6 FROM ({points}) p"
            f" WHERE NOT EXISTS (SELECT 1 FROM run_metrics r WHERE {same})", run_pk, *columns, model_id)

    async def delete_tag(self, user: User, project_id: str, run_id: str, key: str) -> None:
        run = await self._active_run(user, project_id, run_id)
        if key not in run.tags:
            raise NotFound(f"no tag with key={key!r} on run {run_id}")
        await self.pool.execute("UPDATE experiment_runs SET tags = tags - $2 WHERE id = $1", run.id, key)

    async def delete_batch(self, user: User, project_id: str, run_id: str, *, metrics: list[str], params: list[str],
                           tags: list[str]) -> None:
        """CML's :deletebatch: forget metrics (with their history), params and tags by name."""
        run = await self._active_run(user, project_id, run_id)
        async with self.pool.acquire() as conn, conn.transaction():
            if metrics:
                await conn.execute("DELETE FROM run_metrics WHERE run_id = $1 AND key = ANY($2::text[])", run.id, metrics)
            await conn.execute(
                "UPDATE experiment_runs SET latest_metrics = latest_metrics - $2::text[], params = params - $3::text[],"
                " tags = tags - $4::text[] WHERE id = $1", run.id, metrics, params, tags)

    async def log_inputs(self, user: User, project_id: str, run_id: str, datasets: Any, models: Any = None) -> None:
        run = await self._active_run(user, project_id, run_id)
        if datasets is not None and not isinstance(datasets, list):
            raise InvalidArgument("datasets must be a list")
        if models is not None and not isinstance(models, list):
            raise InvalidArgument("models must be a list")
        entries = []
        for item in datasets or []:
            dataset = item.get("dataset") if isinstance(item, dict) else None
            if not isinstance(dataset, dict) or not dataset.get("name") or not dataset.get("digest"):
                raise InvalidArgument("each dataset input needs a dataset with a name and a digest")
            clean = {k: check_value(dataset.get(k, ""), f"dataset {k}", 16 * 1024 * 1024)
                     for k in ("name", "digest", "source_type", "source", "schema", "profile")}
            entries.append({"dataset": clean, "tags": [{"key": check_key(k, "input tag"), "value": check_value(v, "input tag", 500)}
                                                       for k, v in pairs(item.get("tags"), "tags")]})
        model_inputs = [{"model_id": str(m.get("model_id", ""))} for m in models or [] if isinstance(m, dict)]
        if not entries and not model_inputs:
            return
        async with self.pool.acquire() as conn, conn.transaction():
            current = await conn.fetchval("SELECT inputs FROM experiment_runs WHERE id = $1 FOR UPDATE", run.id)
            seen = {(e.get("dataset", {}).get("name"), e.get("dataset", {}).get("digest")) for e in current}
            merged = current + [e for e in entries if (e["dataset"]["name"], e["dataset"]["digest"]) not in seen]
            merged += [m for m in model_inputs if m not in current]
            await conn.execute("UPDATE experiment_runs SET inputs = $2 WHERE id = $1", run.id, merged)

    async def log_outputs(self, user: User, project_id: str, run_id: str, models: Any) -> None:
        run = await self._active_run(user, project_id, run_id)
        if not isinstance(models, list):
            raise InvalidArgument("models must be a list of {model_id, step}")
        outputs = [{"model_id": str(m.get("model_id", "")), "step": whole(m.get("step"), "step", 0)}
                   for m in models if isinstance(m, dict)]
        async with self.pool.acquire() as conn, conn.transaction():
            current = await conn.fetchval("SELECT outputs FROM experiment_runs WHERE id = $1 FOR UPDATE", run.id)
            await conn.execute("UPDATE experiment_runs SET outputs = $2 WHERE id = $1", run.id,
                               current + [o for o in outputs if o not in current])

    async def metric_history(self, user: User, project_id: str, run_id: str, key: str, *, limit: int = 25000,
                             offset: int = 0) -> tuple[list[Metric], bool]:
        run = await self.run(user, project_id, run_id)
        rows = await self.pool.fetch(
            "SELECT key, value, timestamp, step FROM run_metrics WHERE run_id = $1 AND key = $2"
            " ORDER BY step, timestamp, value LIMIT $3 OFFSET $4", run.id, key, limit + 1, offset)
        return [Metric(r["key"], r["value"], r["timestamp"], r["step"]) for r in rows[:limit]], len(rows) > limit

    # Logged models (MLflow 3) ----------------------------------------------------------------

    async def create_logged_model(self, user: User, project_id: str, experiment_id: str, *, name: Any = None,
                                  model_type: Any = None, source_run_id: Any = None, params: Any = None,
                                  tags: Any = None) -> LoggedModel:
        _, experiment = await self.experiment(user, project_id, experiment_id or DEFAULT_EXPERIMENT_ID, Role.WRITE)
        if source_run_id:
            run = await self.run(user, project_id, source_run_id)
            if run.experiment_id != experiment.id:
                raise InvalidArgument("the source run belongs to another experiment")
        model_name = check_value(name or random_run_name(), "model name", 500)
        param_map = {check_key(k, "param"): check_value(v, f"param {k!r}", MAX_PARAM_VALUE_LENGTH) for k, v in pairs(params, "params")}
        tag_map = {check_key(k, "tag"): check_value(v, f"tag {k!r}", MAX_TAG_VALUE_LENGTH) for k, v in pairs(tags, "tags")}
        stamp = now_ms()
        model_id = f"m-{uuid.uuid4().hex}"
        await self.pool.execute(
            "INSERT INTO logged_models (model_id, experiment_id, source_run_id, name, model_type, params, tags,"
            " creation_timestamp, last_updated_timestamp, user_id) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8, $9)",
            model_id, experiment.id, source_run_id or None, model_name, str(model_type or ""), param_map, tag_map, stamp, user.id)
        return await self.logged_model(user, project_id, model_id)

    async def logged_model(self, user: User, project_id: str, model_id: str, needed: Role = Role.READ) -> LoggedModel:
        project = await self.projects.get(user, project_id, needed)
        row = await self.pool.fetchrow(_MODEL_SELECT + " WHERE m.model_id = $1 AND e.project_id = $2 AND m.lifecycle_stage = 'active'",
                                       str(model_id), project.id)
        if row is None:
            raise NotFound(f"logged model with id={model_id!r} not found")
        return _model(row)

    async def update_logged_model(self, user: User, project_id: str, model_id: str, *, status: Any = None,
                                  tags: Any = None, delete_tag: str | None = None, params: Any = None) -> LoggedModel:
        model = await self.logged_model(user, project_id, model_id, Role.WRITE)
        new_status = model.status
        if status is not None:
            if status not in ("LOGGED_MODEL_PENDING", "LOGGED_MODEL_READY", "LOGGED_MODEL_UPLOAD_FAILED"):
                raise InvalidArgument(f"unknown logged model status {status!r}")
            new_status = status
        tag_map = {check_key(k, "tag"): check_value(v, f"tag {k!r}", MAX_TAG_VALUE_LENGTH) for k, v in pairs(tags, "tags")}
        param_map = {check_key(k, "param"): check_value(v, f"param {k!r}", MAX_PARAM_VALUE_LENGTH) for k, v in pairs(params, "params")}
        await self.pool.execute(
            "UPDATE logged_models SET status = $2, tags = (tags || $3) - $4::text, params = params || $5,"
            " last_updated_timestamp = $6 WHERE id = $1", model.id, new_status, tag_map, delete_tag or "", param_map, now_ms())
        return await self.logged_model(user, project_id, model_id)

    async def logged_model_metrics(self, model: LoggedModel) -> list[Metric]:
        """The latest point of each metric logged for the model (log_model's metrics, or ones
        logged with its model_id)."""
        rows = await self.pool.fetch(
            "SELECT DISTINCT ON (key) key, value, timestamp, step FROM run_metrics WHERE model_id = $1"
            " ORDER BY key, step DESC, timestamp DESC, value DESC", model.model_id)
        return [Metric(r["key"], r["value"], r["timestamp"], r["step"]) for r in rows]

    async def delete_logged_model(self, user: User, project_id: str, model_id: str) -> None:
        model = await self.logged_model(user, project_id, model_id, Role.WRITE)
        await self.pool.execute("UPDATE logged_models SET lifecycle_stage = 'deleted' WHERE id = $1", model.id)

    async def search_logged_models(self, user: User, project_id: str, experiment_ids: list[str], *, filter_text: str = "",
                                   order_by: list[dict[str, Any]] | None = None, limit: int = 100,
                                   offset: int = 0) -> tuple[list[LoggedModel], bool]:
        project = await self.projects.get(user, project_id)
        ids = [(await self.experiment(user, project_id, e))[1].id for e in experiment_ids]
        q = search.Query()
        q.where += [f"e.project_id = {q.bind(project.id)}", f"m.experiment_id = ANY({q.bind(ids)}::bigint[])",
                    "m.lifecycle_stage = 'active'"]
        # MLflow 3 sends this order as [{field_name, ascending}]: the same as "field ASC|DESC".
        order = [f"{item['field_name']} {'ASC' if item.get('ascending', True) else 'DESC'}"
                 for item in order_by or [] if isinstance(item, dict) and item.get("field_name")]
        rows, more = await search.fetch_page(self.pool, _MODEL_SELECT, q, search.LOGGED_MODELS, filter_text=filter_text,
                                             order_by=order, tiebreak=["m.creation_timestamp DESC", "m.id DESC"],
                                             limit=limit, offset=offset)
        return [_model(r) for r in rows], more
