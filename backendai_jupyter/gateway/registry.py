"""Connected agents: their registrations, heartbeats, and calls to them over their websocket."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..common.errors import AgentUnavailable, ApiError
from ..common.tasks import cancel_and_wait
from ..common.wire import AgentRegistration, Order

log = logging.getLogger(__name__)


class Sender(Protocol):
    def write_message(self, message: str) -> Any: ...


class AgentCallError(ApiError):
    type = "agent-error"
    status = 502


@dataclass
class AgentLink:
    """One agent as the gateway knows it."""

    registration: AgentRegistration
    sender: Sender | None
    last_heartbeat: float = field(default_factory=time.monotonic)
    lost: bool = False
    device_stats: list[dict[str, Any]] = field(default_factory=list)
    # Set once the gateway has answered the registration: until then the agent cannot report on
    # what it is ordered to do, so orders wait (a disconnect sets it too: they fail at once).
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    _calls: dict[int, asyncio.Future[Any]] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return self.registration.agent_id

    @property
    def connected(self) -> bool:
        return self.sender is not None and not self.lost

    async def call(self, order: Order, timeout: float = 60.0) -> Any:
        """Give the agent an order and wait for its reply."""
        method, params = order.METHOD, order.to_json()
        try:
            async with asyncio.timeout(timeout):
                await self.ready.wait()
        except TimeoutError:
            raise AgentUnavailable(f"agent {self.id} did not finish registering in {timeout:.0f} s") from None
        if self.sender is None or self.lost:
            raise AgentUnavailable(f"agent {self.id} is not connected")
        call_id = next(_call_ids)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._calls[call_id] = fut
        try:
            self.sender.write_message(
                json.dumps({"type": "call", "id": call_id, "method": method, "params": params})
            )
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            raise AgentUnavailable(f"agent {self.id} did not answer {method} in {timeout:.0f} s") from None
        finally:
            self._calls.pop(call_id, None)

    def resolve(self, msg: dict[str, Any]) -> None:
        fut = self._calls.get(msg.get("id", -1))
        if fut is None or fut.done():
            return
        if "error" in msg:
            err = msg["error"]
            exc = ApiError.from_json(err) if isinstance(err, dict) else AgentCallError(str(err))
            fut.set_exception(exc)
        else:
            fut.set_result(msg.get("result"))

    def disconnect(self) -> None:
        self.sender = None
        self.ready.set()  # waiting orders fail now, not at their timeout
        for fut in self._calls.values():
            if not fut.done():
                fut.set_exception(AgentUnavailable(f"agent {self.id} disconnected"))
        self._calls.clear()


_call_ids = itertools.count(1)


class AgentRegistry:
    """Every agent that registered since the gateway started, and the loss watchdog."""

    def __init__(
        self,
        heartbeat_timeout: float,
        on_lost: Callable[[str, str], Awaitable[None]],
    ) -> None:
        self.heartbeat_timeout = heartbeat_timeout
        self._on_lost = on_lost
        self.links: dict[str, AgentLink] = {}
        self._watchdog: asyncio.Task[None] | None = None

    def register(self, reg: AgentRegistration, sender: Sender) -> AgentLink:
        old = self.links.get(reg.agent_id)
        if old is not None and old.sender is not None and old.sender is not sender:
            old.disconnect()
        link = AgentLink(reg, sender)
        self.links[reg.agent_id] = link
        return link

    def heartbeat(self, agent_id: str, device_stats: list[dict[str, Any]] | None = None) -> None:
        link = self.links.get(agent_id)
        if link:
            link.last_heartbeat = time.monotonic()
            if device_stats is not None:
                link.device_stats = device_stats

    def connection_closed(self, agent_id: str, sender: Sender) -> None:
        """The websocket went away; the agent counts as lost only after the timeout."""
        link = self.links.get(agent_id)
        if link is not None and link.sender is sender:
            link.disconnect()

    def alive(self) -> list[AgentLink]:
        return [link for link in self.links.values() if link.connected]

    def get(self, agent_id: str) -> AgentLink | None:
        return self.links.get(agent_id)

    def start(self) -> None:
        self._watchdog = asyncio.ensure_future(self._watch())

    async def stop(self) -> None:
        await cancel_and_wait([self._watchdog])

    async def _watch(self) -> None:
        interval = max(0.2, self.heartbeat_timeout / 10)
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            for link in list(self.links.values()):
                silent = now - link.last_heartbeat
                if link.lost or silent <= self.heartbeat_timeout:
                    continue
                link.disconnect()
                try:
                    await self._on_lost(link.id, f"agent {link.id} lost: no heartbeat for {silent:.0f} s")
                except Exception:
                    # A failed pass (the database away for a moment) must not end the watch: the
                    # agent is not marked lost, so the next pass tries again.
                    log.exception("marking agent %s lost failed; trying again", link.id)
                    continue
                link.lost = True
