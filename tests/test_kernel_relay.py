"""The CurveZMQ relay of the kernel images (kernels/base/kernel_relay.py), on this host.

A plaintext ipykernel stands in for the kernels that need the relay (IRkernel, Deno): clients
speak CurveZMQ to the relay's ports, as they do to a kernel container's.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import zmq
from jupyter_client.blocking.client import BlockingKernelClient

from .kernel_helpers import run, stdout

RELAY = Path(__file__).resolve().parent.parent / "kernels" / "base" / "kernel_relay.py"
CHANNELS = ("shell", "iopub", "stdin", "control", "hb")


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _connection_file(path: Path, curve: bool) -> Path:
    info: dict[str, object] = {
        "ip": "127.0.0.1",
        "transport": "tcp",
        "signature_scheme": "hmac-sha256",
        "key": uuid.uuid4().hex,
        "kernel_name": "",
        **{f"{ch}_port": port for ch, port in zip(CHANNELS, _free_ports(len(CHANNELS)), strict=True)},
    }
    if curve:
        public, secret = zmq.curve_keypair()
        info.update(curve_publickey=public.decode(), curve_secretkey=secret.decode())
    path.write_text(json.dumps(info))
    path.chmod(0o600)
    return path


@dataclass
class Relayed:
    proc: subprocess.Popen[bytes]
    kc: BlockingKernelClient
    home: Path


Start = Callable[..., Relayed]


@pytest.fixture
def relayed(tmp_path: Path) -> Iterator[Start]:
    """Start ipykernel behind the relay; return the relay's process and a client of its ports."""
    started: list[Relayed] = []

    def start(mode: str = "signal", curve: bool = True) -> Relayed:
        home = tmp_path / f"home{len(started)}"
        home.mkdir(mode=0o700)
        conn = _connection_file(home / "connection.json", curve)
        argv = [sys.executable, str(RELAY), "--interrupt-mode", mode, str(conn), "--"]
        argv += [sys.executable, "-m", "ipykernel_launcher", "-f", str(conn)]
        env = {**os.environ, "HOME": str(home), "IPYTHONDIR": str(home / ".ipython")}
        proc = subprocess.Popen(argv, env=env, start_new_session=True)
        kc = BlockingKernelClient()
        kc.load_connection_file(str(conn))
        # No heartbeat channel: it would call the kernel dead while it is still starting.
        kc.start_channels(hb=False)
        started.append(Relayed(proc, kc, home))
        kc.wait_for_ready(timeout=60)
        return started[-1]

    yield start
    for r in started:
        proc = r.proc
        r.kc.stop_channels()
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _reply(kc: BlockingKernelClient, msg_id: str) -> dict:
    """The shell reply to ``msg_id``, past others (wait_for_ready may leave kernel_info replies)."""
    while True:
        reply = kc.get_shell_msg(timeout=30)
        if reply["parent_header"]["msg_id"] == msg_id:
            return reply


def test_relay_serves_curve_in_front_of_a_plaintext_kernel(relayed: Start):
    r = relayed()
    kc = r.kc
    assert kc.session.key  # same HMAC key on both sides: messages pass untouched
    reply, outputs = run(kc, "x = 6 * 7\nprint(x)")
    assert reply["status"] == "ok"
    assert stdout(outputs) == "42\n"
    reply, outputs = run(kc, "print(x + 1)")
    assert stdout(outputs) == "43\n"
    # The kernel itself listens on loopback ports of its own, without curve.
    inner = json.loads((r.home / ".kernel-relay-inner.json").read_text())
    assert inner["ip"] == "127.0.0.1" and "curve_secretkey" not in inner
    assert inner["key"] == kc.session.key.decode()


def test_a_client_without_the_keys_reads_nothing(relayed: Start):
    kc = relayed().kc
    ctx = zmq.Context.instance()
    sub = ctx.socket(zmq.SUB)
    sub.linger = 0
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(f"tcp://127.0.0.1:{kc.iopub_port}")
    try:
        run(kc, "print('secret')")
        assert not sub.poll(1000)
    finally:
        sub.close()


