"""Kernel sessions, in parts a newcomer can find:

- :mod:`.service`: the API the handlers call (create, list, end, signal, restart, streams);
- :mod:`.store`: state changes as conditional updates, and the queries over session rows;
- :mod:`.policy`: resource policies, checked under a per-user lock;
- :mod:`.scheduling`: the leader's placement passes and sweeps;
- :mod:`.agents`: registrations, reports, loss and drain of agents;
- :mod:`.shapes`: the API model and the versioned events clients receive.
"""

from .policy import PolicyViolation
from .service import DESTROY_RETRY, SIGNALS, STREAM_GRACE, SessionService
from .shapes import EVENT_VERSION, event_of, session_json

__all__ = [
    "DESTROY_RETRY",
    "EVENT_VERSION",
    "SIGNALS",
    "STREAM_GRACE",
    "PolicyViolation",
    "SessionService",
    "event_of",
    "session_json",
]
