"""The agent process: configuration, and the control connection it opens to the gateway."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import socket
import ssl
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tornado import httpclient, websocket
from traitlets import Bool, Dict, Float, Int, List, Unicode, default, observe, validate
from traitlets.config import LoggingConfigurable

from ..common.errors import ApiError
from ..common.slots import ResourceSlot
from ..common.tls import ENV_CA_FILE, ca_file_from_env, client_context, untrusted
from ..common.wire import (
    AGENT_ID_HEADER,
    AGENT_KEY_HEADER,
    AGENT_RECONNECT_MAX,
    AGENT_WS_PATH,
    JOIN_TOKEN_HEADER,
    AgentRegistration,
    CreateKernel,
    DestroyKernel,
    Device,
    KernelReport,
    RestartKernel,
    SignalKernel,
    order_from_call,
)
from .accelerators.base import AcceleratorPlugin, load_plugins
from .backends.base import BackendError, ContainerBackend, load_backend
from .gateways import DEFAULT_GATEWAY_URL, check_gateway_urls, first_to_answer, others, split_gateway_urls
from .kernels import KernelPolicy, KernelRunner

log = logging.getLogger(__name__)


def _error_title(e: httpclient.HTTPClientError) -> str:
    """The gateway's sentence from an error response, or the HTTP error itself."""
    try:
        return str(json.loads(e.response.body)["title"]) if e.response is not None else str(e)
    except (ValueError, KeyError, TypeError):
        return str(e)


# The first pause after a round of gateways that all failed; it doubles up to AGENT_RECONNECT_MAX.
FIRST_RETRY = 0.2


def _host_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


