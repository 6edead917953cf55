"""The life of a kernel session, as stored by the gateway and streamed to clients."""

from __future__ import annotations

import enum


class SessionState(enum.StrEnum):
    """A kernel session's state (see DESIGN.md, "A kernel session's life")."""

    PENDING = "PENDING"
    SCHEDULED = "SCHEDULED"
    PREPARING = "PREPARING"
    CREATING = "CREATING"
    RUNNING = "RUNNING"
    TERMINATING = "TERMINATING"
    TERMINATED = "TERMINATED"
    CANCELLED = "CANCELLED"
    ERROR = "ERROR"
    LOST = "LOST"

    @property
    def is_terminal(self) -> bool:
        """True once the session can never run again."""
        return self in TERMINAL_STATES

    @property
    def holds_resources(self) -> bool:
        """True while the session's allocation on its agent is in use."""
        return self in ALLOCATED_STATES


TERMINAL_STATES = frozenset(
    {SessionState.TERMINATED, SessionState.CANCELLED, SessionState.ERROR, SessionState.LOST}
)
ALLOCATED_STATES = frozenset(
    {
        SessionState.SCHEDULED,
        SessionState.PREPARING,
        SessionState.CREATING,
        SessionState.RUNNING,
        SessionState.TERMINATING,
    }
)

# The order a launch moves through; an agent's report never moves a session backwards.
_LAUNCH_ORDER = {
    SessionState.PENDING: 0,
    SessionState.SCHEDULED: 1,
    SessionState.PREPARING: 2,
    SessionState.CREATING: 3,
    SessionState.RUNNING: 4,
    SessionState.TERMINATING: 5,
}


def is_forward(current: SessionState, new: SessionState) -> bool:
    """Whether moving from ``current`` to ``new`` is allowed."""
    if current.is_terminal:
        return False
    if new.is_terminal:
        return True
    return _LAUNCH_ORDER[new] > _LAUNCH_ORDER[current]
