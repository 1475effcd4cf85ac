"""Pages: experiments (per project and across projects), an experiment's runs as a table with
params and metrics as columns, runs side by side, one run (metric charts, artifacts), and the
model registry (registered models, their versions, register and deploy).

Artifacts are user content: they are downloaded (attachment, sandboxed), never shown on the UI's
origin. Metric histories go into the page as JSON data (<script type="application/json">, which
the CSP lets through as data, not code) and static/js/charts.js draws them with dygraphs.
"""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Any

import aiohttp_jinja2
from aiohttp import web

from cml_appliance.api.listing import ListQuery
from cml_appliance.auth.permissions import Role
from cml_appliance.core.errors import AppError, InvalidArgument, NotFound
from cml_appliance.experiments.service import Run, TrackingService
from cml_appliance.projects import store as project_store
from cml_appliance.web.context import current_user
from cml_appliance.web.keys import ARTIFACTS, MODEL_REGISTRY, MODELS, POOL, TRACKING
from cml_appliance.web.templating import json_data, redirect

MAX_RUNS_SHOWN = 200
MAX_COLUMNS = 40  # params and metrics each: a table wider than this reads as noise
MAX_POINTS_CHARTED = 10_000
SORTABLE_ATTRIBUTES = {"name": "attributes.run_name", "status": "attributes.status", "started": "attributes.start_time",
                       "user": "attributes.user_id"}


def _columns(runs: list[Run]) -> tuple[list[str], list[str]]:
    params = sorted({k for r in runs for k in r.params})[:MAX_COLUMNS]
    metrics = sorted({k for r in runs for k in r.latest_metrics})[:MAX_COLUMNS]
    return params, metrics


def _sort_clause(raw: str) -> tuple[str, str, bool]:
    """?sort=metrics.rmse or ?sort=-started: (MLflow order_by, the column, descending)."""
    descending = raw.startswith("-")
    key = raw.lstrip("-")
    if key in SORTABLE_ATTRIBUTES:
        column = SORTABLE_ATTRIBUTES[key]
    elif key.startswith(("metrics.", "params.", "tags.")) and len(key.partition(".")[2]) > 0:
        entity, _, name = key.partition(".")
        column = f"{entity}.`{name.replace('`', '')}`"
    else:
        return "", "", False
    return f"{column} {'DESC' if descending else 'ASC'}", key, descending


async def experiments_page(request: web.Request, *, error: str = "", status: int = 200) -> web.StreamResponse:
    user = current_user(request)
    tracking: TrackingService = request.app[TRACKING]
    project = await tracking.projects.get(user, request.match_info["project_id"])
    view = request.query.get("view", "ACTIVE_ONLY")
    found, _ = await tracking.search_experiments(user, project.public_id, view=view if view in ("ACTIVE_ONLY", "DELETED_ONLY") else "ACTIVE_ONLY",
                                                 limit=500)
    counts = await _run_counts(request, [e.id for e in found])
    context = {"project": project, "experiments": found, "counts": counts, "error": error, "view": view,
               "can_write": project.role >= Role.WRITE}
    return aiohttp_jinja2.render_template("experiments.html", request, context, status=status)


async def _run_counts(request: web.Request, experiment_ids: list[int]) -> dict[int, dict[str, Any]]:
    rows = await request.app[POOL].fetch(
        "SELECT experiment_id, count(*) AS runs, max(start_time) AS last FROM experiment_runs"
        " WHERE experiment_id = ANY($1::bigint[]) AND lifecycle_stage = 'active' GROUP BY experiment_id", experiment_ids)
    return {r["experiment_id"]: {"runs": r["runs"], "last": r["last"]} for r in rows}


async def all_experiments_page(request: web.Request) -> web.StreamResponse:
    user = current_user(request)
    found, _ = await request.app[TRACKING].search_experiments(user, None, limit=500)
    names = {r["public_id"]: r["name"] for r in await request.app[POOL].fetch(
        "SELECT public_id, name FROM projects WHERE id = ANY($1::bigint[])", list({e.project_id for e in found}))}
    counts = await _run_counts(request, [e.id for e in found])
    return aiohttp_jinja2.render_template("experiments_all.html", request,
                                          {"experiments": found, "counts": counts, "project_names": names})


async def create_experiment(request: web.Request) -> web.StreamResponse:
    form = await request.post()
    pid = request.match_info["project_id"]
    try:
        experiment = await request.app[TRACKING].create_experiment(current_user(request), pid, str(form.get("name", "")).strip())
    except AppError as exc:
        return await experiments_page(request, error=exc.message, status=exc.status)
    raise redirect(request, f"/projects/{pid}/experiments/{experiment.public_id}", "ok", f"Created experiment {experiment.name}.")


