"""A kernel's life on an agent: endpoint, connection file, container, readiness, and its end.

The runner decides everything about a kernel that does not depend on the container runtime (its
command, environment, mounts, devices, confinement) and hands it to the backend as a
:class:`~backendai_jupyter.agent.launch.LaunchSpec`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path, PurePosixPath
from typing import Any

import zmq

from ..common.kernelenv import is_denied
from ..common.states import SessionState
from ..common.wire import CreateKernel, Device, ImageInfo, KernelReport
from .accelerators.base import AcceleratorPlugin
from .backends.base import BackendError, ContainerBackend
from .launch import (
    CONNECTION_FILE_IN_CONTAINER,
    CONTAINER_PORTS,
    LABEL_OWNER,
    LABEL_RESOURCES,
    Confinement,
    DeviceGrant,
    Endpoint,
    LaunchSpec,
    Mount,
    Tmpfs,
)
from .probe import KernelNotReady, wait_until_ready

log = logging.getLogger(__name__)
Report = Callable[[KernelReport], None]


@dataclass
class KernelPolicy:
    """How every kernel of this agent is confined, beyond what each order asks for (Agent options)."""

    kernel_user: str  # numeric uid:gid
    home: str  # the image user's home: a private tmpfs, the only writable place besides /tmp
    home_size: str
    tmp_size: str
    pids_limit: int
    log_max_size: str
    log_max_files: int

    def confinement(self) -> Confinement:
        """Read-only image, home and /tmp as size-limited tmpfs, no privileges, limited processes."""
        uid, _, gid = self.kernel_user.partition(":")
        if not (uid.isdigit() and (gid or uid).isdigit()):
            raise BackendError(
                f"kernel_user must be a numeric uid:gid (got {self.kernel_user!r}): the kernel's "
                "home is a tmpfs that must belong to that uid"
            )
        # The image is shared by every kernel started from it: nothing a user runs may change it.
        # What a kernel writes goes to its home and /tmp. /tmp is `exec`, since kernels of compiled
        # languages build their programs there and run them.
        home = Tmpfs(self.home, self.home_size, mode=0o700, uid=int(uid), gid=int(gid or uid))
        tmp = Tmpfs("/tmp", self.tmp_size, mode=0o1777, exec=True)
        return Confinement(
            read_only_root=True,
            tmpfs=(home, tmp),
            pids_limit=self.pids_limit,
            log_max_size=self.log_max_size,
            log_max_files=self.log_max_files,
        )


@dataclass
class Kernel:
    """One kernel this agent runs."""

    order: CreateKernel
    endpoint: Endpoint | None = None  # held from the backend until the kernel is gone
    key: str = ""
    # CurveZMQ keypair the kernel's sockets serve with (Z85); empty for an unencrypted kernel.
    curve_public: str = ""
    curve_secret: str = ""
    container_id: str | None = None
    state: SessionState = SessionState.PREPARING
    connection: dict[str, Any] | None = None
    ending: bool = False  # the agent itself is removing it: its exit is expected
    destroyed: bool = False  # an order ended it: nothing may start a container for it again
    task: asyncio.Task[None] | None = None


class KernelRunner:
    """Starts, watches and ends the kernels of one agent."""

    def __init__(
        self,
        backend: ContainerBackend,
        policy: KernelPolicy,
        state_dir: Path,
        ready_timeout: float,
        report: Report,
        plugins: dict[str, AcceleratorPlugin] | None = None,
        devices: list[Device] | None = None,
        *,
        allow_unencrypted: bool = False,
        volume_paths: dict[str, str] | None = None,
    ) -> None:
        self.allow_unencrypted = allow_unencrypted
        self.volume_paths = dict(volume_paths or {})
        self.policy = policy
        self.confinement = policy.confinement()
        self.plugins = plugins or {}
        self.devices = devices or []
        self.backend = backend
        self.state_dir = state_dir
        self.ready_timeout = ready_timeout
        self.report = report
        self.kernels: dict[str, Kernel] = {}
        self._ended: collections.deque[str] = collections.deque(maxlen=10_000)
        self.images: dict[str, ImageInfo] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- setup -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Find images, re-adopt kernels left running, and watch for kernels that exit."""
        self._loop = asyncio.get_running_loop()
        if not zmq.has("curve") and not self.allow_unencrypted:
            raise BackendError(
                "this agent's pyzmq has no CurveZMQ, so kernel channels cannot be encrypted: install a "
                "pyzmq wheel (they bundle libsodium), or accept plaintext channels with "
                "--Agent.allow_unencrypted_kernels=True"
            )
        await self.backend.prepare()
        await self.refresh_images()
        await self._recover()
        self.backend.watch_exits(self._exit_from_thread, self._resync_from_thread)

    async def refresh_images(self) -> list[ImageInfo]:
        images = await self.backend.list_images()
        self.images = {t: i for i in images for t in i.tags}
        return images

    def _kernel_dir(self, sid: str) -> Path:
        return self.state_dir / "kernels" / sid

    async def _recover(self) -> None:
        for found in await self.backend.list_kernels():
            conn_file = self._kernel_dir(found.session_id) / "client.json"
            if found.running and conn_file.exists():
                connection = json.loads(conn_file.read_text())
                order = json.loads((self._kernel_dir(found.session_id) / "order.json").read_text())
                k = Kernel(
                    order=CreateKernel.from_json(order),
                    endpoint=found.endpoint,
                    key=connection["key"],
                    curve_public=connection.get("curve_publickey", ""),
                    curve_secret=connection.get("curve_secretkey", ""),
                    container_id=found.id,
                    state=SessionState.RUNNING,
                    connection=connection,
                )
                await self.backend.adopt(found)
                self.kernels[found.session_id] = k
                log.info("re-adopted kernel %s (container %s)", found.session_id, found.id[:12])
            else:
                await self.backend.destroy(found.id)
                shutil.rmtree(self._kernel_dir(found.session_id), ignore_errors=True)

    def snapshot(self) -> list[KernelReport]:
        """Every kernel with its state, for (re)registration."""
        return [
            KernelReport(sid, k.state, "", k.connection if k.state == SessionState.RUNNING else None)
            for sid, k in self.kernels.items()
        ]

    # -- orders from the gateway ---------------------------------------------------------------

    async def create(self, order: CreateKernel) -> dict[str, Any]:
        """Accept a kernel order; its progress is reported as it happens."""
        sid = order.session_id
        if sid in self.kernels:
            return {"accepted": True}
        if sid in self._ended:
            raise BackendError("the session was ended before its kernel started")
        # Claim the session before any await, so an order to end it that overtakes this one
        # finds it (orders run concurrently).
        k = Kernel(order)
        self.kernels[sid] = k
        if order.image not in self.images:
            await self.refresh_images()
            if order.image not in self.images:
                self.kernels.pop(sid, None)
                raise BackendError(f"image {order.image} is not on this agent")
        if k.ending:
            raise BackendError("the session was ended before its kernel started")
        k.task = asyncio.ensure_future(self._launch(k))
        return {"accepted": True}

    async def _launch(self, k: Kernel, *, restarted: bool = False) -> None:
        sid = k.order.session_id
        try:
            self._set(k, SessionState.PREPARING, "allocating ports and writing the connection file")
            if k.endpoint is None:
                k.key = _key(k.order.reuse)
                k.endpoint = await self.backend.allocate(sid, _wanted_ports(k.order.reuse))
            if not k.curve_public and self._encrypts(k.order.image):
                k.curve_public, k.curve_secret = _curve_keys(k.order.reuse)
            self._write_files(k)
            self._set(k, SessionState.CREATING, "starting the container")
            container = await self.backend.create(self._spec(k), k.endpoint)
            k.container_id, k.endpoint = container.id, container.endpoint
            connection = self._client_connection(k)
            # Written once the backend has said where the kernel is: a restarted agent re-adopts it.
            _write(self._kernel_dir(sid) / "client.json", connection, 0o600)
            took = await wait_until_ready(connection, self.ready_timeout)
            k.connection = connection
            reason = "restarted" if restarted else f"kernel ready after {took * 1000:.0f} ms of boot"
            self._set(k, SessionState.RUNNING, reason, connection=connection)
        except asyncio.CancelledError:
            raise
        except (BackendError, KernelNotReady, OSError) as e:
            detail = str(e)
            if k.container_id:
                tail = await self.backend.logs_tail(k.container_id)
                if tail:
                    detail += f"; the kernel printed: {tail[-1500:]}"
            await self._remove(k)
            self._set(k, SessionState.ERROR, detail)

    def _spec(self, k: Kernel) -> LaunchSpec:
        """What the backend starts for kernel ``k``."""
        order, sid = k.order, k.order.session_id
        argv = [
            a.replace("{connection_file}", CONNECTION_FILE_IN_CONTAINER)
            for a in self.images[order.image].kernel.get("argv", [])
        ]
        if not argv:
            raise BackendError(f"image {order.image} declares no kernel command")
        env = self._user_env(order)
        env["BACKENDAI_SESSION_ID"] = sid
        # Where NVIDIA is the runtime's default, and in CUDA images (NVIDIA_VISIBLE_DEVICES=all baked
        # in), a container without a GPU allocation would otherwise see every GPU. A grant's own
        # environment comes on top of this (LaunchSpec.environment).
        env["NVIDIA_VISIBLE_DEVICES"] = "void"
        env.update(self._home_env())
        return LaunchSpec(
            session_id=sid,
            image=order.image,
            command=self._command(argv),
            env=env,
            user=self.policy.kernel_user,
            cpu=order.resources.get("cpu", Decimal(0)),
            mem=int(order.resources.get("mem", Decimal(0))),
            connection_file=str(self._kernel_dir(sid) / "kernel.json"),
            ports=dict(CONTAINER_PORTS),
            mounts=self._mounts(order),
            devices=self._device_grants(order),
            working_dir=order.working_dir,
            labels={LABEL_OWNER: order.owner, LABEL_RESOURCES: json.dumps(order.resources.to_json())},
            confinement=self.confinement,
        )

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

    def _user_env(self, order: CreateKernel) -> dict[str, str]:
        """The order's environment without what only the agent may set (the gateway refuses it too)."""
        dropped = sorted(name for name in order.env if is_denied(name))
        if dropped:
            log.warning("session %s: dropped reserved variables %s", order.session_id, ", ".join(dropped))
        return {name: value for name, value in order.env.items() if not is_denied(name)}

    def _encrypts(self, image: str) -> bool:
        """Whether the image's kernel serves CurveZMQ; refuse a plaintext one unless allowed."""
        declared = self.images[image].kernel.get("encryption", True)
        if declared and zmq.has("curve"):
            return True
        if not self.allow_unencrypted:
            raise BackendError(
                f'image {image} declares no CurveZMQ support ("encryption": false in its kernel '
                "label): anyone who reaches its ports could read and drive it. Use an image whose "
                "kernel speaks CurveZMQ (ipykernel >= 7), or let this agent run plaintext kernels "
                "with --Agent.allow_unencrypted_kernels=True"
            )
        return False

    def _device_grants(self, order: CreateKernel) -> list[DeviceGrant]:
        """What the container needs to see exactly the devices the gateway allocated."""
        grants = []
        for key, allocation in order.devices.items():
            plugin = self.plugins.get(key)
            if plugin is None:
                raise BackendError(f"this agent has no {key} plugin for the allocated devices")
            try:
                grants.append(plugin.grant({d: Decimal(a) for d, a in allocation.items()}, self.devices))
            except ValueError as e:
                raise BackendError(f"bad device allocation: {e}") from None
        return grants

    def _mounts(self, order: CreateKernel) -> list[Mount]:
        """The order's vfolders as bind mounts: host directory → target in the kernel's home.

        The gateway names a volume and the vfolder's place in it; this agent finds the volume at
        its own path for it (``Agent.volume_paths``) or, when it maps none, where the gateway has
        it. Nothing outside a volume is ever bound, nor anywhere but under the kernel's home.
        """
        binds: list[Mount] = []
        for m in order.mounts:
            root = self.volume_paths.get(m.volume)
            if root is None:
                if self.volume_paths:
                    raise BackendError(
                        f"vfolder {m.name!r} is on volume {m.volume!r}, which this agent does not have "
                        "(Agent.volume_paths names the volumes it mounts)"
                    )
                root = m.volume_path
            parts = PurePosixPath(m.subpath).parts
            target = PurePosixPath(m.target)
            if (
                not parts
                or m.subpath.startswith("/")
                or any(p in ("..", ".") for p in parts)
                or m.mode not in ("ro", "rw")
                or not target.is_relative_to(self.policy.home)
                or target == PurePosixPath(self.policy.home)
                or ".." in target.parts
            ):
                raise BackendError(f"refusing a malformed mount of vfolder {m.name!r}: {m.to_json()}")
            host = Path(root, *parts)
            if not host.is_dir():
                raise BackendError(
                    f"vfolder {m.name!r} is not at {host} on this agent: is volume {m.volume!r} "
                    "mounted here at the same path as on the gateway (or mapped in Agent.volume_paths)?"
                )
            binds.append(Mount(str(host), str(target), read_only=m.mode == "ro"))
        return binds

    def _client_connection(self, k: Kernel) -> dict[str, Any]:
        """What the session's owner gets: where the kernel is, its HMAC key and its curve keys.

        jupyter_client (8.10) turns CurveZMQ on only when a connection carries both halves of the
        keypair, and its sockets then use that keypair as their own while trusting its public half
        as the server's (``ConnectionFileMixin._create_connected_socket``). So the owner needs the
        secret half too, exactly like the HMAC key: both are per-kernel credentials shown only to
        the session's owner. What curve buys is that nobody without them (another kernel, a host
        user, anyone on the path) can subscribe to the kernel's IOPub or read its traffic.
        """
        assert k.endpoint is not None
        conn: dict[str, Any] = {
            "ip": k.endpoint.host,
            "transport": "tcp",
            "signature_scheme": "hmac-sha256",
            "key": k.key,
            **{f"{ch}_port": port for ch, port in k.endpoint.ports.items()},
            "encryption": "curve" if k.curve_public else "none",
        }
        if k.curve_public:
            conn["curve_publickey"] = k.curve_public
            conn["curve_secretkey"] = k.curve_secret
        return conn

    def _write_files(self, k: Kernel) -> None:
        d = self._kernel_dir(k.order.session_id)
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        # The kernel sees its own ports and listens on all interfaces inside its container: the
        # published ports need that, other kernels cannot reach it (ICC off on the kernel network)
        # and whoever can has to speak CurveZMQ with its key.
        kernel_view: dict[str, Any] = {
            "ip": "0.0.0.0",
            "transport": "tcp",
            "signature_scheme": "hmac-sha256",
            "key": k.key,
            "kernel_name": "",
            **{f"{ch}_port": port for ch, port in CONTAINER_PORTS.items()},
        }
        if k.curve_public:
            kernel_view["curve_publickey"] = k.curve_public
            kernel_view["curve_secretkey"] = k.curve_secret
        # The kernel runs as an unprivileged user: the file must be readable inside; the
        # directory above it (0700) keeps other host users out.
        _write(d / "kernel.json", kernel_view, 0o644)
        _write(d / "order.json", {**k.order.to_json(), "env": {}}, 0o600)

    async def destroy(self, sid: str) -> dict[str, Any]:
        """Remove a kernel's container and free its ports; the kernel is TERMINATED."""
        k = self.kernels.get(sid)
        if k is None:
            self._ended.append(sid)  # an order to start it may still be on its way
            return {"removed": False}
        k.destroyed = True  # a restart in progress must not start a container after this
        await _stop_launch(k)
        await self._remove(k)
        self._set(k, SessionState.TERMINATED, "shut down")
        return {"removed": True}

    async def _remove(self, k: Kernel, *, keep_endpoint: bool = False) -> None:
        k.ending = True
        if k.container_id:
            await self.backend.destroy(k.container_id)
        if not keep_endpoint:
            endpoint, k.endpoint = k.endpoint, None
            if endpoint is not None:
                await self.backend.release(endpoint)
            shutil.rmtree(self._kernel_dir(k.order.session_id), ignore_errors=True)

    async def signal(self, sid: str, signame: str) -> dict[str, Any]:
        k = self.kernels.get(sid)
        if k is None or k.container_id is None:
            raise BackendError(f"no kernel {sid} on this agent")
        await self.backend.signal(k.container_id, signame)
        return {}

    async def restart(self, order: CreateKernel) -> dict[str, Any]:
        """A fresh container on the same ports and key: connected clients just reconnect."""
        k = self.kernels.get(order.session_id)
        if k is None:
            raise BackendError(f"no kernel {order.session_id} on this agent")
        await _stop_launch(k)
        await self._remove(k, keep_endpoint=True)
        # An order to end the kernel may have landed during those awaits: it removed the old
        # container and freed the ports, and starting a new one now would leave it orphaned.
        if k.destroyed:
            raise BackendError("the kernel was shut down during its restart")
        k.container_id = None
        k.ending = False
        k.order.env = order.env or k.order.env
        # The new launch is the kernel's task, so an end order arriving from here on cancels it
        # and the backend removes a container it was creating (see _stop_launch).
        k.task = asyncio.ensure_future(self._launch(k, restarted=True))
        try:
            await asyncio.shield(k.task)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise
            raise BackendError("the kernel was shut down during its restart") from None
        if k.state != SessionState.RUNNING:
            raise BackendError("the kernel did not come back after the restart")
        return {}

    async def destroy_all(self) -> None:
        await asyncio.gather(*(self.destroy(sid) for sid in list(self.kernels)))

    # -- kernels that end on their own ---------------------------------------------------------

    def _resync_from_thread(self) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._resync()))

    async def _resync(self) -> None:
        """After missed events: every kernel whose container no longer runs has ended."""
        try:
            running = {c.id for c in await self.backend.list_kernels() if c.running}
        except Exception as e:  # the engine went away again: the next reconnect checks again
            log.warning("could not list kernel containers after reconnecting to the engine: %s", e)
            return
        for sid, k in list(self.kernels.items()):
            if k.state == SessionState.RUNNING and k.container_id and k.container_id not in running:
                log.info("kernel %s ended while the runtime's events were not followed", sid)
                await self._exited(sid, -1, k.container_id)

    def _exit_from_thread(self, sid: str, exit_code: int, container_id: str) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(
            lambda: asyncio.ensure_future(self._exited(sid, exit_code, container_id))
        )

    async def _exited(self, sid: str, exit_code: int, container_id: str) -> None:
        k = self.kernels.get(sid)
        if k is None or k.ending or k.container_id != container_id:
            return
        await _stop_launch(k)
        exit_code, oom = await self.backend.exit_info(container_id)
        tail = await self.backend.logs_tail(container_id) if exit_code != 0 else ""
        await self._remove(k)
        if exit_code == 0:
            self._set(k, SessionState.TERMINATED, "the kernel exited", exit_code=0)
            return
        if oom:
            why = "the kernel ran out of memory and was killed"
        elif exit_code in (137, -1):
            why = f"the kernel's container was killed (exit code {exit_code})"
        else:
            why = f"the kernel exited with code {exit_code}"
        if tail:
            why += f"; it printed: {tail[-1000:]}"
        self._set(k, SessionState.ERROR, why, exit_code=exit_code)

    def _set(self, k: Kernel, state: SessionState, reason: str, **extra: Any) -> None:
        k.state = state
        if state.is_terminal:
            self.kernels.pop(k.order.session_id, None)
        self.report(KernelReport(k.order.session_id, state, reason, **extra))


