"""API v2: projects, collaborators and project files, as CML's swagger defines them."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from aiohttp import BodyPartReader, web

from cml_appliance.api.bodies import ANY, BOOL, INT, OBJECT, STR, STR_LIST, STR_MAP, check_body, open_multipart
from cml_appliance.api.common import json_body, list_query, page, query_flag
from cml_appliance.auth.permissions import Role
from cml_appliance.core.errors import InvalidArgument, NotFound, PermissionDenied
from cml_appliance.core.timefmt import rfc3339
from cml_appliance.projects import files, store
from cml_appliance.projects.store import Project
from cml_appliance.web.context import current_user
from cml_appliance.web.keys import AMPS, POOL, PROJECTS, SETTINGS


def project_json(p: Project) -> dict[str, Any]:
    data = {
        "id": p.public_id,
        "name": p.name,
        "owner": p.owner,
        "creator": p.creator,
        "description": p.description,
        "visibility": p.visibility,
        "default_engine_type": p.default_engine_type,
        "created_at": rfc3339(p.created_at),
        "updated_at": rfc3339(p.updated_at),
        "creation_status": p.creation_status,
        "permissions": p.role.flags(),
        "shared_memory_limit": p.shared_memory_limit,
        "environment": json.dumps(p.environment),
        "ephemeral_storage_request": p.ephemeral_storage_request,
        "ephemeral_storage_limit": p.ephemeral_storage_limit,
        "slug": p.slug,
    }
    if p.creation_message:
        data["creation_message"] = p.creation_message  # ours: why a git clone failed
    return data


async def list_projects(request: web.Request) -> web.Response:
    user = current_user(request)
    q = list_query(request, store.FILTER_KEYS, store.SORT_KEYS)
    items, more = await request.app[PROJECTS].list_projects(
        user, q, include_public=query_flag(request, "include_public_projects"),
        include_all=query_flag(request, "include_all_projects"),
    )
    return page(request, "projects", [project_json(p) for p in items], q, more)


CREATE_SPEC = {
    "name": STR, "description": STR, "visibility": STR, "parent_project": STR, "git_url": STR, "git_ref": STR,
    "template": STR, "organization_permission": STR, "default_project_engine_type": STR, "environment": STR_MAP,
    "shared_memory_limit": INT, "team_name": STR,
}


async def create_project(request: web.Request) -> web.Response:
    user = current_user(request)
    body = await json_body(request, CREATE_SPEC)
    project = await request.app[PROJECTS].create(user, body)
    return web.json_response(project_json(project))


CONFIGURE_SPEC = {"is_huggingface_space": BOOL, "is_community": BOOL, "execute_amp_steps": BOOL, "runtime_identifier": STR,
                  "runtime_addon_identifiers": STR_LIST, "run_import_tasks": BOOL}


async def create_amp(request: web.Request) -> web.Response:
    """CreateAmp: a project from an AMP's git repository, set up by its .project-metadata.yaml
    (projects/amps.py) in the background; the answer is the project, still creating."""
    user = current_user(request)
    if user.scope_project_id is not None:
        raise PermissionDenied("a workload's own key reaches only its project: it cannot create projects")
    body = await json_body(request, {"create_project_request": OBJECT, "configure_prototype_request": OBJECT})
    fields = {
        "create_project_request": check_body(body.get("create_project_request") or {}, CREATE_SPEC),
        "configure_prototype_request": check_body(body.get("configure_prototype_request") or {}, CONFIGURE_SPEC),
    }
    if fields["configure_prototype_request"].get("is_huggingface_space"):
        raise InvalidArgument("Hugging Face spaces are not AMPs this appliance can set up: give the AMP's git_url")
    project = await request.app[AMPS].create(user, fields)
    return web.json_response(project_json(project))


async def get_project(request: web.Request) -> web.Response:
    project = await request.app[PROJECTS].get(current_user(request), request.match_info["project_id"])
    return web.json_response(project_json(project))


# PATCH takes a Project; output-only fields a client echoes back are ignored.
UPDATE_SPEC = {
    "name": STR, "description": STR, "visibility": STR, "environment": ANY, "shared_memory_limit": INT,
    "ephemeral_storage_request": INT, "ephemeral_storage_limit": INT,
}
UPDATE_IGNORED = frozenset(
    {"id", "owner", "creator", "created_at", "updated_at", "creation_status", "permissions", "slug",
     "default_engine_type", "creation_message"}
)


async def update_project(request: web.Request) -> web.Response:
    body = await json_body(request, UPDATE_SPEC, UPDATE_IGNORED)
    if body.get("id") not in (None, request.match_info["project_id"]):
        raise InvalidArgument("id in the body must match the path")
    project = await request.app[PROJECTS].update(current_user(request), request.match_info["project_id"], body)
    return web.json_response(project_json(project))


async def delete_project(request: web.Request) -> web.Response:
    await request.app[PROJECTS].delete(current_user(request), request.match_info["project_id"])
    return web.json_response({})


# Collaborators -------------------------------------------------------------------------------

async def list_collaborators(request: web.Request) -> web.Response:
    q = list_query(request, store.COLLAB_FILTER_KEYS, store.COLLAB_SORT_KEYS)
    rows, more = await request.app[PROJECTS].list_collaborators(
        current_user(request), request.match_info["project_id"], q
    )
    items = [
        {"user": {"username": r["username"], "name": r["name"], "email": r["email"]}, "permission": r["permission"]}
        for r in rows
    ]
    return page(request, "collaborators", items, q, more)


async def put_collaborator(request: web.Request) -> web.Response:
    body = await json_body(request, {"project_id": STR, "username": STR, "permission": STR})
    project_id, username = request.match_info["project_id"], request.match_info["username"]
    if body.get("project_id", project_id) != project_id or body.get("username", username) != username:
        raise InvalidArgument("project_id and username in the body must match the path")
    await request.app[PROJECTS].put_collaborator(current_user(request), project_id, username, body.get("permission", ""))
    return web.json_response({})


async def delete_collaborator(request: web.Request) -> web.Response:
    await request.app[PROJECTS].delete_collaborator(
        current_user(request), request.match_info["project_id"], request.match_info["username"]
    )
    return web.json_response({})


# Files ---------------------------------------------------------------------------------------

async def _project_dir(request: web.Request, needed: Role) -> Path:
    service = request.app[PROJECTS]
    project = await service.get(current_user(request), request.match_info["project_id"], needed)
    return service.directory(project)


async def list_files(request: web.Request) -> web.Response:
    root = await _project_dir(request, Role.READ)
    return web.json_response({"files": files.list_dir(root, request.match_info.get("path", ""))})


async def _part_chunks(part: BodyPartReader) -> AsyncIterator[bytes]:
    while chunk := await part.read_chunk(256 * 1024):
        yield chunk


async def upload_files(request: web.Request) -> web.Response:
    """Multipart upload: each part's field name is its destination path (CML's convention).

    A part named "file" that carries a filename goes to that filename (what generic Swagger
    clients send). Existing files are replaced unless ?overwrite=false, which keeps CML's
    name(1).ext behaviour.
    """
    root = await _project_dir(request, Role.WRITE)
    if request.content_type != "multipart/form-data":
        raise InvalidArgument("upload with Content-Type multipart/form-data; the field name is the destination path")
    overwrite = request.query.get("overwrite", "true").lower() not in ("false", "0", "no")
    limit = request.app[SETTINGS].max_upload_mb * 1024 * 1024
    reader = await open_multipart(request)
    written = []
    async for part in reader:
        if not isinstance(part, BodyPartReader) or not part.name:
            continue
        destination = part.name
        if part.name == "file" and part.filename:
            destination = part.filename
        written.append(await files.write_upload(root, destination, _part_chunks(part), limit, overwrite=overwrite))
    if not written:
        raise InvalidArgument("the upload contained no files")
    return web.json_response({"files": written})


async def file_post(request: web.Request) -> web.StreamResponse:
    """POST .../files/{path}:download (the only POST under a file path)."""
    path = request.match_info["path"]
    if not path.endswith(":download"):
        raise NotFound("unknown file action: use POST .../files/{path}:download")
    return await _download(request, path[: -len(":download")])


async def _download(request: web.Request, path: str) -> web.StreamResponse:
    root = await _project_dir(request, Role.READ)
    target = files.resolve(root, path)
    if target.is_dir():
        raise InvalidArgument("only files can be downloaded, not directories")
    return web.FileResponse(
        target, headers={"Content-Disposition": f'attachment; filename="{target.name}"',
                         "Content-Type": "application/octet-stream"}
    )


async def update_file(request: web.Request) -> web.Response:
    root = await _project_dir(request, Role.WRITE)
    body = await json_body(request, {"path": STR, "is_dir": BOOL, "file_size": ANY})
    if not body.get("path"):
        raise InvalidArgument("give the new location as path")
    return web.json_response(files.move(root, request.match_info["path"], body["path"]))


async def delete_file(request: web.Request) -> web.Response:
    root = await _project_dir(request, Role.WRITE)
    files.delete(root, request.match_info["path"])
    return web.json_response({})


MAX_BATCH = 100


async def batch_list_projects(request: web.Request) -> web.Response:
    """BatchListProjects: the projects of these ids that the caller can see, in the order asked;
    an id the caller cannot see is left out, as ListProjects would."""
    user = current_user(request)
    ids = [i for raw in request.query.getall("project_ids", []) for i in raw.split(",") if i.strip()]
    if len(ids) > MAX_BATCH:
        raise InvalidArgument(f"at most {MAX_BATCH} project_ids at a time")
    found = []
    for public_id in dict.fromkeys(i.strip() for i in ids):
        project = await store.get(request.app[POOL], user, public_id)
        if project is not None and project.role > Role.NONE:
            found.append(project_json(project))
    return web.json_response({"projects": found})


async def list_machine_users(request: web.Request) -> web.Response:
    """ListAllRunAsMachineUserCollaborators: the machine users a project's workloads may run as.
    This appliance has none (workloads run as the user who starts them), so the list is empty,
    for those who may read the project."""
    await request.app[PROJECTS].get(current_user(request), request.match_info["project_id"])
    list_query(request, {"username": "username"}, {"username": "username"})  # its parameters, checked
    return web.json_response({"run_as_machine_user_collaborators": [], "next_page_token": ""})


def routes() -> list[web.RouteDef]:
    base = "/api/v2/projects/{project_id}"
    return [
        web.get(base + "/machineusers", list_machine_users, name="api_list_machine_users"),
        # Before GetProject, whose {project_id} would take "batch" for an id.
        web.get("/api/v2/projects/batch", batch_list_projects, name="api_batch_list_projects"),
        web.get("/api/v2/projects", list_projects, name="api_list_projects"),
        web.post("/api/v2/projects", create_project, name="api_create_project"),
        web.post("/api/v2/amps", create_amp, name="api_create_amp"),
        web.get(base, get_project, name="api_get_project"),
        web.patch(base, update_project, name="api_update_project"),
        web.delete(base, delete_project, name="api_delete_project"),
        web.get(base + "/collaborators", list_collaborators, name="api_list_collaborators"),
        web.put(base + "/collaborators/{username}", put_collaborator, name="api_put_collaborator"),
        web.delete(base + "/collaborators/{username}", delete_collaborator, name="api_delete_collaborator"),
        web.post(base + "/files", upload_files, name="api_upload_files"),
        web.get(base + "/files", list_files, name="api_list_files_root"),
        web.get(base + "/files/{path:.*}", list_files, name="api_list_files"),
        web.post(base + "/files/{path:.+}", file_post, name="api_download_file"),
        web.patch(base + "/files/{path:.+}", update_file, name="api_update_file"),
        web.delete(base + "/files/{path:.+}", delete_file, name="api_delete_file"),
    ]

