"""The replay cache: nonces of signed requests the gateway accepted, until they go stale.

A signed request is good while its date is within :data:`signing.MAX_CLOCK_SKEW` of the
gateway's clock, so a captured one could be sent again, as it is, for up to that long. Each
request carries a nonce covered by the signature; the gateway remembers every nonce it accepted
until the request's date leaves the window (after that the date check refuses it anyway), and
refuses a second request with the same one.

One gateway (SQLite) keeps them in memory (:class:`NonceCache`). Several replicas on one
PostgreSQL database share them in a table (:class:`NonceTable`), so that a request accepted by
one replica is refused by every other.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import time
from datetime import UTC, datetime

from sqlalchemy import delete, func, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import async_sessionmaker

from ..common.errors import ApiError, Unauthorized
from ..common.signing import MAX_CLOCK_SKEW, NONCE_HEADER
from ..common.tasks import cancel_and_wait
from .models import RequestNonce

log = logging.getLogger(__name__)

PURGE_INTERVAL = 30.0  # seconds between a replica's passes over the shared table


class ReplayCacheFull(ApiError):
    status = 503
    type = "replay-cache-full"


def _replayed() -> Unauthorized:
    return Unauthorized(
        f"this request was already received ({NONCE_HEADER} repeats): a signed request is "
        "good once; sign each request anew"
    )


def _full(max_entries: int) -> ReplayCacheFull:
    return ReplayCacheFull(
        f"the gateway accepted more than {max_entries} signed requests in the last "
        f"{int(MAX_CLOCK_SKEW.total_seconds() // 60)} minutes and cannot track more; retry "
        "shortly, or raise Gateway.replay_cache_size"
    )


class ReplayCache:
    """Where the gateway keeps the nonces it accepted: in memory, or in the shared database."""

    async def start(self) -> None:
        """Called by ``Gateway.start`` before the first request; nothing to do by default."""

    async def stop(self) -> None:
        """Called by ``Gateway.stop`` once no more requests come; nothing to do by default."""

    async def accept(self, access_key: str, nonce: str, when: datetime) -> None:
        """Record a request's nonce; raise :class:`Unauthorized` on a repeat, :class:`ReplayCacheFull`
        when there is no room.

        ``AuthMixin.verify_signature`` calls it once the signature holds, so that nobody without
        the secret key can fill the cache; ``when`` is the request's date. Of two copies of one
        request arriving together, exactly one may pass.
        """
        raise NotImplementedError


class NonceCache(ReplayCache):
    """Accepted (access key, nonce) pairs, each kept until its request's date goes stale."""

    def __init__(self, max_entries: int = 500_000) -> None:
        self.max_entries = max_entries
        self._seen: set[tuple[str, str]] = set()
        # (expiry as a UNIX time, key): the earliest expiry first, so eviction is by time.
        self._expiries: list[tuple[float, tuple[str, str]]] = []

    def __len__(self) -> int:
        return len(self._seen)

    async def accept(self, access_key: str, nonce: str, when: datetime) -> None:
        self.remember(access_key, nonce, when)

    def remember(self, access_key: str, nonce: str, when: datetime) -> None:
        """Record a verified request's nonce; raise if it was seen before or there is no room.

        Checking and recording happen without an await in between, so two copies of one request
        arriving together cannot both pass.
        """
        self._evict(time.time())
        key = (access_key, nonce)
        if key in self._seen:
            raise _replayed()
        if len(self._seen) >= self.max_entries:
            raise _full(self.max_entries)
        self._seen.add(key)
        heapq.heappush(self._expiries, ((when + MAX_CLOCK_SKEW).timestamp(), key))

    def _evict(self, now: float) -> None:
        while self._expiries and self._expiries[0][0] < now:
            _, key = heapq.heappop(self._expiries)
            self._seen.discard(key)


class NonceTable(ReplayCache):
    """Accepted nonces in the ``request_nonces`` table, shared by every replica (PostgreSQL).

    A nonce is recorded by one INSERT, and a conflict with a live row is the replay: nothing is
    read before it is written, so the primary key decides between two copies of one request that
    reach two replicas at once. Each replica deletes the expired rows every ``purge_interval``
    seconds and counts the rest; the cap is checked against that count plus the replica's own
    inserts since, so it may be passed by what the other replicas inserted in one interval. It
    bounds the table (and each pass's work) when a keypair's holder floods the gateways.
    """

    def __init__(
        self, db: async_sessionmaker, max_entries: int = 500_000, purge_interval: float = PURGE_INTERVAL
    ) -> None:
        self.db = db
        self.max_entries = max_entries
        self.purge_interval = purge_interval
        self._rows = 0  # live rows at the last pass, and this replica's inserts since
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.purge()
        self._task = asyncio.ensure_future(self._purge_loop())

    async def stop(self) -> None:
        await cancel_and_wait([self._task])

    async def accept(self, access_key: str, nonce: str, when: datetime) -> None:
        if self._rows >= self.max_entries:
            raise _full(self.max_entries)
        expires = when + MAX_CLOCK_SKEW
        row = insert(RequestNonce).values(access_key=access_key, nonce=nonce, expires_at=expires)
        # An expired row not yet deleted is taken over: as in memory, it refuses nothing.
        stmt = row.on_conflict_do_update(
            index_elements=[RequestNonce.access_key, RequestNonce.nonce],
            set_={"expires_at": row.excluded.expires_at},
            where=RequestNonce.expires_at < datetime.now(UTC),
        ).returning(RequestNonce.nonce)
        async with self.db() as db, db.begin():
            recorded = await db.scalar(stmt)
        if recorded is None:
            raise _replayed()
        self._rows += 1

    async def purge(self) -> int:
        """Delete the expired rows and count the others; returns how many were deleted."""
        async with self.db() as db, db.begin():
            result = await db.execute(delete(RequestNonce).where(RequestNonce.expires_at < datetime.now(UTC)))
            self._rows = await db.scalar(select(func.count()).select_from(RequestNonce)) or 0
        return int(result.rowcount)

    async def _purge_loop(self) -> None:
        while True:
            await asyncio.sleep(self.purge_interval)
            try:
                await self.purge()
            except Exception:
                # The database away for a moment: rows stay a little longer, the next pass takes them.
                log.exception("deleting expired request nonces failed; trying again")
