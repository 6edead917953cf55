"""HMAC request signing between clients and the gateway's ``/v1`` API.

A request carries ``Authorization: BackendAI-HMAC-SHA256 credential=<access key>,
signature=<hex>`` and ``X-BackendAI-Date``. The signature covers the method, the path with
its query, the date and a hash of the body, so a captured request cannot be replayed with
another body, on another path, or after the clock window closes.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from datetime import UTC, datetime, timedelta

SCHEME = "BackendAI-HMAC-SHA256"
DATE_HEADER = "X-BackendAI-Date"
MAX_CLOCK_SKEW = timedelta(minutes=5)
_AUTH_RE = re.compile(rf"^{SCHEME}\s+credential=([A-Za-z0-9]+),\s*signature=([0-9a-f]{{64}})$")


class SignatureError(Exception):
    """The request's signature is missing, malformed, stale or wrong."""


def new_keypair() -> tuple[str, str]:
    """A fresh (access key, secret key) pair."""
    return "AK" + secrets.token_hex(9).upper(), secrets.token_urlsafe(30)


def new_token() -> str:
    """A user's API token (for the Jupyter Kernel Gateway API and simple clients)."""
    return secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    """What the gateway stores instead of the token itself."""
    return hashlib.sha256(token.encode()).hexdigest()


def _string_to_sign(method: str, path: str, date: str, body: bytes) -> bytes:
    return "\n".join([method.upper(), path, date, hashlib.sha256(body).hexdigest()]).encode()


def sign(access_key: str, secret_key: str, method: str, path: str, body: bytes = b"") -> dict[str, str]:
    """Headers that authenticate one request (``path`` includes the query string)."""
    date = datetime.now(UTC).isoformat(timespec="seconds")
    sig = hmac.new(secret_key.encode(), _string_to_sign(method, path, date, body), hashlib.sha256)
    return {
        "Authorization": f"{SCHEME} credential={access_key}, signature={sig.hexdigest()}",
        DATE_HEADER: date,
    }


def parse_authorization(header: str) -> tuple[str, str]:
    """Split an Authorization header into (access key, signature)."""
    m = _AUTH_RE.match(header.strip())
    if not m:
        raise SignatureError(f"Authorization header must be '{SCHEME} credential=..., signature=...'")
    return m.group(1), m.group(2)


def check_date(date: str) -> None:
    """Raise :class:`SignatureError` unless ``date`` is a fresh ISO 8601 time with a zone.

    The gateway calls it on the headers alone, before it reads a request's body.
    """
    try:
        when = datetime.fromisoformat(date)
    except ValueError:
        raise SignatureError(f"{DATE_HEADER} is not an ISO 8601 time") from None
    if when.tzinfo is None:
        raise SignatureError(f"{DATE_HEADER} must carry a time zone")
    if abs(datetime.now(UTC) - when) > MAX_CLOCK_SKEW:
        raise SignatureError(f"{DATE_HEADER} is more than 5 minutes off the gateway's clock")


def verify(secret_key: str, signature: str, method: str, path: str, date: str, body: bytes) -> None:
    """Raise :class:`SignatureError` unless ``signature`` is right and ``date`` is fresh."""
    check_date(date)
    expected = hmac.new(secret_key.encode(), _string_to_sign(method, path, date, body), hashlib.sha256)
    if not hmac.compare_digest(expected.hexdigest(), signature):
        raise SignatureError("signature does not match")
