"""CML API v2's listings about workloads and people: workload executions, usage (each workload,
and over time), the workload types and statuses a client may filter by, the names of the
projects a user can see, and a user's short record."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import asyncpg
from aiohttp import web

from cml_appliance.api.common import list_query, page
from cml_appliance.api.listing import next_page_token, sql_where_and_order
from cml_appliance.core.timefmt import parse_rfc3339, rfc3339
from cml_appliance.auth.users import get_by_id
from cml_appliance.core.errors import InvalidArgument, NotFound
from cml_appliance.projects import store as project_store
from cml_appliance.web.context import current_user
from cml_appliance.web.keys import POOL, PROJECTS, SETTINGS
from cml_appliance.workloads import states, usage

# What CML calls the kinds of workload (WorkloadDetails.workload_type).
WORKLOAD_TYPES = ("session", "job", "application", "model")


async def list_workload_types(request: web.Request) -> web.Response:
    current_user(request)
    return web.json_response({"workload_type": list(WORKLOAD_TYPES)})


async def list_workload_status(request: web.Request) -> web.Response:
    current_user(request)
    return web.json_response({"workload_status": [*states.ACTIVE, *states.FINISHED]})


async def list_project_names(request: web.Request) -> web.Response:
    """The names of the projects the caller can see (as ListProjects would list them)."""
    user = current_user(request)
    q = list_query(request, {"name": project_store.FILTER_KEYS["name"]}, {"name": project_store.SORT_KEYS["name"]})
    items, more = await request.app[PROJECTS].list_projects(user, q, include_public=False, include_all=False)
    return page(request, "project_names", [p.name for p in items], q, more)


# Users who share a project with $1 (as its owner or a collaborator): those it may look up.
_SHARES_A_PROJECT = """
SELECT EXISTS (
  SELECT 1 FROM projects p
  WHERE (p.owner_id = $1 OR EXISTS (SELECT 1 FROM project_collaborators c WHERE c.project_id = p.id AND c.user_id = $1))
    AND (p.owner_id = $2 OR EXISTS (SELECT 1 FROM project_collaborators c WHERE c.project_id = p.id AND c.user_id = $2)))
"""


async def get_short_user(request: web.Request) -> web.Response:
    """A user's name and e-mail by their id: for themselves, site admins, and the people they
    share a project with; to anyone else the user does not exist (no enumerating e-mails)."""
    caller = current_user(request)
    raw = request.match_info["user_id"]
    if not raw.isdigit() or len(raw) > 18:
        raise InvalidArgument(f"user_id is a whole number, got {raw!r}")
    pool = request.app[POOL]
    found = await get_by_id(pool, int(raw))
    visible = found is not None and (found.id == caller.id or caller.is_admin
                                     or await pool.fetchval(_SHARES_A_PROJECT, caller.id, found.id))
    if not visible:
        raise NotFound(f"no user with id {raw}")
    return web.json_response(found.short())


# ListWorkloadExecutions -------------------------------------------------------------------
#
# An execution is a workload row (a session, a job run, an application's run, a model replica);
# its workload is the session itself, the job, the application or the model. CML names both by
# CRN; the appliance's are crn:cml-appliance:<site>:<type>:<id>, stable and unique on the site.

_EXECUTIONS = """
SELECT w.*, p.id AS project_pk, p.public_id AS project_public_id, p.name AS project_name,
       pc.username AS project_creator, po.id AS owner_pk, po.username AS owner_username, u.username AS run_as,
       CASE w.kind WHEN 'session' THEN 'session' WHEN 'job_run' THEN 'job' WHEN 'application' THEN 'application'
                   ELSE 'model' END AS workload_type,
       CASE w.kind WHEN 'session' THEN w.public_id WHEN 'job_run' THEN j.public_id WHEN 'application' THEN a.public_id
                   ELSE m.public_id END AS workload_public_id,
       CASE w.kind WHEN 'session' THEN w.name WHEN 'job_run' THEN j.name WHEN 'application' THEN a.name
                   ELSE m.name END AS workload_name,
       CASE w.kind WHEN 'session' THEN w.created_at WHEN 'job_run' THEN j.created_at WHEN 'application' THEN a.created_at
                   ELSE m.created_at END AS workload_created_at,
       wc.username AS workload_creator,
       coalesce(w.running_at, w.starting_at, w.created_at) AS start_time, w.finished_at AS end_time,
       rt.description AS rt_description, rt.editor AS rt_editor, rt.edition AS rt_edition, rt.kernel AS rt_kernel,
       rt.full_version AS rt_full_version, d.replicas AS requested_replicas
