"""The Docker backend, through the Docker SDK; every SDK call runs in a thread, never on the loop."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Callable
from decimal import Decimal
from typing import Any, TypeVar

import docker
import docker.errors

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
    Recovered,
)

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


class DockerBackend(ContainerBackend):
    """Kernels as Docker containers: unprivileged, resource-limited, labelled for recovery."""

    def __init__(self, agent_id: str, bind_host: str, kernel_user: str, pids_limit: int) -> None:
        self.agent_id = agent_id
        self.bind_host = bind_host
        self.kernel_user = kernel_user
        self.pids_limit = pids_limit
        self.client = connect_docker()
        self._events: Any = None
        self._watcher: threading.Thread | None = None

    async def _run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await asyncio.to_thread(fn, *args, **kwargs)

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
                out.append(ImageInfo(id=img.id, tags=list(img.tags), kernel=kernel))
        return out

    async def create(self, launch: KernelLaunch) -> str:
        cpu = launch.resources.get("cpu", Decimal(0))
        mem = int(launch.resources.get("mem", Decimal(0)))
        ports = {
            f"{CONTAINER_PORTS[ch]}/tcp": (self.bind_host, port) for ch, port in launch.host_ports.items()
        }
        image = await self._run(self.client.images.get, launch.image)
        needs_init = not (image.attrs.get("Config") or {}).get("Entrypoint")
        kwargs: dict[str, Any] = dict(
            image=launch.image,
            command=launch.argv,
            name=f"bai-kernel-{launch.session_id}",
            labels={
                LABEL_SESSION: launch.session_id,
                LABEL_AGENT: self.agent_id,
                LABEL_OWNER: launch.owner,
                LABEL_PORTS: json.dumps(launch.host_ports),
                LABEL_RESOURCES: json.dumps(launch.resources.to_json()),
            },
            environment=launch.env,
            ports=ports,
            volumes={
                launch.connection_file: {"bind": CONNECTION_FILE_IN_CONTAINER, "mode": "ro"},
                **launch.volumes,
            },
            device_requests=launch.device_requests or None,
            user=self.kernel_user,
            cap_drop=["ALL"],
            security_opt=["no-new-privileges"],
            pids_limit=self.pids_limit,
            init=needs_init,
            detach=True,
        )
        if cpu > 0:
            kwargs["nano_cpus"] = int(cpu * 10**9)
        if mem > 0:
            kwargs["mem_limit"] = mem
            kwargs["memswap_limit"] = mem

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

    def watch_exits(self, callback: ExitCallback) -> None:
        self._events = self.client.events(
            decode=True,
            filters={"type": "container", "event": ["die"], "label": f"{LABEL_AGENT}={self.agent_id}"},
        )

        def _pump() -> None:
            try:
                for ev in self._events:
                    attrs = ev.get("Actor", {}).get("Attributes", {})
                    sid = attrs.get(LABEL_SESSION)
                    if sid:
                        callback(sid, int(attrs.get("exitCode", -1)), ev.get("id", ""))
            except Exception:  # the stream ends with an error when closed
                pass

        self._watcher = threading.Thread(target=_pump, name="docker-events", daemon=True)
        self._watcher.start()

    def close(self) -> None:
        if self._events is not None:
            self._events.close()
        self.client.close()
