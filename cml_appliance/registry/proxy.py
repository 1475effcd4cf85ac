"""The registry proxy: the OCI distribution API at /v2/ on the appliance, the only way to the
backing registry (registry/embedded.py), with Docker token auth (registry/tokens.py).

`podman login <host>` with a user name and an API key, then `podman pull/push
<host>/<owner>/<project slug>/<name>:<tag>` within the project's roles. Bodies stream both ways
without buffering (blobs, chunked uploads, range requests, HEAD); a cross-repository mount
from a repository the caller may not pull becomes an ordinary upload; the catalog, which would
list every team's repositories, is not served.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from multidict import CIMultiDict
from aiohttp import web

from cml_appliance.auth import api_keys
from cml_appliance.registry import tokens
from cml_appliance.web.keys import POOL, REGISTRY, REGISTRY_SESSION, SETTINGS

log = logging.getLogger(__name__)

API_VERSION = {"Docker-Distribution-API-Version": "registry/2.0"}
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
                        "transfer-encoding", "upgrade", "host", "authorization", "cookie"})
_PATH_RE = re.compile(r"^/v2/(?P<name>.+?)/(?P<kind>manifests|blobs|tags|referrers)/(?P<rest>.*)$")


def registry_error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    body = {"errors": [{"code": code, "message": message, "detail": None}]}
    return web.json_response(body, status=status, headers={**API_VERSION, **(headers or {})})


def _challenge(request: web.Request, scope: str | None = None) -> dict[str, str]:
    base = request.app[SETTINGS].public_url.rstrip("/") or f"{request.scheme}://{request.host}"
    value = f'Bearer realm="{base}/v2/token",service="{tokens.SERVICE}"'
    if scope:
        value += f',scope="{scope}"'
    return {"WWW-Authenticate": value}


async def _basic_user(request: web.Request) -> Any:
    """The user behind HTTP Basic (user name, API key), or None."""
    check = await api_keys.check_basic(request.app[POOL], request.headers.get("Authorization", ""))
    return None if check.problem else check.user


async def _grant(request: web.Request, scopes: list[str]) -> tokens.Grant | None:
    """What the request's credentials allow: a token of ours, or HTTP Basic with an API key."""
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer":
        return tokens.verify(request.app[SETTINGS].secret_key, value.strip())
    user = await _basic_user(request)
    return None if user is None else await tokens.grant(request.app[POOL], user, scopes)


async def base(request: web.Request) -> web.Response:
    """GET /v2/: 200 for a valid credential, else the challenge that sends clients to /v2/token."""
    if request.headers.get("Authorization") and await _grant(request, []) is not None:
        return web.json_response({}, headers=API_VERSION)
    return registry_error(401, "UNAUTHORIZED", "authentication required", _challenge(request))


async def token(request: web.Request) -> web.Response:
    """GET /v2/token?service=…&scope=repository:<owner>/<slug>/<name>:pull,push (HTTP Basic)."""
    user = await _basic_user(request)
    if user is None:
        return registry_error(401, "UNAUTHORIZED", "sign in with your user name and an API key as the password",
                              {"WWW-Authenticate": 'Basic realm="cml-appliance registry"'})
    granted = await tokens.grant(request.app[POOL], user, request.query.getall("scope", []))
    issued = tokens.issue(request.app[SETTINGS].secret_key, granted)
    return web.json_response({"token": issued, "access_token": issued, "expires_in": tokens.TOKEN_SECONDS})


async def catalog(request: web.Request) -> web.Response:
    return registry_error(403, "DENIED", "the catalog is not served: it would list every project's repositories")


def _action(method: str, kind: str, rest: str) -> str:
    """pull reads; push writes (cancelling one's own upload too); delete removes a manifest or blob."""
    if method in ("GET", "HEAD"):
        return "pull"
    if method == "DELETE" and not (kind == "blobs" and rest.startswith("uploads/")):
        return "delete"
    return "push"


