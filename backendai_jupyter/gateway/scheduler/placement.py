"""One scheduling pass: order the pending requests (policy), pick agents (selector), explain waits.

Policies decide *who goes first*: ``fifo`` (arrival order) or ``drf`` (dominant-resource
fairness: the user holding the smallest dominant share of the cluster goes next). Selectors
decide *where*: ``concentrated`` packs kernels onto the fullest agent that fits (keeps whole
GPUs and large blocks free), ``dispersed`` spreads them onto the emptiest. ``auto`` packs GPU
requests and spreads CPU-only ones. A request that does not fit is passed over, so smaller
requests behind it still start, and it is told why it waits and how many are ahead of it.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal

from ...common.slots import ResourceSlot
from .cluster import Allocation, Cluster, slot_kind

POLICIES = ("fifo", "drf")
SELECTORS = ("auto", "concentrated", "dispersed")


@dataclass
class Request:
    """A pending session, as the scheduler sees it."""

    session_id: str
    user_id: str
    resources: ResourceSlot
    image: str
    seq: int  # arrival order
    prefer_agent: str | None = None


@dataclass
class Decision:
    request: Request
    allocation: Allocation | None
    reason: str = ""
    ahead: int = 0  # waiting requests the policy serves before this one


def wants_accelerators(request: ResourceSlot) -> bool:
    return any(slot_kind(s) in ("device", "shares") and v > 0 for s, v in request.items())


def choose(cluster: Cluster, request: Request, selector: str) -> Allocation | None:
    """The allocation for ``request`` on the agent the selector prefers, or None."""
    if selector == "auto":
        selector = "concentrated" if wants_accelerators(request.resources) else "dispersed"
    return cluster.select(
        request.resources, request.image, selector == "dispersed", request.user_id, request.prefer_agent
    )


def order(requests: list[Request], policy: str, cluster: Cluster) -> Iterator[Request]:
    """Pending requests in the order the policy serves them (DRF shares update as it goes)."""
    if policy == "fifo":
        yield from sorted(requests, key=lambda r: r.seq)
        return
    capacity = ResourceSlot()
    for a in cluster.agents.values():
        capacity = capacity + a.capacity
    held: dict[str, ResourceSlot] = {}
    for alloc in cluster.allocations.values():
        held[alloc.user_id] = held.get(alloc.user_id, ResourceSlot()) + alloc.resources
    queues: dict[str, deque[Request]] = {}
    for r in sorted(requests, key=lambda r: r.seq):
        queues.setdefault(r.user_id, deque()).append(r)
    heap = [(_dominant(held.get(u, ResourceSlot()), capacity), q[0].seq, u) for u, q in queues.items()]
    heapq.heapify(heap)
    while heap:
        _, _, user = heapq.heappop(heap)
        request = queues[user].popleft()
        yield request
        # If it was placed, the caller recorded the allocation: the user's share grew.
        if request.session_id in cluster.allocations:
            held[user] = held.get(user, ResourceSlot()) + request.resources
        if queues[user]:
            heapq.heappush(
                heap, (_dominant(held.get(user, ResourceSlot()), capacity), queues[user][0].seq, user)
            )


def _dominant(held: ResourceSlot, capacity: ResourceSlot) -> Decimal:
    return max((v / capacity[k] for k, v in held.items() if capacity.get(k, 0) > 0), default=Decimal(0))


def with_position(reason: str, ahead: int) -> str:
    """A waiting reason with the requests ahead in line appended."""
    return f"{reason}; {ahead} request{'s' if ahead > 1 else ''} ahead" if ahead else reason


def run_pass(cluster: Cluster, pending: list[Request], policy: str, selector: str) -> list[Decision]:
    """Place what fits, in policy order; everything else gets its reason and place in line."""
    decisions: list[Decision] = []
    waiting = 0
    for request in order(pending, policy, cluster):
        alloc = choose(cluster, request, selector)
        if alloc is not None:
            cluster.allocate(request.session_id, alloc)
            decisions.append(Decision(request, alloc))
            continue
        reason = "waiting: " + cluster.shortfall_reason(request.resources, request.image)
        decisions.append(Decision(request, None, reason, ahead=waiting))
        waiting += 1
    return decisions
