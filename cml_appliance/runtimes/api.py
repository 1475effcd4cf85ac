"""API v2: the runtime catalog (/runtimes), custom runtimes, docker credentials, runtime repos
and resource profiles (/cpuprofiles). Changes are for site administrators; listings for everyone
signed in (docker credentials show no username or password)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from aiohttp import BodyPartReader, web

from cml_appliance.api.bodies import ANY, BOOL, FLOAT, INT, INT64, STR, STR_LIST, open_multipart
from cml_appliance.api.common import json_body, list_query, page
from cml_appliance.core.errors import InvalidArgument, NotFound, PayloadTooLarge
from cml_appliance.runtimes import addons, catalog, credentials, repos
from cml_appliance.web.context import current_user, require_site_admin
from cml_appliance.web.keys import CUSTOM_RUNTIMES, DOCKER_CREDENTIALS, POOL, RUNTIME_ADDONS


async def list_runtimes(request: web.Request) -> web.Response:
    current_user(request)
    q = list_query(request, catalog.RUNTIME_FILTER_KEYS, catalog.RUNTIME_SORT_KEYS)
    items, more = await catalog.list_runtimes(request.app[POOL], q)
    return page(request, "runtimes", items, q, more)


async def list_profiles(request: web.Request) -> web.Response:
    current_user(request)
    q = list_query(request, catalog.PROFILE_FILTER_KEYS, catalog.PROFILE_SORT_KEYS)
    items, more = await catalog.list_profiles(request.app[POOL], q)
    return page(request, "cpu_resource_profiles", items, q, more)


PROFILE_SPEC = {"id": INT, "cpu": FLOAT, "memory": FLOAT, "resource_group_id": INT}


async def create_profile(request: web.Request) -> web.Response:
    admin = require_site_admin(request)
    body = await json_body(request, PROFILE_SPEC)
    if "cpu" not in body or "memory" not in body:
        raise InvalidArgument("cpu (vCPU) and memory (GB) are required")
    profile = await catalog.create_profile(
        request.app[POOL], admin.id, body["cpu"], body["memory"], body.get("resource_group_id", 0)
    )
    return web.json_response({"cpu_profile": profile})


def _profile_id(request: web.Request) -> int:
    try:
        value = int(request.match_info["id"])
    except ValueError:
        raise InvalidArgument("resource profile id must be a whole number") from None
    if not 0 < value < 2**31:  # the column is an int32: past it there is no such profile
        raise NotFound(f"there is no resource profile {value}")
    return value


async def update_profile(request: web.Request) -> web.Response:
    admin = require_site_admin(request)
    body = await json_body(request, PROFILE_SPEC)
    profile_id = _profile_id(request)
    if body.pop("id", profile_id) != profile_id:
        raise InvalidArgument("id in the body must match the path")
    rows = await catalog.update_profile(request.app[POOL], admin.id, profile_id, body)
    return web.json_response({"rows_affected": rows})


async def delete_profile(request: web.Request) -> web.Response:
    admin = require_site_admin(request)
    rows = await catalog.delete_profile(request.app[POOL], admin.id, _profile_id(request))
    return web.json_response({"rows_affected": rows})


# Custom runtimes ---------------------------------------------------------------------------------


def _ids(raw: object, name: str) -> list[int]:
    """A list of numeric ids in a status update (those no row can have are dropped)."""
    ids = raw or []
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise InvalidArgument(f"{name} must list whole numbers")
    return [i for i in ids if 0 < i < 2**63]


def _credential_id(raw: object) -> int | None:
    return None if raw in (None, "", "0") else credentials.parse_id(raw)


async def validate_runtime(request: web.Request) -> web.Response:
    admin = require_site_admin(request)
    credential_id = _credential_id(request.query.get("docker_credential_id"))
    answer = await request.app[CUSTOM_RUNTIMES].validate(admin.id, request.query.get("url", ""), credential_id)
    return web.json_response(answer)


async def register_runtime(request: web.Request) -> web.Response:
    admin = require_site_admin(request)
    body = await json_body(request, {"url": STR, "docker_credential_id": STR})
    credential_id = _credential_id(body.get("docker_credential_id"))
    return web.json_response(await request.app[CUSTOM_RUNTIMES].register(admin.id, body.get("url", ""), credential_id))


async def update_runtime_status(request: web.Request) -> web.Response:
    admin = require_site_admin(request)
    body = await json_body(request, {"status": STR, "runtime_id": ANY, "image_identifier": STR_LIST})
    rows = await request.app[CUSTOM_RUNTIMES].update_status(
        admin.id, body.get("status", "ENABLED"), _ids(body.get("runtime_id"), "runtime_id"), body.get("image_identifier", []))
    return web.json_response({"rows_affected": rows})


# Docker credentials ------------------------------------------------------------------------------

CREDENTIAL_SPEC = {"id": STR, "name": STR, "server": STR, "username": STR, "password": STR, "is_default": BOOL}


async def list_credentials(request: web.Request) -> web.Response:
    current_user(request)
    q = list_query(request, credentials.FILTER_KEYS, credentials.SORT_KEYS)
    items, more = await request.app[DOCKER_CREDENTIALS].list(q)
    return page(request, "docker_credentials", items, q, more)


async def create_credential(request: web.Request) -> web.Response:
    admin = require_site_admin(request)
    body = await json_body(request, CREDENTIAL_SPEC)
    return web.json_response(await request.app[DOCKER_CREDENTIALS].create(admin.id, body))


async def update_credential(request: web.Request) -> web.Response:
    admin = require_site_admin(request)
    credential_id = credentials.parse_id(request.match_info["docker_credential_id"])
    body = await json_body(request, CREDENTIAL_SPEC)
    if body.pop("id", None) not in (None, "", str(credential_id)):
        raise InvalidArgument("id in the body must match the path")
    return web.json_response(await request.app[DOCKER_CREDENTIALS].update(admin.id, credential_id, body))


async def delete_credential(request: web.Request) -> web.Response:
    admin = require_site_admin(request)
    await request.app[DOCKER_CREDENTIALS].delete(admin.id, credentials.parse_id(request.match_info["docker_credential_id"]))
    return web.json_response({})


async def set_runtime_credential(request: web.Request) -> web.Response:
    admin = require_site_admin(request)
    body = await json_body(request, {"docker_credential_id": STR, "runtime_identifier": STR})
    if not body.get("runtime_identifier"):
        raise InvalidArgument("runtime_identifier is required")
    await request.app[DOCKER_CREDENTIALS].set_for_runtime(
        admin.id, _credential_id(body.get("docker_credential_id")), body["runtime_identifier"])
    return web.json_response({})


# Runtime repos -----------------------------------------------------------------------------------

REPO_SPEC = {"id": INT64, "name": STR, "url": STR}


async def list_repos(request: web.Request) -> web.Response:
    current_user(request)
    q = list_query(request, repos.FILTER_KEYS, repos.SORT_KEYS)
    items, more = await repos.list_repos(request.app[POOL], q)
    return page(request, "runtimerepos", items, q, more)


async def create_repo(request: web.Request) -> web.Response:
    admin = require_site_admin(request)
    body = await json_body(request, REPO_SPEC)
    return web.json_response(await repos.create_repo(request.app[POOL], admin.id, body.get("name"), body.get("url")))


async def update_repo(request: web.Request) -> web.Response:
    admin = require_site_admin(request)
    repo_id = repos.parse_id(request.match_info["runtimerepo_id"])
    body = await json_body(request, REPO_SPEC)
    if body.get("id") not in (None, 0, repo_id):
        raise InvalidArgument("id in the body must match the path")
    return web.json_response(await repos.update_repo(request.app[POOL], admin.id, repo_id, body.get("name"), body.get("url")))


async def delete_repo(request: web.Request) -> web.Response:
    admin = require_site_admin(request)
    await repos.delete_repo(request.app[POOL], admin.id, repos.parse_id(request.match_info["runtime_repo_id"]))
    return web.json_response({})


# Runtime add-ons -----------------------------------------------------------------------------------


async def list_addons(request: web.Request) -> web.Response:
    current_user(request)
    q = list_query(request, addons.FILTER_KEYS, addons.SORT_KEYS)
    items, more = await request.app[RUNTIME_ADDONS].list(q)
    return page(request, "runtime_addons", items, q, more)


async def update_addon_status(request: web.Request) -> web.Response:
    admin = require_site_admin(request)
    body = await json_body(request, {"status": STR, "ids": ANY, "identifiers": STR_LIST})
    rows = await request.app[RUNTIME_ADDONS].update_status(admin.id, body.get("status", ""), _ids(body.get("ids"), "ids"),
                                                           body.get("identifiers", []))
    return web.json_response({"rows_affected": rows})


async def upload_addon(request: web.Request) -> web.Response:
    """HandleCustomRuntimeUpload: multipart with `metadata` (JSON) and `tarball`."""
    admin = require_site_admin(request)
    store = request.app[RUNTIME_ADDONS]
    reader = await open_multipart(request)
    metadata = b""
    with tempfile.TemporaryDirectory(prefix="cml-addon-upload-") as folder:
        archive = Path(folder) / "tarball"
        got_tarball = False
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                raise InvalidArgument("nested multipart bodies are not accepted")
            if part.name == "metadata":
                metadata = await part.read(decode=False)
                if len(metadata) > 64 * 1024:
                    raise PayloadTooLarge("metadata is larger than 64 KB")
            elif part.name == "tarball":
                size = 0
                with open(archive, "wb") as fh:
                    while chunk := await part.read_chunk(1024 * 1024):
                        size += len(chunk)
                        if size > store.max_bytes:
                            raise PayloadTooLarge(f"the tarball is larger than the limit of {store.max_bytes} bytes")
                        fh.write(chunk)
                got_tarball = True
            else:
                raise InvalidArgument(f"unexpected form field {part.name!r}: send metadata and tarball")
        if not got_tarball or not metadata:
            raise InvalidArgument("send both form fields: metadata (JSON) and tarball (the add-on's files)")
        return web.json_response(await store.add(admin.id, metadata, archive))


def routes() -> list[web.RouteDef]:
    return [
        web.get("/api/v2/runtimes", list_runtimes, name="api_list_runtimes"),
        web.post("/api/v2/runtimes", register_runtime, name="api_register_runtime"),
        web.get("/api/v2/runtimes:validate", validate_runtime, name="api_validate_runtime"),
        web.post("/api/v2/runtimes:update", update_runtime_status, name="api_update_runtime_status"),
        web.post("/api/v2/runtimes/credential:set", set_runtime_credential, name="api_set_runtime_credential"),
        web.get("/api/v2/dockercredentials", list_credentials, name="api_list_docker_credentials"),
        web.post("/api/v2/dockercredentials", create_credential, name="api_create_docker_credential"),
        web.patch("/api/v2/dockercredentials/{docker_credential_id}", update_credential, name="api_update_docker_credential"),
        web.delete("/api/v2/dockercredentials/{docker_credential_id}", delete_credential, name="api_delete_docker_credential"),
        web.get("/api/v2/runtimeaddons", list_addons, name="api_list_runtime_addons"),
        web.post("/api/v2/runtimeaddons:updatestatus", update_addon_status, name="api_update_runtime_addon_status"),
        web.post("/api/v2/runtimeaddons/custom", upload_addon, name="api_upload_runtime_addon"),
        web.get("/api/v2/runtimerepos", list_repos, name="api_list_runtime_repos"),
        web.post("/api/v2/runtimerepos", create_repo, name="api_create_runtime_repo"),
        web.patch("/api/v2/runtimerepos/{runtimerepo_id}", update_repo, name="api_update_runtime_repo"),
        web.delete("/api/v2/runtimerepos/{runtime_repo_id}", delete_repo, name="api_delete_runtime_repo"),
        web.get("/api/v2/cpuprofiles", list_profiles, name="api_list_cpu_profiles"),
        web.post("/api/v2/cpuprofiles", create_profile, name="api_create_cpu_profile"),
        web.patch("/api/v2/cpuprofiles/{id}", update_profile, name="api_update_cpu_profile"),
        web.delete("/api/v2/cpuprofiles/{id}", delete_profile, name="api_delete_cpu_profile"),
    ]
