"""A real `jupyter server` (what JupyterLab talks to) with our kernelspec and server extension."""

from __future__ import annotations

from pathlib import Path

import pytest
import requests

from .conftest import SPEC
from .kernel_helpers import execute_over_websocket
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
        out = execute_over_websocket(
            f"{server}/api/kernels/{kernel['id']}/channels?token={TOKEN}",
            "import os; print(os.path.exists('/.dockerenv'))",
        )
        assert out == "True\n"
        assert len(stack.containers()) >= 1
    finally:
        requests.delete(server + f"/api/kernels/{kernel['id']}", headers=_h(), timeout=60)


def test_server_extension_reports_the_gateway_and_our_sessions(stack: Stack, server: str):
    status = requests.get(server + "/backendai/status", headers=_h(), timeout=10)
    assert status.status_code == 200, status.text
    body = status.json()
    assert body["gateway"] == stack.url
    assert stack.agent_id in [a["id"] for a in body["agents"]]
    assert "sessions" in body
    assert requests.get(server + "/backendai/status", timeout=10).status_code == 403
