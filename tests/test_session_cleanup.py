"""Nothing leaks: a failed removal is retried, an absent agent settles on return, bound sessions end."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from backendai_jupyter.common.states import SessionState
from backendai_jupyter.common.wire import KernelReport

from .inproc import IMAGE, FakeAgent, running_gateway
from .stack import free_port

SMALL = {"cpu": "1", "mem": "256m"}
FAST = {"destroy_retry_interval": 0.2, "client_stream_grace": 0.5, "heartbeat_timeout": 60}


async def test_a_failed_container_removal_is_retried_and_the_session_waits_for_it(tmp_path: Path):
    async with running_gateway(tmp_path, **FAST) as g:
        ann = await g.user("ann")
        agent = await g.agent("host-a")
        sid = (await ann("POST", "/v1/sessions", {"image": IMAGE, "resources": SMALL}))["id"]
        await ann.wait_state(sid, {"RUNNING"})
        failures = 3

        def flaky(method: str, params: dict[str, Any]) -> Any:
            nonlocal failures
            if method == "destroy_kernel" and failures:
                failures -= 1
                raise RuntimeError("the engine did not remove the container")
            return agent.run_kernels(method, params)

        agent.on_call = flaky
        model = await ann("DELETE", f"/v1/sessions/{sid}")
        assert model["state"] == "TERMINATING"  # not TERMINATED while its container may still run
        await ann.wait_state(sid, {"TERMINATED"}, timeout=10)
        assert [m for m, _ in agent.calls].count("destroy_kernel") == 4
        agent.close()


async def test_a_session_ended_while_its_agent_was_away_is_settled_when_it_returns(tmp_path: Path):
    async with running_gateway(tmp_path, **FAST) as g:
        ann = await g.user("ann")
        agent = await g.agent("host-a")
        kept, gone = [
            (await ann("POST", "/v1/sessions", {"image": IMAGE, "resources": SMALL}))["id"] for _ in "ab"
        ]
        for sid in (kept, gone):
            await ann.wait_state(sid, {"RUNNING"})
        agent.close()
        await asyncio.sleep(0.3)
        for sid in (kept, gone):
            assert (await ann("DELETE", f"/v1/sessions/{sid}"))["state"] == "TERMINATING"
        # The agent comes back; one container is still there, the other vanished meanwhile.
        back = FakeAgent(g.url, "host-a", key=agent.key, kernels=[KernelReport(kept, SessionState.RUNNING)])
        await back.connect()
        await ann.wait_state(gone, {"TERMINATED"})
        await ann.wait_state(kept, {"TERMINATED"})
        assert ("destroy_kernel", {"session_id": kept}) in back.calls
        back.close()


async def test_bound_sessions_outlive_a_gateway_restart_only_when_their_client_comes_back(tmp_path: Path):
    port = free_port()
    async with running_gateway(tmp_path, port=port, **FAST) as g:
        ann = await g.user("ann")
        agent = await g.agent("host-a")
        body = {"image": IMAGE, "resources": SMALL, "bound_to_stream": True, "key": "k" * 32}
        returning, abandoned = [(await ann("POST", "/v1/sessions", body))["id"] for _ in "ab"]
        streams = [await ann.stream(sid) for sid in (returning, abandoned)]
        for sid in (returning, abandoned):
            await ann.wait_state(sid, {"RUNNING"})
        # A bound session whose client keeps its stream lives on.
        await asyncio.sleep(1.0)
        assert (await ann("GET", f"/v1/sessions/{abandoned}"))["state"] == "RUNNING"
        # Waiting (no agent has room): its client's key must survive the restart too.
        agent.close()
        await asyncio.sleep(0.3)
        queued = (await ann("POST", "/v1/sessions", {**body, "key": "q" * 32}))["id"]
        queued_stream = await ann.stream(queued)
        for ws in (*streams, queued_stream):
            ws.close()
    async with running_gateway(tmp_path, port=port, **FAST) as g:
        ann.url = g.url
        reports = [KernelReport(sid, SessionState.RUNNING) for sid in (returning, abandoned)]
        back = FakeAgent(g.url, "host-a", key=agent.key, kernels=reports)
        # The clients of two sessions reconnect; nobody comes back for the third.
        reconnected = [await ann.stream(returning), await ann.stream(queued)]
        await back.connect()
        await ann.wait_state(abandoned, {"TERMINATED"}, timeout=10)
        assert ("destroy_kernel", {"session_id": abandoned}) in back.calls
        model = await ann("GET", f"/v1/sessions/{returning}")
        assert model["state"] == "RUNNING", model["transitions"]
        await ann.wait_state(queued, {"RUNNING"})
        (order,) = [p for m, p in back.calls if m == "create_kernel"]
        assert order["session_id"] == queued and order["reuse"]["key"] == "q" * 32
        for ws in reconnected:
            ws.close()
        back.close()


async def test_the_lost_agent_watch_outlives_a_failing_pass(tmp_path: Path):
    async with running_gateway(tmp_path, heartbeat_timeout=0.6) as g:
        ann = await g.user("ann")
        registry = g.gw.sessions.registry
        real, failures = registry._on_lost, [1]

        async def flaky(agent_id: str, reason: str) -> None:
            if failures:
                failures.pop()
                raise RuntimeError("database is locked")
            await real(agent_id, reason)

        registry._on_lost = flaky
        a = await g.agent("host-a")

        async def beating() -> None:  # alive until its kernel runs, however slow the host
            while True:
                await a.heartbeat()
                await asyncio.sleep(0.1)

        beat = asyncio.ensure_future(beating())
        sid = (await ann("POST", "/v1/sessions", {"image": IMAGE, "resources": SMALL}))["id"]
        await ann.wait_state(sid, {"RUNNING"})
        beat.cancel()
        # host-a goes silent: the first pass fails, a later one marks it and its kernel LOST.
        model = await ann.wait_state(sid, {"LOST"}, timeout=10)
        assert "no heartbeat" in model["reason"] and not failures
        # And the watch goes on for agents lost afterwards.
        b = await g.agent("host-b")

        async def silent_b() -> str:
            agents = (await g.admin("GET", "/v1/agents"))["agents"]
            return next(x["status"] for x in agents if x["id"] == "host-b")

        for _ in range(100):
            if await silent_b() == "LOST":
                break
            await asyncio.sleep(0.1)
        assert await silent_b() == "LOST"
        a.close()
        b.close()
