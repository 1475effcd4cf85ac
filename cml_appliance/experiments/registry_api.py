"""CML API v2's 8 registry operations (/api/v2/registry/models…), in CML's shapes, over the same
registry as MLflow's registry API (registry.py).

CreateRegisteredModel registers a run's model (run_id and model_path, as CML's UI does) as a new
model, or as the next version of the model of that name when it exists already.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from cml_appliance.api.bodies import ANY, STR
from cml_appliance.api.common import json_body
from cml_appliance.core.errors import InvalidArgument, NotFound
from cml_appliance.core.timefmt import rfc3339
from cml_appliance.experiments.api import ms_time, paging, same_as_path, search_filter, sort_order, tag_list
from cml_appliance.experiments.registry import ModelVersion, RegisteredModel
from cml_appliance.experiments.service import number_out, page_token_out
from cml_appliance.web.context import current_user
from cml_appliance.web.keys import MODEL_REGISTRY, POOL, SETTINGS

_MODEL_FILTERS = {"name": "attributes.name", "description": "attributes.description",
                  "creator.username": "attributes.user_id", "visibility": "attributes.visibility"}
_MODEL_SORTS = {"name": "attributes.name", "created_at": "attributes.creation_timestamp",
                "updated_at": "attributes.last_updated_timestamp", "description": "attributes.description"}
_VERSION_FILTERS = {"status": "attributes.status", "description": "attributes.description",
                    "notes": "attributes.description", "creator.username": "attributes.user_id"}
_VERSION_SORTS = {"created_at": "attributes.creation_timestamp", "updated_at": "attributes.last_updated_timestamp",
                  "number": "attributes.version", "version": "attributes.version"}


def _details(model: RegisteredModel) -> dict[str, Any]:
    return {
        "model_id": model.public_id, "name": model.name, "description": model.description, "owner": model.owner,
        "permission": model.permission, "visibility": model.visibility, "created_at": rfc3339(model.created_at),
        "updated_at": rfc3339(model.updated_at), "count": model.version_count,
    }


async def _run_metadata(request: web.Request, version: ModelVersion) -> dict[str, Any]:
    """What the version's run logged, while the run exists (the version itself outlives it)."""
    row = await request.app[POOL].fetchrow("SELECT params, tags, latest_metrics FROM experiment_runs WHERE run_id = $1",
                                           version.run_id)
    out: dict[str, Any] = {"experiment_id": version.experiment_id, "run_id": version.run_id,
                           "metrics": [], "params": [], "tags": []}
    if row is not None:
        out["metrics"] = [{"key": k, "value": number_out(float(v["value"])), "step": str(v["step"]),
                           "timestamp": ms_time(int(v["timestamp"]))} for k, v in sorted(row["latest_metrics"].items())]
        out["params"] = tag_list(row["params"])
        out["tags"] = tag_list({k: v for k, v in row["tags"].items() if not k.startswith("mlflow.")})
    return out


async def version_json(request: web.Request, model: RegisteredModel, version: ModelVersion) -> dict[str, Any]:
    return {
        "model_id": model.public_id, "model_version_id": version.public_id, "version_name": f"v{version.version}",
        "number": version.version, "notes": version.description, "user": version.user,
        "created_at": rfc3339(version.created_at), "updated_at": rfc3339(version.updated_at), "status": version.status,
        "model_version_metadata": {
            "mlops_type": "MLFLOW", "tags": tag_list(version.tags), "workspace_url": request.app[SETTINGS].base_url,
            "project_id": version.project_public_id, "owner": model.owner,
            "mlflow_metadata": await _run_metadata(request, version),
        },
        "tags": tag_list(version.tags), "error_message": "",
    }


async def model_json(request: web.Request, model: RegisteredModel, versions: list[ModelVersion], next_token: str = "") -> dict[str, Any]:
    return _details(model) | {"model_versions": [await version_json(request, model, v) for v in versions],
                              "next_page_token": next_token}


async def list_models(request: web.Request) -> web.Response:
    size, offset = paging(request)
    found, more = await request.app[MODEL_REGISTRY].search_models(
        current_user(request), filter_text=search_filter(request.query.get("search_filter", ""), _MODEL_FILTERS, False),
        order_by=sort_order(request.query.get("sort", ""), _MODEL_SORTS, False), limit=size, offset=offset)
    return web.json_response({"models": [_details(m) for m in found],
                              "next_page_token": page_token_out(offset + len(found)) if more else ""})


