"""The gateway in the test's own process, and a fake agent that speaks the real wire.

For session logic, tenancy and the agent protocol no container is needed: a :class:`FakeAgent`
connects over the agent websocket exactly as an agent does, registers, heartbeats and answers
orders the way a test tells it to. Docker is used only where the container is the point.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

from tornado import httpclient, websocket
from tornado.iostream import StreamClosedError

from backendai_jupyter.agent.app import FIRST_RETRY
from backendai_jupyter.agent.gateways import others
from backendai_jupyter.common import signing
from backendai_jupyter.common.slots import ResourceSlot
from backendai_jupyter.common.states import SessionState
from backendai_jupyter.common.wire import (
    AGENT_ID_HEADER,
    AGENT_KEY_HEADER,
    AGENT_RECONNECT_MAX,
    AGENT_WS_PATH,
    JOIN_TOKEN_HEADER,
    AgentRegistration,
    CreateKernel,
    Device,
    ImageInfo,
    KernelReport,
)
from backendai_jupyter.gateway.app import Gateway

from .stack import free_port

IMAGE = "backendai-jupyter/python:latest"
KERNEL_LABEL = {
    "language": "python",
    "display_name": "Python 3",
    "argv": ["python", "-f", "{connection_file}"],
}


class Caller:
    """A user of the in-process gateway: signed /v1 requests and token requests."""

    def __init__(self, url: str, creds: dict[str, Any]) -> None:
        self.url = url
        self.creds = creds
        self.http = httpclient.AsyncHTTPClient()

    @property
    def token(self) -> str:
        return str(self.creds["token"])

    def signed(self, method: str, path: str, body: bytes = b"") -> dict[str, str]:
        return signing.sign(self.creds["access_key"], self.creds["secret_key"], method, path, body)

    async def fetch(
        self, method: str, path: str, body: Any = None, *, auth: str = "sign", raw: bytes | None = None
    ) -> httpclient.HTTPResponse:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else b"")
        if auth == "sign":
            headers = self.signed(method, path, data)
        elif auth == "token":
            headers = {"Authorization": f"token {self.token}"}
        else:
            headers = {}
        headers["Content-Type"] = "application/json"
        return await self.http.fetch(
            self.url + path,
            method=method,
            headers=headers,
            body=data if method in ("POST", "PUT", "PATCH") else None,
            allow_nonstandard_methods=True,
            raise_error=False,
            request_timeout=30,
        )

    async def __call__(self, method: str, path: str, body: Any = None, *, auth: str = "sign") -> Any:
        resp = await self.fetch(method, path, body, auth=auth)
        assert resp.code < 400, f"{method} {path}: {resp.code} {resp.body!r}"
        return json.loads(resp.body) if resp.body else None

    async def stream(self, sid: str, last_event_id: int | None = None) -> websocket.WebSocketClientConnection:
        """Open the session's event stream, as the provisioner and the launcher do."""
        path = f"/v1/sessions/{sid}/events"
        headers = self.signed("GET", path)
        if last_event_id is not None:
            headers["Last-Event-ID"] = str(last_event_id)
        req = httpclient.HTTPRequest(self.url.replace("http", "ws", 1) + path, headers=headers)
        return await websocket.websocket_connect(req)

    async def wait_state(self, sid: str, states: set[str], timeout: float = 10) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            while True:
                model = await self("GET", f"/v1/sessions/{sid}")
                if model["state"] in states:
                    return model
                await asyncio.sleep(0.05)


