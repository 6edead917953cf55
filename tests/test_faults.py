"""Bad input and faults: clear errors within seconds, nothing half-created, dead kernels noticed."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest
from jupyter_client.ioloop import AsyncIOLoopKernelManager
from jupyter_client.manager import KernelManager

from backendai_jupyter.common.errors import LaunchError

from .conftest import SPEC
from .kernel_helpers import client, stdout
from .stack import Stack, eventually, free_port

pytestmark = pytest.mark.docker


def _start_fails(name: str) -> tuple[str, float]:
    km = KernelManager(kernel_name=name)
    start = time.monotonic()
    with pytest.raises(LaunchError) as e:
        km.start_kernel()
    return str(e.value), time.monotonic() - start


def test_more_memory_than_any_agent_has_is_refused_at_once_naming_mem(stack: Stack, extra_kernelspecs):
    name = extra_kernelspecs("bai-huge-mem", resources={"cpu": "1", "mem": "1000g"})
    sessions_before = stack.api("GET", "/v1/sessions")["sessions"]
    message, took = _start_fails(name)
    assert took < 5
    assert "mem" in message and "1000 GiB" in message and "largest agent" in message
    assert stack.api("GET", "/v1/sessions")["sessions"] == sessions_before  # nothing created


def test_more_cpu_than_any_agent_has_is_refused_naming_cpu(stack: Stack, extra_kernelspecs):
    name = extra_kernelspecs("bai-huge-cpu", resources={"cpu": "512"})
    message, took = _start_fails(name)
    assert took < 5
    assert "512 cpu" in message


def test_unknown_image_is_refused_with_the_images_there_are(stack: Stack, extra_kernelspecs):
    name = extra_kernelspecs("bai-no-image", image="backendai-jupyter/no-such-image")
    message, took = _start_fails(name)
    assert took < 5
    assert "unknown image 'backendai-jupyter/no-such-image'" in message
    assert "backendai-jupyter/python:latest" in message
    assert not [c for c in stack.containers() if "no-such-image" in str(c.image)]


def test_unreachable_gateway_error_names_the_url_and_how_to_start_it(
    stack: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    url = f"http://127.0.0.1:{free_port()}"
    cfg = json.loads(stack.client_config.read_text())
    (tmp_path / "client.json").write_text(json.dumps({**cfg, "url": url}))
    monkeypatch.setenv("BACKENDAI_CLIENT_CONFIG", str(tmp_path / "client.json"))
    message, took = _start_fails(SPEC)
    assert url in message
    assert "backendai-jupyter up" in message
    assert took < 15


def test_missing_client_config_says_how_to_create_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("BACKENDAI_CLIENT_CONFIG", str(tmp_path / "absent.json"))
    message, _ = _start_fails(SPEC)
    assert "no Backend.AI client config" in message and "backendai-jupyter up" in message


def test_bad_resource_amount_is_a_clear_error(stack: Stack, extra_kernelspecs):
    name = extra_kernelspecs("bai-bad-mem", resources={"mem": "lots"})
    message, _ = _start_fails(name)
    assert "mem" in message and "'lots'" in message


async def test_container_killed_from_outside_is_noticed_and_the_restarter_recovers(stack: Stack):
    km = AsyncIOLoopKernelManager(kernel_name=SPEC)
    restarts: list[str] = []
    await km.start_kernel()
    km.add_restart_callback(lambda: restarts.append("restart"), "restart")  # needs a started restarter
    try:
        sid = km.provisioner.session_id
        container = next(c for c in stack.containers() if c.labels["io.backendai-jupyter.session"] == sid)
        container.kill()  # docker kill: SIGKILL from outside
        start = time.monotonic()
        while await km.provisioner.poll() is None:
            assert time.monotonic() - start < 10, "poll never saw the kernel die"
            await asyncio.sleep(0.1)
        model = stack.api("GET", f"/v1/sessions/{sid}")
        assert model["state"] == "ERROR"
        assert "killed" in model["reason"] and model["exit_code"] == 137
        # jupyter_client's restarter polls every 3 s and starts a new kernel.
        for _ in range(150):
            if restarts and km.provisioner.session_id not in (None, sid):
                break
            await asyncio.sleep(0.1)
        assert restarts == ["restart"]
        await km.ready  # the restart (a new start) has finished
        assert stack.api("GET", f"/v1/sessions/{km.provisioner.session_id}")["state"] == "RUNNING"
        kc = km.client()
        kc.start_channels()
        await kc.wait_for_ready(timeout=60)
        outputs: list = []
        await kc.execute_interactive("print('back')", output_hook=outputs.append, timeout=30)
        assert stdout(outputs) == "back\n"
        kc.stop_channels()
    finally:
        await km.shutdown_kernel(now=True)
    eventually(lambda: not [c for c in stack.containers() if c.labels["io.backendai-jupyter.session"] == sid])


def test_kernel_that_exits_by_itself_ends_its_session(stack: Stack, km: KernelManager):
    kc = client(km)
    sid = km.provisioner.session_id
    kc.execute("import os; os._exit(3)")
    model = eventually(lambda: (m := stack.api("GET", f"/v1/sessions/{sid}"))["state"] == "ERROR" and m)
    assert model["exit_code"] == 3
    assert "exited with code 3" in model["reason"]
    kc.stop_channels()


@pytest.mark.parametrize("delay", [0.0, 0.15, 0.3, 0.45])
def test_ending_a_session_while_it_starts_leaves_no_container(stack: Stack, delay: float):
    sid = stack.api("POST", "/v1/sessions", {"image": "backendai-jupyter/python"})["id"]
    time.sleep(delay)
    stack.api("DELETE", f"/v1/sessions/{sid}")
    assert stack.api("GET", f"/v1/sessions/{sid}")["state"] in ("TERMINATED", "CANCELLED")
    assert not [c for c in stack.containers() if c.labels["io.backendai-jupyter.session"] == sid]
