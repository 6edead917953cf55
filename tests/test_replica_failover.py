"""Two gateway replicas as processes on one PostgreSQL database, and one of them killed (SIGKILL).

Nothing stops cleanly: the dead replica's connections just drop, its advisory lock with them.
Clients and agents go on with the survivor: an event stream open there keeps receiving changes,
sessions keep their state, the agent that was linked to the dead replica registers with the
survivor at once (as the agent process does), and the survivor takes over scheduling.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
from jupyter_client.blocking.client import BlockingKernelClient

from backendai_jupyter.common.clientconfig import ClientConfig

from . import databases
from .inproc import IMAGE, Caller, RoamingAgent
from .stack import AGENT_LABEL, BAI, Api, Cluster, aid, eventually, free_port, port_span, wait_for_line
from .test_replicas import SMALL, events_until, until

pytestmark = pytest.mark.skipif(
    not databases.server_url(), reason="replicas need PostgreSQL (make test-postgres runs these)"
)

DOCKER_IMAGE = "backendai-jupyter/python"
AGENT_BACK_WITHIN = 5.0  # seconds from the kill until the agent is registered with the survivor


class ReplicaProcess:
    """``backendai-jupyter gateway`` on the shared data directory and the test's database."""

    def __init__(self, tmp: Path, name: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp / f"gateway-{name}.log"
        self.proc = subprocess.Popen(
            [BAI, "gateway", "--port", str(self.port), "--data-dir", str(tmp / "gw")],
            stdout=self.log.open("w"),
            stderr=subprocess.STDOUT,
            text=True,
        )
        wait_for_line(self.proc, self.log, "gateway ready")

    def leads(self) -> bool:
        """Whether it leads scheduling, as its log says (the leadership logs each change)."""
        text = self.log.read_text()
        return text.count("now leads scheduling") > text.count("no longer leads scheduling")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            self.proc.wait(30)


async def test_clients_and_agents_carry_on_with_the_survivor_when_the_leader_is_killed(tmp_path: Path):
    replicas: list[ReplicaProcess] = []
    agents: list[RoamingAgent] = []
    try:
        a = await asyncio.to_thread(ReplicaProcess, tmp_path, "a")
        replicas.append(a)
        await until(a.leads)  # the first one takes the lock
        b = await asyncio.to_thread(ReplicaProcess, tmp_path, "b")
        replicas.append(b)
        admin = Caller(b.url, json.loads((tmp_path / "gw" / "admin-keypair.json").read_text()))
        ann = Caller(b.url, await admin("POST", "/v1/admin/users", {"name": "ann"}))
        token = (tmp_path / "gw" / "agent-token").read_text().strip()

        # One agent linked to each replica; a session on each, placed by the leader, a.
        on_a = RoamingAgent([a.url, b.url], "host-a", join_token=token)
        on_b = RoamingAgent([b.url, a.url], "host-b", join_token=token)
        sessions = []
        for agent in (on_a, on_b):
            await agent.start()
            agents.append(agent)
            model = await ann("POST", "/v1/sessions", {"image": IMAGE, "resources": SMALL})
            stream = await ann.stream(model["id"])  # on b, the survivor to be
            told = await events_until(stream, {"RUNNING"})
            assert told[-1]["agent"] == agent.agent_id  # CPU-only sessions are spread
            sessions.append((model["id"], stream, told[-1]["seq"]))
        assert (on_a.linked_to, on_b.linked_to) == (a.url, b.url)
        assert not b.leads()

        killed = time.monotonic()
        a.proc.kill()
        a.proc.wait()

        # The agent of the dead replica moves to the survivor at once; the other stays put.
        assert await on_a.registered_after(killed, timeout=AGENT_BACK_WITHIN) == b.url
        assert on_a.registrations[-1][0] - killed < AGENT_BACK_WITHIN
        assert len(on_b.registrations) == 1 and on_b.linked_to == b.url
        # Its kernel is told again on registering: the stream open on b hears the session is
        # still RUNNING, with the same agent; the other session did not change at all.
        (moved, moved_stream, before), (stayed, _, _) = sessions
        again = await events_until(moved_stream, {"RUNNING"})
        assert again[-1]["seq"] > before and again[-1]["agent"] == "host-a"
        for sid, agent in ((moved, "host-a"), (stayed, "host-b")):
            model = await ann("GET", f"/v1/sessions/{sid}")
            assert (model["state"], model["agent"]) == ("RUNNING", agent)

        # b takes over scheduling: a new session is placed and started.
        model = await ann("POST", "/v1/sessions", {"image": IMAGE, "resources": SMALL})
        told = await events_until(await ann.stream(model["id"]), {"RUNNING"})
        assert told[-1]["state"] == "RUNNING"
        assert b.leads()

        # The stream opened before the kill keeps telling the story to its end.
        await ann("DELETE", f"/v1/sessions/{moved}")
        ended = await events_until(moved_stream, {"TERMINATED"})
        assert [e["state"] for e in ended] == ["TERMINATING", "TERMINATED"]
        assert ("destroy_kernel", {"session_id": moved}) in on_a.calls
    finally:
        for agent in agents:
            agent.close()
        for replica in replicas:
            replica.stop()


@pytest.mark.docker
def test_a_docker_agents_kernels_run_on_through_the_survivor_when_its_replica_is_killed(
    tmp_path: Path, docker_engine
):
    """The same with a real agent process and real kernels in containers: the replica that holds
    the agent's link (and leads) is killed; the agent is with the survivor within 5 s, its kernel
    never stopped, and the survivor orders it (an interrupt) and places new kernels on it."""
    agent_id = aid("test-replica-kill")
    ports = port_span("31980-31989")
    a = Cluster(tmp_path, agent_id, ports)  # replica A, on this test's database
    b: ReplicaProcess | None = None
    kc: BlockingKernelClient | None = None
    try:
        b = ReplicaProcess(tmp_path, "b")  # replica B: same data directory, same database
        agent = a.add_agent(agent_id, ports, "--Agent.accelerators=[]", gateway_urls=[a.url, b.url])
        log = tmp_path / f"agent-{agent_id}.log"
        assert f"registered with the gateway at {a.url} as {agent_id}" in log.read_text()
        on_b = Api(ClientConfig(b.url, a.api.config.access_key, a.api.config.secret_key))

        # Requested through B, placed by the leader, ordered through A's link to the agent.
        sid = on_b("POST", "/v1/sessions", {"image": DOCKER_IMAGE})["id"]
        model = on_b.wait_state(sid, {"RUNNING"})
        kc = BlockingKernelClient()
        kc.load_connection_info(model["connection"])
        kc.start_channels()
        kc.wait_for_ready(timeout=30)
        kc.execute_interactive("state = 'kept'", timeout=30)
        (container,) = docker_engine.containers.list(filters={"label": f"{AGENT_LABEL}={agent_id}"})

        a.gateway.send_signal(signal.SIGKILL)
        lost = time.monotonic()
        wait_for_line(agent, log, f"registered with the gateway at {b.url} as {agent_id}", timeout=30)
        took = time.monotonic() - lost
        assert took < AGENT_BACK_WITHIN, f"registered with B {took:.1f} s after A died:\n{log.read_text()}"

        # The kernel ran through it: same container, same state, session still RUNNING.
        outputs: list = []
        kc.execute_interactive("print(state)", output_hook=outputs.append, timeout=30)
        assert [m["content"]["text"] for m in outputs if m["msg_type"] == "stream"] == ["kept\n"]
        container.reload()
        assert container.status == "running"
        assert on_b("GET", f"/v1/sessions/{sid}")["state"] == "RUNNING"

        # B's orders reach the agent now: an interrupt (by signal, through the agent) stops a loop.
        msg_id = kc.execute("import time\nwhile True: time.sleep(0.05)")
        time.sleep(1)
        eventually(lambda: on_b.request("POST", f"/v1/sessions/{sid}/interrupt").status_code < 400)
        reply = kc.get_shell_msg(timeout=30)
        assert reply["parent_header"]["msg_id"] == msg_id
        assert reply["content"]["status"] == "error" and reply["content"]["ename"] == "KeyboardInterrupt"

        # B leads now, and places a new kernel on the agent.
        sid2 = on_b("POST", "/v1/sessions", {"image": DOCKER_IMAGE})["id"]
        assert on_b.wait_state(sid2, {"RUNNING"}, timeout=60)["agent"] == agent_id
        for s in (sid, sid2):
            on_b("DELETE", f"/v1/sessions/{s}")
        eventually(
            lambda: (
                not docker_engine.containers.list(all=True, filters={"label": f"{AGENT_LABEL}={agent_id}"})
            )
        )
    finally:
        if kc is not None:
            kc.stop_channels()
        if b is not None:
            b.stop()
        a.close()
