"""HTTP helpers shared by every workload kind (and builds): JSON, the logs API, and the live event stream."""

from __future__ import annotations

import codecs
import functools
import json
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from cml_appliance.core.errors import InvalidArgument
from cml_appliance.core.timefmt import rfc3339
from cml_appliance.workloads import states, store
from cml_appliance.workloads.events import StatusHub
from cml_appliance.workloads.logs import LogStore
from cml_appliance.workloads.store import Workload

MAX_LOG_CHUNK = 1024 * 1024
KEEPALIVE_SECONDS = 15


def workload_json(row: Workload) -> dict[str, Any]:
    data = {
        "id": row.public_id,
        "project_id": row.project_public_id,
        "name": row.name,
        "status": row.status,
        "reason": row.reason,
        "exit_code": row.exit_code,
        "engine": row.engine,
        # Where it runs on Kubernetes (empty elsewhere): the user's namespace and the pod's node.
        "namespace": row.namespace,
        "node": row.node,
        "runtime_identifier": row.runtime_identifier,
        "cpu": row.cpu,
        "memory": row.memory,
        "nvidia_gpu": row.nvidia_gpu,
        "environment": json.dumps(row.environment),
        "creator": row.creator,
        "created_at": rfc3339(row.created_at),
        "scheduling_at": rfc3339(row.scheduling_at),
        "starting_at": rfc3339(row.starting_at),
        "running_at": rfc3339(row.running_at),
        "finished_at": rfc3339(row.finished_at),
        "idle_timeout_minutes": row.idle_timeout_minutes,
        "max_duration_minutes": row.max_duration_minutes,
    }
    # As in proto3 JSON, a time that has not happened yet is left out, not sent empty.
    return {k: v for k, v in data.items() if v != "" or not k.endswith("_at")}


async def _open_event_stream(request: web.Request) -> tuple[int, web.StreamResponse]:
    """(the log offset to start from, the prepared response) of an event stream. A browser that
    reconnects sends Last-Event-ID and continues where it stopped; a bad offset starts over."""
    try:
        offset = int(request.headers.get("Last-Event-ID") or request.query.get("offset", "0") or 0)
    except ValueError:
        offset = 0
    if not 0 <= offset < 2**63:
        offset = 0
    response = web.StreamResponse(headers={
        "Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no",
    })
    await response.prepare(request)
    return offset, response


async def _send_event(response: web.StreamResponse, event: str, data: str, event_id: str | None = None) -> None:
    """One server-sent event; a multi-line payload becomes several data lines."""
    lines = "".join(f"data: {line}\n" for line in data.split("\n"))
    head = f"id: {event_id}\n" if event_id is not None else ""
    await response.write(f"{head}event: {event}\n{lines}\n".encode())


def _complete_utf8(data: bytes) -> bytes:
    """Drop a multi-byte character cut at the end, so offsets stay on character boundaries."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte < 0x80:
            return data
        if byte >= 0xC0:  # a lead byte: is its sequence complete?
            need = 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            return data if back >= need else data[:-back]
    return data


def _offset(request: web.Request) -> int:
    raw = request.query.get("offset", "0") or "0"
    try:
        offset = int(raw)
    except ValueError:
        raise InvalidArgument(f"offset must be a whole number of bytes, got {raw!r}") from None
    if not 0 <= offset < 2**63:
        raise InvalidArgument("offset must be a whole number of bytes from 0 to 2^63-1")
    return offset


def logs_response(request: web.Request, logs: LogStore, row: Workload) -> web.Response:
    """GET .../logs?offset=N[&limit=M]: output from byte N, and where to continue."""
    return log_chunk_response(request, logs, row.public_id, row.status, row.active)


def log_chunk_response(request: web.Request, logs: LogStore, log_id: str, status: str, active: bool) -> web.Response:
    """The same for any log (a workload's, a build's)."""
    offset = _offset(request)
    try:
        limit = min(int(request.query.get("limit", str(MAX_LOG_CHUNK))), MAX_LOG_CHUNK)
    except ValueError:
        raise InvalidArgument("limit must be a whole number of bytes") from None
    if limit <= 0:
        raise InvalidArgument("limit must be more than 0")
    data = _complete_utf8(logs.read(log_id, offset, limit))
    size = logs.size(log_id)
    next_offset = offset + len(data)
    return web.json_response({
        "offset": str(offset),
        "next_offset": str(next_offset),
        "size": str(size),
        "content": data.decode("utf-8", errors="replace"),
        "status": status,
        "complete": not active and next_offset >= size,
    })


async def polled_event_stream(request: web.Request, logs: LogStore, log_id: str,
                              current: Callable[[], Awaitable[tuple[dict[str, Any], bool]]]) -> web.StreamResponse:
    """Server-sent events like event_stream's (`status`, `log`, `end`) for something that is not
    a workload (a build): `current()` gives its JSON and whether it has ended, asked on every
    poll (half a second) and whenever output comes."""
    offset, response = await _open_event_stream(request)
    send = functools.partial(_send_event, response)

    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    shown, ended = await current()
    await send("status", json.dumps(shown))
    idle = 0.0
    async for new_offset, chunk in logs.follow(log_id, offset, poll=0.5):
        if chunk:
            idle = 0.0
            await send("log", json.dumps(decoder.decode(chunk)), str(new_offset + len(chunk)))
        else:
            idle += 0.5
            if idle >= KEEPALIVE_SECONDS:
                idle = 0.0
                await response.write(b": keepalive\n\n")
        now, ended = await current()
        if now != shown:
            shown = now
            await send("status", json.dumps(shown))
        if ended and logs.size(log_id) <= new_offset + len(chunk):
            break
    await send("status", json.dumps((await current())[0]))
    await send("end", "{}")
    return response


async def event_stream(
    request: web.Request, pool: Any, hub: StatusHub, logs: LogStore, row: Workload
) -> web.StreamResponse:
    """Server-sent events: `status` events (JSON) and `log` events (text, id = byte offset).

    A browser that reconnects sends Last-Event-ID and continues where it stopped.
    """
    offset, response = await _open_event_stream(request)
    send = functools.partial(_send_event, response)

    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    idle = 0.0
    async with hub.subscribe() as queue:
        current = await store.get(pool, row.public_id) or row
        await send("status", json.dumps(workload_json(current)))
        # Short polls so that a status change with no output still reaches the browser at once.
        async for new_offset, chunk in logs.follow(row.public_id, offset, poll=0.5):
            changed = False
            while not queue.empty():
                event = queue.get_nowait()
                changed |= event.get("id") == row.public_id or bool(event.get("resync"))
            if changed:
                current = await store.get(pool, row.public_id) or current
                await send("status", json.dumps(workload_json(current)))
            if chunk:
                idle = 0.0
                await send("log", json.dumps(decoder.decode(chunk)), str(new_offset + len(chunk)))
                continue
            idle += 0.5
            if idle >= KEEPALIVE_SECONDS:
                idle = 0.0
                await response.write(b": keepalive\n\n")
            if current.status in states.FINISHED:
                current = await store.get(pool, row.public_id) or current
                if logs.size(row.public_id) <= new_offset:
                    break
        # The log may end (the workload closed it) before its last status event arrived: read it.
        current = await store.get(pool, row.public_id) or current
        await send("status", json.dumps(workload_json(current)))
        await send("end", "{}")
    return response
