"""Messages between gateway and agents, typed once and used on both sides.

The agent opens a websocket to the gateway, naming itself (``X-BackendAI-Agent``) and proving
it with its own agent key (``X-BackendAI-Agent-Key``). An agent id the gateway has not seen
yet is enrolled with the key it presents when the request also carries the cluster's join token
(``X-BackendAI-Join-Token``); from then on only that key opens a connection under that id.
On the connection it speaks JSON objects with a ``type``:
``register`` and ``heartbeat`` (agent → gateway), ``call`` (gateway → agent, answered by
``reply`` with the same ``id``) and ``kernel`` (agent → gateway, a kernel's state changed).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import PurePosixPath
from typing import Any, ClassVar

from .errors import ApiError
from .slots import ResourceSlot
from .states import SessionState

PROTOCOL_VERSION = 1
AGENT_WS_PATH = "/v1/agents/connect"
AGENT_ID_HEADER = "X-BackendAI-Agent"
AGENT_KEY_HEADER = "X-BackendAI-Agent-Key"
JOIN_TOKEN_HEADER = "X-BackendAI-Join-Token"
# An agent that lost its link tries again at least this often (seconds), so a restarted gateway
# knows how long to wait for its agents before it declares their kernels lost.
AGENT_RECONNECT_MAX = 5.0
# The kernel user's home in kernel images: vfolders are mounted at KERNEL_HOME/<name>.
KERNEL_HOME = str(PurePosixPath("/", "home", "work"))  # the `work` user of kernels/base
KERNEL_CHANNELS = ("shell", "iopub", "stdin", "control", "hb")


@dataclass
class Device:
    """One accelerator an agent offers (a GPU, a MIG instance), as its plugin discovered it."""

    plugin: str  # the slot prefix it provides, e.g. "cuda"
    id: str  # unique on its agent, e.g. "0" or "MIG-...": what allocations name
    uuid: str
    model: str
    memory: int  # bytes
    numa_node: int | None = None
    pci_bus: str | None = None
    mig: list[dict[str, Any]] = field(default_factory=list)
    mock: bool = False  # declared in config, not real hardware: shown as such everywhere
    shares: str = "0"  # fractional capacity offered as <plugin>.shares ("1" when sharing works)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Device:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


@dataclass
class ImageInfo:
    """An image an agent holds and can start kernels from."""

    id: str
    tags: list[str]
    kernel: dict[str, Any]  # the image's kernel label: language, display_name, argv, ...
    logo: str = ""  # its logo label: a base64 64x64 PNG (see common.imagespecs)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ImageInfo:
        logo = d.get("logo")
        return cls(
            id=d["id"],
            tags=list(d["tags"]),
            kernel=dict(d.get("kernel") or {}),
            logo=logo if isinstance(logo, str) else "",
        )


@dataclass
class KernelReport:
    """An agent's word on one kernel: its state and, once running, how to reach it."""

    session_id: str
    state: SessionState
    reason: str = ""
    connection: dict[str, Any] | None = None
    exit_code: int | None = None

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["state"] = self.state.value
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> KernelReport:
        return cls(
            session_id=d["session_id"],
            state=SessionState(d["state"]),
            reason=d.get("reason", ""),
            connection=d.get("connection"),
            exit_code=d.get("exit_code"),
        )


