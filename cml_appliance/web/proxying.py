"""What the appliance's two reverse proxies (applications/proxy.py to applications,
editors/proxy.py to session editors) share: which headers stay behind, how the appliance's own
cookies are kept from the upstream both ways, and relaying a WebSocket."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
from aiohttp import WSMsgType, web
from multidict import CIMultiDict

from cml_appliance.core.errors import Unavailable
from cml_appliance.core.tasks import until_first_done

HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
                        "transfer-encoding", "upgrade", "host", "content-length"})
# The appliance's own cookies (sign-in, flash, pre-sign-in, the applications' and editors'
# origins): an upstream never sees them and may never set them.
APPLIANCE_COOKIE_PREFIX = "cml_"


def forwarded_cookies(request: web.Request) -> str | None:
    """The upstream's own cookies, without any of the appliance's."""
    kept = [part.strip() for part in request.headers.get("Cookie", "").split(";")
            if part.strip() and not part.strip().lower().startswith(APPLIANCE_COOKIE_PREFIX)]
    return "; ".join(kept) or None


def sets_appliance_cookie(name: str, value: str) -> bool:
    """An upstream's Set-Cookie for one of the appliance's cookies, which would replace the user's
    sign-in (a fixation) on this host: to be dropped."""
    return name.lower() == "set-cookie" and value.split("=", 1)[0].strip().lower().startswith(APPLIANCE_COOKIE_PREFIX)


async def relay_websocket(request: web.Request, client: aiohttp.ClientSession, target: str, headers: CIMultiDict[str],
                          *, what: str, max_msg_size: int = 4 * 1024 * 1024) -> web.WebSocketResponse:
    """Open the WebSocket upstream first (with the subprotocols the browser offered), then accept
    the browser's with the one upstream chose, and relay frames both ways until either closes."""
    protocols = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()]
    forward = {k: v for k, v in headers.items() if not k.lower().startswith("sec-websocket")}
    try:
        upstream = await client.ws_connect(target, headers=forward, protocols=protocols, max_msg_size=max_msg_size)
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        raise Unavailable(f"the {what} did not accept the WebSocket: {exc}") from None
    ws = web.WebSocketResponse(protocols=[upstream.protocol] if upstream.protocol else (), heartbeat=25,
                               max_msg_size=max_msg_size)
    await ws.prepare(request)

    async def pump(source: Any, sink: Any) -> None:
        async for msg in source:
            if msg.type == WSMsgType.TEXT:
                await sink.send_str(msg.data)
            elif msg.type == WSMsgType.BINARY:
                await sink.send_bytes(msg.data)
            else:
                break

    try:
        await until_first_done(pump(ws, upstream), pump(upstream, ws))
    finally:
        await upstream.close()
        await ws.close()
    return ws