def _key(reuse: dict[str, Any] | None) -> str:
    """A restart's or a launcher's HMAC key (clients keep theirs), else a new one."""
    return str(reuse["key"]) if reuse and reuse.get("key") else uuid.uuid4().hex


def _wanted_ports(reuse: dict[str, Any] | None) -> dict[str, int] | None:
    """The ports a client already holds, when it holds all of them."""
    if reuse and all(reuse.get(f"{ch}_port") for ch in CONTAINER_PORTS):
        return {ch: int(reuse[f"{ch}_port"]) for ch in CONTAINER_PORTS}
    return None


def _curve_keys(reuse: dict[str, Any] | None) -> tuple[str, str]:
    """A restart's keypair (clients keep theirs), else a new one for this kernel."""
    if reuse and reuse.get("curve_publickey") and reuse.get("curve_secretkey"):
        return str(reuse["curve_publickey"]), str(reuse["curve_secretkey"])
    public, secret = zmq.curve_keypair()
    return public.decode("ascii"), secret.decode("ascii")


def _write(path: Path, data: dict[str, Any], mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f)
    os.chmod(path, mode)


async def _stop_launch(k: Kernel) -> None:
    """Cancel a launch in progress and wait until it has cleaned up after itself."""
    if k.task is None or k.task.done():
        return
    k.task.cancel()
    # The launch removes a container it was creating when cancelled; wait for that, so the
    # caller's "removed" really means removed.
    with contextlib.suppress(asyncio.CancelledError):
        await k.task
