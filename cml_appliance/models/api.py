"""API v2: models, builds and deployments as CML defines them, and the model endpoint
`POST /model` ({"accessKey", "request"}) that answers {"success", "response", "ReplicaID"}."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from cml_appliance.api.bodies import (
    ANY,
    BOOL,
    FLOAT,
    INT,
    OBJECT,
    STR,
    STR_LIST,
    STR_MAP,
    read_json_object,
)
from cml_appliance.api.common import json_body, list_query, page
from cml_appliance.core.errors import AppError, InvalidArgument
from cml_appliance.core.timefmt import rfc3339
from cml_appliance.models import serving
from cml_appliance.models.service import (
    BUILD_FILTER_KEYS,
    BUILD_SORT_KEYS,
    MODEL_FILTER_KEYS,
    MODEL_SORT_KEYS,
    Build,
    Deployment,
    Model,
)
from cml_appliance.models.serving import failure
from cml_appliance.web.context import current_user
from cml_appliance.web.keys import MODELS, POOL, SETTINGS, WORKLOADS
from cml_appliance.workloads.streams import log_chunk_response, polled_event_stream


def _dropped_times(data: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in data.items() if not (k.endswith("_at") and v == "")}


async def _people(request: web.Request, ids: set[int]) -> dict[int, dict[str, str]]:
    """ShortUser objects (username, name, email) by user id, in one query."""
    rows = await request.app[POOL].fetch("SELECT id, username, name, email FROM users WHERE id = ANY($1::bigint[])", list(ids))
    return {r["id"]: {"username": r["username"], "name": r["name"], "email": r["email"]} for r in rows}


async def _models_json(request: web.Request, pairs: list[tuple[str, Model]]) -> list[dict[str, Any]]:
    people = await _people(request, {m.creator_id for _, m in pairs})
    projects = {r["public_id"]: r for r in await request.app[POOL].fetch(
        "SELECT public_id, name, slug FROM projects WHERE public_id = ANY($1::text[])", list({pid for pid, _ in pairs}))}
    return [model_json(m, pid, projects[pid]["name"], projects[pid]["slug"], people.get(m.creator_id, {})) for pid, m in pairs]


async def _model_response(request: web.Request, project_id: str, model: Model) -> web.Response:
    return web.json_response((await _models_json(request, [(project_id, model)]))[0])


def model_json(model: Model, project_id: str, project_name: str, project_slug: str, creator: dict[str, str]) -> dict[str, Any]:
    return _dropped_times({
        "id": model.public_id, "name": model.name, "description": model.description, "creator": creator,
        "access_key": model.access_key, "deletion_status": "", "created_at": rfc3339(model.created_at),
        "updated_at": rfc3339(model.updated_at), "crn": "", "auth_enabled": model.auth_enabled,
        "project": {"public_identifier": project_id, "name": project_name, "slug": project_slug,
                    "default_project_engine": "ml_runtime"},
        "registered_model_id": "", "visibility": "private",
    })


def build_json(build: Build, model_id: str, creator: dict[str, str]) -> dict[str, Any]:
    return _dropped_times({
        "id": build.public_id, "model_id": model_id, "creator": creator, "comment": build.comment, "file_path": build.file_path,
        "function_name": build.function_name, "engine_image": "", "kernel": "", "runtime_identifier": build.runtime_identifier,
        "runtime_addon_identifiers": [], "created_at": rfc3339(build.created_at), "updated_at": rfc3339(build.updated_at),
        "built_at": rfc3339(build.built_at), "status": build.status, "deletion_status": "", "crn": "",
        "registered_model_version_id": build.registered_model_version_id, "model_root_dir": build.model_root_dir, "build_script_path": build.build_script_path,
        # Ours, beside CML's fields: the image, why a build failed, and its snapshot commit.
        "built_image": build.built_image, "failure_reason": build.failure, "snapshot_commit": build.snapshot_commit,
    })


def deployment_json(deployment: Deployment, status: str, project_id: str, model_id: str, build_id: str,
                    deployer: dict[str, str]) -> dict[str, Any]:
    return _dropped_times({
        "id": deployment.public_id, "project_id": project_id, "model_id": model_id, "build_id": build_id, "deployer": deployer,
        "cpu": deployment.cpu, "memory": deployment.memory, "nvidia_gpu": 0, "environment": json.dumps(deployment.environment),
        "created_at": rfc3339(deployment.created_at), "updated_at": rfc3339(deployment.updated_at),
        "stopped_at": rfc3339(deployment.stopped_at), "crn": "", "status": status, "replicas": deployment.replicas,
    })


BUILD_FIELDS = {"comment": STR, "file_path": STR, "function_name": STR, "kernel": STR, "runtime_identifier": STR,
                "runtime_addon_identifiers": STR_LIST, "registered_model_version_id": STR, "model_root_dir": STR,
                "build_script_path": STR}
DEPLOY_FIELDS = {"cpu": FLOAT, "memory": FLOAT, "nvidia_gpus": INT, "environment": STR_MAP, "replicas": INT,
                 "deployment_secrets": STR_MAP, "resource_profile_id": INT}
CREATE_MODEL = {"project_id": STR, "name": STR, "description": STR, "disable_authentication": BOOL,
                "registered_model_id": STR, "run_as": INT, "visibility": STR, "auto_build_config": OBJECT,
                "auto_deployment_config": OBJECT, "auto_build_model": BOOL, "auto_deploy_model": BOOL,
                "accelerator_label_id": ANY, "resource_group_id": INT, "resource_profile_id": INT}


async def list_models(request: web.Request) -> web.Response:
    q = list_query(request, MODEL_FILTER_KEYS, MODEL_SORT_KEYS)
    pairs, more = await request.app[MODELS].list_models(current_user(request), request.match_info.get("project_id"), q)
    return page(request, "models", await _models_json(request, pairs), q, more)


def _check_model_fields(body: dict[str, Any]) -> None:
    """Model settings this appliance has no use for are refused when set, not dropped unseen."""
    if body.get("visibility", "private") not in ("", "private"):
        raise InvalidArgument("models are private to their project here: visibility must be \"private\"")
    if body.get("registered_model_id"):
        raise InvalidArgument("this appliance has no model registry: registered_model_id must be empty")
    for key in ("default_resources", "default_replication_policy"):
        if body.get(key):
            raise InvalidArgument(f"{key} is not supported: set cpu, memory and replicas on each deployment")


async def create_model(request: web.Request) -> web.Response:
    body = await json_body(request, CREATE_MODEL)
    from cml_appliance.api.bodies import check_body

    if "auto_build_config" in body:
        body["auto_build_config"] = check_body(body["auto_build_config"], BUILD_FIELDS)
    if "auto_deployment_config" in body:
        body["auto_deployment_config"] = check_body(body["auto_deployment_config"], DEPLOY_FIELDS)
    _check_model_fields(body)
    model, _, _ = await request.app[MODELS].create_model(current_user(request), request.match_info["project_id"], body)
    return await _model_response(request, request.match_info["project_id"], model)


async def get_model(request: web.Request) -> web.Response:
    project, model = await request.app[MODELS].get_model(current_user(request), request.match_info["project_id"], request.match_info["model_id"])
    return await _model_response(request, project.public_id, model)


# PATCH takes UpdateSingleModel; a Model sent back as it was fetched is taken too, its
# output-only fields dropped (as jobs and applications do).
MODEL_OUTPUT_FIELDS = frozenset({"creator", "access_key", "deletion_status", "created_at", "updated_at", "crn",
                                 "auth_enabled", "project", "registered_model_id"})


async def update_model(request: web.Request) -> web.Response:
    body = await json_body(request, {"id": STR, "name": STR, "description": STR, "visibility": STR, "default_resources": ANY,
                                     "default_replication_policy": ANY, "run_as": INT, "accelerator_label_id": ANY,
                                     "resource_group_id": INT, "resource_profile_id": INT}, MODEL_OUTPUT_FIELDS)
    if body.get("id", request.match_info["model_id"]) != request.match_info["model_id"]:
        raise InvalidArgument("id in the body must match the path")
    _check_model_fields(body)
    model = await request.app[MODELS].update_model(current_user(request), request.match_info["project_id"], request.match_info["model_id"], body)
    return await _model_response(request, request.match_info["project_id"], model)


async def delete_model(request: web.Request) -> web.Response:
    await request.app[MODELS].delete_model(current_user(request), request.match_info["project_id"], request.match_info["model_id"])
    return web.json_response({})


async def regenerate_key(request: web.Request) -> web.Response:
    """Ours: a new access key for the model; the old one stops working at once."""
    model = await request.app[MODELS].regenerate_key(current_user(request), request.match_info["project_id"], request.match_info["model_id"])
    return await _model_response(request, request.match_info["project_id"], model)


async def list_builds(request: web.Request) -> web.Response:
    q = list_query(request, BUILD_FILTER_KEYS, BUILD_SORT_KEYS)
    model, builds, more = await request.app[MODELS].list_builds(current_user(request), request.match_info["project_id"],
                                                                request.match_info["model_id"], q)
    people = await _people(request, {b.creator_id for b in builds})
    return page(request, "model_builds", [build_json(b, model.public_id, people.get(b.creator_id, {})) for b in builds], q, more)


async def _build_response(request: web.Request, build: Build, model_id: str) -> web.Response:
    people = await _people(request, {build.creator_id})
    return web.json_response(build_json(build, model_id, people.get(build.creator_id, {})))


async def delete_build(request: web.Request) -> web.Response:
    m = request.match_info
    await request.app[MODELS].delete_build(current_user(request), m["project_id"], m["model_id"], m["build_id"])
    return web.json_response({})


async def create_build(request: web.Request) -> web.Response:
    body = await json_body(request, BUILD_FIELDS | {"project_id": STR, "model_id": STR, "auto_deploy_model": BOOL,
                                                    "auto_deployment_config": OBJECT, "accelerator_label_id": ANY,
                                                    "resource_group_id": INT, "resource_profile_id": INT})
    build = await request.app[MODELS].create_build(current_user(request), request.match_info["project_id"], request.match_info["model_id"], body)
    return await _build_response(request, build, request.match_info["model_id"])


async def cancel_build(request: web.Request) -> web.Response:
    """Ours: stop a queued or running build; it ends `build failed` with the reason `cancelled`."""
    m = request.match_info
    build = await request.app[MODELS].cancel_build(current_user(request), m["project_id"], m["model_id"], m["build_id"])
    return await _build_response(request, build, m["model_id"])


async def build_logs(request: web.Request) -> web.Response:
    """Ours: the build's log (progress lines) from a byte offset, as for workloads."""
    m = request.match_info
    _, _, build = await request.app[MODELS].get_build(current_user(request), m["project_id"], m["model_id"], m["build_id"])
    return log_chunk_response(request, request.app[WORKLOADS].logs, build.public_id, build.status, build.active)