class FakeAgent:
    """An agent process's side of the wire, with orders answered by ``on_call``."""

    def __init__(
        self,
        url: str,
        agent_id: str,
        *,
        join_token: str = "",
        key: str | None = None,
        cpu: str = "4",
        mem: str = "8g",
        kernels: list[KernelReport] | None = None,
        register_as: str | None = None,
        devices: list[Device] | None = None,
    ) -> None:
        self.url, self.agent_id, self.join_token = url, agent_id, join_token
        # The id the registration message names (an honest agent: the one it authenticates as).
        self.register_as = register_as or agent_id
        self.key = key if key is not None else secrets.token_urlsafe(32)
        self.capacity = ResourceSlot.parse({"cpu": cpu, "mem": mem})
        self.kernels = kernels or []
        self.devices = devices or []
        self.images: list[tuple[str, dict[str, Any]]] = [(IMAGE, KERNEL_LABEL)]
        self.logos: dict[str, str] = {}  # image tag → its logo label (base64 PNG)
        self.calls: list[tuple[str, dict[str, Any]]] = []
        # Answers an order: return a result, or raise to reply with an error. Default: a kernel
        # that starts at once and is reported RUNNING.
        self.on_call: Callable[[str, dict[str, Any]], Any] = self.run_kernels
        self.ws: websocket.WebSocketClientConnection | None = None
        self.registered: dict[str, Any] = {}
        self._pump: asyncio.Task[None] | None = None

    def headers(self) -> dict[str, str]:
        h = {AGENT_ID_HEADER: self.agent_id, AGENT_KEY_HEADER: self.key}
        if self.join_token:
            h[JOIN_TOKEN_HEADER] = self.join_token
        return h

    def registration(self) -> AgentRegistration:
        """What it says when it registers."""
        return AgentRegistration(
            agent_id=self.register_as,
            address="127.0.0.1",
            capacity=self.capacity,
            images=[
                ImageInfo(id=f"sha256:fake{i}", tags=[t], kernel=k, logo=self.logos.get(t, ""))
                for i, (t, k) in enumerate(self.images)
            ],
            kernels=self.kernels,
            devices=self.devices,
        )

    async def connect(self) -> dict[str, Any]:
        """Connect and register; returns the gateway's ``registered`` message."""
        ws_url = self.url.replace("http", "ws", 1) + AGENT_WS_PATH
        self.ws = await websocket.websocket_connect(httpclient.HTTPRequest(ws_url, headers=self.headers()))
        reg = self.registration()
        await self.ws.write_message(json.dumps({"type": "register", "agent": reg.to_json()}))
        raw = await self.ws.read_message()
        assert raw is not None, "the gateway closed the agent connection"
        self.registered = json.loads(raw)
        self._pump = asyncio.ensure_future(self._serve())
        return self.registered

    async def _serve(self) -> None:
        assert self.ws is not None
        while True:
            raw = await self.ws.read_message()
            if raw is None:
                return
            msg = json.loads(raw)
            if msg.get("type") == "call":
                asyncio.ensure_future(self._answer(msg))

    async def _answer(
        self, msg: dict[str, Any], ws: websocket.WebSocketClientConnection | None = None
    ) -> None:
        """Answer an order on ``ws``, the link it came on (by default the current one)."""
        self.calls.append((msg["method"], msg["params"]))
        reply: dict[str, Any] = {"type": "reply", "id": msg["id"]}
        try:
            result = self.on_call(msg["method"], msg["params"])
            if asyncio.iscoroutine(result):
                result = await result
            reply["result"] = result
        except Exception as e:
            reply["error"] = {"type": "agent-error", "title": str(e), "status": 502}
        ws = ws or self.ws
        assert ws is not None
        await ws.write_message(json.dumps(reply))

    def run_kernels(self, method: str, params: dict[str, Any]) -> Any:
        """Orders succeed; a created kernel is reported RUNNING, a destroyed one TERMINATED."""
        if method == "create_kernel":
            order = CreateKernel.from_json(params)
            asyncio.get_running_loop().call_soon(self.report, order.session_id, SessionState.RUNNING)
        elif method == "destroy_kernel":
            asyncio.get_running_loop().call_soon(self.report, params["session_id"], SessionState.TERMINATED)
        return {"accepted": True}

    def kernel_report(
        self, sid: str, state: SessionState, connection: dict[str, Any] | None = None
    ) -> KernelReport:
        if connection is None and state == SessionState.RUNNING:
            # Complete, as jupyter_client checks it; nothing listens there (no kernel is run).
            connection = {
                "ip": "127.0.0.1",
                "transport": "tcp",
                "signature_scheme": "hmac-sha256",
                "key": "k" * 32,
                **{f"{ch}_port": 1 for ch in ("shell", "iopub", "stdin", "control", "hb")},
            }
        return KernelReport(sid, state, "reported by the fake agent", connection)

    def report(self, sid: str, state: SessionState, connection: dict[str, Any] | None = None) -> None:
        report = self.kernel_report(sid, state, connection)
        assert self.ws is not None
        self.ws.write_message(json.dumps({"type": "kernel", "report": report.to_json()}))

    async def heartbeat(self) -> None:
        assert self.ws is not None
        await self.ws.write_message(json.dumps({"type": "heartbeat", "device_stats": []}))

    def close(self) -> None:
        if self._pump:
            self._pump.cancel()
        if self.ws is not None:
            self.ws.close()


