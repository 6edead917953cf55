"""The scheduling leader: places waiting requests, and settles what nobody else will.

Only the leader (see :mod:`..bus`) runs a pass. Each pass rebuilds the cluster from the
database (agents' rows and the allocations of the sessions holding resources), so a new leader
knows exactly what the old one placed, and runs the pure placement core on it. A placement is
one conditional update fenced by the leader's lock; its create order goes out through the
dispatcher, to whichever replica holds the agent.

The leader also sweeps: agents nobody has heard from (their replica died and they did not come
back) are lost, and bound sessions whose client's stream has been gone for the grace are ended.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING

from sqlalchemy import or_, select, update

from ...common.slots import ResourceSlot
from ...common.states import SessionState
from ...common.tasks import cancel_and_wait
from ...common.wire import AGENT_RECONNECT_MAX, Device
from ..models import Agent, KernelSession
from ..scheduler import Allocation, Cluster, Request, run_pass
from .store import OPEN

if TYPE_CHECKING:
    from .service import SessionService

log = logging.getLogger(__name__)


def describe_devices(alloc: Allocation) -> str:
    names = [
        f"{p} {d}" + ("" if a >= 1 else f" ({a.normalize():f})")
        for p, devs in alloc.devices.items()
        for d, a in devs.items()
    ]
    return f" with {', '.join(names)}" if names else ""


def allocation_of(row: KernelSession) -> Allocation:
    devices = {p: {d: Decimal(a) for d, a in devs.items()} for p, devs in (row.devices or {}).items()}
    return Allocation(row.agent_id or "", ResourceSlot.parse(row.resources), devices, row.owner_id)


def aware(dt: datetime) -> datetime:
    return dt if dt.tzinfo is not None else dt.replace(tzinfo=UTC)


async def build_cluster(service: SessionService) -> tuple[Cluster, list[Agent]]:
    """The cluster as the database has it: agents not lost, and every allocation in use."""
    cluster = Cluster()
    async with service.db() as db:
        agents = list(
            (
                await db.scalars(
                    select(Agent).where(Agent.status != "LOST").execution_options(populate_existing=True)
                )
            ).all()
        )
    for a in agents:
        images = {service.normalize(t) for i in a.images or [] for t in (i.get("tags") or [])}
        cluster.add_agent(
            a.id, ResourceSlot.parse(a.capacity), [Device.from_json(d) for d in a.devices or []], images
        )
        cluster.set_schedulable(a.id, a.status == "ALIVE" and a.schedulable)
    for row in await service.store.holding():
        if row.agent_id in cluster.agents:
            cluster.restore(row.id, allocation_of(row))
    return cluster, agents


class Scheduler:
    def __init__(self, service: SessionService, policy: str, selector: str, pending_timeout: float) -> None:
        self.service = service
        self.policy = policy
        self.selector = selector
        self.pending_timeout = pending_timeout
        self.leader = False
        self.leading_since = time.monotonic()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def wake(self) -> None:
        self._wakeup.set()

    def leadership_changed(self, leader: bool) -> None:
        self.leader = leader
        if leader:
            self.leading_since = time.monotonic()
            self.wake()

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._loop())
        self.wake()

    async def stop(self) -> None:
        await cancel_and_wait([self._task])

    async def _loop(self) -> None:
        tick = min(1.0, self.service.stream_grace / 2)
        last_periodic = 0.0
        while True:
            # (asyncio.timeout, not wait_for: before Python 3.12 wait_for can swallow the
            # cancellation that stops this loop when it lands as the wait ends.)
            try:
                async with asyncio.timeout(tick):
                    await self._wakeup.wait()
            except TimeoutError:
                pass
            self._wakeup.clear()
            # A wake-up is a change somewhere (here or, announced, on another replica): the leader
            # places what waits. What is only due with time (the agents' rows for kernelspecs,
            # the sweeps of silent agents and abandoned sessions) runs at most once a tick, not
            # on every change of a busy cluster.
            now = time.monotonic()
            periodic = now - last_periodic >= tick
            if periodic:
                last_periodic = now
                try:
                    await self.service.agents.refresh()
                except Exception:
                    log.exception("reading the agents failed")
            if not self.leader:
                continue
            try:
                await self.run_pass()
                if periodic:
                    await self._sweep_agents()
                    await self._sweep_abandoned()
            except Exception:
                log.exception("scheduling pass failed")

    async def run_pass(self) -> None:
        service = self.service
        pending = await service.store.pending()
        if not pending:
            return
        cluster, agents = await build_cluster(service)
        if not any(a.status == "ALIVE" for a in agents):
            return  # keep the "no agent is connected" reason until one is
        rows = {r.id: r for r in pending}
        requests = [
            Request(r.id, r.owner_id, ResourceSlot.parse(r.resources), r.image, n, r.prefer_agent)
            for n, r in enumerate(pending)
        ]
        fence = service.leadership.fence()
        for decision in run_pass(cluster, requests, self.policy, self.selector):
            row = rows[decision.request.session_id]
            alloc = decision.allocation
            if alloc is not None:
                placed = await service.transition(
                    row.id,
                    SessionState.SCHEDULED,
                    f"placed on agent {alloc.agent_id}" + describe_devices(alloc),
                    allowed={SessionState.PENDING},
                    fence=fence,
                    agent_id=alloc.agent_id,
                    devices=alloc.devices_json(),
                )
                if placed is not None:
                    service.spawn(service.start_on_agent(row.id, alloc))
                continue
            too_big = cluster.exceeds_every_agent(ResourceSlot.parse(row.resources))
            waited = (datetime.now(UTC) - aware(row.created_at)).total_seconds()
            if too_big:
                await service.transition(row.id, SessionState.ERROR, too_big, allowed={SessionState.PENDING})
            elif self.pending_timeout and waited > self.pending_timeout:
                await service.transition(
                    row.id,
                    SessionState.ERROR,
                    f"not placed within {self.pending_timeout:.0f} s ({decision.reason})",
                    allowed={SessionState.PENDING},
                )
            elif decision.reason != row.reason:
                await service.transition(
                    row.id,
                    SessionState.PENDING,
                    decision.reason,
                    allowed={SessionState.PENDING},
                    ahead=decision.ahead,
                )
            elif decision.ahead != row.ahead:
                # The place in line moves with every start and end: told, not stored as a transition.
                await service.moved_in_line(row.id, decision.ahead)

    async def _sweep_agents(self) -> None:
        """Agents linked to a replica that died are disconnected at once (nothing more is placed
        there); agents not heard of for long enough are lost; so are the sessions on agents
        already lost."""
        service = self.service
        async with service.db() as db, db.begin():
            alive = await service.bus.alive_replicas(db)
            await db.execute(
                update(Agent)
                .where(Agent.status == "ALIVE", Agent.replica_id.is_not(None), Agent.replica_id.not_in(alive))
                .values(status="DISCONNECTED", replica_id=None)
            )
        # An agent retries at least every AGENT_RECONNECT_MAX seconds: after a gateway restart
        # (or a new leader) it gets one full retry before it is given up.
        grace = max(service.registry.heartbeat_timeout, AGENT_RECONNECT_MAX + 2)
        if time.monotonic() - self.leading_since < grace:
            return
        cutoff = datetime.now(UTC) - timedelta(seconds=grace)
        async with service.db() as db:
            silent = (
                await db.scalars(
                    select(Agent.id).where(Agent.status != "LOST", Agent.last_heartbeat < cutoff)
                )
            ).all()
        for agent_id in silent:
            if not service.dispatcher.holds(agent_id):  # this replica's own watchdog has those
                await service.agents.lost(agent_id, f"agent {agent_id} did not reconnect in {grace:.0f} s")
        async with service.db() as db:
            stranded = (
                await db.scalars(
                    select(KernelSession.id)
                    .join(Agent, Agent.id == KernelSession.agent_id, isouter=True)
                    .where(KernelSession.state.in_([s.value for s in SessionState if s.holds_resources]))
                    .where(or_(Agent.id.is_(None), Agent.status == "LOST"))
                )
            ).all()
        for sid in stranded:
            await service.transition(sid, SessionState.LOST, "its agent is lost")

    async def _sweep_abandoned(self) -> None:
        """Bound sessions whose client's event stream has been gone for the grace are ended."""
        service = self.service
        # After a gateway restart (or a new leader) clients get a while to come back.
        if time.monotonic() - self.leading_since < 2 * service.stream_grace:
            return
        cutoff = datetime.now(UTC) - timedelta(seconds=service.stream_grace)
        for row in await service.store.select(
            KernelSession.bound.is_(True),
            KernelSession.state.in_(OPEN),
            or_(KernelSession.watched_at.is_(None), KernelSession.watched_at < cutoff),
        ):
            if service.streams.get(row.id, 0) > 0:
                continue
            log.info("ending kernel session %s: its client went away", row.id)
            service.spawn(service.end(row.id, "its client went away"))
