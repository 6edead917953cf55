"""``backendai-jupyter up``: the gateway and one local agent in one process, for one machine."""

from __future__ import annotations

from pathlib import Path

from jupyter_core.application import base_aliases, base_flags
from traitlets import TraitError, Unicode, validate

from .agent.app import Agent
from .common.clientconfig import ClientConfig, default_path
from .gateway.app import Gateway
from .gateway.cli import INSECURE_FLAG
from .gateway.vfolders.requests import check_name
from .service import ServiceApp


class UpApp(ServiceApp):
    name = "backendai-jupyter up"
    description = "Run the gateway and one local agent (embedded SQLite), and write the client config."
    classes = [Gateway, Agent]
    aliases = {
        **base_aliases,
        "port": "Gateway.port",
        "data-dir": "Gateway.data_dir",
        "client-config": "UpApp.client_config",
        "certfile": "Gateway.certfile",
        "keyfile": "Gateway.keyfile",
        "ca-file": "Agent.ca_file",
    }
    flags = {**base_flags, **INSECURE_FLAG}
    first_vfolder = Unicode(
        "work",
        help="A vfolder made for the admin when they have none, so Jupyter's file browser has a place "
        "for notebooks at once ('' for none).",
    ).tag(config=True)
    client_config = Unicode(
        help="Where to write the client config; <jupyter config dir>/backendai_client.json when empty "
        "(env BACKENDAI_CLIENT_CONFIG)."
    ).tag(config=True)

    @validate("first_vfolder")
    def _valid_first_vfolder(self, proposal: dict[str, str]) -> str:
        name = proposal["value"]
        try:
            return check_name(name) if name else name
        except ValueError as e:
            raise TraitError(f"UpApp.first_vfolder {e}") from None

    def start(self) -> None:
        gw = Gateway(parent=self)
        agent = Agent(parent=self)
        if gw.certfile and not agent.ca_file:
            agent.ca_file = gw.own_ca_file()
        # The local agent and every client of the config written below trust the same CA.
        ca_file = str(Path(agent.ca_file).resolve()) if agent.ca_file else ""

        async def start() -> None:
            await gw.start()
            agent.gateway_url = gw.url
            agent.agent_token = gw.agent_token
            agent.destroy_kernels_on_exit = True
            if not agent.state_dir or agent.state_dir == agent.trait_defaults("state_dir"):
                agent.state_dir = f"{gw.data_dir}/agent"
            await agent.start()
            await agent.wait_registered()
            admin = gw.admin_credentials()
            if self.first_vfolder:
                await self._first_vfolder(gw, admin["access_key"])
            path = ClientConfig(
                gw.url, admin["access_key"], admin["secret_key"], admin.get("token", ""), ca_file
            ).save(Path(self.client_config) if self.client_config else default_path())
            print(f"backendai-jupyter is up: gateway {gw.url}, agent {agent.agent_id}", flush=True)
            print(f"client config: {path}", flush=True)
            print("Press Ctrl-C to stop (kernels it started are shut down).", flush=True)

        async def stop() -> None:
            await agent.stop()
            await gw.stop()

        self._run_until_signal(start, stop)

    async def _first_vfolder(self, gw: Gateway, access_key: str) -> None:
        found = await gw.authenticator.lookup(access_key)
        if found is None:
            return
        user = found[1]
        if not await gw.vfolders.list(user) and not await gw.vfolders.list(user, trash=True):
            await gw.vfolders.create(user, self.first_vfolder, None, None)
            print(f"vfolder {self.first_vfolder!r} created for {user.name}", flush=True)
