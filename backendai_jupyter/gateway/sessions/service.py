"""Kernel sessions: the API the handlers call, over the database as the one source of truth.

Every change of state is one conditional update with its transition row (:mod:`.store`),
published as an event to this replica's streams and announced to the others (:mod:`..bus`).
Nothing about a session is kept in memory that the database could contradict: the
scheduling leader (:mod:`.scheduling`) rebuilds what it needs from the rows each pass, agents'
registrations and reports are reconciled against the rows (:mod:`.agents`), policies count
rows (:mod:`.policy`), and orders reach an agent through whichever replica holds its link
(:mod:`..dispatch`). What a replica does keep is its own: the links of agents connected to it,
the event streams open on it, and the tasks it runs.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select

from ...common.errors import (
    AgentUnavailable,
    ApiError,
    Conflict,
    InsufficientResources,
    InvalidRequest,
    NotFound,
    UnknownImage,
)
from ...common.slots import ResourceSlot
from ...common.states import ALLOCATED_STATES, SessionState
from ...common.tasks import cancel_and_wait
from ...common.wire import CreateKernel, DestroyKernel, Mount, RestartKernel, SignalKernel
from ..bus import EVENTS, Bus, Leadership
from ..dispatch import Dispatcher
from ..events import EventHub
from ..models import KernelSession, SessionTransition, User
from ..registry import AgentRegistry
from ..requests import SessionRequest
from ..scheduler import Allocation, Cluster, normalize_image
from .agents import AgentBook
from .policy import Policies
from .scheduling import Scheduler
from .shapes import event_of, iso, session_json
from .store import OPEN, Change, SessionStore

log = logging.getLogger(__name__)

STREAM_GRACE = 5.0  # seconds a bound session outlives its client's last event stream
DESTROY_RETRY = 2.0  # seconds between attempts to remove a container whose removal failed
SIGNALS = {"SIGINT", "SIGTERM", "SIGKILL", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2"}


def create_order(row: KernelSession, kind: type[CreateKernel] = CreateKernel) -> CreateKernel:
    """The order that starts (or, with ``RestartKernel``, restarts) a session's kernel."""
    return kind(
        row.id,
        row.image,
        ResourceSlot.parse(row.resources),
        dict(row.env or {}),
        row.owner_id,
        mounts=[Mount.from_json(m) for m in row.mounts or []],
        working_dir=row.working_dir or "",
    )


