"""Several gateway replicas on one PostgreSQL database, in the test's process.

Replicas share the data directory and the database, and nothing else: each has its own port,
its own agent links, its own event streams. A client may use any of them for anything; one
scheduling leader places; an agent's orders reach it through whichever replica holds its link.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from tornado import httpclient

from backendai_jupyter.common.slots import ResourceSlot
from backendai_jupyter.common.states import SessionState
from backendai_jupyter.common.wire import Device, KernelReport
from backendai_jupyter.gateway.app import Gateway
from backendai_jupyter.gateway.models import KernelSession
from backendai_jupyter.gateway.sessions.store import HOLDING

from . import databases
from .inproc import IMAGE, Caller, FakeAgent, InprocGateway, running_gateway
from .stack import free_port

pytestmark = pytest.mark.skipif(
    not databases.server_url(), reason="replicas need PostgreSQL (make test-postgres runs these)"
)

SMALL = {"cpu": "0.25", "mem": "128m"}
TIMEOUT = 20


@contextlib.asynccontextmanager
async def replicas(tmp: Path, n: int = 2, **traits: Any) -> AsyncIterator[list[InprocGateway]]:
    traits.setdefault("heartbeat_timeout", 120)  # fake agents send no heartbeats by themselves
    async with contextlib.AsyncExitStack() as stack:
        out = [await stack.enter_async_context(running_gateway(tmp, **traits)) for _ in range(n)]
        yield out


def on(g: InprocGateway, caller: Caller) -> Caller:
    """The same user, talking to replica ``g``."""
    return Caller(g.url, caller.creds)


async def leader(gws: list[InprocGateway]) -> InprocGateway:
    async with asyncio.timeout(TIMEOUT):
        while True:
            leaders = [g for g in gws if g.gw.sessions.scheduler.leader]
            if leaders:
                assert len(leaders) == 1, "two replicas lead at once"
                return leaders[0]
            await asyncio.sleep(0.1)


async def until(check: Any, timeout: float = TIMEOUT) -> None:
    """Wait for ``await check()`` (or ``check()``) to be true."""
    async with asyncio.timeout(timeout):
        while True:
            done = check()
            if asyncio.iscoroutine(done):
                done = await done
            if done:
                return
            await asyncio.sleep(0.1)


def gpu_agent(g: InprocGateway, agent_id: str, gpus: int) -> FakeAgent:
    devices = [
        Device(
            plugin="cuda", id=str(i), uuid=f"GPU-{agent_id}-{i}", model="Mock GPU", memory=16 << 30, mock=True
        )
        for i in range(gpus)
    ]
    agent = FakeAgent(g.url, agent_id, join_token=g.join_token, cpu="64", mem="256g", devices=devices)
    agent.capacity = ResourceSlot.parse({"cpu": "64", "mem": "256g", "cuda.device": str(gpus)})
    return agent


async def events_until(ws: Any, states: set[str]) -> list[dict[str, Any]]:
    seen: list[dict[str, Any]] = []
    async with asyncio.timeout(TIMEOUT):
        while not seen or seen[-1]["state"] not in states:
            raw = await ws.read_message()
            assert raw is not None, "the event stream closed"
            seen.append(json.loads(raw))
    return seen


async def send(g: InprocGateway, path: str, headers: dict[str, str]) -> httpclient.HTTPResponse:
    """A GET with headers signed beforehand: what a captured request sent again would be."""
    return await httpclient.AsyncHTTPClient().fetch(g.url + path, headers=headers, raise_error=False)


async def test_a_signed_request_accepted_by_one_replica_is_refused_as_a_replay_by_the_other(tmp_path: Path):
    async with replicas(tmp_path) as (a, b):
        headers = a.admin.signed("GET", "/v1/agents")
        first = await send(a, "/v1/agents", headers)
        assert first.code == 200, first.body
        again = await send(b, "/v1/agents", headers)
        assert again.code == 401, again.body
        assert "already received" in json.loads(again.body)["title"]
        assert (await send(a, "/v1/agents", headers)).code == 401  # nor on the first one


async def test_one_signed_request_sent_to_two_replicas_at_once_passes_on_one_only(tmp_path: Path):
    async with replicas(tmp_path) as (a, b):
        for _ in range(20):
            headers = a.admin.signed("GET", "/v1/")
            answers = await asyncio.gather(send(a, "/v1/", headers), send(b, "/v1/", headers))
            assert sorted(r.code for r in answers) == [200, 401], [(r.code, r.body) for r in answers]


async def test_a_session_made_on_one_replica_runs_on_an_agent_of_the_other(tmp_path: Path):
    async with replicas(tmp_path) as (a, b):
        assert a.gw.sessions.bus.shared and a.gw.sessions.bus.replica_id != b.gw.sessions.bus.replica_id
        await leader([a, b])
        ann_a = await a.user("ann")
        ann_b = on(b, ann_a)
        agent = await b.agent("host-b")  # its link is on b only
        model = await ann_a("POST", "/v1/sessions", {"image": IMAGE, "resources": SMALL})
        sid = model["id"]
        stream_a, stream_b = await ann_a.stream(sid), await ann_b.stream(sid)
        for ws in (stream_a, stream_b):
            told = await events_until(ws, {"RUNNING"})
            assert told[-1]["connection"]["shell_port"] == 1 and told[-1]["version"] == 1
            seqs = [e["seq"] for e in told]
            assert seqs == sorted(seqs)
        assert [m for m, _ in agent.calls] == ["create_kernel"]

        # Orders given on a reach the agent connected to b; so does the end.
        resp = await ann_a.fetch("POST", f"/v1/sessions/{sid}/interrupt", {})
        assert resp.code == 204, resp.body
        assert agent.calls[-1] == ("signal_kernel", {"session_id": sid, "signal": "SIGINT"})
        await ann_a("DELETE", f"/v1/sessions/{sid}")
        for ws in (stream_a, stream_b):
            assert (await events_until(ws, {"TERMINATED"}))[-1]["state"] == "TERMINATED"
        assert (await ann_b("GET", f"/v1/sessions/{sid}"))["state"] == "TERMINATED"
        agents = (await b.admin("GET", "/v1/agents"))["agents"]
        assert [(x["id"], x["status"]) for x in agents] == [("host-b", "ALIVE")]
        assert agents == (await a.admin("GET", "/v1/agents"))["agents"]
        agent.close()


async def test_a_replica_reads_another_replicas_changes_only_for_sessions_watched_there(tmp_path: Path):
    """Each replica hears of every change; it reads the event (two queries) only when one of its
    own streams watches that session, so a busy cluster's replicas do not repeat each other."""
    async with replicas(tmp_path) as (a, b):
        ann = await a.user("ann")
        agent = await a.agent("host-a")
        read_on_b: list[str] = []
        event_at = b.gw.sessions.event_at

        async def counting(sid: str, seq: int | None = None) -> Any:
            read_on_b.append(sid)
            return await event_at(sid, seq)

        b.gw.sessions.event_at = counting  # type: ignore[method-assign]
        unwatched = (await ann("POST", "/v1/sessions", {"image": IMAGE, "resources": SMALL}))["id"]
        await ann.wait_state(unwatched, {"RUNNING"})
        watched = (await ann("POST", "/v1/sessions", {"image": IMAGE, "resources": SMALL}))["id"]
        stream = await on(b, ann).stream(watched)
        told = await events_until(stream, {"RUNNING"})
        await ann("DELETE", f"/v1/sessions/{watched}")
        told += await events_until(stream, {"TERMINATED"})
        assert [e["state"] for e in told][-2:] == ["TERMINATING", "TERMINATED"]
        assert unwatched not in read_on_b and watched in read_on_b
        agent.close()


