"""CML API v2's 14 experiment operations, in CML's shapes, over the same store as MLflow's API.

search_filter is CML's JSON object: name, status and creator.* match as substrings (as in every
other CML list); the dynamic keys `metrics.<key>`, `params.<key>` and `tags.<key>` match params and
tags as substrings and metrics by value (a number, or a string with a comparison: ">= 0.9").
sort is CML's "-start_time,+name", with metrics.<key> and friends allowed. Both are translated to
MLflow's search syntax (search.py), so the two APIs search the same way.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from cml_appliance.api.bodies import ANY, STR, STR_LIST
from cml_appliance.api.common import json_body
from cml_appliance.api.listing import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE
from cml_appliance.core.errors import InvalidArgument
from cml_appliance.core.timefmt import parse_rfc3339, rfc3339
from cml_appliance.experiments.service import Experiment, Metric, Run, number_out, page_token_in, page_token_out
from cml_appliance.web.context import current_user
from cml_appliance.web.keys import TRACKING

RUN_STATUS_PREFIX = "EXPERIMENT_RUN_"
_DYNAMIC = ("metrics.", "params.", "tags.")
_RUN_FILTERS = {"name": "attributes.run_name", "status": "attributes.status", "creator.username": "attributes.user_id",
                "creator.name": "attributes.user_name", "creator.email": "attributes.user_email"}
_RUN_SORTS = {"created_at": "attributes.start_time", "start_time": "attributes.start_time", "name": "attributes.run_name",
              "creator.username": "attributes.user_id", "creator.name": "attributes.user_name",
              "creator.email": "attributes.user_email"}
_EXPERIMENT_FILTERS = {"name": "attributes.name", "creator.username": "attributes.user_id",
                       "creator.name": "attributes.user_name", "creator.email": "attributes.user_email"}
_EXPERIMENT_SORTS = {"name": "attributes.name", "created_at": "attributes.creation_time",
                     "updated_at": "attributes.last_update_time", "creator.username": "attributes.user_id"}
_COMPARISON = re.compile(r"^\s*(>=|<=|!=|=|>|<)?\s*(-?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*$")


def _quote(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _contains(text: str) -> str:
    return _quote("%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%")


def _name(entity_key: str) -> str:
    entity, _, key = entity_key.partition(".")
    return f"{entity}.`{key.replace('`', '')}`"


def search_filter(raw: str, keys: dict[str, str], dynamic: bool) -> str:
    """CML's search_filter (a JSON object) as an MLflow filter string."""
    if not raw:
        return ""
    try:
        parsed = json.loads(raw)
    except (json.JSONDecodeError, RecursionError):
        parsed = None
    if not isinstance(parsed, dict):
        raise InvalidArgument('search_filter must be a JSON object such as {"name":"baseline"}')
    clauses = []
    for key, value in parsed.items():
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise InvalidArgument(f"search_filter value for {key!r} must be a string or a number")
        text = str(value)
        if dynamic and key.startswith("metrics.") and len(key) > 8:
            match = _COMPARISON.match(text)
            if not match:
                raise InvalidArgument(f"search_filter {key!r} takes a number, or a comparison such as '>= 0.9'")
            clauses.append(f"{_name(key)} {match.group(1) or '='} {match.group(2)}")
        elif dynamic and key.startswith(("params.", "tags.")) and len(key.partition(".")[2]) > 0:
            clauses.append(f"{_name(key)} ILIKE {_contains(text)}")
        elif key == "status" and "status" in keys:
            status = text.upper().removeprefix(RUN_STATUS_PREFIX)
            clauses.append(f"attributes.status = {_quote(status)}")
        elif key in keys:
            clauses.append(f"{keys[key]} ILIKE {_contains(text)}")
        else:
            extra = " and metrics.<key>, params.<key>, tags.<key>" if dynamic else ""
            raise InvalidArgument(f"search_filter key {key!r} is not supported; use one of: {', '.join(keys)}{extra}")
    return " AND ".join(clauses)


