"""An agent keeps its link to the gateway whatever the gateway sends, and tells users no internals."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from tornado import web, websocket

from backendai_jupyter.common.wire import AGENT_WS_PATH

from .stack import BAI, aid, free_port, port_span, remove_containers

pytestmark = pytest.mark.docker


class FakeGateway(websocket.WebSocketHandler):
    """Garbage on the first connection; then a proper registration and an order the agent fails."""

    connections: list[FakeGateway] = []
    replies: list[dict[str, Any]] = []

    def open(self, *args: Any, **kwargs: Any) -> None:
        FakeGateway.connections.append(self)

    def on_message(self, message: str | bytes) -> None:
        msg = json.loads(message)
        if msg["type"] == "register" and len(FakeGateway.connections) == 1:
            self.write_message("this is not JSON {")
        elif msg["type"] == "register":
            self.write_message(json.dumps({"type": "registered", "heartbeat_interval": 5}))
            # An order the agent cannot even read: its reply must carry no exception text.
            self.write_message(json.dumps({"type": "call", "id": 7, "method": "create_kernel", "params": {}}))
        elif msg["type"] == "reply":
            FakeGateway.replies.append(msg)


async def test_an_agent_reconnects_after_any_failure_and_hides_internal_errors(tmp_path: Path, docker_engine):
    port = free_port()
    server = web.Application([(AGENT_WS_PATH, FakeGateway)]).listen(port, "127.0.0.1")
    agent_id = aid("test-link")
    log = tmp_path / "agent.log"
    proc = subprocess.Popen(  # noqa: ASYNC220 (started once, then polled)
        [
            BAI,
            "agent",
            f"--gateway-url=http://127.0.0.1:{port}",
            f"--id={agent_id}",
            f"--port-range={port_span('31970-31979')}",
            f"--state-dir={tmp_path / 'state'}",
            "--Agent.accelerators=[]",
        ],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        env={**os.environ, "BACKENDAI_AGENT_TOKEN": "join"},
    )
    try:
        async with asyncio.timeout(60):
            while not FakeGateway.replies:
                assert proc.poll() is None, log.read_text()
                await asyncio.sleep(0.1)
        assert len(FakeGateway.connections) >= 2  # it came back after the garbage
        (reply,) = FakeGateway.replies
        assert reply["id"] == 7 and reply["error"]["status"] == 500
        title = reply["error"]["title"]
        assert "could not create kernel" in title and "agent's log" in title
        assert "KeyError" not in title and "session_id" not in title
        assert "KeyError" in log.read_text()  # the operator has the details
    finally:
        proc.terminate()
        proc.wait(30)
        server.stop()
        remove_containers(agent_id)