async def build_events(request: web.Request) -> web.StreamResponse:
    """Ours: server-sent events of the build's status and log lines until it ends."""
    m = request.match_info
    user = current_user(request)
    models = request.app[MODELS]
    _, model, build = await models.get_build(user, m["project_id"], m["model_id"], m["build_id"])
    people = await _people(request, {build.creator_id})

    async def current() -> tuple[dict[str, Any], bool]:
        _, _, now = await models.get_build(user, m["project_id"], m["model_id"], m["build_id"])
        return build_json(now, model.public_id, people.get(now.creator_id, {})), not now.active

    return await polled_event_stream(request, request.app[WORKLOADS].logs, build.public_id, current)


async def get_build(request: web.Request) -> web.Response:
    _, model, build = await request.app[MODELS].get_build(current_user(request), request.match_info["project_id"],
                                                          request.match_info["model_id"], request.match_info["build_id"])
    return await _build_response(request, build, model.public_id)


async def _deployment_response(request: web.Request, deployment: Deployment) -> web.Response:
    status = await request.app[MODELS].status_of(deployment)
    m = request.match_info
    people = await _people(request, {deployment.deployer_id})
    return web.json_response(deployment_json(deployment, status, m["project_id"], m["model_id"], m["build_id"],
                                             people.get(deployment.deployer_id, {})))


