"""Stopping background tasks for good."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

log = logging.getLogger(__name__)


async def cancel_and_wait(tasks: Iterable[asyncio.Task[object] | None], timeout: float = 10.0) -> None:
    """Cancel ``tasks`` and wait (at most ``timeout`` seconds) until each has ended.

    A task that was only cancelled still runs until it sees the cancellation: one holding a
    database connection would close it after the engine is disposed of, which can wait forever.
    """
    me = asyncio.current_task()
    running = [t for t in tasks if t is not None and t is not me and not t.done()]
    for t in running:
        t.cancel()
    if not running:
        return
    _, pending = await asyncio.wait(running, timeout=timeout)
    for t in pending:
        log.warning("a background task did not end within %.0f s of its cancellation: %r", timeout, t)
