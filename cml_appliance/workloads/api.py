"""CML API v2's small listings about workloads and people: the workload types and statuses a
client may filter by, the names of the projects a user can see, and a user's short record."""

from __future__ import annotations

from aiohttp import web

from cml_appliance.api.common import list_query, page
from cml_appliance.auth.users import get_by_id
from cml_appliance.core.errors import InvalidArgument, NotFound
from cml_appliance.projects import store as project_store
from cml_appliance.web.context import current_user
from cml_appliance.web.keys import POOL, PROJECTS
from cml_appliance.workloads import states

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


def routes() -> list[web.RouteDef]:
    return [
        web.get("/api/v2/workloadtypes", list_workload_types, name="api_list_workload_types"),
        web.get("/api/v2/workloadstatus", list_workload_status, name="api_list_workload_status"),
        web.get("/api/v2/projectnames", list_project_names, name="api_list_project_names"),
        web.get("/api/v2/users/{user_id}", get_short_user, name="api_get_short_user"),
    ]