class Agent(LoggingConfigurable):
    """Runs kernels in containers on this host, as ordered by the gateway."""

    gateway_urls = List(
        Unicode(),
        help="URLs of the gateway's replicas (http or https). The agent registers with the first that "
        "answers, earlier ones preferred; when that link drops it tries the others at once "
        f"(env BACKENDAI_GATEWAY_URL, comma-separated; default {DEFAULT_GATEWAY_URL}).",
    ).tag(config=True)

    @default("gateway_urls")
    def _gateway_urls_default(self) -> list[str]:
        # Defaults skip @validate: check the environment's list here.
        return check_gateway_urls(
            split_gateway_urls(os.environ.get("BACKENDAI_GATEWAY_URL", DEFAULT_GATEWAY_URL))
        )

    @validate("gateway_urls")
    def _valid_gateway_urls(self, proposal: Any) -> list[str]:
        return check_gateway_urls(proposal["value"])

    gateway_url = Unicode(
        help="URL of the gateway: the one-gateway form of gateway_urls, which setting it replaces "
        "(several URLs, comma-separated, are taken too, as in BACKENDAI_GATEWAY_URL)."
    ).tag(config=True)

    @observe("gateway_url")
    def _one_gateway(self, change: Any) -> None:
        self.gateway_urls = split_gateway_urls(change["new"])

    ca_file = Unicode(
        help="PEM file of the CA that signed an https gateway's certificate (the ca.pem of "
        "`backendai-jupyter certs create`); the system trust store when empty (env BACKENDAI_CA_FILE)."
    ).tag(config=True)

    @default("ca_file")
    def _ca_file_default(self) -> str:
        return ca_file_from_env()

    agent_token = Unicode(
        help="The gateway's join token, needed only the first time this agent connects: the gateway "
        "then enrolls this agent's id with the key the agent keeps in state_dir/agent-key "
        "(env BACKENDAI_AGENT_TOKEN)."
    ).tag(config=True)

    @default("agent_token")
    def _agent_token_default(self) -> str:
        return os.environ.get("BACKENDAI_AGENT_TOKEN", "")

    agent_id = Unicode(help="This agent's name; the host name when empty (env BACKENDAI_AGENT_ID).").tag(
        config=True
    )

    @default("agent_id")
    def _agent_id_default(self) -> str:
        return os.environ.get("BACKENDAI_AGENT_ID", "") or socket.gethostname()

    advertised_host = Unicode(
        help="Address clients use to reach kernels on this host (env BACKENDAI_AGENT_HOST)."
    ).tag(config=True)

    @default("advertised_host")
    def _advertised_host_default(self) -> str:
        return os.environ.get("BACKENDAI_AGENT_HOST", "127.0.0.1")

    backend = Unicode(
        help="Container backend that runs the kernels, by its name in the entry-point group "
        "backendai_jupyter.backends: 'docker' (built in) runs them on this host's Docker engine "
        "(env BACKENDAI_AGENT_BACKEND)."
    ).tag(config=True)

    @default("backend")
    def _backend_default(self) -> str:
        return os.environ.get("BACKENDAI_AGENT_BACKEND", "docker")

    bind_host = Unicode(
        help="Host address kernel ports are published on (docker backend); the advertised host when empty."
    ).tag(config=True)

    port_range = Unicode("30000-30999", help="Host ports for kernels, as LOW-HIGH (docker backend).").tag(
        config=True
    )

    @validate("port_range")
    def _valid_port_range(self, proposal: Any) -> str:
        low, _, high = proposal["value"].partition("-")
        if not (low.isdigit() and high.isdigit() and 1024 <= int(low) <= int(high) <= 65535):
            raise ValueError(f"port_range must be LOW-HIGH within 1024-65535, got {proposal['value']!r}")
        return str(proposal["value"])

    state_dir = Unicode(
        help="Where the agent keeps kernel connection files (env BACKENDAI_AGENT_STATE_DIR)."
    ).tag(config=True)

    @default("state_dir")
    def _state_dir_default(self) -> str:
        if os.environ.get("BACKENDAI_AGENT_STATE_DIR"):
            return os.environ["BACKENDAI_AGENT_STATE_DIR"]
        from jupyter_core.paths import jupyter_data_dir

        return str(Path(jupyter_data_dir()) / "backendai" / "agent")

    cpu = Unicode("", help="CPU cores to offer; all of the host's when empty.").tag(config=True)
    mem = Unicode("", help="Memory to offer (e.g. '8g'); the host's total when empty.").tag(config=True)
    kernel_user = Unicode(
        "1000:1000", help="Numeric uid:gid kernels run as (it owns their home tmpfs); never root."
    ).tag(config=True)

    @validate("kernel_user")
    def _not_root(self, proposal: Any) -> str:
        uid, _, gid = proposal["value"].partition(":")
        if uid in ("0", "root", ""):
            raise ValueError("kernels must not run as root")
        if not (uid.isdigit() and (gid or uid).isdigit()):
            raise ValueError(
                f"kernel_user must be a numeric uid:gid such as 1000:1000, got {proposal['value']!r}"
            )
        return str(proposal["value"])

    pids_limit = Int(1024, help="Most processes a kernel container may have.").tag(config=True)

    @validate("pids_limit")
    def _positive_pids(self, proposal: Any) -> int:
        if proposal["value"] <= 0:
            raise ValueError("pids_limit must be positive: Docker reads 0 as no limit (a fork bomb away)")
        return int(proposal["value"])

    kernel_home = Unicode(
        "/home/work",
        help="Home directory of the kernel user in the images. It is a private tmpfs (the root "
        "filesystem is read-only), and HOME, IPYTHONDIR, MPLCONFIGDIR and XDG_* point into it.",
    ).tag(config=True)
    volume_paths = Dict(
        {},
        help="Storage volumes this agent mounts vfolders from: volume name → its path on this host, "
        "where it differs from the gateway's (Gateway.storage_volumes). Empty: every volume is at the "
        "gateway's path here too. When set, only the volumes named here are mounted.",
    ).tag(config=True)
    kernel_home_size = Unicode("1g", help="Size limit of a kernel's home tmpfs (counts as its memory).").tag(
        config=True
    )
    kernel_tmp_size = Unicode("512m", help="Size limit of a kernel's /tmp tmpfs (counts as its memory).").tag(
        config=True
    )
    kernel_log_max_size = Unicode("10m", help="Size at which a kernel's container log is rotated.").tag(
        config=True
    )
    kernel_log_max_files = Int(3, help="Rotated container log files kept per kernel.").tag(config=True)
    kernel_network = Unicode(
        help="Docker bridge network for kernels, created with inter-container traffic off so kernels "
        "cannot reach each other (env BACKENDAI_KERNEL_NETWORK)."
    ).tag(config=True)

    @default("kernel_network")
    def _kernel_network_default(self) -> str:
        return os.environ.get("BACKENDAI_KERNEL_NETWORK", "backendai-kernels")

    kernel_bridge = Unicode(
        help="Host interface name of that network's bridge (15 characters at most); the firewall "
        "rules match on it (env BACKENDAI_KERNEL_BRIDGE)."
    ).tag(config=True)

    @default("kernel_bridge")
    def _kernel_bridge_default(self) -> str:
        return os.environ.get("BACKENDAI_KERNEL_BRIDGE", "bai-kernels0")

    @validate("kernel_bridge")
    def _valid_bridge(self, proposal: Any) -> str:
        name = proposal["value"]
        if not (0 < len(name) <= 15) or not all(c.isalnum() or c in "-_." for c in name):
            raise ValueError(f"kernel_bridge must be an interface name of 1-15 characters, got {name!r}")
        return str(name)

    kernel_egress = Bool(
        help="Whether kernels may open connections beyond this host (the internet, other hosts). "
        "They never reach this host's own services nor 169.254.0.0/16 (env BACKENDAI_KERNEL_EGRESS: "
        "allow or deny)."
    ).tag(config=True)

    @default("kernel_egress")
    def _kernel_egress_default(self) -> bool:
        return os.environ.get("BACKENDAI_KERNEL_EGRESS", "allow").lower() not in ("deny", "0", "false", "no")

    allow_unencrypted_kernels = Bool(
        False,
        help='Start kernels whose image declares no CurveZMQ support ("encryption": false in its kernel '
        "label). Their channels are plaintext: anyone who reaches their ports can read and drive them.",
    ).tag(config=True)
    accelerators = List(
        Unicode(),
        ["cuda"],
        help="Accelerator plugins to load (entry points in backendai_jupyter.accelerators): 'cuda' is "
        "NVIDIA through NVML (no GPU or driver: no devices); 'mock' declares devices for hosts without GPUs.",
    ).tag(config=True)
    accelerator_config = Dict(
        {}, help="Per-plugin settings, e.g. {'mock': {'devices': 4, 'sharing': True}}."
    ).tag(config=True)
    mock_devices = Int(
        0, help="Shortcut: load the mock plugin with this many declared GPUs instead of 'cuda'."
    ).tag(config=True)
    ready_timeout = Float(60.0, help="Seconds a new kernel has to answer before it is an error.").tag(
        config=True
    )
    destroy_kernels_on_exit = Bool(
        False, help="Remove all kernels when the agent stops (otherwise a restarted agent re-adopts them)."
    ).tag(config=True)

    def capacity(self) -> ResourceSlot:
        """CPU and memory offered, plus what the accelerator plugins add."""
        slots = ResourceSlot.parse(
            {"cpu": self.cpu or str(os.cpu_count() or 1), "mem": self.mem or _host_memory()}
        )
        for plugin in self.plugins:
            slots.update(plugin.slots(self.devices))
        return slots

    def _load_plugins(self) -> list[AcceleratorPlugin]:
        names = list(self.accelerators)
        config = {k: dict(v) for k, v in self.accelerator_config.items()}
        if self.mock_devices:
            names = ["mock"]
            config.setdefault("mock", {}).setdefault("devices", self.mock_devices)
        for name in names:
            config.setdefault(name, {}).setdefault("agent_id", self.agent_id)
        plugins = load_plugins(names, config)
        keys = [p.key for p in plugins]
        if len(set(keys)) != len(keys):
            raise ValueError(f"two accelerator plugins provide the same slots ({', '.join(names)}); load one")
        return plugins

    # -- running -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect to the container engine, re-adopt kernels, then keep a link to the gateway."""
        # A CA file that cannot be read is a configuration error: say so before anything starts.
        https = any(url.startswith("https:") for url in self.gateway_urls)
        self._ssl: ssl.SSLContext | None = client_context(self.ca_file, self._ca_setting) if https else None
        self.container_backend: ContainerBackend = load_backend(self.backend, self)
        Path(self.state_dir).mkdir(parents=True, exist_ok=True, mode=0o700)  # noqa: ASYNC240 (startup)
        self._key = self._load_or_create_key()
        self.plugins = self._load_plugins()
        self.devices: list[Device] = []
        for plugin in self.plugins:
            found = await plugin.discover()
            self.devices += found
            note = f"; {plugin.sharing_note}" if plugin.sharing_note else ""
            log.info("%s: %d device(s)%s", type(plugin).__name__, len(found), note)
        policy = KernelPolicy(
            kernel_user=self.kernel_user,
            home=self.kernel_home,
            home_size=self.kernel_home_size,
            tmp_size=self.kernel_tmp_size,
            pids_limit=self.pids_limit,
            log_max_size=self.kernel_log_max_size,
            log_max_files=self.kernel_log_max_files,
        )
        self.runner = KernelRunner(
            self.container_backend,
            policy,
            Path(self.state_dir),
            self.ready_timeout,
            self._report,
            {p.key: p for p in self.plugins},
            self.devices,
            allow_unencrypted=self.allow_unencrypted_kernels,
            volume_paths=dict(self.volume_paths),
        )
        await self.runner.start()
        self._ws: websocket.WebSocketClientConnection | None = None
        self._registered = asyncio.Event()
        self._link_task = asyncio.ensure_future(self._keep_linked())

    def _load_or_create_key(self) -> str:
        """This agent's own key: made once, kept in the state directory, readable by no one else."""
        path = Path(self.state_dir) / "agent-key"
        if path.exists():
            return path.read_text().strip()
        key = secrets.token_urlsafe(32)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(key)
        return key

    async def wait_registered(self, timeout: float = 30.0) -> None:
        await asyncio.wait_for(self._registered.wait(), timeout)

    async def stop(self) -> None:
        self._link_task.cancel()
        if self.destroy_kernels_on_exit:
            await self.runner.destroy_all()
        if self._ws is not None:
            self._ws.close()
        self.container_backend.close()

    def _report(self, report: KernelReport) -> None:
        # While the link is down reports are dropped: registration resends every kernel's state.
        self._send({"type": "kernel", "report": report.to_json()})

    def _send(self, msg: dict[str, Any]) -> None:
        if self._ws is not None and self._registered.is_set():
            try:
                self._ws.write_message(json.dumps(msg))
            except websocket.WebSocketClosedError:
                pass

    _ca_setting = f"--Agent.ca_file (or {ENV_CA_FILE})"

    async def _keep_linked(self) -> None:
        urls = list(self.gateway_urls)
        tries, delay = urls, FIRST_RETRY
        # Whatever goes wrong on one connection, the agent keeps trying: a loop that ends leaves
        # its kernels running with nobody to order them about.
        while True:
            url = ""
            try:
                found = await first_to_answer(tries, self._connect, websocket.WebSocketClientConnection.close)
                if found is not None:
                    url, self._ws = found
                    await self._serve(self._ws, url)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("the link to the gateway at %s failed; reconnecting", url)
            lost = self._registered.is_set()
            self._registered.clear()
            if self._ws is not None:
                self._ws.close()
            self._ws = None
            if lost:
                # Any other gateway can take this agent: try them at once, before any pause.
                tries, delay = others(urls, url), FIRST_RETRY
                if tries:
                    continue
            await asyncio.sleep(delay)
            tries, delay = urls, min(delay * 2, AGENT_RECONNECT_MAX)

    async def _connect(self, url: str) -> websocket.WebSocketClientConnection:
        """A websocket to the gateway at ``url``; a failure is logged here, then raised."""
        headers = {AGENT_ID_HEADER: self.agent_id, AGENT_KEY_HEADER: self._key}
        if self.agent_token:
            headers[JOIN_TOKEN_HEADER] = self.agent_token
        req = httpclient.HTTPRequest(
            url.replace("http", "ws", 1) + AGENT_WS_PATH,
            headers=headers,
            connect_timeout=10,
            ssl_options=self._ssl if url.startswith("https:") else None,
        )
        try:
            ws = await websocket.websocket_connect(req, ping_interval=20)
        except httpclient.HTTPClientError as e:
            reason = _error_title(e)
            if e.code in (401, 409):
                log.error("the gateway at %s refused this agent: %s", url, reason)
            else:
                log.warning("gateway at %s: %s", url, reason)
            raise
        except ssl.SSLCertVerificationError as e:
            # Retried all the same: the gateway may be mid-way through a certificate change.
            log.error("%s", untrusted(url, self.ca_file, self._ca_setting, e).title)
            raise
        except OSError as e:
            log.warning("cannot reach the gateway at %s (%s); retrying", url, e)
            raise
        except Exception:
            log.exception("connecting to the gateway at %s failed; retrying", url)
            raise
        ws.stream.set_nodelay(True)
        return ws

    async def _serve(self, ws: websocket.WebSocketClientConnection, url: str) -> None:
        reg = AgentRegistration(
            agent_id=self.agent_id,
            address=self.advertised_host,
            capacity=self.capacity(),
            images=await self.runner.refresh_images(),
            kernels=self.runner.snapshot(),
            devices=self.devices,
        )
        await ws.write_message(json.dumps({"type": "register", "agent": reg.to_json()}))
        heartbeat: asyncio.Task[None] | None = None
        try:
            while True:
                raw = await ws.read_message()
                if raw is None:
                    log.warning("lost the link to the gateway at %s; reconnecting", url)
                    return
                msg = json.loads(raw)
                if msg.get("type") == "registered":
                    self._registered.set()
                    interval = float(msg.get("heartbeat_interval", 5.0))
                    heartbeat = asyncio.ensure_future(self._heartbeat(ws, interval))
                    log.info("registered with the gateway at %s as %s", url, self.agent_id)
                elif msg.get("type") == "call":
                    asyncio.ensure_future(self._answer(ws, msg))
        finally:
            if heartbeat:
                heartbeat.cancel()

    async def _heartbeat(self, ws: websocket.WebSocketClientConnection, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            stats = []
            for plugin in self.plugins:
                stats += [asdict(s) for s in await plugin.stats()]
            try:
                await ws.write_message(json.dumps({"type": "heartbeat", "device_stats": stats}))
            except websocket.WebSocketClosedError:
                return

    async def _answer(self, ws: websocket.WebSocketClientConnection, msg: dict[str, Any]) -> None:
        method, params = msg.get("method"), msg.get("params") or {}
        reply: dict[str, Any] = {"type": "reply", "id": msg.get("id")}
        try:
            # An unknown order is refused by name (UnknownOrder is an ApiError); one whose
            # parameters do not parse is an internal error.
            order = order_from_call(method, params)
            match order:
                case RestartKernel():  # before CreateKernel, which it extends
                    reply["result"] = await self.runner.restart(order)
                case CreateKernel():
                    reply["result"] = await self.runner.create(order)
                case DestroyKernel():
                    reply["result"] = await self.runner.destroy(order.session_id)
                case SignalKernel():
                    reply["result"] = await self.runner.signal(order.session_id, order.signal)
        except BackendError as e:
            reply["error"] = {"type": "agent-error", "title": str(e), "status": 502}
        except ApiError as e:
            reply["error"] = e.to_json()
        except Exception:  # report, don't die: the gateway waits for this reply
            # The details (paths, engine internals) go to the operator's log, not to users.
            log.exception("%s failed", method)
            reply["error"] = {
                "type": "agent-error",
                "title": f"agent {self.agent_id} could not {str(method).replace('_', ' ')}: an internal "
                "error (the agent's log has the details)",
                "status": 500,
            }
        try:
            await ws.write_message(json.dumps(reply))
        except websocket.WebSocketClosedError:
            pass
