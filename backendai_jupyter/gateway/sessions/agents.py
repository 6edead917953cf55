"""Agents as the sessions see them: registration and its reconciliation, reports, loss, drain.

An agent's link (its websocket) lives on one replica, in that replica's
:class:`~..registry.AgentRegistry`; its row says which replica (``replica_id``), whether it
is ALIVE, DISCONNECTED (its link is down; it may come back) or LOST, what it offers, and when
it was last heard of. Every replica reads the rows; the one holding the link writes them.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import select, update

from ...common.errors import NotFound
from ...common.slots import ResourceSlot
from ...common.states import ALLOCATED_STATES, SessionState, is_forward
from ...common.wire import AgentRegistration, Device, ImageInfo, KernelReport
from ..bus import EVENTS
from ..models import Agent
from ..registry import Sender
from .scheduling import allocation_of

if TYPE_CHECKING:
    from .service import SessionService

log = logging.getLogger(__name__)


class AgentBook:
    def __init__(self, service: SessionService) -> None:
        self.service = service
        self.registry = service.registry
        self._written: dict[str, float] = {}  # agent → when its heartbeat was last stored
        self._writing: set[str] = set()  # agents whose heartbeat is being stored
        # The agents' rows as last read (each replica refreshes them at least every second), for
        # what must answer without waiting: the kernelspecs the connected agents' images make.
        self.catalog: list[Agent] = []

    # -- reading -------------------------------------------------------------------------

    async def rows(self) -> list[Agent]:
        async with self.service.db() as db:
            q = select(Agent).order_by(Agent.id).execution_options(populate_existing=True)
            self.catalog = list((await db.scalars(q)).all())
        return self.catalog

    async def refresh(self) -> None:
        await self.rows()

    def connected_images(self) -> list[ImageInfo]:
        """The images of the agents connected when the rows were last read."""
        return [i for a in self.catalog if a.status == "ALIVE" for i in self.images_of(a)]

    async def connected(self) -> list[Agent]:
        return [a for a in await self.rows() if a.status == "ALIVE"]

    @staticmethod
    def images_of(agent: Agent) -> list[ImageInfo]:
        return [ImageInfo.from_json(i) for i in agent.images or [] if isinstance(i, dict)]

    @staticmethod
    def devices_of(agent: Agent) -> list[Device]:
        return [Device.from_json(d) for d in agent.devices or []]

    async def usage(self, agent_id: str) -> tuple[ResourceSlot, int]:
        """What the agent's kernels hold, and how many kernels it has."""
        rows = await self.service.store.open_of(agent=agent_id)
        held = [r for r in rows if SessionState(r.state).holds_resources]
        used = ResourceSlot()
        for r in held:
            used = used + ResourceSlot.parse(r.resources)
        return used, len(rows)

    async def device_holders(self, agent_id: str) -> dict[str, list[str]]:
        """Device id → the sessions holding (a part of) it."""
        holders: dict[str, list[str]] = {}
        for row in await self.service.store.holding():
            if row.agent_id == agent_id:
                for devs in allocation_of(row).devices.values():
                    for dev_id in devs:
                        holders.setdefault(dev_id, []).append(row.id)
        return holders

    # -- the agent's own link (on the replica holding it) -------------------------------------

    async def registered(self, reg: AgentRegistration, sender: Sender) -> None:
        """An agent (re)connected here: store what it offers, then reconcile what it runs with
        what the database says it should."""
        self.registry.register(reg, sender)
        service = self.service
        now = datetime.now(UTC)
        async with service.db() as db, db.begin():
            row = await db.get(Agent, reg.agent_id)
            if row is None:
                row = Agent(id=reg.agent_id, first_seen=now, schedulable=True)
                db.add(row)
            row.address = reg.address
            row.status = "ALIVE"
            row.capacity = reg.capacity.to_json()
            row.images = [asdict(i) for i in reg.images]
            row.devices = [d.to_json() for d in reg.devices]
            row.replica_id = service.bus.replica_id
            row.last_heartbeat = now
            await service.bus.notify(db, EVENTS, "w")
        self._written[reg.agent_id] = time.monotonic()
        await self.refresh()
        reported = {k.session_id: k for k in reg.kernels}
        rows = {r.id: r for r in await service.store.open_of(agent=reg.agent_id)}
        for sid, report in reported.items():
            current = rows.get(sid)
            if current is None:
                # A kernel the gateway ended, never knew, or placed elsewhere: it must not keep
                # running, and an agent never takes over another agent's session by naming it.
                other = await service.store.get(sid)
                if other is not None and other.agent_id not in (None, reg.agent_id):
                    log.warning("agent %s reported session %s of agent %s", reg.agent_id, sid, other.agent_id)
                service.spawn(service.order_destroy(reg.agent_id, sid))
            elif current.state == SessionState.TERMINATING.value:
                service.spawn(service.remove_container(sid, reg.agent_id))  # asked to end while away
            else:
                await self.report(reg.agent_id, report)
        for sid, current in rows.items():
            state = SessionState(current.state)
            if sid in reported or state not in ALLOCATED_STATES or state == SessionState.SCHEDULED:
                continue  # (a SCHEDULED one's create order may still be on the way)
            if state == SessionState.TERMINATING:
                await service.transition(sid, SessionState.TERMINATED, "shut down")
            else:
                await service.transition(
                    sid, SessionState.ERROR, "the kernel's container vanished while its agent was away"
                )
        service.scheduler.wake()

    async def let_go(self, *, all_links: bool = False) -> None:
        """Mark the agents linked to this replica DISCONNECTED (it stops); ``all_links``: every
        agent marked connected (a lone gateway starting: no other replica can hold one)."""
        where = [Agent.status == "ALIVE"]
        if not all_links:
            where.append(Agent.replica_id == self.service.bus.replica_id)
        async with self.service.db() as db, db.begin():
            await db.execute(update(Agent).where(*where).values(status="DISCONNECTED", replica_id=None))

    async def heartbeat(self, agent_id: str, device_stats: list[dict[str, Any]] | None) -> None:
        self.registry.heartbeat(agent_id, device_stats)
        # Stored often enough for the leader (which may be another replica) to know it is alive,
        # and off the agent's message loop: its next messages (heartbeats, kernel reports) must
        # not queue behind a database write.
        due = time.monotonic() - self._written.get(agent_id, 0.0) >= self.registry.heartbeat_timeout / 4
        if due and agent_id not in self._writing:
            self._written[agent_id] = time.monotonic()
            self._writing.add(agent_id)
            self.service.spawn(self._store_heartbeat(agent_id, device_stats))

    async def _store_heartbeat(self, agent_id: str, device_stats: list[dict[str, Any]] | None) -> None:
        # The link is here, so the agent is ALIVE here: this also undoes a leader's conclusion,
        # drawn while this replica's listening connection was briefly away, that it died.
        values: dict[str, Any] = {
            "last_heartbeat": datetime.now(UTC),
            "status": "ALIVE",
            "replica_id": self.service.bus.replica_id,
        }
        if device_stats is not None:
            values["device_stats"] = device_stats
        try:
            async with self.service.db() as db, db.begin():
                await db.execute(
                    update(Agent).where(Agent.id == agent_id, Agent.status != "LOST").values(**values)
                )
        except Exception:
            log.exception("storing the heartbeat of agent %s failed", agent_id)
        finally:
            self._writing.discard(agent_id)

    async def disconnected(self, agent_id: str, sender: Sender) -> None:
        """Its link here went away: nothing new goes there (it may come back before it is lost)."""
        link = self.registry.get(agent_id)
        if link is None or link.sender is not sender:
            return  # an older link of an agent that already connected again
        self.registry.connection_closed(agent_id, sender)
        async with self.service.db() as db, db.begin():
            await db.execute(
                update(Agent)
                .where(Agent.id == agent_id, Agent.replica_id == self.service.bus.replica_id)
                .where(Agent.status == "ALIVE")
                .values(status="DISCONNECTED", replica_id=None)
            )

    async def report(self, agent_id: str, report: KernelReport) -> None:
        """An agent says a kernel changed state."""
        service = self.service
        row = await service.store.get(report.session_id)
        if row is None or row.agent_id != agent_id:
            return
        current = SessionState(row.state)
        if report.state == current == SessionState.RUNNING:
            # Same state again (a restart finished, or a reconnect): refresh the connection.
            await service.transition(
                row.id, report.state, report.reason or "running", connection=report.connection, again=True
            )
            return
        if not is_forward(current, report.state):
            return
        await service.transition(
            row.id, report.state, report.reason, connection=report.connection, exit_code=report.exit_code
        )

    async def lost(self, agent_id: str, reason: str) -> None:
        """The agent is given up: its sessions are LOST (their resources come free)."""
        service = self.service
        async with service.db() as db, db.begin():
            await db.execute(update(Agent).where(Agent.id == agent_id).values(status="LOST", replica_id=None))
        for row in await service.store.open_of(agent=agent_id):
            if SessionState(row.state) in ALLOCATED_STATES:
                await service.transition(row.id, SessionState.LOST, reason)
        service.scheduler.wake()

    # -- operators ---------------------------------------------------------------------------

    async def set_drained(self, agent_id: str, drained: bool) -> None:
        """Stop (or resume) new placements on an agent; its running kernels are not touched."""
        service = self.service
        async with service.db() as db, db.begin():
            row = await db.get(Agent, agent_id)
            if row is None:
                raise NotFound(f"no agent {agent_id}")
            row.schedulable = not drained
            await service.bus.notify(db, EVENTS, "w")
        service.scheduler.wake()
