"""The provisioner's client for kernels the gateway starts itself (the Kernel Gateway API).

The same provisioner that runs in users' Jupyter servers starts ``/api`` kernels, but its
requests go straight to the session service in this process, as the kernel's owner, and its
session events come from the gateway's own event hub: no loopback HTTP, no signature, and no
user's secret key read from the database to make one.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from typing import Any, TypeVar

from ..common.errors import ApiError, NotFound
from ..provisioner.client import SessionWatch, SessionWatcher
from .models import User
from .requests import SessionRequest, SignalRequest
from .vfolders.service import resolve_mounts

T = TypeVar("T")

_SESSION = re.compile(r"^/v1/sessions/(?P<sid>[0-9a-f-]{36})(?:/(?P<action>interrupt|signal|restart))?$")


class ServiceClient(SessionWatcher):
    """Requests of one owner's kernels, answered by the session service in process."""

    def __init__(self, sessions: Any, vfolders: Any, rules: Any, owner: User, access_key: str) -> None:
        super().__init__()
        self._loop = asyncio.get_running_loop()
        self.sessions = sessions
        self.vfolders = vfolders
        self.rules = rules
        self.owner = owner
        self.access_key = access_key
        # Called with each event of a followed session (the kernel manager learns of ends that
        # came from elsewhere: another replica, /v1, an admin).
        self.on_event: Callable[[str, dict[str, Any]], None] | None = None
        # The id of the first session this client created, once its row is in the database.
        self.created: asyncio.Future[str] = self._loop.create_future()

    def submit(self, coro: Coroutine[Any, Any, T]) -> Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    async def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return await coro  # the provisioner runs on the gateway's own loop

    async def request(self, method: str, path: str, body: Any = None, timeout: float = 60.0) -> Any:
        sessions, user = self.sessions, self.owner
        if (method, path) == ("POST", "/v1/sessions"):
            req = SessionRequest.from_json(body, rules=self.rules)
            mounts, working_dir = await resolve_mounts(self.vfolders, user, list(req.mounts), req.working_dir)
            model = await sessions.create(user, self.access_key, req, mounts, working_dir)
            if not self.created.done():
                self.created.set_result(model["id"])
            return model
        match = _SESSION.match(path)
        if match is None:
            raise ApiError(f"no route for {method} {path}", status=404)
        sid, action = match["sid"], match["action"]
        if method == "DELETE" and action is None:
            return await sessions.destroy(user, sid)
        if method == "POST" and action == "interrupt":
            return await sessions.signal(user, sid, "SIGINT")
        if method == "POST" and action == "signal":
            return await sessions.signal(user, sid, SignalRequest.from_json(body).signal)
        if method == "POST" and action == "restart":
            return await sessions.restart(user, sid)
        raise ApiError(f"no route for {method} {path}", status=405)

    async def _follow(self, sid: str, w: SessionWatch) -> None:
        """The session's events from the hub: its state now, then each change, until it is over.

        While followed, the session counts as watched by its client (a bound session ends
        when nobody follows it any more, here or on any replica).
        """
        hub, sessions = self.sessions.hub, self.sessions
        queue = hub.subscribe(sid)
        sessions.stream_opened(sid)
        try:
            try:
                first = await sessions.snapshot(self.owner, sid)
            except NotFound:
                gone = {"state": "TERMINATED", "reason": "the gateway no longer knows this session"}
                await self._tell(w, {"session_id": sid, **gone})
                return
            event = first
            while True:
                over = await self._tell(w, event)
                if self.on_event is not None:
                    self.on_event(sid, event)
                if over:
                    return
                event = await queue.get()
        finally:
            hub.unsubscribe(queue)
            sessions.stream_closed(sid)
