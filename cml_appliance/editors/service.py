"""Who may open which session's editor, and one HTTP client per editor socket (the proxy's
state; editors/proxy.py has the handlers)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from typing import Any

import aiohttp

from cml_appliance.auth import login_sessions
from cml_appliance.auth.users import User
from cml_appliance.core.errors import AppError, NotFound, Unauthenticated, Unavailable
from cml_appliance.editors.sockets import POD_PORT, EditorSockets
from cml_appliance.engines.base import EngineError, EngineUnavailable
from cml_appliance.workloads import states
from cml_appliance.workloads import store as workload_store

ACCESS_TTL_SECONDS = 2.0  # who may open which session, remembered this long (JupyterLab asks often)
MAX_REMEMBERED = 10_000


@dataclasses.dataclass
class Access:
    user: User | None
    target: str  # the editor's Unix socket (a path), or a pod's relay (host:port); "" when refused
    why: AppError | None

    @property
    def base_url(self) -> str:
        return "http://editor" if self.target.startswith("/") else f"http://{self.target}"


class EditorProxy:
    """Where each session's editor is, who may open it, and a client per socket."""

    def __init__(self, pool: Any, sockets: EditorSockets, engines: Mapping[str, Any]):
        self.pool = pool
        self.sockets = sockets
        self.engines = engines  # a pod's editor is reached through its engine's relay
        self._access: dict[tuple[str, str], tuple[float, Access]] = {}
        self._clients: dict[str, aiohttp.ClientSession] = {}

    async def access(self, login_digest: str | None, session_id: str) -> Access:
        key = (login_digest or "", session_id)
        now = time.monotonic()
        seen = self._access.get(key)
        if seen is not None and now - seen[0] < ACCESS_TTL_SECONDS:
            return seen[1]
        found = await self._decide(login_digest, session_id)
        if len(self._access) >= MAX_REMEMBERED:
            self._access.clear()
        self._access[key] = (now, found)
        return found

    async def _decide(self, login_digest: str | None, session_id: str) -> Access:
        login = await login_sessions.resolve_digest(self.pool, login_digest) if login_digest else None
        if login is None:
            return Access(None, "", Unauthenticated("open the editor from the session's page in the appliance"))
        row = await workload_store.get(self.pool, session_id)
        # Another user's session reads as missing: nobody learns what others run.
        if row is None or row.kind != "session" or not row.editor or row.creator_id != login.user.id:
            return Access(login.user, "", NotFound(f"there is no editor for session {session_id!r}"))
        if row.status != states.RUNNING:
            await self.forget(session_id)  # its client, if one was made, is of no more use
            return Access(login.user, "", Unavailable(f"the session is not running ({row.status.removeprefix('ENGINE_').lower()})"))
        if row.engine == "kubernetes":
            try:
                address = await self.engines[row.engine].address(row.handle, POD_PORT)
            except (EngineError, EngineUnavailable, KeyError) as exc:
                return Access(login.user, "", Unavailable(f"the session's pod cannot be reached: {exc}"))
            return Access(login.user, address, None)
        return Access(login.user, str(self.sockets.socket(session_id)), None)

    def client(self, target: str) -> aiohttp.ClientSession:
        """A client per Unix socket; one for every pod (TCP)."""
        key = target if target.startswith("/") else "tcp"
        session = self._clients.get(key)
        if session is None or session.closed:
            connector = aiohttp.UnixConnector(path=target) if target.startswith("/") else aiohttp.TCPConnector()
            session = self._clients[key] = aiohttp.ClientSession(
                connector=connector, auto_decompress=False, timeout=aiohttp.ClientTimeout(total=None, sock_connect=10))
        return session

    async def forget(self, session_id: str) -> None:
        client = self._clients.pop(str(self.sockets.socket(session_id)), None)
        if client is not None:
            await client.close()

    async def close(self) -> None:
        for client in self._clients.values():
            await client.close()
        self._clients.clear()
