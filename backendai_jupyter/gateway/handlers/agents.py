"""/v1/agents: the agents' own websocket, and the list of agents for users."""

from __future__ import annotations

import hmac
import json
import logging
from typing import Any

from tornado import websocket

from ...common.wire import AgentRegistration, KernelReport
from ..sessions import SessionService
from .base import ApiHandler

log = logging.getLogger(__name__)


class AgentsHandler(ApiHandler):
    """List agents with capacity and what is in use."""

    async def get(self) -> None:
        out = []
        for link in self.sessions.registry.links.values():
            used, kernels = self.sessions.agent_usage(link.id)
            reg = link.registration
            out.append(
                {
                    "id": link.id,
                    "address": reg.address,
                    "status": "LOST" if link.lost else ("ALIVE" if link.connected else "DISCONNECTED"),
                    "capacity": reg.capacity.to_json(),
                    "used": used.to_json(),
                    "images": sorted(t for i in reg.images for t in i.tags),
                    "kernels": kernels,
                }
            )
        self.write_json({"agents": out})


class AgentConnectHandler(websocket.WebSocketHandler):
    """The control connection an agent opens to the gateway (agent-initiated)."""

    agent_id: str | None = None

    @property
    def sessions(self) -> SessionService:
        return self.settings["sessions"]

    async def get(self, *args: Any, **kwargs: Any) -> None:
        token = self.settings["agent_token"]
        header = self.request.headers.get("Authorization", "")
        if not (header.startswith("Bearer ") and hmac.compare_digest(header[7:], token)):
            self.set_status(401)
            self.set_header("Content-Type", "application/json")
            self.finish(json.dumps({"type": "unauthorized", "title": "bad agent token", "status": 401}))
            return
        await super().get(*args, **kwargs)

    def open(self) -> None:  # type: ignore[override]
        self.set_nodelay(True)

    async def on_message(self, message: str | bytes) -> None:
        try:
            msg = json.loads(message)
            kind = msg.get("type")
            if kind == "register":
                reg = AgentRegistration.from_json(msg["agent"])
                self.agent_id = reg.agent_id
                self.sessions.registry.register(reg, self)
                await self.sessions.agent_registered(reg)
                self.write_message(
                    json.dumps(
                        {"type": "registered", "heartbeat_interval": self.settings["heartbeat_interval"]}
                    )
                )
                log.info(
                    "agent %s registered from %s (%s)", reg.agent_id, reg.address, reg.capacity.describe()
                )
            elif self.agent_id is None:
                self.close(4001, "register first")
            elif kind == "heartbeat":
                self.sessions.registry.heartbeat(self.agent_id)
            elif kind == "reply":
                link = self.sessions.registry.get(self.agent_id)
                if link:
                    link.resolve(msg)
            elif kind == "kernel":
                await self.sessions.kernel_report(self.agent_id, KernelReport.from_json(msg["report"]))
        except (KeyError, ValueError, TypeError):
            log.exception("bad message from agent %s", self.agent_id)

    def on_close(self) -> None:
        if self.agent_id:
            log.info("agent %s disconnected", self.agent_id)
            self.sessions.registry.connection_closed(self.agent_id, self)