def test_stdin_reaches_the_client_through_the_relay(relayed: Start):
    kc = relayed().kc
    outputs: list[dict] = []
    kc.execute_interactive(
        "print('got', input('name? '))",
        allow_stdin=True,
        stdin_hook=lambda msg: kc.input("relay"),
        output_hook=outputs.append,
        timeout=30,
    )
    assert stdout(outputs).endswith("got relay\n")


@pytest.mark.parametrize("mode", ["signal", "message"])
def test_sigint_to_the_relay_interrupts_the_kernel(relayed: Start, mode: str):
    r = relayed(mode)
    proc, kc = r.proc, r.kc
    msg_id = kc.execute("import time\nwhile True: time.sleep(0.05)")
    # Wait until the cell runs, then interrupt as the container's init would: SIGINT to the relay.
    while True:
        msg = kc.get_iopub_msg(timeout=30)
        if msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "execute_input":
            break
    time.sleep(1)  # inside the loop by now
    os.kill(proc.pid, signal.SIGINT)
    reply = _reply(kc, msg_id)
    assert reply["content"]["status"] == "error"
    assert reply["content"]["ename"] == "KeyboardInterrupt"
    assert proc.poll() is None
    reply, outputs = run(kc, "print('still here')")
    assert stdout(outputs) == "still here\n", (reply, outputs)


def test_relay_exits_with_the_kernel(relayed: Start):
    r = relayed()
    r.kc.shutdown()
    assert r.proc.wait(30) == 0


def test_without_curve_keys_the_kernel_runs_in_the_relays_place(relayed: Start):
    r = relayed(curve=False)
    reply, outputs = run(r.kc, "import os; print(os.getpid())")
    assert int(stdout(outputs)) == r.proc.pid


def test_each_client_gets_its_own_replies(relayed: Start):
    r = relayed()
    other = BlockingKernelClient()
    other.load_connection_info(r.kc.get_connection_info())
    other.session.key = r.kc.session.key
    other.start_channels(hb=False)
    try:
        other.wait_for_ready(timeout=30)
        mine = r.kc.execute("print('mine')")
        theirs = other.execute("print('theirs')")
        assert _reply(r.kc, mine)["content"]["status"] == "ok"
        assert _reply(other, theirs)["content"]["status"] == "ok"
    finally:
        other.stop_channels()


