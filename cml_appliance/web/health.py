"""Operations endpoints: liveness, readiness (the database answers) and Prometheus metrics."""

from __future__ import annotations

import asyncio

from aiohttp import web

from cml_appliance import __version__
from cml_appliance.web.keys import LOCAL_SANDBOX, METRICS, POD_WATCHER, POOL, REGISTRY
from cml_appliance.web.metrics import CONTENT_TYPE


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "version": __version__})


async def readyz(request: web.Request) -> web.Response:
    try:
        async with asyncio.timeout(2):
            await request.app[POOL].fetchval("SELECT 1")
    except Exception as exc:  # any failure to reach the database means not ready
        return web.json_response({"status": "unavailable", "database": f"unreachable: {type(exc).__name__}"}, status=503)
    registry = request.app.get(REGISTRY)
    body = {
        "status": "ready", "database": "ok", "local_sandbox": request.app.get(LOCAL_SANDBOX, ""),
        "registry": ("embedded" if registry.endpoint.unix_socket else "external") if registry and registry.endpoint
        else f"none: {registry.why_not if registry else 'not started'}",
    }
    watcher = request.app.get(POD_WATCHER)
    if watcher is not None:
        # Where this process watches pods: how old its picture of the cluster is.
        body["kubernetes"] = watcher.describe()  # type: ignore[attr-defined]
    return web.json_response(body)


async def metrics(request: web.Request) -> web.Response:
    return web.Response(body=request.app[METRICS].render(), headers={"Content-Type": CONTENT_TYPE})


def routes() -> list[web.RouteDef]:
    return [
        web.get("/healthz", healthz, name="healthz"),
        web.get("/readyz", readyz, name="readyz"),
        web.get("/metrics", metrics, name="metrics"),
    ]
