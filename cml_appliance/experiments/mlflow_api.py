"""MLflow's tracking REST API, one per project, at <public url>/mlflow/<project id>.

A workload gets MLFLOW_TRACKING_URI=<that URL> and MLFLOW_TRACKING_TOKEN=<its own key>, and the
unmodified `mlflow` client appends its /api/2.0/mlflow/… paths. Callers authenticate with an API v2
key, as `Authorization: Bearer` (what the client sends from MLFLOW_TRACKING_TOKEN) or as HTTP Basic
(user name and key, from MLFLOW_TRACKING_USERNAME/PASSWORD); never with the UI's cookie.

Errors take MLflow's shape and status codes ({"error_code", "message"}), since that is what the
client reads. The artifacts API (mlflow-artifacts) is here too; artifacts.py keeps the files.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from cml_appliance.api.bodies import check_json_values
from cml_appliance.auth import api_keys
from cml_appliance.auth.users import User
from cml_appliance.core.errors import (
    AlreadyExists,
    AppError,
    InvalidArgument,
    NotFound,
    PayloadTooLarge,
    PermissionDenied,
    StorageFull,
    Unauthenticated,
)
from cml_appliance.core.logs import request_id_var
from cml_appliance.db.pool import database_unreachable
from cml_appliance.experiments.service import (
    Experiment,
    LoggedModel,
    Metric,
    Run,
    max_results,
    number_out,
    page_token_in,
    page_token_out,
)
from cml_appliance.web.keys import ARTIFACTS, POOL, PROJECTS, SETTINGS, TRACKING

log = logging.getLogger(__name__)
Handler = Callable[[web.Request, User, dict[str, Any]], Awaitable[web.StreamResponse]]

BASE = "/mlflow/{project_id}/api/2.0/mlflow"
ARTIFACTS_BASE = "/mlflow/{project_id}/api/2.0/mlflow-artifacts/artifacts"


def _error_code(exc: AppError) -> tuple[str, int]:
    if isinstance(exc, NotFound):
        return "RESOURCE_DOES_NOT_EXIST", 404
    if isinstance(exc, AlreadyExists):
        return "RESOURCE_ALREADY_EXISTS", 400
    if isinstance(exc, PermissionDenied):
        return "PERMISSION_DENIED", 403
    if isinstance(exc, Unauthenticated):
        return "UNAUTHENTICATED", 401
    if isinstance(exc, (PayloadTooLarge, StorageFull)):
        return "RESOURCE_EXHAUSTED", exc.status
    if exc.status == 503:
        return "TEMPORARILY_UNAVAILABLE", 503
    if exc.status >= 500:
        return "INTERNAL_ERROR", exc.status
    return "INVALID_PARAMETER_VALUE", 400


def mlflow_error(code: str, status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error_code": code, "message": message}, status=status, headers=headers)


async def _caller(request: web.Request) -> User:
    pool = request.app[POOL]
    authorization = request.headers.get("Authorization", "")
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        found = await api_keys.check(pool, value.strip(), "API")
    elif scheme.lower() == "basic":
        found = await api_keys.check_basic(pool, authorization)
    else:
        raise Unauthenticated("send an API key: 'Authorization: Bearer <key>' (MLFLOW_TRACKING_TOKEN)")
    if found.problem or found.user is None:
        raise Unauthenticated(found.problem or "the API key is not valid")
    return found.user


async def _arguments(request: web.Request) -> dict[str, Any]:
    """GET requests carry their fields in the query string (repeated for lists), others a JSON body."""
    if request.method == "GET":
        out: dict[str, Any] = {}
        for key in request.query:
            values = request.query.getall(key)
            out[key] = values if len(values) > 1 or key in ("experiment_ids",) else values[0]
        check_json_values(out)
        return out
    limit = request.app[SETTINGS].max_json_body_mb * 1024 * 1024
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"the request body is larger than {limit // (1024 * 1024)} MB")
    raw = await request.content.read(limit + 1)
    if len(raw) > limit:
        raise PayloadTooLarge(f"the request body is larger than {limit // (1024 * 1024)} MB")
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise InvalidArgument("the request body must be JSON") from None
    if not isinstance(body, dict):
        raise InvalidArgument("the request body must be a JSON object")
    check_json_values(body)  # no NUL or lone surrogate reaches Postgres
    return body


def mlflow_handler(handler: Handler) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """Authenticate, parse the arguments, and answer every failure in MLflow's error shape."""

    @functools.wraps(handler)
    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            user = await _caller(request)
            # The project of the URL first: a caller who cannot see it learns nothing more (not
            # even that their arguments were wrong).
            await request.app[PROJECTS].get(user, request.match_info["project_id"])
            # A PUT is an artifact upload: its body is the file, streamed by the handler.
            arguments = {} if request.method == "PUT" else await _arguments(request)
            return await handler(request, user, arguments)
        except AppError as exc:
            code, status = _error_code(exc)
            headers = {"Retry-After": str(exc.retry_after)} if hasattr(exc, "retry_after") else None
            return mlflow_error(code, status, exc.message, headers)
        except Exception as exc:
            if database_unreachable(exc):
                return mlflow_error("TEMPORARILY_UNAVAILABLE", 503, "the database is unreachable for a moment: try again shortly",
                                    {"Retry-After": "5"})
            log.exception("unexpected error answering %s %s", request.method, request.path)
            return mlflow_error("INTERNAL_ERROR", 500, f"internal error; quote request id {request_id_var.get()} when reporting it")

    return wrapped


