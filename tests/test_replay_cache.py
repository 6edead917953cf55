"""The gateway's replay cache on its own: repeats refused, memory bounded by time and by a cap."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from backendai_jupyter.common.errors import Unauthorized
from backendai_jupyter.common.signing import MAX_CLOCK_SKEW, new_nonce
from backendai_jupyter.gateway.replay import NonceCache, ReplayCacheFull


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
