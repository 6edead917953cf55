"""An agent given several gateways: the first that answers takes it, and when that one dies
another has it within seconds, its kernels still running."""

from __future__ import annotations

import contextlib
import signal
import sqlite3
import time
from pathlib import Path

import pytest
from jupyter_client.blocking.client import BlockingKernelClient

from backendai_jupyter.common.clientconfig import ClientConfig

from .stack import AGENT_LABEL, Api, Cluster, aid, eventually, free_port, port_span, wait_for_line

pytestmark = pytest.mark.docker
IMAGE = "backendai-jupyter/python"
# Each gateway keeps its own SQLite database whatever BACKENDAI_DB_URL says: B shares A's state
# only through the copy this test makes.
OWN_DATABASE = "--Gateway.db_url="


def _copy_database(src: Path, dst: Path) -> None:
    """A consistent copy of a running gateway's SQLite database (what its WAL holds included)."""
    for old in dst.parent.glob(f"{dst.name}*"):  # the database and its -wal and -shm files
        old.unlink()
    with contextlib.closing(sqlite3.connect(src)) as s, contextlib.closing(sqlite3.connect(dst)) as d:
        s.backup(d)


def _containers(docker_engine, agent_id: str) -> list:
    return docker_engine.containers.list(
        all=True, filters={"label": f"{AGENT_LABEL}={agent_id}"}, ignore_removed=True
    )


def test_an_agent_is_with_another_gateway_within_5_s_of_losing_its_own(tmp_path: Path, docker_engine):
    agent_id = aid("test-failover")
    ports = port_span("31990-31999")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = Cluster(tmp_path / "a", agent_id, ports, OWN_DATABASE)
    b = Cluster(tmp_path / "b", agent_id, ports, OWN_DATABASE)
    kc: BlockingKernelClient | None = None
    try:
        # Both gateways are up; the first URL answers nothing. The agent takes the first that does.
        dead = f"http://127.0.0.1:{free_port()}"
        agent = a.add_agent(agent_id, ports, "--Agent.accelerators=[]", gateway_urls=[dead, a.url, b.url])
        log = tmp_path / "a" / f"agent-{agent_id}.log"
        assert f"registered with the gateway at {a.url} as {agent_id}" in log.read_text()

        sid = a.api("POST", "/v1/sessions", {"image": IMAGE})["id"]
        model = a.api.wait_state(sid, {"RUNNING"})
        kc = BlockingKernelClient()
        kc.load_connection_info(model["connection"])
        kc.start_channels()
        kc.wait_for_ready(timeout=30)
        kc.execute_interactive("state = 'kept'", timeout=30)
        (container,) = _containers(docker_engine, agent_id)

        # B becomes a replica of A: it restarts on (a copy of) A's database, so it knows the kernel.
        b.gateway.send_signal(signal.SIGINT)
        assert b.gateway.wait(30) == 0
        _copy_database(tmp_path / "a" / "gw" / "gateway.sqlite", tmp_path / "b" / "gw" / "gateway.sqlite")
        b.start_gateway()
        on_b = Api(ClientConfig(b.url, a.api.config.access_key, a.api.config.secret_key))

        a.gateway.send_signal(signal.SIGKILL)
        lost = time.monotonic()
        wait_for_line(agent, log, f"registered with the gateway at {b.url} as {agent_id}", timeout=30)
        took = time.monotonic() - lost
        assert took < 5, f"registered with B {took:.1f} s after A died:\n{log.read_text()}"
        assert (
            next(x for x in on_b("GET", "/v1/agents")["agents"] if x["id"] == agent_id)["status"] == "ALIVE"
        )

        # The kernel ran through the switch: same container, same state, and B now owns it.
        outputs: list = []
        kc.execute_interactive("print(state)", output_hook=outputs.append, timeout=30)
        assert [m["content"]["text"] for m in outputs if m["msg_type"] == "stream"] == ["kept\n"]
        (still,) = _containers(docker_engine, agent_id)
        still.reload()
        assert still.id == container.id and still.status == "running"
        assert on_b("GET", f"/v1/sessions/{sid}")["state"] == "RUNNING"
        on_b("DELETE", f"/v1/sessions/{sid}")
        eventually(lambda: not _containers(docker_engine, agent_id))
    finally:
        if kc is not None:
            kc.stop_channels()
        a.close()
        b.close()
