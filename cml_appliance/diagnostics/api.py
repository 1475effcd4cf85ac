"""API v2: diagnostics bundles (GenerateDiagBundle, GetDiagBundleStatus, DownloadDiagnosticsBundle),
for site administrators."""

from __future__ import annotations

from aiohttp import web

from cml_appliance.api.bodies import STR
from cml_appliance.api.common import json_body
from cml_appliance.diagnostics.service import parse_time, status_json
from cml_appliance.web.context import require_site_admin
from cml_appliance.web.keys import DIAGNOSTICS


async def generate(request: web.Request) -> web.Response:
    admin = require_site_admin(request)
    body = await json_body(request, {"start_time": STR, "end_time": STR})
    row = await request.app[DIAGNOSTICS].request(
        admin.id, parse_time(body.get("start_time"), "start_time"), parse_time(body.get("end_time"), "end_time"))
    return web.json_response(status_json(row))


async def status(request: web.Request) -> web.Response:
    require_site_admin(request)
    return web.json_response(status_json(await request.app[DIAGNOSTICS].get(request.match_info["request_id"])))


async def download(request: web.Request) -> web.StreamResponse:
    require_site_admin(request)
    request_id = request.match_info["request_id"]
    path = await request.app[DIAGNOSTICS].archive(request_id)
    return web.FileResponse(path, headers={
        "Content-Type": "application/gzip", "Cache-Control": "no-store",
        "Content-Disposition": f'attachment; filename="cml-diagnostics-{request_id}.tar.gz"'})


def routes() -> list[web.RouteDef]:
    return [
        web.post("/api/v2/diagnostics/bundle", generate, name="api_generate_diag_bundle"),
        web.get("/api/v2/diagnostics/bundle/status/{request_id}", status, name="api_diag_bundle_status"),
        web.get("/api/v2/diagnostics/download/{request_id}", download, name="api_download_diag_bundle"),
    ]