async def list_deployments(request: web.Request) -> web.Response:
    q = list_query(request, {}, {})
    m = request.match_info
    _, deployments = await request.app[MODELS].list_deployments(current_user(request), m["project_id"], m["model_id"], m["build_id"])
    items = []
    shown = deployments[q.offset: q.offset + q.page_size]
    people = await _people(request, {d.deployer_id for d in shown})
    for d in shown:
        items.append(deployment_json(d, await request.app[MODELS].status_of(d), m["project_id"], m["model_id"], m["build_id"],
                                     people.get(d.deployer_id, {})))
    return page(request, "model_deployments", items, q, len(deployments) > q.offset + q.page_size)


async def create_deployment(request: web.Request) -> web.Response:
    body = await json_body(request, DEPLOY_FIELDS | {"project_id": STR, "model_id": STR, "build_id": STR,
                                                     "accelerator_label_id": ANY, "resource_group_id": INT})
    m = request.match_info
    for key in ("project_id", "model_id", "build_id", "accelerator_label_id", "resource_group_id", "deployment_secrets"):
        body.pop(key, None)
    deployment = await request.app[MODELS].create_deployment(current_user(request), m["project_id"], m["model_id"], m["build_id"], body)
    return await _deployment_response(request, deployment)


async def get_deployment(request: web.Request) -> web.Response:
    m = request.match_info
    *_, deployment = await request.app[MODELS].get_deployment(current_user(request), m["project_id"], m["model_id"], m["build_id"], m["deployment_id"])
    return await _deployment_response(request, deployment)