async def create_model(request: web.Request) -> web.Response:
    body = await json_body(request, {"project_id": STR, "experiment_id": STR, "run_id": STR, "model_path": STR,
                                     "model_name": STR, "tags": ANY, "description": STR, "notes": STR, "visibility": STR})
    user, registry = current_user(request), request.app[MODEL_REGISTRY]
    for field in ("project_id", "run_id", "model_name"):
        if not body.get(field):
            raise InvalidArgument(f"{field} is required: a registered model is made from a run's logged model")
    run = await registry.tracking.run(user, body["project_id"], body["run_id"])
    if body.get("experiment_id") and body["experiment_id"] != run.experiment_public_id:
        raise InvalidArgument(f"run {run.run_id} is not in experiment {body['experiment_id']}")
    try:
        model = await registry.model(user, body["model_name"], write=True)
    except NotFound:
        model = await registry.create_model(user, body["model_name"], description=body.get("description") or "",
                                            visibility=body.get("visibility") or "PRIVATE")
    version = await registry.create_version(user, body["project_id"], model, run_id=run.run_id,
                                            model_path=body.get("model_path") or "model",
                                            description=body.get("notes") or "", tags=body.get("tags"))
    model = await registry.model(user, model.public_id, by="id")
    return web.json_response(await model_json(request, model, [version]))


async def update_model(request: web.Request) -> web.Response:
    body = await json_body(request, {"model_id": STR, "description": STR, "visibility": STR, "user_id": STR})
    user, registry = current_user(request), request.app[MODEL_REGISTRY]
    if not body.get("model_id"):
        raise InvalidArgument("model_id is required")
    model = await registry.model(user, body["model_id"], by="id")
    model = await registry.update_model(user, model, description=body.get("description"), visibility=body.get("visibility"),
                                        owner_username=body.get("user_id") or None)
    versions, _ = await registry.versions(user, model=model, limit=100)
    return web.json_response(await model_json(request, model, versions))


async def get_model(request: web.Request) -> web.Response:
    user, registry = current_user(request), request.app[MODEL_REGISTRY]
    model = await registry.model(user, request.match_info["model_id"], by="id")
    size, offset = paging(request)
    versions, more = await registry.versions(
        user, model=model, filter_text=search_filter(request.query.get("search_filter", ""), _VERSION_FILTERS, False),
        order_by=sort_order(request.query.get("sort", ""), _VERSION_SORTS, False), limit=size, offset=offset)
    return web.json_response(await model_json(request, model, versions,
                                              page_token_out(offset + len(versions)) if more else ""))


async def delete_model(request: web.Request) -> web.Response:
    user, registry = current_user(request), request.app[MODEL_REGISTRY]
    await registry.delete_model(user, await registry.model(user, request.match_info["model_id"], by="id"))
    return web.json_response({})


async def _version(request: web.Request, version_id: str) -> tuple[RegisteredModel, ModelVersion]:
    model, version = await request.app[MODEL_REGISTRY].version_by_id(current_user(request), version_id)
    if model.public_id != request.match_info["model_id"]:
        raise NotFound(f"registered model version {version_id!r} not found in model {request.match_info['model_id']!r}")
    return model, version


async def update_version(request: web.Request) -> web.Response:
    # Who may change the model, before what they sent is looked at.
    await request.app[MODEL_REGISTRY].model(current_user(request), request.match_info["model_id"], by="id", write=True)
    body = await json_body(request, {"model_id": STR, "model_version_id": STR, "notes": STR, "tags": ANY})
    same_as_path(body, "model_id", request.match_info["model_id"])
    if not body.get("model_version_id"):
        raise InvalidArgument("model_version_id is required")
    model, version = await _version(request, body["model_version_id"])
    updated = await request.app[MODEL_REGISTRY].update_version(current_user(request), model, version,
                                                               description=body.get("notes"), tags=body.get("tags"))
    return web.json_response(await version_json(request, model, updated))


async def get_version(request: web.Request) -> web.Response:
    model, version = await _version(request, request.match_info["version_id"])
    return web.json_response(await version_json(request, model, version))


async def delete_version(request: web.Request) -> web.Response:
    model, version = await _version(request, request.match_info["version_id"])
    await request.app[MODEL_REGISTRY].delete_version(current_user(request), model, version)
    return web.json_response({})


def routes() -> list[web.RouteDef]:
    base = "/api/v2/registry/models"
    one = base + "/{model_id}"
    return [
        web.get(base, list_models, name="api_list_registered_models"),
        web.post(base, create_model, name="api_create_registered_model"),
        web.patch(base, update_model, name="api_update_registered_model"),
        web.get(one, get_model, name="api_get_registered_model"),
        web.delete(one, delete_model, name="api_delete_registered_model"),
        web.patch(one, update_version, name="api_update_registered_model_version"),
        web.get(one + "/versions/{version_id}", get_version, name="api_get_registered_model_version"),
        web.delete(one + "/versions/{version_id}", delete_version, name="api_delete_registered_model_version"),
    ]