FROM workloads w
JOIN projects p ON p.id = w.project_id
JOIN users pc ON pc.id = p.creator_id
JOIN users po ON po.id = p.owner_id
JOIN users u ON u.id = w.creator_id
LEFT JOIN jobs j ON j.id = w.job_id
LEFT JOIN applications a ON a.id = w.application_id
LEFT JOIN model_deployments d ON d.id = w.deployment_id
LEFT JOIN models m ON m.id = d.model_id
LEFT JOIN users wc ON wc.id = CASE w.kind WHEN 'session' THEN w.creator_id WHEN 'job_run' THEN j.creator_id
                                          WHEN 'application' THEN a.creator_id ELSE m.creator_id END
LEFT JOIN runtimes rt ON rt.image_identifier = w.runtime_identifier
"""
_EXECUTION_FILTERS = {"status": "w.status"}
_EXECUTION_SORTS = {"start_time": "coalesce(w.running_at, w.starting_at, w.created_at)", "end_time": "w.finished_at",
                    "status": "w.status"}
_TIME_COLUMNS = _EXECUTION_SORTS
_FAILED = (states.FAILED, states.TIMEDOUT)
_WORKLOAD_TYPE = ("CASE w.kind WHEN 'session' THEN 'session' WHEN 'job_run' THEN 'job' WHEN 'application' THEN 'application' "
                  "ELSE 'model' END")


def _json_object(raw: str, name: str, example: str) -> dict[str, Any]:
    """A query parameter that holds a JSON object ({} when absent), or a 400 that shows its form."""
    if not raw:
        return {}
    try:
        parsed = json.loads(raw)
    except (json.JSONDecodeError, RecursionError):
        parsed = None
    if not isinstance(parsed, dict):
        raise InvalidArgument(f"{name} is a JSON object such as {example}")
    return parsed


def _time_bounds(ranges: dict[str, Any], columns: dict[str, str], name: str, args: list[Any]) -> list[str]:
    """{"<key>": {"min": <time>, "max": <time>}} as SQL conditions on columns[key]; times in RFC 3339
    or CML's "2023-12-11 21:06:51" (UTC)."""
    conditions = []
    for key, bounds in ranges.items():
        if key not in columns:
            raise InvalidArgument(f"{name} key {key!r} is not supported; use {', '.join(columns)}")
        if not isinstance(bounds, dict) or set(bounds) - {"min", "max"}:
            raise InvalidArgument(f"{name} {key} takes an object with min and max")
        for bound, operator in (("min", ">="), ("max", "<=")):
            if bound not in bounds:
                continue
            text = str(bounds[bound]).strip().replace(" ", "T", 1)
            try:
                args.append(parse_rfc3339(text if text.endswith("Z") or "+" in text[10:] else text + "Z"))
            except ValueError as exc:
                raise InvalidArgument(f"{name} {key}.{bound}: {exc}") from None
            conditions.append(f"{columns[key]} {operator} ${len(args)}")
    return conditions


def _crn(site: str, kind: str, public_id: str) -> str:
    return f"crn:cml-appliance:{site}:{kind}:{public_id}"


def _time_ranges(raw: str, args: list[Any]) -> list[str]:
    """time_range_search_filter={"start_time":{"min":"…","max":"…"},"end_time":{…}}."""
    ranges = _json_object(raw, "time_range_search_filter", '{"start_time":{"min":"2024-04-11T21:55:28Z"}}')
    return _time_bounds(ranges, {k: _TIME_COLUMNS[k] for k in ("start_time", "end_time")}, "time_range_search_filter", args)


def _crn_filter(raw: str, args: list[Any], site: str) -> list[str]:
    """multi_column_search_filter={"workload_crn":"<part of a workload's CRN>"}."""
    parsed = _json_object(raw, "multi_column_search_filter", '{"workload_crn": "<text>"}')
    if set(parsed) - {"workload_crn"} or not all(isinstance(v, str) for v in parsed.values()):
        raise InvalidArgument('multi_column_search_filter takes {"workload_crn": "<text>"}')
    if "workload_crn" not in parsed:
        return []
    args.append(parsed["workload_crn"])
    crn = (f"'crn:cml-appliance:' || {_site_literal(site)} || ':' || CASE w.kind WHEN 'session' THEN 'session' WHEN 'job_run' THEN 'job' "
           "WHEN 'application' THEN 'application' ELSE 'model' END || ':' || coalesce(CASE w.kind WHEN 'session' THEN w.public_id "
           "WHEN 'job_run' THEN j.public_id WHEN 'application' THEN a.public_id ELSE m.public_id END, '')")
    return [f"strpos({crn}, ${len(args)}) > 0"]


