"""In-process fan-out of session events to the websocket streams that watch them."""

from __future__ import annotations

import asyncio
from typing import Any

Event = dict[str, Any]


class EventHub:
    """Each subscriber gets every event of its session, in publish order.

    Subscriptions are kept by session, so publishing costs the same with one stream open or
    thousands, and a replica can tell whether anyone here watches a session before it reads an
    event another replica announced (:meth:`watched`).
    """

    def __init__(self) -> None:
        self._subs: dict[str, list[asyncio.Queue[Event]]] = {}
        self._session_of: dict[asyncio.Queue[Event], str] = {}

    def subscribe(self, session_id: str) -> asyncio.Queue[Event]:
        """A queue that receives the session's events until :meth:`unsubscribe`."""
        queue: asyncio.Queue[Event] = asyncio.Queue()
        self._subs.setdefault(session_id, []).append(queue)
        self._session_of[queue] = session_id
        return queue

    @property
    def subscribers(self) -> int:
        """How many queues are subscribed (each open event stream holds one)."""
        return len(self._session_of)

    def watched(self, session_id: str) -> bool:
        return session_id in self._subs

    def unsubscribe(self, queue: asyncio.Queue[Event]) -> None:
        sid = self._session_of.pop(queue, None)
        if sid is None:
            return
        queues = self._subs[sid]
        queues.remove(queue)
        if not queues:
            del self._subs[sid]

    def publish(self, event: Event) -> None:
        for queue in self._subs.get(event["session_id"], ()):
            queue.put_nowait(event)