async def experiment_page(request: web.Request) -> web.StreamResponse:
    user = current_user(request)
    tracking: TrackingService = request.app[TRACKING]
    pid, eid = request.match_info["project_id"], request.match_info["experiment_id"]
    project, experiment = await tracking.experiment(user, pid, eid)
    filter_text = request.query.get("filter", "").strip()
    order_by, sort_key, descending = _sort_clause(request.query.get("sort", "-started"))
    error, runs = "", []
    try:
        runs, _ = await tracking.search_runs(user, pid, [experiment.public_id], filter_text=filter_text,
                                             order_by=[order_by] if order_by else [], limit=MAX_RUNS_SHOWN)
    except InvalidArgument as exc:
        error = exc.message
    params, metrics = _columns(runs)
    context = {"project": project, "experiment": experiment, "runs": runs, "params": params, "metrics": metrics,
               "filter": filter_text, "sort_key": sort_key, "descending": descending, "error": error,
               "can_write": project.role >= Role.WRITE, "max_shown": MAX_RUNS_SHOWN}
    return aiohttp_jinja2.render_template("experiment.html", request, context, status=400 if error else 200)


async def _histories(tracking: TrackingService, user: Any, pid: str, run: Run) -> dict[str, list[list[float]]]:
    out: dict[str, list[list[float]]] = {}
    for key in sorted(run.latest_metrics)[:MAX_COLUMNS]:
        points, _ = await tracking.metric_history(user, pid, run.run_id, key, limit=MAX_POINTS_CHARTED)
        out[key] = [[p.step, p.value if p.value == p.value else None] for p in points]  # NaN: a gap
    return out


async def run_page(request: web.Request, *, error: str = "", status: int = 200) -> web.StreamResponse:
    user = current_user(request)
    tracking: TrackingService = request.app[TRACKING]
    pid, eid, rid = request.match_info["project_id"], request.match_info["experiment_id"], request.match_info["run_id"]
    project, experiment = await tracking.experiment(user, pid, eid)
    run = await tracking.run(user, pid, rid)
    if run.experiment_id != experiment.id:
        raise NotFound(f"run {rid!r} not found in this experiment")
    folder = request.query.get("path", "").strip("/")
    artifacts: list[dict[str, Any]] = []
    try:
        artifacts = await request.app[ARTIFACTS].listing(user, pid, f"{eid}/{rid}/artifacts/{folder}".rstrip("/"))
    except AppError as exc:
        error = error or exc.message
    models = await request.app[POOL].fetch(
        "SELECT model_id, name FROM logged_models WHERE source_run_id = $1 AND lifecycle_stage = 'active' ORDER BY creation_timestamp",
        run.run_id)
    registered = await request.app[POOL].fetch(
        "SELECT m.public_id, m.name, v.version FROM registered_model_versions v JOIN registered_models m ON m.id = v.registered_model_id"
        " WHERE v.run_id = $1 AND (m.visibility = 'PUBLIC' OR m.owner_id = $2 OR $3) ORDER BY m.name, v.version",
        run.run_id, user.id, user.is_admin)
    context = {
        "project": project, "experiment": experiment, "run": run, "folder": folder, "artifacts": artifacts,
        "parent": str(PurePosixPath(folder).parent) if folder else None,
        "histories": json_data(await _histories(tracking, user, pid, run)), "logged_models": models,
        "registered": registered, "error": error, "can_write": project.role >= Role.WRITE,
        "tags": {k: v for k, v in run.tags.items() if not k.startswith("mlflow.")},
    }
    return aiohttp_jinja2.render_template("experiment_run.html", request, context, status=status)


async def compare_page(request: web.Request) -> web.StreamResponse:
    user = current_user(request)
    tracking: TrackingService = request.app[TRACKING]
    pid, eid = request.match_info["project_id"], request.match_info["experiment_id"]
    project, experiment = await tracking.experiment(user, pid, eid)
    wanted = [r for r in request.query.getall("run", []) if r][:10]
    runs = []
    for rid in dict.fromkeys(wanted):
        run = await tracking.run(user, pid, rid)
        if run.experiment_id == experiment.id:
            runs.append(run)
    if len(runs) < 2:
        raise redirect(request, f"/projects/{pid}/experiments/{eid}", "error", "Choose two runs or more to compare.")
    params, metrics = _columns(runs)
    chosen = request.query.get("metric") or (metrics[0] if metrics else "")
    series = {}
    if chosen:
        for run in runs:
            points, _ = await tracking.metric_history(user, pid, run.run_id, chosen, limit=MAX_POINTS_CHARTED)
            series[run.run_name or run.run_id] = [[p.step, p.value if p.value == p.value else None] for p in points]
    context = {"project": project, "experiment": experiment, "runs": runs, "params": params, "metrics": metrics,
               "chosen": chosen, "series": json_data(series),
               "differs": {k for k in params if len({r.params.get(k) for r in runs}) > 1}}
    return aiohttp_jinja2.render_template("experiment_compare.html", request, context)


async def download_artifact(request: web.Request) -> web.StreamResponse:
    pid, eid, rid = request.match_info["project_id"], request.match_info["experiment_id"], request.match_info["run_id"]
    target = await request.app[ARTIFACTS].file(current_user(request), pid, f"{eid}/{rid}/artifacts/{request.match_info['path']}")
    name = target.name.replace('"', "")
    # User content: a download, never a page of ours (and sandboxed should a browser render it).
    return web.FileResponse(target, headers={
        "Content-Type": "application/octet-stream", "Content-Disposition": f'attachment; filename="{name}"',
        "Content-Security-Policy": "sandbox; default-src 'none'", "X-Content-Type-Options": "nosniff"})


