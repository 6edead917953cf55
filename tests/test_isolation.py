"""Kernels are fenced in: from inside one, nothing of the host, of other kernels or of the cloud
is reachable, the container is locked down, and its channels are encrypted.

The probe runs inside a real kernel (started through /v1, driven by a real jupyter_client) and
prints what it finds as JSON; the test prints that dict and asserts on it.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import docker
import pytest
import zmq
from jupyter_client.blocking.client import BlockingKernelClient

from backendai_jupyter.agent.app import Agent
from backendai_jupyter.agent.backends.kernel_network import KernelFirewall

from .kernel_helpers import run, stdout
from .stack import SLOT, Stack, aid, port_span, remove_containers, start_up

IMAGE = "backendai-jupyter/python:latest"

# Runs inside the kernel: TARGETS is substituted with {name: [host, port]}.
PROBE = r"""
import json, os, socket
def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return line.split()[1]
def can_write(path):
    try:
        with open(path, "w") as f:
            f.write("x")
        os.remove(path)
        return True
    except OSError:
        return False
def reach(host, port):
    s = socket.socket()
    s.settimeout(3)
    try:
        s.connect((host, port))
        return "open"
    except ConnectionRefusedError:
        return "refused"
    except socket.timeout:
        return "timeout"
    except OSError as e:
        return type(e).__name__
    finally:
        s.close()
found = {
    "uid": os.getuid(),
    "CapEff": status("CapEff"),
    "NoNewPrivs": status("NoNewPrivs"),
    "Seccomp": status("Seccomp"),
    "write /usr": can_write("/usr/probe"),
    "write /": can_write("/probe"),
    # World-writable in the image: only a read-only root keeps the kernel user out of it.
    "write /var/tmp": can_write("/var/tmp/probe"),
    "root mount": next(l.split()[3].split(",")[0] for l in open("/proc/mounts") if l.split()[1] == "/"),
    "write home": can_write(os.path.expanduser("~/probe")),
    "write /tmp": can_write("/tmp/probe"),
    "home": os.path.expanduser("~"),
    "docker socket": any(os.path.exists(p) for p in ("/var/run/docker.sock", "/run/docker.sock")),
    "NVIDIA_VISIBLE_DEVICES": os.environ.get("NVIDIA_VISIBLE_DEVICES"),
}
for name, (host, port) in TARGETS.items():
    found[name] = reach(host, port)
print(json.dumps(found))
"""


def kernel_client(connection: dict[str, Any]) -> BlockingKernelClient:
    kc = BlockingKernelClient()
    kc.load_connection_info(connection)
    kc.start_channels()
    kc.wait_for_ready(timeout=60)
    return kc


def probe(kc: BlockingKernelClient, targets: dict[str, tuple[str, int]]) -> dict[str, Any]:
    reply, outputs = run(kc, PROBE.replace("TARGETS", repr(targets)), timeout=120)
    assert reply["status"] == "ok", reply
    return json.loads(stdout(outputs).strip().splitlines()[-1])


def bridge_address(network: str) -> str:
    net = docker.from_env().networks.get(network)
    return str(net.attrs["IPAM"]["Config"][0]["Gateway"])


def container_ip(stack: Stack, sid: str, network: str) -> str:
    (c,) = [c for c in stack.containers() if c.labels["io.backendai-jupyter.session"] == sid]
    return str(c.attrs["NetworkSettings"]["Networks"][network]["IPAddress"])


def host_address() -> str:
    """This host's address on its default route (what a kernel would use to reach the host)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("192.0.2.123", 9))  # no packet is sent: this only picks the route
        return str(s.getsockname()[0])


def default_gateway() -> str | None:
    out = subprocess.run(["ip", "-4", "route", "show", "default"], capture_output=True, text=True).stdout
    parts = out.split()
    return parts[2] if len(parts) > 2 and parts[0] == "default" else None


