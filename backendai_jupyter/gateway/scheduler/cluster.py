"""What the scheduler knows: every agent's capacity, devices and what is allocated on them.

Accounting is exact (``Decimal`` in :class:`ResourceSlot`, integer units in the index). Each
allocation names *specific devices*, so a device is never given to two kernels and a
fractional request is only placed where one device really has that much free.

Finding candidate agents must stay cheap with a thousand agents, so the cluster keeps a
numpy index of free capacity in integer units (milli-cores, bytes, whole devices, and the
largest free fraction on any one device); every candidate it yields is then checked exactly.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from decimal import Decimal

import numpy as np

from ...common.slots import ResourceSlot, SlotError, format_amount
from ...common.wire import Device

# Integer units per slot kind: cpu in milli-cores, shares in thousandths, the rest as is.
_MILLI = Decimal(1000)


def slot_kind(slot: str) -> str:
    """``cpu``, ``mem``, ``device`` (whole accelerators) or ``shares`` (fractions of one)."""
    if slot.endswith(".device"):
        return "device"
    if slot.endswith(".shares"):
        return "shares"
    return slot if slot in ("cpu", "mem") else "other"


def plugin_of(slot: str) -> str:
    return slot.rsplit(".", 1)[0]


def validate_request(request: ResourceSlot) -> None:
    """Refuse amounts the scheduler cannot place exactly."""
    for slot, amount in request.items():
        kind = slot_kind(slot)
        if kind in ("cpu", "shares") and (amount * _MILLI) % 1:
            raise SlotError(f"{slot}: at most 3 decimal places, got {amount}")
        if kind == "device" and amount % 1:
            raise SlotError(f"{slot}: whole devices only, got {amount} (use {plugin_of(slot)}.shares)")
        if kind == "shares" and amount > 1:
            raise SlotError(f"{slot}: a fraction of one device (at most 1), got {amount}")
        if kind == "other":
            raise SlotError(f"unknown resource slot {slot!r}")


def _units(slot: str, amount: Decimal) -> int:
    return int(amount * _MILLI) if slot_kind(slot) in ("cpu", "shares") else int(amount)


@dataclass
class Allocation:
    """Where a session runs and exactly what it holds there."""

    agent_id: str
    resources: ResourceSlot
    devices: dict[str, dict[str, Decimal]] = field(default_factory=dict)  # plugin → {device id: amount}
    user_id: str = ""

    def devices_json(self) -> dict[str, dict[str, str]]:
        return {p: {d: f"{a.normalize():f}" for d, a in devs.items()} for p, devs in self.devices.items()}


@dataclass
class AgentState:
    """One agent's capacity, devices and current use."""

    id: str
    capacity: ResourceSlot
    devices: list[Device]
    images: frozenset[str]
    schedulable: bool = True
    used: ResourceSlot = field(default_factory=ResourceSlot)
    device_used: dict[str, Decimal] = field(default_factory=dict)  # device id → amount held

    def free(self) -> ResourceSlot:
        return self.capacity - self.used

    def devices_of(self, plugin: str) -> list[Device]:
        return [d for d in self.devices if d.plugin == plugin]

    def whole_free(self, plugin: str) -> list[Device]:
        return [d for d in self.devices_of(plugin) if not self.device_used.get(d.id)]

    def largest_free_share(self, plugin: str) -> Decimal:
        return max(
            (Decimal(d.shares) - self.device_used.get(d.id, Decimal(0)) for d in self.devices_of(plugin)),
            default=Decimal(0),
        )


