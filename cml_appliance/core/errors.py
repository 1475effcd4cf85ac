"""Domain errors that carry their HTTP status and gRPC code.

The API answers every error with CML's runtimeError shape:
{"error": message, "code": grpc_code, "message": message, "details": []}.
"""

from __future__ import annotations

from typing import Any


class AppError(Exception):
    """Base class: subclasses set the HTTP status and the gRPC code CML would use."""

    status = 500
    grpc_code = 13  # INTERNAL

    def __init__(self, message: str, *, details: list[dict[str, Any]] | None = None):
        super().__init__(message)
        self.message = message
        self.details = details or []

    def body(self) -> dict[str, Any]:
        return {"error": self.message, "code": self.grpc_code, "message": self.message, "details": self.details}


class InvalidArgument(AppError):
    status = 400
    grpc_code = 3


class Unauthenticated(AppError):
    status = 401
    grpc_code = 16


class PermissionDenied(AppError):
    status = 403
    grpc_code = 7


class NotFound(AppError):
    status = 404
    grpc_code = 5


class AlreadyExists(AppError):
    status = 409
    grpc_code = 6


class FailedPrecondition(AppError):
    status = 400
    grpc_code = 9


class PayloadTooLarge(AppError):
    status = 413
    grpc_code = 8  # RESOURCE_EXHAUSTED


class StorageFull(AppError):
    """The data disk has no room left (ENOSPC, EDQUOT): the request is refused, nothing half-written."""

    status = 507
    grpc_code = 8  # RESOURCE_EXHAUSTED


class TooManyRequests(AppError):
    status = 429
    grpc_code = 8

    def __init__(self, message: str, *, retry_after: int = 60):
        super().__init__(message)
        self.retry_after = retry_after


class QuotaExceeded(AppError):
    """A workload would take its account past its quota; the message names the quota and what runs."""

    status = 429
    grpc_code = 8  # RESOURCE_EXHAUSTED


class Unimplemented(AppError):
    """An operation of CML's API that has no meaning on this appliance; the message says why."""

    status = 501
    grpc_code = 12


class Unavailable(AppError):
    status = 503
    grpc_code = 14


# What a page's action must answer as a refusal (its error page: 403, or 404 so existence is not
# leaked), never as a message beside the form it came from.
REFUSALS = (Unauthenticated, PermissionDenied, NotFound)
