"""The client config file: where the gateway is and the keypair to sign requests with.

``backendai-jupyter up`` writes it; the provisioner, the server extension and the CLI read
it. Its place is ``$BACKENDAI_CLIENT_CONFIG`` or ``<jupyter config dir>/backendai_client.json``.
Its ``ca_file`` names the CA to verify an https gateway with (``$BACKENDAI_CA_FILE`` overrides
it; empty: the system trust store).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from .tls import ca_file_from_env

ENV_PATH = "BACKENDAI_CLIENT_CONFIG"


def default_path() -> Path:
    """Where the client config lives unless told otherwise."""
    if os.environ.get(ENV_PATH):
        return Path(os.environ[ENV_PATH])
    from jupyter_core.paths import jupyter_config_dir

    return Path(jupyter_config_dir()) / "backendai_client.json"


@dataclass
class ClientConfig:
    """Gateway URL and the keypair that signs requests to it."""

    url: str
    access_key: str
    secret_key: str
    token: str = ""  # for token clients, e.g. `jupyter lab --gateway-url=... --GatewayClient.auth_token=...`
    ca_file: str = ""  # PEM CA bundle that signed an https gateway's certificate; "": system store

    def save(self, path: Path | None = None) -> Path:
        """Write the file readable by its owner only (it holds a secret)."""
        path = path or default_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(asdict(self), f, indent=2)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: Path | None = None) -> ClientConfig | None:
        """Read the file; ``None`` when there is none."""
        path = path or default_path()
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        return cls(
            url=data["url"],
            access_key=data["access_key"],
            secret_key=data["secret_key"],
            token=data.get("token", ""),
            ca_file=ca_file_from_env() or data.get("ca_file", ""),
        )
