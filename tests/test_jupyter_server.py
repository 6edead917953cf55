"""A real `jupyter server` (what JupyterLab talks to) with our kernelspec and server extension."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
import requests
from tornado import websocket

from .conftest import SPEC
from .stack import Stack, jupyter

pytestmark = pytest.mark.docker
TOKEN = "test-token"


@pytest.fixture
def server(stack: Stack, tmp_path: Path):
    with jupyter("server", tmp_path, TOKEN) as url:
        yield url


def _h() -> dict[str, str]:
    return {"Authorization": f"token {TOKEN}"}


def test_launcher_lists_our_kernelspec_and_a_kernel_started_there_runs_in_a_container(
    stack: Stack, server: str
):
    specs = requests.get(server + "/api/kernelspecs", headers=_h(), timeout=10).json()["kernelspecs"]
    assert specs[SPEC]["spec"]["display_name"] == "Python 3 (Backend.AI)"
    kernel = requests.post(server + "/api/kernels", json={"name": SPEC}, headers=_h(), timeout=120).json()
    assert kernel["name"] == SPEC
    try:
        out = _execute_over_websocket(server, kernel["id"], "import os; print(os.path.exists('/.dockerenv'))")
        assert out == "True\n"
        assert len(stack.containers()) >= 1
    finally:
        requests.delete(server + f"/api/kernels/{kernel['id']}", headers=_h(), timeout=60)


def _execute_over_websocket(server: str, kernel_id: str, code: str) -> str:
    import asyncio

    async def go() -> str:
        ws_url = server.replace("http", "ws", 1) + f"/api/kernels/{kernel_id}/channels?token={TOKEN}"
        conn = await websocket.websocket_connect(ws_url)
        msg_id = uuid.uuid4().hex
        conn.write_message(
            json.dumps(
                {
                    "header": {
                        "msg_id": msg_id,
                        "username": "t",
                        "session": uuid.uuid4().hex,
                        "msg_type": "execute_request",
                        "version": "5.3",
                    },
                    "parent_header": {},
                    "metadata": {},
                    "channel": "shell",
                    "content": {
                        "code": code,
                        "silent": False,
                        "store_history": False,
                        "user_expressions": {},
                        "allow_stdin": False,
                    },
                }
            )
        )
        text = ""
        while True:
            raw = await asyncio.wait_for(conn.read_message(), 60)
            msg = json.loads(raw)
            if msg.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            if msg["msg_type"] == "stream":
                text += msg["content"]["text"]
            if msg["msg_type"] == "execute_reply":
                conn.close()
                return text

    return asyncio.run(go())


def test_server_extension_reports_the_gateway_and_our_sessions(stack: Stack, server: str):
    status = requests.get(server + "/backendai/status", headers=_h(), timeout=10)
    assert status.status_code == 200, status.text
    body = status.json()
    assert body["gateway"] == stack.url
    assert stack.agent_id in [a["id"] for a in body["agents"]]
    assert "sessions" in body
    assert requests.get(server + "/backendai/status", timeout=10).status_code == 403
