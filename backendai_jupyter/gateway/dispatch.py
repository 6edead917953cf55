"""Orders to agents, from any replica: straight down the link when this replica holds the
agent's connection, else through the database to the replica that does.

A relayed order is a row in ``agent_orders`` naming the holding replica, announced on
:data:`~.bus.ORDERS`; the holder gives it to the agent, stores the answer and announces it on
:data:`~.bus.REPLIES`. The caller also looks at the row every second, so an announcement lost
while a listening connection was away costs a second, not the order.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import async_sessionmaker

from ..common.errors import AgentUnavailable, ApiError
from ..common.wire import Order, order_from_call
from .bus import ORDERS, REPLIES, Bus
from .models import Agent, AgentOrder
from .registry import AgentRegistry

log = logging.getLogger(__name__)

CALL_TIMEOUT = 60.0


class Dispatcher:
    def __init__(self, db: async_sessionmaker, registry: AgentRegistry, bus: Bus) -> None:
        self.db = db
        self.registry = registry
        self.bus = bus
        self._waiting: dict[int, asyncio.Future[None]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        bus.on(ORDERS, self._order_heard)
        bus.on(REPLIES, self._reply_heard)

    def holds(self, agent_id: str) -> bool:
        link = self.registry.get(agent_id)
        return link is not None and link.connected

    async def call(self, agent_id: str, order: Order, timeout: float = CALL_TIMEOUT) -> Any:
        """Give an agent an order and return its answer (its error raised as an ApiError)."""
        link = self.registry.get(agent_id)
        if link is not None and link.connected:
            return await link.call(order, timeout)
        if not self.bus.shared:
            raise AgentUnavailable(f"agent {agent_id} is not connected")
        return await self._relay(agent_id, order, timeout)

    async def _relay(self, agent_id: str, order: Order, timeout: float) -> Any:
        loop = asyncio.get_running_loop()
        async with self.db() as db, db.begin():
            holder = await db.scalar(select(Agent.replica_id).where(Agent.id == agent_id))
            if holder is None or holder == self.bus.replica_id:
                raise AgentUnavailable(f"agent {agent_id} is not connected")
            if holder not in await self.bus.alive_replicas(db):
                # Its replica died without a clean stop; the agent is on its way to another.
                raise AgentUnavailable(f"agent {agent_id} is not connected (its gateway replica is gone)")
            row = AgentOrder(
                agent_id=agent_id,
                replica_id=holder,
                method=order.METHOD,
                params=order.to_json(),
                created_at=datetime.now(UTC),
            )
            db.add(row)
            await db.flush()
            oid = row.id
            self._waiting[oid] = loop.create_future()
            await self.bus.notify(db, ORDERS, str(oid))
        try:
            async with asyncio.timeout(timeout):
                while True:
                    try:
                        async with asyncio.timeout(1.0):
                            await asyncio.shield(self._waiting[oid])
                    except TimeoutError:
                        pass
                    async with self.db() as db:
                        done = await db.get(AgentOrder, oid, populate_existing=True)
                    if done is None or done.done:
                        break
        except TimeoutError:
            raise AgentUnavailable(
                f"agent {agent_id} did not answer {order.METHOD} in {timeout:.0f} s"
            ) from None
        finally:
            self._waiting.pop(oid, None)
            async with self.db() as db, db.begin():
                await db.execute(delete(AgentOrder).where(AgentOrder.id == oid))
        if done is None:
            raise AgentUnavailable(f"the order for agent {agent_id} was lost")
        if done.error:
            raise ApiError.from_json(done.error)
        return done.result

    def _reply_heard(self, payload: str) -> None:
        fut = self._waiting.get(int(payload))
        if fut is not None and not fut.done():
            fut.set_result(None)

    def _order_heard(self, payload: str) -> None:
        task = asyncio.ensure_future(self._serve(int(payload)))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, oid: int) -> None:
        async with self.db() as db:
            row = await db.get(AgentOrder, oid)
        if row is None or row.done or row.replica_id != self.bus.replica_id:
            return
        result: Any = None
        error: dict[str, Any] | None = None
        try:
            link = self.registry.get(row.agent_id)
            if link is None or not link.connected:
                raise AgentUnavailable(f"agent {row.agent_id} is not connected")
            result = await link.call(order_from_call(row.method, row.params))
        except ApiError as e:
            error = e.to_json()
        async with self.db() as db, db.begin():
            stored = await db.get(AgentOrder, oid)
            if stored is None:
                return  # its caller gave up
            stored.done, stored.result, stored.error = True, result, error
            await self.bus.notify(db, REPLIES, str(oid))
