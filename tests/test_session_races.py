"""Races in the session service, in process with a fake agent on the real wire (no Docker).

Shutdowns racing placements and the agent's reports, duplicate and late reports: every
session ends exactly once, its recorded path only moves forward, its event stream tells the
same story in order, and every allocation is given back.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import random
import time
from pathlib import Path
from typing import Any

from sqlalchemy import event, select

from backendai_jupyter.common.states import SessionState, is_forward
from backendai_jupyter.common.wire import CreateKernel
from backendai_jupyter.gateway.models import SessionTransition

from . import databases
from .inproc import IMAGE, RoamingAgent, running_gateway

SMALL = {"cpu": "0.25", "mem": "128m"}
S = SessionState


async def recorded_path(gw: Any, sid: str) -> list[SessionState]:
    async with gw.sessions.db() as db:
        rows = await db.scalars(
            select(SessionTransition.state)
            .where(SessionTransition.session_id == sid)
            .order_by(SessionTransition.id)
        )
        return [S(s) for s in rows]


async def test_shutdowns_racing_placements_and_reports_end_every_session_once(tmp_path: Path):
    rng = random.Random(11)
    async with running_gateway(tmp_path, destroy_retry_interval=0.1, heartbeat_timeout=60) as g:
        assert g.gw.engine.dialect.name == ("postgresql" if databases.server_url() else "sqlite")
        ann = await g.user("ann")
        agent = await g.agent("host-a", cpu="4", mem="8g")

        async def chaotic(method: str, params: dict[str, Any]) -> Any:
            """Reports come late, twice, and out of order; a destroy may overtake a create."""
            loop = asyncio.get_running_loop()
            if method == "create_kernel":
                sid = CreateKernel.from_json(params).session_id
                for state, delay in (
                    (S.CREATING, 0.0),
                    (S.RUNNING, 0.02),
                    (S.CREATING, 0.03),
                    (S.RUNNING, 0.04),
                ):
                    loop.call_later(delay * rng.random(), agent.report, sid, state)
            elif method == "destroy_kernel":
                sid = params["session_id"]
                loop.call_later(0.02 * rng.random(), agent.report, sid, S.TERMINATED)
                loop.call_later(0.03 * rng.random(), agent.report, sid, S.RUNNING)  # a stale one
            await asyncio.sleep(0.01 * rng.random())
            return {"accepted": True}

        agent.on_call = chaotic
        # More requests than fit at once (16 × 0.25 CPU): some wait, some are placed as others end.
        created = await asyncio.gather(
            *(ann("POST", "/v1/sessions", {"image": IMAGE, "resources": SMALL}) for _ in range(24))
        )
        sids = [m["id"] for m in created]
        streams = {sid: await ann.stream(sid) for sid in sids}

        async def end_soon(sid: str) -> None:
            await asyncio.sleep(0.3 * rng.random())
            await asyncio.gather(*(ann("DELETE", f"/v1/sessions/{sid}") for _ in range(2)))

        await asyncio.gather(*(end_soon(sid) for sid in sids))
        for sid in sids:
            await ann.wait_state(sid, {"TERMINATED", "CANCELLED"}, timeout=20)

        for sid in sids:
            path = [S.PENDING, *await recorded_path(g.gw, sid)]
            assert path[1] == S.PENDING  # the request's own first transition
            steps = path[1:]
            again = (S.PENDING, S.RUNNING)  # a new reason, a new connection
            assert all(is_forward(a, b) or (a == b in again) for a, b in itertools.pairwise(steps)), steps
            assert sum(s.is_terminal for s in steps) == 1 and steps[-1].is_terminal, steps
            # The event stream tells the same story, in order, ending with the end.
            seen: list[tuple[int, str]] = []
            ws = streams[sid]
            while not seen or not S(seen[-1][1]).is_terminal:
                raw = await asyncio.wait_for(ws.read_message(), 10)
                assert raw is not None
                event = json.loads(raw)
                if "state" in event and "seq" in event:
                    seen.append((event["seq"], event["state"]))
            ws.close()
            seqs = [q for q, _ in seen]
            assert seqs == sorted(seqs), seen
            assert S(seen[-1][1]) == steps[-1]

        sessions = g.gw.sessions
        assert [r.id for r in await sessions.store.open_of(agent="host-a")] == []
        usage, count = await sessions.agents.usage("host-a")
        assert count == 0 and all(v == 0 for v in usage.values()), usage
        agent.close()


async def test_a_kernel_ordered_while_its_agent_registers_again_is_reported_running(tmp_path: Path):
    async with running_gateway(tmp_path, heartbeat_timeout=120) as g:
        ann = await g.user("ann")
        agent = RoamingAgent([g.url], "host", join_token=g.join_token)
        await agent.start()
        first = await ann("POST", "/v1/sessions", {"image": IMAGE, "resources": SMALL})
        await ann.wait_state(first["id"], {"RUNNING"})

        # Its next registration reconciles the kernel it runs: hold that, as a busy database would.
        book = g.gw.sessions.agents
        report, held, release = book.report, asyncio.Event(), asyncio.Event()

        async def slow_report(agent_id: str, kernel: Any) -> None:
            held.set()
            await release.wait()
            await report(agent_id, kernel)

        book.report = slow_report  # type: ignore[method-assign]
        since = time.monotonic()
        assert agent.ws is not None
        agent.ws.close()  # it reconnects at once
        await asyncio.wait_for(held.wait(), 10)
        second = await ann("POST", "/v1/sessions", {"image": IMAGE, "resources": SMALL})
        await ann.wait_state(second["id"], {"SCHEDULED"})  # placed on it while it registers
        await asyncio.sleep(0.3)
        # Its order waits for the registration's answer: the agent could not report on it before.
        assert ("create_kernel", second["id"]) not in [(m, p["session_id"]) for m, p in agent.calls]
        book.report = report  # type: ignore[method-assign]
        release.set()
        await agent.registered_after(since)
        with contextlib.suppress(TimeoutError):
            await ann.wait_state(second["id"], {"RUNNING"}, timeout=5)
        model = await ann("GET", f"/v1/sessions/{second['id']}")
        dropped = [(r.session_id, r.state.value) for r in agent.dropped]
        assert model["state"] == "RUNNING", f"{model['state']} ({model['reason']}); agent dropped {dropped}"
        agent.close()


async def test_a_create_never_holds_two_database_connections_at_once(tmp_path: Path):
    """Creates of one user wait for each other (the user's policy lock, holding a connection
    while they wait). One that needed a second connection under the lock could deadlock: a burst
    bigger than the pool (5 + 10) leaves the lock's holder none, and every request then fails
    after the pool's 30 s. So: no task ever holds two connections of the pool at once."""
    async with running_gateway(tmp_path, heartbeat_timeout=120) as g:
        held: dict[Any, int] = {}
        twice: list[str] = []

        def checkout(_dbapi: Any, record: Any, _proxy: Any) -> None:
            task = asyncio.current_task()
            held[task] = held.get(task, 0) + 1
            record.info["task"] = task
            if held[task] > 1:
                twice.append(repr(task))

        def checkin(_dbapi: Any, record: Any) -> None:
            task = record.info.pop("task", None)
            if task in held:
                held[task] -= 1

        pool = g.gw.engine.sync_engine.pool
        event.listen(pool, "checkout", checkout)
        event.listen(pool, "checkin", checkin)
        agent = await g.agent("host-a", cpu="64", mem="256g")
        ann = await g.user("ann")
        answers = await asyncio.gather(
            *(ann.fetch("POST", "/v1/sessions", {"image": IMAGE, "resources": SMALL}) for _ in range(20))
        )
        assert sorted({r.code for r in answers}) == [201], [r.body for r in answers if r.code != 201][:3]
        assert twice == [], twice[:3]
        event.remove(pool, "checkout", checkout)
        event.remove(pool, "checkin", checkin)
        agent.close()
