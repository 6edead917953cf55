"""A stock KernelManager on our kernelspec: the kernel runs in a container, and every verb works."""

from __future__ import annotations

import time

import pytest
from jupyter_client.manager import KernelManager

from .conftest import SPEC
from .kernel_helpers import client, run, stdout
from .stack import Stack, port_is_free

pytestmark = pytest.mark.docker


def _container_of(stack: Stack, km: KernelManager):
    sid = km.provisioner.session_id
    found = [c for c in stack.containers() if c.labels["io.backendai-jupyter.session"] == sid]
    assert len(found) == 1, found
    return found[0]


def test_code_runs_inside_a_container_as_an_unprivileged_user(stack: Stack, km: KernelManager):
    kc = client(km)
    reply, outputs = run(kc, "import os; print(os.path.exists('/.dockerenv'), os.getuid())")
    assert reply["status"] == "ok"
    uid_line = stdout(outputs).split()
    assert uid_line[0] == "True"
    assert uid_line[1] != "0"
    container = _container_of(stack, km)
    host_cfg = container.attrs["HostConfig"]
    assert host_cfg["CapDrop"] == ["ALL"]
    assert "no-new-privileges" in host_cfg["SecurityOpt"]
    assert host_cfg["Memory"] == 2**30 and host_cfg["NanoCpus"] == 10**9
    assert host_cfg["PidsLimit"] > 0
    # The connection key reaches the kernel only through the mounted file.
    assert not any(km.session.key.decode() in e for e in container.attrs["Config"]["Env"])
    assert not any(km.session.key.decode() in v for v in container.labels.values())
    kc.stop_channels()


def test_output_of_a_loop_streams_while_it_runs(km: KernelManager):
    kc = client(km)
    arrivals: list[tuple[float, str]] = []

    def hook(msg):
        if msg["msg_type"] == "stream":
            arrivals.append((time.monotonic(), msg["content"]["text"]))

    code = "import time\nfor i in range(5):\n    print(i, flush=True)\n    time.sleep(0.3)"
    reply = kc.execute_interactive(code, output_hook=hook, timeout=30)
    assert reply["content"]["status"] == "ok"
    assert "".join(t for _, t in arrivals).split() == ["0", "1", "2", "3", "4"]
    # Streamed, not delivered at the end: the first line came well before the last.
    assert arrivals[-1][0] - arrivals[0][0] > 0.8
    kc.stop_channels()


def test_the_first_execute_never_loses_its_output(stack: Stack):
    """Ready means IOPub delivers: the very first execute's output must arrive, every time."""
    for _ in range(3):
        km = KernelManager(kernel_name=SPEC)
        km.start_kernel()
        try:
            kc = km.client()
            kc.start_channels()
            outputs: list = []
            reply = kc.execute_interactive("print('first')", output_hook=outputs.append, timeout=30)
            assert reply["content"]["status"] == "ok"
            assert stdout(outputs) == "first\n"
            kc.stop_channels()
        finally:
            km.shutdown_kernel(now=True)


def test_busy_loop_is_interrupted_within_two_seconds(km: KernelManager):
    kc = client(km)
    msg_id = kc.execute("while True: pass")
    time.sleep(0.5)
    start = time.monotonic()
    km.interrupt_kernel()
    reply = kc.get_shell_msg(timeout=5)
    took = time.monotonic() - start
    assert reply["parent_header"]["msg_id"] == msg_id
    assert reply["content"]["status"] == "error"
    assert reply["content"]["ename"] == "KeyboardInterrupt"
    assert took < 2.0, f"interrupt took {took:.2f} s"
    # The kernel lives on after the interrupt.
    assert stdout(run(kc, "print('alive')")[1]) == "alive\n"
    kc.stop_channels()


def test_restart_gives_a_new_container_and_clients_keep_working(stack: Stack, km: KernelManager):
    kc = client(km)
    run(kc, "x = 41")
    before = _container_of(stack, km).id
    ports = {k: v for k, v in km.get_connection_info().items() if k.endswith("_port")}
    km.restart_kernel()
    kc.wait_for_ready(timeout=60)
    after = _container_of(stack, km).id
    assert after != before
    # Same ports and key as before, so an attached client just reconnects.
    assert {k: v for k, v in km.get_connection_info().items() if k.endswith("_port")} == ports
    reply, outputs = run(kc, "print('x' in dir())")
    assert stdout(outputs) == "False\n"  # a fresh interpreter
    kc.stop_channels()


def test_shutdown_leaves_no_container_no_port_and_a_terminated_session(stack: Stack):
    km = KernelManager(kernel_name=SPEC)
    km.start_kernel()
    sid = km.provisioner.session_id
    ports = [v for k, v in km.get_connection_info().items() if k.endswith("_port")]
    assert _container_of(stack, km)
    km.shutdown_kernel()
    assert not [c for c in stack.containers() if c.labels["io.backendai-jupyter.session"] == sid]
    assert all(port_is_free(p) for p in ports)
    model = stack.api("GET", f"/v1/sessions/{sid}")
    assert model["state"] == "TERMINATED"
    states = [t["state"] for t in model["transitions"]]
    assert states[:5] == ["PENDING", "SCHEDULED", "PREPARING", "CREATING", "RUNNING"]
    assert states[-1] == "TERMINATED"
