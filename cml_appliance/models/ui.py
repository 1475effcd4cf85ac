"""Pages: a project's models (list, create with build and deploy) and one model (access key,
builds, deployments, replicas and their output, a test request)."""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime
from typing import Any

import aiohttp_jinja2
from aiohttp import web

from cml_appliance.api.listing import ListQuery
from cml_appliance.auth.permissions import Role
from cml_appliance.core.errors import (
    REFUSALS,
    AppError,
    InvalidArgument,
    NotFound,
)
from cml_appliance.builds.queue import ACTIVE as BUILD_ACTIVE
from cml_appliance.models import example_request, serving
from cml_appliance.models.service import Build, Deployment, Model
from cml_appliance.runtimes.ui import workload_choices
from cml_appliance.web.context import current_user, require_site_admin
from cml_appliance.web.keys import MODELS, POOL, SETTINGS, STATUS_HUB, WORKLOADS
from cml_appliance.web.templating import redirect
from cml_appliance.workloads import store as workload_store
from cml_appliance.workloads.store import Workload
from cml_appliance.workloads.streams import event_stream, logs_response

# When a function's code says nothing of the keys it reads.
EXAMPLE_REQUEST = '{\n  "feature": 1\n}'
MAX_DEPLOYMENTS_SHOWN = 50


def _deployment(row: Any) -> Deployment:
    return Deployment(**{f.name: row[f.name] for f in dataclasses.fields(Deployment)})


def _build(row: Any) -> Build:
    return Build(**{f.name: row[f.name] for f in dataclasses.fields(Build)})


