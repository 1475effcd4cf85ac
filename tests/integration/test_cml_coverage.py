"""Every one of CML API v2's operations (CML's own swagger): routed here, answering the documented
501 (api/unimplemented.py), or not yet, which only the list below may name, so it can only shrink.
The README's compatibility table is generated from the same facts and must match them:
CML_WRITE_COMPAT=1 rewrites it. (The generic swagger client drives the operations with response
validation in test_swagger_client.py; schemathesis fuzzes them all in test_fuzz.py.)"""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict

from aiohttp.test_utils import TestClient

from cml_appliance.api.unimplemented import UNIMPLEMENTED
from tests.conftest import REPO

SWAGGER = REPO / "tests" / "data" / "cml-api-v2.swagger.json"
README = REPO / "README.md"
START, END = "<!-- cml-compatibility:start -->", "<!-- cml-compatibility:end -->"
# Operations not answered yet (issue 13's remaining work): this list may only shrink.
NOT_YET: set[str] = set()


def _route_regex(path: str) -> re.Pattern[str]:
    out, pos = "", 0
    for match in re.finditer(r"\{(\w+)(?::((?:[^{}]|\{[^{}]*\})+))?\}", path):
        out += re.escape(path[pos:match.start()]) + (f"(?:{match.group(2)})" if match.group(2) else "[^{}/]+")
        pos = match.end()
    return re.compile(out + re.escape(path[pos:]) + "$")


def _states(client: TestClient) -> dict[str, tuple[str, str, str]]:
    """operationId -> (method, path, state): "routed", "501" or "not yet"."""
    routes = []  # in the router's order, which is the order aiohttp tries them in
    for route in client.app.router.routes():
        info = route.resource.get_info() if route.resource else {}
        path = info.get("path") or info.get("formatter") or ""
        if path.startswith("/api/"):
            routes.append((route.method, _route_regex(path), _shape(path)))
    unimplemented = {operation for _, _, operation, _ in UNIMPLEMENTED}
    paths = json.loads(SWAGGER.read_text())["paths"]
    shapes = {(method.upper(), _shape(path)) for path, ops in paths.items() for method in ops}
    out = {}
    for path, ops in paths.items():
        example = re.sub(r"\{[^}]+\}", "x1", path)
        for method, op in ops.items():
            # The route that answers is the first that matches; it must be this operation's own
            # (not GetProject's {project_id} taking /projects/batch, say).
            first = next((shape for m, regex, shape in routes if m == method.upper() and regex.match(example)), None)
            if op["operationId"] in unimplemented:
                state = "501"
            elif first is not None and (first == _shape(path) or (method.upper(), first) not in shapes):
                state = "routed"  # its own route, not another operation's that takes its path
            else:
                state = "not yet"
            out[op["operationId"]] = (method.upper(), path, state)
    return out


def _shape(path: str) -> str:
    """A path with its parameters blanked: /api/v2/projects/{project_id} -> /api/v2/projects/{}."""
    return re.sub(r"\{[^{}]*(\{[^{}]*\}[^{}]*)*\}", "{}", path)


def _area(path: str) -> str:
    parts = [p for p in path.split("/")[3:] if p and not p.startswith("{")]
    if parts[:1] == ["projects"] and len(parts) > 1:
        return parts[1].split(":")[0]
    return parts[0].split(":")[0] if parts else "/"


def render(states: dict[str, tuple[str, str, str]]) -> str:
    areas: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for operation, (_, path, state) in sorted(states.items()):
        areas[_area(path)][state].append(operation)
    counts = defaultdict(int)
    for _, _, state in states.values():
        counts[state] += 1
    lines = [START, "",
             f"Of CML API v2's {len(states)} operations, {counts['routed']} are answered, {counts['501']} answer 501 "
             f"with why (they have no meaning here), {counts['not yet']} are not yet answered (a bare 404). Generated "
             "by `tests/integration/test_cml_coverage.py` from CML's swagger and the router.", "",
             "| area | answered | 501, with why | not yet |", "|---|---|---|---|"]
    for area in sorted(areas):
        cells = [", ".join(areas[area][state]) or "—" for state in ("routed", "501", "not yet")]
        lines.append(f"| {area} | {' | '.join(cells)} |")
    lines += ["", END]
    return "\n".join(lines)


async def test_every_cml_operation_is_answered_or_listed_and_the_readme_says_so(client: TestClient) -> None:
    states = _states(client)
    assert len(states) == 158
    missing = {op for op, (_, _, state) in states.items() if state == "not yet"}
    newly_answered = NOT_YET - missing
    assert not newly_answered, f"answered now: take these out of NOT_YET: {sorted(newly_answered)}"
    assert missing <= NOT_YET, f"not answered and not listed (a bare 404): {sorted(missing - NOT_YET)}"
    table = render(states)
    text = README.read_text()
    current = text[text.index(START):text.index(END) + len(END)] if START in text else ""
    if os.environ.get("CML_WRITE_COMPAT") and current != table:
        README.write_text(text.replace(current, table) if current else text + "\n" + table + "\n")
        current = table
    assert current == table, "the README's compatibility table is stale: run this test with CML_WRITE_COMPAT=1"
