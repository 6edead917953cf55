"""The gateway's replay cache on its own: repeats refused, memory bounded by time and by a cap.

The in-memory cache of one gateway, and the table replicas share on PostgreSQL.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import func, select

from backendai_jupyter.common.errors import Unauthorized
from backendai_jupyter.common.signing import MAX_CLOCK_SKEW, new_nonce
from backendai_jupyter.gateway import db as dbmod
from backendai_jupyter.gateway.models import RequestNonce
from backendai_jupyter.gateway.replay import NonceCache, NonceTable, ReplayCacheFull

from . import databases

needs_postgres = pytest.mark.skipif(
    not databases.server_url(), reason="the shared table is for PostgreSQL (make test-postgres runs these)"
)


def test_a_nonce_is_accepted_once_per_access_key():
    cache = NonceCache()
    now = datetime.now(UTC)
    nonce = new_nonce()
    cache.remember("AKONE", nonce, now)
    with pytest.raises(Unauthorized, match="already received"):
        cache.remember("AKONE", nonce, now)
    cache.remember("AKTWO", nonce, now)  # another key's nonce space: no interference


def test_nonces_are_forgotten_once_their_date_leaves_the_window():
    cache = NonceCache()
    stale = datetime.now(UTC) - MAX_CLOCK_SKEW - timedelta(seconds=1)
    fresh = datetime.now(UTC)
    cache.remember("AK", "old-nonce-0000000000", stale)
    cache.remember("AK", "new-nonce-0000000000", fresh)  # evicts the stale one on the way
    assert len(cache) == 1
    # A request dated in the future by the whole skew stays remembered for the longest.
    cache.remember("AK", "future-nonce-00000000", fresh + MAX_CLOCK_SKEW)
    assert len(cache) == 2


def test_a_flood_beyond_the_cap_gets_503_and_room_returns_with_time():
    cache = NonceCache(max_entries=3)
    stale = datetime.now(UTC) - MAX_CLOCK_SKEW - timedelta(seconds=1)
    now = datetime.now(UTC)
    for i in range(3):
        cache.remember("AK", f"nonce-{i:016d}", now)
    with pytest.raises(ReplayCacheFull) as e:
        cache.remember("AK", "nonce-one-too-many-00", now)
    assert e.value.status == 503 and "replay_cache_size" in e.value.title
    full_of_stale = NonceCache(max_entries=3)
    for i in range(3):
        full_of_stale.remember("AK", f"nonce-{i:016d}", stale)
    full_of_stale.remember("AK", "nonce-after-expiry-00", now)  # stale ones made room
    assert len(full_of_stale) == 1


@contextlib.asynccontextmanager
async def nonce_table(url: str, **kw: Any) -> AsyncIterator[tuple[NonceTable, Any]]:
    """A started table on the test's database, and a sessionmaker to look at its rows."""
    await dbmod.migrate(url)
    engine = dbmod.make_engine(url)
    sessionmaker = dbmod.make_sessionmaker(engine)
    table = NonceTable(sessionmaker, **kw)
    await table.start()
    try:
        yield table, sessionmaker
    finally:
        await table.stop()
        await engine.dispose()


async def rows(sessionmaker: Any) -> int:
    async with sessionmaker() as db:
        return int(await db.scalar(select(func.count()).select_from(RequestNonce)))


@needs_postgres
async def test_the_shared_table_accepts_a_nonce_once_per_access_key(test_database: str):
    async with nonce_table(test_database) as (table, _):
        now = datetime.now(UTC)
        nonce = new_nonce()
        await table.accept("AKONE", nonce, now)
        with pytest.raises(Unauthorized, match="already received"):
            await table.accept("AKONE", nonce, now)
        await table.accept("AKTWO", nonce, now)


@needs_postgres
async def test_the_shared_table_deletes_expired_rows_and_they_block_nothing(test_database: str):
    async with nonce_table(test_database, purge_interval=0.1) as (table, sessionmaker):
        stale = datetime.now(UTC) - MAX_CLOCK_SKEW - timedelta(seconds=1)
        await table.accept("AK", "old-nonce-0000000000", stale)
        # An expired row is no replay: its request's date is out of the window anyway.
        await table.accept("AK", "old-nonce-0000000000", datetime.now(UTC))
        await table.accept("AK", "other-old-nonce-0000", stale)
        assert await rows(sessionmaker) == 2
        async with asyncio.timeout(5):
            while True:  # the stale one goes with the next pass
                if await rows(sessionmaker) == 1:
                    break
                await asyncio.sleep(0.1)


@needs_postgres
async def test_the_shared_table_is_bounded_and_room_returns_once_rows_expire(test_database: str):
    async with nonce_table(test_database, max_entries=3, purge_interval=3600) as (table, _):
        stale = datetime.now(UTC) - MAX_CLOCK_SKEW - timedelta(seconds=1)
        for i in range(3):
            await table.accept("AK", f"nonce-{i:016d}", stale)
        with pytest.raises(ReplayCacheFull) as e:
            await table.accept("AK", "nonce-one-too-many-00", datetime.now(UTC))
        assert e.value.status == 503 and "replay_cache_size" in e.value.title
        assert await table.purge() == 3
        await table.accept("AK", "nonce-after-expiry-00", datetime.now(UTC))
