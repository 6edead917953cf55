"""The Docker backend, through the Docker SDK; every SDK call runs in a thread, never on the loop.

With its network (:mod:`.kernel_network`) this is the one place that knows Docker: it turns a
:class:`~backendai_jupyter.agent.launch.LaunchSpec` into the arguments of ``containers.create``,
publishes the kernel's ports on host ports of its own (:class:`.ports.PortPool`), and keeps them
in a label, so a restarted agent finds where its kernels are reachable.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import docker
import docker.errors
from docker.types import DeviceRequest, LogConfig

from ...common.imagespecs import KERNEL_LABEL, LOGO_LABEL
from ...common.wire import ImageInfo
from ..launch import (
    CONNECTION_FILE_IN_CONTAINER,
    CONTAINER_PORTS,
    LABEL_AGENT,
    LABEL_SESSION,
    Endpoint,
    LaunchSpec,
    Tmpfs,
)
from .base import (
    BackendError,
    ContainerBackend,
    ExitCallback,
    KernelContainer,
    ReconnectCallback,
)
from .kernel_network import KernelFirewall, ensure_network
from .ports import PortPool, PortsExhausted

if TYPE_CHECKING:
    from ..app import Agent

log = logging.getLogger(__name__)
T = TypeVar("T")

# The host ports a kernel's container ports are published on, as JSON {channel: port}.
LABEL_PORTS = "io.backendai-jupyter.ports"


def connect_docker() -> docker.DockerClient:
    """A Docker client, or an error that says how to get an engine running."""
    try:
        client = docker.from_env()
        client.ping()
    except docker.errors.DockerException as e:
        raise BackendError(
            f"Docker engine not reachable ({e}) — start it (`sudo systemctl start docker`, "
            "or `bash scripts/ensure-docker.sh` as root) and try again"
        ) from None
    return client


@dataclass
class DockerSettings:
    """Where kernels' ports are published and which network fences them in (the Agent's options)."""

    agent_id: str
    advertised_host: str  # where clients reach the published ports
    bind_host: str  # the host address they are published on
    port_range: tuple[int, int]
    network: str
    bridge: str
    egress: bool


class DockerBackend(ContainerBackend):
    """Kernels as Docker containers: unprivileged, read-only, resource-limited, fenced off, labelled."""

    def __init__(self, settings: DockerSettings, client: docker.DockerClient | None = None) -> None:
        self.settings = settings
        self.agent_id = settings.agent_id
        self.ports = PortPool(*settings.port_range, settings.bind_host)
        self.client = client if client is not None else connect_docker()
        self._events: Any = None
        self._closing = threading.Event()
        self._watcher: threading.Thread | None = None

    @classmethod
    def from_agent(cls, agent: Agent) -> DockerBackend:
        """The backend from the agent's port range, addresses and kernel network options."""
        low, high = (int(p) for p in agent.port_range.split("-"))
        settings = DockerSettings(
            agent_id=agent.agent_id,
            advertised_host=agent.advertised_host,
            bind_host=agent.bind_host or agent.advertised_host,
            port_range=(low, high),
            network=agent.kernel_network,
            bridge=agent.kernel_bridge,
            egress=agent.kernel_egress,
        )
        return cls(settings)

    async def _run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await asyncio.to_thread(fn, *args, **kwargs)

    async def prepare(self) -> None:
        """Create the kernel network and install its firewall rules (see kernel_network)."""
        s = self.settings
        await self._run(ensure_network, self.client, s.network, s.bridge)
        await self._run(KernelFirewall(s.bridge, egress=s.egress).apply)

    async def list_images(self) -> list[ImageInfo]:
        images = await self._run(self.client.images.list, filters={"label": KERNEL_LABEL})
        out = []
        for img in images:
            try:
                kernel = json.loads(img.labels.get(KERNEL_LABEL, "{}"))
            except ValueError:
                log.warning("image %s has an unreadable %s label; skipped", img.id, KERNEL_LABEL)
                continue
            if img.tags:
                logo = img.labels.get(LOGO_LABEL, "")
                out.append(ImageInfo(id=img.id, tags=list(img.tags), kernel=kernel, logo=logo))
        return out

    async def allocate(self, session_id: str, wanted: dict[str, int] | None = None) -> Endpoint:
        """Host ports for the kernel's channels: ``wanted`` when all are free, else new ones."""
        if wanted and set(wanted) == set(CONTAINER_PORTS) and self.ports.take_exactly(list(wanted.values())):
            return Endpoint(self.settings.advertised_host, {ch: wanted[ch] for ch in CONTAINER_PORTS})
        try:
            ports = self.ports.take(len(CONTAINER_PORTS))
        except PortsExhausted as e:
            raise BackendError(f"{e} (Agent.port_range)") from None
        return Endpoint(self.settings.advertised_host, dict(zip(CONTAINER_PORTS, ports, strict=True)))

    async def release(self, endpoint: Endpoint) -> None:
        self.ports.give_back(list(endpoint.ports.values()))

    async def adopt(self, kernel: KernelContainer) -> None:
        self.ports.claim(list(kernel.endpoint.ports.values()))

    async def create(self, spec: LaunchSpec, endpoint: Endpoint) -> KernelContainer:
        # Docker reads 0 as "unlimited": a kernel without both limits could take the whole host.
        if spec.cpu <= 0 or spec.mem <= 0:
            raise BackendError(
                f"the order for session {spec.session_id} asks for cpu={spec.cpu} and mem={spec.mem}: "
                "every kernel needs a positive CPU and memory limit (set them in the request or the "
                "user's resource policy)"
            )
        try:
            image = await self._run(self.client.images.get, spec.image)
        except docker.errors.ImageNotFound:
            raise BackendError(f"image {spec.image} is not on this agent") from None
        # An image without an entrypoint (an init of its own) gets Docker's, so signals reach the kernel.
        needs_init = not (image.attrs.get("Config") or {}).get("Entrypoint")
        kwargs = self.create_args(spec, endpoint, init=needs_init)

        def create_and_start() -> str:
            try:
                container = self.client.containers.create(**kwargs)
            except docker.errors.ImageNotFound:
                raise BackendError(f"image {spec.image} is not on this agent") from None
            except docker.errors.APIError as e:
                raise BackendError(f"could not create the container: {e.explanation or e}") from None
            try:
                container.start()
            except docker.errors.APIError as e:
                container.remove(force=True)
                raise BackendError(f"could not start the container: {e.explanation or e}") from None
            return str(container.id)

        # A thread cannot be cancelled: if the launch is, wait for the container and remove it,
        # so a kernel ended while starting never leaves a container behind.
        work = asyncio.ensure_future(asyncio.to_thread(create_and_start))
        try:
            container_id = await asyncio.shield(work)
        except asyncio.CancelledError:
            try:
                await self.destroy(await work)
            except BackendError:
                pass
            raise
        return KernelContainer(container_id, spec.session_id, endpoint)

    def create_args(self, spec: LaunchSpec, endpoint: Endpoint, *, init: bool) -> dict[str, Any]:
        """The arguments of ``containers.create`` that run ``spec`` with its ports at ``endpoint``."""
        s, conf = self.settings, spec.confinement
        volumes = {spec.connection_file: {"bind": CONNECTION_FILE_IN_CONTAINER, "mode": "ro"}}
        for m in spec.all_mounts():
            volumes[m.source] = {"bind": m.target, "mode": "ro" if m.read_only else "rw"}
        device_requests = [
            DeviceRequest(driver=g.driver, device_ids=list(g.device_ids), capabilities=[list(g.capabilities)])
            for g in spec.devices
            if g.device_ids
        ]
        kwargs: dict[str, Any] = dict(
            image=spec.image,
            command=spec.command,
            name=f"bai-kernel-{spec.session_id}",
            labels={
                **spec.labels,
                LABEL_SESSION: spec.session_id,
                LABEL_AGENT: self.agent_id,
                LABEL_PORTS: json.dumps(endpoint.ports),
            },
            environment=spec.environment(),
            ports={f"{spec.ports[ch]}/tcp": (s.bind_host, port) for ch, port in endpoint.ports.items()},
            volumes=volumes,
            device_requests=device_requests or None,
            user=spec.user,
            cap_drop=list(conf.drop_capabilities),
            security_opt=["no-new-privileges"] if conf.no_new_privileges else [],
            read_only=conf.read_only_root,
            tmpfs={t.target: _tmpfs_options(t) for t in conf.tmpfs},
            log_config=LogConfig(
                type=LogConfig.types.JSON,
                config={"max-size": conf.log_max_size, "max-file": str(conf.log_max_files)},
            ),
            network=s.network,
            pids_limit=conf.pids_limit,
            nano_cpus=int(spec.cpu * 10**9),
            mem_limit=spec.mem,
            memswap_limit=spec.mem,
            init=init,
            detach=True,
        )
        nodes = [f"{n}:{n}:rwm" for g in spec.devices for n in g.device_nodes]
        if nodes:
            kwargs["devices"] = nodes
        if spec.working_dir:
            kwargs["working_dir"] = spec.working_dir
        return kwargs

    async def destroy(self, container_id: str) -> None:
        def _remove() -> None:
            try:
                self.client.api.remove_container(container_id, force=True)
            except docker.errors.NotFound:
                pass
            except docker.errors.APIError as e:
                if e.status_code != 409:  # 409: removal already in progress
                    raise

        await self._run(_remove)

    async def signal(self, container_id: str, signame: str) -> None:
        try:
            await self._run(self.client.api.kill, container_id, signal=signame)
        except docker.errors.APIError as e:
            raise BackendError(f"could not signal the kernel: {e.explanation or e}") from None

    async def list_kernels(self) -> list[KernelContainer]:
        containers = await self._run(
            self.client.containers.list, all=True, filters={"label": f"{LABEL_AGENT}={self.agent_id}"}
        )
        out = []
        for c in containers:
            labels = c.labels
            try:
                ports = {k: int(v) for k, v in json.loads(labels.get(LABEL_PORTS, "{}")).items()}
            except ValueError:
                ports = {}
            endpoint = Endpoint(self.settings.advertised_host, ports)
            out.append(KernelContainer(c.id, labels[LABEL_SESSION], endpoint, c.status == "running"))
        return out

    async def logs_tail(self, container_id: str, lines: int = 20) -> str:
        try:
            raw: bytes = await self._run(self.client.api.logs, container_id, tail=lines)
        except docker.errors.APIError:
            return ""
        return raw.decode(errors="replace").strip()

    async def exit_info(self, container_id: str) -> tuple[int, bool]:
        """(exit code, killed for lack of memory) of a stopped container."""
        try:
            info = await self._run(self.client.api.inspect_container, container_id)
        except docker.errors.NotFound:
            return -1, False
        state = info.get("State", {})
        return int(state.get("ExitCode", -1)), bool(state.get("OOMKilled"))

    def watch_exits(self, callback: ExitCallback, on_reconnect: ReconnectCallback | None = None) -> None:
        self._watcher = threading.Thread(
            target=self._pump, args=(callback, on_reconnect), name="docker-events", daemon=True
        )
        self._watcher.start()

    def _pump(self, callback: ExitCallback, on_reconnect: ReconnectCallback | None) -> None:
        """Follow die events for good: the stream ends when the engine restarts, so open it again."""
        filters = {"type": "container", "event": ["die"], "label": f"{LABEL_AGENT}={self.agent_id}"}
        delay, outage = 0.5, False
        while not self._closing.is_set():
            try:
                self._events = self.client.events(decode=True, filters=filters)
            except Exception as e:  # DockerException, or requests' ConnectionError while it is down
                if not outage:
                    log.warning("cannot follow Docker events (%s); retrying", e)
                outage = True
                self._closing.wait(delay)
                delay = min(delay * 2, 10.0)
                continue
            if outage:
                # Subscribed again: kernels that died while we were away get no event, so the
                # runner compares what it runs with the engine's containers now.
                log.info("following Docker events again; checking for kernels that ended meanwhile")
                if on_reconnect is not None:
                    on_reconnect()
            delay, outage = 0.5, False
            try:
                for ev in self._events:
                    attrs = ev.get("Actor", {}).get("Attributes", {})
                    sid = attrs.get(LABEL_SESSION)
                    if sid:
                        callback(sid, int(attrs.get("exitCode", -1)), ev.get("id", ""))
                why = "the engine closed it"
            except Exception as e:  # the stream raises when its connection drops
                why = str(e) or type(e).__name__
            if not self._closing.is_set():
                log.warning("the Docker event stream ended (%s); reconnecting", why)
                outage = True

    def close(self) -> None:
        self._closing.set()
        if self._events is not None:
            self._events.close()
        self.client.close()


def _tmpfs_options(t: Tmpfs) -> str:
    """Docker's mount options for a tmpfs (``size=1g,uid=1000,gid=1000,mode=0700,nosuid,nodev``)."""
    opts = [f"size={t.size}"]
    if t.uid is not None:
        opts.append(f"uid={t.uid}")
    if t.gid is not None:
        opts.append(f"gid={t.gid}")
    opts += [f"mode={t.mode:04o}", "nosuid", "nodev"]
    if t.exec:
        opts.append("exec")
    return ",".join(opts)
