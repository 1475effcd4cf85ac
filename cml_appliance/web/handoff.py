"""Handing a signed-in user over from the UI to an origin of its own (the applications', the
editors'): one-time tokens, and that origin's own cookie.

Content that users serve runs on another origin than the UI's, where the UI's sign-in cookie is
never accepted. To get there signed in, the UI (which knows the user) issues a token valid once
for HANDOFF_TTL_SECONDS and redirects to the other origin's hand-over path, which trades it for a
cookie of that origin: HttpOnly, signed with the site key for that origin's purpose alone (a
cookie of one origin is worthless on another), naming the sign-in session it came from, so that
signing out of the UI closes the other origins too.
"""

from __future__ import annotations

import dataclasses
import time
from urllib.parse import urlsplit

from aiohttp import web

from cml_appliance.core.security import new_token, sign, verify_signature
from cml_appliance.core.settings import Settings

HANDOFF_PATH = "/_cml/handoff"
HANDOFF_TTL_SECONDS = 60
MAX_PENDING_HANDOFFS = 10_000


@dataclasses.dataclass(frozen=True)
class Handoff:
    login_digest: str
    scope: str  # what the token opens: an application's subdomain, a session's id
    target: str  # the path and query the user asked for
    expires: float


class HandoffOrigin:
    """The hand-over tokens and the cookie of one origin; `purpose` keeps its signatures apart."""

    def __init__(self, settings: Settings, purpose: str):
        self.settings = settings
        self.purpose = purpose
        self._handoffs: dict[str, Handoff] = {}

    def _scheme_and_host(self, request: web.Request) -> tuple[str, str]:
        """The UI's scheme and host name as users see them: public_url's, else the request's."""
        if self.settings.public_url:
            parts = urlsplit(self.settings.public_url)
            return parts.scheme, parts.hostname or "localhost"
        host = request.url.host or "localhost"
        return request.scheme, f"[{host}]" if ":" in host else host

    def ui_url(self, request: web.Request, path_qs: str) -> str:
        """A page of the UI, for a visitor of this origin who must go back there (to sign in)."""
        if self.settings.public_url:
            return self.settings.public_url.rstrip("/") + path_qs
        scheme, host = self._scheme_and_host(request)
        return f"{scheme}://{host}:{self.settings.port}{path_qs}"

    def issue(self, login_digest: str, scope: str, target: str) -> str:
        now = time.monotonic()
        if len(self._handoffs) >= MAX_PENDING_HANDOFFS:
            self._handoffs = {t: h for t, h in self._handoffs.items() if h.expires > now}
            if len(self._handoffs) >= MAX_PENDING_HANDOFFS:
                self._handoffs.clear()
        token = new_token()
        self._handoffs[token] = Handoff(login_digest, scope, target, now + HANDOFF_TTL_SECONDS)
        return token

    def redeem(self, token: str, scope: str | None) -> Handoff | None:
        """The hand-over a token stands for, once; None when unknown, used, expired or issued for
        another scope than `scope` (when given)."""
        handoff = self._handoffs.pop(token, None)
        if handoff is None or handoff.expires < time.monotonic():
            return None
        if scope is not None and handoff.scope != scope:
            return None
        return handoff

    def cookie_value(self, login_digest: str) -> str:
        expires = int(time.time()) + self.settings.session_hours * 3600
        message = f"{login_digest}.{expires}"
        return f"{message}.{sign(self.settings.secret_key, self.purpose + ':' + message)}"

    def login_digest_of(self, cookie: str | None) -> str | None:
        """The sign-in session a valid cookie of this origin names, else None."""
        if not cookie:
            return None
        digest, _, rest = cookie.partition(".")
        expires, _, signature = rest.partition(".")
        if not (digest and expires.isdigit() and signature):
            return None
        if not verify_signature(self.settings.secret_key, f"{self.purpose}:{digest}.{expires}", signature):
            return None
        return digest if int(expires) > time.time() else None