def _required(arguments: dict[str, Any], *names: str) -> str:
    for name in names:
        value = arguments.get(name)
        if value not in (None, ""):
            if not isinstance(value, str):
                raise InvalidArgument(f"{name} must be a string")
            return value
    raise InvalidArgument(f"Missing value for required parameter '{names[0]}'.")


def _string_list(arguments: dict[str, Any], name: str) -> list[str]:
    value = arguments.get(name) or []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidArgument(f"{name} must be a list of strings")
    return value


def _tags(mapping: dict[str, str]) -> list[dict[str, str]]:
    return [{"key": k, "value": v} for k, v in sorted(mapping.items())]


# JSON shapes -------------------------------------------------------------------------------

def experiment_json(experiment: Experiment) -> dict[str, Any]:
    return {
        "experiment_id": experiment.public_id, "name": experiment.name,
        "artifact_location": experiment.artifact_location, "lifecycle_stage": experiment.lifecycle_stage,
        "last_update_time": experiment.last_update_time, "creation_time": experiment.creation_time,
        "tags": _tags(experiment.tags),
    }


def metric_json(metric: Metric) -> dict[str, Any]:
    return {"key": metric.key, "value": number_out(metric.value), "timestamp": metric.timestamp, "step": metric.step}


def run_info_json(run: Run) -> dict[str, Any]:
    info: dict[str, Any] = {
        "run_id": run.run_id, "run_uuid": run.run_id, "run_name": run.run_name,
        "experiment_id": run.experiment_public_id, "user_id": run.user, "status": run.status,
        "start_time": run.start_time, "artifact_uri": run.artifact_uri, "lifecycle_stage": run.lifecycle_stage,
    }
    if run.end_time is not None:
        info["end_time"] = run.end_time
    return info


def run_json(run: Run) -> dict[str, Any]:
    dataset_inputs = [i for i in run.inputs if "dataset" in i]
    model_inputs = [i for i in run.inputs if "model_id" in i]
    return {
        "info": run_info_json(run),
        "data": {"metrics": [metric_json(m) for m in run.metrics()], "params": _tags(run.params), "tags": _tags(run.tags)},
        "inputs": {"dataset_inputs": dataset_inputs, "model_inputs": model_inputs},
        "outputs": {"model_outputs": run.outputs},
    }


