"""Every API route is described: by CML's swagger, or by the appliance's own OpenAPI document
(GET /api/v2/openapi.json, cml_appliance/api/openapi.py). Generated from the router, so a new
route without a description fails here."""

from __future__ import annotations

import json
import re

from aiohttp.test_utils import TestClient

from cml_appliance.api.openapi import document
from tests.conftest import REPO

SWAGGER = REPO / "tests" / "data" / "cml-api-v2.swagger.json"
# The terminal is a WebSocket: OpenAPI 3.0 cannot describe one (documented in the README).
NOT_HTTP = {"api_session_terminal"}


def _examples(paths: dict[str, dict[str, object]]) -> set[tuple[str, str]]:
    """(METHOD, a concrete path) for each described operation, its parameters filled in."""
    return {(method.upper(), re.sub(r"\{[^}]+\}", "x1", path))
            for path, ops in paths.items() for method in ops if method in ("get", "post", "put", "patch", "delete")}


def _route_regex(path: str) -> re.Pattern[str]:
    """aiohttp's path pattern as a regex: {name} is one segment, {name:re} its own regex."""
    out, pos = "", 0
    for match in re.finditer(r"\{(\w+)(?::((?:[^{}]|\{[^{}]*\})+))?\}", path):
        out += re.escape(path[pos:match.start()]) + (f"(?:{match.group(2)})" if match.group(2) else "[^{}/]+")
        pos = match.end()
    return re.compile(out + re.escape(path[pos:]) + "$")


async def test_every_api_route_is_described_by_cmls_swagger_or_ours(client: TestClient) -> None:
    cml = _examples(json.loads(SWAGGER.read_text())["paths"])
    ours = _examples(document()["paths"])
    undescribed, described_twice = [], []
    for route in client.app.router.routes():
        info = route.resource.get_info() if route.resource else {}
        path = info.get("path") or info.get("formatter") or ""
        if route.method == "HEAD" or not (path.startswith("/api/") or path == "/model") or route.name in NOT_HTTP:
            continue
        regex = _route_regex(path)
        in_cml = any(m == route.method and regex.match(p) for m, p in cml)
        in_ours = any(m == route.method and regex.match(p) for m, p in ours)
        if not (in_cml or in_ours):
            undescribed.append(f"{route.method} {path} ({route.name})")
        elif in_cml and in_ours:
            described_twice.append(f"{route.method} {path} ({route.name})")
    assert not undescribed, "describe these in cml_appliance/api/openapi.py: " + ", ".join(undescribed)
    assert not described_twice, "CML's swagger describes these already: " + ", ".join(described_twice)


async def test_the_description_is_served_to_anyone(client: TestClient) -> None:
    resp = await client.get("/api/v2/openapi.json")
    assert resp.status == 200
    served = await resp.json()
    assert served["openapi"].startswith("3.") and served == json.loads(json.dumps(document()))
