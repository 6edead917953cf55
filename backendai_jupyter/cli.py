"""``backendai-jupyter``: one command with subcommands (up, gateway, agent, status, ...)."""

from __future__ import annotations

import json
import sys

from traitlets import Bool, Unicode
from traitlets.config import Application

from . import __version__
from .common.clientconfig import ClientConfig, default_path


class StatusApp(Application):
    name = "backendai-jupyter status"
    description = "Show the gateway, its agents and the running kernel sessions."
    json_output = Bool(False, help="Print JSON for scripts.").tag(config=True)
    flags = {"json": ({"StatusApp": {"json_output": True}}, "Print JSON.")}

    def start(self) -> None:
        from .common.errors import ApiError
        from .provisioner.client import GatewayClient

        path = default_path()
        cfg = ClientConfig.load(path)
        if cfg is None:
            print(
                f"No client config at {path}: start the gateway with `backendai-jupyter up`.", file=sys.stderr
            )
            self.exit(1)
        client = GatewayClient.instance(cfg)
        try:
            agents = client.submit(client.request("GET", "/v1/agents", timeout=10)).result()["agents"]
            sessions = client.submit(
                client.request("GET", "/v1/sessions?all=1&active=1", timeout=10)
            ).result()
        except ApiError as e:
            print(e.title, file=sys.stderr)
            self.exit(1)
        status = {
            "gateway": cfg.url,
            "client_config": str(path),
            "agents": agents,
            "sessions": sessions["sessions"],
        }
        if self.json_output:
            print(json.dumps(status, indent=2))
            return
        print(f"gateway:        {cfg.url}")
        print(f"client config:  {path}")
        print(f"agents ({len(agents)}):")
        for a in agents:
            # Addresses, kernel counts and devices come only to admins.
            print(
                f"  {a['id']:<20} {a['status']:<8} {a.get('address', ''):<15} "
                f"cpu {a['used'].get('cpu', '0')}/{a['capacity'].get('cpu', '0')}  "
                f"mem {_gib(a['used'].get('mem', '0'))}/{_gib(a['capacity'].get('mem', '0'))} GiB"
                + (f"  kernels {a['kernels']}" if "kernels" in a else "")
                + ("" if a.get("schedulable", True) else "  DRAINED")
            )
            for d in a.get("devices", []):
                use = "in use" if d["held_by"] else "free"
                print(f"    {d['plugin']} {d['id']:<3} {d['label']:<30} {use}")
        print(f"kernel sessions ({len(status['sessions'])}):")
        for s in status["sessions"]:
            print(f"  {s['id']}  {s['state']:<10} {s['image']:<32} agent {s['agent'] or '-'}  {s['reason']}")


def _gib(value: str) -> str:
    return f"{int(value) / 2**30:.1f}"


class CertsApp(Application):
    name = "backendai-jupyter certs"
    description = "Make a private CA and the gateway's TLS certificate (certs create --dir DIR --host NAME)."

    def parse_command_line(self, argv: list[str] | None = None) -> None:
        # Everything after `certs` belongs to its own argument parser (--host repeats).
        self.extra_args = list(argv if argv is not None else sys.argv[1:])

    def start(self) -> None:
        from .certs import main

        self.exit(main(self.extra_args))


class KernelspecsInstallApp(Application):
    name = "backendai-jupyter kernelspecs install"
    description = "Install the Backend.AI kernelspecs (e.g. backendai-python3)."
    user = Bool(False, help="Install for the current user.").tag(config=True)
    sys_prefix = Bool(False, help="Install into sys.prefix (the virtualenv).").tag(config=True)
    prefix = Unicode("", help="Install under this prefix.").tag(config=True)
    flags = {
        "user": ({"KernelspecsInstallApp": {"user": True}}, "Install for the current user."),
        "sys-prefix": ({"KernelspecsInstallApp": {"sys_prefix": True}}, "Install into sys.prefix."),
    }
    aliases = {"prefix": "KernelspecsInstallApp.prefix"}

    def start(self) -> None:
        from .kernelspec_install import install

        prefix = sys.prefix if self.sys_prefix else (self.prefix or None)
        for path in install(user=self.user, prefix=prefix, names=self.extra_args or None):
            print(f"installed kernelspec in {path}")


class KernelspecsApp(Application):
    name = "backendai-jupyter kernelspecs"
    description = "Manage Backend.AI kernelspecs."
    subcommands = {"install": (KernelspecsInstallApp, KernelspecsInstallApp.description)}

    def start(self) -> None:
        if self.subapp is None:
            self.print_subcommands()
            self.exit(1)
        self.subapp.start()


class ImagesApp(Application):
    name = "backendai-jupyter images"
    description = "Build the kernel images (cached by content: unchanged images are not rebuilt)."
    base_image = Unicode("", help="FROM of the base image (default: a locally bootstrapped Debian).").tag(
        config=True
    )
    force = Bool(False, help="Rebuild even when up to date.").tag(config=True)
    aliases = {"base-image": "ImagesApp.base_image"}
    flags = {"force": ({"ImagesApp": {"force": True}}, "Rebuild even when up to date.")}

    def start(self) -> None:
        if self.extra_args[:1] != ["build"]:
            print("usage: backendai-jupyter images build [--base-image=IMAGE] [--force] [NAME ...]")
            self.exit(1)
        from .images import main

        argv = list(self.extra_args[1:])
        if self.base_image:
            argv += ["--base-image", self.base_image]
        if self.force:
            argv.append("--force")
        self.exit(main(argv))


class AdminApp(Application):
    name = "backendai-jupyter admin"
    description = "Manage users, resource policies and agents (needs an admin keypair)."

    def parse_command_line(self, argv: list[str] | None = None) -> None:
        # Everything after `admin` belongs to its own argument parser.
        self.extra_args = list(argv if argv is not None else sys.argv[1:])

    def start(self) -> None:
        from .admin_cli import main

        self.exit(main(self.extra_args))


class BackendAIJupyterApp(Application):
    name = "backendai-jupyter"
    version = __version__
    description = "Jupyter kernels in containers on GPU agents, placed by a gateway."
    subcommands = {
        # The long-running commands are imported only when run: an agent host never pays for
        # importing the gateway (jupyter_server and its JSON-schema machinery take seconds).
        "up": (
            "backendai_jupyter.up.UpApp",
            "Run the gateway and one local agent (embedded SQLite), and write the client config.",
        ),
        "gateway": (
            "backendai_jupyter.gateway.cli.GatewayApp",
            "Run the gateway (manager + API): REST /v1, the scheduler, the agent registry.",
        ),
        "agent": (
            "backendai_jupyter.agent.cli.AgentApp",
            "Run an agent: start kernel containers on this host for the gateway.",
        ),
        "status": (StatusApp, StatusApp.description),
        "kernelspecs": (KernelspecsApp, KernelspecsApp.description),
        "images": (ImagesApp, ImagesApp.description),
        "admin": (AdminApp, AdminApp.description),
        "certs": (CertsApp, CertsApp.description),
    }

    def start(self) -> None:
        if self.subapp is None:
            self.print_subcommands()
            self.exit(1)
        self.subapp.start()


main = BackendAIJupyterApp.launch_instance

if __name__ == "__main__":
    main()
