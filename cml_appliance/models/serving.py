"""Calls to deployed models, for POST /model and the model page's test box.

A call goes to a free replica, round robin; each replica serves one request at a time, as in
CML. When every replica is busy the call waits up to model_busy_wait_seconds for one, then gets
429 model.busy. Answers take CML's shape: {"success": true, "response": ..., "ReplicaID": ...}
or {"success": false, "error": {"message": ...}}.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp
from aiohttp import web

from cml_appliance.models.service import Model
from cml_appliance.web.keys import APP_PROXY_SESSION, MODELS, SETTINGS, WORKLOADS
from cml_appliance.workloads.store import Workload

# A replica that has just started may not listen yet: connecting is retried this long.
CONNECT_GRACE_SECONDS = 10


def failure(status: int, message: str) -> web.Response:
    return web.json_response({"success": False, "error": {"message": message}}, status=status)


async def call(request: web.Request, model: Model, argument: Any) -> web.Response:
    """Pass `argument` to the model's function on a free replica and answer as CML does."""
    service = request.app[MODELS]
    deadline = time.monotonic() + request.app[SETTINGS].model_busy_wait_seconds
    while True:
        replicas = await service.serving_replicas(model)
        if not replicas:
            return failure(503, "the model is not deployed, or its replicas are not running")
        for replica in service.order(model, replicas):
            lock = service.lock_for(replica)
            if lock.locked():
                continue
            try:
                async with lock:
                    return await _forward(request, replica, argument)
            finally:
                service.replica_released(model)
        if time.monotonic() >= deadline:
            return failure(429, "model.busy")
        # Wake when any replica is let go (or soon anyway: new replicas may have come up).
        await service.replica_freed(model, min(0.25, max(0.0, deadline - time.monotonic())))


async def _forward(request: web.Request, replica: Workload, argument: Any) -> web.Response:
    session = request.app[MODELS].session_for(replica)
    if session is not None:
        address = "replica"  # the session's Unix socket
    else:
        address = await request.app[WORKLOADS].engine(replica.engine).address(replica.handle, replica.app_port or 0)
        session = request.app[APP_PROXY_SESSION]
    timeout = aiohttp.ClientTimeout(total=request.app[SETTINGS].model_request_timeout_seconds)
    started = time.monotonic()
    while True:
        try:
            async with session.post(f"http://{address}/", json=argument, timeout=timeout) as resp:
                status, answer = resp.status, await resp.read()
            break
        except aiohttp.ClientConnectorError as exc:
            if time.monotonic() - started > CONNECT_GRACE_SECONDS:
                return failure(502, f"the replica did not answer: {exc}")
            await asyncio.sleep(0.1)
        except TimeoutError:
            return failure(504, "the model function did not answer within "
                                f"{request.app[SETTINGS].model_request_timeout_seconds} s")
        except aiohttp.ClientError as exc:
            return failure(502, f"the replica did not answer: {exc or type(exc).__name__}")
    if status == 200:
        # The replica's body is the function's return value, already JSON (replica_server.py
        # made it with json.dumps): it goes into CML's answer as it is, not parsed again.
        return web.Response(
            body=b'{"success": true, "response": ' + answer + b', "ReplicaID": "' + replica.public_id.encode() + b'"}',
            content_type="application/json")
    try:
        message = json.loads(answer)["error"]
    except (ValueError, KeyError, TypeError):
        return failure(502, f"the replica answered {status} without an error message")
    return failure(400, str(message))
