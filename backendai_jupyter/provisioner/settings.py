"""Where the gateway is and the keypair to sign with, for everything in Jupyter that calls it."""

from __future__ import annotations

import os

from traitlets import Unicode, default
from traitlets.config import LoggingConfigurable


class GatewaySettings(LoggingConfigurable):
    """Values that override the client config file (and its environment variables).

    Shared by the kernel provisioner and the vfolder contents manager: each can be set on
    either class, or on ``GatewaySettings`` for both.
    """

    gateway_url = Unicode(help="Gateway URL; overrides the client config (env BACKENDAI_GATEWAY_URL).").tag(
        config=True
    )

    @default("gateway_url")
    def _gateway_url_default(self) -> str:
        return os.environ.get("BACKENDAI_GATEWAY_URL", "")

    access_key = Unicode(help="Access key; overrides the client config (env BACKENDAI_ACCESS_KEY).").tag(
        config=True
    )

    @default("access_key")
    def _access_key_default(self) -> str:
        return os.environ.get("BACKENDAI_ACCESS_KEY", "")

    secret_key = Unicode(help="Secret key; overrides the client config (env BACKENDAI_SECRET_KEY).").tag(
        config=True
    )

    @default("secret_key")
    def _secret_key_default(self) -> str:
        return os.environ.get("BACKENDAI_SECRET_KEY", "")
