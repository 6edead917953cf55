"""/v1/sessions: create, list, read, delete, interrupt, signal and restart kernel sessions."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from tornado import websocket

from ...common.errors import ApiError
from ..requests import SessionRequest, SignalRequest
from ..vfolders.service import resolve_mounts
from .base import ApiHandler, AuthMixin


class SessionsHandler(ApiHandler):
    async def get(self) -> None:
        all_users = self.get_query_argument("all", "") in ("1", "true")
        active = self.get_query_argument("active", "") in ("1", "true")
        self.write_json(
            {"sessions": await self.sessions.list(self.current_user, all_users=all_users, active_only=active)}
        )

    async def post(self) -> None:
        req = self.body_as(SessionRequest, rules=self.settings["resource_rules"])
        # Refused here, before anything is placed, when the user may not mount one of them.
        mounts, working_dir = await resolve_mounts(
            self.settings["vfolders"], self.current_user, list(req.mounts), req.working_dir
        )
        model = await self.sessions.create(self.current_user, self.access_key, req, mounts, working_dir)
        self.set_header("Location", f"/v1/sessions/{model['id']}")
        self.write_json(model, status=201)


class SessionHandler(ApiHandler):
    async def get(self, sid: str) -> None:
        row = await self.sessions.get_row(self.current_user, sid)
        model = self.sessions.describe(row, with_connection=row.owner_id == self.current_user.id)
        model["transitions"] = await self.sessions.transitions(sid)
        self.write_json(model)

    async def delete(self, sid: str) -> None:
        self.write_json(await self.sessions.destroy(self.current_user, sid))


class InterruptHandler(ApiHandler):
    async def post(self, sid: str) -> None:
        await self.sessions.signal(self.current_user, sid, "SIGINT")
        self.set_status(204)
        self.finish()


class SignalHandler(ApiHandler):
    async def post(self, sid: str) -> None:
        req = self.body_as(SignalRequest)
        await self.sessions.signal(self.current_user, sid, req.signal)
        self.set_status(204)
        self.finish()


class RestartHandler(ApiHandler):
    async def post(self, sid: str) -> None:
        self.write_json(await self.sessions.restart(self.current_user, sid))


class SessionEventsHandler(AuthMixin, websocket.WebSocketHandler):
    """A websocket of one session's state changes: the current state first, then each change.

    A client that comes back with ``Last-Event-ID: SEQ`` (the ``seq`` of the last event it
    received; or ``?last_event_id=SEQ``) gets every change after it instead of the current
    state, so nothing that happened while it was away is lost, on whichever replica it lands.
    """

    _queue: asyncio.Queue[dict[str, Any]] | None = None
    _pump: asyncio.Task[None] | None = None

    async def get(self, sid: str) -> None:  # type: ignore[override]
        try:
            await self.authenticate()
            await self.verify_signature(self.request.body or b"")
            row = await self.settings["sessions"].get_row(self.current_user, sid)
        except ApiError as e:
            self.set_status(e.status)
            self.set_header("Content-Type", "application/json")
            self.finish(json.dumps(e.to_json()))
            return
        self.sid = sid
        self.owner = row.owner_id
        hub = self.settings["hub"]
        # Subscribe before reading the snapshot so no change can fall between the two.
        self._queue = hub.subscribe(sid)
        try:
            await super().get(sid)
        finally:
            if self.ws_connection is None:  # no upgrade (not a websocket request): on_close never runs
                hub.unsubscribe(self._queue)
                self._queue = None

    async def open(self, sid: str) -> None:  # type: ignore[override]
        self.set_nodelay(True)
        self.settings["sessions"].stream_opened(sid)
        self._counted = True
        sessions = self.settings["sessions"]
        resume = self._last_event_id()
        if resume is None:
            told = [await sessions.snapshot(self.current_user, sid)]
        else:  # a client coming back: every change after the last one it saw, in order
            told = await sessions.events_after(self.current_user, sid, resume)
        for event in told:
            self._send(event)
        self._pump = asyncio.ensure_future(self._forward(told[-1]["seq"] if told else resume or 0))

    def _last_event_id(self) -> int | None:
        """The ``Last-Event-ID`` header (or ``last_event_id`` query argument), if any."""
        raw = self.request.headers.get("Last-Event-ID") or self.get_query_argument("last_event_id", "")
        return int(raw) if raw.isascii() and raw.isdigit() else None

    def _send(self, event: dict[str, Any]) -> None:
        if self.owner != self.current_user.id:
            event = {k: v for k, v in event.items() if k != "connection"}
        self.write_message(json.dumps(event))

    async def _forward(self, after: int) -> None:
        assert self._queue is not None
        try:
            while True:
                event = await self._queue.get()
                # Changes already told (in the snapshot, or published twice) are skipped, so the
                # story only moves forward. A moved place in line repeats the last transition's
                # seq and goes out unless a newer change has.
                if event["seq"] > after or ("requests_ahead" in event and event["seq"] == after):
                    after = event["seq"]
                    self._send(event)
        except websocket.WebSocketClosedError:
            pass

    def on_message(self, message: str | bytes) -> None:
        pass  # clients only listen

    def on_close(self) -> None:
        if getattr(self, "_counted", False):
            self.settings["sessions"].stream_closed(self.sid)
        if self._queue is not None:
            self.settings["hub"].unsubscribe(self._queue)
        if self._pump:
            self._pump.cancel()
