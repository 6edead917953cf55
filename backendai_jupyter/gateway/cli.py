"""``backendai-jupyter gateway``: the gateway alone, for clusters with agents on other hosts."""

from __future__ import annotations

from jupyter_core.application import base_aliases, base_flags

from ..service import ServiceApp
from .app import Gateway

INSECURE_FLAG = {
    "allow-insecure": (
        {"Gateway": {"allow_insecure": True}},
        "Serve plain HTTP on a non-loopback address (keypairs and tokens cross the network in the clear).",
    ),
}


class GatewayApp(ServiceApp):
    name = "backendai-jupyter gateway"
    description = "Run the gateway (manager + API): REST /v1, the scheduler, the agent registry."
    classes = [Gateway]
    aliases = {
        **base_aliases,
        "ip": "Gateway.ip",
        "port": "Gateway.port",
        "data-dir": "Gateway.data_dir",
        "db-url": "Gateway.db_url",
        "certfile": "Gateway.certfile",
        "keyfile": "Gateway.keyfile",
    }
    flags = {**base_flags, **INSECURE_FLAG}

    def start(self) -> None:
        gw = Gateway(parent=self)

        async def start() -> None:
            await gw.start()
            print(f"gateway ready at {gw.url}", flush=True)

        self._run_until_signal(start, gw.stop)
