"""The container backend interface, and finding backends through entry points.

The agent owns a kernel's lifecycle (:class:`backendai_jupyter.agent.kernels.KernelRunner`); a
backend fills in the hooks, in this order: :meth:`ContainerBackend.allocate` where the kernel
will be reachable → :meth:`ContainerBackend.create` its container from a
:class:`~backendai_jupyter.agent.launch.LaunchSpec` → (the runner waits until the kernel answers)
→ :meth:`ContainerBackend.destroy` it → :meth:`ContainerBackend.release` the endpoint. After an
agent restart, :meth:`ContainerBackend.list_kernels` finds the kernels it left, and
:meth:`ContainerBackend.adopt` keeps those the runner takes back.

Backends are found by name in the entry-point group ``backendai_jupyter.backends``
(``Agent.backend`` picks one); adding one means one new module and its entry point.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import TYPE_CHECKING, Self

from ...common.wire import ImageInfo
from ..launch import Endpoint, LaunchSpec

if TYPE_CHECKING:
    from ..app import Agent

ENTRY_POINT_GROUP = "backendai_jupyter.backends"
# Found by name even where the package's entry points are not installed (a source checkout on
# the path, an editable install made before the backend existed).
BUILT_IN = {
    "docker": EntryPoint("docker", "backendai_jupyter.agent.backends.docker:DockerBackend", ENTRY_POINT_GROUP)
}


class BackendError(Exception):
    """The backend could not do what was asked; the message is for the user."""


@dataclass
class KernelContainer:
    """A kernel's container, as a backend created or found it."""

    id: str
    session_id: str
    endpoint: Endpoint
    running: bool = True


# Called from the backend's watcher thread: (session id, exit code, container id).
ExitCallback = Callable[[str, int, str], None]
# Called from the watcher thread after it lost the runtime's events and has them again.
ReconnectCallback = Callable[[], None]


class ContainerBackend(ABC):
    """One container runtime (Docker today). Every method is called by the agent's kernel runner."""

    @classmethod
    @abstractmethod
    def from_agent(cls, agent: Agent) -> Self:
        """The backend, configured from the agent's options; called once, as the agent starts.

        A backend with options of its own reads them from a ``Configurable`` of its own created
        with ``parent=agent``, so they live in the agent's config file like every other option.
        """

    async def prepare(self) -> None:
        """Set up what every kernel needs (a network, firewall rules); called once before the first."""
        return None  # a backend with nothing to set up keeps this

    @abstractmethod
    async def list_images(self) -> list[ImageInfo]:
        """Images that carry a kernel label, i.e. that kernels can start from; called at start and
        whenever an order names an image the runner does not know."""

    @abstractmethod
    async def allocate(self, session_id: str, wanted: dict[str, int] | None = None) -> Endpoint:
        """Reserve where a new kernel will be reachable, before its container is created.

        ``wanted`` are ports a client already holds (a restart's, a launcher's connection file):
        give exactly those where possible, else new ones. Held until :meth:`release`; a restart
        keeps the endpoint and creates the next container on it.
        """

    @abstractmethod
    async def release(self, endpoint: Endpoint) -> None:
        """Free an endpoint from :meth:`allocate` or :meth:`adopt`; called once its kernel is gone."""

    @abstractmethod
    async def create(self, spec: LaunchSpec, endpoint: Endpoint) -> KernelContainer:
        """Create and start the kernel's container, reachable at ``endpoint``; return it (with the
        endpoint as it turned out, for a backend that learns the host only now).

        Leaves nothing behind on failure (raise :class:`BackendError`), nor when cancelled.
        """

    @abstractmethod
    async def destroy(self, container_id: str) -> None:
        """Remove the container (killing it if it runs); its endpoint stays held. Missing is fine."""

    @abstractmethod
    async def signal(self, container_id: str, signame: str) -> None:
        """Send a signal (``SIGINT``, ...) to the container's init, which forwards it to the kernel."""

    @abstractmethod
    async def list_kernels(self) -> list[KernelContainer]:
        """This agent's kernel containers that exist right now, running or not; called at start
        to re-adopt them and after the runtime's events were lost."""

    @abstractmethod
    async def adopt(self, kernel: KernelContainer) -> None:
        """Hold the endpoint of a kernel :meth:`list_kernels` found, which the runner keeps."""

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
        """Stop watching and release the runtime client; called as the agent stops."""


def available_backends() -> dict[str, type[ContainerBackend]]:
    """Installed backends by entry-point name, the built-in ones included (tests may replace this)."""
    found = {**BUILT_IN, **{ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}}
    return {name: ep.load() for name, ep in found.items()}


def load_backend(name: str, agent: Agent) -> ContainerBackend:
    """The backend called ``name``, configured from ``agent``; an unknown name is an error."""
    found = available_backends()
    if name not in found:
        raise ValueError(
            f"unknown container backend {name!r} (Agent.backend); installed: {', '.join(sorted(found))}"
        )
    return found[name].from_agent(agent)