async def register_from_run(request: web.Request) -> web.StreamResponse:
    form = await request.post()
    user = current_user(request)
    pid, eid, rid = request.match_info["project_id"], request.match_info["experiment_id"], request.match_info["run_id"]
    registry = request.app[MODEL_REGISTRY]
    name = str(form.get("model_name", "")).strip()
    await request.app[TRACKING].run(user, pid, rid, Role.WRITE)  # who may, before what they sent
    try:
        try:
            model = await registry.model(user, name, write=True)
        except NotFound:
            model = await registry.create_model(user, name)
        version = await registry.create_version(user, pid, model, run_id=rid, model_id=str(form.get("model_id", "")),
                                                model_path=str(form.get("model_path", "") or "model"))
    except AppError as exc:
        return await run_page(request, error=exc.message, status=exc.status)
    raise redirect(request, f"/registry/{model.public_id}", "ok", f"Registered version {version.version} of {model.name}.")


# The registry ------------------------------------------------------------------------------

async def registry_page(request: web.Request) -> web.StreamResponse:
    found, _ = await request.app[MODEL_REGISTRY].search_models(current_user(request), limit=500)
    return aiohttp_jinja2.render_template("registry.html", request, {"models": found})


async def registered_model_page(request: web.Request, *, error: str = "", status: int = 200) -> web.StreamResponse:
    user = current_user(request)
    registry = request.app[MODEL_REGISTRY]
    model = await registry.model(user, request.match_info["model_id"], by="id")
    versions, _ = await registry.versions(user, model=model, limit=500)
    writable, _ = await project_store.list_visible(request.app[POOL], user, ListQuery.first(200), include_public=False,
                                                  include_all=False)
    runs = {r["run_id"]: r for r in await request.app[POOL].fetch(
        "SELECT r.run_id, r.run_name, e.public_id AS experiment, p.public_id AS project FROM experiment_runs r"
        " JOIN experiments e ON e.id = r.experiment_id JOIN projects p ON p.id = e.project_id WHERE r.run_id = ANY($1::text[])",
        [v.run_id for v in versions])}
    context = {"model": model, "versions": versions, "runs": runs, "error": error,
               "projects": [p for p in writable if p.role >= Role.WRITE]}
    return aiohttp_jinja2.render_template("registered_model.html", request, context, status=status)


async def deploy_version(request: web.Request) -> web.StreamResponse:
    """Deploy a version: a model in the chosen project, built from the version and deployed."""
    form = await request.post()
    user = current_user(request)
    registry = request.app[MODEL_REGISTRY]
    try:
        model, version = await registry.version_by_id(user, request.match_info["version_id"])
        if model.public_id != request.match_info["model_id"]:
            raise NotFound("no such version of this model")
        pid = str(form.get("project_id", ""))
        if not pid:
            raise InvalidArgument("Choose the project to deploy the model in.")
        fields = {"name": str(form.get("name", "")).strip() or f"{model.name} v{version.version}",
                  "description": f"Registered model {model.name}, version {version.version}"}
        served, _, _ = await request.app[MODELS].create_model(user, pid, fields)
        build_fields: dict[str, Any] = {"registered_model_version_id": version.public_id, "auto_deploy_model": True,
                                        "auto_deployment_config": {"replicas": 1}}
        if form.get("runtime_identifier"):
            build_fields["runtime_identifier"] = str(form["runtime_identifier"])
        await request.app[MODELS].create_build(user, pid, served.public_id, build_fields)
    except AppError as exc:
        return await registered_model_page(request, error=exc.message, status=exc.status)
    raise redirect(request, f"/projects/{pid}/models/{served.public_id}", "ok",
                   f"Building {model.name} version {version.version}; it is deployed once built.")


def routes() -> list[web.RouteDef]:
    base = "/projects/{project_id}/experiments"
    one = base + "/{experiment_id:[a-z0-9-]+}"
    run = one + "/runs/{run_id:[0-9a-f]+}"
    return [
        web.get("/experiments", all_experiments_page, name="ui_all_experiments"),
        web.get(base, experiments_page, name="ui_experiments"),
        web.post(base, create_experiment, name="ui_experiment_create"),
        web.get(one, experiment_page, name="ui_experiment"),
        web.get(one + "/compare", compare_page, name="ui_experiment_compare"),
        web.get(run, run_page, name="ui_experiment_run"),
        web.post(run + "/register", register_from_run, name="ui_experiment_run_register"),
        web.get(run + "/artifacts/{path:.+}", download_artifact, name="ui_experiment_artifact"),
        web.get("/registry", registry_page, name="ui_registry"),
        web.get("/registry/{model_id:[a-z0-9-]+}", registered_model_page, name="ui_registered_model"),
        web.post("/registry/{model_id:[a-z0-9-]+}/versions/{version_id:[a-z0-9-]+}/deploy", deploy_version,
                 name="ui_registered_version_deploy"),
    ]
