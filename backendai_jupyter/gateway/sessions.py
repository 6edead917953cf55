"""Kernel sessions: creation, placement, the state machine, and orders to agents.

Every change of state is written to the database (the session row and a transition row)
before it is published as an event, so a client that reconnects reads the same story.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import async_sessionmaker

from ..common.errors import (
    ApiError,
    Conflict,
    InsufficientResources,
    InvalidRequest,
    NotFound,
    UnknownImage,
)
from ..common.slots import ResourceSlot, SlotError, total
from ..common.states import ALLOCATED_STATES, SessionState, is_forward
from ..common.wire import AgentRegistration, CreateKernel, KernelReport
from .events import EventHub
from .models import KernelSession, SessionTransition, User
from .registry import AgentRegistry
from .scheduler import AgentView, exceeds_every_agent, first_fit, image_matches, normalize_image

log = logging.getLogger(__name__)

ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
MAX_ENV_VALUE = 4096
MAX_ENV_ENTRIES = 128
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
    agent_id: str | None = None
    reason: str = ""
    # A restart: the agent and connection of the session this one replaces.
    previous: tuple[str, dict[str, Any]] | None = None


def validate_env(env: object) -> dict[str, str]:
    """Environment variables for a kernel: names and values checked, nothing odd passes."""
    if env is None:
        return {}
    if not isinstance(env, dict):
        raise InvalidRequest("env must be an object of string values")
    if len(env) > MAX_ENV_ENTRIES:
        raise InvalidRequest(f"env has {len(env)} entries; at most {MAX_ENV_ENTRIES} are allowed")
    out = {}
    for k, v in env.items():
        if not isinstance(k, str) or not ENV_NAME_RE.match(k):
            raise InvalidRequest(f"env: {k!r} is not a valid variable name")
        if not isinstance(v, str):
            raise InvalidRequest(f"env: {k} must be a string")
        if len(v) > MAX_ENV_VALUE or "\0" in v or "\n" in v or "\r" in v:
            raise InvalidRequest(
                f"env: {k} must be at most {MAX_ENV_VALUE} characters without NUL or newlines"
            )
        out[k] = v
    return out


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
        "exit_code": row.exit_code,
        "created_at": _iso(row.created_at),
        "updated_at": _iso(row.updated_at),
    }
    if with_connection and row.connection:
        d["connection"] = row.connection
    return d


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
        max_resources: ResourceSlot,
        pending_timeout: float,
        heartbeat_timeout: float,
    ) -> None:
        self.db = db
        self.hub = hub
        self.default_resources = default_resources
        self.max_resources = max_resources
        self.pending_timeout = pending_timeout
        self.registry = AgentRegistry(heartbeat_timeout, self.agent_lost)
        self.live: dict[str, Live] = {}
        self._wakeup = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._scheduler: asyncio.Task[None] | None = None

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Load unfinished sessions and start the scheduler."""
        async with self.db() as db:
            rows = (await db.scalars(select(KernelSession))).all()
            for row in rows:
                state = SessionState(row.state)
                if state.is_terminal:
                    continue
                self.live[row.id] = Live(
                    id=row.id,
                    owner_id=row.owner_id,
                    image=row.image,
                    resources=ResourceSlot.parse(row.resources),
                    env=dict(row.env or {}),
                    state=state,
                    agent_id=row.agent_id,
                    reason=row.reason,
                )
        self._started = time.monotonic()
        self.registry.start()
        self._scheduler = asyncio.ensure_future(self._schedule_loop())
        self._wakeup.set()

    async def stop(self) -> None:
        await self.registry.stop()
        for task in [self._scheduler, *self._tasks]:
            if task:
                task.cancel()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- the API ---------------------------------------------------------------------------

    async def create(self, user: User, access_key: str, body: dict[str, Any]) -> dict[str, Any]:
        """Validate a request, clamp it to policy, and queue it; placement follows at once."""
        image = body.get("image")
        if not isinstance(image, str) or not image.strip():
            raise InvalidRequest("image is required (e.g. 'backendai-jupyter/python')")
        image = image.strip()
        name = body.get("name") or ""
        if not isinstance(name, str) or len(name) > 128:
            raise InvalidRequest("name must be a string of at most 128 characters")
        try:
            requested = ResourceSlot.parse(body.get("resources") or {})
        except SlotError as e:
            raise InvalidRequest(f"resources: {e}") from None
        env = validate_env(body.get("env"))
        previous = await self._previous(user, body.get("restart_of"))
        resources = ResourceSlot({**self.default_resources, **requested}).clamp(self.max_resources)
        agents = self._agent_views()
        if agents:
            if not any(image_matches(image, a.images) for a in agents):
                known = sorted({t for a in agents for t in a.images})
                raise UnknownImage(
                    f"unknown image {image!r}; agents have: {', '.join(known) or 'no images'}",
                    available=known,
                )
            too_big = exceeds_every_agent(resources, agents)
            if too_big:
                raise InsufficientResources(too_big)

        sid = str(uuid.uuid4())
        now = datetime.now(UTC)
        reason = "" if agents else "waiting: no agent is connected"
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
                created_at=now,
                updated_at=now,
            )
            db.add(row)
            first = SessionTransition(session_id=sid, state=row.state, reason=reason, at=now)
            db.add(first)
            await db.flush()
        self.live[sid] = Live(
            sid, user.id, row.image, resources, env, SessionState.PENDING, reason=reason, previous=previous
        )
        self.hub.publish(self.event_of(row, first.id))
        self._wakeup.set()
        return session_json(row, with_connection=False)

    async def _previous(self, user: User, sid: object) -> tuple[str, dict[str, Any]] | None:
        """For a restart, the replaced session's agent and connection (it must be over)."""
        if sid is None:
            return None
        if not isinstance(sid, str):
            raise InvalidRequest("restart_of must be a session id")
        row = await self.get_row(user, sid)
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
        return [session_json(r, with_connection=r.owner_id == user.id) for r in rows]

    async def snapshot(self, user: User, sid: str) -> dict[str, Any]:
        """The event that describes the session's state now (for a stream's first message)."""
        async with self.db() as db:
            row = await db.get(KernelSession, sid)
            seq = await db.scalar(
                select(func.max(SessionTransition.id)).where(SessionTransition.session_id == sid)
            )
        if row is None or (row.owner_id != user.id and not user.is_admin):
            raise NotFound(f"no kernel session {sid}")
        return self.event_of(row, seq or 0)

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
        """End a session: cancel it if pending, else have its agent remove the container."""
        row = await self.get_row(user, sid)
        live = self.live.get(sid)
        if live is None:
            return session_json(row, with_connection=False)
        if live.state == SessionState.PENDING:
            row = await self._transition(sid, SessionState.CANCELLED, "cancelled by the user")
            return session_json(row, with_connection=False)
        await self._transition(sid, SessionState.TERMINATING, "shutdown requested")
        link = self.registry.get(live.agent_id or "")
        if link is not None and link.connected:
            try:
                await link.call("destroy_kernel", {"session_id": sid})
            except ApiError as e:
                log.warning("destroy of %s on %s failed: %s", sid, live.agent_id, e.title)
        if sid in self.live:
            # The agent confirms by reporting TERMINATED; without an agent, nobody else will.
            await self._transition(sid, SessionState.TERMINATED, "shut down")
        row = await self.get_row(user, sid)
        return session_json(row, with_connection=False)

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
        await self._link(live).call(
            "restart_kernel",
            CreateKernel(sid, live.image, live.resources, live.env, live.owner_id).to_json(),
        )
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
        mine = [s for s in self.live.values() if s.agent_id == agent_id]
        return total(s.resources for s in mine if s.state in ALLOCATED_STATES), len(mine)

    def _agent_views(self) -> list[AgentView]:
        views = []
        for link in self.registry.alive():
            used, _ = self.agent_usage(link.id)
            tags = frozenset(normalize_image(t) for i in link.registration.images for t in i.tags)
            views.append(AgentView(link.id, link.registration.capacity, used, tags))
        return views

    async def agent_registered(self, reg: AgentRegistration) -> None:
        """Reconcile what a (re)connecting agent runs with what the gateway believes."""
        reported = {k.session_id: k for k in reg.kernels}
        for sid, report in reported.items():
            live = self.live.get(sid)
            if live is None:
                # A kernel the gateway ended or never knew: it must not keep running.
                self._spawn(self._order_destroy(reg.agent_id, sid))
            else:
                live.agent_id = reg.agent_id
                await self.kernel_report(reg.agent_id, report)
        for live in list(self.live.values()):
            if (
                live.agent_id == reg.agent_id
                and live.id not in reported
                and live.state in ALLOCATED_STATES
                and live.state != SessionState.SCHEDULED  # its create order may still be on the way
            ):
                await self._transition(
                    live.id, SessionState.ERROR, "the kernel's container vanished while its agent was away"
                )
        self._wakeup.set()

    async def _order_destroy(self, agent_id: str, sid: str) -> None:
        link = self.registry.get(agent_id)
        if link and link.connected:
            try:
                await link.call("destroy_kernel", {"session_id": sid})
            except ApiError as e:
                log.warning("could not remove orphan kernel %s on %s: %s", sid, agent_id, e.title)

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
        if time.monotonic() - self._started < self.registry.heartbeat_timeout:
            return
        for live in list(self.live.values()):
            if live.agent_id and live.state in ALLOCATED_STATES and self.registry.get(live.agent_id) is None:
                await self._transition(
                    live.id,
                    SessionState.LOST,
                    f"agent {live.agent_id} did not reconnect after the gateway restarted",
                )

    async def _schedule_pending(self) -> None:
        pending = sorted(
            (s for s in self.live.values() if s.state == SessionState.PENDING), key=lambda s: s.created
        )
        if not pending:
            return
        agents = self._agent_views()
        for live in pending:
            waited = time.monotonic() - live.created
            too_big = exceeds_every_agent(live.resources, agents)
            if too_big:
                await self._transition(live.id, SessionState.ERROR, too_big)
                continue
            prefer = live.previous[0] if live.previous else None
            decision = first_fit(live.resources, live.image, agents, prefer)
            if decision.agent_id is None:
                if self.pending_timeout and waited > self.pending_timeout:
                    await self._transition(
                        live.id,
                        SessionState.ERROR,
                        f"not placed within {self.pending_timeout:.0f} s ({decision.reason})",
                    )
                elif decision.reason != live.reason:
                    await self._transition(live.id, SessionState.PENDING, decision.reason, force=True)
                continue
            live.agent_id = decision.agent_id
            await self._transition(
                live.id,
                SessionState.SCHEDULED,
                f"placed on agent {decision.agent_id}",
                agent_id=decision.agent_id,
            )
            for a in agents:
                if a.id == decision.agent_id:
                    a.used = a.used + live.resources
            self._spawn(self._start_on_agent(live))

    async def _start_on_agent(self, live: Live) -> None:
        link = self.registry.get(live.agent_id or "")
        order = CreateKernel(live.id, live.image, live.resources, live.env, live.owner_id)
        if live.previous and live.previous[0] == live.agent_id:
            order.reuse = live.previous[1]
        try:
            if link is None:
                raise ApiError(f"agent {live.agent_id} is gone")
            await link.call("create_kernel", order.to_json())
        except ApiError as e:
            if live.id in self.live:
                await self._transition(live.id, SessionState.ERROR, f"agent refused the kernel: {e.title}")

    # -- state changes ---------------------------------------------------------------------

    async def _transition(
        self,
        sid: str,
        state: SessionState,
        reason: str,
        *,
        force: bool = False,
        **fields: Any,
    ) -> KernelSession:
        now = datetime.now(UTC)
        async with self.db() as db, db.begin():
            row = await db.get(KernelSession, sid)
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
                del self.live[sid]
                self._wakeup.set()  # resources came free
        self.hub.publish(self.event_of(row, transition.id))
        return row

    @staticmethod
    def event_of(row: KernelSession, seq: int) -> dict[str, Any]:
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
        return event