class Cluster:
    """Agents and allocations; the only place capacity is taken or given back."""

    def __init__(self) -> None:
        self.agents: dict[str, AgentState] = {}
        self.allocations: dict[str, Allocation] = {}
        self._slots: dict[str, int] = {}  # index column of each slot
        self._order: list[str] = []  # index row → agent id
        self._rows: dict[str, int] = {}  # agent id → index row
        self._free = np.zeros((0, 0), dtype=np.int64)
        self._ok = np.zeros(0, dtype=bool)  # schedulable rows
        self._image_rows: dict[str, np.ndarray] = {}

    # -- agents --------------------------------------------------------------------------------

    def add_agent(
        self, agent_id: str, capacity: ResourceSlot, devices: list[Device], images: Iterable[str]
    ) -> None:
        """An agent (re)joins; allocations it already holds are kept."""
        old = self.agents.get(agent_id)
        state = AgentState(agent_id, ResourceSlot(capacity), list(devices), frozenset(images))
        if old is not None:
            state.schedulable = old.schedulable
        self.agents[agent_id] = state
        for alloc in self.allocations.values():
            if alloc.agent_id == agent_id:
                self._hold(state, alloc)
        self._rebuild_index()

    def remove_agent(self, agent_id: str) -> list[str]:
        """An agent is lost: it and everything on it go; returns the freed session ids."""
        self.agents.pop(agent_id, None)
        freed = [sid for sid, a in self.allocations.items() if a.agent_id == agent_id]
        for sid in freed:
            del self.allocations[sid]
        self._rebuild_index()
        return freed

    def set_schedulable(self, agent_id: str, schedulable: bool) -> None:
        """Drain (False) or undrain an agent; its running kernels are not touched."""
        self.agents[agent_id].schedulable = schedulable
        self._ok[self._rows[agent_id]] = schedulable

    # -- allocations ---------------------------------------------------------------------------

    def allocate(self, session_id: str, alloc: Allocation) -> None:
        """Record an allocation; it must fit (checked again here, exactly)."""
        agent = self.agents[alloc.agent_id]
        if session_id in self.allocations:
            raise ValueError(f"session {session_id} already holds an allocation")
        if not alloc.resources.fits_in(agent.free()):
            raise ValueError(f"allocation for {session_id} does not fit agent {agent.id}")
        for devs in alloc.devices.values():
            for dev_id, amount in devs.items():
                device = next(d for d in agent.devices if d.id == dev_id)
                held = agent.device_used.get(dev_id, Decimal(0))
                limit = Decimal(1) if amount >= 1 else Decimal(device.shares)
                if (amount >= 1 and held) or held + amount > limit:
                    raise ValueError(f"device {dev_id} on {agent.id} is already taken")
        self.allocations[session_id] = alloc
        self._hold(agent, alloc)
        self._refresh_row(agent)

    def restore(self, session_id: str, alloc: Allocation) -> None:
        """Take back an allocation recorded before a gateway restart (its agent may not be back yet)."""
        self.allocations[session_id] = alloc
        agent = self.agents.get(alloc.agent_id)
        if agent is not None:
            self._hold(agent, alloc)
            self._refresh_row(agent)

    def release(self, session_id: str) -> Allocation | None:
        """Give back what a session held (no-op when it held nothing)."""
        alloc = self.allocations.pop(session_id, None)
        if alloc is None:
            return None
        agent = self.agents.get(alloc.agent_id)
        if agent is not None:
            agent.used = agent.used - alloc.resources
            for devs in alloc.devices.values():
                for dev_id, amount in devs.items():
                    left = agent.device_used.get(dev_id, Decimal(0)) - min(amount, Decimal(1))
                    if left > 0:
                        agent.device_used[dev_id] = left
                    else:
                        agent.device_used.pop(dev_id, None)
            self._refresh_row(agent)
        return alloc

    @staticmethod
    def _hold(agent: AgentState, alloc: Allocation) -> None:
        agent.used = agent.used + alloc.resources
        for devs in alloc.devices.values():
            for dev_id, amount in devs.items():
                agent.device_used[dev_id] = agent.device_used.get(dev_id, Decimal(0)) + min(
                    amount, Decimal(1)
                )

    # -- placement -----------------------------------------------------------------------------

    def _mask(self, request: ResourceSlot, image: str) -> np.ndarray | None:
        """Rows that pass the index filter for ``request`` (None: a slot nobody offers)."""
        mask = self._ok & self._image_mask(image)
        for slot, amount in request.items():
            if amount <= 0:
                continue
            col = self._slots.get(slot)
            if col is None:
                return None
            mask &= self._free[:, col] >= _units(slot, amount)
        return mask

    def _image_mask(self, image: str) -> np.ndarray:
        rows = self._image_rows.get(image)
        if rows is None:
            rows = np.array([image in self.agents[a].images for a in self._order], dtype=bool)
            self._image_rows[image] = rows
        return rows

    def select(
        self, request: ResourceSlot, image: str, spread: bool, user_id: str = "", prefer: str | None = None
    ) -> Allocation | None:
        """Place ``request``: the fullest (or, spreading, the emptiest) agent that really fits."""
        if prefer in self.agents and self.agents[prefer].schedulable and image in self.agents[prefer].images:
            fit = self.fit(self.agents[prefer], request, user_id)
            if fit is not None:
                return fit
        mask = self._mask(request, image)
        if mask is None:
            return None
        rows = np.flatnonzero(mask)
        if rows.size == 0:
            return None
        # Rank on the requested slots, scarcest first (lexsort takes its primary key last).
        keys = [self._slots[s] for s in sorted(request, key=_weight) if request[s] > 0] or [
            self._slots["cpu"],
            self._slots["mem"],
        ]
        block = self._free[rows][:, keys]
        if spread:
            block = -block
        ranked = rows[np.lexsort(block.T[::-1])]
        for row in ranked:
            fit = self.fit(self.agents[self._order[row]], request, user_id)
            if fit is not None:
                return fit
        return None

    def fit(self, agent: AgentState, request: ResourceSlot, user_id: str = "") -> Allocation | None:
        """The exact check: an allocation of specific devices on ``agent``, or None."""
        if not request.fits_in(agent.free()):
            return None
        devices: dict[str, dict[str, Decimal]] = {}
        for slot, amount in sorted(request.items()):
            if amount <= 0:
                continue
            kind = slot_kind(slot)
            if kind == "device":
                picked = pick_whole_devices(agent.whole_free(plugin_of(slot)), int(amount))
                if picked is None:
                    return None
                devices.setdefault(plugin_of(slot), {}).update({d.id: Decimal(1) for d in picked})
            elif kind == "shares":
                dev = pick_shared_device(
                    agent, plugin_of(slot), amount, exclude=devices.get(plugin_of(slot), {})
                )
                if dev is None:
                    return None
                devices.setdefault(plugin_of(slot), {})[dev.id] = amount
        return Allocation(agent.id, ResourceSlot(request), devices, user_id)

    def shortfall_reason(self, request: ResourceSlot, image: str) -> str:
        """Why nothing fits right now, naming the resource and the most free anywhere."""
        usable = self._ok & self._image_mask(image)
        if not usable.any():
            if self._image_mask(image).any():
                return f"every agent with the image {image} is drained"
            return f"no connected agent has the image {image}"
        parts = []
        for slot in sorted(k for k, v in request.items() if v > 0):
            col = self._slots.get(slot)
            most_units = int(self._free[usable, col].max()) if col is not None else 0
            kind = slot_kind(slot)
            most = Decimal(most_units) / _MILLI if kind in ("cpu", "shares") else Decimal(most_units)
            if request[slot] > most:
                what = "on one device " if kind == "shares" else ""
                parts.append(
                    f"{format_amount(slot, request[slot])} {slot} requested, most free {what}on any agent "
                    f"is {format_amount(slot, most)}"
                )
        if not parts:
            parts.append(f"no single agent has {request.describe()} free at once")
        return "; ".join(parts)

    def exceeds_every_agent(self, request: ResourceSlot) -> str | None:
        """A message naming the resource when no agent could ever hold ``request``, else None."""
        agents = list(self.agents.values())
        if not agents or any(self._could_ever_fit(a, request) for a in agents):
            return None
        for slot in sorted(k for k, v in request.items() if v > 0):
            largest = max(a.capacity.get(slot, Decimal(0)) for a in agents)
            if slot_kind(slot) == "shares":
                largest = max(
                    (Decimal(d.shares) for a in agents for d in a.devices_of(plugin_of(slot))), default=0
                )
            if request[slot] > largest and largest == 0 and slot_kind(slot) in ("device", "shares"):
                return (
                    f"requested {format_amount(slot, request[slot])} {slot}, but no agent offers {slot}: "
                    f"connect an agent with {plugin_of(slot)} devices (or mock ones: --Agent.mock_devices=N)"
                )
            if request[slot] > largest:
                return (
                    f"requested {format_amount(slot, request[slot])} {slot}, but the largest agent "
                    f"has {format_amount(slot, Decimal(largest))}: ask for at most that"
                )
        return "no single agent has all the requested resources at once"

    @staticmethod
    def _could_ever_fit(agent: AgentState, request: ResourceSlot) -> bool:
        for slot, amount in request.items():
            if slot_kind(slot) == "shares":
                if amount > max((Decimal(d.shares) for d in agent.devices_of(plugin_of(slot))), default=0):
                    return False
            elif amount > agent.capacity.get(slot, Decimal(0)):
                return False
        return True

    # -- the index ------------------------------------------------------------------------------

    def _rebuild_index(self) -> None:
        self._order = list(self.agents)
        self._rows = {a: i for i, a in enumerate(self._order)}
        slots: set[str] = {"cpu", "mem"}
        for a in self.agents.values():
            slots.update(a.capacity)
            for d in a.devices:
                slots.update((f"{d.plugin}.device", f"{d.plugin}.shares"))
        self._slots = {s: i for i, s in enumerate(sorted(slots))}
        self._free = np.zeros((len(self._order), len(self._slots)), dtype=np.int64)
        self._ok = np.array([self.agents[a].schedulable for a in self._order], dtype=bool)
        self._image_rows = {}
        for agent in self.agents.values():
            self._refresh_row(agent)

    def _refresh_row(self, agent: AgentState) -> None:
        row = self._rows[agent.id]
        free = agent.free()
        for slot, col in self._slots.items():
            kind = slot_kind(slot)
            if kind == "device":
                value = len(agent.whole_free(plugin_of(slot)))
            elif kind == "shares":
                value = _units(slot, agent.largest_free_share(plugin_of(slot)))
            else:
                value = _units(slot, max(free.get(slot, Decimal(0)), Decimal(0)))
            self._free[row, col] = value

    # -- checking ------------------------------------------------------------------------------

    def check(self) -> None:
        """Raise AssertionError if any capacity is exceeded or any device is over-given."""
        for agent in self.agents.values():
            mine = [a for a in self.allocations.values() if a.agent_id == agent.id]
            total = ResourceSlot()
            per_device: dict[str, Decimal] = {}
            whole: dict[str, int] = {}
            for alloc in mine:
                total = total + alloc.resources
                for devs in alloc.devices.values():
                    for dev_id, amount in devs.items():
                        per_device[dev_id] = per_device.get(dev_id, Decimal(0)) + min(amount, Decimal(1))
                        if amount >= 1:
                            whole[dev_id] = whole.get(dev_id, 0) + 1
            assert total.fits_in(agent.capacity), (
                f"{agent.id}: {total.describe()} > {agent.capacity.describe()}"
            )
            keys = set(total) | set(agent.used)
            assert all(total.get(k, 0) == agent.used.get(k, 0) for k in keys), f"{agent.id}: books differ"
            for dev_id, amount in per_device.items():
                assert amount <= 1, f"{agent.id}: device {dev_id} given {amount}"
                assert whole.get(dev_id, 0) <= 1, f"{agent.id}: device {dev_id} given whole twice"
                if whole.get(dev_id):
                    assert amount == 1, f"{agent.id}: device {dev_id} whole and shared"