def logged_model_json(model: LoggedModel, metrics: list[Metric]) -> dict[str, Any]:
    info: dict[str, Any] = {
        "model_id": model.model_id, "experiment_id": model.experiment_public_id, "name": model.name,
        "creation_timestamp_ms": model.creation_timestamp, "last_updated_timestamp_ms": model.last_updated_timestamp,
        "artifact_uri": model.artifact_uri, "status": model.status, "model_type": model.model_type,
        "status_message": model.status_message, "tags": _tags(model.tags),
    }
    if model.source_run_id:
        info["source_run_id"] = model.source_run_id
    return {"info": info, "data": {"params": _tags(model.params), "metrics": [metric_json(m) for m in metrics]}}


def _page(key: str, items: list[Any], offset: int, more: bool) -> web.Response:
    body: dict[str, Any] = {key: items}
    if more:
        body["next_page_token"] = page_token_out(offset + len(items))
    return web.json_response(body)


# Experiments -------------------------------------------------------------------------------

@mlflow_handler
async def create_experiment(request: web.Request, user: User, a: dict[str, Any]) -> web.Response:
    experiment = await request.app[TRACKING].create_experiment(
        user, request.match_info["project_id"], a.get("name"), a.get("tags"), a.get("artifact_location"))
    return web.json_response({"experiment_id": experiment.public_id})


@mlflow_handler
async def get_experiment(request: web.Request, user: User, a: dict[str, Any]) -> web.Response:
    _, experiment = await request.app[TRACKING].experiment(user, request.match_info["project_id"], _required(a, "experiment_id"))
    return web.json_response({"experiment": experiment_json(experiment)})


@mlflow_handler
async def get_experiment_by_name(request: web.Request, user: User, a: dict[str, Any]) -> web.Response:
    experiment = await request.app[TRACKING].experiment_by_name(user, request.match_info["project_id"], _required(a, "experiment_name"))
    return web.json_response({"experiment": experiment_json(experiment)})


@mlflow_handler
async def search_experiments(request: web.Request, user: User, a: dict[str, Any]) -> web.Response:
    offset = page_token_in(a.get("page_token"))
    found, more = await request.app[TRACKING].search_experiments(
        user, request.match_info["project_id"], filter_text=str(a.get("filter") or ""),
        order_by=_string_list(a, "order_by"), view=str(a.get("view_type") or "ACTIVE_ONLY"),
        limit=max_results(a.get("max_results"), 1000), offset=offset)
    return _page("experiments", [experiment_json(e) for e in found], offset, more)


@mlflow_handler
async def update_experiment(request: web.Request, user: User, a: dict[str, Any]) -> web.Response:
    await request.app[TRACKING].update_experiment(user, request.match_info["project_id"], _required(a, "experiment_id"),
                                                  new_name=a.get("new_name"))
    return web.json_response({})


@mlflow_handler
async def delete_experiment(request: web.Request, user: User, a: dict[str, Any]) -> web.Response:
    await request.app[TRACKING].set_experiment_stage(user, request.match_info["project_id"], _required(a, "experiment_id"), "deleted")
    return web.json_response({})


@mlflow_handler
async def restore_experiment(request: web.Request, user: User, a: dict[str, Any]) -> web.Response:
    await request.app[TRACKING].set_experiment_stage(user, request.match_info["project_id"], _required(a, "experiment_id"), "active")
    return web.json_response({})


@mlflow_handler
async def set_experiment_tag(request: web.Request, user: User, a: dict[str, Any]) -> web.Response:
    await request.app[TRACKING].update_experiment(
        user, request.match_info["project_id"], _required(a, "experiment_id"),
        tags=[{"key": _required(a, "key"), "value": a.get("value", "")}])
    return web.json_response({})


