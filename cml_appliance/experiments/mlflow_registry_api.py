"""MLflow's model registry REST API (registered-models/…, model-versions/…), under each project's
MLflow URL next to the tracking API, so that `mlflow.register_model` and `models:/<name>/<version>`
work with the tracking URI a workload already has. Registered models are site-wide (a name is
unique on the site); the project in the URL is where a new version's run is looked up."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from cml_appliance.auth.users import User
from cml_appliance.experiments.mlflow_api import BASE, _page, _required, _string_list, _tags, mlflow_handler
from cml_appliance.experiments.registry import ModelVersion, RegisteredModel
from cml_appliance.experiments.service import max_results, page_token_in
from cml_appliance.web.keys import MODEL_REGISTRY


def _ms(value: Any) -> int:
    return int(value.timestamp() * 1000)


def version_json(version: ModelVersion) -> dict[str, Any]:
    out: dict[str, Any] = {
        "name": version.model_name, "version": str(version.version), "creation_timestamp": _ms(version.created_at),
        "last_updated_timestamp": _ms(version.updated_at), "user_id": version.user["username"], "current_stage": "None",
        "description": version.description, "source": version.source, "run_id": version.run_id, "status": version.status,
        "status_message": "", "tags": _tags(version.tags), "run_link": "", "aliases": version.aliases,
    }
    if version.logged_model_id:
        out["model_id"] = version.logged_model_id
    return out


async def model_json(request: web.Request, model: RegisteredModel) -> dict[str, Any]:
    registry = request.app[MODEL_REGISTRY]
    latest = await registry.latest_versions(model)
    aliases = [{"alias": alias, "version": str(number)} for number, names in sorted((await registry.aliases(model.id)).items())
               for alias in names]
    return {
        "name": model.name, "creation_timestamp": _ms(model.created_at), "last_updated_timestamp": _ms(model.updated_at),
        "user_id": model.owner["username"], "description": model.description,
        "latest_versions": [version_json(v) for v in latest], "tags": _tags(model.tags), "aliases": aliases,
    }


async def _model(request: web.Request, user: User, a: dict[str, Any], write: bool = False) -> RegisteredModel:
    return await request.app[MODEL_REGISTRY].model(user, _required(a, "name"), write=write)


# Registered models -------------------------------------------------------------------------

@mlflow_handler
async def create_registered_model(request: web.Request, user: User, a: dict[str, Any]) -> web.Response:
    model = await request.app[MODEL_REGISTRY].create_model(user, a.get("name"), description=a.get("description") or "",
                                                           tags=a.get("tags"))
    return web.json_response({"registered_model": await model_json(request, model)})


@mlflow_handler
async def get_registered_model(request: web.Request, user: User, a: dict[str, Any]) -> web.Response:
    return web.json_response({"registered_model": await model_json(request, await _model(request, user, a))})


@mlflow_handler
async def search_registered_models(request: web.Request, user: User, a: dict[str, Any]) -> web.Response:
    offset = page_token_in(a.get("page_token"))
    found, more = await request.app[MODEL_REGISTRY].search_models(
        user, filter_text=str(a.get("filter") or ""), order_by=_string_list(a, "order_by"),
        limit=max_results(a.get("max_results"), 100, 1000), offset=offset)
    return _page("registered_models", [await model_json(request, m) for m in found], offset, more)


@mlflow_handler
async def update_registered_model(request: web.Request, user: User, a: dict[str, Any]) -> web.Response:
    registry = request.app[MODEL_REGISTRY]
    model = await registry.update_model(user, await _model(request, user, a), description=a.get("description"))
    return web.json_response({"registered_model": await model_json(request, model)})


@mlflow_handler
async def rename_registered_model(request: web.Request, user: User, a: dict[str, Any]) -> web.Response:
    registry = request.app[MODEL_REGISTRY]
    model = await registry.update_model(user, await _model(request, user, a), new_name=_required(a, "new_name"))
    return web.json_response({"registered_model": await model_json(request, model)})


@mlflow_handler
async def delete_registered_model(request: web.Request, user: User, a: dict[str, Any]) -> web.Response:
    await request.app[MODEL_REGISTRY].delete_model(user, await _model(request, user, a))
    return web.json_response({})


@mlflow_handler
async def set_registered_model_tag(request: web.Request, user: User, a: dict[str, Any]) -> web.Response:
    await request.app[MODEL_REGISTRY].update_model(user, await _model(request, user, a),
                                                   tags=[{"key": _required(a, "key"), "value": a.get("value", "")}])
    return web.json_response({})


@mlflow_handler
async def delete_registered_model_tag(request: web.Request, user: User, a: dict[str, Any]) -> web.Response:
    await request.app[MODEL_REGISTRY].update_model(user, await _model(request, user, a), delete_tag=_required(a, "key"))
    return web.json_response({})


@mlflow_handler
async def get_latest_versions(request: web.Request, user: User, a: dict[str, Any]) -> web.Response:
    model = await _model(request, user, a)
    latest = await request.app[MODEL_REGISTRY].latest_versions(model)
    return web.json_response({"model_versions": [version_json(v) for v in latest]})


# Model versions ----------------------------------------------------------------------------

async def _version(request: web.Request, user: User, a: dict[str, Any], write: bool = False) -> tuple[RegisteredModel, ModelVersion]:
    model = await _model(request, user, a, write)
    return model, await request.app[MODEL_REGISTRY].version(user, model, _required(a, "version"))


@mlflow_handler
async def create_model_version(request: web.Request, user: User, a: dict[str, Any]) -> web.Response:
    registry = request.app[MODEL_REGISTRY]
    model = await _model(request, user, a, write=True)
    version = await registry.create_version(
        user, request.match_info["project_id"], model, run_id=str(a.get("run_id") or ""), source=str(a.get("source") or ""),
        model_id=str(a.get("model_id") or ""), description=a.get("description") or "", tags=a.get("tags"))
    return web.json_response({"model_version": version_json(version)})


@mlflow_handler
async def get_model_version(request: web.Request, user: User, a: dict[str, Any]) -> web.Response:
    _, version = await _version(request, user, a)
    return web.json_response({"model_version": version_json(version)})


@mlflow_handler
async def search_model_versions(request: web.Request, user: User, a: dict[str, Any]) -> web.Response:
    offset = page_token_in(a.get("page_token"))
    found, more = await request.app[MODEL_REGISTRY].versions(
        user, filter_text=str(a.get("filter") or ""), order_by=_string_list(a, "order_by"),
        limit=max_results(a.get("max_results"), 200_000, 200_000), offset=offset)
    return _page("model_versions", [version_json(v) for v in found], offset, more)


@mlflow_handler
async def update_model_version(request: web.Request, user: User, a: dict[str, Any]) -> web.Response:
    model, version = await _version(request, user, a)
    updated = await request.app[MODEL_REGISTRY].update_version(user, model, version, description=a.get("description"))
    return web.json_response({"model_version": version_json(updated)})


@mlflow_handler
async def delete_model_version(request: web.Request, user: User, a: dict[str, Any]) -> web.Response:
    model, version = await _version(request, user, a)
    await request.app[MODEL_REGISTRY].delete_version(user, model, version)
    return web.json_response({})


@mlflow_handler
async def set_model_version_tag(request: web.Request, user: User, a: dict[str, Any]) -> web.Response:
    model, version = await _version(request, user, a)
    await request.app[MODEL_REGISTRY].update_version(user, model, version,
                                                     tags=[{"key": _required(a, "key"), "value": a.get("value", "")}])
    return web.json_response({})


@mlflow_handler
async def delete_model_version_tag(request: web.Request, user: User, a: dict[str, Any]) -> web.Response:
    model, version = await _version(request, user, a)
    await request.app[MODEL_REGISTRY].update_version(user, model, version, delete_tag=_required(a, "key"))
    return web.json_response({})


@mlflow_handler
async def get_download_uri(request: web.Request, user: User, a: dict[str, Any]) -> web.Response:
    _, version = await _version(request, user, a)
    return web.json_response({"artifact_uri": request.app[MODEL_REGISTRY].download_uri(version)})


# Aliases -----------------------------------------------------------------------------------

@mlflow_handler
async def set_alias(request: web.Request, user: User, a: dict[str, Any]) -> web.Response:
    model = await _model(request, user, a, write=True)
    await request.app[MODEL_REGISTRY].set_alias(user, model, _required(a, "alias"), _required(a, "version"))
    return web.json_response({})


@mlflow_handler
async def delete_alias(request: web.Request, user: User, a: dict[str, Any]) -> web.Response:
    model = await _model(request, user, a, write=True)
    await request.app[MODEL_REGISTRY].delete_alias(user, model, _required(a, "alias"))
    return web.json_response({})


@mlflow_handler
async def get_by_alias(request: web.Request, user: User, a: dict[str, Any]) -> web.Response:
    model = await _model(request, user, a)
    version = await request.app[MODEL_REGISTRY].version_by_alias(user, model, _required(a, "alias"))
    return web.json_response({"model_version": version_json(version)})


def routes() -> list[web.RouteDef]:
    table: list[tuple[str, str, Any]] = [
        ("POST", "/registered-models/create", create_registered_model),
        ("GET", "/registered-models/get", get_registered_model),
        ("GET", "/registered-models/search", search_registered_models),
        ("POST", "/registered-models/search", search_registered_models),
        ("PATCH", "/registered-models/update", update_registered_model),
        ("POST", "/registered-models/rename", rename_registered_model),
        ("DELETE", "/registered-models/delete", delete_registered_model),
        ("POST", "/registered-models/set-tag", set_registered_model_tag),
        ("DELETE", "/registered-models/delete-tag", delete_registered_model_tag),
        ("POST", "/registered-models/get-latest-versions", get_latest_versions),
        ("GET", "/registered-models/get-latest-versions", get_latest_versions),
        ("POST", "/model-versions/create", create_model_version),
        ("GET", "/model-versions/get", get_model_version),
        ("GET", "/model-versions/search", search_model_versions),
        ("POST", "/model-versions/search", search_model_versions),
        ("PATCH", "/model-versions/update", update_model_version),
        ("DELETE", "/model-versions/delete", delete_model_version),
        ("POST", "/model-versions/set-tag", set_model_version_tag),
        ("DELETE", "/model-versions/delete-tag", delete_model_version_tag),
        ("GET", "/model-versions/get-download-uri", get_download_uri),
        ("POST", "/registered-models/alias", set_alias),
        ("DELETE", "/registered-models/alias", delete_alias),
        ("GET", "/registered-models/alias", get_by_alias),
    ]
    return [web.route(method, BASE + path, handler,
                      name=f"mlflow_{method.lower()}_{path.strip('/').replace('/', '_').replace('-', '_')}")
            for method, path, handler in table]