async def api(request: web.Request) -> web.StreamResponse:
    """/v2/<name>/{manifests,blobs,tags,referrers}/…, passed to the registry when allowed."""
    match = _PATH_RE.match(request.path)
    if match is None:
        return registry_error(404, "NAME_UNKNOWN", "not a registry API path")
    name, action = match["name"], _action(request.method, match["kind"], match["rest"])
    if tokens.split_repository(name) is None:
        return registry_error(404, "NAME_INVALID", "repositories are <owner>/<project slug>/<name>")
    scope = f"repository:{name}:{'pull,push' if action == 'push' else action}"
    granted = await _grant(request, [scope])
    if granted is None:
        return registry_error(401, "UNAUTHORIZED", "authentication required", _challenge(request, scope))
    if not granted.allows(name, action):
        return registry_error(401 if request.headers.get("Authorization", "").lower().startswith("bearer") else 403,
                              "DENIED", f"you may not {action} {name}", _challenge(request, scope))
    status = request.app[REGISTRY]
    if status.endpoint is None:
        return registry_error(503, "UNAVAILABLE", f"no registry: {status.why_not}")
    query = request.query.copy()
    if "mount" in query and not granted.allows(query.get("from", ""), "pull"):
        # Mounting a blob from a repository the caller may not read would read it: upload instead.
        query.popall("mount", None)
        query.popall("from", None)
    return await _forward(request, status.endpoint.url, query)


class _TooLarge(Exception):
    pass


class _Limited:
    """The request body as it comes, cut off past `limit` bytes (`exceeded` says it was)."""

    def __init__(self, content: aiohttp.StreamReader, limit: int):
        self.content, self.limit, self.exceeded = content, limit, False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        sent = 0
        async for chunk in self.content.iter_any():
            sent += len(chunk)
            if sent > self.limit:
                self.exceeded = True
                raise _TooLarge
            yield chunk


def _upload_end(headers: Any) -> int:
    """The last byte an upload session holds, from the registry's `Range: 0-N` (else -1)."""
    first, _, last = headers.get("Range", "").partition("-")
    return int(last) if first.strip() == "0" and last.strip().isdigit() else -1


async def _forward(request: web.Request, upstream: str, query: Any) -> web.StreamResponse:
    # A list, not a dict: clients send one Accept header per manifest type they take.
    headers = CIMultiDict((k, v) for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP)
    session: aiohttp.ClientSession = request.app[REGISTRY_SESSION]
    limit = request.app[SETTINGS].registry_max_upload_mb * 1024 * 1024
    too_large = registry_error(413, "SIZE_INVALID", f"uploads are limited to {limit // (1024 * 1024)} MB "
                                                    "(registry_max_upload_mb)")
    if request.content_length is not None and request.content_length > limit:
        return too_large
    data = _Limited(request.content, limit) if request.body_exists else None
    uploading = "/blobs/uploads/" in request.path and request.method in ("PATCH", "PUT")
    try:
        async with session.request(request.method, upstream + request.path, params=query, headers=headers, data=data,
                                   allow_redirects=False) as answer:
            if uploading and _upload_end(answer.headers) >= limit:  # chunk after chunk, past the limit
                location = answer.headers.get("Location", "")
                await answer.release()
                await _cancel_upload(session, location if location.startswith("http") else upstream + location)
                return too_large
            response = web.StreamResponse(status=answer.status, reason=answer.reason)
            for key, value in answer.headers.items():
                if key.lower() in HOP_BY_HOP or key.lower() == "content-length":
                    continue
                if key.lower() == "location" and value.startswith(upstream):
                    value = value[len(upstream):]  # the registry's own address is not the client's
                response.headers.add(key, value)
            if answer.content_length is not None:
                response.content_length = answer.content_length
            await response.prepare(request)
            if request.method != "HEAD":
                async for chunk in answer.content.iter_any():  # what arrives goes on at once
                    await response.write(chunk)
            await response.write_eof()
            return response
    except (_TooLarge, aiohttp.ClientConnectionError, asyncio.TimeoutError) as exc:
        if data is not None and data.exceeded:  # however aiohttp passed the cut-off on
            if uploading:  # the registry keeps nothing of it: the upload session goes
                await _cancel_upload(session, upstream + request.path_qs)
            return too_large
        log.warning("the registry did not answer %s %s: %s", request.method, request.path, exc)
        return registry_error(503, "UNAVAILABLE", "the registry is not answering; try again shortly")


async def _cancel_upload(session: aiohttp.ClientSession, url: str) -> None:
    try:
        async with session.delete(url) as resp:
            await resp.read()
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        log.warning("could not cancel an oversized upload at %s: %s", url, exc)


def routes() -> list[web.RouteDef]:
    return [
        web.get("/v2/", base, name="registry_base"),
        web.get("/v2/token", token, name="registry_token"),
        web.get("/v2/_catalog", catalog, name="registry_catalog"),
        web.route("*", "/v2/{path:.+}", api, name="registry_api"),
    ]

