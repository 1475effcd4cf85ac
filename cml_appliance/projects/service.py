"""Project rules: creation from templates (blank, local, git), updates, deletion, collaborators,
environment variables. Handlers call these; nothing here knows about HTTP."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
import re
import shutil
import socket
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg

from cml_appliance.api.bodies import check_text
from cml_appliance.api.listing import ListQuery
from cml_appliance.auth import users as users_mod
from cml_appliance.auth.permissions import PERMISSION_NAMES, Role, require
from cml_appliance.auth.users import User
from cml_appliance.core import audit, ownership
from cml_appliance.core.errors import AlreadyExists, InvalidArgument, NotFound, PermissionDenied
from cml_appliance.core.ids import new_public_id, slugify
from cml_appliance.core.tasks import Supervisor
from cml_appliance.gitserver.repos import GitError, Repositories, run_git
from cml_appliance.projects import files, store
from cml_appliance.projects.store import Project

log = logging.getLogger(__name__)

TEMPLATES = ("blank", "local", "git")
VISIBILITIES = ("private", "organization", "public")
ENGINE_TYPES = ("ml_runtime", "legacy_engine")
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
GIT_CLONE_TIMEOUT = 300


def check_environment(env: Any) -> dict[str, str]:
    """Environment variables as a map of names to strings; a JSON string of such a map is accepted too."""
    if isinstance(env, str):
        if not env.strip():
            return {}
        try:
            env = json.loads(env)
        except json.JSONDecodeError:
            raise InvalidArgument("environment must be a JSON object of names to string values") from None
    if not isinstance(env, dict):
        raise InvalidArgument("environment must be an object of names to string values")
    for name, value in env.items():
        if not ENV_NAME_RE.match(name):
            raise InvalidArgument(f"environment variable name {name!r} must match [A-Za-z_][A-Za-z0-9_]*")
        if not isinstance(value, str):
            raise InvalidArgument(f"environment variable {name} must have a string value")
        check_text(value, f"environment variable {name}")
    return dict(env)


def check_git_ref(ref: str) -> str:
    """A branch, tag or commit: never something git could read as an option."""
    if ref.startswith("-"):
        raise InvalidArgument("git_ref must be a branch, tag or commit, not an option (it starts with '-')")
    if any(ord(ch) < 33 or ord(ch) == 127 for ch in ref) or len(ref) > 255:
        raise InvalidArgument("git_ref must be a branch, tag or commit: no spaces or control characters, at most 255 characters")
    return ref


def git_host(url: str) -> str | None:
    """The host a git URL names (https://, git://, ssh://, or scp-like user@host:path)."""
    if "://" in url:
        return urlsplit(url).hostname
    scp = re.match(r"^[\w.-]+@([\w.-]+|\[[0-9a-fA-F:.]+\]):", url)
    return scp.group(1).strip("[]") if scp else None


async def refuse_internal_git_host(url: str) -> None:
    """A clone fetches from the appliance's own network position: a host that resolves to a
    loopback, link-local (the cloud metadata address), private or otherwise non-public address is
    refused, so a project cannot be used to read internal services."""
    host = git_host(url)
    if host is None:
        return  # a local path: allowed or refused by _check_git_url
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise InvalidArgument(f"git_url host {host!r} does not resolve") from None
    for info in infos:
        address = ipaddress.ip_address(info[4][0].split("%")[0])
        if not address.is_global or address.is_multicast:
            raise InvalidArgument(
                f"git_url host {host!r} is an internal address ({address}): clones from loopback, link-local and "
                "private networks are refused unless the site sets allow_private_git_hosts"
            )


def check_name(name: str) -> str:
    name = name.strip()
    if not name:
        raise InvalidArgument("name must not be empty")
    if len(name) > 200:
        raise InvalidArgument("name must be at most 200 characters")
    if any(ord(ch) < 32 for ch in name):
        raise InvalidArgument("name must not contain control characters")
    check_text(name, "name")
    return name


class ProjectService:
    def __init__(self, pool: asyncpg.Pool, projects_dir: Path, supervisor: Supervisor, repos: Repositories, *,
                 allow_local_git: bool = False, allow_private_git_hosts: bool = False):
        self.pool = pool
        self.projects_dir = projects_dir
        self.supervisor = supervisor
        self.allow_local_git = allow_local_git
        self.repos = repos
        self.allow_private_git_hosts = allow_private_git_hosts

    # Team lookups for team-owned projects (teams/service.py), set by the app.
    teams: TeamService | None = None

    def directory(self, project: Project) -> Path:
        return self.projects_dir / project.public_id

    async def get(self, user: User, public_id: str, needed: Role = Role.READ) -> Project:
        project = await store.get(self.pool, user, public_id)
        role = project.role if project else Role.NONE
        require(role, needed, f"project {public_id!r}")
        assert project is not None
        return project

    async def list_projects(self, user: User, q: ListQuery, *, include_public: bool, include_all: bool) -> tuple[list[Project], bool]:
        return await store.list_visible(self.pool, user, q, include_public=include_public, include_all=include_all)

    async def create(self, user: User, fields: dict[str, Any],
                     then: Callable[[str], Awaitable[None]] | None = None) -> Project:
        """A new project; with the git template its clone runs in the background, then `then`
        (an AMP's set-up) once the project is there."""
        if user.scope_project_id is not None:
            raise PermissionDenied("a workload's own key reaches only its project: it cannot create projects")
        name = check_name(fields.get("name", ""))
        owner_id = user.id
        if fields.get("team_name"):  # the team owns it; its members hold their team roles on it
            if self.teams is None:
                raise InvalidArgument("teams are not available here: leave team_name empty")
            owner_id = await self.teams.owner_for_project(user, str(fields["team_name"]))
        if fields.get("parent_project"):
            raise InvalidArgument("forking with parent_project is not supported; create from git_url instead")
        git_url = fields.get("git_url", "").strip()
        template = (fields.get("template") or ("git" if git_url else "blank")).lower()
        if template not in TEMPLATES:
            raise InvalidArgument(f"template {template!r} is not supported; use one of: {', '.join(TEMPLATES)}")
        if template == "git":
            self._check_git_url(git_url)
            check_git_ref(fields.get("git_ref", ""))
            if not self.allow_private_git_hosts:
                await refuse_internal_git_host(git_url)
        elif git_url:
            raise InvalidArgument("git_url is only used with the git template")
        visibility = (fields.get("visibility") or "private").lower()
        if visibility not in VISIBILITIES:
            raise InvalidArgument(f"visibility must be one of: {', '.join(VISIBILITIES)}")
        engine_type = fields.get("default_project_engine_type") or "ml_runtime"
        if engine_type not in ENGINE_TYPES:
            raise InvalidArgument(f"default_project_engine_type must be one of: {', '.join(ENGINE_TYPES)}")
        shm = fields.get("shared_memory_limit", 64)
        if not 0 <= shm <= 1_000_000:
            raise InvalidArgument("shared_memory_limit must be between 0 and 1000000 MB")
        environment = check_environment(fields.get("environment", {}))

        public_id = new_public_id()
        async with self.pool.acquire() as conn, conn.transaction():
            whose = "the team already has" if owner_id != user.id else "you already have"
            if await conn.fetchval("SELECT 1 FROM projects WHERE owner_id = $1 AND name = $2", owner_id, name):
                raise AlreadyExists(f"{whose} a project named {name!r}")
            slug = await self._free_slug(conn, owner_id, slugify(name))
            values = {
                "public_id": public_id,
                "name": name,
                "slug": slug,
                "owner_id": owner_id,
                "creator_id": user.id,
                "description": fields.get("description", ""),
                "visibility": visibility,
                "default_engine_type": engine_type,
                "template": template,
                "git_url": git_url,
                "creation_status": "creating" if template == "git" else "success",
                "shared_memory_limit": shm,
                "environment": environment,
            }
            try:
                await store.insert(conn, values)
            except asyncpg.UniqueViolationError:
                raise AlreadyExists(f"{whose} a project named {name!r}") from None
            await audit.record(conn, user.id, "project.create", "project", public_id, {"name": name, "template": template})
            if template != "git":
                (self.projects_dir / public_id).mkdir(parents=True, exist_ok=False)
                ownership.give(self.projects_dir / public_id)
        if template != "git":  # a repository from the start (a git template's clone is one)
            try:
                await self.repos.init(self.projects_dir / public_id)
            except GitError as exc:  # the git server makes it one on first use
                log.warning("could not make project %s a git repository: %s", public_id, exc)
        if template == "git":
            self.supervisor.spawn(f"clone-{public_id}", self._clone(public_id, git_url, fields.get("git_ref", ""), then))
        return await self.get(user, public_id)

    async def _free_slug(self, conn: asyncpg.Connection, owner_id: int, base: str) -> str:
        taken = {
            r["slug"]
            for r in await conn.fetch(
                "SELECT slug FROM projects WHERE owner_id = $1 AND (slug = $2 OR slug LIKE $2 || '-%')", owner_id, base
            )
        }
        slug, n = base, 2
        while slug in taken:
            slug, n = f"{base}-{n}", n + 1
        return slug

    def _check_git_url(self, url: str) -> None:
        if not url:
            raise InvalidArgument("git_url is required with the git template")
        if url.startswith("-"):
            raise InvalidArgument("git_url must not start with '-'")
        remote = re.match(r"^(https?|git|ssh)://", url) or re.match(r"^[\w.-]+@[\w.-]+:", url)
        local = url.startswith("file://") or url.startswith("/")
        if local and not self.allow_local_git:
            raise InvalidArgument("git_url must be a remote repository (https://, ssh:// or git://)")
        if not remote and not local:
            raise InvalidArgument(f"git_url {url!r} is not a git URL such as https://host/owner/repo.git")

    async def _clone(self, public_id: str, url: str, ref: str, then: Callable[[str], Awaitable[None]] | None = None) -> None:
        dest = self.projects_dir / public_id
        staging = self.projects_dir / f".clone-{public_id}-{uuid.uuid4().hex[:8]}"
        self.projects_dir.mkdir(parents=True, exist_ok=True)
        # Only network transports (and local paths when allowed); no ext:: or fd:: helpers.
        allow = ["-c", "protocol.allow=never"] + [
            arg for proto in ("https", "http", "git", "ssh") + (("file",) if self.allow_local_git else ())
            for arg in ("-c", f"protocol.{proto}.allow=always")
        ]
        env = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "GIT_PROTOCOL_FROM_USER": "0"}
        status, message = "success", ""
        try:
            await self._git(allow + ["clone", "--quiet", "--", url, str(staging)], env)
            if ref:
                # --end-of-options: a ref is never read as an option, whatever it starts with.
                await self._git(["-C", str(staging), "checkout", "--quiet", "--end-of-options", ref, "--"], env)
            await asyncio.to_thread(ownership.give_tree, staging)
            os.rename(staging, dest)
        except Exception as exc:  # the reason is kept on the project for the user to read
            status, message = "failure", str(exc)[:2000]
            shutil.rmtree(staging, ignore_errors=True)
            dest.mkdir(parents=True, exist_ok=True)
            log.warning("cloning %s for project %s failed: %s", url, public_id, message)
        await self.pool.execute(
            "UPDATE projects SET creation_status = $2, creation_message = $3, updated_at = now() WHERE public_id = $1",
            public_id,
            status,
            message,
        )
        if status == "success" and then is not None:
            await then(public_id)

    async def _git(self, args: list[str], env: dict[str, str]) -> None:
        try:
            await run_git(["git", *args], env=env, timeout=GIT_CLONE_TIMEOUT)
        except GitError as exc:  # kept on the project as why its creation failed
            raise GitError(f"git failed: {exc}") from None

    async def fail_interrupted_creations(self) -> int:
        """At start-up: a clone cut short by a crash will never finish; say so. Clones' and uploads'
        leftovers go."""
        done = await self.pool.execute(
            "UPDATE projects SET creation_status = 'failure', creation_message = 'interrupted by a restart of the appliance',"
            " updated_at = now() WHERE creation_status = 'creating'"
        )
        for leftover in self.projects_dir.glob(".clone-*") if self.projects_dir.exists() else []:
            shutil.rmtree(leftover, ignore_errors=True)
        shutil.rmtree(self.projects_dir / files.UPLOADS_DIR, ignore_errors=True)
        return int(done.split()[-1])

    async def update(self, user: User, public_id: str, fields: dict[str, Any]) -> Project:
        project = await self.get(user, public_id, Role.WRITE)
        values: dict[str, Any] = {}
        if "name" in fields:
            name = check_name(fields["name"])
            if name != project.name:
                values["name"] = name
        if "description" in fields:
            values["description"] = fields["description"]
        if "visibility" in fields:
            visibility = fields["visibility"].lower()
            if visibility not in VISIBILITIES:
                raise InvalidArgument(f"visibility must be one of: {', '.join(VISIBILITIES)}")
            if visibility != project.visibility and project.role < Role.ADMIN:
                require(project.role, Role.ADMIN, "project")
            values["visibility"] = visibility
        if "environment" in fields:
            values["environment"] = check_environment(fields["environment"])
        for key in ("shared_memory_limit", "ephemeral_storage_request", "ephemeral_storage_limit"):
            if key in fields:
                if not 0 <= fields[key] <= 1_000_000:
                    raise InvalidArgument(f"{key} must be between 0 and 1000000")
                values[key] = fields[key]
        async with self.pool.acquire() as conn, conn.transaction():
            try:
                await store.update(conn, project.id, values)
            except asyncpg.UniqueViolationError:
                raise AlreadyExists(f"the owner already has a project named {values.get('name')!r}") from None
            await audit.record(conn, user.id, "project.update", "project", public_id, {"fields": sorted(values)})
        return await self.get(user, public_id)

    async def set_environment(self, user: User, public_id: str, env: dict[str, str]) -> Project:
        return await self.update(user, public_id, {"environment": env})

    async def delete(self, user: User, public_id: str) -> None:
        project = await self.get(user, public_id, Role.ADMIN)
        directory = self.directory(project)
        trash = self.projects_dir / f".deleted-{project.public_id}"
        async with self.pool.acquire() as conn, conn.transaction():
            await store.delete(conn, project.id)
            await audit.record(conn, user.id, "project.delete", "project", public_id, {"name": project.name})
            # Move the files aside before the commit: if that fails, the row (and its files) stay.
            if directory.exists():
                os.rename(directory, trash)
        await asyncio.to_thread(shutil.rmtree, trash, True)

    # Collaborators -------------------------------------------------------------------------------

    async def list_collaborators(self, user: User, public_id: str, q: ListQuery) -> tuple[list[asyncpg.Record], bool]:
        project = await self.get(user, public_id, Role.READ)
        return await store.list_collaborators(self.pool, project.id, q)

    async def put_collaborator(self, user: User, public_id: str, username: str, permission: str) -> None:
        project = await self.get(user, public_id, Role.ADMIN)
        if permission not in PERMISSION_NAMES:
            raise InvalidArgument(f"permission must be one of: {', '.join(PERMISSION_NAMES)}")
        try:
            target = await users_mod.get_by_username(self.pool, username)
        except NotFound:
            raise InvalidArgument(f"there is no user named {username!r}") from None
        if target.username == project.owner["username"]:
            raise InvalidArgument("the project owner is always an admin of the project")
        async with self.pool.acquire() as conn, conn.transaction():
            await store.put_collaborator(conn, project.id, target.id, permission)
            await audit.record(
                conn, user.id, "project.collaborator.put", "project", public_id, {"user": username, "permission": permission}
            )

    async def delete_collaborator(self, user: User, public_id: str, username: str) -> None:
        project = await self.get(user, public_id, Role.ADMIN)
        try:
            target = await users_mod.get_by_username(self.pool, username)
        except NotFound:
            raise NotFound(f"{username!r} is not a collaborator on this project") from None
        async with self.pool.acquire() as conn, conn.transaction():
            if not await store.delete_collaborator(conn, project.id, target.id):
                raise NotFound(f"{username!r} is not a collaborator on this project")
            await audit.record(conn, user.id, "project.collaborator.delete", "project", public_id, {"user": username})