class SessionService:
    """The one place that creates, changes and ends kernel sessions."""

    def __init__(
        self,
        db: Any,
        hub: EventHub,
        default_resources: ResourceSlot,
        pending_timeout: float,
        heartbeat_timeout: float,
        policy: str = "fifo",
        selector: str = "auto",
        stream_grace: float = STREAM_GRACE,
        destroy_retry: float = DESTROY_RETRY,
        max_pending: int = 100,
        bus: Bus | None = None,
    ) -> None:
        self.db = db
        self.hub = hub
        self.bus = bus if bus is not None else Bus(db.kw["bind"])
        self.store = SessionStore(db, self.bus)
        self.policies = Policies(max_pending)
        self.default_resources = default_resources  # what image kernelspecs ask for
        self.stream_grace = stream_grace
        self.destroy_retry = destroy_retry
        self.registry = AgentRegistry(heartbeat_timeout, self._agent_lost)
        self.agents = AgentBook(self)
        self.dispatcher = Dispatcher(db, self.registry, self.bus)
        self.scheduler = Scheduler(self, policy, selector, pending_timeout)
        self.leadership = Leadership(self.bus, self.scheduler.leadership_changed)
        self.streams: dict[str, int] = {}  # session → event streams open on this replica
        self._tasks: set[asyncio.Task[Any]] = set()
        self._ending: set[str] = set()
        self._stopped = False
        self._last_seq = 0
        self._heard: asyncio.Queue[str] = asyncio.Queue()
        # Called with the vfolders a kernel mounted read-write once it is over (their usage changed).
        self.kernel_ended_with_mounts: Callable[[list[str]], Awaitable[None]] | None = None
        self.bus.on(EVENTS, self._heard.put_nowait)
        self.bus.on_reconnect(lambda: self._heard.put_nowait("resync"))

    @staticmethod
    def normalize(image: str) -> str:
        return normalize_image(image)

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        await self.bus.start()
        if not self.bus.shared:
            await self.agents.let_go(all_links=True)  # they were linked to this gateway's last run
        async with self.db() as db:
            self._last_seq = int(
                await db.scalar(select(SessionTransition.id).order_by(SessionTransition.id.desc()).limit(1))
                or 0
            )
        self.registry.start()
        self.spawn(self._relay_heard())
        self.spawn(self._keep_streams_watched())
        self.scheduler.start()
        await self.leadership.start()

    async def stop(self) -> None:
        self._stopped = True
        try:
            await self.agents.let_go()
        except Exception:
            log.exception("marking this replica's agents disconnected failed")
        await self.scheduler.stop()
        await self.leadership.stop()
        await self.registry.stop()
        await cancel_and_wait(list(self._tasks))
        await self.bus.stop()

    def spawn(self, coro: Any) -> None:
        if self._stopped:  # a stream closing as the gateway stops must not end its session
            coro.close()
            return
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- the API ---------------------------------------------------------------------------

    async def check(self, user: User, req: SessionRequest) -> None:
        """Everything ``create`` would refuse, refused now, without creating anything."""
        async with self.db() as db:
            await self.policies.check(db, user, req.image, req.resources)
        await self._check_placeable(req.image, req.resources)

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
        prefer, reuse = await self._previous(user, req.restart_of)
        sid = str(uuid.uuid4())
        reuse = {**(reuse or {}), "key": req.key} if req.key else reuse
        # Read before taking the user's lock: under it this request holds a connection, and must
        # never wait for a second one (a burst of one user's creates, each holding a connection
        # while it waits for the lock, would leave the lock's holder none).
        agents = await self.agents.connected()
        # Check and insert under the user's lock: concurrent requests cannot all pass a limit.
        async with self.policies.checked(self.db, user, req.image, req.resources) as db:
            # (the policy was checked first: its refusal names the limit)
            connected = self._placeable(agents, req.image, req.resources)
            now = datetime.now(UTC)
            reason = "" if connected else "waiting: no agent is connected"
            row = KernelSession(
                id=sid,
                name=req.name,
                owner_id=user.id,
                access_key=access_key,
                image=normalize_image(req.image),
                resources=req.resources.to_json(),
                env=req.env,
                state=SessionState.PENDING.value,
                reason=reason,
                bound=req.bound_to_stream,
                kernel_key=req.key or None,
                mounts=[m.to_json() for m in mounts or []],
                working_dir=working_dir,
                prefer_agent=prefer,
                reuse=reuse,
                watched_at=now,
                ahead=0,
                created_at=now,
                updated_at=now,
            )
            db.add(row)
            first = SessionTransition(session_id=sid, state=row.state, reason=reason, at=now)
            db.add(first)
            await db.flush()
            await self.store.announce(db, sid, first.id)
        self._publish(Change(row, first.id))
        self.scheduler.wake()
        return session_json(row, with_connection=False)

    async def _check_placeable(self, image: str, resources: ResourceSlot) -> bool:
        """Image and capacity checks against the connected agents; whether any is connected."""
        return self._placeable(await self.agents.connected(), image, resources)

    def _placeable(self, agents: list[Any], image: str, resources: ResourceSlot) -> bool:
        if not agents:
            return False
        tags = {normalize_image(t) for a in agents for i in self.agents.images_of(a) for t in i.tags}
        if normalize_image(image) not in tags:
            raise UnknownImage(
                f"unknown image {image!r}; agents have: {', '.join(sorted(tags)) or 'no images'}",
                available=sorted(tags),
            )
        cluster = Cluster()
        for a in agents:
            cluster.add_agent(a.id, ResourceSlot.parse(a.capacity), self.agents.devices_of(a), set())
        too_big = cluster.exceeds_every_agent(resources)
        if too_big:
            raise InsufficientResources(too_big)
        return True

    async def _previous(self, user: User, sid: object) -> tuple[str | None, dict[str, Any] | None]:
        """For a restart, the replaced session's agent and connection (it must be over)."""
        if sid is None:
            return None, None
        if not isinstance(sid, str):
            raise InvalidRequest("restart_of must be a session id")
        row = await self.get_row(user, sid)
        if row.owner_id != user.id:
            # Not even an admin: the new kernel would take over the other user's ports and key.
            raise NotFound(f"no kernel session {sid} of yours")
        if not SessionState(row.state).is_terminal:
            raise Conflict(f"kernel session {sid} is still {row.state}; end it before restarting")
        if row.agent_id and row.connection:
            return row.agent_id, row.connection
        return None, None

    async def get_row(self, user: User, sid: str) -> KernelSession:
        """A session the caller may see (its owner, or an admin); 404 otherwise."""
        row = await self.store.get(sid)
        if row is None or (row.owner_id != user.id and not user.is_admin):
            raise NotFound(f"no kernel session {sid}")
        return row

    async def list(
        self, user: User, *, all_users: bool = False, active_only: bool = False
    ) -> list[dict[str, Any]]:
        where = []
        if not (all_users and user.is_admin):
            where.append(KernelSession.owner_id == user.id)
        if active_only:
            where.append(KernelSession.state.in_(OPEN))
        rows = await self.store.select(*where)
        return [session_json(r, with_connection=r.owner_id == user.id) for r in rows]

    def describe(self, row: KernelSession, *, with_connection: bool) -> dict[str, Any]:
        return session_json(row, with_connection=with_connection)

    async def snapshot(self, user: User, sid: str) -> dict[str, Any]:
        """The event that describes the session's state now (for a stream's first message).

        State, reason and seq come from one transition row, read before the session row, so
        the seq matches the state exactly and the row (for the connection) is at least as new.
        """
        event = await self.event_at(sid)
        if event is None or (event["owner"] != user.id and not user.is_admin):
            raise NotFound(f"no kernel session {sid}")
        return event

    async def events_after(self, user: User, sid: str, seq: int) -> list[dict[str, Any]]:
        """The events of every change of a session after transition ``seq``, oldest first."""
        row = await self.get_row(user, sid)
        async with self.db() as db:
            later = (
                await db.scalars(
                    select(SessionTransition)
                    .where(SessionTransition.session_id == sid, SessionTransition.id > seq)
                    .order_by(SessionTransition.id)
                )
            ).all()
        return [event_of(row, t.id, state=t.state, reason=t.reason, at=t.at) for t in later]

    async def event_at(self, sid: str, seq: int | None = None) -> dict[str, Any] | None:
        """The event of transition ``seq`` of a session (its newest when None)."""
        async with self.db() as db:
            q = select(SessionTransition).where(SessionTransition.session_id == sid)
            q = (
                q.where(SessionTransition.id == seq)
                if seq is not None
                else q.order_by(SessionTransition.id.desc()).limit(1)
            )
            last = (await db.scalars(q)).first()
            row = await db.get(KernelSession, sid, populate_existing=True)
        if row is None or last is None:
            return None
        return event_of(row, last.id, state=last.state, reason=last.reason, at=last.at)

    async def transitions(self, sid: str) -> list[dict[str, Any]]:
        async with self.db() as db:
            rows = (
                await db.scalars(
                    select(SessionTransition)
                    .where(SessionTransition.session_id == sid)
                    .order_by(SessionTransition.id)
                )
            ).all()
        return [{"state": r.state, "reason": r.reason, "at": iso(r.at)} for r in rows]

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
        row = await self._row(sid)
        if SessionState(row.state).is_terminal:
            return row
        # A placement or an agent's report may be landing now: each change below happens only
        # from the states it names, whoever comes first.
        cancelled = await self.transition(sid, SessionState.CANCELLED, reason, allowed={SessionState.PENDING})
        if cancelled is not None:
            return cancelled
        await self.transition(
            sid,
            SessionState.TERMINATING,
            "shutdown requested",
            allowed=ALLOCATED_STATES - {SessionState.TERMINATING},
        )
        row = await self._row(sid)
        if not SessionState(row.state).is_terminal and row.agent_id:
            await self.remove_container(sid, row.agent_id)
            row = await self._row(sid)
        return row

    async def _row(self, sid: str) -> KernelSession:
        row = await self.store.get(sid)
        if row is None:
            raise NotFound(f"no kernel session {sid}")
        return row

    async def remove_container(self, sid: str, agent_id: str) -> None:
        """Order the removal; on failure keep retrying in the background while the agent is there."""
        if await self._try_destroy(sid, agent_id):
            return
        self.spawn(self._retry_destroy(sid, agent_id))

    async def order_destroy(self, agent_id: str, sid: str) -> bool:
        """Have the agent remove the session's container; False when it is away or failed."""
        try:
            await self.dispatcher.call(agent_id, DestroyKernel(sid))
        except ApiError as e:
            log.warning("removing the container of %s on %s failed: %s", sid, agent_id, e.title)
            return False
        return True

    async def _try_destroy(self, sid: str, agent_id: str) -> bool:
        if not await self.order_destroy(agent_id, sid):
            return False
        # The agent reports TERMINATED itself; this covers an order that overtook the create.
        await self.transition(sid, SessionState.TERMINATED, "shut down")
        return True

    async def _retry_destroy(self, sid: str, agent_id: str) -> None:
        while True:
            await asyncio.sleep(self.destroy_retry)
            row = await self.store.get(sid)
            if row is None or row.state != SessionState.TERMINATING.value:
                return
            if not await self._agent_connected(agent_id):
                return  # its registration or its loss settles it
            if await self._try_destroy(sid, agent_id):
                return

    async def _agent_connected(self, agent_id: str) -> bool:
        return any(a.id == agent_id for a in await self.agents.connected())

    async def signal(self, user: User, sid: str, signame: str) -> None:
        """Deliver a signal to the kernel's process (SIGINT interrupts it)."""
        if signame not in SIGNALS:
            raise InvalidRequest(f"signal must be one of {', '.join(sorted(SIGNALS))}")
        row = self._running(await self.get_row(user, sid))
        await self._call(row, SignalKernel(sid, signame))

    async def restart(self, user: User, sid: str) -> dict[str, Any]:
        """Replace the kernel's container with a fresh one on the same ports and key."""
        row = self._running(await self.get_row(user, sid))
        await self._call(row, create_order(row, RestartKernel))
        return session_json(await self.get_row(user, sid), with_connection=True)

    @staticmethod
    def _running(row: KernelSession) -> KernelSession:
        if row.state != SessionState.RUNNING.value:
            state = row.state if not SessionState(row.state).is_terminal else "over"
            raise Conflict(f"kernel session {row.id} is not running (it is {state})")
        return row

    async def _call(self, row: KernelSession, order: Any) -> Any:
        try:
            return await self.dispatcher.call(row.agent_id or "", order)
        except AgentUnavailable:
            raise Conflict(f"the agent of kernel session {row.id} is not connected") from None

    async def start_on_agent(self, sid: str, alloc: Allocation) -> None:
        """Send a placed session's create order to its agent (wherever its link is)."""
        row = await self.store.get(sid)
        if row is None or row.state != SessionState.SCHEDULED.value:
            return  # ended before the order went out
        order = create_order(row)
        order.devices = alloc.devices_json()
        if row.reuse and row.prefer_agent == alloc.agent_id:
            order.reuse = dict(row.reuse)
        elif row.kernel_key:
            order.reuse = {"key": row.kernel_key}
        try:
            await self.dispatcher.call(alloc.agent_id, order)
        except ApiError as e:
            await self.transition(
                sid,
                SessionState.ERROR,
                f"agent refused the kernel: {e.title}",
                allowed=ALLOCATED_STATES - {SessionState.TERMINATING},
            )
            return
        row = await self.store.get(sid)
        if row is not None and SessionState(row.state).is_terminal:  # ended while the order was on its way
            await self.order_destroy(alloc.agent_id, sid)

    async def _agent_lost(self, agent_id: str, reason: str) -> None:
        await self.agents.lost(agent_id, reason)

    # -- vfolders, users -------------------------------------------------------------------

    async def mounted_vfolders(self) -> dict[str, list[str]]:
        """vfolder id → the sessions not yet over that mount it."""
        out: dict[str, list[str]] = {}
        for row in await self.store.select(KernelSession.state.in_(OPEN)):
            for m in row.mounts or []:
                out.setdefault(m["vfolder_id"], []).append(row.id)
        return out

    async def named_open(
        self, prefix: str, *, name: str = "", owner: str | None = None
    ) -> list[KernelSession]:
        """Sessions not over yet named ``<prefix>:<name>`` (any name when empty), of ``owner`` or all.

        The Kernel Gateway API finds its kernels here, whichever replica started them.
        """
        where = [KernelSession.state.in_(OPEN)]
        where.append(
            KernelSession.name == f"{prefix}:{name}" if name else KernelSession.name.startswith(f"{prefix}:")
        )
        if owner is not None:
            where.append(KernelSession.owner_id == owner)
        return await self.store.select(*where)

    async def has_open_sessions(self, user_id: str) -> bool:
        return await self.store.count_open(user_id) > 0

    # -- event streams ---------------------------------------------------------------------

    def stream_opened(self, sid: str) -> None:
        self.streams[sid] = self.streams.get(sid, 0) + 1
        self.spawn(self.store.touch([sid], watched_at=datetime.now(UTC)))

    def stream_closed(self, sid: str) -> None:
        """A bound session whose client's last stream is gone (and stays gone) is ended by the
        leader once the grace has passed since now."""
        self.streams[sid] = self.streams.get(sid, 1) - 1
        if self.streams[sid] <= 0:
            self.streams.pop(sid, None)
        self.spawn(self.store.touch([sid], watched_at=datetime.now(UTC)))

    async def _keep_streams_watched(self) -> None:
        while True:
            await asyncio.sleep(self.stream_grace / 3)
            try:
                await self.store.touch(list(self.streams), watched_at=datetime.now(UTC))
            except Exception:
                log.exception("recording the open event streams failed")

    # -- state changes ---------------------------------------------------------------------

    async def transition(
        self,
        sid: str,
        state: SessionState,
        reason: str,
        *,
        allowed: set[SessionState] | frozenset[SessionState] | None = None,
        again: bool = False,
        fence: tuple[str, dict[str, Any]] | None = None,
        **fields: Any,
    ) -> KernelSession | None:
        """Move a session to ``state`` (from ``allowed``, by default from any state that is
        behind it; ``again``: also from ``state`` itself), store it, then publish it. None when
        the session's state did not allow the move: then nothing changed."""
        change = await self.store.change(
            sid, state, reason, allowed=allowed, again=again, fence=fence, **fields
        )
        if change is None:
            return None
        self._publish(change)
        if state.is_terminal:
            self.scheduler.wake()  # resources came free
            written = [m["vfolder_id"] for m in change.row.mounts or [] if m.get("mode") == "rw"]
            if written and self.kernel_ended_with_mounts is not None:
                self.spawn(self.kernel_ended_with_mounts(written))  # what it wrote counts now
        return change.row

    def _publish(self, change: Change) -> None:
        self._last_seq = max(self._last_seq, change.seq)
        self.hub.publish(event_of(change.row, change.seq))

    async def moved_in_line(self, sid: str, ahead: int) -> None:
        """A waiting request's place in line changed: stored, and told to every replica's streams."""
        await self.store.touch([sid], ahead=ahead)
        event = await self.event_at(sid)
        if event is None or "requests_ahead" not in event:
            return
        self.hub.publish(event)
        await self.bus.notify_now(EVENTS, f"p {self.bus.replica_id} {json.dumps(event)}")

    async def _relay_heard(self) -> None:
        """Changes other replicas made, published to this replica's streams in commit order."""
        while True:
            payload = await self._heard.get()
            try:
                await self._relay(payload)
            except Exception:
                log.exception("relaying a change from another replica failed")

    async def _relay(self, payload: str) -> None:
        if payload == "w":
            self.scheduler.wake()
            return
        if payload == "resync":  # notifications were missed while listening was down
            async with self.db() as db:
                missed = (
                    await db.execute(
                        select(SessionTransition.id, SessionTransition.session_id)
                        .where(SessionTransition.id > self._last_seq)
                        .order_by(SessionTransition.id)
                    )
                ).all()
            for seq, sid in missed:
                await self._relay(f"{seq} - {sid}")
            return
        kind, replica, rest = payload.split(" ", 2)
        if replica == self.bus.replica_id:
            return  # published here already
        if kind == "p":
            self.hub.publish(json.loads(rest))
            return
        seq = int(kind)
        self._last_seq = max(self._last_seq, seq)
        self.scheduler.wake()
        if not self.hub.watched(rest):
            return  # no stream here watches that session: nothing to read
        event = await self.event_at(rest, seq)
        if event is not None:
            self.hub.publish(event)