@mlflow_handler
async def delete_experiment_tag(request: web.Request, user: User, a: dict[str, Any]) -> web.Response:
    await request.app[TRACKING].delete_experiment_tag(user, request.match_info["project_id"], _required(a, "experiment_id"),
                                                      _required(a, "key"))
    return web.json_response({})


# Runs --------------------------------------------------------------------------------------

@mlflow_handler
async def create_run(request: web.Request, user: User, a: dict[str, Any]) -> web.Response:
    run = await request.app[TRACKING].create_run(
        user, request.match_info["project_id"], str(a.get("experiment_id") or "0"), run_name=a.get("run_name"),
        start_time=a.get("start_time"), tags=a.get("tags"))
    return web.json_response({"run": run_json(run)})


@mlflow_handler
async def get_run(request: web.Request, user: User, a: dict[str, Any]) -> web.Response:
    run = await request.app[TRACKING].run(user, request.match_info["project_id"], _required(a, "run_id", "run_uuid"))
    return web.json_response({"run": run_json(run)})


@mlflow_handler
async def update_run(request: web.Request, user: User, a: dict[str, Any]) -> web.Response:
    run = await request.app[TRACKING].update_run(
        user, request.match_info["project_id"], _required(a, "run_id", "run_uuid"), status=a.get("status"),
        end_time=a.get("end_time"), run_name=a.get("run_name"))
    return web.json_response({"run_info": run_info_json(run)})


@mlflow_handler
async def delete_run(request: web.Request, user: User, a: dict[str, Any]) -> web.Response:
    await request.app[TRACKING].set_run_stage(user, request.match_info["project_id"], _required(a, "run_id"), "deleted")
    return web.json_response({})


@mlflow_handler
async def restore_run(request: web.Request, user: User, a: dict[str, Any]) -> web.Response:
    await request.app[TRACKING].set_run_stage(user, request.match_info["project_id"], _required(a, "run_id"), "active")
    return web.json_response({})


@mlflow_handler
async def search_runs(request: web.Request, user: User, a: dict[str, Any]) -> web.Response:
    offset = page_token_in(a.get("page_token"))
    found, more = await request.app[TRACKING].search_runs(
        user, request.match_info["project_id"], _string_list(a, "experiment_ids"), filter_text=str(a.get("filter") or ""),
        order_by=_string_list(a, "order_by"), view=str(a.get("run_view_type") or "ACTIVE_ONLY"),
        limit=max_results(a.get("max_results"), 1000), offset=offset)
    return _page("runs", [run_json(r) for r in found], offset, more)


@mlflow_handler
async def log_metric(request: web.Request, user: User, a: dict[str, Any]) -> web.Response:
    metric = {k: a.get(k) for k in ("key", "value", "timestamp", "step")}
    await request.app[TRACKING].log_batch(user, request.match_info["project_id"], _required(a, "run_id", "run_uuid"),
                                          metrics=[metric], model_id=a.get("model_id") or None)
    return web.json_response({})


@mlflow_handler
async def log_param(request: web.Request, user: User, a: dict[str, Any]) -> web.Response:
    await request.app[TRACKING].log_batch(user, request.match_info["project_id"], _required(a, "run_id", "run_uuid"),
                                          params=[{"key": a.get("key"), "value": a.get("value")}])
    return web.json_response({})


@mlflow_handler
async def set_tag(request: web.Request, user: User, a: dict[str, Any]) -> web.Response:
    await request.app[TRACKING].log_batch(user, request.match_info["project_id"], _required(a, "run_id", "run_uuid"),
                                          tags=[{"key": a.get("key"), "value": a.get("value")}])
    return web.json_response({})


@mlflow_handler
async def delete_tag(request: web.Request, user: User, a: dict[str, Any]) -> web.Response:
    await request.app[TRACKING].delete_tag(user, request.match_info["project_id"], _required(a, "run_id"), _required(a, "key"))
    return web.json_response({})


