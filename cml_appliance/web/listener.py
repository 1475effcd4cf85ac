"""Listeners besides the main one: each a small aiohttp application of its own (only the routes
it serves), run by a runner of its own while the main application runs, and sharing the main
application's services. The applications' origin (applications/origin.py) and the internal
loopback listener (the builder's and the container engine's way to the git server and the
registry) are two.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterable
from typing import Any

from aiohttp import web


def sharing(main: web.Application, keys: Iterable[web.AppKey[Any]], *, middlewares: Iterable[Any] = (),
            client_max_size: int = 1024 ** 2) -> web.Application:
    """A new application that uses `main`'s services under the same keys."""
    app = web.Application(middlewares=list(middlewares), client_max_size=client_max_size)
    for key in keys:
        app[key] = main[key]
    return app


@contextlib.asynccontextmanager
async def serving(app: web.Application, host: str, port: int, header_timeout: float,
                  ssl_context: Any = None) -> AsyncIterator[int]:
    """Serve `app` on host:port (0: any free port) until the block ends; yields the bound port."""
    runner = web.AppRunner(app, access_log=None, keepalive_timeout=header_timeout, shutdown_timeout=5)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port, ssl_context=ssl_context).start()
        yield int(runner.addresses[0][1])
    finally:
        await runner.cleanup()