async def stop_deployment(request: web.Request) -> web.Response:
    m = request.match_info
    deployment = await request.app[MODELS].stop_deployment(current_user(request), m["project_id"], m["model_id"], m["build_id"], m["deployment_id"])
    return await _deployment_response(request, deployment)


async def restart_deployment(request: web.Request) -> web.Response:
    m = request.match_info
    deployment = await request.app[MODELS].restart_deployment(current_user(request), m["project_id"], m["model_id"], m["build_id"], m["deployment_id"])
    return await _deployment_response(request, deployment)


async def call_model(request: web.Request) -> web.Response:
    """CML's model endpoint: {"accessKey": ..., "request": {...}} -> {"success", "response", "ReplicaID"}."""
    try:
        body = await read_json_object(request, request.app[SETTINGS].model_max_request_mb * 1024 * 1024)
    except AppError as exc:  # the endpoint answers in its own shape, not the API's
        return failure(exc.status, exc.message)
    access_key = body.get("accessKey") or request.query.get("accessKey", "")
    if not isinstance(access_key, str) or not access_key:
        return failure(400, "accessKey is missing")
    if "request" not in body:
        return failure(400, 'the body needs a "request" to pass to the model function')
    service = request.app[MODELS]
    model = await service.model_by_key(access_key)
    # An unknown key is answered as a model that needs authentication and is not yours: a caller
    # cannot tell the two apart, so cannot probe which keys exist.
    if model is None or model.auth_enabled:
        scheme, _, secret = request.headers.get("Authorization", "").partition(" ")
        refused = 401
        if scheme.lower() == "bearer" and secret.strip():
            refused = await service.may_call(model, secret.strip()) if model is not None else await service.caller_known(secret.strip())
        if refused == 401:
            return failure(401, "this model needs 'Authorization: Bearer <API key>' of a project collaborator")
        if refused == 403 or model is None:
            return failure(403, "no model you may call has that access key")
    return await serving.call(request, model, body["request"])


def routes() -> list[web.RouteDef]:
    base = "/api/v2/projects/{project_id}/models"
    model = base + "/{model_id:[a-z0-9-]+}"
    build = model + "/builds/{build_id:[a-z0-9-]+}"
    deployment = build + "/deployments/{deployment_id:[a-z0-9-]+}"
    return [
        web.get("/api/v2/models", list_models, name="api_list_all_models"),
        web.get(base, list_models, name="api_list_models"),
        web.post(base, create_model, name="api_create_model"),
        web.get(model, get_model, name="api_get_model"),
        web.patch(model, update_model, name="api_update_model"),
        web.delete(model, delete_model, name="api_delete_model"),
        web.post(model + ":regenerateAccessKey", regenerate_key, name="api_regenerate_model_key"),
        web.get(model + "/builds", list_builds, name="api_list_model_builds"),
        web.post(model + "/builds", create_build, name="api_create_model_build"),
        web.get(build, get_build, name="api_get_model_build"),
        web.delete(build, delete_build, name="api_delete_model_build"),
        web.post(build + ":cancel", cancel_build, name="api_cancel_model_build"),
        web.get(build + "/logs", build_logs, name="api_model_build_logs"),
        web.get(build + "/events", build_events, name="api_model_build_events"),
        web.get(build + "/deployments", list_deployments, name="api_list_model_deployments"),
        web.post(build + "/deployments", create_deployment, name="api_create_model_deployment"),
        web.get(deployment, get_deployment, name="api_get_model_deployment"),
        web.post(deployment + ":stop", stop_deployment, name="api_stop_model_deployment"),
        web.post(deployment + ":restart", restart_deployment, name="api_restart_model_deployment"),
        web.post("/model", call_model, name="model_endpoint"),
        # CDSW's older path, which the in-session `cdsw.call_model` still calls.
        web.post("/api/altus-ds-1/models/call-model", call_model, name="model_endpoint_altus"),
    ]
