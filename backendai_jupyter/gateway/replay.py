"""The replay cache: nonces of signed requests the gateway accepted, until they go stale.

A signed request is good while its date is within :data:`signing.MAX_CLOCK_SKEW` of the
gateway's clock, so a captured one could be sent again, as it is, for up to that long. Each
request carries a nonce covered by the signature; the gateway remembers every nonce it accepted
until the request's date leaves the window (after that the date check refuses it anyway), and
refuses a second request with the same one.

One cache per process is right for one gateway. With several gateway replicas behind one
address (the PostgreSQL mode) a replay could reach a replica that has not seen the nonce: the
cache must then be shared, e.g. a DB table of (access key, nonce, expiry) with a unique
constraint, where an insert that conflicts is the replay, and stale rows are deleted by expiry.
"""

from __future__ import annotations

import heapq
import time
from datetime import datetime

from ..common.errors import ApiError, Unauthorized
from ..common.signing import MAX_CLOCK_SKEW, NONCE_HEADER


class ReplayCacheFull(ApiError):
    status = 503
    type = "replay-cache-full"


class NonceCache:
    """Accepted (access key, nonce) pairs, each kept until its request's date goes stale."""

    def __init__(self, max_entries: int = 500_000) -> None:
        self.max_entries = max_entries
        self._seen: set[tuple[str, str]] = set()
        # (expiry as a UNIX time, key): the earliest expiry first, so eviction is by time.
        self._expiries: list[tuple[float, tuple[str, str]]] = []

    def __len__(self) -> int:
        return len(self._seen)

    def remember(self, access_key: str, nonce: str, when: datetime) -> None:
        """Record a verified request's nonce; raise if it was seen before or there is no room.

        Call it only after the signature has been verified, so that nobody without the secret
        key can fill the cache. Checking and recording happen without an await in between, so
        two copies of one request arriving together cannot both pass.
        """
        self._evict(time.time())
        key = (access_key, nonce)
        if key in self._seen:
            raise Unauthorized(
                f"this request was already received ({NONCE_HEADER} repeats): a signed request is "
                "good once; sign each request anew"
            )
        if len(self._seen) >= self.max_entries:
            raise ReplayCacheFull(
                f"the gateway accepted more than {self.max_entries} signed requests in the last "
                f"{int(MAX_CLOCK_SKEW.total_seconds() // 60)} minutes and cannot track more; retry "
                "shortly, or raise Gateway.replay_cache_size"
            )
        self._seen.add(key)
        heapq.heappush(self._expiries, ((when + MAX_CLOCK_SKEW).timestamp(), key))

    def _evict(self, now: float) -> None:
        while self._expiries and self._expiries[0][0] < now:
            _, key = heapq.heappop(self._expiries)
            self._seen.discard(key)
