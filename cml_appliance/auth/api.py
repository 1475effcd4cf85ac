"""API v2: a user's keys (/users/{username}/v2_keys) and key validation (/auth/validate_key)."""

from __future__ import annotations

from aiohttp import web

from cml_appliance.api.bodies import STR, STR_LIST
from cml_appliance.api.common import json_body
from cml_appliance.auth import api_keys, users
from cml_appliance.auth.users import User
from cml_appliance.core.errors import NotFound, PermissionDenied
from cml_appliance.core.timefmt import rfc3339
from cml_appliance.web.context import current_user
from cml_appliance.web.keys import POOL


async def _key_owner(request: web.Request) -> tuple[User, User]:
    """(caller, owner of the keys); only the user themself or a site admin may touch them."""
    caller = current_user(request)
    if caller.scope_project_id is not None:
        raise PermissionDenied("a workload's own key cannot manage API keys")
    username = request.match_info["username"]
    if caller.username == username:
        return caller, caller
    if not caller.is_admin:
        raise NotFound(f"user {username!r} not found")
    return caller, await users.get_by_username(request.app[POOL], username)


def key_details(key: api_keys.ApiKey) -> dict[str, object]:
    return {
        "key_id": key.key_id,
        "created_at": rfc3339(key.created_at),
        "expiry_date": rfc3339(key.expires_at),
        "comments": key.comments,
        "audiences": list(key.audiences),
    }


async def list_keys(request: web.Request) -> web.Response:
    _, owner = await _key_owner(request)
    keys = await api_keys.list_for(request.app[POOL], owner)
    return web.json_response({"keys": [key_details(k) for k in keys]})


CREATE_KEY_SPEC = {"username": STR, "expiry_date": STR, "comments": STR, "audiences": STR_LIST}


async def create_key(request: web.Request) -> web.Response:
    caller, owner = await _key_owner(request)
    body = await json_body(request, CREATE_KEY_SPEC)
    if body.get("username") and body["username"] != owner.username:
        raise NotFound("username in the body must match the path")
    secret, key = await api_keys.create(
        request.app[POOL],
        owner,
        comments=body.get("comments", ""),
        audiences=body.get("audiences"),
        expires_at=api_keys.parse_expiry(body.get("expiry_date")),
        actor_id=caller.id,
    )
    return web.json_response({"api_key": secret, **key_details(key)})


async def delete_key(request: web.Request) -> web.Response:
    caller, owner = await _key_owner(request)
    await api_keys.delete(request.app[POOL], owner, request.match_info["key_id"], caller.id)
    return web.json_response({})


async def delete_all_keys(request: web.Request) -> web.Response:
    caller, owner = await _key_owner(request)
    await api_keys.delete_all(request.app[POOL], owner, caller.id)
    return web.json_response({})


async def validate_key(request: web.Request) -> web.Response:
    """Public route: says whether the Bearer key is valid for an audience (default API)."""
    body = await json_body(request, {"audience": STR})
    audience = body.get("audience") or "API"
    header = request.headers.get("Authorization", "")
    scheme, _, secret = header.partition(" ")
    if scheme.lower() != "bearer" or not secret.strip():
        return web.json_response({"valid": False, "username": "", "message": "no API key given"})
    if audience not in api_keys.AUDIENCES:
        return web.json_response(
            {"valid": False, "username": "", "message": f"unknown audience {audience!r}: use API or Application"}
        )
    result = await api_keys.check(request.app[POOL], secret.strip(), audience)
    if result.problem:
        return web.json_response({"valid": False, "username": "", "message": result.problem})
    assert result.user is not None
    return web.json_response(
        {"valid": True, "username": result.user.username, "message": "API key is valid for the given audience"}
    )


def routes() -> list[web.RouteDef]:
    return [
        web.get("/api/v2/users/{username}/v2_keys", list_keys, name="api_list_keys"),
        web.post("/api/v2/users/{username}/v2_keys", create_key, name="api_create_key"),
        web.delete("/api/v2/users/{username}/v2_keys", delete_all_keys, name="api_delete_keys"),
        web.delete("/api/v2/users/{username}/v2_keys/{key_id}", delete_key, name="api_delete_key"),
        web.post("/api/v2/auth/validate_key", validate_key, name="api_validate_key"),
    ]