class HostService:
    """A TCP service on every host address: what a kernel must not reach (sshd, a database...)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("0.0.0.0", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.accepted: list[Any] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, addr = self.sock.accept()
            except OSError:
                return
            self.accepted.append(addr)
            conn.close()

    def close(self) -> None:
        self.sock.close()


def fenced_stack(tmp: Path, name: str, span: str, *, egress: bool) -> Stack:
    suffix = "d" if not egress else "a"
    return start_up(
        tmp,
        aid(name),
        port_span(span),
        f"--Agent.kernel_network=bai-iso-s{SLOT}{suffix}",
        f"--Agent.kernel_bridge=bai-iso{SLOT}{suffix}",
        f"--Agent.kernel_egress={egress}",
    )


def stop(stack: Stack, suffix: str) -> None:
    """Stop the stack and take its kernel network and firewall rules off the host again."""
    stack.stop()
    remove_containers(stack.agent_id)
    with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
        docker.from_env().networks.get(f"bai-iso-s{SLOT}{suffix}").remove()
    KernelFirewall(f"bai-iso{SLOT}{suffix}", egress=True).remove()


@pytest.fixture(scope="module")
def allowing(tmp_path_factory: pytest.TempPathFactory, docker_engine: Any) -> Iterator[Stack]:
    s = fenced_stack(tmp_path_factory.mktemp("iso-allow"), "test-iso-allow", "31700-31749", egress=True)
    yield s
    stop(s, "a")


@pytest.fixture(scope="module")
def denying(tmp_path_factory: pytest.TempPathFactory, docker_engine: Any) -> Iterator[Stack]:
    s = fenced_stack(tmp_path_factory.mktemp("iso-deny"), "test-iso-deny", "31750-31799", egress=False)
    yield s
    stop(s, "d")


def start_kernel(stack: Stack) -> tuple[str, dict[str, Any]]:
    sid = stack.api("POST", "/v1/sessions", {"image": IMAGE, "resources": {"cpu": "1", "mem": "1g"}})["id"]
    model = stack.api.wait_state(sid, {"RUNNING", "ERROR"}, timeout=120)
    assert model["state"] == "RUNNING", model
    return sid, model["connection"]


def other_user(stack: Stack, name: str) -> Any:
    """A second, non-admin user of the same gateway, with their own keypair."""
    from backendai_jupyter.common.clientconfig import ClientConfig

    from .stack import Api

    created = stack.api("POST", "/v1/admin/users", {"name": name})
    return Api(ClientConfig(stack.url, created["access_key"], created["secret_key"]))


def sniff_iopub(connection: dict[str, Any], seconds: float, **curve: bytes) -> list[list[bytes]]:
    """Subscribe to a kernel's IOPub from the host, the way an eavesdropper would."""
    ctx = zmq.Context.instance()
    sub = ctx.socket(zmq.SUB)
    sub.linger = 0
    for opt, value in curve.items():
        setattr(sub, opt, value)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(f"tcp://{connection['ip']}:{connection['iopub_port']}")
    got: list[list[bytes]] = []
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            if sub.poll(100):
                got.append(sub.recv_multipart())
    finally:
        sub.close(0)
    return got


