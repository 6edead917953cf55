"""How gateway replicas hear of each other's changes, and which one of them schedules.

With SQLite there is one gateway process: it is always the leader and nothing needs telling.
With PostgreSQL any number of replicas share the database:

- A change is announced with ``NOTIFY`` in the transaction that makes it, so a replica hears
  of it only once it is visible, and in commit order. Each replica listens on its own
  connection. A payload names a row (a transition, an agent order), never carries it: the
  listener reads the row, so nothing a client may not see travels outside the database.
- The leader is the replica holding a session-level advisory lock. PostgreSQL releases it the
  moment the holder's connection dies (``kill -9`` included); the others try for it every
  :data:`LEADER_POLL` seconds. A placement is written only while the lock is still held by the
  connection that took it (:meth:`Leadership.fence`), so a leader cut off from the database
  cannot place anything after another has taken over.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Callable
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from ..common.tasks import cancel_and_wait

log = logging.getLogger(__name__)

EVENTS = "bai_events"  # "<transition id> <replica>", "p <replica> <json>" (place in line), "w" (wake)
ORDERS = "bai_orders"  # "<agent order id>": for the replica holding that agent
REPLIES = "bai_replies"  # "<agent order id>": its answer is stored
CHANNELS = (EVENTS, ORDERS, REPLIES)

LEADER_LOCK = 0x6261_6A01  # the advisory lock key the scheduling leader holds
LEADER_POLL = 1.0  # seconds between a follower's tries for the lock
RECONNECT = 0.5  # seconds between tries to get a lost listening connection back

Listener = Callable[[str], None]


def _dsn(engine: AsyncEngine) -> str:
    """The engine's URL for asyncpg itself (listening needs the raw connection)."""
    return engine.url.set(drivername="postgresql").render_as_string(hide_password=False)


class Bus:
    """Notifications between replicas (PostgreSQL), or within the one gateway (SQLite)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.shared = engine.dialect.name == "postgresql"
        self.replica_id = uuid.uuid4().hex[:12]
        self._listeners: dict[str, list[Listener]] = {c: [] for c in CHANNELS}
        self._reconnected: list[Callable[[], None]] = []
        self._conn: Any = None
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()

    @property
    def application_name(self) -> str:
        """What this replica's listening connection is called in ``pg_stat_activity``: while
        that connection is there, the replica is alive."""
        return f"backendai-gateway-{self.replica_id}"

    async def alive_replicas(self, db: AsyncSession) -> set[str]:
        """The replicas whose listening connection is open now (this one with SQLite)."""
        if not self.shared:
            return {self.replica_id}
        prefix = "backendai-gateway-"
        names = await db.scalars(
            text("SELECT application_name FROM pg_stat_activity WHERE application_name LIKE :p"),
            {"p": prefix + "%"},
        )
        return {n[len(prefix) :] for n in names}

    def on(self, channel: str, listener: Listener) -> None:
        """Call ``listener(payload)`` for each notification on ``channel`` (in this loop)."""
        self._listeners[channel].append(listener)

    def on_reconnect(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` after the listening connection came back (notifications were missed)."""
        self._reconnected.append(callback)

    async def start(self) -> None:
        if self.shared:
            self._task = asyncio.ensure_future(self._listen())
            await asyncio.wait_for(self._ready.wait(), 30)

    async def stop(self) -> None:
        await cancel_and_wait([self._task])
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._conn.close(timeout=2)

    async def notify(self, db: AsyncSession, channel: str, payload: str) -> None:
        """Announce with the transaction ``db`` is in (heard once it commits); nothing with SQLite."""
        if self.shared:
            await db.execute(text("SELECT pg_notify(:c, :p)"), {"c": channel, "p": payload})

    async def notify_now(self, channel: str, payload: str) -> None:
        """Announce outside any transaction."""
        if self.shared:
            async with self.engine.connect() as conn:
                await conn.execute(text("SELECT pg_notify(:c, :p)"), {"c": channel, "p": payload})
                await conn.commit()

    async def _listen(self) -> None:
        import asyncpg

        first = True
        while True:
            try:
                self._conn = conn = await asyncpg.connect(
                    _dsn(self.engine), server_settings={"application_name": self.application_name}
                )
                for channel in CHANNELS:
                    await conn.add_listener(channel, self._heard)
                self._ready.set()
                if not first:
                    log.info("listening for other replicas again")
                    for callback in self._reconnected:
                        callback()
                first = False
                lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                conn.add_termination_listener(lambda _c, f=lost: f.done() or f.set_result(None))
                while not lost.done():
                    # A connection the server dropped is noticed here at the latest.
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(5.0):
                            await asyncio.shield(lost)
                    if not lost.done():
                        await conn.execute("SELECT 1")
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("listening for other replicas failed (%s); reconnecting", e)
            await asyncio.sleep(RECONNECT)

    def _heard(self, _conn: Any, _pid: int, channel: str, payload: str) -> None:
        for listener in self._listeners.get(channel, []):
            try:
                listener(payload)
            except Exception:
                log.exception("handling a notification on %s failed", channel)


class Leadership:
    """Whether this replica is the one that schedules; see the module's docstring."""

    def __init__(self, bus: Bus, on_change: Callable[[bool], None]) -> None:
        self.bus = bus
        self.on_change = on_change
        self.leader = not bus.shared
        self._conn: Any = None
        self._pid = 0
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self.bus.shared:
            self._task = asyncio.ensure_future(self._run())
        else:
            self.on_change(True)

    async def stop(self) -> None:
        await cancel_and_wait([self._task])
        await self._drop()

    def fence(self) -> tuple[str, dict[str, Any]] | None:
        """A condition true only while this replica still holds the lock (None: no fence needed)."""
        if not self.bus.shared:
            return None
        return (
            "EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND classid = 0 "
            "AND objid = :lead_key AND objsubid = 1 AND pid = :lead_pid AND granted)",
            {"lead_key": LEADER_LOCK, "lead_pid": self._pid},
        )

    async def _run(self) -> None:
        import asyncpg

        while True:
            try:
                if self._conn is None:
                    self._conn = await asyncpg.connect(_dsn(self.bus.engine))
                    self._pid = self._conn.get_server_pid()
                if not self.leader:
                    if await self._conn.fetchval("SELECT pg_try_advisory_lock($1)", LEADER_LOCK):
                        self._set(True)
                else:
                    await self._conn.fetchval("SELECT 1")  # still connected, so still holding it
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("the leader lock's connection failed (%s)", e)
                await self._drop()
            await asyncio.sleep(LEADER_POLL)

    def _set(self, leader: bool) -> None:
        if leader != self.leader:
            self.leader = leader
            log.info("this replica %s scheduling", "now leads" if leader else "no longer leads")
            self.on_change(leader)

    async def _drop(self) -> None:
        self._set(False) if self.bus.shared else None
        if self._conn is not None:
            conn, self._conn = self._conn, None
            with contextlib.suppress(Exception):
                await conn.close(timeout=2)