def _site_literal(site: str) -> str:
    return "'" + site.replace("'", "''") + "'"


def _execution(row: asyncpg.Record, site: str, workload_crn: str) -> dict[str, Any]:
    handle = row["handle"] or ""
    out: dict[str, Any] = {
        "workload_crn": workload_crn, "workload_execution_crn": _crn(site, "execution", row["public_id"]),
        "parent_workload_execution_crn": "", "pod_name": handle.partition("/")[2] if row["engine"] == "kubernetes" else "",
        "start_time": rfc3339(row["start_time"]), "allocated_cpu_cores": row["cpu"], "allocated_memory_gb": row["memory"],
        "allocated_gpu_cores": float(row["nvidia_gpu"]), "status": row["status"],
        "failure_reason": row["reason"] if row["status"] in _FAILED else "",
        "run_as_user_crn": _crn(site, "user", row["run_as"]), "run_as_user_name": row["run_as"],
        "runtime": {"description": row["rt_description"] or "", "editor": row["rt_editor"] or "",
                    "edition": row["rt_edition"] or "", "kernel": row["rt_kernel"] or "",
                    "full_version": row["rt_full_version"] or ""},
        "spark_event_log_dir": "", "requested_replicas": row["requested_replicas"] or 0,
    }
    if row["end_time"] is not None:
        out["end_time"] = rfc3339(row["end_time"])
    return out


def _workload(row: asyncpg.Record, site: str, workload_crn: str) -> dict[str, Any]:
    created: datetime = row["workload_created_at"] or row["created_at"]
    return {
        "workload_crn": workload_crn, "workload_name": row["workload_name"] or "", "workload_type": row["workload_type"],
        "create_time": rfc3339(created), "creator_user_crn": _crn(site, "user", row["workload_creator"] or ""),
        "creator_user_name": row["workload_creator"] or "",
        "project": {"id": row["project_pk"], "crn": _crn(site, "project", row["project_public_id"]), "name": row["project_name"],
                    "created_by_crn": _crn(site, "user", row["project_creator"]), "created_by_name": row["project_creator"],
                    "owner": {"id": row["owner_pk"], "crn": _crn(site, "user", row["owner_username"]),
                              "name": row["owner_username"], "is_team": False}},
        "deleted": row["workload_public_id"] is None,
    }


async def list_workload_executions(request: web.Request) -> web.Response:
    """Every execution the caller may see (a site admin: the site's; others: those of the
    projects they can read), with the workloads they belong to; one page of executions."""
    user = current_user(request)
    q = list_query(request, _EXECUTION_FILTERS, _EXECUTION_SORTS)
    pool = request.app[POOL]
    site = str(await pool.fetchval("SELECT site_id FROM site"))
    args: list[Any] = []
    where, order = sql_where_and_order(q, _EXECUTION_FILTERS, _EXECUTION_SORTS, "w.created_at DESC, w.id DESC", args)
    conditions = [where, *_time_ranges(request.query.get("time_range_search_filter", ""), args),
                  *_crn_filter(request.query.get("multi_column_search_filter", ""), args, site)]
    if not user.is_admin:
        args.append(await project_store.visible_ids(pool, user))
        conditions.append(f"w.project_id = ANY(${len(args)}::bigint[])")
    args += [q.page_size + 1, q.offset]
    rows = await pool.fetch(f"{_EXECUTIONS} WHERE {' AND '.join(conditions)} ORDER BY {order}"
                            f" LIMIT ${len(args) - 1} OFFSET ${len(args)}", *args)
    executions, workloads = [], {}
    for row in rows[: q.page_size]:
        # A job, application or model deleted since: its executions stay, under a CRN of their own.
        crn = _crn(site, row["workload_type"], row["workload_public_id"] or f"deleted-{row['public_id']}")
        executions.append(_execution(row, site, crn))
        workloads.setdefault(crn, _workload(row, site, crn))
    token = next_page_token(q, request.app[SETTINGS].secret_key, len(rows) > q.page_size)
    return web.json_response({"workloads": list(workloads.values()), "executions": executions, "next_page_token": token})


