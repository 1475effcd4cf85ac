"""Custom runtimes: an image an administrator registers, checked first, then offered in the catalog.

Validation pulls the image through the container engine (with the credential asked for, else
the default one of its registry; localhost/... images are the engine's own and are not pulled) and runs it once as a workload would run (uid 8536, no
capabilities, no network) to learn what a runtime needs: python3 (the terminal's helpers, the
port relay and model servers use it) and, when the image says its editor is JupyterLab,
JupyterLab. CML's labels (com.cloudera.ml.runtime.editor, kernel, edition, full-version, ...)
describe the runtime when the image has them; without them the probe's answers do (kernel from
python3's version, editor JupyterLab when it is installed, else Workbench; edition "Custom").

An image in the appliance's own registry (such as a build's image) is named by the public host
users push to; it is pulled through the internal listener with a short-lived key of the
administrator who registered it, reaching that image's project only.
"""

from __future__ import annotations

import json
import re
from typing import Any

import asyncpg

from cml_appliance.auth import api_keys, users
from cml_appliance.core import audit
from cml_appliance.core.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from cml_appliance.engines.base import EngineError, EngineUnavailable
from cml_appliance.projects import store as project_store
from cml_appliance.registry.tokens import split_repository
from cml_appliance.runtimes.catalog import HOST_RUNTIME_PREFIX
from cml_appliance.runtimes.credentials import DockerCredentials, registry_of