@mlflow_handler
async def log_batch(request: web.Request, user: User, a: dict[str, Any]) -> web.Response:
    metrics = a.get("metrics")
    model_ids = {m.get("model_id") for m in metrics or [] if isinstance(m, dict) and m.get("model_id")}
    await request.app[TRACKING].log_batch(user, request.match_info["project_id"], _required(a, "run_id"),
                                          metrics=metrics, params=a.get("params"), tags=a.get("tags"),
                                          model_id=model_ids.pop() if len(model_ids) == 1 else None)
    return web.json_response({})


@mlflow_handler
async def log_inputs(request: web.Request, user: User, a: dict[str, Any]) -> web.Response:
    await request.app[TRACKING].log_inputs(user, request.match_info["project_id"], _required(a, "run_id"),
                                           a.get("datasets"), a.get("models"))
    return web.json_response({})


@mlflow_handler
async def log_outputs(request: web.Request, user: User, a: dict[str, Any]) -> web.Response:
    await request.app[TRACKING].log_outputs(user, request.match_info["project_id"], _required(a, "run_id"), a.get("models"))
    return web.json_response({})


@mlflow_handler
async def metric_history(request: web.Request, user: User, a: dict[str, Any]) -> web.Response:
    offset = page_token_in(a.get("page_token"))
    found, more = await request.app[TRACKING].metric_history(
        user, request.match_info["project_id"], _required(a, "run_id", "run_uuid"), _required(a, "metric_key"),
        limit=max_results(a.get("max_results"), 25000, 25000), offset=offset)
    return _page("metrics", [metric_json(m) for m in found], offset, more)


# Logged models (MLflow 3) ------------------------------------------------------------------

async def _model_json(request: web.Request, model: LoggedModel) -> dict[str, Any]:
    return logged_model_json(model, await request.app[TRACKING].logged_model_metrics(model))


@mlflow_handler
async def create_logged_model(request: web.Request, user: User, a: dict[str, Any]) -> web.Response:
    model = await request.app[TRACKING].create_logged_model(
        user, request.match_info["project_id"], str(a.get("experiment_id") or "0"), name=a.get("name"),
        model_type=a.get("model_type"), source_run_id=a.get("source_run_id"), params=a.get("params"), tags=a.get("tags"))
    return web.json_response({"model": await _model_json(request, model)})


@mlflow_handler
async def get_logged_model(request: web.Request, user: User, a: dict[str, Any]) -> web.Response:
    model = await request.app[TRACKING].logged_model(user, request.match_info["project_id"], request.match_info["model_id"])
    return web.json_response({"model": await _model_json(request, model)})


@mlflow_handler
async def finalize_logged_model(request: web.Request, user: User, a: dict[str, Any]) -> web.Response:
    model = await request.app[TRACKING].update_logged_model(user, request.match_info["project_id"], request.match_info["model_id"],
                                                            status=a.get("status"))
    return web.json_response({"model": await _model_json(request, model)})


@mlflow_handler
async def delete_logged_model(request: web.Request, user: User, a: dict[str, Any]) -> web.Response:
    await request.app[TRACKING].delete_logged_model(user, request.match_info["project_id"], request.match_info["model_id"])
    return web.json_response({})


@mlflow_handler
async def set_logged_model_tags(request: web.Request, user: User, a: dict[str, Any]) -> web.Response:
    await request.app[TRACKING].update_logged_model(user, request.match_info["project_id"], request.match_info["model_id"],
                                                    tags=a.get("tags"))
    return web.json_response({})


@mlflow_handler
async def delete_logged_model_tag(request: web.Request, user: User, a: dict[str, Any]) -> web.Response:
    await request.app[TRACKING].update_logged_model(user, request.match_info["project_id"], request.match_info["model_id"],
                                                    delete_tag=request.match_info["tag_key"])
    return web.json_response({})