def _build_fields(form: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {k: str(form.get(k, "")).strip() for k in ("file_path", "function_name", "comment")}
    if form.get("runtime_identifier"):
        fields["runtime_identifier"] = str(form["runtime_identifier"]).strip()
    return fields


def _deploy_fields(form: Any) -> dict[str, Any]:
    """Replicas and resources from a form, in the API's terms; empty cpu/memory take the profile's."""
    raw = str(form.get("replicas", "") or "1").strip()
    if not raw.isdigit():
        raise InvalidArgument("Replicas must be a whole number from 1 to 32.")
    fields: dict[str, Any] = {"replicas": int(raw)}
    profile = str(form.get("resource_profile_id", "")).strip()
    if profile:
        if not profile.isdigit():
            raise InvalidArgument("Choose a resource profile from the list.")
        fields["resource_profile_id"] = int(profile)
    for key in ("cpu", "memory"):
        value = str(form.get(key, "")).strip()
        if value:
            try:
                fields[key] = float(value)
            except ValueError:
                raise InvalidArgument(f"{key} must be a number ({'vCPU' if key == 'cpu' else 'GB'}).") from None
    return fields


# The models of a project -----------------------------------------------------------------------

async def models_page(request: web.Request, *, error: str = "", form: dict[str, Any] | None = None,
                      status: int = 200) -> web.StreamResponse:
    user = current_user(request)
    models = request.app[MODELS]
    pid = request.match_info["project_id"]
    project = await models.projects.get(user, pid, Role.READ)
    rows = await models.summaries(user, pid)
    context = {"project": project, "rows": rows, "error": error, "form": form,
               "can_write": project.role >= Role.WRITE} | await workload_choices(request)
    return aiohttp_jinja2.render_template("models.html", request, context, status=status)


async def create_model(request: web.Request) -> web.StreamResponse:
    user = current_user(request)
    models = request.app[MODELS]
    pid = request.match_info["project_id"]
    await models.projects.get(user, pid, Role.WRITE)  # refused before any form message
    form = await request.post()
    kept = {k: str(v) for k, v in form.items() if k != "csrf_token"}
    build_now = form.get("build_and_deploy") == "on"
    fields: dict[str, Any] = {"name": str(form.get("name", "")).strip(), "description": str(form.get("description", "")).strip(),
                              "disable_authentication": form.get("disable_authentication") == "on"}
    model: Model | None = None
    try:
        deploy = _deploy_fields(form) if build_now else {}
        build_fields = _build_fields(form)
        # What auto_build_model/auto_deploy_model do in ModelService.create_model, in two steps so
        # that a build or deployment that cannot work removes the model again: the form is then
        # shown with the reason and can simply be sent again.
        model, _, _ = await models.create_model(user, pid, fields)
        build = None
        if build_now:
            build = await models.create_build(user, pid, model.public_id,
                                              build_fields | {"auto_deploy_model": True, "auto_deployment_config": deploy})
            if build.status == "build failed":  # failed at once (its snapshot): the form comes back
                raise InvalidArgument(f"The build failed: {build.failure}.")
    except REFUSALS:
        raise
    except AppError as exc:
        if model is not None:
            await models.delete_model(user, pid, model.public_id)
        message = exc.message if model is None else f"{exc.message.rstrip('.')}. Nothing was created; correct the form and try again."
        return await models_page(request, error=message, form=kept, status=exc.status)
    text = f"Created model {model.name}" + ("; it is being built, and deploys once built." if build_now else ".")
    where = f"/projects/{pid}/models/{model.public_id}" + (f"?build={build.public_id}#build-output" if build else "")
    raise redirect(request, where, "ok", text)


# One model -------------------------------------------------------------------------------------

async def _deployments(request: web.Request, model: Model) -> list[dict[str, Any]]:
    """The model's deployments, newest first, with their build, status and replicas."""
    rows = await request.app[POOL].fetch(
        "SELECT d.*, b.public_id AS build_public_id FROM model_deployments d JOIN model_builds b ON b.id = d.build_id"
        " WHERE d.model_id = $1 ORDER BY d.created_at DESC, d.id DESC LIMIT $2", model.id, MAX_DEPLOYMENTS_SHOWN)
    found = []
    for row in rows:
        deployment = _deployment(row)
        replicas = await request.app[MODELS].replicas(deployment)
        found.append({"deployment": deployment, "build_id": row["build_public_id"], "replicas": replicas,
                      "status": await request.app[MODELS].status_of(deployment, replicas)})
    return found


async def model_page(request: web.Request) -> web.StreamResponse:
    user = current_user(request)
    models = request.app[MODELS]
    pid, mid = request.match_info["project_id"], request.match_info["model_id"]
    project, model = await models.get_model(user, pid, mid)
    _, builds, _ = await models.list_builds(user, pid, mid, ListQuery.first(500))
    deployments = await _deployments(request, model)
    # The active deployment: the newest that was not stopped (a failed one too, to read why).
    active = next((d for d in deployments if not d["deployment"].stopped), None)
    everyone = [r for d in deployments for r in d["replicas"]]
    wanted = request.query.get("replica", "")
    replica = next((r for r in everyone if r.public_id == wanted), None)
    if replica is None and active and active["replicas"]:
        replica = active["replicas"][0]
    # A build's log instead of a replica's: the one asked for, else one being made.
    shown_build = next((b for b in builds if b.public_id == request.query.get("build")), None)
    if shown_build is None and not wanted:
        shown_build = next((b for b in builds if b.active), None)
    # The test box starts from the keys the newest built function reads (the browser puts back
    # the last request that worked, when it has one).
    built = next((b for b in builds if b.status == "built"), None)
    example = example_request.for_build(models.builds_dir / built.public_id, built.file_path, built.function_name) if built else None
    shown = example or EXAMPLE_REQUEST
    context = {
        "project": project, "model": model, "builds": builds, "deployments": deployments, "active": active,
        "replica": replica if shown_build is None else None, "shown_build": shown_build,
        "can_write": project.role >= Role.WRITE, "example_request": shown,
        "example_from_code": example is not None, "example_function": built.function_name if built else "", "example_compact": json.dumps(json.loads(shown)),
        "base_url": request.app[SETTINGS].base_url,
    } | await workload_choices(request)
    return aiohttp_jinja2.render_template("model.html", request, context)


def _back(request: web.Request) -> str:
    return f"/projects/{request.match_info['project_id']}/models/{request.match_info['model_id']}"


async def regenerate_key(request: web.Request) -> web.StreamResponse:
    await request.app[MODELS].regenerate_key(current_user(request), request.match_info["project_id"], request.match_info["model_id"])
    raise redirect(request, _back(request), "ok", "A new access key was made; the old one no longer works.")


async def delete_model(request: web.Request) -> web.StreamResponse:
    pid = request.match_info["project_id"]
    await request.app[MODELS].delete_model(current_user(request), pid, request.match_info["model_id"])
    raise redirect(request, f"/projects/{pid}/models", "ok", "Model deleted.")


async def create_build(request: web.Request) -> web.StreamResponse:
    user = current_user(request)
    pid, mid = request.match_info["project_id"], request.match_info["model_id"]
    form = await request.post()
    try:
        fields = _build_fields(form)
        if form.get("deploy") == "on":
            fields |= {"auto_deploy_model": True, "auto_deployment_config": _deploy_fields(form)}
        build = await request.app[MODELS].create_build(user, pid, mid, fields)
    except REFUSALS:
        raise
    except AppError as exc:
        raise redirect(request, _back(request), "error", exc.message) from None
    where = f"/projects/{pid}/models/{mid}?build={build.public_id}#build-output"
    if build.status == "build failed":
        raise redirect(request, where, "error", f"Build {build.public_id} failed: {build.failure}")
    deployed = "; it deploys once built" if form.get("deploy") == "on" else ""
    raise redirect(request, where, "ok", f"Building {build.public_id}{deployed}. Its log follows below.")


async def admin_builds_page(request: web.Request) -> web.StreamResponse:
    """Site admins: every build queued or running, oldest first, with a way to cancel it."""
    require_site_admin(request)
    rows = await request.app[POOL].fetch(
        "SELECT b.public_id, b.status, b.attempts, b.created_at, m.public_id AS model_id, m.name AS model_name,"
        " p.public_id AS project_id, p.name AS project_name, ow.username AS owner, u.username AS creator"
        " FROM model_builds b JOIN models m ON m.id = b.model_id JOIN projects p ON p.id = m.project_id"
        " JOIN users ow ON ow.id = p.owner_id JOIN users u ON u.id = b.creator_id"
        " WHERE b.status = ANY($1::text[]) ORDER BY b.created_at, b.id", list(BUILD_ACTIVE))
    context = {"builds": rows, "now": datetime.now(UTC), "concurrency": request.app[SETTINGS].build_concurrency}
    return aiohttp_jinja2.render_template("admin_builds.html", request, context)


async def admin_cancel_build(request: web.Request) -> web.StreamResponse:
    require_site_admin(request)
    build_id = request.match_info["build_id"]
    if not await request.app[MODELS].queue.cancel(build_id):
        raise redirect(request, "/admin/builds", "error", f"Build {build_id} is not queued or running.")
    raise redirect(request, "/admin/builds", "ok", f"Build {build_id} cancelled.")


async def cancel_build(request: web.Request) -> web.StreamResponse:
    m = request.match_info
    await request.app[MODELS].cancel_build(current_user(request), m["project_id"], m["model_id"], m["build_id"])
    raise redirect(request, _back(request), "ok", f"Build {m['build_id']} cancelled.")


async def deploy_build(request: web.Request) -> web.StreamResponse:
    m = request.match_info
    form = await request.post()
    try:
        deployment = await request.app[MODELS].create_deployment(current_user(request), m["project_id"], m["model_id"],
                                                                 m["build_id"], _deploy_fields(form))
    except REFUSALS:
        raise
    except AppError as exc:
        raise redirect(request, _back(request), "error", exc.message) from None
    raise redirect(request, _back(request), "ok", f"Deploying build {m['build_id']} ({deployment.replicas} replica(s)).")


async def deployment_action(request: web.Request) -> web.StreamResponse:
    m = request.match_info
    models = request.app[MODELS]
    act = models.stop_deployment if m["action"] == "stop" else models.restart_deployment
    try:
        await act(current_user(request), m["project_id"], m["model_id"], m["build_id"], m["deployment_id"])
    except REFUSALS:
        raise
    except AppError as exc:
        raise redirect(request, _back(request), "error", exc.message) from None
    raise redirect(request, _back(request), "ok", "Stopping the deployment." if m["action"] == "stop" else "Restarting the deployment.")


# Replicas' output ------------------------------------------------------------------------------

async def _replica(request: web.Request) -> Workload:
    """A replica of this model, found only through a model the user may read."""
    user = current_user(request)
    _, model = await request.app[MODELS].get_model(user, request.match_info["project_id"], request.match_info["model_id"])
    replica = await workload_store.get(request.app[POOL], request.match_info["replica_id"])
    if replica is None or replica.kind != "model_replica" or replica.deployment_id is None or not await request.app[POOL].fetchval(
            "SELECT true FROM model_deployments WHERE id = $1 AND model_id = $2", replica.deployment_id, model.id):
        raise NotFound(f"replica {request.match_info['replica_id']!r} not found")
    return replica


async def replica_logs(request: web.Request) -> web.Response:
    return logs_response(request, request.app[WORKLOADS].logs, await _replica(request))


async def replica_events(request: web.Request) -> web.StreamResponse:
    replica = await _replica(request)
    return await event_stream(request, request.app[POOL], request.app[STATUS_HUB], request.app[WORKLOADS].logs, replica)


# The test request ------------------------------------------------------------------------------

async def test_request(request: web.Request) -> web.Response:
    """The page's test box: what POST /model answers, for the signed-in user.

    /model takes a Bearer API key for models with authentication, and the page holds only the
    sign-in cookie, so this route does the same with the cookie's user: it needs the read
    permission on the project, as /model asks of a key's user, and the form's CSRF token.
    """
    user = current_user(request)
    models = request.app[MODELS]
    try:
        _, model = await models.get_model(user, request.match_info["project_id"], request.match_info["model_id"])
    except AppError as exc:
        return serving.failure(exc.status, exc.message)
    form = await request.post()
    try:
        argument = json.loads(str(form.get("request", "")))
    except ValueError as exc:
        return serving.failure(400, f"the request is not valid JSON: {exc}")
    return await serving.call(request, model, argument)


def routes() -> list[web.RouteDef]:
    base = "/projects/{project_id}/models"
    model = base + "/{model_id:[a-z0-9-]+}"
    build = model + "/builds/{build_id:[a-z0-9-]+}"
    replica = model + "/replicas/{replica_id:[a-z0-9-]+}"
    return [
        web.get(base, models_page, name="ui_models"),
        web.post(base, create_model, name="ui_model_create"),
        web.get(model, model_page, name="ui_model"),
        web.post(model + "/regenerate-key", regenerate_key, name="ui_model_regenerate_key"),
        web.post(model + "/delete", delete_model, name="ui_model_delete"),
        web.post(model + "/test", test_request, name="ui_model_test"),
        web.post(model + "/builds", create_build, name="ui_model_build"),
        web.post(model + "/builds/{build_id}/cancel", cancel_build, name="ui_model_build_cancel"),
        web.get("/admin/builds", admin_builds_page, name="ui_admin_builds"),
        web.post("/admin/builds/{build_id}/cancel", admin_cancel_build, name="ui_admin_build_cancel"),
        web.post(build + "/deploy", deploy_build, name="ui_model_deploy"),
        web.post(build + "/deployments/{deployment_id:[a-z0-9-]+}/{action:stop|restart}", deployment_action,
                 name="ui_model_deployment_action"),
        web.get(replica + "/logs", replica_logs, name="ui_model_replica_logs"),
        web.get(replica + "/events", replica_events, name="ui_model_replica_events"),
    ]
