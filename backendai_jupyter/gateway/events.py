"""In-process fan-out of session events to the websocket streams that watch them."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

Event = dict[str, Any]


class EventHub:
    """Subscribers get every event their filter accepts, in publish order."""

    def __init__(self) -> None:
        self._subs: list[tuple[Callable[[Event], bool], asyncio.Queue[Event]]] = []

    def subscribe(self, accept: Callable[[Event], bool]) -> asyncio.Queue[Event]:
        """A queue that receives the accepted events until :meth:`unsubscribe`."""
        queue: asyncio.Queue[Event] = asyncio.Queue()
        self._subs.append((accept, queue))
        return queue

    @property
    def subscribers(self) -> int:
        """How many queues are subscribed (each open event stream holds one)."""
        return len(self._subs)

    def unsubscribe(self, queue: asyncio.Queue[Event]) -> None:
        self._subs = [(a, q) for a, q in self._subs if q is not queue]

    def publish(self, event: Event) -> None:
        for accept, queue in self._subs:
            if accept(event):
                queue.put_nowait(event)
