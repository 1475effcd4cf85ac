"""Project roles and the checks every route makes.

CML's project permissions, weakest first: read (Viewer), operator, write (Contributor), admin.
The owner and site admins hold admin. Public projects grant read to every signed-in user.
"""

from __future__ import annotations

import enum

from cml_appliance.core.errors import NotFound, PermissionDenied


class Role(enum.IntEnum):
    NONE = 0
    READ = 1
    OPERATOR = 2
    WRITE = 3
    ADMIN = 4

    @classmethod
    def parse(cls, permission: str | None) -> Role:
        return _BY_NAME.get(permission or "", cls.NONE)

    @property
    def permission(self) -> str:
        return self.name.lower()

    def flags(self) -> dict[str, bool]:
        """CML's ProjectPermissions for the caller."""
        return {
            "read": self >= Role.READ,
            "operator": self >= Role.OPERATOR,
            "write": self >= Role.WRITE,
            "admin": self >= Role.ADMIN,
            "business_user": False,
            "inherit": False,
        }


_BY_NAME = {"read": Role.READ, "operator": Role.OPERATOR, "write": Role.WRITE, "admin": Role.ADMIN}
PERMISSION_NAMES = tuple(_BY_NAME)


def require(role: Role, needed: Role, what: str) -> None:
    """No access at all reads as not found (existence is not leaked); too weak a role is a 403."""
    if role < Role.READ:
        raise NotFound(f"{what} not found")
    if role < needed:
        raise PermissionDenied(f"you need the {needed.permission} permission on this project to do that")
