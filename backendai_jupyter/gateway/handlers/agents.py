"""/v1/agents: the agents' own websocket, and the list of agents for users."""

from __future__ import annotations

import hmac
import json
import logging
from typing import Any

from tornado import websocket

from ...common.errors import Forbidden
from ...common.wire import AgentRegistration, KernelReport
from ..sessions import SessionService
from .base import ApiHandler

log = logging.getLogger(__name__)


class AgentsHandler(ApiHandler):
    """List agents with capacity, use, devices (who holds each) and live device numbers."""

    async def get(self) -> None:
        sessions = self.sessions
        out = []
        for link in sessions.registry.links.values():
            used, kernels = sessions.agent_usage(link.id)
            reg = link.registration
            holders = sessions.device_holders(link.id)
            stats = {s["id"]: s for s in link.device_stats}
            mine = self.current_user.is_admin
            out.append(
                {
                    "id": link.id,
                    "address": reg.address,
                    "status": "LOST" if link.lost else ("ALIVE" if link.connected else "DISCONNECTED"),
                    "schedulable": link.id not in sessions.drained,
                    "capacity": reg.capacity.to_json(),
                    "used": used.to_json(),
                    "images": sorted(t for i in reg.images for t in i.tags),
                    "kernels": kernels,
                    "devices": [
                        {
                            **d.to_json(),
                            "label": f"{d.model}"
                            + ("" if "mock" in d.model.lower() or not d.mock else " (mock)"),
                            "held_by": holders.get(d.id, []) if mine else len(holders.get(d.id, [])),
                            "stats": stats.get(d.id),
                        }
                        for d in reg.devices
                    ],
                }
            )
        self.write_json({"agents": out})


class DrainHandler(ApiHandler):
    """POST /v1/agents/{id}/drain or /undrain (admins): stop or resume new placements there."""

    async def post(self, agent_id: str, action: str) -> None:
        if not self.current_user.is_admin:
            raise Forbidden("only admins can drain agents")
        await self.sessions.set_drained(agent_id, action == "drain")
        self.write_json({"id": agent_id, "schedulable": action == "undrain"})


class AgentConnectHandler(websocket.WebSocketHandler):
    """The control connection an agent opens to the gateway (agent-initiated)."""

    agent_id: str | None = None

    @property
    def sessions(self) -> SessionService:
        return self.settings["sessions"]

    async def get(self, *args: Any, **kwargs: Any) -> None:
        token = self.settings["agent_token"]
        header = self.request.headers.get("Authorization", "")
        # Bytes, not str: compare_digest refuses non-ASCII strings, and a header may hold anything.
        presented = header[7:].encode("utf-8", "surrogateescape")
        if not (header.startswith("Bearer ") and hmac.compare_digest(presented, token.encode())):
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
                self.sessions.registry.heartbeat(self.agent_id, msg.get("device_stats"))
            elif kind == "reply":
                link = self.sessions.registry.get(self.agent_id)
                if link:
                    link.resolve(msg)
            elif kind == "kernel":
                await self.sessions.kernel_report(self.agent_id, KernelReport.from_json(msg["report"]))
        except (KeyError, ValueError, TypeError, AttributeError):
            log.exception("bad message from agent %s", self.agent_id)

    def on_close(self) -> None:
        if self.agent_id:
            log.info("agent %s disconnected", self.agent_id)
            self.sessions.registry.connection_closed(self.agent_id, self)
            self.sessions.agent_disconnected(self.agent_id)
