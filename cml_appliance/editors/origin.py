"""The editors' own origin: a listener of its own (editors_port), never the UI's nor the
applications'. A notebook runs the user's code and renders what it likes; on the UI's origin it
could read the UI's pages and CSRF tokens and act as the user, and on the applications' origin
another user's application could drive it. The user is handed over from the UI with a one-time
token (web/handoff.py) for a cookie of this origin alone (EDITOR_COOKIE)."""

from __future__ import annotations

from urllib.parse import urlsplit

from aiohttp import web

from cml_appliance.core.settings import Settings
from cml_appliance.web.handoff import HANDOFF_PATH, HandoffOrigin

EDITOR_COOKIE = "cml_editor"


class EditorsOrigin(HandoffOrigin):
    def __init__(self, settings: Settings):
        super().__init__(settings, "editors-origin-cookie")
        self.port = settings.editors_port  # the bound port once the listener runs (0: any)

    def base(self, request: web.Request) -> str:
        """The editors' listener as users reach it."""
        if self.settings.editors_url:
            return self.settings.editors_url.rstrip("/")
        scheme, host = self._scheme_and_host(request)
        return f"{scheme}://{host}:{self.port}"

    def handoff_url(self, request: web.Request, token: str) -> str:
        return f"{self.base(request)}{HANDOFF_PATH}?token={token}"

    def origin_of(self, request: web.Request) -> str:
        """This listener's origin as the browser names it in an Origin header."""
        parts = urlsplit(self.base(request))
        return f"{parts.scheme}://{parts.netloc}"

    @property
    def secure(self) -> bool:
        return (self.settings.editors_url or self.settings.public_url).startswith("https://")
