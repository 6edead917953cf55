"""The Kernel Gateway API (``/api``) on several gateway replicas: any replica serves any kernel.

A Kernel Gateway client (``jupyter lab --gateway-url``, VS Code, a load balancer in front of the
replicas) may send each request to a different replica. A kernel started through replica A is
listed, shown, reached over its websocket, interrupted, restarted and shut down through replica
B, and each replica forgets a kernel that was shut down elsewhere instead of restarting it.

The agent here is a fake one speaking the real wire whose kernels are real ipykernel processes
on this host (no Docker): what is under test is the replicas, not the containers.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import pytest
from jupyter_client.manager import AsyncKernelManager

from backendai_jupyter.common.states import SessionState
from backendai_jupyter.common.wire import CreateKernel

from . import databases
from .inproc import Caller, FakeAgent
from .kernel_helpers import execute_over_websocket
from .test_replicas import on, replicas, until

pytestmark = pytest.mark.skipif(
    not databases.server_url(), reason="replicas need PostgreSQL (make test-postgres runs these)"
)

SPEC = "backendai-python3"


class LocalKernelAgent(FakeAgent):
    """A fake agent whose kernels are real ipykernel processes on this host."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.kernels_by_session: dict[str, AsyncKernelManager] = {}
        self.on_call = self.run_local

    async def run_local(self, method: str, params: dict[str, Any]) -> Any:
        if method == "create_kernel":
            sid = CreateKernel.from_json(params).session_id
            km = self.kernels_by_session[sid] = AsyncKernelManager(kernel_name="python3")
            await km.start_kernel()
            self.report(sid, SessionState.RUNNING, self.connection_of(km))
        elif method == "restart_kernel":
            sid = CreateKernel.from_json(params).session_id
            km = self.kernels_by_session[sid]
            await km.restart_kernel(now=True)  # same ports and key
            self.report(sid, SessionState.RUNNING, self.connection_of(km))
        elif method == "signal_kernel":
            km = self.kernels_by_session[params["session_id"]]
            await km.signal_kernel(getattr(signal, params["signal"]))
        elif method == "destroy_kernel":
            sid = params["session_id"]
            km = self.kernels_by_session.pop(sid, None)
            if km is not None:
                await km.shutdown_kernel(now=True)
            self.report(sid, SessionState.TERMINATED)
        return {"accepted": True}

    @staticmethod
    def connection_of(km: AsyncKernelManager) -> dict[str, Any]:
        info = km.get_connection_info()
        return {**info, "key": info["key"].decode()}

    async def stop(self) -> None:
        for km in self.kernels_by_session.values():
            await km.shutdown_kernel(now=True)
        self.close()


async def run_code(g: Any, who: Caller, kid: str, code: str) -> str:
    """stdout of ``code`` run over the kernel's websocket on replica ``g``."""
    url = f"{g.url}/api/kernels/{kid}/channels"
    headers = {"Authorization": f"token {who.token}"}
    return await asyncio.to_thread(execute_over_websocket, url, code, headers)


def known_to(g: Any, kid: str) -> bool:
    return kid in g.gw.app.settings["kernel_manager"]