# ListUsage ----------------------------------------------------------------------------------
#
# One row per workload (CML's usage view): who ran what, where, with what resources, for how long.
# "group" is the team that owns the project, if a team does.

_USAGE = """
SELECT w.*, p.id AS project_pk, p.name AS project_name, p.slug AS project_slug, p.public_id AS project_public_id,
       ow.username AS owner_username, ow.id AS owner_pk, ow.is_team AS owner_is_team, ow.name AS owner_name,
       u.username AS creator_username, u.name AS creator_name, u.id AS creator_pk,
       CASE w.kind WHEN 'session' THEN 'session' WHEN 'job_run' THEN 'job' WHEN 'application' THEN 'application'
                   ELSE 'model' END AS workload_type
FROM workloads w
JOIN projects p ON p.id = w.project_id
JOIN users ow ON ow.id = p.owner_id
JOIN users u ON u.id = w.creator_id
"""
_USAGE_FILTERS = {"name": "w.name", "creator": "u.username", "group": "CASE WHEN ow.is_team THEN ow.username ELSE '' END",
                  "project_name": "p.name", "workload_type": _WORKLOAD_TYPE, "status": "w.status"}
_USAGE_SORTS = _USAGE_FILTERS | {"cpu": "w.cpu", "memory": "w.memory", "nvidia_gpu": "w.nvidia_gpu", "created_at": "w.created_at"}


def _usage_time_range(raw: str, args: list[Any]) -> list[str]:
    """time_range_search_filter={"created_time":{"min":"2023-12-11 21:06:51","max":"…"}}."""
    ranges = _json_object(raw, "time_range_search_filter", '{"created_time":{"min":"2023-12-11 21:06:51"}}')
    return _time_bounds(ranges, {"created_time": "w.created_at"}, "time_range_search_filter", args)


def _name_filter(raw: str, args: list[Any]) -> list[str]:
    """multi_column_search_filter={"project_or_workload_name":"churn"}."""
    parsed = _json_object(raw, "multi_column_search_filter", '{"project_or_workload_name": "<text>"}')
    if set(parsed) - {"project_or_workload_name"} or not all(isinstance(v, str) for v in parsed.values()):
        raise InvalidArgument('multi_column_search_filter takes {"project_or_workload_name": "<text>"}')
    if not parsed:
        return []
    args.append(parsed["project_or_workload_name"])
    return [f"(strpos(lower(p.name), lower(${len(args)})) > 0 OR strpos(lower(w.name), lower(${len(args)})) > 0)"]


def _usage(row: asyncpg.Record, base: str) -> dict[str, Any]:
    end = row["finished_at"] or datetime.now(row["created_at"].tzinfo)
    begun = row["running_at"] or row["starting_at"]
    seconds = int((end - begun).total_seconds()) if begun else 0
    out: dict[str, Any] = {
        "id": row["public_id"], "name": row["name"], "creator": row["creator_username"],
        "group": row["owner_username"] if row["owner_is_team"] else "", "project_name": row["project_name"],
        "cpu": row["cpu"], "memory": row["memory"], "nvidia_gpu": float(row["nvidia_gpu"]),
        "workload_type": row["workload_type"], "created_at": rfc3339(row["created_at"]), "duration": str(max(seconds, 0)),
        "status": row["status"], "message": row["reason"] or "",
        "oom_killed": "OOM" in (row["reason"] or "") or "out of memory" in (row["reason"] or "").lower(),
        "creator_info": {"id": row["creator_pk"], "name": row["creator_name"], "user_name": row["creator_username"]},
        "project_info": {"id": row["project_pk"], "slug": row["project_slug"],
                         "html_url": f"{base}/projects/{row['project_public_id']}"},
        "workload_url": f"{base}/projects/{row['project_public_id']}",
    }
    if row["owner_is_team"]:
        out["group_info"] = {"id": row["owner_pk"], "name": row["owner_name"], "user_name": row["owner_username"]}
    if row["engine"] == "kubernetes":
        out["k8s_info"] = {"k8s_exit_code": row["exit_code"] or 0, "k8s_reason": row["reason"] or "", "k8s_message": "",
                           "k8s_signal": ""}
    return out


