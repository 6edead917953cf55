"""``backendai-jupyter agent``: an agent, importing nothing of the gateway (it starts in a moment)."""

from __future__ import annotations

from jupyter_core.application import base_aliases

from ..service import ServiceApp
from .app import Agent


class AgentApp(ServiceApp):
    name = "backendai-jupyter agent"
    description = "Run an agent: start kernel containers on this host for the gateway."
    classes = [Agent]
    aliases = {
        **base_aliases,
        "gateway-url": "Agent.gateway_url",
        "id": "Agent.agent_id",
        "host": "Agent.advertised_host",
        "port-range": "Agent.port_range",
        "state-dir": "Agent.state_dir",
        "cpu": "Agent.cpu",
        "mem": "Agent.mem",
        "ca-file": "Agent.ca_file",
    }

    def start(self) -> None:
        agent = Agent(parent=self)
        self._run_until_signal(agent.start, agent.stop)