def test_kernel_is_fenced_in_and_its_channels_are_encrypted(allowing: Stack) -> None:
    net = f"bai-iso-s{SLOT}a"
    service = HostService()
    victim_api = other_user(allowing, f"victim-s{SLOT}")
    victim_sid = victim_api("POST", "/v1/sessions", {"image": IMAGE, "resources": {"cpu": "1", "mem": "1g"}})[
        "id"
    ]
    victim = victim_api.wait_state(victim_sid, {"RUNNING", "ERROR"}, timeout=120)
    assert victim["state"] == "RUNNING", victim
    sid, conn = start_kernel(allowing)
    bridge, host = bridge_address(net), host_address()
    gateway_port = urlparse(allowing.url).port
    assert gateway_port is not None
    gw = default_gateway()
    targets: dict[str, tuple[str, int]] = {
        "host service via bridge": (bridge, service.port),
        "host service via host address": (host, service.port),
        "gateway via bridge": (bridge, gateway_port),
        "gateway via host address": (host, gateway_port),
        "other kernel's shell (container IP)": (container_ip(allowing, victim_sid, net), 2001),
        "other kernel's iopub (published port, host address)": (host, victim["connection"]["iopub_port"]),
        "metadata 169.254.169.254": ("169.254.169.254", 80),
    }
    if gw:
        targets["egress (default gateway)"] = (gw, 80)
    kc = kernel_client(conn)
    try:
        found = probe(kc, targets)
        # An eavesdropper on the kernel's IOPub while it prints: first without curve at all,
        # then with curve but a made-up server key; last a proper client with the key.
        out: dict[str, Any] = {}

        def sniffers() -> None:
            out["plain"] = sniff_iopub(conn, 4)

        def sniffer_wrong_key() -> None:
            public, secret = zmq.curve_keypair()
            wrong, _ = zmq.curve_keypair()
            out["wrong key"] = sniff_iopub(
                conn, 4, curve_publickey=public, curve_secretkey=secret, curve_serverkey=wrong
            )

        threads = [threading.Thread(target=sniffers), threading.Thread(target=sniffer_wrong_key)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        reply, outputs = run(
            kc, "import time\nfor i in range(25):\n    print('secret', i, flush=True)\n    time.sleep(0.1)"
        )
        for t in threads:
            t.join()
        found["iopub messages read by a plain SUB"] = len(out["plain"])
        found["iopub messages read with a wrong server key"] = len(out["wrong key"])
        found["stdout lines read by the owner's client"] = stdout(outputs).count("secret")
    finally:
        kc.stop_channels()
        service.close()
    print("probe:", json.dumps(found, indent=2))

    assert found["uid"] != 0
    assert found["CapEff"] == "0000000000000000"
    assert found["NoNewPrivs"] == "1"
    assert found["Seccomp"] == "2"
    assert not found["write /usr"] and not found["write /"] and not found["write /var/tmp"]
    assert found["root mount"] == "ro"
    assert found["write home"] and found["write /tmp"]
    assert found["home"] == Agent.kernel_home.default_value
    assert not found["docker socket"]
    assert found["NVIDIA_VISIBLE_DEVICES"] == "void"
    for name in targets:
        if name.startswith("egress"):
            continue
        assert found[name] == "timeout", (name, found[name])
    if gw:
        assert found["egress (default gateway)"] in ("open", "refused"), "egress is allowed here"
    assert service.accepted == []
    assert conn["encryption"] == "curve" and conn["curve_publickey"]
    assert found["iopub messages read by a plain SUB"] == 0
    assert found["iopub messages read with a wrong server key"] == 0
    assert found["stdout lines read by the owner's client"] == 25
    allowing.api("DELETE", f"/v1/sessions/{sid}")
    victim_api("DELETE", f"/v1/sessions/{victim_sid}")


def test_egress_is_denied_when_the_agent_says_so(denying: Stack) -> None:
    gw = default_gateway()
    if gw is None:
        pytest.skip("this host has no default route to test egress against")
    sid, conn = start_kernel(denying)
    bridge = bridge_address(f"bai-iso-s{SLOT}d")
    kc = kernel_client(conn)
    try:
        found = probe(kc, {"egress (default gateway)": (gw, 80), "host sshd via bridge": (bridge, 22)})
        # The kernel still answers its clients: replies are not new connections.
        _, outputs = run(kc, "print(6 * 7)")
    finally:
        kc.stop_channels()
    print("probe (egress denied):", json.dumps(found, indent=2))
    assert found["egress (default gateway)"] == "timeout"
    assert found["host sshd via bridge"] == "timeout"
    assert stdout(outputs).strip() == "42"
    denying.api("DELETE", f"/v1/sessions/{sid}")
