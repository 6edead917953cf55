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
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from tornado import httpclient, websocket

from backendai_jupyter.common import signing
from backendai_jupyter.common.slots import ResourceSlot
from backendai_jupyter.common.states import SessionState
from backendai_jupyter.common.wire import (
    AGENT_ID_HEADER,
    AGENT_KEY_HEADER,
    AGENT_WS_PATH,
    JOIN_TOKEN_HEADER,
    AgentRegistration,
    CreateKernel,
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

    async def stream(self, sid: str) -> websocket.WebSocketClientConnection:
        """Open the session's event stream, as the provisioner and the launcher do."""
        path = f"/v1/sessions/{sid}/events"
        req = httpclient.HTTPRequest(
            self.url.replace("http", "ws", 1) + path, headers=self.signed("GET", path)
        )
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
    ) -> None:
        self.url, self.agent_id, self.join_token = url, agent_id, join_token
        # The id the registration message names (an honest agent: the one it authenticates as).
        self.register_as = register_as or agent_id
        self.key = key if key is not None else secrets.token_urlsafe(32)
        self.capacity = ResourceSlot.parse({"cpu": cpu, "mem": mem})
        self.kernels = kernels or []
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

    async def connect(self) -> dict[str, Any]:
        """Connect and register; returns the gateway's ``registered`` message."""
        ws_url = self.url.replace("http", "ws", 1) + AGENT_WS_PATH
        self.ws = await websocket.websocket_connect(httpclient.HTTPRequest(ws_url, headers=self.headers()))
        reg = AgentRegistration(
            agent_id=self.register_as,
            address="127.0.0.1",
            capacity=self.capacity,
            images=[
                ImageInfo(id=f"sha256:fake{i}", tags=[t], kernel=k, logo=self.logos.get(t, ""))
                for i, (t, k) in enumerate(self.images)
            ],
            kernels=self.kernels,
        )
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

    async def _answer(self, msg: dict[str, Any]) -> None:
        self.calls.append((msg["method"], msg["params"]))
        reply: dict[str, Any] = {"type": "reply", "id": msg["id"]}
        try:
            result = self.on_call(msg["method"], msg["params"])
            if asyncio.iscoroutine(result):
                result = await result
            reply["result"] = result
        except Exception as e:
            reply["error"] = {"type": "agent-error", "title": str(e), "status": 502}
        assert self.ws is not None
        await self.ws.write_message(json.dumps(reply))

    def run_kernels(self, method: str, params: dict[str, Any]) -> Any:
        """Orders succeed; a created kernel is reported RUNNING, a destroyed one TERMINATED."""
        if method == "create_kernel":
            order = CreateKernel.from_json(params)
            asyncio.get_running_loop().call_soon(self.report, order.session_id, SessionState.RUNNING)
        elif method == "destroy_kernel":
            asyncio.get_running_loop().call_soon(self.report, params["session_id"], SessionState.TERMINATED)
        return {"accepted": True}

    def report(self, sid: str, state: SessionState, connection: dict[str, Any] | None = None) -> None:
        if connection is None and state == SessionState.RUNNING:
            # Complete, as jupyter_client checks it; nothing listens there (no kernel is run).
            connection = {
                "ip": "127.0.0.1",
                "transport": "tcp",
                "signature_scheme": "hmac-sha256",
                "key": "k" * 32,
                **{f"{ch}_port": 1 for ch in ("shell", "iopub", "stdin", "control", "hb")},
            }
        report = KernelReport(sid, state, "reported by the fake agent", connection)
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
    """A gateway with its own data directory (a free port unless given), stopped afterwards."""
    traits.setdefault("port", free_port())
    gw = Gateway(data_dir=str(tmp / "gw"), **traits)
    await gw.start()
    try:
        yield InprocGateway(gw)
    finally:
        await gw.stop()
