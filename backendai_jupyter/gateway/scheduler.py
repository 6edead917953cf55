"""Placement: which agent a pending session goes to, or why it has to wait."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal

from ..common.slots import ResourceSlot, format_amount


@dataclass
class AgentView:
    """What the scheduler needs to know of one agent."""

    id: str
    capacity: ResourceSlot
    used: ResourceSlot
    images: frozenset[str]

    @property
    def free(self) -> ResourceSlot:
        return self.capacity - self.used


@dataclass
class Decision:
    """Either an agent to place on, or the reason nothing fits right now."""

    agent_id: str | None
    reason: str = ""


def image_matches(requested: str, tags: Iterable[str]) -> bool:
    """True when ``requested`` names one of ``tags`` (``:latest`` implied)."""
    want = normalize_image(requested)
    return any(want == normalize_image(t) for t in tags)


def normalize_image(name: str) -> str:
    last = name.rsplit("/", 1)[-1]
    return name if ":" in last or "@" in last else f"{name}:latest"


def first_fit(
    request: ResourceSlot, image: str, agents: list[AgentView], prefer: str | None = None
) -> Decision:
    """The first agent (``prefer`` first, then registration order) with the image and room."""
    candidates = [a for a in agents if normalize_image(image) in a.images]
    candidates.sort(key=lambda a: a.id != prefer)
    if not candidates:
        return Decision(None, f"waiting: no connected agent has the image {image}")
    for agent in candidates:
        if request.fits_in(agent.free):
            return Decision(agent.id)
    return Decision(None, _waiting_reason(request, candidates))


def _waiting_reason(request: ResourceSlot, agents: list[AgentView]) -> str:
    parts = []
    for slot in sorted(k for k, v in request.items() if v > 0):
        most_free = max((a.free.get(slot, Decimal(0)) for a in agents), default=Decimal(0))
        if request[slot] > most_free:
            parts.append(
                f"{format_amount(slot, request[slot])} {slot} requested, "
                f"most free on any agent is {format_amount(slot, most_free)}"
            )
    if not parts:
        free = "; ".join(f"{a.id} has {a.free.describe()}" for a in agents[:3])
        parts.append(f"no single agent has {request.describe()} free at once ({free})")
    return "waiting: " + "; ".join(parts)


def exceeds_every_agent(request: ResourceSlot, agents: list[AgentView]) -> str | None:
    """A message naming the resource when no agent could ever hold ``request``, else None."""
    if not agents:
        return None
    if any(request.fits_in(a.capacity) for a in agents):
        return None
    for slot in sorted(k for k, v in request.items() if v > 0):
        largest = max(a.capacity.get(slot, Decimal(0)) for a in agents)
        if request[slot] > largest:
            return (
                f"requested {format_amount(slot, request[slot])} {slot}, but the largest agent "
                f"has {format_amount(slot, largest)}: ask for at most that"
            )
    return "no single agent has all the requested resources at once"