def sort_order(raw: str, keys: dict[str, str], dynamic: bool) -> list[str]:
    out = []
    for part in raw.split(","):
        part = part.strip()
        if not part:
            continue
        descending = part.startswith("-")
        key = part.lstrip("+-").strip()
        if dynamic and key.startswith(_DYNAMIC) and len(key.partition(".")[2]) > 0:
            name = _name(key)
        elif key in keys:
            name = keys[key]
        else:
            raise InvalidArgument(f"sort key {key!r} is not supported; use one of: {', '.join(keys)}"
                                  + (" and metrics.<key>, params.<key>, tags.<key>" if dynamic else ""))
        out.append(f"{name} {'DESC' if descending else 'ASC'}")
    return out


def paging(request: web.Request) -> tuple[int, int]:
    raw = request.query.get("page_size", "")
    try:
        size = int(raw) if raw not in ("", "0") else DEFAULT_PAGE_SIZE
    except ValueError:
        raise InvalidArgument(f"page_size must be a whole number, got {raw!r}") from None
    if not 1 <= size <= MAX_PAGE_SIZE:
        raise InvalidArgument(f"page_size must be between 1 and {MAX_PAGE_SIZE}")
    return size, page_token_in(request.query.get("page_token"))


def ms_time(ms: int | None) -> str:
    return rfc3339(datetime.fromtimestamp(ms / 1000, UTC)) if ms is not None else ""


def tag_list(mapping: dict[str, str]) -> list[dict[str, str]]:
    return [{"key": k, "value": v} for k, v in sorted(mapping.items())]


def experiment_json(experiment: Experiment) -> dict[str, Any]:
    return {
        "id": experiment.public_id, "project_id": experiment.project_public_id, "name": experiment.name,
        "artifact_location": experiment.artifact_location, "created_at": rfc3339(experiment.created_at),
        "updated_at": rfc3339(experiment.updated_at), "tags": tag_list(experiment.tags),
        "lifecycle_stage": experiment.lifecycle_stage, "user": experiment.creator,
    }


def metric_json(metric: Metric) -> dict[str, Any]:
    return {"key": metric.key, "value": number_out(metric.value), "timestamp": ms_time(metric.timestamp),
            "step": str(metric.step)}


def run_json(run: Run) -> dict[str, Any]:
    data: dict[str, Any] = {
        "id": run.run_id, "name": run.run_name, "experiment_id": run.experiment_public_id, "user": run.creator,
        "status": RUN_STATUS_PREFIX + run.status, "start_time": ms_time(run.start_time),
        "artifact_uri": run.artifact_uri,
        "data": {"metrics": [metric_json(m) for m in run.metrics()], "params": tag_list(run.params), "tags": tag_list(run.tags)},
        "inputs": {"dataset_inputs": [i for i in run.inputs if "dataset" in i]},
    }
    if run.end_time is not None:
        data["end_time"] = ms_time(run.end_time)
    return data


def _page(key: str, items: list[Any], offset: int, more: bool) -> web.Response:
    return web.json_response({key: items, "next_page_token": page_token_out(offset + len(items)) if more else ""})


def same_as_path(body: dict[str, Any], field: str, expected: str) -> None:
    if body.get(field) not in (None, "", expected):
        raise InvalidArgument(f"{field} in the body must match the path")


def _millis(value: Any, field: str) -> int | None:
    """A time as CML sends it (RFC 3339), or as MLflow does (milliseconds)."""
    if value in (None, ""):
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, str) and value.isdigit():
        return int(value)
    try:
        return int(parse_rfc3339(str(value)).timestamp() * 1000)
    except ValueError as exc:
        raise InvalidArgument(f"{field}: {exc}") from None


def _status(value: Any) -> str | None:
    if value in (None, ""):
        return None
    if not isinstance(value, str):
        raise InvalidArgument("status must be a string such as EXPERIMENT_RUN_FINISHED")
    return value.upper().removeprefix(RUN_STATUS_PREFIX)


# Experiments -------------------------------------------------------------------------------

async def list_all_experiments(request: web.Request) -> web.Response:
    size, offset = paging(request)
    found, more = await request.app[TRACKING].search_experiments(
        current_user(request), None, filter_text=search_filter(request.query.get("search_filter", ""), _EXPERIMENT_FILTERS, False),
        limit=size, offset=offset)
    return _page("experiments", [experiment_json(e) for e in found], offset, more)


