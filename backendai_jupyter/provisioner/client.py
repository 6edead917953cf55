"""A /v1 client that lives on its own thread and event loop.

jupyter_client runs a provisioner on whatever loop the caller has; a blocking
``KernelManager`` (``jupyter console``) only runs that loop while a call is in progress. Session
state pushed by the gateway must arrive in between, so the client's sockets live on a
background thread and callers await its results with :func:`asyncio.wrap_future`.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import threading
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from typing import Any, TypeVar

from tornado import httpclient, websocket

from ..common import signing
from ..common.clientconfig import ClientConfig
from ..common.errors import ApiError
from ..common.states import SessionState
from ..common.tls import ENV_CA_FILE, client_context, untrusted

T = TypeVar("T")
CA_SETTING = f"ca_file in the client config (or {ENV_CA_FILE})"


class GatewayUnreachable(ApiError):
    status = 503
    type = "gateway-unreachable"


class SessionWatch:
    """The last pushed state of one session and everyone waiting for a change."""

    def __init__(self) -> None:
        self.event: dict[str, Any] = {}
        self.changed = asyncio.Condition()
        self.task: asyncio.Task[None] | None = None

    @property
    def state(self) -> SessionState | None:
        return SessionState(self.event["state"]) if self.event else None


class SessionWatcher:
    """Live session state, pushed by the gateway: each session's last event and its waiters.

    How events arrive (:meth:`_follow`) and where coroutines run (:meth:`submit`) are up to the
    subclass: a websocket on a private thread (:class:`GatewayClient`), or the gateway's own
    event hub when the gateway starts kernels itself.
    """

    _loop: asyncio.AbstractEventLoop

    def __init__(self) -> None:
        self._watches: dict[str, SessionWatch] = {}

    def submit(self, coro: Coroutine[Any, Any, T]) -> Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    async def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Await ``coro`` on the client's loop from any loop."""
        return await asyncio.wrap_future(self.submit(coro))

    async def request(self, method: str, path: str, body: Any = None, timeout: float = 60.0) -> Any:
        raise NotImplementedError

    async def _follow(self, sid: str, w: SessionWatch) -> None:
        raise NotImplementedError

    @staticmethod
    async def _tell(w: SessionWatch, event: dict[str, Any]) -> bool:
        """Record a newer event; True once the session is over."""
        if w.event and "seq" in w.event and event.get("seq", 0) < w.event["seq"]:
            return False  # older than what was told already
        async with w.changed:
            w.event = event
            w.changed.notify_all()
        return bool(w.state and w.state.is_terminal)

    def watch(self, sid: str) -> SessionWatch:
        """Start (once) following the session's events; returns its watch."""
        w = self._watches.get(sid)
        if w is None:
            w = self._watches[sid] = SessionWatch()
            w.task = asyncio.ensure_future(self._follow(sid, w))
        return w

    async def wait_for(
        self, sid: str, done: Callable[[SessionWatch], bool], timeout: float | None = None
    ) -> SessionWatch:
        """Wait until ``done(watch)`` holds for the session."""
        w = self.watch(sid)
        async with w.changed:
            await asyncio.wait_for(w.changed.wait_for(lambda: done(w)), timeout)
        return w

    def cached_state(self, sid: str) -> dict[str, Any]:
        """The last event seen for a session (no I/O; safe from any thread)."""
        w = self._watches.get(sid)
        return dict(w.event) if w else {}

    def forget(self, sid: str) -> None:
        w = self._watches.pop(sid, None)
        if w and w.task:
            self._loop.call_soon_threadsafe(w.task.cancel)


class GatewayClient(SessionWatcher):
    """Signed requests to the gateway and live session state, on a private thread."""

    _instances: dict[tuple[str, str, str], GatewayClient] = {}
    _lock = threading.Lock()

    def __init__(self, config: ClientConfig) -> None:
        super().__init__()
        self.config = config
        self.base = config.url.rstrip("/")
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="backendai-client", daemon=True)
        self._thread.start()
        self._ssl: ssl.SSLContext | None = None

    @classmethod
    def instance(cls, config: ClientConfig) -> GatewayClient:
        """One client (one thread) per gateway and keypair in a process."""
        key = (config.url, config.access_key, config.ca_file)
        with cls._lock:
            if key not in cls._instances:
                cls._instances[key] = cls(config)
            return cls._instances[key]

    # -- requests (these run on the client thread) ---------------------------------------------

    def _headers(self, method: str, path: str, body: bytes) -> dict[str, str]:
        h = signing.sign(self.config.access_key, self.config.secret_key, method, path, body)
        h["Content-Type"] = "application/json"
        return h

    def _ssl_options(self) -> ssl.SSLContext | None:
        """A context that verifies an https gateway against the configured CA (none for http)."""
        if not self.base.startswith("https:"):
            return None
        if self._ssl is None:
            self._ssl = client_context(self.config.ca_file, CA_SETTING)
        return self._ssl

    async def request(self, method: str, path: str, body: Any = None, timeout: float = 60.0) -> Any:
        data = json.dumps(body).encode() if body is not None else b""
        req = httpclient.HTTPRequest(
            self.base + path,
            method=method,
            headers=self._headers(method, path, data),
            body=data if method in ("POST", "PUT", "PATCH") else None,
            request_timeout=timeout,
            connect_timeout=10,
            ssl_options=self._ssl_options(),
        )
        try:
            resp = await httpclient.AsyncHTTPClient().fetch(req, raise_error=False)
        except ssl.SSLCertVerificationError as e:
            raise untrusted(self.base, self.config.ca_file, CA_SETTING, e) from None
        except OSError as e:
            raise self.unreachable(e) from None
        if resp.code == 599:
            raise self.unreachable(resp.error)
        payload = json.loads(resp.body) if resp.body else None
        if resp.code >= 400:
            if isinstance(payload, dict) and "title" in payload:
                raise ApiError.from_json(payload)
            raise ApiError(f"gateway answered HTTP {resp.code}", status=resp.code)
        return payload

    def unreachable(self, err: Any) -> GatewayUnreachable:
        return GatewayUnreachable(
            f"the Backend.AI gateway at {self.base} is not reachable ({err}). Start it with "
            "`backendai-jupyter up`, or point the client at the right URL (BACKENDAI_GATEWAY_URL, or "
            "the client config file)."
        )

    # -- watching sessions -----------------------------------------------------------------------

    async def _follow(self, sid: str, w: SessionWatch) -> None:
        path = f"/v1/sessions/{sid}/events"
        ws_base = self.base.replace("http", "ws", 1)
        delay = 0.1
        while True:
            try:
                headers = self._headers("GET", path, b"")
                if "seq" in w.event:  # coming back: every change since the last one seen
                    headers["Last-Event-ID"] = str(w.event["seq"])
                req = httpclient.HTTPRequest(ws_base + path, headers=headers, ssl_options=self._ssl_options())
                conn = await websocket.websocket_connect(req)
                delay = 0.1
                while True:
                    raw = await conn.read_message()
                    if raw is None:
                        break
                    if await self._tell(w, json.loads(raw)):
                        conn.close()
                        return
            except httpclient.HTTPClientError as e:
                if e.code == 404:  # the session is gone
                    gone = {"state": "TERMINATED", "reason": "the gateway no longer knows this session"}
                    await self._tell(w, {**w.event, "session_id": sid, **gone})
                    return
            except OSError:
                pass
            await asyncio.sleep(delay)
            delay = min(delay * 2, 3.0)
