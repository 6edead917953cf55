"""The session store: a kernel session's state lives in its row and changes by one conditional update.

A state change is ``UPDATE kernel_sessions SET state = :new ... WHERE id = :id AND state IN
(:allowed)``, with the transition row written in the same transaction. Whoever's update matches
the row wins; a change whose precondition no longer holds changes nothing and writes nothing.
No lock in this process is needed for that, so two gateway processes on one database get the
same guarantee: a session moves only forward, and every move is recorded exactly once.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, insert, select, text, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from ...common.states import ALLOCATED_STATES, TERMINAL_STATES, SessionState, is_forward
from ..bus import EVENTS, Bus
from ..models import KernelSession, SessionTransition

OPEN = [s.value for s in SessionState if not s.is_terminal]
HOLDING = [s.value for s in ALLOCATED_STATES]
OVER = [s.value for s in TERMINAL_STATES]

# A session's whole row, as every reader wants it: the newest values, not an identity-map copy.
FRESH = {"populate_existing": True}

# Columns a state change may set besides state and reason (None leaves a column as it is).
CHANGEABLE = frozenset({"agent_id", "devices", "connection", "exit_code", "ahead"})


def sources_of(new: SessionState, *, again: bool = False) -> frozenset[SessionState]:
    """The states a session may move to ``new`` from; ``again``: also from ``new`` itself
    (a running kernel's new connection, a waiting request's new reason)."""
    states = {s for s in SessionState if is_forward(s, new)}
    if again and not new.is_terminal:
        states.add(new)
    return frozenset(states)


@dataclass(frozen=True)
class Change:
    """A state change that happened: the session's row after it, and its transition's id."""

    row: KernelSession
    seq: int


class SessionStore:
    """State changes of kernel sessions, each one conditional update and one transition row."""

    def __init__(self, db: async_sessionmaker, bus: Bus | None = None) -> None:
        self.db = db
        self.bus = bus

    async def announce(self, db: AsyncSession, sid: str, seq: int) -> None:
        """Tell the other replicas of transition ``seq`` (in its transaction)."""
        if self.bus is not None:
            await self.bus.notify(db, EVENTS, f"{seq} {self.bus.replica_id} {sid}")

    async def change(
        self,
        sid: str,
        new: SessionState,
        reason: str,
        *,
        allowed: Iterable[SessionState] | None = None,
        again: bool = False,
        fence: tuple[str, dict[str, Any]] | None = None,
        **fields: Any,
    ) -> Change | None:
        """Move session ``sid`` to ``new`` if its state is one of ``allowed`` (by default, every
        state ``new`` is forward of); None when it was not (nothing is written then)."""
        unknown = set(fields) - CHANGEABLE
        if unknown:
            raise TypeError(f"a state change cannot set {', '.join(sorted(unknown))}")
        allowed = frozenset(allowed) if allowed is not None else sources_of(new, again=again)
        now = datetime.now(UTC)
        values: dict[str, Any] = {"state": new.value, "reason": reason, "updated_at": now}
        values.update({k: v for k, v in fields.items() if v is not None})
        async with self.db() as db, db.begin():
            # The update comes first: it takes the write lock (a read first would make SQLite's
            # upgrade to a writer fail whenever another writer committed in between).
            stmt = update(KernelSession).where(
                KernelSession.id == sid, KernelSession.state.in_([s.value for s in allowed])
            )
            if fence is not None:
                stmt = stmt.where(text(fence[0]).bindparams(**fence[1]))
            result = await db.execute(stmt.values(**values).execution_options(synchronize_session=False))
            if result.rowcount != 1:  # type: ignore[attr-defined]
                return None  # no such session, or its state forbids the move
            seq = await db.scalar(
                insert(SessionTransition)
                .values(session_id=sid, state=new.value, reason=reason, at=now)
                .returning(SessionTransition.id)
            )
            assert seq is not None
            await self.announce(db, sid, seq)
            row = await db.get(KernelSession, sid, populate_existing=True)
        assert row is not None and seq is not None
        return Change(row, int(seq))

    async def get(self, sid: str) -> KernelSession | None:
        async with self.db() as db:
            return await db.get(KernelSession, sid, populate_existing=True)

    async def touch(self, sids: Iterable[str], **values: Any) -> None:
        """Set columns that are no state change (a stream seen, a place in line)."""
        sids = list(sids)
        if sids:
            async with self.db() as db, db.begin():
                await db.execute(update(KernelSession).where(KernelSession.id.in_(sids)).values(**values))

    async def select(self, *where: Any, order: Any = KernelSession.created_at) -> list[KernelSession]:
        async with self.db() as db:
            q = select(KernelSession).where(*where).order_by(order).execution_options(**FRESH)
            return list((await db.scalars(q)).all())

    async def pending(self) -> list[KernelSession]:
        """Waiting requests, oldest first (the order they were made in)."""
        return await self.select(KernelSession.state == SessionState.PENDING.value)

    async def holding(self) -> list[KernelSession]:
        """Sessions whose allocation on their agent is in use."""
        return await self.select(KernelSession.state.in_(HOLDING), KernelSession.agent_id.is_not(None))

    async def open_of(self, *, owner: str | None = None, agent: str | None = None) -> list[KernelSession]:
        """Sessions not over yet, of one owner or on one agent."""
        where = [KernelSession.state.in_(OPEN)]
        if owner is not None:
            where.append(KernelSession.owner_id == owner)
        if agent is not None:
            where.append(KernelSession.agent_id == agent)
        return await self.select(*where)

    async def count_open(self, owner: str) -> int:
        async with self.db() as db:
            q = select(func.count()).where(KernelSession.owner_id == owner, KernelSession.state.in_(OPEN))
            return int(await db.scalar(q) or 0)
