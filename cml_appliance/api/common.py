"""Small helpers shared by the API v2 handlers."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aiohttp import web

from cml_appliance.api.bodies import check_body, read_json_object
from cml_appliance.api.listing import ListQuery, next_page_token, parse_list_query
from cml_appliance.web.keys import SETTINGS


async def json_body(
    request: web.Request, spec: Mapping[str, str], ignored: frozenset[str] = frozenset()
) -> dict[str, Any]:
    limit = request.app[SETTINGS].max_json_body_mb * 1024 * 1024
    return check_body(await read_json_object(request, limit), spec, ignored)


def list_query(request: web.Request, filter_keys: Mapping[str, str], sort_keys: Mapping[str, str]) -> ListQuery:
    return parse_list_query(
        request.query,
        secret=request.app[SETTINGS].secret_key,
        scope=request.path,
        filter_keys=filter_keys,
        sort_keys=sort_keys,
    )


def page(request: web.Request, key: str, items: list[Any], q: ListQuery, has_more: bool) -> web.Response:
    token = next_page_token(q, request.app[SETTINGS].secret_key, has_more)
    return web.json_response({key: items, "next_page_token": token})


def query_flag(request: web.Request, name: str) -> bool:
    return request.query.get(name, "").lower() in ("1", "true", "yes")
