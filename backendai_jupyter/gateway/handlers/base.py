"""What every /v1 handler shares: authentication before the body, a bounded body, JSON errors."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import secrets
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from tornado import web

from ...common import signing
from ...common.errors import ApiError, InvalidRequest, LengthRequired, NotFound, PayloadTooLarge, Unauthorized
from ..auth import Authenticator
from ..models import User
from ..requests import RequestModel
from ..sessions import SessionService

log = logging.getLogger(__name__)
M = TypeVar("M", bound=RequestModel)

# One answer for an unknown access key and for a wrong signature, so that nobody can find out
# which access keys exist by trying them.
BAD_SIGNATURE = "access key unknown or signature does not match: sign with your keypair's secret key"
# What an unknown access key is checked against: the same work as for a known one, then a refusal.
_NO_SECRET = secrets.token_urlsafe(30)


class AuthMixin:
    """Authenticates a request in two steps: its headers first, then its body's signature."""

    request: Any
    settings: dict[str, Any]
    get_query_argument: Any
    current_user: User
    access_key: str
    # A signed request between the two steps: its signature and (secret, user) where the key exists.
    _signed: tuple[str, tuple[str, User] | None] | None = None

    async def authenticate(self) -> None:
        """Who is calling, from the headers alone: nothing of the body has been read yet.

        A token names its user here. A signed request is checked as far as its headers allow
        (well-formed, dated within the clock window); its signature covers the body, so
        :meth:`verify_signature` finishes once the body is in.
        """
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
            self._signed = None
            return
        if not header:
            raise Unauthorized(
                "authentication required: sign the request with your keypair, or send your token"
            )
        nonce = self.request.headers.get(signing.NONCE_HEADER, "")
        try:
            access_key, signature = signing.parse_authorization(header)
            signing.check_nonce(nonce)
            signing.check_date(self.request.headers.get(signing.DATE_HEADER, ""))
        except signing.SignatureError as e:
            raise Unauthorized(str(e)) from None
        self.access_key = access_key
        self._signed = (signature, await auth.lookup(access_key))

    def claimed_user(self) -> User | None:
        """Who the request says it is, before a signed body is checked (None: nobody known).

        For handlers that must act while the body streams in (files going to disk); what they
        do stays undone until :meth:`verify_signature` has passed.
        """
        if self._signed is None:
            return self.current_user
        found = self._signed[1]
        return found[1] if found is not None and not found[1].disabled else None

    async def verify_signature(self, body: bytes, *, digest: str | None = None) -> None:
        """For a signed request, check the signature over the body as read; a no-op for tokens.

        A body streamed to disk instead of memory passes its sha256 (hex) as ``digest``.
        """
        if self._signed is None:
            return
        signature, found = self._signed
        secret, user = found if found is not None else (_NO_SECRET, None)
        nonce = self.request.headers.get(signing.NONCE_HEADER, "")
        try:
            when = signing.verify_digest(
                secret,
                signature,
                self.request.method,
                self.request.uri,
                self.request.headers.get(signing.DATE_HEADER, ""),
                digest if digest is not None else hashlib.sha256(body).hexdigest(),
                nonce,
            )
        except signing.SignatureError as e:
            title = str(e)
            raise Unauthorized(BAD_SIGNATURE if title == "signature does not match" else title) from None
        if user is None:
            raise Unauthorized(BAD_SIGNATURE)
        # Recorded only once the signature holds, so nobody without the secret can fill the cache.
        await self.settings["nonces"].accept(self.access_key, nonce, when)  # refuses a replay
        # Only the key's holder gets this far, so saying "disabled" tells nobody else anything.
        if user.disabled:
            raise Unauthorized("this user is disabled")
        self.current_user = user
        self._signed = None


HTTP_METHODS = ("get", "post", "put", "patch", "delete")


def _after_body(method: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
    @functools.wraps(method)
    async def run(self: ApiHandler, *args: Any, **kwargs: Any) -> None:
        if self._finished:
            return  # refused while the body came in
        await self.body_received()
        await method(self, *args, **kwargs)

    run.__wrapped_after_body__ = True  # type: ignore[attr-defined]
    return run


@web.stream_request_body
class ApiHandler(AuthMixin, web.RequestHandler):
    """A JSON handler under /v1.

    The body is streamed so that :meth:`prepare` runs on the headers alone: a caller without
    valid credentials, or with a body over ``Gateway.max_request_body``, is refused before a
    byte of the body is read. Every HTTP method of a subclass runs only after the body is in,
    its signature checked (:meth:`body_received`) and :meth:`authorize` passed.
    """

    _body: bytearray | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name in HTTP_METHODS:
            method = cls.__dict__.get(name)
            if method is not None and not getattr(method, "__wrapped_after_body__", False):
                setattr(cls, name, _after_body(method))

    @property
    def sessions(self) -> SessionService:
        return self.settings["sessions"]

    @property
    def max_body(self) -> int:
        return int(self.settings["max_request_body"])

    def set_default_headers(self) -> None:
        self.set_header("Content-Type", "application/json")

    async def prepare(self) -> None:
        try:
            await self.authenticate()
            self._check_length()
        except ApiError as e:
            self.send_api_error(e)
            return
        self._body = bytearray()

    def _check_length(self) -> None:
        length = self.request.headers.get("Content-Length")
        if length is None:
            if "Transfer-Encoding" in self.request.headers:
                raise LengthRequired("send the request body with a Content-Length header, not chunked")
            return
        if not (length.isascii() and length.strip().isdigit()):  # not "²", which int() refuses
            raise InvalidRequest("Content-Length must be a whole number of bytes")
        if int(length) > self.max_body:
            raise PayloadTooLarge(self._too_large(int(length)))

    def _too_large(self, size: int) -> str:
        return (
            f"the request body is {size} bytes; the gateway takes at most {self.max_body} "
            "(Gateway.max_request_body)"
        )

    def data_received(self, chunk: bytes) -> None:
        if self._body is None or self._finished:
            return  # refused already: what still arrives is dropped
        # Content-Length was checked and tornado reads no more than it says; this bound is a backstop.
        if len(self._body) + len(chunk) > self.max_body:
            self._body = None
            self.send_api_error(PayloadTooLarge(self._too_large(self.max_body + 1)))
            return
        self._body += chunk

    async def body_received(self) -> None:
        """The body is in: check its signature and the caller's rights before the method runs."""
        body = bytes(self._body or b"")
        self.request.body = body
        await self.verify_signature(body)
        self.authorize()

    def authorize(self) -> None:
        """Refuse a caller who may not use this handler at all (raise :class:`ApiError`)."""

    def body_as(self, model: type[M], **context: Any) -> M:
        """The request's JSON body validated as ``model`` (no body is ``{}``), or
        :class:`InvalidRequest` naming each field that is wrong; ``context`` is for its validators."""
        return model.from_body(self.request.body, **context)

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
        self.send_api_error(NotFound("no such endpoint"))