def _relay_module():
    spec = importlib.util.spec_from_file_location("kernel_relay", RELAY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _iopub(msg_type: str, parent: str, content: dict) -> list[bytes]:
    header = {"msg_id": uuid.uuid4().hex, "msg_type": msg_type}
    parts = [header, {"msg_id": parent}, {}, content]
    return [b"<IDS|MSG>", b"", *(json.dumps(p).encode() for p in parts)]


def test_idle_held_back_until_the_requests_late_output():
    """--hold-idle-ms: a result published just after idle still reaches clients before it."""
    relay = _relay_module()
    ctx = zmq.Context()
    kernel, back, front, client = (ctx.socket(t) for t in (zmq.PUB, zmq.XSUB, zmq.XPUB, zmq.SUB))
    try:
        port = kernel.bind_to_random_port("tcp://127.0.0.1")
        back.connect(f"tcp://127.0.0.1:{port}")
        front_port = front.bind_to_random_port("tcp://127.0.0.1")
        client.setsockopt(zmq.SUBSCRIBE, b"")
        client.connect(f"tcp://127.0.0.1:{front_port}")
        threading.Thread(target=relay.IopubRelay(front, back, 0.5).run, daemon=True).start()
        # Subscriptions travel up through the relay; publish until one gets through.
        while not client.poll(100):
            kernel.send_multipart(_iopub("status", "warmup", {"execution_state": "starting"}))
        while client.poll(200):
            client.recv_multipart()

        kernel.send_multipart(_iopub("status", "a", {"execution_state": "idle"}))
        kernel.send_multipart(_iopub("execute_result", "a", {"data": {"text/plain": "2"}}))
        kernel.send_multipart(_iopub("status", "b", {"execution_state": "busy"}))
        kernel.send_multipart(_iopub("status", "b", {"execution_state": "idle"}))
        started = time.monotonic()
        got = []
        while len(got) < 4:
            assert client.poll(5000)
            frames = client.recv_multipart()
            header, parent, _, content = (json.loads(f) for f in frames[2:6])
            got.append((header["msg_type"], parent["msg_id"], content.get("execution_state")))
        assert got == [
            ("execute_result", "a", None),
            ("status", "a", "idle"),
            ("status", "b", "busy"),
            ("status", "b", "idle"),  # nothing came after it: released when its time is up
        ]
        assert time.monotonic() - started >= 0.4
    finally:
        kernel.close(0)
        client.close(0)
        ctx.term()  # the relay closes its sockets as the context ends


def test_without_curve_keys_a_message_interrupting_relay_still_stands_in_front(relayed: Start):
    r = relayed(mode="message", curve=False)
    reply, outputs = run(r.kc, "import os; print(os.getpid())")
    assert int(stdout(outputs)) != r.proc.pid
    msg_id = r.kc.execute("import time\nwhile True: time.sleep(0.05)")
    time.sleep(1)
    os.kill(r.proc.pid, signal.SIGINT)
    assert _reply(r.kc, msg_id)["content"]["ename"] == "KeyboardInterrupt"


@pytest.mark.docker
@pytest.mark.parametrize("image", ["deno", "r"])
def test_a_relayed_image_runs_with_its_connection_file_in_a_read_only_place(image: str, tmp_path: Path):
    """A bare ``docker run`` mounts the connection file alone, into a directory of the image.

    The kernel's own connection file cannot go beside it (the directory is root's); the relay
    puts it in a private temporary file instead.
    """
    import docker

    from backendai_jupyter.agent.launch import CONNECTION_FILE_IN_CONTAINER
    from backendai_jupyter.common.wire import KERNEL_HOME
    from backendai_jupyter.images import KERNEL_LABEL, image_repository

    client = docker.from_env()
    ref = f"{image_repository(image)}:latest"
    argv = json.loads(client.images.get(ref).labels[KERNEL_LABEL])["argv"]
    ports = dict(zip(CHANNELS, _free_ports(len(CHANNELS)), strict=True))
    conn = _connection_file(tmp_path / "connection.json", curve=False)
    info = json.loads(conn.read_text())
    inside = {**info, "ip": "0.0.0.0", **{f"{ch}_port": 9000 + i for i, ch in enumerate(CHANNELS)}}
    conn.write_text(json.dumps(inside))
    conn.chmod(0o644)
    name = f"bai-test-relay-{uuid.uuid4().hex[:12]}"
    container = client.containers.run(
        ref,
        command=[a.replace("{connection_file}", CONNECTION_FILE_IN_CONTAINER) for a in argv],
        name=name,
        user="1000:1000",
        read_only=True,
        tmpfs={"/tmp": "size=64m,mode=1777", KERNEL_HOME: "size=64m,uid=1000,gid=1000"},
        ports={f"{9000 + i}/tcp": ("127.0.0.1", ports[ch]) for i, ch in enumerate(CHANNELS)},
        volumes={str(conn): {"bind": CONNECTION_FILE_IN_CONTAINER, "mode": "ro"}},
        detach=True,
    )
    kc = BlockingKernelClient()
    try:
        kc.load_connection_info({**info, **{f"{ch}_port": port for ch, port in ports.items()}})
        kc.start_channels(hb=False)
        kc.wait_for_ready(timeout=60)
        assert container.reload() is None and container.status == "running"
    finally:
        kc.stop_channels()
        logs = container.logs().decode(errors="replace")
        container.remove(force=True)
    assert "PermissionError" not in logs, logs
