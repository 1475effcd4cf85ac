"""Docker token auth for the registry proxy: who may pull and push which repository.

A repository belongs to a project: `<owner>/<project slug>/<name>`. Pulling needs the project's
read role, pushing its write role, as the git server does. The token endpoint grants what the
caller's role allows of what was asked, and no more (Docker's token protocol: a scope the caller
may not have is left out, not refused). Tokens are signed with the site key and last
TOKEN_SECONDS; clients treat them as opaque.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import re
import time

import asyncpg

from cml_appliance.auth.permissions import Role
from cml_appliance.auth.users import User
from cml_appliance.core.security import sign, verify_signature
from cml_appliance.projects import store as project_store

TOKEN_SECONDS = 300
SERVICE = "cml-appliance"
_PURPOSE = "registry-token"
# distribution's grammar for a repository name component; three at least: owner, slug, name.
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
REPOSITORY_RE = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT}){{2,}}$")
ACTIONS_BY_ROLE = {"pull": Role.READ, "push": Role.WRITE, "delete": Role.WRITE}


@dataclasses.dataclass(frozen=True)
class Grant:
    user_id: int
    access: dict[str, frozenset[str]]  # repository -> actions

    def allows(self, repository: str, action: str) -> bool:
        return action in self.access.get(repository, frozenset())


def parse_scope(scope: str) -> tuple[str, set[str]] | None:
    """`repository:<name>:pull,push` -> (name, {"pull", "push"}); None for other scopes."""
    kind, _, rest = scope.partition(":")
    name, _, actions = rest.rpartition(":")
    if kind != "repository" or not name:
        return None
    return name, {a for a in actions.split(",") if a}


def split_repository(name: str) -> tuple[str, str] | None:
    """(owner, project slug) of a repository name, or None when it names no project's."""
    if not REPOSITORY_RE.match(name):
        return None
    owner, slug, _ = name.split("/", 2)
    return owner, slug


async def grant(pool: asyncpg.Pool, user: User, scopes: list[str]) -> Grant:
    """What of `scopes` the user may have."""
    access: dict[str, frozenset[str]] = {}
    for scope in scopes:
        parsed = parse_scope(scope)
        if parsed is None:
            continue
        name, wanted = parsed
        owner_slug = split_repository(name)
        if owner_slug is None:
            continue
        project = await project_store.get_by_owner_slug(pool, user, *owner_slug)
        if project is None or project.creation_status != "success":
            continue
        allowed = {a for a in wanted if a in ACTIONS_BY_ROLE and project.role >= ACTIONS_BY_ROLE[a]}
        if allowed:
            access[name] = access.get(name, frozenset()) | allowed
    return Grant(user.id, access)


def issue(secret: str, granted: Grant, now: float | None = None) -> str:
    body = {"sub": granted.user_id, "exp": int((now or time.time()) + TOKEN_SECONDS),
            "access": {name: sorted(actions) for name, actions in granted.access.items()}}
    payload = base64.urlsafe_b64encode(json.dumps(body, separators=(",", ":")).encode()).decode().rstrip("=")
    return f"{payload}.{sign(secret, _PURPOSE + ':' + payload)}"


def verify(secret: str, token: str) -> Grant | None:
    payload, _, signature = token.partition(".")
    if not payload or not signature or not verify_signature(secret, _PURPOSE + ":" + payload, signature):
        return None
    try:
        body = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (binascii.Error, ValueError):
        return None
    if not isinstance(body, dict) or not isinstance(body.get("exp"), int) or body["exp"] < time.time():
        return None
    return Grant(int(body["sub"]), {str(k): frozenset(v) for k, v in dict(body.get("access", {})).items()})