async def test_a_policy_limit_holds_across_replicas(tmp_path: Path):
    async with replicas(tmp_path) as (a, b):
        await a.admin("PUT", "/v1/admin/policies/two", {"max_sessions": 2})
        ann_a = await a.user("ann", policy="two")
        ann_b = on(b, ann_a)
        agent = await a.agent("host-a")
        answers = await asyncio.gather(
            *(
                (ann_a if i % 2 else ann_b).fetch(
                    "POST", "/v1/sessions", {"image": IMAGE, "resources": SMALL}
                )
                for i in range(10)
            )
        )
        codes = sorted(r.code for r in answers)
        assert codes == [201, 201] + [403] * 8, [(r.code, r.body) for r in answers]
        assert all(json.loads(r.body)["limit"] == "max_sessions" for r in answers if r.code == 403)
        agent.close()


async def test_no_device_is_allocated_twice_across_replicas(tmp_path: Path):
    """200 requests for a whole GPU over both replicas, 3 agents with 4 mock GPUs each."""
    async with replicas(tmp_path, pending_timeout=0, max_pending_per_user=200) as (a, b):
        await leader([a, b])
        agents = [gpu_agent(g, f"gpu-{i}", 4) for i, g in enumerate((a, b, a))]
        for agent in agents:
            await agent.connect()
        ann_a = await a.user("ann")
        ann_b = on(b, ann_a)
        req = {"image": IMAGE, "resources": {"cpu": "0.1", "mem": "64m", "cuda.device": "1"}}
        made = await asyncio.gather(
            *((ann_a if i % 2 else ann_b)("POST", "/v1/sessions", req) for i in range(200))
        )
        sids = [m["id"] for m in made]

        async def holders() -> list[KernelSession]:
            async with a.gw.sessions.db() as db:
                return list(
                    (await db.scalars(select(KernelSession).where(KernelSession.state.in_(HOLDING)))).all()
                )

        async def twelve_held() -> bool:
            return len(await holders()) == 12

        await until(twelve_held)
        held = await holders()
        grants = [(r.agent_id, d) for r in held for d in r.devices["cuda"]]
        assert len(grants) == len(set(grants)) == 12, grants
        # Ending the running ones lets waiting ones in, on exactly the devices that came free.
        for r in held[:6]:
            await ann_a("DELETE", f"/v1/sessions/{r.id}")
        ended = {h.id for h in held[:6]}

        async def replaced() -> bool:
            now = await holders()
            return len(now) == 12 and not ended & {r.id for r in now}

        await until(replaced)
        grants = [(r.agent_id, d) for r in await holders() for d in r.devices["cuda"]]
        assert len(grants) == len(set(grants)) == 12, grants
        for sid in sids:
            await ann_a("DELETE", f"/v1/sessions/{sid}")
        for agent in agents:
            used, kernels = await a.gw.sessions.agents.usage(agent.agent_id)
            assert kernels == 0 and all(v == 0 for v in used.values()), (agent.agent_id, used)
            agent.close()


