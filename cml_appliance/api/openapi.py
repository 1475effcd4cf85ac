"""The appliance's own OpenAPI description: the API routes CML's API v2 swagger does not have
(sessions, workload logs and live events, the terminal's transcript, a model's new access key,
CDSW's v1 job start, the model endpoint), served at GET /api/v2/openapi.json.

CML's own operations are described by CML's swagger (tests/data/cml-api-v2.swagger.json); between
them, the two documents describe every API route, which tests/integration/test_openapi.py checks
against the router. The fuzz test drives both with response validation on.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from cml_appliance.workloads.states import ACTIVE, FINISHED

JSON = "application/json"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _path_param(name: str, description: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "description": description, "schema": {"type": "string"}}


PROJECT = _path_param("project_id", "the project's id")
SESSION = _path_param("session_id", "the session's id")
JOB = _path_param("job_id", "the job's id")
RUN = _path_param("run_id", "the run's id")
APP = _path_param("app_id", "the application's id")
MODEL = _path_param("model_id", "the model's id")
TEAM = _path_param("team_name", "the team's username")
USERNAME = _path_param("username", "a user's username")
PAGE = [
    {"name": "page_size", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 1000}},
    {"name": "page_token", "in": "query", "schema": {"type": "string"}},
]
LOG_QUERY = [
    {"name": "offset", "in": "query", "description": "the byte to read from (next_offset of the last chunk)",
     "schema": {"type": "integer", "minimum": 0}},
    {"name": "limit", "in": "query", "description": "at most this many bytes (1 MiB at most)",
     "schema": {"type": "integer", "minimum": 1}},
]
EVENTS_QUERY = [{"name": "offset", "in": "query", "description": "the log byte to start from (Last-Event-ID wins)",
                 "schema": {"type": "integer", "minimum": 0}}]

ERRORS = {
    status: {"description": why, "content": {JSON: {"schema": _ref("Error")}}}
    for status, why in (("400", "the request is not valid"), ("401", "no valid API key"),
                        ("403", "the caller may not do that"), ("404", "not found, or not visible to the caller"),
                        ("409", "conflicts with what is there"), ("503", "the database is away for a moment"))
}


def _json(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"200": {"description": description, "content": {JSON: {"schema": schema}}}, **ERRORS}


def _op(operation_id: str, summary: str, parameters: list[dict[str, Any]], responses: dict[str, Any],
        body: dict[str, Any] | None = None, security: list[dict[str, list[str]]] | None = None) -> dict[str, Any]:
    op: dict[str, Any] = {"operationId": operation_id, "summary": summary, "parameters": parameters, "responses": responses}
    if body is not None:
        op["requestBody"] = {"required": True, "content": {JSON: {"schema": body}}}
    if security is not None:
        op["security"] = security
    return op


def _logs(operation_id: str, what: str, params: list[dict[str, Any]]) -> dict[str, Any]:
    return {"get": _op(operation_id, f"The output of {what}, from a byte offset", params + LOG_QUERY,
                       _json("a chunk of output and where to continue", _ref("LogChunk")))}


def _events(operation_id: str, what: str, params: list[dict[str, Any]]) -> dict[str, Any]:
    stream = {"200": {"description": "server-sent events: `status` (the workload, JSON), `log` (text, id = byte "
                                     "offset), `end`", "content": {"text/event-stream": {"schema": _ref("Event")}}},
              **ERRORS}
    return {"get": _op(operation_id, f"Live status and output of {what}", params + EVENTS_QUERY, stream)}


SCHEMAS: dict[str, Any] = {
    "Quota": {
        "type": "object", "description": "vCPU, memory in GB and GPUs, as strings (CML's Quota); empty: no limit",
        "properties": {k: {"type": "string"} for k in ("cpu", "memory", "nvidia_gpu")},
    },
    "Team": {
        "type": "object", "description": "CML's Team, with what a local team has",
        "properties": {k: {"type": "string"} for k in ("id", "username", "type", "name", "bio", "email", "joined_on",
                                                       "members", "private_projects")}
        | {"admin": {"type": "boolean"}, "business_user": {"type": "boolean"}},
    },
    "TeamMember": {
        "type": "object", "properties": {"id": {"type": "integer"}, "username": {"type": "string"},
                                         "name": {"type": "string"}, "permission": {"type": "string"}},
    },
    "Error": {
        "type": "object", "required": ["error", "code", "message"],
        "properties": {"error": {"type": "string"}, "code": {"type": "integer"}, "message": {"type": "string"},
                       "details": {"type": "array", "items": {}}},
    },
    "Workload": {
        "type": "object", "description": "A session (and the shape of every workload's status event).",
        "required": ["id", "project_id", "status", "engine"],
        "properties": {
            "id": {"type": "string"}, "project_id": {"type": "string"}, "name": {"type": "string"},
            "status": {"type": "string", "enum": [*ACTIVE, *FINISHED]},
            "reason": {"type": "string"}, "exit_code": {"type": "integer", "nullable": True},
            "engine": {"type": "string", "enum": ["local", "container", "kubernetes"]},
            "namespace": {"type": "string", "description": "Kubernetes: the namespace of the workload's pod"},
            "node": {"type": "string", "description": "Kubernetes: the node its pod runs on"},
            "runtime_identifier": {"type": "string"},
            "cpu": {"type": "number"}, "memory": {"type": "number"}, "nvidia_gpu": {"type": "integer"},
            "environment": {"type": "string", "description": "a JSON object of strings, as CML sends environments"},
            "creator": {"type": "object", "properties": {"username": {"type": "string"}, "name": {"type": "string"},
                                                         "email": {"type": "string"}}},
            "created_at": {"type": "string", "format": "date-time"},
            "scheduling_at": {"type": "string", "format": "date-time"},
            "starting_at": {"type": "string", "format": "date-time"},
            "running_at": {"type": "string", "format": "date-time"},
            "finished_at": {"type": "string", "format": "date-time"},
            "idle_timeout_minutes": {"type": "number"}, "max_duration_minutes": {"type": "number"},
        },
    },
    "Event": {
        "type": "object", "description": "one server-sent event", "required": ["event", "data"],
        "properties": {"event": {"type": "string", "enum": ["status", "log", "end"]}, "data": {"type": "string"},
                       "id": {"type": "string"}},
    },
    "ListSessionsResponse": {
        "type": "object", "required": ["sessions", "next_page_token"],
        "properties": {"sessions": {"type": "array", "items": _ref("Workload")}, "next_page_token": {"type": "string"}},
    },
    "StartSessionRequest": {
        "type": "object", "additionalProperties": False,
        "properties": {
            "name": {"type": "string"}, "runtime_identifier": {"type": "string"},
            "cpu": {"type": "number"}, "memory": {"type": "number"}, "nvidia_gpu": {"type": "integer"},
            "environment": {"type": "object", "additionalProperties": {"type": "string"}},
            "resource_profile_id": {"type": "integer"}, "project_id": {"type": "string"},
            "accelerator_label_id": {"type": "string", "format": "int64",
                                     "description": "GPUs of this accelerator (GET /api/v2/nodelabels)"},
            "runtime_addon_identifiers": {"type": "array", "items": {"type": "string"},
                                          "description": "add-ons shown read-only at /runtime-addons/<identifier>"},
        },
    },
    "LogChunk": {
        "type": "object", "required": ["offset", "next_offset", "size", "content", "status", "complete"],
        "properties": {
            "offset": {"type": "string", "format": "int64"}, "next_offset": {"type": "string", "format": "int64"},
            "size": {"type": "string", "format": "int64"}, "content": {"type": "string"},
            "status": {"type": "string"}, "complete": {"type": "boolean"},
        },
    },
    "FileInfo": {
        "type": "object",
        "properties": {"path": {"type": "string"}, "is_dir": {"type": "boolean"},
                       "file_size": {"type": "string", "format": "int64"}},
    },
    "ListProjectFilesResponse": {
        "type": "object", "required": ["files"], "properties": {"files": {"type": "array", "items": _ref("FileInfo")}},
    },
    "Model": {
        "type": "object", "description": "CML's Model (see its swagger), with the new access key",
        "required": ["id", "access_key"], "properties": {"id": {"type": "string"}, "access_key": {"type": "string"}},
    },
    "ModelBuild": {
        "type": "object", "description": "CML's ModelBuild (see its swagger), with the fields the appliance adds",
        "required": ["id", "status"],
        "properties": {"id": {"type": "string"}, "status": {"type": "string"}, "built_image": {"type": "string"},
                       "failure_reason": {"type": "string"}, "snapshot_commit": {"type": "string"}},
    },
    "StartJobV1Request": {
        "type": "object",
        "properties": {"environment": {"type": "object", "additionalProperties": {"type": "string"}},
                       "arguments": {"type": "string"}},
    },
    "StartJobV1Response": {"type": "object", "required": ["engine_id"], "properties": {"engine_id": {"type": "string"}}},
    "ModelCall": {
        "type": "object", "required": ["accessKey", "request"],
        "properties": {"accessKey": {"type": "string"}, "request": {}},
    },
    "ModelAnswer": {
        "type": "object", "required": ["success"],
        "properties": {"success": {"type": "boolean"}, "response": {}, "ReplicaID": {"type": "string"},
                       "error": {"type": "object", "required": ["message"], "properties": {"message": {"type": "string"}}}},
    },
}


def _model_call(operation_id: str) -> dict[str, Any]:
    answer = {"description": "the model function's answer, or why there is none",
              "content": {JSON: {"schema": _ref("ModelAnswer")}}}
    responses = {status: answer for status in ("200", "400", "401", "403", "404", "413", "429", "502", "503", "504")}
    return {"post": _op(operation_id, "Call a deployed model (its access key in the body; a Bearer key when it asks)",
                        [], responses, _ref("ModelCall"), security=[{}, {"bearer": []}])}


def document() -> dict[str, Any]:
    sessions = "/api/v2/projects/{project_id}/sessions"
    session = sessions + "/{session_id}"
    run = "/api/v2/projects/{project_id}/jobs/{job_id}/runs/{run_id}"
    app = "/api/v2/projects/{project_id}/applications/{app_id}"
    build = "/api/v2/projects/{project_id}/models/{model_id}/builds/{build_id}"
    build_params = [PROJECT, MODEL, _path_param("build_id", "the build's id")]
    v1_start = _op("StartJobV1", "Start a job run, as CDSW's v1 API did (HTTP Basic: the API key as user name)",
                   [_path_param("owner", "the project owner's user name"), _path_param("slug", "the project's slug"), JOB],
                   _json("the run started", _ref("StartJobV1Response")), _ref("StartJobV1Request"),
                   security=[{"basic": []}, {"bearer": []}])
    paths: dict[str, Any] = {
        "/api/v2/sessions": {"get": _op("ListMySessions", "The caller's sessions, in every project", PAGE,
                                        _json("sessions, newest first", _ref("ListSessionsResponse")))},
        sessions: {
            "get": _op("ListSessions", "A project's sessions", [PROJECT, *PAGE,
                       {"name": "status", "in": "query", "schema": {"type": "string"}}],
                       _json("sessions, newest first", _ref("ListSessionsResponse"))),
            "post": _op("StartSession", "Start a session", [PROJECT], _json("the session, starting", _ref("Workload")),
                        _ref("StartSessionRequest")),
        },
        session: {"get": _op("GetSession", "One session", [PROJECT, SESSION], _json("the session", _ref("Workload")))},
        session + ":stop": {"post": _op("StopSession", "Stop a session", [PROJECT, SESSION],
                                        _json("the session, stopping or stopped", _ref("Workload")))},
        session + "/logs": _logs("GetSessionLogs", "a session", [PROJECT, SESSION]),
        session + "/events": _events("WatchSession", "a session", [PROJECT, SESSION]),
        session + "/terminal/transcript": {"get": _op(
            "GetTerminalTranscript", "The last bytes the session's terminal showed (for its owner or a project admin)",
            [PROJECT, SESSION], {"200": {"description": "raw terminal bytes",
                                         "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}},
                                 **ERRORS})},
        run + "/logs": _logs("GetJobRunLogs", "a job run", [PROJECT, JOB, RUN]),
        run + "/events": _events("WatchJobRun", "a job run", [PROJECT, JOB, RUN]),
        app + "/logs": _logs("GetApplicationLogs", "an application's current start", [PROJECT, APP]),
        app + "/events": _events("WatchApplication", "an application's current start", [PROJECT, APP]),
        build + ":cancel": {"post": _op("CancelModelBuild", "Stop a queued or running build (it ends 'build failed', "
                                        "reason 'cancelled')", build_params, _json("the build", _ref("ModelBuild")))},
        build + "/logs": _logs("GetModelBuildLogs", "a model build (its progress lines)", build_params),
        build + "/events": _events("WatchModelBuild", "a model build", build_params),
        "/api/v2/projects/{project_id}/files": {"get": _op(
            "ListProjectRootFiles", "The files at the top of a project (CML's ListProjectFiles with an empty path)",
            [PROJECT], _json("files and folders", _ref("ListProjectFilesResponse")))},
        "/api/v2/projects/{project_id}/models/{model_id}:regenerateAccessKey": {"post": _op(
            "RegenerateModelAccessKey", "A new access key for a model; the old one stops working at once",
            [PROJECT, MODEL], _json("the model with its new key", _ref("Model")))},
        "/api/v1/projects/{owner}/{slug}/jobs/{job_id}/start": {"post": v1_start},
        "/api/v2/projects/{owner}/{slug}/jobs/{job_id}/start": {"post": {**v1_start, "operationId": "StartJobV1V2Path"}},
        "/api/v2/openapi.json": {"get": _op("GetOpenAPI", "This document", [],
                                            {"200": {"description": "OpenAPI 3.0", "content": {JSON: {"schema": {"type": "object"}}}}},
                                            security=[{}])},
        "/api/v2/teams": {"get": _op("ListTeams", "Teams (member=true: the caller's own), by username", [
            {"name": "search_filter", "in": "query", "description": 'JSON, e.g. {"username": "data"}', "schema": {"type": "string"}},
            {"name": "member", "in": "query", "schema": {"type": "boolean"}}, *PAGE],
            _json("a page of teams", {"type": "object", "properties": {
                "teams": {"type": "array", "items": _ref("Team")}, "next_page_token": {"type": "string"}}}))},
        "/api/v2/teams/{team_name}": {
            "get": _op("GetTeam", "A team", [TEAM], _json("the team", _ref("Team"))),
            "patch": _op("UpdateTeam", "Change a team's bio, display name or members' default role (team admins)", [TEAM],
                         _json("the team", _ref("Team")), body={"type": "object", "properties": {
                             "bio": {"type": "string"}, "name": {"type": "string"},
                             "permission": {"type": "string", "enum": ["read", "operator", "write", "admin"]}}}),
        },
        "/api/v2/teams/{team_name}/members": {"get": _op(
            "ListTeamMembers", "A team's members and their team roles", [TEAM],
            _json("the members", {"type": "object", "properties": {"members": {"type": "array", "items": _ref("TeamMember")}}}))},
        "/api/v2/teams/{team_name}/members/{username}": {
            "put": _op("PutTeamMember", "Add a member, or change their team role (team admins)", [TEAM, USERNAME],
                       _json("the member", _ref("TeamMember")), body={"type": "object", "properties": {
                           "permission": {"type": "string", "enum": ["read", "operator", "write", "admin"]}}}),
            "delete": _op("DeleteTeamMember", "Remove a member (team admins; anyone may leave)", [TEAM, USERNAME],
                          _json("done", {"type": "object"})),
        },
        "/api/v2/usersquota/{username}": {
            "put": _op("PutAccountQuota", "Give a user or a team a quota of its own (site admins); empty parts: no limit",
                       [USERNAME], _json("the quota", _ref("Quota")), body=_ref("Quota")),
            "delete": _op("DeleteAccountQuota", "Back to the default quota for users or teams (site admins)", [USERNAME],
                          _json("done", {"type": "object"})),
        },
        "/model": _model_call("CallModel"),
        "/api/altus-ds-1/models/call-model": _model_call("CallModelAltus"),
    }
    return {
        "openapi": "3.0.3",
        "info": {"title": "cml-appliance: what CML's API v2 lacks", "version": "1",
                 "description": "Routes of the appliance that CML's API v2 swagger does not describe. Every other "
                                "/api/v2 route follows CML's swagger. WebSockets (a session's terminal at "
                                ".../sessions/{session_id}/terminal) are not described here."},
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}],
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "description": "an API v2 key"},
                                "basic": {"type": "http", "scheme": "basic", "description": "the API key as user name"}},
            "schemas": SCHEMAS,
        },
        "paths": paths,
    }


_DOCUMENT = document()


async def openapi_json(request: web.Request) -> web.Response:
    return web.json_response(_DOCUMENT)


def routes() -> list[web.RouteDef]:
    return [web.get("/api/v2/openapi.json", openapi_json, name="api_openapi")]
