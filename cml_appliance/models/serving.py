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

from cml_appliance.models.replica_link import (
    ConnectionLost,
    ReplicaLink,
    ReplicaUnreachable,
)
from cml_appliance.models.service import Model
from cml_appliance.web.keys import APP_PROXY_SESSION, MODELS, SETTINGS, WORKLOADS
from cml_appliance.workloads.store import Workload

# A replica that has just started may not listen yet: connecting is retried this long.
CONNECT_GRACE_SECONDS = 10
# How many times a call moves on from a replica found dead to another.
MAX_MOVES = 1


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
                # Once only: a replica that died idle costs the call nothing, and a request that
                # kills the replica answering it kills no more than two.
                if len(gone) > MAX_MOVES:
                    return failure(502, "the replicas died while answering: the request itself may be what ends them")
            finally:
                service.replica_released(model)
        if time.monotonic() >= deadline:
            return failure(429, "model.busy")
        # Wake when any replica is let go (or soon anyway: new replicas may have come up).
        await service.replica_freed(model, min(0.25, max(0.0, deadline - time.monotonic())))


class ReplicaGone(Exception):
    """The replica has died (it has run a while but refuses connections, or a kept-alive
    connection to it broke before the request went out): the call can go to another one."""


def _running_for(replica: Workload) -> float:
    return (datetime.now(UTC) - replica.running_at).total_seconds() if replica.running_at else 0.0


def _answer(replica: Workload, value: bytes) -> web.Response:
    # The replica's body is the function's return value, already JSON (replica_server.py made it
    # with json.dumps): it goes into CML's answer as it is, not parsed again.
    return web.Response(
        body=b'{"success": true, "response": ' + value + b', "ReplicaID": "' + replica.public_id.encode() + b'"}',
        content_type="application/json")


def _timed_out(request: web.Request) -> web.Response:
    return failure(504, f"the model function did not answer within {request.app[SETTINGS].model_request_timeout_seconds} s")


async def _forward(request: web.Request, replica: Workload, argument: Any) -> web.Response:
    link = request.app[MODELS].link_for(replica)
    if link is not None:
        return await _forward_frame(request, replica, link, json.dumps(argument).encode())
    return await _forward_http(request, replica, argument)


async def _forward_frame(request: web.Request, replica: Workload, link: ReplicaLink, argument: bytes) -> web.Response:
    """A local replica, through its Unix socket."""
    started = time.monotonic()
    while True:
        try:
            ok, body = await link.call(argument, request.app[SETTINGS].model_request_timeout_seconds)
            break
        except ReplicaUnreachable as exc:
            # A replica that has just started may not listen yet; one that has run a while is dead.
            if _running_for(replica) > CONNECT_GRACE_SECONDS:
                raise ReplicaGone() from exc
            if time.monotonic() - started > CONNECT_GRACE_SECONDS:
                return failure(502, f"the replica did not answer: {exc}")
            await asyncio.sleep(0.1)
        except ConnectionLost as exc:
            raise ReplicaGone() from exc
        except TimeoutError:
            return _timed_out(request)
    if ok:
        return _answer(replica, body)
    return failure(400, body.decode("utf-8", "replace"))


async def _forward_http(request: web.Request, replica: Workload, argument: Any) -> web.Response:
    """A replica in a container (or any without a socket of ours), over HTTP through the engine's address."""
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
            if _running_for(replica) > CONNECT_GRACE_SECONDS:
                raise ReplicaGone() from exc
            if time.monotonic() - started > CONNECT_GRACE_SECONDS:
                return failure(502, f"the replica did not answer: {exc}")
            await asyncio.sleep(0.1)
        except aiohttp.ClientOSError as exc:
            # A kept-alive connection whose replica has died: the request was not sent.
            raise ReplicaGone() from exc
        except TimeoutError:
            return _timed_out(request)
        except aiohttp.ClientError as exc:
            return failure(502, f"the replica did not answer: {exc or type(exc).__name__}")
    if status == 200:
        return _answer(replica, answer)
    try:
        message = json.loads(answer)["error"]
    except (ValueError, KeyError, TypeError):
        return failure(502, f"the replica answered {status} without an error message")
    return failure(400, str(message))