@mlflow_handler
async def log_logged_model_params(request: web.Request, user: User, a: dict[str, Any]) -> web.Response:
    await request.app[TRACKING].update_logged_model(user, request.match_info["project_id"], request.match_info["model_id"],
                                                    params=a.get("params"))
    return web.json_response({})


@mlflow_handler
async def search_logged_models(request: web.Request, user: User, a: dict[str, Any]) -> web.Response:
    offset = page_token_in(a.get("page_token"))
    order_by = a.get("order_by") or []
    if not isinstance(order_by, list):
        raise InvalidArgument("order_by must be a list of {field_name, ascending}")
    found, more = await request.app[TRACKING].search_logged_models(
        user, request.match_info["project_id"], _string_list(a, "experiment_ids"), filter_text=str(a.get("filter") or ""),
        order_by=order_by, limit=max_results(a.get("max_results"), 100), offset=offset)
    return _page("models", [await _model_json(request, m) for m in found], offset, more)


# Artifacts ---------------------------------------------------------------------------------

def _run_artifact_path(run: Run, path: str) -> str:
    return f"{run.experiment_public_id}/{run.run_id}/artifacts/{path}".rstrip("/")


@mlflow_handler
async def list_run_artifacts(request: web.Request, user: User, a: dict[str, Any]) -> web.Response:
    """The tracking API's own listing (artifacts/list?run_id=&path=): paths relative to the run's root."""
    run = await request.app[TRACKING].run(user, request.match_info["project_id"], _required(a, "run_id", "run_uuid"))
    path = str(a.get("path") or "").strip("/")
    entries = await request.app[ARTIFACTS].listing(user, request.match_info["project_id"], _run_artifact_path(run, path))
    for entry in entries:
        entry["path"] = f"{path}/{entry['path']}" if path else entry["path"]
    return web.json_response({"root_uri": run.artifact_uri, "files": entries})


@mlflow_handler
async def artifact_upload(request: web.Request, user: User, _: dict[str, Any]) -> web.Response:
    await request.app[ARTIFACTS].write(user, request.match_info["project_id"], request.match_info["path"],
                                       request.content.iter_chunked(1 << 16))
    return web.json_response({})


@mlflow_handler
async def artifact_download(request: web.Request, user: User, _: dict[str, Any]) -> web.StreamResponse:
    target = await request.app[ARTIFACTS].file(user, request.match_info["project_id"], request.match_info["path"])
    # Artifacts are user content: served as downloads, never rendered on any origin of ours.
    return web.FileResponse(target, headers={"Content-Type": "application/octet-stream",
                                             "Content-Disposition": "attachment", "X-Content-Type-Options": "nosniff"})


@mlflow_handler
async def artifact_list(request: web.Request, user: User, _: dict[str, Any]) -> web.Response:
    path = request.query.get("path", "")
    if not path.strip("/"):
        raise InvalidArgument("path names an experiment's artifacts: <experiment id>/<run id>/artifacts/…")
    return web.json_response({"files": await request.app[ARTIFACTS].listing(user, request.match_info["project_id"], path)})


@mlflow_handler
async def artifact_delete(request: web.Request, user: User, _: dict[str, Any]) -> web.Response:
    await request.app[ARTIFACTS].delete(user, request.match_info["project_id"], request.match_info["path"])
    return web.json_response({})


@mlflow_handler
async def list_logged_model_artifacts(request: web.Request, user: User, a: dict[str, Any]) -> web.Response:
    model = await request.app[TRACKING].logged_model(user, request.match_info["project_id"], request.match_info["model_id"])
    path = str(a.get("artifact_directory_path") or "").strip("/")
    base = f"{model.experiment_public_id}/models/{model.model_id}/artifacts/{path}".rstrip("/")
    entries = await request.app[ARTIFACTS].listing(user, request.match_info["project_id"], base)
    for entry in entries:
        entry["path"] = f"{path}/{entry['path']}" if path else entry["path"]
    return web.json_response({"root_uri": model.artifact_uri, "files": entries})