@dataclass
class AgentRegistration:
    """What an agent says when it connects: who it is, what it has, what it runs."""

    agent_id: str
    address: str
    capacity: ResourceSlot
    images: list[ImageInfo] = field(default_factory=list)
    kernels: list[KernelReport] = field(default_factory=list)
    devices: list[Device] = field(default_factory=list)
    version: int = PROTOCOL_VERSION

    def to_json(self) -> dict[str, Any]:
        return {
            "agent_id": self.agent_id,
            "address": self.address,
            "capacity": self.capacity.to_json(),
            "images": [asdict(i) for i in self.images],
            "kernels": [k.to_json() for k in self.kernels],
            "devices": [d.to_json() for d in self.devices],
            "version": self.version,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> AgentRegistration:
        return cls(
            agent_id=d["agent_id"],
            address=d["address"],
            capacity=ResourceSlot.parse(d["capacity"]),
            images=[ImageInfo.from_json(i) for i in d.get("images", [])],
            kernels=[KernelReport.from_json(k) for k in d.get("kernels", [])],
            devices=[Device.from_json(x) for x in d.get("devices", [])],
            version=d.get("version", PROTOCOL_VERSION),
        )


@dataclass
class Mount:
    """A vfolder to bind into a kernel's container.

    ``volume`` names the storage volume and ``subpath`` the vfolder's directory in it; the agent
    finds the volume at its own path for it (``Agent.volume_paths``), else at ``volume_path``,
    where the gateway has it. Every agent must see the same filesystem there (NFS, CephFS, ...).
    """

    volume: str
    volume_path: str
    subpath: str
    target: str  # where the kernel sees it, e.g. ~/<name>
    mode: str  # "rw" or "ro"
    vfolder_id: str = ""
    name: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Mount:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


@dataclass
class CreateKernel:
    """The gateway's order to start a kernel for a scheduled session."""

    METHOD: ClassVar[str] = "create_kernel"

    session_id: str
    image: str
    resources: ResourceSlot
    env: dict[str, str]
    owner: str
    # On a restart: the previous kernel's ports and key, so connected clients reconnect as is.
    reuse: dict[str, Any] | None = None
    # Specific devices: plugin → {device id: amount} (amount "1" for a whole device).
    devices: dict[str, dict[str, str]] = field(default_factory=dict)
    mounts: list[Mount] = field(default_factory=list)
    working_dir: str = ""  # in the container; "" for the image's own

    def to_json(self) -> dict[str, Any]:
        return {
            "session_id": self.session_id,
            "image": self.image,
            "resources": self.resources.to_json(),
            "env": self.env,
            "owner": self.owner,
            "reuse": self.reuse,
            "devices": self.devices,
            "mounts": [m.to_json() for m in self.mounts],
            "working_dir": self.working_dir,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> CreateKernel:
        return cls(
            session_id=d["session_id"],
            image=d["image"],
            resources=ResourceSlot.parse(d["resources"]),
            env=dict(d.get("env") or {}),
            owner=d.get("owner", ""),
            reuse=d.get("reuse"),
            devices={k: dict(v) for k, v in (d.get("devices") or {}).items()},
            mounts=[Mount.from_json(m) for m in d.get("mounts") or []],
            working_dir=d.get("working_dir") or "",
        )


@dataclass
class RestartKernel(CreateKernel):
    """Start the session's kernel again in a new container, on the same ports and key."""

    METHOD: ClassVar[str] = "restart_kernel"


@dataclass
class DestroyKernel:
    """Remove the session's container (and free its ports); the kernel is then TERMINATED."""

    METHOD: ClassVar[str] = "destroy_kernel"
    session_id: str

    def to_json(self) -> dict[str, Any]:
        return {"session_id": self.session_id}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> DestroyKernel:
        return cls(session_id=d["session_id"])


@dataclass
class SignalKernel:
    """Deliver a signal (by name: SIGINT interrupts) to the kernel's process."""

    METHOD: ClassVar[str] = "signal_kernel"
    session_id: str
    signal: str

    def to_json(self) -> dict[str, Any]:
        return {"session_id": self.session_id, "signal": self.signal}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> SignalKernel:
        return cls(session_id=d["session_id"], signal=d["signal"])


# What the gateway can ask an agent to do, each sent as {"type": "call", "method": METHOD,
# "params": to_json()} and answered by a reply with "result" or "error".
Order = CreateKernel | RestartKernel | DestroyKernel | SignalKernel
ORDERS: dict[str, type[CreateKernel] | type[DestroyKernel] | type[SignalKernel]] = {
    cls.METHOD: cls for cls in (CreateKernel, RestartKernel, DestroyKernel, SignalKernel)
}


class UnknownOrder(ApiError):
    """A call whose method names no order (an agent and a gateway of different versions)."""


def order_from_call(method: object, params: dict[str, Any]) -> Order:
    """The typed order of an agent call; :class:`UnknownOrder` for a method no order has, and
    ``KeyError``/``ValueError`` for parameters that do not make one."""
    cls = ORDERS.get(method) if isinstance(method, str) else None
    if cls is None:
        raise UnknownOrder(f"unknown order {method!r}")
    return cls.from_json(params)
