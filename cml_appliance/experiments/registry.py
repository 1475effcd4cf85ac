"""The model registry: registered models (site-wide, by name) and their versions, each a copy of
what an experiment logged (an MLflow model directory, with its MLmodel file).

Who sees what: a private model is its owner's (and site admins'); a public one everyone reads.
Writing (new versions, notes, deleting) is the owner's and the admins'. Registering a version
needs read access to the run's project. The files are copied (hard-linked where the data dir
allows) into data_dir/model-registry/<model>/<version>/, so a version outlives its run.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import shutil
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import Any

import asyncpg

from cml_appliance.auth.users import User
from cml_appliance.core.errors import AlreadyExists, InvalidArgument, NotFound, PermissionDenied
from cml_appliance.core.ids import new_public_id
from cml_appliance.experiments import search
from cml_appliance.experiments.service import (
    MAX_TAG_VALUE_LENGTH,
    Run,
    TrackingService,
    pairs,
    check_key,
    check_value,
)
from cml_appliance.projects import files

MAX_NAME_LENGTH = 256
MAX_DESCRIPTION_LENGTH = 5000
VISIBILITIES = ("PRIVATE", "PUBLIC")
# A version's files, as the artifacts API serves them: mlflow-artifacts:/registered-models/<model id>/<version>/…
ARTIFACT_PREFIX = "registered-models"

REGISTERED_MODELS = search.Columns(
    attributes={
        "name": ("m.name", "string"), "description": ("m.description", "string"),
        "creation_timestamp": ("(extract(epoch FROM m.created_at) * 1000)::bigint", "number"),
        "last_updated_timestamp": ("(extract(epoch FROM m.updated_at) * 1000)::bigint", "number"),
        "user_id": ("o.username", "string"), "visibility": ("m.visibility", "string"),
    },
    tags="m.tags",
)
MODEL_VERSIONS = search.Columns(
    attributes={
        "name": ("m.name", "string"), "version": ("v.version", "number"), "version_number": ("v.version", "number"),
        "run_id": ("v.run_id", "string"), "source": ("v.source", "string"), "source_path": ("v.source", "string"),
        "model_id": ("v.logged_model_id", "string"), "status": ("v.status", "string"),
        "user_id": ("u.username", "string"), "description": ("v.description", "string"),
        "creation_timestamp": ("(extract(epoch FROM v.created_at) * 1000)::bigint", "number"),
        "last_updated_timestamp": ("(extract(epoch FROM v.updated_at) * 1000)::bigint", "number"),
    },
    tags="v.tags",
)


@dataclasses.dataclass(frozen=True)
class RegisteredModel:
    id: int
    public_id: str
    name: str
    description: str
    visibility: str
    tags: dict[str, str]
    created_at: datetime
    updated_at: datetime
    owner_id: int | None
    owner: dict[str, str]
    version_count: int
    permission: str  # what the caller may do: "owner", "admin" or "viewer"


@dataclasses.dataclass(frozen=True)
class ModelVersion:
    id: int
    public_id: str
    model_public_id: str
    model_name: str
    version: int
    user: dict[str, str]
    project_public_id: str
    experiment_id: str
    run_id: str
    logged_model_id: str
    model_path: str
    source: str
    description: str
    tags: dict[str, str]
    status: str
    created_at: datetime
    updated_at: datetime
    aliases: list[str]


_MODEL_SELECT = """
SELECT m.*, coalesce(o.username, '') AS username, coalesce(o.name, '') AS user_name, coalesce(o.email, '') AS user_email,
       (SELECT count(*) FROM registered_model_versions c WHERE c.registered_model_id = m.id) AS version_count
FROM registered_models m LEFT JOIN users o ON o.id = m.owner_id
"""
_VERSION_SELECT = """
SELECT v.*, m.public_id AS model_public_id, m.name AS model_name, coalesce(p.public_id, '') AS project_public_id,
       ARRAY(SELECT a.alias FROM registered_model_aliases a WHERE a.registered_model_id = v.registered_model_id
             AND a.version = v.version ORDER BY a.alias) AS aliases,
       coalesce(u.username, '') AS username, coalesce(u.name, '') AS user_name, coalesce(u.email, '') AS user_email