async def test_a_kernel_started_through_one_replica_is_served_by_every_other(tmp_path: Path):
    async with replicas(tmp_path) as (a, b):
        agent = LocalKernelAgent(a.url, "host-a", join_token=a.join_token)
        await agent.connect()
        ann = await a.user("ann")
        bob = await a.user("bob")
        ann_b, bob_b = on(b, ann), on(b, bob)
        try:
            started = await ann("POST", "/api/kernels", {"name": SPEC}, auth="token")
            kid = started["id"]
            # The websocket on B waits for the kernel like A's would (it may still be starting).
            assert (await run_code(b, ann_b, kid, "x = 6 * 7; print(x)")).strip() == "42"
            # State is the kernel's: A's websocket sees what B's ran.
            assert (await run_code(a, ann, kid, "print(x + 1)")).strip() == "43"

            listed = await ann_b("GET", "/api/kernels", auth="token")
            assert [k["id"] for k in listed] == [kid]
            model = await ann_b("GET", f"/api/kernels/{kid}", auth="token")
            assert model["name"] == SPEC
            # Someone else's kernel stays invisible on every replica.
            assert await bob_b("GET", "/api/kernels", auth="token") == []
            for path in (f"/api/kernels/{kid}", f"/api/kernels/{kid}/interrupt"):
                method = "GET" if path.endswith(kid) else "POST"
                assert (await bob_b.fetch(method, path, auth="token")).code == 404
            assert (await bob_b.fetch("DELETE", f"/api/kernels/{kid}", auth="token")).code == 404

            # Interrupt and restart through B reach the kernel; the restart keeps its connection.
            assert (await ann_b.fetch("POST", f"/api/kernels/{kid}/interrupt", auth="token")).code == 204
            await ann_b("POST", f"/api/kernels/{kid}/restart", auth="token")
            out = await run_code(b, ann_b, kid, "print('x' in dir())")
            assert out.strip() == "False", "the restart did not give a fresh kernel"
            assert (await run_code(a, ann, kid, "print('after')")).strip() == "after"

            # Shut down through B: gone from both replicas, and A does not restart it.
            resp = await ann_b.fetch("DELETE", f"/api/kernels/{kid}", auth="token")
            assert resp.code == 204, resp.body
            await until(lambda: not known_to(a, kid))
            assert (await ann.fetch("GET", f"/api/kernels/{kid}", auth="token")).code == 404
            assert await ann("GET", "/api/kernels", auth="token") == []
            await asyncio.sleep(4)  # longer than jupyter_client's restarter takes to notice a death
            # One session ever (B restarted it in place), ended, and none started again by A.
            sessions = (await ann("GET", "/v1/sessions"))["sessions"]
            assert [s["state"] for s in sessions] == ["TERMINATED"]
            assert agent.kernels_by_session == {}
        finally:
            await agent.stop()
    # Both held sockets to the kernel: a stopped replica closes them and their context itself
    # (left to jupyter_client's __del__, terminating it on whatever thread collects it could
    # block that thread for good).
    for g in (a, b):
        assert g.gw.app.settings["kernel_manager"].context.closed


async def test_a_kernel_shut_down_through_its_own_replica_is_forgotten_by_the_one_that_adopted_it(
    tmp_path: Path,
):
    async with replicas(tmp_path) as (a, b):
        agent = LocalKernelAgent(a.url, "host-a", join_token=a.join_token)
        await agent.connect()
        ann = await a.user("ann")
        try:
            kid = (await ann("POST", "/api/kernels", {"name": SPEC}, auth="token"))["id"]
            assert (await run_code(b, on(b, ann), kid, "print(1)")).strip() == "1"
            assert known_to(b, kid)
            resp = await ann.fetch("DELETE", f"/api/kernels/{kid}", auth="token")
            assert resp.code == 204, resp.body
            await until(lambda: not known_to(b, kid))
            assert await on(b, ann)("GET", "/api/kernels", auth="token") == []
        finally:
            await agent.stop()


async def test_sessions_of_the_kernel_gateway_api_are_the_same_on_every_replica(tmp_path: Path):
    """``/api/sessions`` (a notebook path and its kernel) lives in the database: a session made
    on A is listed, renamed and deleted on B; another user sees it on neither."""
    async with replicas(tmp_path) as (a, b):
        agent = LocalKernelAgent(a.url, "host-a", join_token=a.join_token)
        await agent.connect()
        ann = await a.user("ann")
        bob = await a.user("bob")
        ann_b, bob_b = on(b, ann), on(b, bob)
        try:
            body = {"path": "work/a.ipynb", "type": "notebook", "name": "", "kernel": {"name": SPEC}}
            made = await ann("POST", "/api/sessions", body, auth="token")
            sid, kid = made["id"], made["kernel"]["id"]
            listed = await ann_b("GET", "/api/sessions", auth="token")
            assert [(s["id"], s["path"], s["kernel"]["id"]) for s in listed] == [(sid, "work/a.ipynb", kid)]
            assert (await run_code(b, ann_b, kid, "print('on b')")).strip() == "on b"
            # Renamed through B, read through A.
            await ann_b("PATCH", f"/api/sessions/{sid}", {"path": "work/b.ipynb"}, auth="token")
            assert (await ann("GET", f"/api/sessions/{sid}", auth="token"))["path"] == "work/b.ipynb"
            # Someone else: nothing, anywhere.
            assert await bob_b("GET", "/api/sessions", auth="token") == []
            assert (await bob_b.fetch("GET", f"/api/sessions/{sid}", auth="token")).code == 404
            assert (await bob.fetch("DELETE", f"/api/sessions/{sid}", auth="token")).code == 404
            # Deleted through B: the session and its kernel are gone from both.
            assert (await ann_b.fetch("DELETE", f"/api/sessions/{sid}", auth="token")).code == 204
            assert await ann("GET", "/api/sessions", auth="token") == []
            await until(lambda: not known_to(a, kid))
            assert agent.kernels_by_session == {}
        finally:
            await agent.stop()