LABEL = "com.cloudera.ml.runtime."
JUPYTERLAB = "JupyterLab"
STATUSES = ("ENABLED", "DISABLED", "DEPRECATED")
# distribution's reference grammar, loosely: [host[:port]/]path[:tag][@digest]
_REFERENCE = re.compile(
    r"^(?:[A-Za-z0-9.-]+(?::\d{1,5})?/)?[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*"
    r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(?:@sha256:[a-f0-9]{64})?$")
_PROBE = (
    "import json, os, sys, importlib.util as u\n"
    "print(json.dumps({'python': '%d.%d' % sys.version_info[:2],"
    " 'jupyterlab': u.find_spec('jupyterlab') is not None,"
    " 'editor_launcher': os.access('/usr/local/bin/ml-runtime-editor', os.X_OK)}))\n"
)
PULL_KEY_SECONDS = 600
# What each refusal's reason means, for people (the UI says these; the API gives the codes).
REASON_WORDS = {
    "NO_CONTAINER_ENGINE": "No container engine is configured to check images",
    "IMAGE_PULL_FAILED": "The image could not be pulled",
    "IMAGE_CANNOT_RUN": "The image could not be run",
    "PYTHON3_MISSING": "The image has no working python3",
    "EDITOR_MISSING": "The image's editor is missing",
    "ALREADY_REGISTERED": "The image is already in the catalog",
}


def check_reference(url: str) -> str:
    url = (url or "").strip()
    if not url:
        raise InvalidArgument("url is required: the image reference, such as registry.example.com/team/runtime:1.0")
    if url.startswith(HOST_RUNTIME_PREFIX):
        raise InvalidArgument("host/ runtimes are the local engine's and come from the configuration, not from an image")
    if len(url) > 512 or not _REFERENCE.match(url):
        raise InvalidArgument(f"{url!r} is not an image reference (registry/name:tag)")
    return url


def is_local(image: str) -> bool:
    """localhost/...: an image the container engine built or loaded itself, never pulled."""
    return registry_of(image) == "localhost"


def _tag(url: str) -> str:
    last = url.split("@", 1)[0].rsplit("/", 1)[-1]
    return last.split(":", 1)[1] if ":" in last else "latest"


def _refused(reason: str, data: str = "") -> tuple[dict[str, Any], str]:
    return {"success": False, "reason": reason, "reason_data": data}, ""  # no details: proto3 JSON leaves them out


class CustomRuntimes:
    def __init__(self, pool: asyncpg.Pool, credentials: DockerCredentials, engine: Any | None,
                 public_host: str, internal_host: str | None):
        self.pool = pool
        self.credentials = credentials
        self.engine = engine  # a ContainerEngine, or None when none is configured
        self.public_host = public_host
        self.internal_host = internal_host  # 127.0.0.1:<port> of the registry proxy, when it runs

    # Where and how an image is pulled ---------------------------------------------------------

    def canonical(self, url: str) -> str:
        """An image of the appliance's own registry is named by the public host, whichever was given."""
        host = registry_of(url)
        if self.internal_host and host == self.internal_host:
            return self.public_host + url[len(host):]
        return url

    def pull_reference(self, image: str) -> str:
        if self.internal_host and registry_of(image) == self.public_host:
            return self.internal_host + image[len(self.public_host):]
        return image

    async def login(self, image: str, user_id: int, credential_id: int | None) -> dict[str, str]:
        """The login to pull `image` with ({} for an anonymous pull)."""
        found = await self.credentials.login_for(image, credential_id)
        if found is not None:
            return found
        if self.internal_host and registry_of(image) == self.public_host:
            repository = image[len(self.public_host) + 1:].split("@", 1)[0].rsplit(":", 1)[0]
            owner_slug = split_repository(repository)
            user = await users.get_by_id(self.pool, user_id)
            project = await project_store.get_by_owner_slug(self.pool, user, *owner_slug) if owner_slug and user else None
            if project is None or user is None:
                raise PermissionDenied(f"{image} is not an image of a project its registrant can read")
            secret, _ = await api_keys.short_lived_key(self.pool, user.id, project.id, f"pull of runtime {image}",
                                                       PULL_KEY_SECONDS)
            return {"username": user.username, "password": secret, "serveraddress": self.internal_host}
        return {}

    async def launch_image(self, runtime_identifier: str) -> tuple[str, dict[str, str] | None]:
        """(image to run, login to pull it with) for a workload on a runtime: custom runtimes are
        pulled at every start (a tag may have moved); the configured ones are the engine's own."""
        row = await self.pool.fetchrow(
            "SELECT custom, status, register_user_id, docker_credential_id FROM runtimes WHERE image_identifier = $1",
            runtime_identifier)
        if row is not None and row["status"] == "DISABLED":
            raise FailedPrecondition(f"runtime {runtime_identifier!r} is disabled by an administrator")
        if row is None or not row["custom"] or is_local(runtime_identifier):
            return runtime_identifier, None
        login = await self.login(runtime_identifier, row["register_user_id"], row["docker_credential_id"])
        return self.pull_reference(runtime_identifier), login

    # Validation and registration ---------------------------------------------------------------

    async def validate(self, actor_id: int, url: str, credential_id: int | None) -> dict[str, Any]:
        """ValidateCustomRuntimeResponse: pulled and probed, or why not."""
        answer, _ = await self._check(actor_id, self.canonical(check_reference(url)), credential_id)
        return answer

    async def _check(self, actor_id: int, url: str, credential_id: int | None) -> tuple[dict[str, Any], str]:
        """(ValidateCustomRuntimeResponse, the image's short version label)."""
        if self.engine is None:
            return _refused("NO_CONTAINER_ENGINE", "custom runtimes are pulled and checked by the container engine, "
                                                   "which is not configured (CML_CONTAINER_ENGINE_URL)")
        pulled = self.pull_reference(url)
        try:
            if not is_local(url):
                await self.engine.pull_image(pulled, await self.login(url, actor_id, credential_id))
            info = await self.engine.inspect_image(pulled)
            if pulled != url:  # known to the engine by the name the catalog uses too (builds look it up)
                await self.engine.tag_image(pulled, url)
        except (EngineError, EngineUnavailable, PermissionDenied) as exc:
            return _refused("IMAGE_PULL_FAILED", str(exc))
        try:
            code, output = await self.engine.probe(pulled, ["python3", "-c", _PROBE])
        except (EngineError, EngineUnavailable) as exc:
            return _refused("IMAGE_CANNOT_RUN", str(exc))
        found = _probe_answer(output) if code == 0 else None
        if found is None:
            return _refused("PYTHON3_MISSING", f"the image cannot run python3, which workloads need "
                                               f"(exit code {code}): {output.strip()[-500:]}")
        labels = (info.get("Config") or {}).get("Labels") or {}
        details = _details(url, labels, found)
        if details["editor"] == JUPYTERLAB and not found["jupyterlab"]:
            return _refused("EDITOR_MISSING", "the image names JupyterLab as its editor, but its python3 cannot "
                                              "import jupyterlab")
        short_version = str(labels.get(LABEL + "short-version") or "").strip()[:200]
        return {"success": True, "reason": "", "reason_data": "", "details": details}, short_version

    async def register(self, actor_id: int, url: str, credential_id: int | None) -> dict[str, Any]:
        """RegisterCustomRuntimeResponse."""
        url = self.canonical(check_reference(url))
        if credential_id is not None:
            await self.credentials.get(credential_id)
        if await self.pool.fetchval("SELECT 1 FROM runtimes WHERE image_identifier = $1", url):
            return {"validation_success": False, "insert_success": False, "reason": "ALREADY_REGISTERED",
                    "reason_data": url}
        checked, short_version = await self._check(actor_id, url, credential_id)
        answer = {"validation_success": checked["success"], "insert_success": False, "reason": checked["reason"],
                  "reason_data": checked["reason_data"]} | ({"details": checked["details"]} if "details" in checked else {})
        if not checked["success"]:
            return answer
        d = checked["details"]
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                "INSERT INTO runtimes (image_identifier, editor, kernel, edition, description, full_version, short_version,"
                " maintenance_version, status, register_user_id, custom, docker_credential_id)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'ENABLED', $9, true, $10)"
                " ON CONFLICT (image_identifier) DO NOTHING RETURNING image_identifier",
                url, d["editor"], d["kernel"], d["edition"], d["description"], d["version"], short_version,
                d["maintenance_version"], actor_id, credential_id)
            if row is None:
                return answer | {"reason": "ALREADY_REGISTERED", "reason_data": url}
            await audit.record(conn, actor_id, "runtime.register", "runtime", url, {k: d[k] for k in ("editor", "kernel", "edition")})
        return answer | {"insert_success": True}

    async def update_status(self, actor_id: int, status: str, ids: list[int], identifiers: list[str]) -> int:
        if status not in STATUSES:
            raise InvalidArgument(f"status must be one of {', '.join(STATUSES)}")
        if not ids and not identifiers:
            raise InvalidArgument("name the runtimes to update: image_identifier (or runtime_id)")
        async with self.pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(
                "UPDATE runtimes SET status = $1 WHERE image_identifier = ANY($2::text[]) OR id = ANY($3::bigint[])"
                " RETURNING image_identifier", status, identifiers, ids)
            if not rows:
                raise NotFound("none of the runtimes named is in the catalog")
            for row in rows:
                await audit.record(conn, actor_id, "runtime.update_status", "runtime", row["image_identifier"], {"status": status})
        return len(rows)


def _probe_answer(output: str) -> dict[str, Any] | None:
    for line in reversed(output.strip().splitlines()):
        try:
            answer = json.loads(line)
        except ValueError:
            continue
        if isinstance(answer, dict) and "python" in answer:
            return answer
    return None


def _details(url: str, labels: dict[str, str], found: dict[str, Any]) -> dict[str, Any]:
    """CustomRuntimeImageDetails, from the image's labels where it has them (plus short_version)."""
    def label(name: str) -> str:
        return str(labels.get(LABEL + name) or "").strip()[:200]

    try:
        maintenance = int(label("maintenance-version") or 0)
    except ValueError:
        maintenance = 0
    editor = label("editor") or (JUPYTERLAB if found["jupyterlab"] else "Workbench")
    version = label("full-version") or _tag(url)
    return {
        "registry": registry_of(url), "editor": editor, "kernel": label("kernel") or f"Python {found['python']}",
        "edition": label("edition") or "Custom", "version": version, "maintenance_version": maintenance,
        "description": label("description") or f"Custom runtime {url}",
    }
