"""Placement: the cluster's books, scheduling policies and agent selectors."""

from .cluster import AgentState, Allocation, Cluster, validate_request
from .placement import POLICIES, SELECTORS, Decision, Request, choose, run_pass, with_position


def normalize_image(name: str) -> str:
    """``name`` with ``:latest`` when it names no tag or digest."""
    last = name.rsplit("/", 1)[-1]
    return name if ":" in last or "@" in last else f"{name}:latest"


__all__ = [
    "POLICIES",
    "SELECTORS",
    "AgentState",
    "Allocation",
    "Cluster",
    "Decision",
    "Request",
    "choose",
    "normalize_image",
    "run_pass",
    "validate_request",
    "with_position",
]
