"""Kernel sessions: creation, placement, the state machine, and orders to agents.

Every change of state is written to the database (the session row and a transition row)
before it is published as an event, so a client that reconnects reads the same story.
"""

from __future__ import annotations

import asyncio
import fnmatch
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import async_sessionmaker

from ..common.errors import (
    ApiError,
    Conflict,
    InsufficientResources,
    InvalidRequest,
    NotFound,
    UnknownImage,
)
from ..common.slots import ResourceSlot, format_amount, total
from ..common.states import ALLOCATED_STATES, SessionState, is_forward
from ..common.wire import AGENT_RECONNECT_MAX, AgentRegistration, CreateKernel, KernelReport, Mount
from .events import EventHub
from .models import Agent, KernelSession, ResourcePolicy, SessionTransition, User
from .registry import AgentRegistry
from .requests import SessionRequest
from .scheduler import (
    Allocation,
    Cluster,
    Request,
    normalize_image,
    run_pass,
    with_position,
)

log = logging.getLogger(__name__)

STREAM_GRACE = 5.0  # seconds a bound session outlives its client's last event stream
DESTROY_RETRY = 2.0  # seconds between attempts to remove a container whose removal failed
SIGNALS = {"SIGINT", "SIGTERM", "SIGKILL", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2"}


@dataclass
class Live:
    """A session that is not over yet, as the scheduler tracks it."""

    id: str
    owner_id: str
    image: str
    resources: ResourceSlot
    env: dict[str, str]
    state: SessionState
    created: float = field(default_factory=time.monotonic)
    seq: int = 0
    ahead: int = 0  # while pending: waiting requests before this one
    agent_id: str | None = None
    reason: str = ""
    # A restart: the agent and connection of the session this one replaces.
    previous: tuple[str, dict[str, Any]] | None = None
    key: str = ""  # the kernel's HMAC key, when the client chose it (the launcher relays as is)
    bound: bool = False  # ends when its client's event stream is gone
    mounts: list[Mount] = field(default_factory=list)  # vfolders, as the vfolder service resolved them
    working_dir: str = ""

    def order(self) -> CreateKernel:
        """The order that starts (or restarts) this session's kernel."""
        return CreateKernel(
            self.id,
            self.image,
            self.resources,
            self.env,
            self.owner_id,
            mounts=list(self.mounts),
            working_dir=self.working_dir,
        )


def session_json(row: KernelSession, *, with_connection: bool) -> dict[str, Any]:
    """The API model of a session."""
    d: dict[str, Any] = {
        "id": row.id,
        "name": row.name,
        "owner": row.owner_id,
        "image": row.image,
        "resources": row.resources,
        "state": row.state,
        "reason": row.reason,
        "agent": row.agent_id,
        "devices": row.devices or {},
        "exit_code": row.exit_code,
        "mounts": [
            {
                "vfolder_id": m.get("vfolder_id"),
                "name": m.get("name"),
                "path": m.get("target"),
                "mode": m.get("mode"),
            }
            for m in row.mounts or []
        ],
        "working_dir": row.working_dir or "",
        "created_at": _iso(row.created_at),
        "updated_at": _iso(row.updated_at),
    }
    if with_connection and row.connection:
        d["connection"] = row.connection
    return d


def _describe_devices(alloc: Allocation) -> str:
    names = [
        f"{p} {d}" + ("" if a >= 1 else f" ({a.normalize():f})")
        for p, devs in alloc.devices.items()
        for d, a in devs.items()
    ]
    return f" with {', '.join(names)}" if names else ""


def _unlimited(slots: ResourceSlot) -> dict[str, Decimal]:
    """Limits that never bind, for slots a policy leaves open."""
    return {k: Decimal("Infinity") for k in slots}


class PolicyViolation(ApiError):
    status = 403
    type = "policy-violation"


def _iso(dt: datetime) -> str:
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.isoformat().replace("+00:00", "Z")


class SessionService:
    """The one place that creates, places, changes and ends kernel sessions."""

    def __init__(
        self,
        db: async_sessionmaker,
        hub: EventHub,
        default_resources: ResourceSlot,
        pending_timeout: float,
        heartbeat_timeout: float,
        policy: str = "fifo",
        selector: str = "auto",
        stream_grace: float = STREAM_GRACE,
        destroy_retry: float = DESTROY_RETRY,
        max_pending: int = 100,
    ) -> None:
        self.max_pending = max_pending
        self.db = db
        self.stream_grace = stream_grace
        self.destroy_retry = destroy_retry
        self.policy = policy
        self.selector = selector
        self.cluster = Cluster()
        self.drained: set[str] = set()
        self._seq = 0
        self._last_event: dict[str, dict[str, Any]] = {}
        self._user_locks: dict[str, asyncio.Lock] = {}
        self._locks: dict[str, asyncio.Lock] = {}  # per session: state changes one at a time
        self._streams: dict[str, int] = {}  # session → open event streams
        self.hub = hub
        self.default_resources = default_resources  # what image kernelspecs ask for
        self.pending_timeout = pending_timeout
        self.registry = AgentRegistry(heartbeat_timeout, self.agent_lost)
        self.live: dict[str, Live] = {}
        self._wakeup = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._scheduler: asyncio.Task[None] | None = None
        self._stopped = False
        # Called with the vfolders a kernel mounted read-write once it is over (their usage changed).
        self.kernel_ended_with_mounts: Callable[[list[str]], Awaitable[None]] | None = None

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Load unfinished sessions and start the scheduler."""
        async with self.db() as db:
            rows = (await db.scalars(select(KernelSession))).all()
            for row in rows:
                state = SessionState(row.state)
                if state.is_terminal:
                    continue
                live = Live(
                    id=row.id,
                    owner_id=row.owner_id,
                    image=row.image,
                    resources=ResourceSlot.parse(row.resources),
                    env=dict(row.env or {}),
                    state=state,
                    seq=self._next_seq(),
                    agent_id=row.agent_id,
                    reason=row.reason,
                    key=row.kernel_key or "",
                    bound=bool(row.bound),
                    mounts=[Mount.from_json(m) for m in row.mounts or []],
                    working_dir=row.working_dir or "",
                )
                self.live[row.id] = live
                if row.agent_id and state.holds_resources:
                    self.cluster.restore(row.id, self._allocation_of(live, row.devices or {}))
            drained = await db.scalars(select(Agent.id).where(Agent.schedulable.is_(False)))
            self.drained = set(drained)
        self._started = time.monotonic()
        for live in self.live.values():
            if live.bound:
                # Its client's stream ended with the previous gateway process: the client has a
                # while to come back (it reconnects by itself), or the session is ended.
                self._spawn(self._end_if_abandoned(live.id, 2 * self.stream_grace))
        self.registry.start()
        self._scheduler = asyncio.ensure_future(self._schedule_loop())
        self._wakeup.set()

    async def stop(self) -> None:
        self._stopped = True
        await self.registry.stop()
        for task in [self._scheduler, *self._tasks]:
            if task:
                task.cancel()

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    @staticmethod
    def _allocation_of(live: Live, devices: dict[str, dict[str, str]]) -> Allocation:
        parsed = {p: {d: Decimal(a) for d, a in devs.items()} for p, devs in devices.items()}
        return Allocation(live.agent_id or "", live.resources, parsed, live.owner_id)

    def _spawn(self, coro: Any) -> None:
        if self._stopped:  # a stream closing as the gateway stops must not end its session
            coro.close()
            return
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- the API ---------------------------------------------------------------------------

    async def check(self, user: User, req: SessionRequest) -> None:
        """Everything ``create`` would refuse, refused now, without creating anything."""
        await self._check_placeable(user, req.image, req.resources)

    async def create(
        self,
        user: User,
        access_key: str,
        req: SessionRequest,
        mounts: list[Mount] | None = None,
        working_dir: str = "",
    ) -> dict[str, Any]:
        """Check a parsed request against policy and capacity, and queue it; placement follows at once.

        ``mounts`` and ``working_dir`` come from the vfolder service, already checked.
        """
        mounts = list(mounts or [])
        image, name, resources, env = req.image, req.name, req.resources, req.env
        previous = await self._previous(user, req.restart_of)
        key, bound = req.key, req.bound_to_stream
        # Check and insert under the user's lock: concurrent requests cannot all pass a limit.
        async with self._user_locks.setdefault(user.id, asyncio.Lock()):
            links = await self._check_placeable(user, image, resources)
            sid = str(uuid.uuid4())
            now = datetime.now(UTC)
            reason = "" if links else "waiting: no agent is connected"
            async with self.db() as db, db.begin():
                row = KernelSession(
                    id=sid,
                    name=name,
                    owner_id=user.id,
                    access_key=access_key,
                    image=normalize_image(image),
                    resources=resources.to_json(),
                    env=env,
                    state=SessionState.PENDING.value,
                    reason=reason,
                    bound=bound,
                    kernel_key=key or None,
                    mounts=[m.to_json() for m in mounts],
                    working_dir=working_dir,
                    created_at=now,
                    updated_at=now,
                )
                db.add(row)
                first = SessionTransition(session_id=sid, state=row.state, reason=reason, at=now)
                db.add(first)
                await db.flush()
            self.live[sid] = Live(
                sid,
                user.id,
                row.image,
                resources,
                env,
                SessionState.PENDING,
                seq=self._next_seq(),
                reason=reason,
                previous=previous,
                key=key,
                bound=bound,
                mounts=mounts,
                working_dir=working_dir,
            )
        self._publish(row, first.id)
        self._wakeup.set()
        if bound:  # a client that never opens its stream does not keep the session either
            self._spawn(self._end_if_abandoned(sid, self.stream_grace))
        return session_json(row, with_connection=False)

    async def _check_placeable(self, user: User, image: str, resources: ResourceSlot) -> list[Any]:
        """Policy, image and capacity checks; returns the connected agents."""
        await self._check_policy(user, image, resources)
        links = self.registry.alive()
        if links:
            tags = {normalize_image(t) for link in links for i in link.registration.images for t in i.tags}
            if normalize_image(image) not in tags:
                raise UnknownImage(
                    f"unknown image {image!r}; agents have: {', '.join(sorted(tags)) or 'no images'}",
                    available=sorted(tags),
                )
            too_big = self.cluster.exceeds_every_agent(resources)
            if too_big:
                raise InsufficientResources(too_big)
        return links

    async def _check_policy(self, user: User, image: str, resources: ResourceSlot) -> None:
        """Refuse at once what the user's resource policy does not allow, naming the limit."""
        mine_waiting = (s for s in self.live.values() if s.owner_id == user.id)
        pending = sum(1 for s in mine_waiting if s.state == SessionState.PENDING)
        if pending >= self.max_pending:
            raise PolicyViolation(
                f"you have {pending} kernels waiting to start; at most {self.max_pending} may wait at once. "
                "End one, or wait for them to start",
                limit="max_pending",
            )
        if not user.policy:
            return
        async with self.db() as db:
            policy = await db.get(ResourcePolicy, user.policy)
        if policy is None:
            # Fail closed: a policy that cannot be read limits everything.
            raise PolicyViolation(
                f"your resource policy {user.policy} no longer exists; ask an admin to assign one",
                limit="policy",
            )
        if policy.allowed_images and not any(
            fnmatch.fnmatchcase(normalize_image(image), normalize_image(p)) or fnmatch.fnmatchcase(image, p)
            for p in policy.allowed_images
        ):
            raise PolicyViolation(
                f"image {image} is not allowed by policy {policy.name} "
                f"(allowed: {', '.join(policy.allowed_images)})",
                limit="allowed_images",
            )
        mine = [s for s in self.live.values() if s.owner_id == user.id]
        if policy.max_sessions is not None and len(mine) >= policy.max_sessions:
            raise PolicyViolation(
                f"policy {policy.name} allows {policy.max_sessions} sessions at once; you have {len(mine)}",
                limit="max_sessions",
            )
        per_session = ResourceSlot.parse(policy.max_session_resources)
        over = resources.shortfall({**_unlimited(resources), **per_session})
        if over:
            slot = over[0]
            raise PolicyViolation(
                f"policy {policy.name} allows at most {format_amount(slot, per_session[slot])} {slot} "
                f"per session; requested {format_amount(slot, resources[slot])}",
                limit=f"max_session_resources.{slot}",
            )
        total_limit = ResourceSlot.parse(policy.total_resources)
        held = total(s.resources for s in mine) + resources
        over = held.shortfall({**_unlimited(held), **total_limit})
        if over:
            slot = over[0]
            raise PolicyViolation(
                f"policy {policy.name} allows {format_amount(slot, total_limit[slot])} {slot} in total; "
                f"with this request you would hold {format_amount(slot, held[slot])}",
                limit=f"total_resources.{slot}",
            )

    async def _previous(self, user: User, sid: object) -> tuple[str, dict[str, Any]] | None:
        """For a restart, the replaced session's agent and connection (it must be over)."""
        if sid is None:
            return None
        if not isinstance(sid, str):
            raise InvalidRequest("restart_of must be a session id")
        row = await self.get_row(user, sid)
        if row.owner_id != user.id:
            # Not even an admin: the new kernel would take over the other user's ports and key.
            raise NotFound(f"no kernel session {sid} of yours")
        if row.id in self.live:
            raise Conflict(f"kernel session {sid} is still {row.state}; end it before restarting")
        if row.agent_id and row.connection:
            return row.agent_id, row.connection
        return None

    async def get_row(self, user: User, sid: str) -> KernelSession:
        """A session the caller may see (its owner, or an admin); 404 otherwise."""
        async with self.db() as db:
            row = await db.get(KernelSession, sid)
        if row is None or (row.owner_id != user.id and not user.is_admin):
            raise NotFound(f"no kernel session {sid}")
        return row

    async def list(
        self, user: User, *, all_users: bool = False, active_only: bool = False
    ) -> list[dict[str, Any]]:
        async with self.db() as db:
            q = select(KernelSession).order_by(KernelSession.created_at)
            if not (all_users and user.is_admin):
                q = q.where(KernelSession.owner_id == user.id)
            if active_only:
                q = q.where(KernelSession.id.in_(list(self.live)))
            rows = (await db.scalars(q)).all()
        return [self.describe(r, with_connection=r.owner_id == user.id) for r in rows]

    async def snapshot(self, user: User, sid: str) -> dict[str, Any]:
        """The event that describes the session's state now (for a stream's first message).

        State, reason and seq come from one transition row, read before the session row, so
        the seq matches the state exactly and the row (for the connection) is at least as new.
        """
        async with self.db() as db:
            last = (
                await db.scalars(
                    select(SessionTransition)
                    .where(SessionTransition.session_id == sid)
                    .order_by(SessionTransition.id.desc())
                    .limit(1)
                )
            ).first()
            row = await db.get(KernelSession, sid, populate_existing=True)
        if row is None or last is None or (row.owner_id != user.id and not user.is_admin):
            raise NotFound(f"no kernel session {sid}")
        event = self.event_of(row, last.id)
        if last.state != row.state:
            event.update(state=last.state, reason=last.reason, at=_iso(last.at))
            event.pop("connection", None)
            event.pop("requests_ahead", None)
        return event

    async def transitions(self, sid: str) -> list[dict[str, Any]]:
        async with self.db() as db:
            rows = (
                await db.scalars(
                    select(SessionTransition)
                    .where(SessionTransition.session_id == sid)
                    .order_by(SessionTransition.id)
                )
            ).all()
        return [{"state": r.state, "reason": r.reason, "at": _iso(r.at)} for r in rows]

    async def destroy(self, user: User, sid: str) -> dict[str, Any]:
        """End a session the user may see: cancel it if pending, else remove its container."""
        await self.get_row(user, sid)
        return session_json(await self.end(sid, "cancelled by the user"), with_connection=False)

    async def end(self, sid: str, reason: str) -> KernelSession:
        """Cancel a pending session, or have its agent remove the container.

        The session is TERMINATED only once the agent confirms the container is gone. A removal
        that fails is retried while the agent is connected; an agent that is away settles it when
        it registers again (or is declared lost).
        """
        # Decide under the session's lock: a placement or an agent's report may be landing now.
        async with self._lock_of(sid):
            live = self.live.get(sid)
            if live is None:
                return await self._row(sid)
            if live.state == SessionState.PENDING:
                return await self._transition_locked(sid, SessionState.CANCELLED, reason)
            if live.state != SessionState.TERMINATING:
                await self._transition_locked(sid, SessionState.TERMINATING, "shutdown requested")
        await self._remove_container(live)
        return await self._row(sid)

    async def _row(self, sid: str) -> KernelSession:
        async with self.db() as db:
            row = await db.get(KernelSession, sid, populate_existing=True)
        assert row is not None
        return row

    async def _remove_container(self, live: Live) -> None:
        """Order the removal; on failure keep retrying in the background while the agent is there."""
        if await self._try_destroy(live):
            return
        self._spawn(self._retry_destroy(live))

    async def _try_destroy(self, live: Live) -> bool:
        if not await self._order_destroy(live.agent_id or "", live.id):
            return False
        if live.id in self.live:
            # The agent reports TERMINATED itself; this covers an order that overtook the create.
            await self._transition(live.id, SessionState.TERMINATED, "shut down")
        return True

    async def _retry_destroy(self, live: Live) -> None:
        while self.live.get(live.id) is live and live.state == SessionState.TERMINATING:
            await asyncio.sleep(self.destroy_retry)
            link = self.registry.get(live.agent_id or "")
            if link is None or not link.connected:
                return  # agent_registered or agent_lost settles it
            if await self._try_destroy(live):
                return

    async def signal(self, user: User, sid: str, signame: str) -> None:
        """Deliver a signal to the kernel's process (SIGINT interrupts it)."""
        if signame not in SIGNALS:
            raise InvalidRequest(f"signal must be one of {', '.join(sorted(SIGNALS))}")
        await self.get_row(user, sid)
        live = self._running(sid)
        await self._link(live).call("signal_kernel", {"session_id": sid, "signal": signame})

    async def restart(self, user: User, sid: str) -> dict[str, Any]:
        """Replace the kernel's container with a fresh one on the same ports and key."""
        await self.get_row(user, sid)
        live = self._running(sid)
        await self._link(live).call("restart_kernel", live.order().to_json())
        return session_json(await self.get_row(user, sid), with_connection=True)

    def _running(self, sid: str) -> Live:
        live = self.live.get(sid)
        if live is None or live.state != SessionState.RUNNING:
            state = live.state.value if live else "over"
            raise Conflict(f"kernel session {sid} is not running (it is {state})")
        return live

    def _link(self, live: Live) -> Any:
        link = self.registry.get(live.agent_id or "")
        if link is None or not link.connected:
            raise Conflict(f"the agent of kernel session {live.id} is not connected")
        return link

    # -- agents ----------------------------------------------------------------------------

    def agent_usage(self, agent_id: str) -> tuple[ResourceSlot, int]:
        """What the agent's kernels hold, and how many kernels it has."""
        agent = self.cluster.agents.get(agent_id)
        kernels = sum(1 for s in self.live.values() if s.agent_id == agent_id)
        return (ResourceSlot(agent.used) if agent else ResourceSlot()), kernels

    def device_holders(self, agent_id: str) -> dict[str, list[str]]:
        """Device id → the sessions holding (a part of) it."""
        holders: dict[str, list[str]] = {}
        for sid, alloc in self.cluster.allocations.items():
            if alloc.agent_id == agent_id:
                for devs in alloc.devices.values():
                    for dev_id in devs:
                        holders.setdefault(dev_id, []).append(sid)
        return holders

    async def set_drained(self, agent_id: str, drained: bool) -> None:
        """Stop (or resume) new placements on an agent; its running kernels are not touched."""
        if agent_id not in self.registry.links:
            raise NotFound(f"no agent {agent_id}")
        async with self.db() as db, db.begin():
            row = await db.get(Agent, agent_id)
            if row is not None:
                row.schedulable = not drained
        (self.drained.add if drained else self.drained.discard)(agent_id)
        if agent_id in self.cluster.agents:
            self.cluster.set_schedulable(agent_id, not drained and self.registry.links[agent_id].connected)
        self._wakeup.set()

    def agent_disconnected(self, agent_id: str) -> None:
        """No new kernels go to an agent whose link is down (it may come back before it is lost)."""
        if agent_id in self.cluster.agents:
            self.cluster.set_schedulable(agent_id, False)

    async def agent_registered(self, reg: AgentRegistration) -> None:
        """Reconcile what a (re)connecting agent runs with what the gateway believes."""
        images = {normalize_image(t) for i in reg.images for t in i.tags}
        self.cluster.add_agent(reg.agent_id, reg.capacity, reg.devices, images)
        self.cluster.set_schedulable(reg.agent_id, reg.agent_id not in self.drained)
        await self._save_agent(reg)
        reported = {k.session_id: k for k in reg.kernels}
        for sid, report in reported.items():
            live = self.live.get(sid)
            if live is None or live.agent_id != reg.agent_id:
                # A kernel the gateway ended, never knew, or placed elsewhere: it must not keep
                # running, and an agent never takes over another agent's session by naming it.
                if live is not None:
                    log.warning("agent %s reported session %s of agent %s", reg.agent_id, sid, live.agent_id)
                self._spawn(self._order_destroy(reg.agent_id, sid))
            elif live.state == SessionState.TERMINATING:
                self._spawn(self._remove_container(live))  # asked to end while the agent was away
            else:
                await self.kernel_report(reg.agent_id, report)
        for live in list(self.live.values()):
            if (
                live.agent_id == reg.agent_id
                and live.id not in reported
                and live.state in ALLOCATED_STATES
                and live.state != SessionState.SCHEDULED  # its create order may still be on the way
            ):
                if live.state == SessionState.TERMINATING:
                    await self._transition(live.id, SessionState.TERMINATED, "shut down")
                    continue
                await self._transition(
                    live.id, SessionState.ERROR, "the kernel's container vanished while its agent was away"
                )
        self._wakeup.set()

    async def _save_agent(self, reg: AgentRegistration) -> None:
        now = datetime.now(UTC)
        async with self.db() as db, db.begin():
            row = await db.get(Agent, reg.agent_id)
            if row is None:
                row = Agent(id=reg.agent_id, first_seen=now, schedulable=True)
                db.add(row)
            row.address = reg.address
            row.status = "ALIVE"
            row.capacity = reg.capacity.to_json()
            row.images = sorted(t for i in reg.images for t in i.tags)
            row.last_heartbeat = now

    async def _order_destroy(self, agent_id: str, sid: str) -> bool:
        """Have the agent remove the session's container; False when it is away or failed."""
        link = self.registry.get(agent_id)
        if link is None or not link.connected:
            return False
        try:
            await link.call("destroy_kernel", {"session_id": sid})
        except ApiError as e:
            log.warning("removing the container of %s on %s failed: %s", sid, agent_id, e.title)
            return False
        return True

    async def kernel_report(self, agent_id: str, report: KernelReport) -> None:
        """An agent says a kernel changed state."""
        live = self.live.get(report.session_id)
        if live is None or live.agent_id != agent_id:
            return
        if report.state == live.state and report.state == SessionState.RUNNING:
            # Same state again (a restart finished, or a reconnect): refresh the connection.
            await self._transition(
                report.session_id,
                report.state,
                report.reason or "running",
                connection=report.connection,
                force=True,
            )
            return
        if not is_forward(live.state, report.state):
            return
        await self._transition(
            report.session_id,
            report.state,
            report.reason,
            connection=report.connection,
            exit_code=report.exit_code,
        )

    async def agent_lost(self, agent_id: str, reason: str) -> None:
        self.cluster.remove_agent(agent_id)
        async with self.db() as db, db.begin():
            row = await db.get(Agent, agent_id)
            if row is not None:
                row.status = "LOST"
        for live in list(self.live.values()):
            if live.agent_id == agent_id and live.state in ALLOCATED_STATES:
                await self._transition(live.id, SessionState.LOST, reason)
        self._wakeup.set()

    # -- scheduling ------------------------------------------------------------------------

    async def _schedule_loop(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wakeup.wait(), timeout=1.0)
            except TimeoutError:
                pass
            self._wakeup.clear()
            try:
                await self._schedule_pending()
                await self._sweep_unclaimed()
            except Exception:
                log.exception("scheduling pass failed")

    async def _sweep_unclaimed(self) -> None:
        """Sessions whose agent never came back after a gateway restart are LOST."""
        # An agent retries at least every AGENT_RECONNECT_MAX seconds: a gateway that took longer
        # than that to restart must give it one full retry before giving up on it.
        grace = max(self.registry.heartbeat_timeout, AGENT_RECONNECT_MAX + 2)
        if time.monotonic() - self._started < grace:
            return
        for live in list(self.live.values()):
            if live.agent_id and live.state in ALLOCATED_STATES and self.registry.get(live.agent_id) is None:
                await self._transition(
                    live.id,
                    SessionState.LOST,
                    f"agent {live.agent_id} did not reconnect after the gateway restarted",
                )

    async def _schedule_pending(self) -> None:
        pending = [s for s in self.live.values() if s.state == SessionState.PENDING]
        if not pending:
            return
        if not self.registry.alive():
            return  # keep the "no agent is connected" reason until one is
        requests = [
            Request(s.id, s.owner_id, s.resources, s.image, s.seq, s.previous[0] if s.previous else None)
            for s in pending
        ]
        for decision in run_pass(self.cluster, requests, self.policy, self.selector):
            live = self.live[decision.request.session_id]
            alloc = decision.allocation
            if alloc is not None:
                live.agent_id = alloc.agent_id
                await self._transition(
                    live.id,
                    SessionState.SCHEDULED,
                    f"placed on agent {alloc.agent_id}" + _describe_devices(alloc),
                    agent_id=alloc.agent_id,
                    devices=alloc.devices_json(),
                )
                self._spawn(self._start_on_agent(live, alloc))
                continue
            too_big = self.cluster.exceeds_every_agent(live.resources)
            if too_big:
                await self._transition(live.id, SessionState.ERROR, too_big)
            elif self.pending_timeout and time.monotonic() - live.created > self.pending_timeout:
                await self._transition(
                    live.id,
                    SessionState.ERROR,
                    f"not placed within {self.pending_timeout:.0f} s ({decision.reason})",
                )
            elif decision.reason != live.reason:
                live.ahead = decision.ahead
                await self._transition(live.id, SessionState.PENDING, decision.reason, force=True)
            elif decision.ahead != live.ahead:
                # The place in line moves with every start and end: told, not stored as a transition.
                live.ahead = decision.ahead
                self.hub.publish({**self._last_event[live.id], **self._position(live)})

    async def _start_on_agent(self, live: Live, alloc: Allocation) -> None:
        link = self.registry.get(live.agent_id or "")
        order = live.order()
        order.devices = alloc.devices_json()
        if live.previous and live.previous[0] == live.agent_id:
            order.reuse = live.previous[1]
        if live.key:
            order.reuse = {**(order.reuse or {}), "key": live.key}
        if self.live.get(live.id) is not live or live.state != SessionState.SCHEDULED:
            return  # ended before the order went out
        try:
            if link is None:
                raise ApiError(f"agent {live.agent_id} is gone")
            await link.call("create_kernel", order.to_json())
        except ApiError as e:
            if live.id in self.live:
                await self._transition(live.id, SessionState.ERROR, f"agent refused the kernel: {e.title}")
            return
        if live.id not in self.live:  # ended while the order was on its way: undo it
            await self._order_destroy(live.agent_id or "", live.id)

    # -- state changes ---------------------------------------------------------------------

    def mounted_vfolders(self) -> dict[str, list[str]]:
        """vfolder id → the sessions not yet over that mount it."""
        out: dict[str, list[str]] = {}
        for live in self.live.values():
            for m in live.mounts:
                out.setdefault(m.vfolder_id, []).append(live.id)
        return out

    def stream_opened(self, sid: str) -> None:
        self._streams[sid] = self._streams.get(sid, 0) + 1

    def stream_closed(self, sid: str) -> None:
        """A bound session whose client's last stream is gone (and stays gone) is ended."""
        self._streams[sid] = self._streams.get(sid, 1) - 1
        live = self.live.get(sid)
        if live is not None and live.bound and self._streams[sid] <= 0:
            self._spawn(self._end_if_abandoned(sid, self.stream_grace))

    async def _end_if_abandoned(self, sid: str, grace: float) -> None:
        await asyncio.sleep(grace)  # a reconnecting client keeps it
        if self._streams.get(sid, 0) <= 0 and sid in self.live:
            log.info("ending kernel session %s: its client went away", sid)
            await self.end(sid, "its client went away")

    def _lock_of(self, sid: str) -> asyncio.Lock:
        return self._locks.setdefault(sid, asyncio.Lock())

    async def _transition(
        self,
        sid: str,
        state: SessionState,
        reason: str,
        *,
        force: bool = False,
        **fields: Any,
    ) -> KernelSession:
        """Move a session to ``state`` (if that is forward), store it, then publish it."""
        async with self._lock_of(sid):
            return await self._transition_locked(sid, state, reason, force=force, **fields)

    async def _transition_locked(
        self,
        sid: str,
        state: SessionState,
        reason: str,
        *,
        force: bool = False,
        **fields: Any,
    ) -> KernelSession:
        # Read, check and write under the session's lock: two reports racing must not both pass
        # the check against the same old state (SQLite reads outside the write transaction).
        now = datetime.now(UTC)
        async with self.db() as db, db.begin():
            row = await db.get(KernelSession, sid, with_for_update=True, populate_existing=True)
            assert row is not None
            current = SessionState(row.state)
            if not force and not is_forward(current, state):
                return row
            row.state = state.value
            row.reason = reason
            row.updated_at = now
            for k, v in fields.items():
                if v is not None:
                    setattr(row, k, v)
            transition = SessionTransition(session_id=sid, state=state.value, reason=reason, at=now)
            db.add(transition)
            await db.flush()
        live = self.live.get(sid)
        if live is not None:
            live.state = state
            live.reason = reason
            if state.is_terminal:
                written = [m.vfolder_id for m in live.mounts if m.mode == "rw"]
                if written and self.kernel_ended_with_mounts is not None:
                    self._spawn(self.kernel_ended_with_mounts(written))  # what it wrote counts now
                del self.live[sid]
                self._locks.pop(sid, None)
                self._streams.pop(sid, None)
                self.cluster.release(sid)
                self._wakeup.set()  # resources came free
        self._publish(row, transition.id)
        return row

    def _position(self, live: Live | None) -> dict[str, Any]:
        if live is None or live.state != SessionState.PENDING or not live.reason.startswith("waiting"):
            return {}
        return {"reason": with_position(live.reason, live.ahead), "requests_ahead": live.ahead}

    def describe(self, row: KernelSession, *, with_connection: bool) -> dict[str, Any]:
        """The API model, with the live place in line of a waiting session."""
        return {**session_json(row, with_connection=with_connection), **self._position(self.live.get(row.id))}

    def event_of(self, row: KernelSession, seq: int) -> dict[str, Any]:
        """The event for a session's current state; ``seq`` orders events (transition id)."""
        event = {
            "seq": seq,
            "session_id": row.id,
            "owner": row.owner_id,
            "state": row.state,
            "reason": row.reason,
            "agent": row.agent_id,
            "exit_code": row.exit_code,
            "at": _iso(row.updated_at),
        }
        if row.state == SessionState.RUNNING.value and row.connection:
            event["connection"] = row.connection
        event.update(self._position(self.live.get(row.id)))
        return event

    def _publish(self, row: KernelSession, seq: int) -> None:
        event = self.event_of(row, seq)
        if SessionState(row.state).is_terminal:
            self._last_event.pop(row.id, None)
        else:
            self._last_event[row.id] = event
        self.hub.publish(event)
