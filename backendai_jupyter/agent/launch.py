"""What a container backend is asked to start: a kernel's launch spec, in our own terms.

The kernel runner (:mod:`backendai_jupyter.agent.kernels`) builds a :class:`LaunchSpec` for every
kernel; accelerator plugins contribute device grants (:class:`DeviceGrant`) to it. A backend
translates the spec into its runtime's terms (Docker's create arguments, a Kubernetes pod) and
answers with the :class:`Endpoint` where clients reach the kernel. Nothing here names a runtime:
no host ports, no Docker types.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal

# Inside its container a kernel listens on these fixed ports; where clients reach them is the
# backend's choice (Docker publishes each on a host port).
CONTAINER_PORTS = {"shell": 2001, "iopub": 2002, "stdin": 2003, "control": 2004, "hb": 2005}
# Where the kernel finds its connection file (read-only) inside the container.
CONNECTION_FILE_IN_CONTAINER = "/opt/backendai/connection.json"

# Labels on every kernel container, so a restarted agent finds its kernels again.
LABEL_SESSION = "io.backendai-jupyter.session"
LABEL_AGENT = "io.backendai-jupyter.agent"
LABEL_OWNER = "io.backendai-jupyter.owner"
LABEL_RESOURCES = "io.backendai-jupyter.resources"


@dataclass(frozen=True)
class Mount:
    """A directory or file of the agent's host, seen inside the container at ``target``."""

    source: str
    target: str
    read_only: bool = False


@dataclass(frozen=True)
class Tmpfs:
    """A size-limited, in-memory filesystem at ``target``; never setuid, never device files."""

    target: str
    size: str  # e.g. "1g"; counts towards the kernel's memory
    mode: int = 0o1777
    uid: int | None = None
    gid: int | None = None
    exec: bool = False  # runtimes mount a tmpfs noexec unless told otherwise


@dataclass
class DeviceGrant:
    """What one accelerator plugin gives a container so that it sees exactly its allocated devices.

    A backend passes ``device_ids`` to the runtime's ``driver`` (Docker: a device request), each of
    ``device_nodes`` as it is, and adds ``env`` and ``mounts`` to the container's own.
    """

    plugin: str  # the plugin's slot key, e.g. "cuda"
    driver: str = ""  # the runtime's device driver for them, e.g. "nvidia"; "" for none
    device_ids: list[str] = field(default_factory=list)  # as that driver names them (NVIDIA: UUIDs)
    capabilities: list[str] = field(default_factory=list)  # what the driver enables, e.g. ["gpu"]
    device_nodes: list[str] = field(default_factory=list)  # host device files passed through (/dev/...)
    env: dict[str, str] = field(default_factory=dict)
    mounts: list[Mount] = field(default_factory=list)


@dataclass(frozen=True)
class Confinement:
    """How a kernel is fenced in beyond its CPU and memory limits; the same for every kernel of an agent."""

    read_only_root: bool = True  # the image is shared by every kernel started from it
    tmpfs: tuple[Tmpfs, ...] = ()  # the only writable places when the root is read-only
    drop_capabilities: tuple[str, ...] = ("ALL",)
    no_new_privileges: bool = True
    pids_limit: int = 1024
    log_max_size: str = "10m"  # the kernel's output log rotates at this size ...
    log_max_files: int = 3  # ... and keeps this many files


@dataclass
class Endpoint:
    """Where clients reach a kernel: a host, and a port for each channel (``shell``, ``iopub``, ...)."""

    host: str
    ports: dict[str, int]


@dataclass
class LaunchSpec:
    """Everything a backend needs to start one kernel's container."""

    session_id: str
    image: str
    command: list[str]  # the whole command line; the image's entrypoint, if any, runs it
    env: dict[str, str]
    user: str  # numeric uid:gid, never root
    cpu: Decimal  # cores; a backend refuses 0, which runtimes read as "unlimited"
    mem: int  # bytes, swap included; likewise never 0
    connection_file: str  # on the agent's host; the kernel reads it at CONNECTION_FILE_IN_CONTAINER
    ports: dict[str, int] = field(default_factory=lambda: dict(CONTAINER_PORTS))  # inside the container
    mounts: list[Mount] = field(default_factory=list)
    devices: list[DeviceGrant] = field(default_factory=list)
    working_dir: str = ""  # in the container; "" for the image's own
    labels: dict[str, str] = field(default_factory=dict)  # kept with the container, for listings
    confinement: Confinement = field(default_factory=Confinement)

    def environment(self) -> dict[str, str]:
        """The container's environment: ``env`` with what the device grants add."""
        env = dict(self.env)
        for grant in self.devices:
            env.update(grant.env)
        return env

    def all_mounts(self) -> list[Mount]:
        """``mounts`` and the device grants' mounts, in that order."""
        return [*self.mounts, *(m for grant in self.devices for m in grant.mounts)]
