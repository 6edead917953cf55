"""The backend interface. The agent owns a kernel's lifecycle; a backend fills in the hooks.

Lifecycle (driven by :class:`backendai_jupyter.agent.kernels.KernelRunner`): allocate ports and
write the connection file → :meth:`ContainerBackend.create` → readiness probe →
:meth:`ContainerBackend.destroy`; after an agent restart, :meth:`ContainerBackend.recover`
finds the kernels it left running. Adding a backend means one new module here.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ...common.slots import ResourceSlot
from ...common.wire import ImageInfo

# Inside the container a kernel listens on these fixed ports; the host side is allocated.
CONTAINER_PORTS = {"shell": 2001, "iopub": 2002, "stdin": 2003, "control": 2004, "hb": 2005}
CONNECTION_FILE_IN_CONTAINER = "/opt/backendai/connection.json"
KERNEL_LABEL = "io.backendai-jupyter.kernel"
LABEL_SESSION = "io.backendai-jupyter.session"
LABEL_AGENT = "io.backendai-jupyter.agent"
LABEL_OWNER = "io.backendai-jupyter.owner"
LABEL_PORTS = "io.backendai-jupyter.ports"
LABEL_RESOURCES = "io.backendai-jupyter.resources"


class BackendError(Exception):
    """The backend could not do what was asked; the message is for the user."""


@dataclass
class KernelLaunch:
    """Everything a backend needs to start one kernel container."""

    session_id: str
    image: str
    argv: list[str]
    resources: ResourceSlot
    env: dict[str, str]
    owner: str
    host_ports: dict[str, int]
    connection_file: str  # on the host, mounted read-only into the container
    device_requests: list[Any] = field(default_factory=list)  # from accelerator plugins
    volumes: dict[str, dict[str, str]] = field(default_factory=dict)
    working_dir: str = ""  # in the container; "" for the image's own


@dataclass
class Recovered:
    """A kernel container found running after an agent restart."""

    session_id: str
    container_id: str
    running: bool
    host_ports: dict[str, int] = field(default_factory=dict)
    resources: ResourceSlot = field(default_factory=ResourceSlot)


# Called from the backend's watcher thread: (session id, exit code, container id).
ExitCallback = Callable[[str, int, str], None]
# Called from the watcher thread after it lost the runtime's events and has them again.
ReconnectCallback = Callable[[], None]


class ContainerBackend(ABC):
    """One container runtime (Docker today)."""

    async def prepare(self) -> None:
        """Set up what every kernel needs (a network, firewall rules) before the first one starts."""
        return None  # a backend with nothing to set up keeps this

    @abstractmethod
    async def list_images(self) -> list[ImageInfo]:
        """Images that carry a kernel label, i.e. that kernels can start from."""

    @abstractmethod
    async def create(self, launch: KernelLaunch) -> str:
        """Create and start the container; return its id. Leaves nothing behind on failure."""

    @abstractmethod
    async def destroy(self, container_id: str) -> None:
        """Remove the container (killing it if it runs). Missing containers are fine."""

    @abstractmethod
    async def signal(self, container_id: str, signame: str) -> None:
        """Send a signal to the container's init, which forwards it to the kernel."""

    @abstractmethod
    async def recover(self) -> list[Recovered]:
        """This agent's kernel containers that exist right now."""

    @abstractmethod
    async def logs_tail(self, container_id: str, lines: int = 20) -> str:
        """The last lines the kernel printed, for error messages."""

    @abstractmethod
    async def exit_info(self, container_id: str) -> tuple[int, bool]:
        """(exit code, killed for lack of memory) of a container that stopped."""

    @abstractmethod
    def watch_exits(self, callback: ExitCallback, on_reconnect: ReconnectCallback | None = None) -> None:
        """Start calling ``callback`` whenever one of this agent's kernels exits, for as long as the
        backend lives; ``on_reconnect`` after events may have been missed (the runtime restarted)."""

    @abstractmethod
    def close(self) -> None:
        """Stop watching and release the runtime client."""
