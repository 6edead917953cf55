"""The agent's kernel runner and Docker backend in-process, against the real Docker engine.

These drive :class:`KernelRunner` directly (no gateway) where the point is what the agent does
with containers: how they are confined, that Docker event loss is survived, and that an end order
racing a restart leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
import tempfile
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import docker
import pytest
from jupyter_client.blocking.client import BlockingKernelClient

from backendai_jupyter.agent.app import Agent
from backendai_jupyter.agent.backends.base import BackendError
from backendai_jupyter.agent.backends.docker import DockerBackend, DockerSettings
from backendai_jupyter.agent.backends.kernel_network import KernelFirewall, ensure_network
from backendai_jupyter.agent.kernels import KernelPolicy, KernelRunner
from backendai_jupyter.agent.launch import Endpoint, LaunchSpec
from backendai_jupyter.agent.launch import Mount as LaunchMount
from backendai_jupyter.common.slots import ResourceSlot
from backendai_jupyter.common.wire import CreateKernel, KernelReport

from .kernel_helpers import run, stdout
from .stack import SLOT, aid, port_span, remove_containers

IMAGE = "backendai-jupyter/python:latest"
NETWORK, BRIDGE = f"bai-rt-s{SLOT}", f"bai-rt{SLOT}"
DOCKER_SOCKET = "/var/run/docker.sock"
# Paths inside the kernel's container: the agent's default home for the kernel user, and /tmp.
HOME = Agent.kernel_home.default_value
TMP = "/tmp"


def policy(**overrides: Any) -> KernelPolicy:
    base: dict[str, Any] = dict(
        kernel_user="1000:1000",
        home=HOME,
        home_size="256m",
        tmp_size="128m",
        pids_limit=512,
        log_max_size="1m",
        log_max_files=2,
    )
    return KernelPolicy(**{**base, **overrides})


class Runner:
    """A KernelRunner of its own agent id, and the reports it sends."""

    def __init__(self, tmp: Path, name: str, span: str, **kw: Any) -> None:
        self.agent_id = aid(name)
        self.reports: list[KernelReport] = []
        low, high = (int(p) for p in port_span(span).split("-"))
        settings = DockerSettings(self.agent_id, "127.0.0.1", "127.0.0.1", (low, high), NETWORK, BRIDGE, True)
        self.backend = DockerBackend(settings)
        self.runner = KernelRunner(self.backend, policy(), tmp, 60, self.reports.append, **kw)

    async def start_kernel(self, image: str = IMAGE, env: dict[str, str] | None = None) -> CreateKernel:
        order = CreateKernel(
            session_id=uuid.uuid4().hex[:12],
            image=image,
            resources=ResourceSlot.parse({"cpu": "1", "mem": "1g"}),
            env=env or {},
            owner="tester",
        )
        await self.runner.create(order)
        return order

    async def state(self, sid: str, states: set[str], timeout: float = 90) -> KernelReport:
        """The first report of ``sid`` in one of ``states``."""
        for _ in range(int(timeout * 10)):
            for r in self.reports:
                if r.session_id == sid and r.state.value in states:
                    return r
            await asyncio.sleep(0.1)
        raise AssertionError(f"{sid} never reached {states}: {[(r.state, r.reason) for r in self.reports]}")

    def containers(self) -> list[Any]:
        client = docker.DockerClient(base_url=f"unix://{DOCKER_SOCKET}")
        return client.containers.list(
            all=True, filters={"label": f"io.backendai-jupyter.agent={self.agent_id}"}
        )

    def close(self) -> None:
        self.backend.close()
        remove_containers(self.agent_id)


@pytest.fixture(scope="module", autouse=True)
def kernel_network() -> Iterator[None]:
    """The runners here share one kernel network; it and its rules leave with the module."""
    yield
    with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
        docker.from_env().networks.get(NETWORK).remove()
    KernelFirewall(BRIDGE, egress=True).remove()


@pytest.fixture
async def runner(tmp_path: Path, docker_engine: Any) -> AsyncIterator[Runner]:
    r = Runner(tmp_path, "test-runner", "31960-31979")
    await r.runner.start()
    yield r
    await r.runner.destroy_all()
    r.close()


def connect(connection: dict[str, Any]) -> BlockingKernelClient:
    kc = BlockingKernelClient()
    kc.load_connection_info(connection)
    kc.start_channels()
    kc.wait_for_ready(timeout=60)
    return kc


# -- confinement -----------------------------------------------------------------------------


async def test_container_is_read_only_limited_and_gets_no_reserved_env(runner: Runner) -> None:
    order = await runner.start_kernel(
        env={"LD_PRELOAD": "libevil.so", "NVIDIA_VISIBLE_DEVICES": "all", "HOME": "/", "KERNEL_OK": "1"}
    )
    await runner.state(order.session_id, {"RUNNING"})
    (c,) = runner.containers()
    host = c.attrs["HostConfig"]
    env = dict(e.split("=", 1) for e in c.attrs["Config"]["Env"])
    assert host["ReadonlyRootfs"] is True
    assert set(host["Tmpfs"]) == {HOME, TMP}
    assert "size=256m" in host["Tmpfs"][HOME] and "uid=1000" in host["Tmpfs"][HOME]
    assert host["LogConfig"] == {"Type": "json-file", "Config": {"max-size": "1m", "max-file": "2"}}
    assert host["NanoCpus"] == 10**9 and host["Memory"] == 2**30 and host["PidsLimit"] == 512
    assert list(c.attrs["NetworkSettings"]["Networks"]) == [NETWORK]
    assert "LD_PRELOAD" not in env and env["KERNEL_OK"] == "1"
    assert env["NVIDIA_VISIBLE_DEVICES"] == "void" and env["HOME"] == HOME


async def test_plotting_and_numpy_work_with_a_read_only_root(runner: Runner) -> None:
    order = await runner.start_kernel()
    report = await runner.state(order.session_id, {"RUNNING"})
    assert report.connection is not None
    kc = await asyncio.to_thread(connect, report.connection)
    try:
        code = (
            "import numpy as np, matplotlib.pyplot as plt, IPython\n"
            "plt.plot(np.arange(10) ** 2); plt.show()\n"
            "print(IPython.paths.get_ipython_dir())"
        )
        reply, outputs = await asyncio.to_thread(run, kc, code)
    finally:
        kc.stop_channels()
    assert reply["status"] == "ok", reply
    pngs = [m for m in outputs if m["msg_type"] == "display_data" and "image/png" in m["content"]["data"]]
    assert pngs, outputs
    assert stdout(outputs).strip() == f"{HOME}/.ipython"


async def test_order_without_cpu_or_memory_limit_is_refused(runner: Runner) -> None:
    for cpu, mem in ((Decimal(0), 2**30), (Decimal(1), 0), (Decimal(0), 0)):
        spec = LaunchSpec(
            session_id=f"nolimit{SLOT}",
            image=IMAGE,
            command=["sleep", "60"],
            env={},
            user="1000:1000",
            cpu=cpu,
            mem=mem,
            connection_file="/dev/null",
        )
        with pytest.raises(BackendError, match="positive CPU and memory limit"):
            await runner.backend.create(spec, Endpoint("127.0.0.1", {}))
    assert runner.containers() == []


async def test_image_without_curve_is_refused_unless_the_agent_allows_it(
    tmp_path: Path, docker_engine: Any
) -> None:
    plain = f"backendai-jupyter/python-plain:test-s{SLOT}"
    label = docker_engine.images.get(IMAGE).labels["io.backendai-jupyter.kernel"]
    kernel = {**json.loads(label), "encryption": False}
    dockerfile = f"FROM {IMAGE}\nLABEL io.backendai-jupyter.kernel='{json.dumps(kernel)}'\n"
    build = ["docker", "build", "-q", "-t", plain, "-"]
    await asyncio.to_thread(subprocess.run, build, input=dockerfile, text=True, check=True)
    strict = Runner(tmp_path / "strict", "test-plain-strict", "31960-31969")
    lenient = Runner(tmp_path / "lenient", "test-plain-lenient", "31970-31979", allow_unencrypted=True)
    try:
        await strict.runner.start()
        await lenient.runner.start()
        refused = await strict.start_kernel(plain)
        report = await strict.state(refused.session_id, {"ERROR", "RUNNING"})
        assert report.state.value == "ERROR" and "allow_unencrypted_kernels" in report.reason
        assert strict.containers() == []
        allowed = await lenient.start_kernel(plain)
        report = await lenient.state(allowed.session_id, {"ERROR", "RUNNING"})
        assert report.state.value == "RUNNING", report.reason
        assert report.connection is not None
        assert report.connection["encryption"] == "none" and "curve_publickey" not in report.connection
        kc = await asyncio.to_thread(connect, report.connection)
        _, outputs = await asyncio.to_thread(run, kc, "print('plain')")
        kc.stop_channels()
        assert stdout(outputs).strip() == "plain"
    finally:
        await lenient.runner.destroy_all()
        strict.close()
        lenient.close()
        docker_engine.images.remove(plain, force=True)


def test_network_that_lets_kernels_talk_is_refused(docker_engine: Any) -> None:
    name = f"bai-icc-s{SLOT}"
    with contextlib.suppress(docker.errors.NotFound):
        docker_engine.networks.get(name).remove()
    docker_engine.networks.create(name, driver="bridge")
    try:
        with pytest.raises(BackendError, match="docker network rm"):
            ensure_network(docker_engine, name, f"bai-icc{SLOT}")
    finally:
        docker_engine.networks.get(name).remove()


def _rules(bridge: str) -> dict[str, int]:
    counts = {}
    for chain in ("INPUT", "DOCKER-USER"):
        out = subprocess.run(["iptables", "-S", chain], capture_output=True, text=True, check=True).stdout
        counts[chain] = sum(f"-i {bridge} " in line for line in out.splitlines())
    return counts


def test_firewall_rules_are_idempotent_follow_the_egress_setting_and_come_out() -> None:
    bridge = f"bai-fwt{SLOT}"
    try:
        assert KernelFirewall(bridge, egress=False).apply()
        assert KernelFirewall(bridge, egress=False).apply()
        assert _rules(bridge) == {"INPUT": 1, "DOCKER-USER": 2}
        assert KernelFirewall(bridge, egress=True).apply()
        assert _rules(bridge) == {"INPUT": 1, "DOCKER-USER": 1}
    finally:
        KernelFirewall(bridge, egress=True).remove()
    assert _rules(bridge) == {"INPUT": 0, "DOCKER-USER": 0}


# -- Docker events ---------------------------------------------------------------------------


class DockerProxy:
    """The Docker API socket through a relay the test can cut, as when the engine restarts."""

    def __init__(self) -> None:
        self.path = str(Path(tempfile.mkdtemp(prefix="bai-dp")) / "docker.sock")
        self.conns: list[socket.socket] = []
        self.lock = threading.Lock()
        self.restore()

    def restore(self) -> None:
        self.server = socket.socket(socket.AF_UNIX)
        self.server.bind(self.path)
        self.server.listen(64)
        threading.Thread(target=self._accept, args=(self.server,), daemon=True).start()

    def cut(self) -> None:
        self.server.close()
        Path(self.path).unlink()
        with self.lock:
            for s in self.conns:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()
            self.conns.clear()

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return
            engine = socket.socket(socket.AF_UNIX)
            engine.connect(DOCKER_SOCKET)
            with self.lock:
                self.conns += [client, engine]
            for a, b in ((client, engine), (engine, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


@pytest.fixture
def docker_proxy(monkeypatch: pytest.MonkeyPatch) -> Iterator[DockerProxy]:
    proxy = DockerProxy()
    monkeypatch.setenv("DOCKER_HOST", f"unix://{proxy.path}")
    yield proxy
    with contextlib.suppress(OSError):
        proxy.cut()


async def test_kernel_deaths_are_reported_after_the_docker_event_stream_drops(
    tmp_path: Path, docker_engine: Any, docker_proxy: DockerProxy
) -> None:
    r = Runner(tmp_path, "test-events", "31960-31979")
    try:
        await r.runner.start()
        first, second = await r.start_kernel(), await r.start_kernel()
        await r.state(first.session_id, {"RUNNING"})
        await r.state(second.session_id, {"RUNNING"})
        docker_proxy.cut()  # the engine "restarts": the event stream and every connection drop
        await asyncio.sleep(1)
        direct = docker.DockerClient(base_url=f"unix://{DOCKER_SOCKET}")
        (victim,) = [
            c for c in r.containers() if c.labels["io.backendai-jupyter.session"] == first.session_id
        ]
        victim.kill()  # dies while nobody listens
        await asyncio.sleep(2)
        docker_proxy.restore()
        missed = await r.state(first.session_id, {"ERROR", "TERMINATED"}, timeout=30)
        assert "killed" in missed.reason
        # And the stream is followed again: a later death is reported as it happens.
        (later,) = [
            c for c in r.containers() if c.labels["io.backendai-jupyter.session"] == second.session_id
        ]
        direct.api.kill(later.id)
        reported = await r.state(second.session_id, {"ERROR", "TERMINATED"}, timeout=30)
        assert "killed" in reported.reason
    finally:
        await r.runner.destroy_all()
        r.close()


# -- restart and destroy racing ------------------------------------------------------------------


@pytest.mark.parametrize("delay", [0.0, 0.05, 0.3, 0.8, 1.5, 3.0])
async def test_end_order_during_a_restart_leaves_no_container(runner: Runner, delay: float) -> None:
    order = await runner.start_kernel()
    await runner.state(order.session_id, {"RUNNING"})
    restart = asyncio.ensure_future(runner.runner.restart(order))
    await asyncio.sleep(delay)
    await runner.runner.destroy(order.session_id)
    with contextlib.suppress(BackendError):
        await restart
    await asyncio.sleep(1)  # anything still starting would show up by now
    assert runner.containers() == []
    assert order.session_id not in runner.runner.kernels


def _runner_for_mounts(tmp: Path, volume_paths: dict[str, str]) -> KernelRunner:
    # The mount checks need no backend: the runner only turns an order's mounts into binds.
    return KernelRunner(
        backend=None,  # type: ignore[arg-type]
        policy=policy(),
        state_dir=tmp,
        ready_timeout=1,
        report=lambda *a: None,
        volume_paths=volume_paths,
    )


def test_the_agent_binds_only_vfolders_beneath_a_volume_into_the_kernels_home(tmp_path: Path):
    from backendai_jupyter.common.wire import Mount

    volume = tmp_path / "volume"
    (volume / "owner" / "vf").mkdir(parents=True)
    good = Mount("local", str(volume), "owner/vf", f"{HOME}/data", "ro", "vf", "data")

    def order(*mounts: Mount) -> CreateKernel:
        return CreateKernel(
            "s", IMAGE, ResourceSlot.parse({"cpu": "1", "mem": "1g"}), {}, "o", mounts=list(mounts)
        )

    runner = _runner_for_mounts(tmp_path, {})
    assert runner._mounts(order(good)) == [
        LaunchMount(str(volume / "owner" / "vf"), f"{HOME}/data", read_only=True)
    ]
    bad = [
        Mount("local", str(volume), "../etc", f"{HOME}/x", "rw"),
        Mount("local", str(volume), "/etc", f"{HOME}/x", "rw"),
        Mount("local", str(volume), "owner/vf", "/etc", "rw"),
        Mount("local", str(volume), "owner/vf", HOME, "rw"),
        Mount("local", str(volume), "owner/vf", f"{HOME}/../x", "rw"),
        Mount("local", str(volume), "owner/vf", f"{HOME}/x", "rwx"),
        Mount("local", str(volume), "owner/missing", f"{HOME}/x", "rw"),
    ]
    for m in bad:
        with pytest.raises(BackendError):
            runner._mounts(order(m))
    # An agent that maps its volumes mounts those only, from its own path for them.
    elsewhere = tmp_path / "mnt"
    (elsewhere / "owner" / "vf").mkdir(parents=True)
    mapped = _runner_for_mounts(tmp_path, {"local": str(elsewhere)})
    assert [m.source for m in mapped._mounts(order(good))] == [str(elsewhere / "owner" / "vf")]
    with pytest.raises(BackendError, match="does not have"):
        mapped._mounts(order(Mount("other", str(volume), "owner/vf", f"{HOME}/d", "rw", name="d")))
