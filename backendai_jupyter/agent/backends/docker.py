"""The Docker backend, through the Docker SDK; every SDK call runs in a thread, never on the loop."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, TypeVar

import docker
import docker.errors
from docker.types import LogConfig

from ...common.imagespecs import LOGO_LABEL
from ...common.slots import ResourceSlot
from ...common.wire import ImageInfo
from .base import (
    CONNECTION_FILE_IN_CONTAINER,
    CONTAINER_PORTS,
    KERNEL_LABEL,
    LABEL_AGENT,
    LABEL_OWNER,
    LABEL_PORTS,
    LABEL_RESOURCES,
    LABEL_SESSION,
    BackendError,
    ContainerBackend,
    ExitCallback,
    KernelLaunch,
    ReconnectCallback,
    Recovered,
)
from .kernel_network import KernelFirewall, ensure_network

log = logging.getLogger(__name__)
T = TypeVar("T")


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
class ContainerPolicy:
    """How every kernel container is confined, beyond what each order asks for."""

    kernel_user: str  # numeric uid:gid
    home: str  # the image user's home: a private tmpfs, the only writable place besides /tmp
    home_size: str
    tmp_size: str
    pids_limit: int
    log_max_size: str
    log_max_files: int
    network: str
    bridge: str
    egress: bool


class DockerBackend(ContainerBackend):
    """Kernels as Docker containers: unprivileged, read-only, resource-limited, fenced off, labelled."""

    def __init__(self, agent_id: str, bind_host: str, policy: ContainerPolicy) -> None:
        self.agent_id = agent_id
        self.bind_host = bind_host
        self.policy = policy
        uid, _, gid = policy.kernel_user.partition(":")
        if not (uid.isdigit() and (gid or uid).isdigit()):
            raise BackendError(
                f"kernel_user must be a numeric uid:gid (got {policy.kernel_user!r}): the kernel's "
                "home is a tmpfs that must belong to that uid"
            )
        self._uid, self._gid = int(uid), int(gid or uid)
        self.client = connect_docker()
        self._events: Any = None
        self._closing = threading.Event()
        self._watcher: threading.Thread | None = None

    async def _run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await asyncio.to_thread(fn, *args, **kwargs)

    async def prepare(self) -> None:
        """Create the kernel network and install its firewall rules (see kernel_network)."""
        await self._run(ensure_network, self.client, self.policy.network, self.policy.bridge)
        await self._run(KernelFirewall(self.policy.bridge, egress=self.policy.egress).apply)

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

    async def create(self, launch: KernelLaunch) -> str:
        cpu = launch.resources.get("cpu", Decimal(0))
        mem = int(launch.resources.get("mem", Decimal(0)))
        # Docker reads 0 as "unlimited": a kernel without both limits could take the whole host.
        if cpu <= 0 or mem <= 0:
            raise BackendError(
                f"the order for session {launch.session_id} asks for cpu={cpu} and mem={mem}: every "
                "kernel needs a positive CPU and memory limit (set them in the request or the "
                "user's resource policy)"
            )
        pol = self.policy
        ports = {
            f"{CONTAINER_PORTS[ch]}/tcp": (self.bind_host, port) for ch, port in launch.host_ports.items()
        }
        image = await self._run(self.client.images.get, launch.image)
        needs_init = not (image.attrs.get("Config") or {}).get("Entrypoint")
        kwargs: dict[str, Any] = dict(
            image=launch.image,
            command=self._command(launch.argv),
            name=f"bai-kernel-{launch.session_id}",
            labels={
                LABEL_SESSION: launch.session_id,
                LABEL_AGENT: self.agent_id,
                LABEL_OWNER: launch.owner,
                LABEL_PORTS: json.dumps(launch.host_ports),
                LABEL_RESOURCES: json.dumps(launch.resources.to_json()),
            },
            environment={**launch.env, **self._home_env()},
            ports=ports,
            volumes={
                launch.connection_file: {"bind": CONNECTION_FILE_IN_CONTAINER, "mode": "ro"},
                **launch.volumes,
            },
            device_requests=launch.device_requests or None,
            user=f"{self._uid}:{self._gid}",
            cap_drop=["ALL"],
            security_opt=["no-new-privileges"],
            # The image is shared by every kernel started from it: nothing a user runs may change
            # it. What a kernel writes goes to its home and /tmp, both size-limited tmpfs. Docker
            # mounts a tmpfs noexec unless told otherwise; /tmp says `exec`, since kernels of
            # compiled languages build their programs there and run them.
            read_only=True,
            tmpfs={
                pol.home: f"size={pol.home_size},uid={self._uid},gid={self._gid},mode=0700,nosuid,nodev",
                "/tmp": f"size={pol.tmp_size},mode=1777,nosuid,nodev,exec",
            },
            log_config=LogConfig(
                type=LogConfig.types.JSON,
                config={"max-size": pol.log_max_size, "max-file": str(pol.log_max_files)},
            ),
            network=pol.network,
            pids_limit=pol.pids_limit,
            nano_cpus=int(cpu * 10**9),
            mem_limit=mem,
            memswap_limit=mem,
            init=needs_init,
            detach=True,
        )
        if launch.working_dir:
            kwargs["working_dir"] = launch.working_dir

        def create_and_start() -> str:
            try:
                container = self.client.containers.create(**kwargs)
            except docker.errors.ImageNotFound:
                raise BackendError(f"image {launch.image} is not on this agent") from None
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
            return await asyncio.shield(work)
        except asyncio.CancelledError:
            try:
                await self.destroy(await work)
            except BackendError:
                pass
            raise

    def _command(self, argv: list[str]) -> list[str]:
        """The kernel's argv, run on a private, writable copy of its connection file.

        ipykernel (7.4) rewrites its connection file at start whenever it serves CurveZMQ (it
        compares its keys as bytes with the file's strings), and the mounted file is read-only
        (the kernel must not write to the agent's disk). So a shell copies it into the home
        tmpfs (mode 0600, as jupyter_core's secure_write insists) and then becomes the kernel.
        """
        private = f"{self.policy.home}/.backendai-connection.json"
        argv = [a.replace(CONNECTION_FILE_IN_CONTAINER, private) for a in argv]
        script = 'umask 077 && cat "$0" > "$1" && shift && exec "$@"'
        return ["/bin/sh", "-c", script, CONNECTION_FILE_IN_CONTAINER, private, *argv]

    def _home_env(self) -> dict[str, str]:
        """Point every per-user config and cache (IPython, matplotlib, XDG) into the writable home."""
        home = self.policy.home
        return {
            "HOME": home,
            "IPYTHONDIR": f"{home}/.ipython",
            "MPLCONFIGDIR": f"{home}/.config/matplotlib",
            "XDG_CONFIG_HOME": f"{home}/.config",
            "XDG_CACHE_HOME": f"{home}/.cache",
            "XDG_DATA_HOME": f"{home}/.local/share",
        }

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

    async def recover(self) -> list[Recovered]:
        containers = await self._run(
            self.client.containers.list, all=True, filters={"label": f"{LABEL_AGENT}={self.agent_id}"}
        )
        out = []
        for c in containers:
            labels = c.labels
            try:
                ports = {k: int(v) for k, v in json.loads(labels.get(LABEL_PORTS, "{}")).items()}
                resources = ResourceSlot.parse(json.loads(labels.get(LABEL_RESOURCES, "{}")))
            except ValueError:
                ports, resources = {}, ResourceSlot()
            out.append(Recovered(labels[LABEL_SESSION], c.id, c.status == "running", ports, resources))
        return out

    async def logs_tail(self, container_id: str, lines: int = 20) -> str:
        try:
            raw = await self._run(self.client.api.logs, container_id, tail=lines)
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
