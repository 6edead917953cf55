"""The Jupyter Server extension: shows the user's Backend.AI status inside Jupyter."""

from __future__ import annotations

import json

from jupyter_server.base.handlers import APIHandler
from jupyter_server.extension.application import ExtensionApp
from tornado import web

from ..common.errors import ApiError, LaunchError
from .client import GatewayClient
from .provisioner import client_config


class StatusHandler(APIHandler):
    """GET /backendai/status: the gateway this server talks to, its agents and our sessions."""

    @web.authenticated
    async def get(self) -> None:
        try:
            cfg = client_config("", "", "", "")
        except LaunchError as e:
            self.set_status(503)
            self.finish(json.dumps({"type": "not-configured", "title": str(e)}))
            return
        client = GatewayClient.instance(cfg)
        try:
            agents = await client.run(client.request("GET", "/v1/agents"))
            sessions = await client.run(client.request("GET", "/v1/sessions?active=1"))
        except ApiError as e:
            self.set_status(e.status if e.status >= 400 else 502)
            self.finish(json.dumps(e.to_json()))
            return
        self.finish(json.dumps({"gateway": cfg.url, **agents, **sessions}))


class BackendAIExtension(ExtensionApp):
    """Backend.AI inside Jupyter Server."""

    name = "backendai_jupyter"

    def initialize_handlers(self) -> None:
        self.handlers.append((r"/backendai/status", StatusHandler))
