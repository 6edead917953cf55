"""The accelerator plugin interface, and finding plugins through entry points.

The agent calls a plugin at start (:meth:`AcceleratorPlugin.discover`), when it registers
(:meth:`AcceleratorPlugin.slots`), for every kernel that was allocated devices
(:meth:`AcceleratorPlugin.grant`), and when asked for live numbers
(:meth:`AcceleratorPlugin.stats`). The gateway decides *which* devices a kernel gets; a plugin
only describes them, as a :class:`~backendai_jupyter.agent.launch.DeviceGrant` that the
container backend passes into the container.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from decimal import Decimal
from importlib.metadata import entry_points
from typing import Any

from ...common.slots import ResourceSlot
from ...common.wire import Device
from ..launch import DeviceGrant

ENTRY_POINT_GROUP = "backendai_jupyter.accelerators"


@dataclass
class DeviceStats:
    """Live numbers of one device."""

    id: str
    utilization_pct: float | None = None
    memory_used: int | None = None
    memory_total: int | None = None
    temperature_c: float | None = None
    power_w: float | None = None


class AcceleratorPlugin(ABC):
    """One kind of accelerator on an agent host."""

    #: Slot prefix this plugin provides: slots are ``<key>.device`` and ``<key>.shares``.
    key: str = ""
    #: Whether fractions of a device (``<key>.shares``) can be given out, and why not if not.
    sharing_supported: bool = False
    sharing_note: str = ""

    def __init__(self, config: dict[str, Any] | None = None) -> None:
        self.config = dict(config or {})

    @abstractmethod
    async def discover(self) -> list[Device]:
        """The devices on this host. A host without the hardware or driver returns []."""

    def slots(self, devices: list[Device]) -> ResourceSlot:
        """The capacity these devices add to the agent."""
        mine = [d for d in devices if d.plugin == self.key]
        if not mine:
            return ResourceSlot()
        slots = ResourceSlot({f"{self.key}.device": Decimal(len(mine))})
        if self.sharing_supported:
            slots[f"{self.key}.shares"] = sum((Decimal(d.shares) for d in mine), Decimal(0))
        return slots

    @abstractmethod
    def grant(self, allocation: dict[str, Decimal], devices: list[Device]) -> DeviceGrant:
        """What gives a container exactly ``allocation`` (device id → amount): the devices as the
        runtime's driver names them, device nodes, environment, mounts. Raise :class:`ValueError`
        for an allocation these devices cannot honour."""

    @abstractmethod
    async def stats(self) -> list[DeviceStats]:
        """Live numbers for each device."""


def available_plugins() -> dict[str, type[AcceleratorPlugin]]:
    """Installed plugins by entry-point name (tests may replace this)."""
    return {ep.name: ep.load() for ep in entry_points(group=ENTRY_POINT_GROUP)}


def load_plugins(names: list[str], config: dict[str, dict[str, Any]]) -> list[AcceleratorPlugin]:
    """Instantiate the named plugins with their config sections; unknown names are an error."""
    found = available_plugins()
    missing = [n for n in names if n not in found]
    if missing:
        raise ValueError(
            f"unknown accelerator plugin(s) {', '.join(missing)}; installed: {', '.join(sorted(found))}"
        )
    return [found[n](config.get(n)) for n in names]