async def unknown_endpoint(request: web.Request) -> web.Response:
    return mlflow_error("ENDPOINT_NOT_FOUND", 404, f"this MLflow server has no endpoint {request.method} "
                        f"{request.path.split('/', 3)[-1] if request.path.count('/') > 2 else request.path}")


def routes() -> list[web.RouteDef]:
    one_model = BASE + "/logged-models/{model_id:m-[0-9a-f]+}"
    table: list[tuple[str, str, Any]] = [
        ("POST", "/experiments/create", create_experiment),
        ("GET", "/experiments/get", get_experiment),
        ("GET", "/experiments/get-by-name", get_experiment_by_name),
        ("POST", "/experiments/search", search_experiments),
        ("GET", "/experiments/search", search_experiments),
        ("POST", "/experiments/update", update_experiment),
        ("POST", "/experiments/delete", delete_experiment),
        ("POST", "/experiments/restore", restore_experiment),
        ("POST", "/experiments/set-experiment-tag", set_experiment_tag),
        ("POST", "/experiments/delete-experiment-tag", delete_experiment_tag),
        ("POST", "/runs/create", create_run),
        ("GET", "/runs/get", get_run),
        ("POST", "/runs/update", update_run),
        ("POST", "/runs/delete", delete_run),
        ("POST", "/runs/restore", restore_run),
        ("POST", "/runs/search", search_runs),
        ("POST", "/runs/log-metric", log_metric),
        ("POST", "/runs/log-parameter", log_param),
        ("POST", "/runs/set-tag", set_tag),
        ("POST", "/runs/delete-tag", delete_tag),
        ("POST", "/runs/log-batch", log_batch),
        ("POST", "/runs/log-inputs", log_inputs),
        ("POST", "/runs/outputs", log_outputs),
        ("GET", "/metrics/get-history", metric_history),
        ("GET", "/artifacts/list", list_run_artifacts),
        ("POST", "/logged-models", create_logged_model),
        ("POST", "/logged-models/search", search_logged_models),
    ]
    out = [web.route(method, BASE + path, handler, name=f"mlflow_{method.lower()}_{path.strip('/').replace('/', '_').replace('-', '_')}")
           for method, path, handler in table]
    out += [
        web.get(one_model, get_logged_model, name="mlflow_get_logged_model"),
        web.patch(one_model, finalize_logged_model, name="mlflow_finalize_logged_model"),
        web.delete(one_model, delete_logged_model, name="mlflow_delete_logged_model"),
        web.patch(one_model + "/tags", set_logged_model_tags, name="mlflow_set_logged_model_tags"),
        web.delete(one_model + "/tags/{tag_key}", delete_logged_model_tag, name="mlflow_delete_logged_model_tag"),
        web.post(one_model + "/params", log_logged_model_params, name="mlflow_log_logged_model_params"),
        web.get(one_model + "/artifacts/directories", list_logged_model_artifacts, name="mlflow_list_logged_model_artifacts"),
        web.get(ARTIFACTS_BASE, artifact_list, name="mlflow_artifacts_list"),
        web.put(ARTIFACTS_BASE + "/{path:.+}", artifact_upload, name="mlflow_artifacts_upload"),
        web.get(ARTIFACTS_BASE + "/{path:.+}", artifact_download, name="mlflow_artifacts_download"),
        web.delete(ARTIFACTS_BASE + "/{path:.+}", artifact_delete, name="mlflow_artifacts_delete"),
        web.route("*", "/mlflow/{project_id}/{tail:.*}", unknown_endpoint, name="mlflow_unknown_endpoint"),
    ]
    return out


def route_names(more: list[web.RouteDef] | None = None) -> frozenset[str]:
    """These routes (and `more`: the registry's) authenticate themselves with MLflow's error
    shape, never with the UI cookie."""
    return frozenset(r.kwargs["name"] for r in routes() + (more or []))  # type: ignore[attr-defined]
