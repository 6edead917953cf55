"""HMAC request signing between clients and the gateway's ``/v1`` API.

A request carries ``Authorization: BackendAI-HMAC-SHA256 credential=<access key>,
signature=<hex>``, ``X-BackendAI-Date`` and ``X-BackendAI-Nonce``. The signature covers the
method, the path with its query, the date, a hash of the body and the nonce, so a captured
request cannot be replayed with another body, on another path, or after the clock window
closes; the gateway remembers the nonces it accepted within the window, so it cannot be
replayed as it is either.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from datetime import UTC, datetime, timedelta

SCHEME = "BackendAI-HMAC-SHA256"
DATE_HEADER = "X-BackendAI-Date"
NONCE_HEADER = "X-BackendAI-Nonce"
MAX_CLOCK_SKEW = timedelta(minutes=5)
_AUTH_RE = re.compile(rf"^{SCHEME}\s+credential=([A-Za-z0-9]+),\s*signature=([0-9a-f]{{64}})$")
# 16 to 64 URL-safe characters: enough randomness that two honest requests never share one, and
# short enough that the gateway's memory of them stays small.
_NONCE_RE = re.compile(r"^[A-Za-z0-9_-]{16,64}$")


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


def new_nonce() -> str:
    """A fresh nonce for one signed request."""
    return secrets.token_urlsafe(18)


def _string_to_sign(method: str, path: str, date: str, body_sha256: str, nonce: str) -> bytes:
    return "\n".join([method.upper(), path, date, body_sha256, nonce]).encode()


def sign(access_key: str, secret_key: str, method: str, path: str, body: bytes = b"") -> dict[str, str]:
    """Headers that authenticate one request (``path`` includes the query string).

    Each call makes a new nonce: the headers are good for exactly one request.
    """
    date = datetime.now(UTC).isoformat(timespec="seconds")
    nonce = new_nonce()
    digest = hashlib.sha256(body).hexdigest()
    sig = hmac.new(secret_key.encode(), _string_to_sign(method, path, date, digest, nonce), hashlib.sha256)
    return {
        "Authorization": f"{SCHEME} credential={access_key}, signature={sig.hexdigest()}",
        DATE_HEADER: date,
        NONCE_HEADER: nonce,
    }


def parse_authorization(header: str) -> tuple[str, str]:
    """Split an Authorization header into (access key, signature)."""
    m = _AUTH_RE.match(header.strip())
    if not m:
        raise SignatureError(f"Authorization header must be '{SCHEME} credential=..., signature=...'")
    return m.group(1), m.group(2)


def check_nonce(nonce: str) -> None:
    """Raise :class:`SignatureError` unless ``nonce`` is there and well-formed (headers only)."""
    if not nonce:
        raise SignatureError(f"{NONCE_HEADER} is missing: sign each request with a fresh nonce")
    if not _NONCE_RE.match(nonce):
        raise SignatureError(f"{NONCE_HEADER} must be 16 to 64 URL-safe base64 characters")


def check_date(date: str) -> datetime:
    """The time ``date`` names; :class:`SignatureError` unless it is ISO 8601, zoned and fresh.

    The gateway calls this and :func:`check_nonce` on the headers alone, before it reads a
    request's body.
    """
    try:
        when = datetime.fromisoformat(date)
    except ValueError:
        raise SignatureError(f"{DATE_HEADER} is not an ISO 8601 time") from None
    if when.tzinfo is None:
        raise SignatureError(f"{DATE_HEADER} must carry a time zone")
    if abs(datetime.now(UTC) - when) > MAX_CLOCK_SKEW:
        raise SignatureError(f"{DATE_HEADER} is more than 5 minutes off the gateway's clock")
    return when


def verify(
    secret_key: str, signature: str, method: str, path: str, date: str, body: bytes, nonce: str
) -> datetime:
    """Raise :class:`SignatureError` unless ``signature`` is right and ``date`` is fresh.

    Returns the request's time. Whether ``nonce`` was seen before is the caller's to check
    (the gateway's replay cache), after this has passed.
    """
    return verify_digest(secret_key, signature, method, path, date, hashlib.sha256(body).hexdigest(), nonce)


def verify_digest(
    secret_key: str, signature: str, method: str, path: str, date: str, body_sha256: str, nonce: str
) -> datetime:
    """:func:`verify` for a body that was hashed as it streamed past (``body_sha256``: hex)."""
    check_nonce(nonce)
    when = check_date(date)
    expected = hmac.new(
        secret_key.encode(), _string_to_sign(method, path, date, body_sha256, nonce), hashlib.sha256
    )
    if not hmac.compare_digest(expected.hexdigest(), signature):
        raise SignatureError("signature does not match")
    return when
