"""/v1/agents: the agents' own websocket, and the list of agents for users."""

from __future__ import annotations

import json
import logging
from typing import Any

from tornado import websocket

from ...common.errors import ApiError, Forbidden
from ...common.wire import (
    AGENT_ID_HEADER,
    AGENT_KEY_HEADER,
    JOIN_TOKEN_HEADER,
    AgentRegistration,
    KernelReport,
)
from ..sessions import SessionService
from .base import ApiHandler

log = logging.getLogger(__name__)


class AgentsHandler(ApiHandler):
    """List agents: capacity and use for everyone; addresses, devices and holders for admins."""

    async def get(self) -> None:
        book = self.sessions.agents
        admin = self.current_user.is_admin
        out = []
        for row in await book.rows():
            used, kernels = await book.usage(row.id)
            agent: dict[str, Any] = {
                "id": row.id,
                "status": row.status,
                "schedulable": bool(row.schedulable),
                "capacity": row.capacity,
                "used": used.to_json(),
                "images": sorted(t for i in book.images_of(row) for t in i.tags),
            }
            if not admin:
                # Capacity is what a user needs to choose; where hosts are, which devices they
                # have and whose kernels hold them is the operators' business.
                out.append(agent)
                continue
            holders = await book.device_holders(row.id)
            link = self.sessions.registry.get(row.id)
            stats = {
                s["id"]: s for s in (link.device_stats if link and link.connected else row.device_stats or [])
            }
            agent.update(
                address=row.address,
                kernels=kernels,
                devices=[
                    {
                        **d.to_json(),
                        "label": f"{d.model}"
                        + ("" if "mock" in d.model.lower() or not d.mock else " (mock)"),
                        "held_by": holders.get(d.id, []),
                        "stats": stats.get(d.id),
                    }
                    for d in book.devices_of(row)
                ],
            )
            out.append(agent)
        self.write_json({"agents": out})


class AgentKeyHandler(ApiHandler):
    """DELETE /v1/agents/{id}/key (admins): forget the agent's enrollment and drop its link."""

    async def delete(self, agent_id: str) -> None:
        if not self.current_user.is_admin:
            raise Forbidden("only admins can reset agents")
        await self.settings["agent_auth"].reset(agent_id)
        link = self.sessions.registry.get(agent_id)
        if link is not None and isinstance(link.sender, AgentConnectHandler):
            link.sender.close(4003, "enrollment reset by an admin")
        self.set_status(204)
        self.finish()


class DrainHandler(ApiHandler):
    """POST /v1/agents/{id}/drain or /undrain (admins): stop or resume new placements there."""

    async def post(self, agent_id: str, action: str) -> None:
        if not self.current_user.is_admin:
            raise Forbidden("only admins can drain agents")
        await self.sessions.agents.set_drained(agent_id, action == "drain")
        self.write_json({"id": agent_id, "schedulable": action == "undrain"})


class AgentConnectHandler(websocket.WebSocketHandler):
    """The control connection an agent opens to the gateway (agent-initiated)."""

    agent_id: str | None = None

    @property
    def sessions(self) -> SessionService:
        return self.settings["sessions"]

    async def get(self, *args: Any, **kwargs: Any) -> None:
        headers = self.request.headers
        claimed = headers.get(AGENT_ID_HEADER, "")
        try:
            if await self.settings["agent_auth"].authenticate(
                claimed, headers.get(AGENT_KEY_HEADER, ""), headers.get(JOIN_TOKEN_HEADER, "")
            ):
                log.info("agent %s enrolled with its own key", claimed)
        except ApiError as e:
            log.warning(
                "agent connection as %r from %s refused: %s", claimed, self.request.remote_ip, e.title
            )
            self.set_status(e.status)
            self.set_header("Content-Type", "application/json")
            self.finish(json.dumps(e.to_json()))
            return
        self.claimed_id = claimed
        await super().get(*args, **kwargs)

    def open(self) -> None:  # type: ignore[override]
        self.set_nodelay(True)

    async def on_message(self, message: str | bytes) -> None:
        try:
            msg = json.loads(message)
            kind = msg.get("type")
            if kind == "register":
                reg = AgentRegistration.from_json(msg["agent"])
                if reg.agent_id != self.claimed_id:
                    log.warning("agent %s tried to register as %s; closed", self.claimed_id, reg.agent_id)
                    self.close(4003, "an agent registers under the id it authenticated as")
                    return
                self.agent_id = reg.agent_id
                await self.sessions.agents.registered(reg, self)
                self.write_message(
                    json.dumps(
                        {"type": "registered", "heartbeat_interval": self.settings["heartbeat_interval"]}
                    )
                )
                link = self.sessions.registry.get(reg.agent_id)
                if link is not None and link.sender is self:
                    link.ready.set()  # orders go out only now, after the answer
                log.info(
                    "agent %s registered from %s (%s)", reg.agent_id, reg.address, reg.capacity.describe()
                )
            elif self.agent_id is None:
                self.close(4001, "register first")
            elif kind == "heartbeat":
                await self.sessions.agents.heartbeat(self.agent_id, msg.get("device_stats"))
            elif kind == "reply":
                link = self.sessions.registry.get(self.agent_id)
                if link:
                    link.resolve(msg)
            elif kind == "kernel":
                await self.sessions.agents.report(self.agent_id, KernelReport.from_json(msg["report"]))
        except (KeyError, ValueError, TypeError, AttributeError):
            log.exception("bad message from agent %s", self.agent_id)
        except Exception:
            # The database away for a moment: the link stays; the agent repeats what matters
            # (its heartbeat, and its kernels when it registers again).
            log.exception("handling a message from agent %s failed", self.agent_id)

    def on_close(self) -> None:
        if self.agent_id:
            log.info("agent %s disconnected", self.agent_id)
            self.sessions.spawn(self.sessions.agents.disconnected(self.agent_id, self))