async def list_experiments(request: web.Request) -> web.Response:
    size, offset = paging(request)
    found, more = await request.app[TRACKING].search_experiments(
        current_user(request), request.match_info["project_id"],
        filter_text=search_filter(request.query.get("search_filter", ""), _EXPERIMENT_FILTERS, False),
        order_by=sort_order(request.query.get("sort", ""), _EXPERIMENT_SORTS, False), limit=size, offset=offset)
    return _page("experiments", [experiment_json(e) for e in found], offset, more)


async def create_experiment(request: web.Request) -> web.Response:
    body = await json_body(request, {"project_id": STR, "name": STR, "tags": ANY, "artifact_location": STR, "engine_id": STR})
    same_as_path(body, "project_id", request.match_info["project_id"])
    experiment = await request.app[TRACKING].create_experiment(
        current_user(request), request.match_info["project_id"], body.get("name"), body.get("tags"), body.get("artifact_location"))
    return web.json_response(experiment_json(experiment))


async def get_experiment(request: web.Request) -> web.Response:
    _, experiment = await request.app[TRACKING].experiment(current_user(request), request.match_info["project_id"],
                                                           request.match_info["experiment_id"])
    return web.json_response(experiment_json(experiment))


async def update_experiment(request: web.Request) -> web.Response:
    body = await json_body(request, {"id": STR, "project_id": STR, "name": STR, "tags": ANY},
                           frozenset({"artifact_location", "created_at", "updated_at", "lifecycle_stage", "user"}))
    same_as_path(body, "id", request.match_info["experiment_id"])
    same_as_path(body, "project_id", request.match_info["project_id"])
    experiment = await request.app[TRACKING].update_experiment(
        current_user(request), request.match_info["project_id"], request.match_info["experiment_id"],
        new_name=body.get("name") or None, tags=body.get("tags"))
    return web.json_response(experiment_json(experiment))


async def delete_experiment(request: web.Request) -> web.Response:
    await request.app[TRACKING].set_experiment_stage(current_user(request), request.match_info["project_id"],
                                                     request.match_info["experiment_id"], "deleted")
    return web.json_response({})


# Runs --------------------------------------------------------------------------------------

async def _run_in_experiment(request: web.Request, run_id: str) -> Run:
    tracking = request.app[TRACKING]
    user = current_user(request)
    _, experiment = await tracking.experiment(user, request.match_info["project_id"], request.match_info["experiment_id"])
    run = await tracking.run(user, request.match_info["project_id"], run_id)
    if run.experiment_id != experiment.id:
        raise InvalidArgument(f"run {run_id!r} belongs to another experiment")
    return run


async def list_runs(request: web.Request) -> web.Response:
    size, offset = paging(request)
    found, more = await request.app[TRACKING].search_runs(
        current_user(request), request.match_info["project_id"], [request.match_info["experiment_id"]],
        filter_text=search_filter(request.query.get("search_filter", ""), _RUN_FILTERS, True),
        order_by=sort_order(request.query.get("sort", ""), _RUN_SORTS, True), limit=size, offset=offset)
    return _page("experiment_runs", [run_json(r) for r in found], offset, more)


async def create_run(request: web.Request) -> web.Response:
    body = await json_body(request, {"project_id": STR, "experiment_id": STR, "run_name": STR, "start_time": STR, "tags": ANY})
    same_as_path(body, "project_id", request.match_info["project_id"])
    same_as_path(body, "experiment_id", request.match_info["experiment_id"])
    run = await request.app[TRACKING].create_run(
        current_user(request), request.match_info["project_id"], request.match_info["experiment_id"],
        run_name=body.get("run_name"), start_time=_millis(body.get("start_time"), "start_time"), tags=body.get("tags"))
    return web.json_response(run_json(run))


async def get_run(request: web.Request) -> web.Response:
    return web.json_response(run_json(await _run_in_experiment(request, request.match_info["run_id"])))


async def update_run(request: web.Request) -> web.Response:
    body = await json_body(request, {"id": STR, "name": STR, "experiment_id": STR, "status": STR, "end_time": STR},
                           frozenset({"user", "start_time", "artifact_uri", "data", "inputs"}))
    same_as_path(body, "id", request.match_info["run_id"])
    same_as_path(body, "experiment_id", request.match_info["experiment_id"])
    run = await _run_in_experiment(request, request.match_info["run_id"])
    updated = await request.app[TRACKING].update_run(
        current_user(request), request.match_info["project_id"], run.run_id, status=_status(body.get("status")),
        end_time=_millis(body.get("end_time"), "end_time"), run_name=body.get("name") or None)
    return web.json_response(run_json(updated))