async def list_usage(request: web.Request) -> web.Response:
    """Every workload and what it took, for site admins (CML's usage page); others see their own."""
    user = current_user(request)
    q = list_query(request, _USAGE_FILTERS, _USAGE_SORTS)
    args: list[Any] = []
    where, order = sql_where_and_order(q, _USAGE_FILTERS, _USAGE_SORTS, "w.created_at DESC, w.id DESC", args)
    conditions = [where, *_usage_time_range(request.query.get("time_range_search_filter", ""), args),
                  *_name_filter(request.query.get("multi_column_search_filter", ""), args)]
    conditions += usage_scope(user, args)
    pool = request.app[POOL]
    total = int(await pool.fetchval(f"SELECT count(*) FROM ({_USAGE} WHERE {' AND '.join(conditions)}) t", *args))
    args += [q.page_size + 1, q.offset]
    rows = await pool.fetch(f"{_USAGE} WHERE {' AND '.join(conditions)} ORDER BY {order}"
                            f" LIMIT ${len(args) - 1} OFFSET ${len(args)}", *args)
    base = request.app[SETTINGS].base_url
    token = next_page_token(q, request.app[SETTINGS].secret_key, len(rows) > q.page_size)
    return web.json_response({"usage_response": [_usage(r, base) for r in rows[: q.page_size]],
                              "total_count": str(total), "next_page_token": token})


def usage_scope(user: Any, args: list[Any]) -> list[str]:
    """Site admins see every workload's usage, others their own."""
    if user.is_admin and user.scope_project_id is None:
        return []
    args.append(user.id)
    return [f"w.creator_id = ${len(args)}"]


def _window(raw: str) -> usage.Window:
    """The window of time_range_search_filter={"created_time":{"min":…,"max":…}} (the last day by default)."""
    ranges = _json_object(raw, "time_range_search_filter", '{"created_time":{"min":"2023-12-11 21:06:51"}}')
    if set(ranges) - {"created_time"}:
        raise InvalidArgument("time_range_search_filter takes created_time only")
    bounds = ranges.get("created_time") or {}
    if not isinstance(bounds, dict) or set(bounds) - {"min", "max"}:
        raise InvalidArgument("time_range_search_filter created_time takes an object with min and max")
    found: dict[str, datetime] = {}
    for bound in ("min", "max"):
        if bound in bounds:
            text = str(bounds[bound]).strip().replace(" ", "T", 1)
            try:
                found[bound] = parse_rfc3339(text if text.endswith("Z") or "+" in text[10:] else text + "Z")
            except ValueError as exc:
                raise InvalidArgument(f"time_range_search_filter created_time.{bound}: {exc}") from None
    return usage.Window.of(found.get("min"), found.get("max"), datetime.now(UTC))


async def get_time_series(request: web.Request) -> web.Response:
    """How much CPU (millicores), memory (MB) or GPU the workloads matching the filters held over a
    window, as averages per interval (workloads/usage.py)."""
    user = current_user(request)
    q = list_query(request, _USAGE_FILTERS, {})
    args: list[Any] = []
    where, _ = sql_where_and_order(q, _USAGE_FILTERS, {}, "w.id", args)
    conditions = [where, *_name_filter(request.query.get("multi_column_search_filter", ""), args), *usage_scope(user, args)]
    series_type = request.query.get("series_type") or "cpu"
    window = _window(request.query.get("time_range_search_filter", ""))
    points = await usage.time_series(request.app[POOL], series_type, window, conditions, args)
    return web.json_response({"series_type": series_type, "next_page_token": "", "result": {
        "values": [{"time_stamp": str(at), "count": str(round(value))} for at, value in points]}})


def routes() -> list[web.RouteDef]:
    return [
        web.get("/api/v2/usage", list_usage, name="api_list_usage"),
        web.get("/api/v2/ts_data", get_time_series, name="api_get_time_series"),
        web.get("/api/v2/workloads/executions", list_workload_executions, name="api_list_workload_executions"),
        web.get("/api/v2/workloadtypes", list_workload_types, name="api_list_workload_types"),
        web.get("/api/v2/workloadstatus", list_workload_status, name="api_list_workload_status"),
        web.get("/api/v2/projectnames", list_project_names, name="api_list_project_names"),
        web.get("/api/v2/users/{user_id}", get_short_user, name="api_get_short_user"),
    ]
