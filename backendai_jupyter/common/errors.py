"""Errors that cross the wire: a stable ``type``, a human ``title``, an HTTP status."""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    """An error a client can act on; serialised as JSON ``{"type", "title", "status", ...}``."""

    status = 400
    type = "bad-request"

    def __init__(self, title: str, *, status: int | None = None, **extra: Any) -> None:
        super().__init__(title)
        self.title = title
        if status is not None:
            self.status = status
        self.extra = extra

    def to_json(self) -> dict[str, Any]:
        """The JSON body of an error response."""
        return {"type": self.type, "title": self.title, "status": self.status, **self.extra}

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> ApiError:
        """Rebuild an error from a response body, keeping its type."""
        err_cls = _BY_TYPE.get(body.get("type", ""), ApiError)
        extra = {k: v for k, v in body.items() if k not in ("type", "title", "status")}
        err = err_cls(body.get("title", "unknown error"), status=body.get("status"), **extra)
        err.type = body.get("type", err.type)
        return err


class InvalidRequest(ApiError):
    type = "invalid-request"


class Unauthorized(ApiError):
    status = 401
    type = "unauthorized"


class Forbidden(ApiError):
    status = 403
    type = "forbidden"


class NotFound(ApiError):
    status = 404
    type = "not-found"


class Conflict(ApiError):
    status = 409
    type = "conflict"


class PayloadTooLarge(ApiError):
    status = 413
    type = "payload-too-large"


class LengthRequired(ApiError):
    status = 411
    type = "length-required"


class UnknownImage(ApiError):
    type = "unknown-image"


class InsufficientResources(ApiError):
    type = "insufficient-resources"


class AgentUnavailable(ApiError):
    status = 503
    type = "agent-unavailable"


_BY_TYPE: dict[str, type[ApiError]] = {
    c.type: c
    for c in (
        ApiError,
        InvalidRequest,
        Unauthorized,
        Forbidden,
        NotFound,
        Conflict,
        PayloadTooLarge,
        LengthRequired,
        UnknownImage,
        InsufficientResources,
        AgentUnavailable,
    )
}


class LaunchError(RuntimeError):
    """The gateway could not give a client its kernel; the message says why and what to do."""


class LaunchTimeout(LaunchError):
    """The kernel was not running within the launch timeout (and was cancelled)."""