async def delete_run(request: web.Request) -> web.Response:
    run = await _run_in_experiment(request, request.match_info["run_id"])
    await request.app[TRACKING].set_run_stage(current_user(request), request.match_info["project_id"], run.run_id, "deleted")
    return web.json_response({})


async def run_metrics(request: web.Request) -> web.Response:
    run = await _run_in_experiment(request, request.match_info["run_id"])
    found, _ = await request.app[TRACKING].metric_history(current_user(request), request.match_info["project_id"],
                                                          run.run_id, request.match_info["metric_key"])
    return web.json_response({"metrics": [metric_json(m) for m in found]})


async def log_batch(request: web.Request) -> web.Response:
    body = await json_body(request, {"project_id": STR, "experiment_id": STR, "run_id": STR, "metrics": ANY, "params": ANY,
                                     "tags": ANY, "model_json": STR})
    same_as_path(body, "run_id", request.match_info["run_id"])
    run = await _run_in_experiment(request, request.match_info["run_id"])
    tags = list(body.get("tags") or [])
    if body.get("model_json"):
        # MLflow's LogModel: the MLmodel (as JSON) joins the run's model history tag.
        try:
            model = json.loads(body["model_json"])
        except json.JSONDecodeError:
            raise InvalidArgument("model_json must be an MLmodel file as JSON") from None
        history = json.loads(run.tags.get("mlflow.log-model.history", "[]"))
        tags.append({"key": "mlflow.log-model.history", "value": json.dumps(history + [model])})
    metrics = body.get("metrics")
    if isinstance(metrics, list):  # CML sends a point's time in RFC 3339, MLflow in milliseconds
        metrics = [{**m, "timestamp": _millis(m.get("timestamp"), "metrics.timestamp")} if isinstance(m, dict) else m
                   for m in metrics]
    await request.app[TRACKING].log_batch(current_user(request), request.match_info["project_id"], run.run_id,
                                          metrics=metrics, params=body.get("params"), tags=tags)
    return web.json_response({})


async def delete_batch(request: web.Request) -> web.Response:
    body = await json_body(request, {"project_id": STR, "experiment_id": STR, "run_id": STR, "metrics": STR_LIST,
                                     "params": STR_LIST, "tags": STR_LIST})
    same_as_path(body, "run_id", request.match_info["run_id"])
    run = await _run_in_experiment(request, request.match_info["run_id"])
    await request.app[TRACKING].delete_batch(current_user(request), request.match_info["project_id"], run.run_id,
                                             metrics=body.get("metrics") or [], params=body.get("params") or [],
                                             tags=body.get("tags") or [])
    return web.json_response({})


def routes() -> list[web.RouteDef]:
    project = "/api/v2/projects/{project_id}/experiments"
    one = project + "/{experiment_id:[a-z0-9-]+}"
    runs = one + "/runs"
    run = runs + "/{run_id:[0-9a-f]{32}}"
    return [
        web.get("/api/v2/experiments", list_all_experiments, name="api_list_all_experiments"),
        web.get(project, list_experiments, name="api_list_experiments"),
        web.post(project, create_experiment, name="api_create_experiment"),
        web.get(one, get_experiment, name="api_get_experiment"),
        web.patch(one, update_experiment, name="api_update_experiment"),
        web.delete(one, delete_experiment, name="api_delete_experiment"),
        web.get(runs, list_runs, name="api_list_experiment_runs"),
        web.post(runs, create_run, name="api_create_experiment_run"),
        web.get(run, get_run, name="api_get_experiment_run"),
        web.patch(run, update_run, name="api_update_experiment_run"),
        web.delete(run, delete_run, name="api_delete_experiment_run"),
        web.get(run + "/metrics/{metric_key}", run_metrics, name="api_get_experiment_run_metrics"),
        web.post(run + ":logbatch", log_batch, name="api_log_experiment_run_batch"),
        web.post(run + ":deletebatch", delete_batch, name="api_delete_experiment_run_batch"),
    ]