FROM registered_model_versions v JOIN registered_models m ON m.id = v.registered_model_id
LEFT JOIN users u ON u.id = v.user_id LEFT JOIN projects p ON p.id = v.project_id
"""
# Who may read a registered model: $1 the caller's id, $2 whether they are an admin.
_READABLE = "(m.visibility = 'PUBLIC' OR m.owner_id = $1 OR $2)"


def _short_user(row: asyncpg.Record) -> dict[str, str]:
    return {"username": row["username"], "name": row["user_name"], "email": row["user_email"]}


def _model(row: asyncpg.Record, user: User) -> RegisteredModel:
    permission = "owner" if row["owner_id"] == user.id else "admin" if user.is_admin else "viewer"
    return RegisteredModel(row["id"], row["public_id"], row["name"], row["description"], row["visibility"], row["tags"],
                           row["created_at"], row["updated_at"], row["owner_id"], _short_user(row), row["version_count"],
                           permission)


def _version(row: asyncpg.Record) -> ModelVersion:
    return ModelVersion(row["id"], row["public_id"], row["model_public_id"], row["model_name"], row["version"],
                        _short_user(row), row["project_public_id"], row["experiment_id"], row["run_id"],
                        row["logged_model_id"], row["model_path"], row["source"], row["description"], row["tags"],
                        row["status"], row["created_at"], row["updated_at"], list(row["aliases"]))


def _copy_model_files(source: Path, target: Path) -> None:
    """The version's own copy: hard links where the filesystem allows (no extra space), copies
    elsewhere; symlinks are never followed out of the source."""

    def link_or_copy(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(source, partial, symlinks=True, copy_function=link_or_copy)
    os.replace(partial, target)


class ModelRegistry:
    def __init__(self, pool: asyncpg.Pool, tracking: TrackingService, storage: Path):
        self.pool = pool
        self.tracking = tracking
        self.storage = storage

    def files_of(self, version: ModelVersion) -> Path:
        return self.storage / version.model_public_id / str(version.version)

    # Registered models ---------------------------------------------------------------------

    async def model(self, user: User, name_or_id: str, *, write: bool = False, by: str = "name") -> RegisteredModel:
        column = "m.name" if by == "name" else "m.public_id"
        row = await self.pool.fetchrow(_MODEL_SELECT + f" WHERE {column} = $3 AND {_READABLE}", user.id, user.is_admin,
                                       str(name_or_id or ""))
        if row is None:
            raise NotFound(f"registered model {name_or_id!r} not found")
        model = _model(row, user)
        if write and model.permission == "viewer":
            raise PermissionDenied(f"only the owner of registered model {model.name!r} (or a site admin) may change it")
        return model

    def _check_name(self, name: Any) -> str:
        if not isinstance(name, str) or not name.strip():
            raise InvalidArgument("a registered model needs a name (a non-empty string)")
        if len(name) > MAX_NAME_LENGTH or "/" in name or ":" in name or "@" in name:
            raise InvalidArgument(f"a registered model name has at most {MAX_NAME_LENGTH} characters and no '/', ':' or '@'")
        return check_value(name, "name", MAX_NAME_LENGTH)

    @staticmethod
    def _tags(tags: Any) -> dict[str, str]:
        return {check_key(k, "tag"): check_value(v, f"tag {k!r}", MAX_TAG_VALUE_LENGTH) for k, v in pairs(tags, "tags")}

    async def create_model(self, user: User, name: Any, *, description: Any = "", tags: Any = None,
                           visibility: Any = "PRIVATE") -> RegisteredModel:
        name = self._check_name(name)
        visibility = str(visibility or "PRIVATE").upper()
        if visibility not in VISIBILITIES:
            raise InvalidArgument("visibility must be PRIVATE or PUBLIC")
        text = check_value(description or "", "description", MAX_DESCRIPTION_LENGTH)
        try:
            await self.pool.execute(
                "INSERT INTO registered_models (public_id, name, description, owner_id, visibility, tags)"
                " VALUES ($1, $2, $3, $4, $5, $6)", new_public_id(), name, text, user.id, visibility, self._tags(tags))
        except asyncpg.UniqueViolationError:
            raise AlreadyExists(f"Registered Model (name={name}) already exists.") from None
        return await self.model(user, name)

    async def search_models(self, user: User, *, filter_text: str = "", order_by: list[str] | None = None,
                            limit: int = 100, offset: int = 0) -> tuple[list[RegisteredModel], bool]:
        q = search.Query()
        q.bind(user.id), q.bind(user.is_admin)  # $1 and $2, as _READABLE expects
        q.where.append(_READABLE)
        rows, more = await search.fetch_page(self.pool, _MODEL_SELECT, q, REGISTERED_MODELS, filter_text=filter_text,
                                             order_by=order_by or [], tiebreak=["m.name ASC"], limit=limit, offset=offset)
        return [_model(r, user) for r in rows], more

    async def update_model(self, user: User, model: RegisteredModel, *, description: Any = None, visibility: Any = None,
                           new_name: Any = None, tags: Any = None, delete_tag: str | None = None,
                           owner_username: str | None = None) -> RegisteredModel:
        if model.permission == "viewer":
            raise PermissionDenied(f"only the owner of registered model {model.name!r} (or a site admin) may change it")
        values: dict[str, Any] = {}
        if description is not None:
            values["description"] = check_value(description, "description", MAX_DESCRIPTION_LENGTH)
        if visibility not in (None, ""):
            if str(visibility).upper() not in VISIBILITIES:
                raise InvalidArgument("visibility must be PRIVATE or PUBLIC")
            values["visibility"] = str(visibility).upper()
        if new_name is not None and new_name != model.name:
            values["name"] = self._check_name(new_name)
        if tags is not None or delete_tag:
            merged = model.tags | self._tags(tags)
            merged.pop(delete_tag or "", None)
            values["tags"] = merged
        if owner_username:
            owner = await self.pool.fetchval("SELECT id FROM users WHERE username = $1", owner_username)
            if owner is None:
                raise InvalidArgument(f"no user {owner_username!r} to hand the model to")
            values["owner_id"] = owner
        if values:
            sets = ", ".join(f"{k} = ${i}" for i, k in enumerate(values, start=2))
            try:
                await self.pool.execute(f"UPDATE registered_models SET {sets}, updated_at = now() WHERE id = $1",
                                        model.id, *values.values())
            except asyncpg.UniqueViolationError:
                raise AlreadyExists(f"Registered Model (name={values.get('name')}) already exists.") from None
        row = await self.pool.fetchrow(_MODEL_SELECT + " WHERE m.id = $1", model.id)
        return _model(row, user)

    async def delete_model(self, user: User, model: RegisteredModel) -> None:
        if model.permission == "viewer":
            raise PermissionDenied(f"only the owner of registered model {model.name!r} (or a site admin) may delete it")
        await self.pool.execute("DELETE FROM registered_models WHERE id = $1", model.id)
        await asyncio.to_thread(shutil.rmtree, self.storage / model.public_id, True)

    # Versions ------------------------------------------------------------------------------

    async def _artifact_dir(self, user: User, project_id: str, *, run: Run | None, source: str, model_id: str,
                            model_path: str) -> tuple[Path, str, str, str]:
        """(files on disk, run id, experiment id, logged model id) for what is being registered,
        resolved in the project's own artifacts (never a path outside them)."""
        tracking = self.tracking
        if not model_id:
            for prefix in ("models:/m-", "models:/"):
                if source.startswith(prefix) and source.removeprefix("models:/").startswith("m-"):
                    model_id = source.removeprefix("models:/").split("/")[0]
        if model_id:
            logged = await tracking.logged_model(user, project_id, model_id)
            project, _ = await tracking.experiment(user, project_id, logged.experiment_public_id)
            relative = f"{logged.experiment_public_id}/models/{logged.model_id}/artifacts"
            return (files.resolve(tracking.artifact_root(project), relative), logged.source_run_id or "",
                    logged.experiment_public_id, logged.model_id)
        if source.startswith("runs:/"):
            run_id, _, model_path = source.removeprefix("runs:/").partition("/")
            run = await tracking.run(user, project_id, run_id)
        elif source.startswith("mlflow-artifacts:/"):
            relative = files.clean_relative(source.removeprefix("mlflow-artifacts:/"))
            parts = PurePosixPath(relative).parts
            if len(parts) < 3 or parts[2] != "artifacts":
                raise InvalidArgument(f"source {source!r} is not a run's artifact path")
            run = await tracking.run(user, project_id, parts[1])
            model_path = "/".join(parts[3:])
        if run is None:
            raise InvalidArgument("say what to register: a logged model id, a runs:/<run id>/<path> or "
                                  "mlflow-artifacts:/ source, or a run_id and model_path")
        project, _ = await tracking.experiment(user, project_id, run.experiment_public_id)
        model_path = files.clean_relative(model_path or "")
        relative = f"{run.experiment_public_id}/{run.run_id}/artifacts/{model_path}".rstrip("/")
        directory = files.resolve(tracking.artifact_root(project), relative, must_exist=False) if model_path else None
        if directory is None or not (directory / "MLmodel").is_file():
            # MLflow 3 keeps a model logged in a run under the logged model: find it by name.
            row = await self.pool.fetchrow(
                "SELECT m.model_id FROM logged_models m WHERE m.source_run_id = $1 AND m.name = $2 AND m.lifecycle_stage = 'active'"
                " ORDER BY m.creation_timestamp DESC LIMIT 1", run.run_id, model_path or "model")
            if row is not None:
                found = await self._artifact_dir(user, project_id, run=None, source="", model_id=row["model_id"], model_path="")
                return found[0], run.run_id, run.experiment_public_id, found[3]
            raise InvalidArgument(f"run {run.run_id} has no MLflow model at {model_path or 'model'!r} (no MLmodel file there)")
        return directory, run.run_id, run.experiment_public_id, ""

    async def create_version(self, user: User, project_id: str, model: RegisteredModel, *, run_id: str = "",
                             source: str = "", model_id: str = "", model_path: str = "", description: Any = "",
                             tags: Any = None) -> ModelVersion:
        if model.permission == "viewer":
            raise PermissionDenied(f"only the owner of registered model {model.name!r} (or a site admin) may add versions")
        run = await self.tracking.run(user, project_id, run_id) if run_id and not source and not model_id else None
        if run_id and not run and not source and not model_id:
            raise NotFound(f"run with id={run_id!r} not found")
        directory, found_run, experiment_id, logged_id = await self._artifact_dir(
            user, project_id, run=run, source=source, model_id=model_id, model_path=model_path)
        if not (directory / "MLmodel").is_file():
            raise InvalidArgument(f"there is no MLflow model at {source or model_path!r}: its MLmodel file is missing")
        project = await self.tracking.projects.get(user, project_id)
        text = check_value(description or "", "description", MAX_DESCRIPTION_LENGTH)
        tag_map = self._tags(tags)
        public_id = new_public_id()
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT 1 FROM registered_models WHERE id = $1 FOR UPDATE", model.id)
            number = await conn.fetchval(
                "SELECT coalesce(max(version), 0) + 1 FROM registered_model_versions WHERE registered_model_id = $1", model.id)
            target = self.storage / model.public_id / str(number)
            await asyncio.to_thread(_copy_model_files, directory, target)
            await conn.execute(
                "INSERT INTO registered_model_versions (public_id, registered_model_id, version, user_id, project_id,"
                " experiment_id, run_id, logged_model_id, model_path, source, description, tags)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
                public_id, model.id, number, user.id, project.id, experiment_id, found_run or run_id, logged_id,
                model_path, source or (f"models:/{logged_id}" if logged_id else f"runs:/{found_run}/{model_path}"), text,
                tag_map)
            await conn.execute("UPDATE registered_models SET updated_at = now() WHERE id = $1", model.id)
        return await self.version(user, model, number)

    async def version(self, user: User, model: RegisteredModel, number: Any) -> ModelVersion:
        try:
            value = int(str(number))
        except ValueError:
            raise InvalidArgument(f"a version is a whole number, got {number!r}") from None
        row = await self.pool.fetchrow(_VERSION_SELECT + " WHERE v.registered_model_id = $1 AND v.version = $2", model.id, value)
        if row is None:
            raise NotFound(f"Model Version (name={model.name}, version={value}) not found")
        return _version(row)

    async def version_by_id(self, user: User, version_id: str) -> tuple[RegisteredModel, ModelVersion]:
        """A version by its CML id (what CreateModelBuild.registered_model_version_id names)."""
        row = await self.pool.fetchrow(_VERSION_SELECT + " WHERE v.public_id = $1", str(version_id or ""))
        if row is None:
            raise NotFound(f"registered model version {version_id!r} not found")
        model = await self.model(user, row["model_public_id"], by="id")
        return model, _version(row)

    async def versions(self, user: User, *, model: RegisteredModel | None = None, filter_text: str = "",
                       order_by: list[str] | None = None, limit: int = 100, offset: int = 0) -> tuple[list[ModelVersion], bool]:
        q = search.Query()
        q.bind(user.id), q.bind(user.is_admin)
        q.where.append(_READABLE)
        if model is not None:
            q.where.append(f"m.id = {q.bind(model.id)}")
        rows, more = await search.fetch_page(self.pool, _VERSION_SELECT, q, MODEL_VERSIONS, filter_text=filter_text,
                                             order_by=order_by or [], tiebreak=["m.name ASC", "v.version DESC"],
                                             limit=limit, offset=offset)
        return [_version(r) for r in rows], more

    async def latest_versions(self, model: RegisteredModel) -> list[ModelVersion]:
        row = await self.pool.fetchrow(_VERSION_SELECT + " WHERE v.registered_model_id = $1 ORDER BY v.version DESC LIMIT 1",
                                       model.id)
        return [_version(row)] if row is not None else []

    async def update_version(self, user: User, model: RegisteredModel, version: ModelVersion, *, description: Any = None,
                             tags: Any = None, delete_tag: str | None = None) -> ModelVersion:
        if model.permission == "viewer":
            raise PermissionDenied(f"only the owner of registered model {model.name!r} (or a site admin) may change it")
        text = version.description if description is None else check_value(description, "description", MAX_DESCRIPTION_LENGTH)
        merged = version.tags | self._tags(tags)
        merged.pop(delete_tag or "", None)
        await self.pool.execute("UPDATE registered_model_versions SET description = $2, tags = $3, updated_at = now()"
                                " WHERE id = $1", version.id, text, merged)
        return await self.version(user, model, version.version)

    async def delete_version(self, user: User, model: RegisteredModel, version: ModelVersion) -> None:
        if model.permission == "viewer":
            raise PermissionDenied(f"only the owner of registered model {model.name!r} (or a site admin) may delete it")
        in_use = await self.pool.fetchval(
            "SELECT count(*) FROM model_builds WHERE registered_model_version_id = $1 AND status IN ('queued', 'pending', 'pushing')",
            version.public_id)
        if in_use:
            raise InvalidArgument(f"version {version.version} of {model.name!r} is being built: cancel the build first")
        await self.pool.execute("DELETE FROM registered_model_versions WHERE id = $1", version.id)
        await asyncio.to_thread(shutil.rmtree, self.files_of(version), True)

    # Aliases ---------------------------------------------------------------------------------

    async def set_alias(self, user: User, model: RegisteredModel, alias: Any, version: Any) -> None:
        if model.permission == "viewer":
            raise PermissionDenied(f"only the owner of registered model {model.name!r} (or a site admin) may change it")
        if not isinstance(alias, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_\-]{0,255}", alias) or \
                re.fullmatch(r"v\d+|latest", alias, re.IGNORECASE):
            raise InvalidArgument("an alias is a name of letters, digits, '_' and '-' (not 'latest' nor v<number>)")
        found = await self.version(user, model, version)
        await self.pool.execute(
            "INSERT INTO registered_model_aliases (registered_model_id, alias, version) VALUES ($1, $2, $3)"
            " ON CONFLICT (registered_model_id, alias) DO UPDATE SET version = excluded.version", model.id, alias, found.version)

    async def delete_alias(self, user: User, model: RegisteredModel, alias: str) -> None:
        if model.permission == "viewer":
            raise PermissionDenied(f"only the owner of registered model {model.name!r} (or a site admin) may change it")
        await self.pool.execute("DELETE FROM registered_model_aliases WHERE registered_model_id = $1 AND alias = $2",
                                model.id, alias)

    async def version_by_alias(self, user: User, model: RegisteredModel, alias: str) -> ModelVersion:
        number = await self.pool.fetchval(
            "SELECT version FROM registered_model_aliases WHERE registered_model_id = $1 AND alias = $2", model.id, alias)
        if number is None:
            raise NotFound(f"Registered model alias {alias} not found.")
        return await self.version(user, model, number)

    async def aliases(self, model_id: int) -> dict[int, list[str]]:
        """version -> its aliases, for one registered model."""
        out: dict[int, list[str]] = {}
        for row in await self.pool.fetch("SELECT alias, version FROM registered_model_aliases WHERE registered_model_id = $1"
                                         " ORDER BY alias", model_id):
            out.setdefault(row["version"], []).append(row["alias"])
        return out

    def download_uri(self, version: ModelVersion) -> str:
        """Where the MLflow client fetches the files: the artifacts API's registry branch."""
        return f"mlflow-artifacts:/{ARTIFACT_PREFIX}/{version.model_public_id}/{version.version}"
