"""NVIDIA GPUs through NVML: discovery, MIG instances, MPS fractions, live numbers.

The agent loads :class:`NvidiaPlugin` under the entry-point name ``cuda``. Every NVML call is
blocking C code, so each runs in a worker thread (:func:`asyncio.to_thread`) and never on the
event loop. A host without the NVML library, without a loaded driver or without GPUs simply
has no devices: :meth:`NvidiaPlugin.discover` logs why and returns ``[]``.

The environment a CUDA container gets is built by :func:`cuda_env`, which the mock plugin
shares, so a kernel sees the same variables on a real GPU host and in CI.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

from ...common.wire import Device
from ..launch import DeviceGrant, Mount
from .base import AcceleratorPlugin, DeviceStats

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_MPS_PIPE_DIR = "/tmp/nvidia-mps"
MIB = 2**20


def _natural_key(device_id: str) -> tuple[int, int, str]:
    # GPU indexes sort numerically ("2" before "10"); MIG UUIDs after them, by name.
    return (0, int(device_id), "") if device_id.isdigit() else (1, 0, device_id)


def allocated_devices(
    allocation: dict[str, Decimal], devices: list[Device], *, sharing_supported: bool
) -> list[tuple[Device, Decimal]]:
    """Check an allocation against the discovered devices (called by the CUDA plugins' grant).

    Returns ``(device, amount)`` pairs sorted by device id. Raises :class:`ValueError` for an
    unknown id, an amount that is not positive, or a fraction the host cannot honour.
    """
    by_id = {d.id: d for d in devices}
    unknown = sorted(i for i in allocation if i not in by_id)
    if unknown:
        raise ValueError(
            f"unknown device id(s) {', '.join(unknown)}; this host has {', '.join(sorted(by_id))}"
        )
    picked = sorted(
        ((by_id[i], Decimal(a)) for i, a in allocation.items()), key=lambda p: _natural_key(p[0].id)
    )
    fractions = [(d, a) for d, a in picked if a < 1]
    for d, a in picked:
        if a <= 0:
            raise ValueError(f"device {d.id}: amount must be positive, got {a}")
    if fractions:
        d, a = fractions[0]
        if not sharing_supported:
            raise ValueError(
                f"device {d.id}: a fraction ({a}) was asked but this host offers only whole devices"
            )
        if Decimal(d.shares) <= 0:
            raise ValueError(f"device {d.id} is offered whole only and cannot be shared ({a} asked)")
        # MPS limits are per client process, not per device: a container holding a fraction plus
        # anything else would have its whole devices throttled too, so a fraction stands alone.
        if len(picked) > 1:
            raise ValueError(f"device {d.id}: a fraction ({a}) must be the only device in an allocation")
    return picked


def cuda_env(picked: list[tuple[Device, Decimal]]) -> dict[str, str]:
    """The CUDA environment for allocated devices (called by the NVIDIA and mock plugins).

    ``picked`` comes from :func:`allocated_devices`. Sets ``NVIDIA_VISIBLE_DEVICES`` (UUIDs),
    ``BACKENDAI_ACCELERATOR_DEVICES`` (our ids) and, for a fraction, the MPS client limits.
    Nothing for an empty allocation: an empty ``NVIDIA_VISIBLE_DEVICES`` is not "none" to every runtime.
    """
    if not picked:
        return {}
    env = {
        "NVIDIA_VISIBLE_DEVICES": ",".join(d.uuid for d, _ in picked),
        "BACKENDAI_ACCELERATOR_DEVICES": ",".join(d.id for d, _ in picked),
    }
    fractions = [(d, a) for d, a in picked if a < 1]
    if fractions:
        d, a = fractions[0]
        # At least 1: MPS treats 0 as invalid, and a tiny fraction should still run, slowly.
        env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = str(max(1, int(a * 100)))
        # "0=" is the device's ordinal inside the container, where it is the only one visible.
        mib = max(1, int(Decimal(d.memory) * a) // MIB)
        env["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] = f"0={mib}M"
    return env


def sysfs_pci_name(bus_id: str) -> str:
    """NVML's ``00000000:01:00.0`` as sysfs names it, ``0000:01:00.0`` (called during discovery)."""
    domain, sep, rest = bus_id.strip().lower().partition(":")
    if not sep:
        return bus_id.lower()
    try:
        return f"{int(domain, 16):04x}:{rest}"
    except ValueError:
        return bus_id.lower()


def _text(value: Any) -> str:
    # Older NVML bindings hand back bytes; newer ones decode for us.
    return value.decode() if isinstance(value, bytes) else str(value)


class NvidiaPlugin(AcceleratorPlugin):
    """NVIDIA GPUs on this host, whole, as MIG instances, or as MPS fractions."""

    key = "cuda"

    def __init__(self, config: dict[str, Any] | None = None) -> None:
        super().__init__(config)
        self._nvml: Any = None  # the pynvml module once NVML is initialised
        self._init_lock = threading.Lock()
        self._last_reason = ""  # why the last discovery found nothing, so it is logged once
        self._handles: dict[str, Any] = {}  # device id → NVML handle, for stats()
        self._discovered = False

    # -- MPS ----------------------------------------------------------------------------------

    def mps_pipe_dir(self) -> str:
        """Where the MPS control daemon listens (called by discover and grant)."""
        # Plugin config wins as the explicit choice; the daemon's own variable comes next.
        return str(
            self.config.get("mps_pipe_dir")
            or os.environ.get("CUDA_MPS_PIPE_DIRECTORY")
            or DEFAULT_MPS_PIPE_DIR
        )

    def _check_mps(self) -> None:
        pipe_dir = self.mps_pipe_dir()
        # The daemon creates a "control" FIFO in its pipe directory; no FIFO, no daemon.
        if os.path.exists(os.path.join(pipe_dir, "control")):
            self.sharing_supported = True
            self.sharing_note = f"MPS control daemon found at {pipe_dir}; devices can be shared in fractions"
        else:
            self.sharing_supported = False
            self.sharing_note = (
                f"MPS control daemon is not running (no {pipe_dir}/control), "
                "so only whole devices are offered"
            )

    # -- NVML ---------------------------------------------------------------------------------

    def _ensure_nvml(self) -> Any:
        """Initialise NVML once; returns the module, or raises with a readable reason (worker thread)."""
        with self._init_lock:
            if self._nvml is not None:
                return self._nvml
            try:
                import pynvml
            except ImportError as e:
                raise RuntimeError(f"the NVML binding is not installed (nvidia-ml-py): {e}") from e
            try:
                pynvml.nvmlInit()
            except pynvml.NVMLError_LibraryNotFound as e:
                raise RuntimeError("libnvidia-ml was not found (no NVIDIA driver installed)") from e
            except pynvml.NVMLError_DriverNotLoaded as e:
                raise RuntimeError("the NVIDIA kernel driver is not loaded") from e
            except pynvml.NVMLError as e:
                raise RuntimeError(f"NVML failed to initialise: {e}") from e
            # NVML stays initialised for the life of the agent: discovery and stats share handles.
            self._nvml = pynvml
            return pynvml

    def _optional(self, call: Callable[..., T], *args: Any) -> T | None:
        """One NVML reading, or None where the device does not support it (worker thread)."""
        nvml = self._nvml
        try:
            return call(*args)
        except nvml.NVMLError_NotSupported:
            return None
        except nvml.NVMLError as e:
            # A reading that fails for another reason (GPU lost, no permission) must not take the
            # whole report down; the field is simply unknown this time.
            log.debug("NVML reading failed: %s", e)
            return None

    def _numa_node(self, handle: Any, pci_bus: str) -> int | None:
        nvml = self._nvml
        node: int | None = None
        if hasattr(nvml, "nvmlDeviceGetNumaNodeId"):
            try:
                node = int(nvml.nvmlDeviceGetNumaNodeId(handle))
            except nvml.NVMLError:
                node = None  # older driver without the call: fall back to sysfs
        if node is None:
            try:
                node = int(Path(f"/sys/bus/pci/devices/{pci_bus}/numa_node").read_text().strip())
            except (OSError, ValueError):
                return None
        # -1 is how both NVML and the kernel say "no NUMA affinity".
        return None if node < 0 else node

    def _mig_instances(
        self, handle: Any, parent_id: str, parent_uuid: str
    ) -> list[tuple[dict[str, Any], Any]] | None:
        """The MIG instances on one GPU with their handles; None when MIG is off (worker thread)."""
        nvml = self._nvml
        try:
            current, _pending = nvml.nvmlDeviceGetMigMode(handle)
        except nvml.NVMLError:
            return None  # not a MIG-capable GPU
        if current != nvml.NVML_DEVICE_MIG_ENABLE:
            return None
        found: list[tuple[dict[str, Any], Any]] = []
        for i in range(nvml.nvmlDeviceGetMaxMigDeviceCount(handle)):
            try:
                mig = nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, i)
            except nvml.NVMLError_NotFound:
                continue  # an empty slot: fewer instances configured than the GPU could hold
            name = _text(nvml.nvmlDeviceGetName(mig))
            info = {
                "uuid": _text(nvml.nvmlDeviceGetUUID(mig)),
                "memory": int(nvml.nvmlDeviceGetMemoryInfo(mig).total),
                # NVML names an instance "<GPU model> MIG 1g.5gb"; the tail is the profile.
                "profile": name.rsplit("MIG ", 1)[-1] if "MIG " in name else name,
                "name": name,
                "parent_id": parent_id,
                "parent_uuid": parent_uuid,
                "gpu_instance_id": self._optional(nvml.nvmlDeviceGetGpuInstanceId, mig),
                "compute_instance_id": self._optional(nvml.nvmlDeviceGetComputeInstanceId, mig),
            }
            found.append((info, mig))
        return found

    def _discover_sync(self) -> list[Device]:
        """Everything discover() reports, in one worker-thread trip."""
        self._check_mps()
        try:
            nvml = self._ensure_nvml()
            count = int(nvml.nvmlDeviceGetCount())
        except Exception as e:  # any failure before the first GPU means "no GPUs", with the reason
            self._no_devices(str(e))
            return []
        if count == 0:
            self._no_devices("NVML is working but reports no NVIDIA GPUs")
            return []
        shares = "1" if self.sharing_supported else "0"
        devices: list[Device] = []
        handles: dict[str, Any] = {}
        for index in range(count):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            gpu_id = str(index)
            uuid = _text(nvml.nvmlDeviceGetUUID(handle))
            model = _text(nvml.nvmlDeviceGetName(handle))
            pci_bus = sysfs_pci_name(_text(nvml.nvmlDeviceGetPciInfo(handle).busId))
            numa_node = self._numa_node(handle, pci_bus)
            migs = self._mig_instances(handle, gpu_id, uuid)
            if migs is not None:
                # With MIG on, the GPU cannot run work as a whole: only its instances can. So each
                # instance becomes a device of its own (id = its MIG UUID, which is also what the
                # container runtime accepts), the parent is not offered, and each instance's `mig`
                # list holds its own description including the parent it lives on. Instances are
                # offered whole: MPS on top of MIG is left out to keep one sharing model.
                if not migs:
                    log.info(
                        "GPU %s (%s) is in MIG mode but has no MIG instances; nothing offered", gpu_id, uuid
                    )
                for info, mig in migs:
                    devices.append(
                        Device(
                            plugin=self.key,
                            id=info["uuid"],
                            uuid=info["uuid"],
                            model=info["name"],
                            memory=info["memory"],
                            numa_node=numa_node,
                            pci_bus=pci_bus,
                            mig=[info],
                            shares="0",
                        )
                    )
                    handles[info["uuid"]] = mig
                continue
            devices.append(
                Device(
                    plugin=self.key,
                    id=gpu_id,
                    uuid=uuid,
                    model=model,
                    memory=int(nvml.nvmlDeviceGetMemoryInfo(handle).total),
                    numa_node=numa_node,
                    pci_bus=pci_bus,
                    shares=shares,
                )
            )
            handles[gpu_id] = handle
        self._handles = handles
        self._last_reason = ""
        return devices

    def _no_devices(self, reason: str) -> None:
        self._handles = {}
        if reason != self._last_reason:
            log.info("no NVIDIA GPUs offered: %s", reason)
            self._last_reason = reason

    def _stats_sync(self) -> list[DeviceStats]:
        """Live numbers for every discovered device, in one worker-thread trip."""
        nvml = self._nvml
        if nvml is None:
            return []
        out = []
        for device_id, handle in self._handles.items():
            util = self._optional(nvml.nvmlDeviceGetUtilizationRates, handle)
            mem = self._optional(nvml.nvmlDeviceGetMemoryInfo, handle)
            temp = self._optional(
                lambda h=handle: nvml.nvmlDeviceGetTemperature(h, nvml.NVML_TEMPERATURE_GPU)
            )
            power_mw = self._optional(nvml.nvmlDeviceGetPowerUsage, handle)
            out.append(
                DeviceStats(
                    id=device_id,
                    utilization_pct=None if util is None else float(util.gpu),
                    memory_used=None if mem is None else int(mem.used),
                    memory_total=None if mem is None else int(mem.total),
                    temperature_c=None if temp is None else float(temp),
                    power_w=None if power_mw is None else power_mw / 1000,  # NVML reports milliwatts
                )
            )
        return out

    # -- the plugin interface -----------------------------------------------------------------

    async def discover(self) -> list[Device]:
        """The GPUs (or MIG instances) on this host; called by the agent at start. Never raises."""
        try:
            devices = await asyncio.to_thread(self._discover_sync)
        except Exception as e:
            # A driver that answers the count but fails a per-GPU call is still "no devices" to
            # the agent, which must start either way.
            self._no_devices(f"NVML discovery failed: {e}")
            devices = []
        self._discovered = True
        return devices

    def grant(self, allocation: dict[str, Decimal], devices: list[Device]) -> DeviceGrant:
        """Exactly the allocated GPUs, by UUID, for the NVIDIA runtime; called by the agent per kernel."""
        mine = [d for d in devices if d.plugin == self.key]
        picked = allocated_devices(allocation, mine, sharing_supported=self.sharing_supported)
        grant = DeviceGrant(plugin=self.key, env=cuda_env(picked))
        if not picked:
            return grant
        grant.driver = "nvidia"
        grant.device_ids = [d.uuid for d, _ in picked]
        grant.capabilities = ["gpu"]
        if any(a < 1 for _, a in picked):
            # The MPS client reaches the host's daemon through its pipe directory, at the same path.
            pipe_dir = self.mps_pipe_dir()
            grant.env["CUDA_MPS_PIPE_DIRECTORY"] = pipe_dir
            grant.mounts.append(Mount(pipe_dir, pipe_dir))
        return grant

    async def stats(self) -> list[DeviceStats]:
        """Utilisation, memory, temperature and power per device; called by the agent on request."""
        if not self._discovered:
            await self.discover()
        return await asyncio.to_thread(self._stats_sync)