class RoamingAgent(FakeAgent):
    """A fake agent that keeps its link the way the agent process does (``Agent._keep_linked``).

    It lists several gateway URLs (replicas) and links to the first that answers. When a link it
    registered on drops (its gateway died), it tries the others at once, then goes round all of
    them with a growing pause. It heartbeats at the interval the gateway names, and every
    registration tells the kernels it runs, as the agent's snapshot does: the gateway then keeps
    their sessions instead of ending them as vanished.
    """

    def __init__(self, urls: Sequence[str], agent_id: str, **kw: Any) -> None:
        super().__init__(urls[0], agent_id, **kw)
        self.urls = list(urls)
        self.linked_to = ""  # the gateway its link is registered with now ("" while none)
        self.registrations: list[tuple[float, str]] = []  # (time.monotonic(), gateway URL), each one
        self.running: dict[str, KernelReport] = {}  # what it runs: reported RUNNING and not ended since
        self.dropped: list[KernelReport] = []  # reports made while no registration was answered
        self._keeper: asyncio.Task[None] | None = None
        self._registered = asyncio.Event()  # set, and replaced, at each registration

    async def start(self, timeout: float = 10) -> None:
        """Start keeping the link; return once it is registered."""
        self._keeper = asyncio.ensure_future(self._keep_linked())
        await self.registered_after(0.0, timeout)

    async def registered_after(self, since: float, timeout: float = 10) -> str:
        """Wait for a registration later than ``since`` (``time.monotonic()``); its gateway's URL."""
        async with asyncio.timeout(timeout):
            while not (self.registrations and self.registrations[-1][0] > since and self.linked_to):
                await self._registered.wait()
        return self.registrations[-1][1]

    def registration(self) -> AgentRegistration:
        reg = super().registration()
        reg.kernels = [*self.kernels, *self.running.values()]
        return reg

    def report(self, sid: str, state: SessionState, connection: dict[str, Any] | None = None) -> None:
        report = self.kernel_report(sid, state, connection)
        if state == SessionState.RUNNING:
            self.running[sid] = report
        elif state.is_terminal:
            self.running.pop(sid, None)
        if self.ws is None or not self.linked_to:
            # Dropped, as the agent drops reports until its registration is answered: the next
            # registration tells what it runs.
            self.dropped.append(report)
            return
        with contextlib.suppress(websocket.WebSocketClosedError):
            self.ws.write_message(json.dumps({"type": "kernel", "report": report.to_json()}))

    async def _keep_linked(self) -> None:
        tries, delay = self.urls, FIRST_RETRY
        while True:
            for url in tries:
                ws_url = url.replace("http", "ws", 1) + AGENT_WS_PATH
                req = httpclient.HTTPRequest(ws_url, headers=self.headers(), connect_timeout=5)
                try:
                    ws = await websocket.websocket_connect(req)
                except (OSError, httpclient.HTTPClientError, StreamClosedError):
                    continue
                if await self._serve_link(ws, url):
                    break  # it was registered there: its link dropped
            else:
                await asyncio.sleep(delay)
                tries, delay = self.urls, min(delay * 2, AGENT_RECONNECT_MAX)
                continue
            tries, delay = others(self.urls, url) or self.urls, FIRST_RETRY

    async def _serve_link(self, ws: websocket.WebSocketClientConnection, url: str) -> bool:
        """Register on ``ws`` and answer orders until it closes; whether it was registered."""
        self.ws, self.url = ws, url
        heartbeat: asyncio.Task[None] | None = None
        try:
            await ws.write_message(json.dumps({"type": "register", "agent": self.registration().to_json()}))
            while (raw := await ws.read_message()) is not None:
                msg = json.loads(raw)
                if msg.get("type") == "registered":
                    self.registered, self.linked_to = msg, url
                    self.registrations.append((time.monotonic(), url))
                    self._registered.set()
                    self._registered = asyncio.Event()
                    heartbeat = asyncio.ensure_future(
                        self._beat(ws, float(msg.get("heartbeat_interval", 5.0)))
                    )
                elif msg.get("type") == "call":
                    asyncio.ensure_future(self._answer(msg, ws))
        except websocket.WebSocketClosedError:
            pass
        finally:
            if heartbeat is not None:
                heartbeat.cancel()
            self.linked_to = ""
            ws.close()
        return heartbeat is not None

    async def _beat(self, ws: websocket.WebSocketClientConnection, interval: float) -> None:
        with contextlib.suppress(websocket.WebSocketClosedError):
            while True:
                await asyncio.sleep(interval)
                await ws.write_message(json.dumps({"type": "heartbeat", "device_stats": []}))

    async def _answer(
        self, msg: dict[str, Any], ws: websocket.WebSocketClientConnection | None = None
    ) -> None:
        with contextlib.suppress(websocket.WebSocketClosedError):  # its link died meanwhile
            await super()._answer(msg, ws)

    def close(self) -> None:
        if self._keeper is not None:
            self._keeper.cancel()
        if self.ws is not None:
            self.ws.close()


class InprocGateway:
    """A started :class:`Gateway` and the callers a test needs."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self.url = gw.url
        self.admin = Caller(self.url, gw.admin_credentials())

    @property
    def join_token(self) -> str:
        return self.gw.agent_token

    async def user(self, name: str, **extra: Any) -> Caller:
        """A new user (an ordinary one unless ``is_admin``)."""
        return Caller(self.url, await self.admin("POST", "/v1/admin/users", {"name": name, **extra}))

    async def agent(self, agent_id: str, **kw: Any) -> FakeAgent:
        a = FakeAgent(self.url, agent_id, join_token=self.join_token, **kw)
        await a.connect()
        return a


@contextlib.asynccontextmanager
async def running_gateway(tmp: Path, **traits: Any) -> AsyncIterator[InprocGateway]:
    """A gateway with its own data directory (a free port unless given), stopped afterwards.

    Replicas are gateways given the same ``tmp`` (their shared data directory) and database.
    """
    traits.setdefault("port", free_port())
    # Fake agents send no heartbeats by themselves: on a slow machine a test could outlast the
    # default 20 s and lose its agent midway. Tests of agent loss set their own timeout.
    traits.setdefault("heartbeat_timeout", 120)
    gw = Gateway(data_dir=str(tmp / "gw"), **traits)
    await gw.start()
    try:
        yield InprocGateway(gw)
    finally:
        await gw.stop()