def _weight(slot: str) -> tuple[int, str]:
    # Scarce accelerators decide first, then cpu, then memory.
    return ({"device": 0, "shares": 1, "cpu": 2, "mem": 3}.get(slot_kind(slot), 4), slot)


def pick_whole_devices(free: list[Device], count: int) -> list[Device] | None:
    """``count`` free devices, all on one NUMA node when any node has enough (the tightest)."""
    if len(free) < count:
        return None
    by_node: dict[int | None, list[Device]] = {}
    for d in free:
        by_node.setdefault(d.numa_node, []).append(d)
    fitting = [devs for node, devs in by_node.items() if node is not None and len(devs) >= count]
    if fitting:
        # The node with the fewest free devices that still fits keeps larger blocks whole.
        best = min(fitting, key=lambda devs: (len(devs), devs[0].numa_node))
        return sorted(best, key=lambda d: d.id)[:count]
    return sorted(free, key=lambda d: (d.numa_node if d.numa_node is not None else -1, d.id))[:count]


def pick_shared_device(
    agent: AgentState, plugin: str, amount: Decimal, exclude: dict[str, Decimal]
) -> Device | None:
    """The fullest device that still has ``amount`` free (packing fractions together)."""
    best: tuple[Decimal, Device] | None = None
    for d in agent.devices_of(plugin):
        if d.id in exclude or Decimal(d.shares) <= 0:
            continue
        free = Decimal(d.shares) - agent.device_used.get(d.id, Decimal(0))
        if free >= amount and (best is None or free < best[0]):
            best = (free, d)
    return best[1] if best else None
