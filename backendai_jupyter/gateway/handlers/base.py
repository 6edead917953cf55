"""What every /v1 handler shares: request authentication and JSON errors."""

from __future__ import annotations

import json
import logging
from typing import Any

from tornado import web

from ...common import signing
from ...common.errors import ApiError, InvalidRequest, Unauthorized
from ..auth import Authenticator
from ..models import User
from ..sessions import SessionService

log = logging.getLogger(__name__)


class AuthMixin:
    """Authenticates the request from its signature before any handler method runs."""

    request: Any
    settings: dict[str, Any]
    get_query_argument: Any
    current_user: User
    access_key: str

    async def authenticate(self) -> None:
        auth: Authenticator = self.settings["authenticator"]
        header = self.request.headers.get("Authorization", "")
        token = (
            header[6:].strip()
            if header.lower().startswith("token ")
            else self.get_query_argument("token", "")
        )
        if token:
            user = await auth.lookup_token(token)
            if user is None or user.disabled:
                raise Unauthorized("invalid token")
            self.current_user = user
            self.access_key = ""
            return
        if not header:
            raise Unauthorized(
                "authentication required: sign the request with your keypair, or send your token"
            )
        try:
            self.access_key, signature = signing.parse_authorization(header)
        except signing.SignatureError as e:
            raise Unauthorized(str(e)) from None
        found = await auth.lookup(self.access_key)
        if found is None:
            raise Unauthorized("unknown access key")
        secret, user = found
        if user.disabled:
            raise Unauthorized("this user is disabled")
        nonce = self.request.headers.get(signing.NONCE_HEADER, "")
        try:
            when = signing.verify(
                secret,
                signature,
                self.request.method,
                self.request.uri,
                self.request.headers.get(signing.DATE_HEADER, ""),
                self.request.body or b"",
                nonce,
            )
        except signing.SignatureError as e:
            raise Unauthorized(str(e)) from None
        self.settings["nonces"].remember(self.access_key, nonce, when)  # refuses a replay
        self.current_user = user


class ApiHandler(AuthMixin, web.RequestHandler):
    """A JSON handler under /v1."""

    @property
    def sessions(self) -> SessionService:
        return self.settings["sessions"]

    def set_default_headers(self) -> None:
        self.set_header("Content-Type", "application/json")

    async def prepare(self) -> None:
        try:
            await self.authenticate()
        except ApiError as e:
            self.send_api_error(e)

    def json_body(self) -> dict[str, Any]:
        try:
            body = json.loads(self.request.body or b"{}")
        except (ValueError, UnicodeDecodeError):
            raise InvalidRequest("the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise InvalidRequest("the request body must be a JSON object")
        return body

    def write_json(self, data: Any, status: int = 200) -> None:
        self.set_status(status)
        self.finish(json.dumps(data))

    def send_api_error(self, e: ApiError) -> None:
        self.set_status(e.status)
        self.finish(json.dumps(e.to_json()))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None))[1]
        if isinstance(exc, ApiError):
            self.set_status(exc.status)
            self.finish(json.dumps(exc.to_json()))
            return
        reason = self._reason
        body = {
            "type": "server-error" if status_code >= 500 else "http-error",
            "title": reason,
            "status": status_code,
        }
        self.finish(json.dumps(body))

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        if isinstance(value, ApiError):
            log.info("%s %s -> %s %s", self.request.method, self.request.path, value.status, value.title)
        else:
            super().log_exception(typ, value, tb)


class NotFoundHandler(ApiHandler):
    async def prepare(self) -> None:
        self.send_api_error(ApiError("no such endpoint", status=404))