async def test_a_new_leader_schedules_when_the_old_one_is_gone(tmp_path: Path):
    gw = Gateway(data_dir=str(tmp_path / "gw"), port=free_port(), heartbeat_timeout=120)
    await gw.start()
    a = InprocGateway(gw)
    stopped = False
    try:
        assert await leader([a]) is a
        ann = await a.user("ann")
        async with running_gateway(tmp_path, heartbeat_timeout=120) as b:
            await asyncio.sleep(1.5)
            assert not b.gw.sessions.scheduler.leader
            ann_b = on(b, ann)
            agent = await b.agent("host-b")
            first = await ann_b("POST", "/v1/sessions", {"image": IMAGE, "resources": SMALL})
            stream = await ann_b.stream(first["id"])
            await events_until(stream, {"RUNNING"})
            await a.gw.stop()  # its lock goes with its connection
            stopped = True
            await until(lambda: b.gw.sessions.scheduler.leader, timeout=5)
            model = await ann_b("POST", "/v1/sessions", {"image": IMAGE, "resources": SMALL})
            told = await events_until(await ann_b.stream(model["id"]), {"RUNNING"})
            assert told[-1]["state"] == SessionState.RUNNING.value
            assert (await ann_b("GET", f"/v1/sessions/{first['id']}"))["state"] == "RUNNING"
            agent.close()
    finally:
        if not stopped:
            await a.gw.stop()


async def test_a_replica_that_dies_uncleanly_is_noticed_and_its_agent_moves(tmp_path: Path):
    """Its listening and leading connections vanish without a word (as with kill -9)."""
    async with replicas(tmp_path) as (a, b):
        ann_a = await a.user("ann")
        ann_b = on(b, ann_a)
        agent = await a.agent("host-a")
        sid = (await ann_b("POST", "/v1/sessions", {"image": IMAGE, "resources": SMALL}))["id"]
        stream = await ann_b.stream(sid)
        running = await events_until(stream, {"RUNNING"})
        await a.gw.sessions.leadership.stop()
        await a.gw.sessions.bus.stop()
        await until(lambda: b.gw.sessions.scheduler.leader, timeout=5)

        async def disconnected() -> bool:
            return [x["status"] for x in (await b.admin("GET", "/v1/agents"))["agents"]] == ["DISCONNECTED"]

        await until(disconnected, timeout=5)
        # An order for it fails at once rather than waiting for a dead replica's answer.
        resp = await ann_b.fetch("POST", f"/v1/sessions/{sid}/interrupt", {})
        assert resp.code == 409 and b"not connected" in resp.body, resp.body
        # The agent comes to b, reporting its kernel: the session never stopped running.
        agent.close()
        agent.url = b.url
        agent.kernels = [KernelReport(sid, SessionState.RUNNING, "running", running[-1]["connection"])]
        await agent.connect()
        assert (await ann_b("GET", f"/v1/sessions/{sid}"))["state"] == "RUNNING"
        assert (await ann_b.fetch("POST", f"/v1/sessions/{sid}/interrupt", {})).code == 204
        await ann_b("DELETE", f"/v1/sessions/{sid}")
        told = await events_until(stream, {"TERMINATED"})
        assert [e["state"] for e in told][-1] == "TERMINATED"
        assert all(e["seq"] > running[-1]["seq"] for e in told)
        agent.close()
