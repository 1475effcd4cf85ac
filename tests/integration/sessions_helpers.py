"""Helpers for session tests: waiting for a status, and a terminal client over the WebSocket."""

from __future__ import annotations

import asyncio
import json
import re
import time
from typing import Any

import aiohttp

from tests.conftest import Api


async def wait_status(api: Api, project_id: str, session_id: str, wanted: str | tuple[str, ...], timeout: float = 20) -> dict[str, Any]:
    wanted = (wanted,) if isinstance(wanted, str) else wanted
    deadline = time.monotonic() + timeout
    body: dict[str, Any] = {}
    while time.monotonic() < deadline:
        status, body = await api.get(f"/api/v2/projects/{project_id}/sessions/{session_id}")
        assert status == 200, body
        if body["status"] in wanted:
            return body
        await asyncio.sleep(0.05)
    raise AssertionError(f"session stayed {body.get('status')} ({body.get('reason')}), wanted {wanted}")


async def start_running_session(api: Api, project_id: str, **fields: Any) -> dict[str, Any]:
    status, body = await api.post(f"/api/v2/projects/{project_id}/sessions", json=fields)
    assert status == 200, body
    return await wait_status(api, project_id, body["id"], "ENGINE_RUNNING")


class TerminalClient:
    """Talks to .../terminal: sends keystrokes as binary frames, collects the screen's bytes."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse):
        self.ws = ws
        self.output = b""

    async def send(self, text: str) -> None:
        await self.ws.send_bytes(text.encode())

    async def resize(self, cols: int, rows: int) -> None:
        await self.ws.send_str(json.dumps({"type": "resize", "cols": cols, "rows": rows}))

    async def expect(self, needle: str, timeout: float = 10) -> str:
        """Wait until `needle` has appeared on the screen; returns all the text so far."""
        await self.expect_match(re.escape(needle), timeout)
        return self.output.decode(errors="replace")

    async def expect_match(self, pattern: str, timeout: float = 10) -> re.Match[str]:
        """Wait for a regular expression to match the screen's text; returns the match."""
        deadline = time.monotonic() + timeout
        while True:
            found = re.search(pattern, self.output.decode(errors="replace"))
            if found:
                return found
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"{pattern!r} never matched; got {self.output[-500:]!r}")
            try:
                msg = await self.ws.receive(timeout=remaining)
            except TimeoutError:
                continue
            if msg.type == aiohttp.WSMsgType.BINARY:
                self.output += msg.data
            elif msg.type != aiohttp.WSMsgType.TEXT:
                raise AssertionError(f"closed before {pattern!r} matched: {self.output[-500:]!r}")

    async def wait_closed(self, timeout: float = 15) -> tuple[int | None, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg = await self.ws.receive(timeout=deadline - time.monotonic())
            if msg.type == aiohttp.WSMsgType.BINARY:
                self.output += msg.data
            elif msg.type == aiohttp.WSMsgType.CLOSE:
                return msg.data, msg.extra or ""
            elif msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING):
                return self.ws.close_code, ""
        raise AssertionError("the terminal was not closed")


async def open_terminal(api: Api, project_id: str, session_id: str, headers: dict[str, str] | None = None) -> TerminalClient:
    ws = await api.client.ws_connect(
        f"/api/v2/projects/{project_id}/sessions/{session_id}/terminal",
        headers={"Authorization": f"Bearer {api.key}", **(headers or {})},
    )
    return TerminalClient(ws)
