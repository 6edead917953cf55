"""Mock CUDA devices for hosts without GPUs (CI, demos), declared in config and labelled mock.

The agent loads :class:`MockPlugin` under the entry-point name ``mock``. It offers the same
``cuda.*`` slots as the NVIDIA plugin and gives containers the same environment, so scheduling
and kernels can be exercised end to end; it passes no devices, since there are none.

Config::

    {"devices": [{"id": "0", "model": "Mock A100", "memory": "40g", "numa_node": 0,
                  "pci_bus": "0000:01:00.0"}, ...],
     "sharing": false, "agent_id": "agent-1"}

``devices`` may also be a number N: N devices of 16 GiB on NUMA nodes 0, 1, 0, 1, ...
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from ...common.slots import parse_amount
from ...common.wire import Device
from ..launch import DeviceGrant
from .base import AcceleratorPlugin, DeviceStats
from .nvidia import allocated_devices, cuda_env

DEFAULT_MEMORY = 16 * 2**30
DEFAULT_MODEL = "CUDA GPU"  # shown as "CUDA GPU (mock)"


class MockPlugin(AcceleratorPlugin):
    """Simulated CUDA devices declared in config; never real hardware."""

    key = "cuda"

    def __init__(self, config: dict[str, Any] | None = None) -> None:
        super().__init__(config)
        self.sharing_supported = bool(self.config.get("sharing", False))
        if self.sharing_supported:
            self.sharing_note = "mock devices: sharing is simulated, nothing enforces a fraction's limits"
        else:
            self.sharing_note = "mock devices: sharing is off in config, so only whole devices are offered"
        self._devices = self._declared()

    def _declared(self) -> list[Device]:
        """The devices the config declares, validated once at construction."""
        spec = self.config.get("devices", [])
        if isinstance(spec, bool):
            raise ValueError(f"mock devices: expected a count or a list, got {spec!r}")
        if isinstance(spec, int):
            spec = [{} for _ in range(spec)]
        if not isinstance(spec, list):
            raise ValueError(f"mock devices: expected a count or a list, got {type(spec).__name__}")
        owner = self.config.get("agent_id") or "host"
        shares = "1" if self.sharing_supported else "0"
        devices: list[Device] = []
        for index, entry in enumerate(spec):
            if not isinstance(entry, dict):
                raise ValueError(f"mock device #{index}: expected a mapping, got {type(entry).__name__}")
            device_id = str(entry.get("id", index))
            if any(d.id == device_id for d in devices):
                raise ValueError(f"mock device id {device_id!r} is declared twice")
            model = str(entry.get("model", DEFAULT_MODEL))
            # Labelled everywhere it shows up (listings, UIs), so nobody mistakes it for hardware.
            if "mock" not in model.lower():
                model += " (mock)"
            memory = int(parse_amount("mem", entry.get("memory", DEFAULT_MEMORY)))
            numa = entry.get("numa_node", index % 2)
            devices.append(
                Device(
                    plugin=self.key,
                    id=device_id,
                    # The agent id is part of the UUID so two mock agents never claim the same device.
                    uuid=f"GPU-mock-{owner}-{device_id}",
                    model=model,
                    memory=memory,
                    numa_node=None if numa is None else int(numa),
                    pci_bus=str(entry.get("pci_bus", f"0000:{index + 1:02x}:00.0")),
                    mock=True,
                    shares=shares,
                )
            )
        return devices

    async def discover(self) -> list[Device]:
        """The declared devices; called by the agent at start."""
        return list(self._devices)

    def grant(self, allocation: dict[str, Decimal], devices: list[Device]) -> DeviceGrant:
        """The NVIDIA plugin's environment plus a mock marker; called by the agent per kernel.

        No devices and no mounts: there is no NVIDIA runtime to hand them to.
        """
        mine = [d for d in devices if d.plugin == self.key]
        picked = allocated_devices(allocation, mine, sharing_supported=self.sharing_supported)
        env = cuda_env(picked)
        if picked:
            env["BACKENDAI_ACCELERATOR_MOCK"] = "1"
        return DeviceGrant(plugin=self.key, env=env)

    async def stats(self) -> list[DeviceStats]:
        """Simulated numbers: each device's total memory, and zero for everything else."""
        return [
            DeviceStats(
                id=d.id,
                utilization_pct=0.0,
                memory_used=0,
                memory_total=d.memory,
                temperature_c=0.0,
                power_w=0.0,
            )
            for d in self._devices
        ]
