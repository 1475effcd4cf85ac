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
from datetime import UTC, datetime
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
    gone: set[int] = set()  # replicas found dead during this call
    while True:
        replicas = [r for r in await service.serving_replicas(model) if r.id not in gone]
        if not replicas:
            return failure(503, "the model is not deployed, or its replicas are not running")
        for replica in service.order(model, replicas):
            lock = service.lock_for(replica)
            if lock.locked():
                continue
            try:
                async with lock:
                    return await _forward(request, replica, argument)
            except ReplicaGone:
                gone.add(replica.id)  # it died and its end is not recorded yet: try another
                service.forget_calls()
            finally:
                service.replica_released(model)
        if time.monotonic() >= deadline:
            return failure(429, "model.busy")
        # Wake when any replica is let go (or soon anyway: new replicas may have come up).
        await service.replica_freed(model, min(0.25, max(0.0, deadline - time.monotonic())))


class ReplicaGone(Exception):
    """The replica has died (it has run a while but refuses connections, or a kept-alive
    connection to it broke before the request went out): the call can go to another one."""


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
            # A replica that has just started may not listen yet; one that has run a while is dead.
            running_for = (datetime.now(UTC) - replica.running_at).total_seconds() if replica.running_at else 0.0
            if running_for > CONNECT_GRACE_SECONDS:
                raise ReplicaGone() from exc
            if time.monotonic() - started > CONNECT_GRACE_SECONDS:
                return failure(502, f"the replica did not answer: {exc}")
            await asyncio.sleep(0.1)
        except aiohttp.ClientOSError as exc:
            # A kept-alive connection whose replica has died: the request was not sent.
            raise ReplicaGone() from exc
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
