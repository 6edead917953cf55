"""Agents are authenticated as themselves: no impostor under another's id, no claim on others' sessions."""

from __future__ import annotations

import asyncio
import json
import secrets
from pathlib import Path

import pytest
from tornado import httpclient

from backendai_jupyter.common.states import SessionState
from backendai_jupyter.common.wire import KernelReport

from .inproc import IMAGE, FakeAgent, running_gateway

SMALL = {"cpu": "1", "mem": "256m"}


async def _refused(agent: FakeAgent) -> tuple[int, str]:
    with pytest.raises(httpclient.HTTPClientError) as e:
        await agent.connect()
    assert e.value.response is not None
    return e.value.code, json.loads(e.value.response.body)["title"]


async def test_the_join_token_alone_cannot_open_a_connection_as_an_enrolled_agent(tmp_path: Path):
    async with running_gateway(tmp_path) as g:
        real = await g.agent("host-a")
        impostor = FakeAgent(g.url, "host-a", join_token=g.join_token)  # its own, different key
        code, title = await _refused(impostor)
        assert code == 401 and "enrolled with another key" in title
        real.close()
        await asyncio.sleep(0.2)
        # Not even once the real agent is gone.
        code, _ = await _refused(FakeAgent(g.url, "host-a", join_token=g.join_token))
        assert code == 401
        # The real agent's own key (without the join token) still works.
        again = FakeAgent(g.url, "host-a", key=real.key)
        assert (await again.connect())["type"] == "registered"
        again.close()


async def test_a_new_agent_without_the_join_token_is_refused(tmp_path: Path):
    async with running_gateway(tmp_path) as g:
        code, title = await _refused(FakeAgent(g.url, "host-new"))
        assert code == 401 and "not enrolled" in title
        code, _ = await _refused(FakeAgent(g.url, "host-new", join_token="wrong-" + g.join_token))
        assert code == 401
        # A join token in odd characters is just wrong, never a server error.
        code, _ = await _refused(FakeAgent(g.url, "host-new", join_token="jöin-tökén"))
        assert code == 401


async def test_a_second_connection_under_a_connected_agents_id_is_refused(tmp_path: Path):
    async with running_gateway(tmp_path) as g:
        first = await g.agent("host-a")
        code, title = await _refused(FakeAgent(g.url, "host-a", key=first.key))
        assert code == 409 and "already connected" in title
        agents = await g.admin("GET", "/v1/agents")
        assert [a["status"] for a in agents["agents"]] == ["ALIVE"]
        first.close()


async def test_an_agent_registers_only_under_the_id_it_authenticated_as(tmp_path: Path):
    async with running_gateway(tmp_path) as g:
        await g.agent("host-a")
        # Authenticated as host-b (enrolled with its own key), registering as host-a: closed.
        sneaky = FakeAgent(g.url, "host-b", join_token=g.join_token, register_as="host-a")
        with pytest.raises(AssertionError, match="closed the agent connection"):
            await sneaky.connect()
        agents = {a["id"]: a["status"] for a in (await g.admin("GET", "/v1/agents"))["agents"]}
        assert agents == {"host-a": "ALIVE"}


async def test_an_agent_cannot_take_over_another_agents_session(tmp_path: Path):
    async with running_gateway(tmp_path) as g:
        ann = await g.user("ann")
        a = await g.agent("host-a", cpu="1")
        sid = (await ann("POST", "/v1/sessions", {"image": IMAGE, "resources": SMALL}))["id"]
        model = await ann.wait_state(sid, {"RUNNING"})
        assert model["agent"] == "host-a"
        honest = model["connection"]
        evil = {"ip": "10.6.6.6", "transport": "tcp", "key": "e" * 32, "shell_port": 6666}
        # An agent of its own (the join token allows that) claims the session at registration...
        b = FakeAgent(
            g.url,
            "host-b",
            join_token=g.join_token,
            kernels=[KernelReport(sid, SessionState.RUNNING, "mine", evil)],
        )
        await b.connect()
        # ... and in a report afterwards.
        b.report(sid, SessionState.RUNNING, evil)
        b.report(sid, SessionState.ERROR)
        await asyncio.sleep(0.5)
        model = await ann("GET", f"/v1/sessions/{sid}")
        assert model["agent"] == "host-a" and model["state"] == "RUNNING"
        assert model["connection"] == honest
        # The claimed kernel is not where the gateway placed it: the claimant is told to remove it.
        assert ("destroy_kernel", {"session_id": sid}) in b.calls
        a.close()
        b.close()


async def test_an_admin_reset_lets_a_host_that_lost_its_key_join_again(tmp_path: Path):
    async with running_gateway(tmp_path) as g:
        a = await g.agent("host-a")
        a.close()
        ann = await g.user("ann")
        resp = await ann.fetch("DELETE", "/v1/agents/host-a/key")
        assert resp.code == 403
        await g.admin("DELETE", "/v1/agents/host-a/key")
        fresh = FakeAgent(g.url, "host-a", join_token=g.join_token, key=secrets.token_urlsafe(32))
        assert (await fresh.connect())["type"] == "registered"
        fresh.close()
        resp = await g.admin.fetch("DELETE", "/v1/agents/no-such-host/key")
        assert resp.code == 404


async def test_join_can_be_turned_off_once_every_agent_is_enrolled(tmp_path: Path):
    async with running_gateway(tmp_path, allow_agent_join=False) as g:
        code, title = await _refused(FakeAgent(g.url, "host-a", join_token=g.join_token))
        assert code == 401 and "not enrolled" in title
