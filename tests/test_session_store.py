"""The session store: state changes as conditional updates, right without any in-process lock.

Two stores on two engines stand for two gateway processes sharing one database.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from backendai_jupyter.common.states import SessionState, is_forward
from backendai_jupyter.gateway.db import make_engine, make_sessionmaker, migrate
from backendai_jupyter.gateway.models import KernelSession, SessionTransition, User
from backendai_jupyter.gateway.sessions.store import SessionStore, sources_of

S = SessionState


@pytest_asyncio.fixture(loop_scope="function")  # the test's loop: asyncpg's pool belongs to one
async def engines(tmp_path: Path, test_database: str) -> AsyncIterator[list[AsyncEngine]]:
    url = test_database or f"sqlite+aiosqlite:///{tmp_path / 'gateway.db'}"
    await migrate(url)
    engines = [make_engine(url), make_engine(url)]
    async with make_sessionmaker(engines[0])() as db, db.begin():
        db.add(User(id="u1", name="ada"))
    yield engines
    for e in engines:
        await e.dispose()


async def new_session(engine: AsyncEngine, state: SessionState = S.PENDING) -> str:
    sid = str(uuid.uuid4())
    async with make_sessionmaker(engine)() as db, db.begin():
        db.add(
            KernelSession(
                id=sid, owner_id="u1", access_key="AK", image="img", resources={}, state=state.value
            )
        )
    return sid


async def transitions(engine: AsyncEngine, sid: str) -> list[str]:
    async with make_sessionmaker(engine)() as db:
        rows = await db.scalars(
            select(SessionTransition)
            .where(SessionTransition.session_id == sid)
            .order_by(SessionTransition.id)
        )
        return [r.state for r in rows]


def test_sources_of_a_state():
    assert sources_of(S.RUNNING) == {S.PENDING, S.SCHEDULED, S.PREPARING, S.CREATING}
    assert sources_of(S.RUNNING, again=True) == {S.PENDING, S.SCHEDULED, S.PREPARING, S.CREATING, S.RUNNING}
    assert sources_of(S.TERMINATED) == {s for s in S if not s.is_terminal}
    assert sources_of(S.LOST, again=True) == sources_of(S.LOST)  # a terminal state is never left


async def test_a_forward_change_is_stored_with_its_transition(engines: list[AsyncEngine]):
    sid = await new_session(engines[0])
    store = SessionStore(make_sessionmaker(engines[0]))
    change = await store.change(sid, S.SCHEDULED, "placed on a1", agent_id="a1", devices={"cpu": {}})
    assert change is not None
    assert change.row.state == "SCHEDULED" and change.row.agent_id == "a1"
    assert change.row.reason == "placed on a1"
    assert await transitions(engines[0], sid) == ["SCHEDULED"]
    # The transition's id orders events.
    later = await store.change(sid, S.RUNNING, "running", connection={"shell_port": 1})
    assert later is not None and later.seq > change.seq
    assert later.row.agent_id == "a1", "a field not given is left as it is"


async def test_a_backward_or_unknown_change_writes_nothing(engines: list[AsyncEngine]):
    store = SessionStore(make_sessionmaker(engines[0]))
    sid = await new_session(engines[0], S.RUNNING)
    assert await store.change(sid, S.CREATING, "late report") is None
    assert await store.change(sid, S.RUNNING, "again") is None
    assert await store.change("no-such-session", S.TERMINATED, "gone") is None
    assert await transitions(engines[0], sid) == []
    row = await store.get(sid)
    assert row is not None and row.state == "RUNNING"
    # Unless asked for: a running kernel's new connection.
    assert await store.change(sid, S.RUNNING, "restarted", again=True, connection={"a": 1}) is not None
    assert await transitions(engines[0], sid) == ["RUNNING"]


async def test_a_change_only_from_the_states_given(engines: list[AsyncEngine]):
    store = SessionStore(make_sessionmaker(engines[0]))
    sid = await new_session(engines[0], S.SCHEDULED)
    # "Cancel it if it is still pending": it is not.
    assert await store.change(sid, S.CANCELLED, "cancelled", allowed={S.PENDING}) is None
    assert await store.change(sid, S.TERMINATING, "shutdown", allowed={S.SCHEDULED}) is not None


async def test_unknown_columns_are_refused(engines: list[AsyncEngine]):
    store = SessionStore(make_sessionmaker(engines[0]))
    sid = await new_session(engines[0])
    with pytest.raises(TypeError, match="owner_id"):
        await store.change(sid, S.SCHEDULED, "x", owner_id="u2")


async def test_racing_changes_from_two_processes_move_forward_only_and_end_once(
    engines: list[AsyncEngine],
):
    """Reports, placements and shutdowns racing over two stores (two gateway processes): each
    session's recorded path is forward at every step and ends exactly once."""
    stores = [SessionStore(make_sessionmaker(e)) for e in engines]
    sids = [await new_session(engines[0]) for _ in range(8)]
    rng = random.Random(7)
    moves = [S.SCHEDULED, S.PREPARING, S.CREATING, S.RUNNING, S.TERMINATING, S.TERMINATED, S.ERROR, S.LOST]

    async def churn(store: SessionStore, sid: str) -> int:
        won = 0
        for new in rng.sample(moves, len(moves)):
            if await store.change(sid, new, f"to {new}") is not None:
                won += 1
            await asyncio.sleep(0)
        return won

    wins = await asyncio.gather(*(churn(store, sid) for sid in sids for store in stores))
    recorded = 0
    for sid in sids:
        path = [S.PENDING] + [S(s) for s in await transitions(engines[0], sid)]
        recorded += len(path) - 1
        assert all(is_forward(a, b) for a, b in itertools.pairwise(path)), path
        assert path[-1].is_terminal and sum(s.is_terminal for s in path) == 1, path
        row = await stores[1].get(sid)
        assert row is not None and row.state == path[-1].value
    assert sum(wins) == recorded, "every change that said it happened is recorded, and no other"
