"""Public identifiers shaped like CML's: four groups of four lower-case characters (a1b2-c3d4-e5f6-g7h8)."""

from __future__ import annotations

import re
import secrets

_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"
PUBLIC_ID_RE = re.compile(r"^[a-z0-9]{4}(-[a-z0-9]{4}){3}$")


def new_public_id() -> str:
    chars = "".join(secrets.choice(_ALPHABET) for _ in range(16))
    return "-".join(chars[i : i + 4] for i in range(0, 16, 4))


def slugify(name: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return slug or "project"
