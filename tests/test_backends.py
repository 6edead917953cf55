"""Container backends: what the agent asks of one, and how the Docker backend says it to Docker.

A backend of this module's own, which runs kernels as plain processes of this host, is installed
under a name of the entry-point group and driven by a real agent through a real gateway: the agent
needs nothing of a backend beyond the interface. The Docker backend's translation of a launch spec
is checked against the create arguments it always passed, with no engine.
"""

from __future__ import annotations

import ast
import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
from decimal import Decimal
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
from docker.types import DeviceRequest, LogConfig
from jupyter_client.blocking.client import BlockingKernelClient

import backendai_jupyter
from backendai_jupyter.agent.app import Agent
from backendai_jupyter.agent.backends import base as backends_base
from backendai_jupyter.agent.backends.base import (
    ENTRY_POINT_GROUP,
    BackendError,
    ContainerBackend,
    ExitCallback,
    KernelContainer,
    ReconnectCallback,
    available_backends,
)
from backendai_jupyter.agent.backends.docker import DockerBackend, DockerSettings
from backendai_jupyter.agent.kernels import KernelPolicy
from backendai_jupyter.agent.launch import (
    CONTAINER_PORTS,
    LABEL_OWNER,
    DeviceGrant,
    Endpoint,
    LaunchSpec,
    Mount,
)
from backendai_jupyter.common.wire import ImageInfo

from .inproc import IMAGE, running_gateway
from .kernel_helpers import run, stdout
from .stack import aid, free_port, port_span

PACKAGE = Path(backendai_jupyter.__file__).parent
HOME = Agent.kernel_home.default_value
# Besides the agent's Docker backend (and its network), only the host tools that build kernel images
# and list them for kernelspecs talk to a Docker engine: the agent, gateway and provisioner never do.
DOCKER_MODULES = {
    "agent/backends/docker.py",
    "agent/backends/kernel_network.py",
    "images.py",
    "kernelspec_install.py",
}

VOLUME_DIR = str(PurePosixPath("/", "volumes", "local", "ann", "notes"))  # a vfolder on the host


# -- who speaks Docker -------------------------------------------------------------------------------


def _imports_docker(source: str) -> bool:
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "docker" for a in node.names):
            return True
        if (
            isinstance(node, ast.ImportFrom)
            and node.level == 0
            and (node.module or "").split(".")[0] == "docker"
        ):
            return True
    return False


def test_no_module_outside_the_docker_backend_imports_docker():
    importers = {
        p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py") if _imports_docker(p.read_text())
    }
    assert "agent/backends/docker.py" in importers  # the walk sees imports at all
    assert importers - DOCKER_MODULES == set()


# -- finding backends by name ------------------------------------------------------------------------


def test_the_docker_backend_is_found_by_name_without_installed_entry_points(monkeypatch):
    monkeypatch.setattr(backends_base, "entry_points", lambda group: [])
    assert available_backends()["docker"] is DockerBackend


async def test_an_unknown_backend_is_refused_naming_the_installed_ones(tmp_path: Path):
    agent = Agent(backend="kubernetes", state_dir=str(tmp_path), accelerators=[])
    with pytest.raises(ValueError, match=r"unknown container backend 'kubernetes'.*installed: .*docker"):
        await agent.start()


# -- a backend of our own, driven by the agent -------------------------------------------------------


class ProcessBackend(ContainerBackend):
    """Kernels as plain processes of this host, listening on the endpoint's ports themselves."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.calls: list[tuple[str, Any]] = []
        self.procs: dict[str, tuple[subprocess.Popen[bytes], KernelContainer]] = {}
        self._on_exit: ExitCallback | None = None

    @classmethod
    def from_agent(cls, agent: Agent) -> ProcessBackend:
        return cls(Path(agent.state_dir) / "processes")

    async def list_images(self) -> list[ImageInfo]:
        argv = ["python", "-m", "ipykernel_launcher", "-f", "{connection_file}"]
        return [ImageInfo(id="sha256:process", tags=[IMAGE], kernel={"language": "python", "argv": argv})]

    async def allocate(self, session_id: str, wanted: dict[str, int] | None = None) -> Endpoint:
        self.calls.append(("allocate", session_id))
        return Endpoint("127.0.0.1", {ch: free_port() for ch in CONTAINER_PORTS})

    async def release(self, endpoint: Endpoint) -> None:
        self.calls.append(("release", endpoint))

    async def create(self, spec: LaunchSpec, endpoint: Endpoint) -> KernelContainer:
        self.calls.append(("create", spec))
        return await asyncio.to_thread(self._start, spec, endpoint)

    def _start(self, spec: LaunchSpec, endpoint: Endpoint) -> KernelContainer:
        # The spec's command is for a container (a read-only connection file at a fixed path);
        # a process on the host runs the kernel on a copy of the file that names the endpoint.
        connection = json.loads(Path(spec.connection_file).read_text())
        connection.update(ip=endpoint.host, **{f"{ch}_port": port for ch, port in endpoint.ports.items()})
        self.workdir.mkdir(mode=0o700, exist_ok=True)
        path = self.workdir / f"{spec.session_id}.json"
        path.write_text(json.dumps(connection))
        env = {**os.environ, "BACKENDAI_SESSION_ID": spec.session_id}
        argv = [sys.executable, "-m", "ipykernel_launcher", "-f", str(path)]
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        kernel = KernelContainer(f"process-{proc.pid}", spec.session_id, endpoint)
        self.procs[kernel.id] = (proc, kernel)
        threading.Thread(target=self._wait, args=(proc, kernel), daemon=True).start()
        return kernel

    def _wait(self, proc: subprocess.Popen[bytes], kernel: KernelContainer) -> None:
        proc.wait()
        if self._on_exit is not None:
            self._on_exit(kernel.session_id, _exit_code(proc), kernel.id)

    async def destroy(self, container_id: str) -> None:
        self.calls.append(("destroy", container_id))
        proc, _ = self.procs[container_id]
        proc.kill()
        await asyncio.to_thread(proc.wait)

    async def signal(self, container_id: str, signame: str) -> None:
        self.procs[container_id][0].send_signal(signal.Signals[signame])

    async def list_kernels(self) -> list[KernelContainer]:
        return [
            KernelContainer(k.id, k.session_id, k.endpoint, proc.poll() is None)
            for proc, k in self.procs.values()
        ]

    async def adopt(self, kernel: KernelContainer) -> None:
        self.calls.append(("adopt", kernel))

    async def logs_tail(self, container_id: str, lines: int = 20) -> str:
        return ""

    async def exit_info(self, container_id: str) -> tuple[int, bool]:
        return _exit_code(self.procs[container_id][0]), False

    def watch_exits(self, callback: ExitCallback, on_reconnect: ReconnectCallback | None = None) -> None:
        self._on_exit = callback

    def close(self) -> None:
        self._on_exit = None
        for proc, _ in self.procs.values():
            proc.kill()
            proc.wait()


def _exit_code(proc: subprocess.Popen[bytes]) -> int:
    """The exit code as container runtimes give it: 128 + the signal for a process killed by one."""
    code = proc.returncode
    return -1 if code is None else 128 - code if code < 0 else code


@pytest.fixture
def process_backend_installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ProcessBackend installed as 'process' in the entry-point group, as a package would declare it."""
    site = tmp_path / "site"
    dist = site / "bai_process_backend-0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: bai-process-backend\nVersion: 0\n")
    (dist / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\nprocess = {__name__}:ProcessBackend\n")
    monkeypatch.syspath_prepend(str(site))


def _execute(connection: dict[str, Any], code: str) -> str:
    kc = BlockingKernelClient()
    kc.load_connection_info(connection)
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=30)
        reply, outputs = run(kc, code, timeout=30)
        assert reply["status"] == "ok", reply
        return stdout(outputs)
    finally:
        kc.stop_channels()


async def test_the_agent_drives_a_backend_installed_by_name_through_the_interface_alone(
    tmp_path: Path, process_backend_installed: None
):
    async with running_gateway(tmp_path) as g:
        agent = Agent(
            backend="process",
            agent_id=aid("process-agent"),
            gateway_url=g.url,
            agent_token=g.join_token,
            state_dir=str(tmp_path / "agent"),
            mock_devices=1,
        )
        await agent.start()
        try:
            await agent.wait_registered()
            backend = agent.container_backend
            assert isinstance(backend, ProcessBackend)
            ann = await g.user("ann")
            body = {"image": IMAGE, "resources": {"cpu": "1.5", "mem": "1g", "cuda.device": "1"}}
            sid = (await ann("POST", "/v1/sessions", body))["id"]
            model = await ann.wait_state(sid, {"RUNNING", "ERROR"}, timeout=60)
            assert model["state"] == "RUNNING", model

            # What the agent asked for, in its own terms.
            (first, _), (second, spec) = backend.calls
            assert (first, second) == ("allocate", "create")
            assert spec.session_id == sid and spec.image == IMAGE
            assert spec.command[0] == "/bin/sh" and spec.command[-2:] == [
                "-f",
                f"{HOME}/.backendai-connection.json",
            ]
            assert spec.cpu == Decimal("1.5") and spec.mem == 2**30 and spec.user == "1000:1000"
            assert spec.ports == CONTAINER_PORTS and spec.labels[LABEL_OWNER]
            assert spec.confinement.read_only_root and spec.confinement.pids_limit == 1024
            assert {t.target for t in spec.confinement.tmpfs} == {HOME, "/tmp"}
            (grant,) = spec.devices
            assert grant.plugin == "cuda" and grant.device_ids == []  # mock devices: nothing to pass
            env = spec.environment()
            assert env["BACKENDAI_SESSION_ID"] == sid and env["HOME"] == HOME
            assert env["BACKENDAI_ACCELERATOR_MOCK"] == "1" and env["NVIDIA_VISIBLE_DEVICES"].startswith(
                "GPU-mock-"
            )

            # Clients reach the kernel where the backend said it is.
            (_, kernel) = next(iter(backend.procs.values()))
            connection = model["connection"]
            assert connection["ip"] == kernel.endpoint.host
            assert {ch: connection[f"{ch}_port"] for ch in CONTAINER_PORTS} == kernel.endpoint.ports
            out = await asyncio.to_thread(
                _execute, connection, "import os; print(os.environ['BACKENDAI_SESSION_ID'])"
            )
            assert out.strip() == sid

            # A restart replaces the container on the same endpoint; the end gives the endpoint back.
            await ann("POST", f"/v1/sessions/{sid}/restart")
            await ann.wait_state(sid, {"RUNNING"}, timeout=60)
            await ann("DELETE", f"/v1/sessions/{sid}")
            await ann.wait_state(sid, {"TERMINATED"}, timeout=30)
            assert [c[0] for c in backend.calls] == [
                "allocate",
                "create",
                "destroy",
                "create",
                "destroy",
                "release",
            ]
            assert backend.calls[3][1].session_id == sid
            assert backend.calls[-1][1] == kernel.endpoint
            assert all(proc.poll() is not None for proc, _ in backend.procs.values())
        finally:
            await agent.stop()


async def test_a_kernel_that_exits_on_its_own_is_reported_through_the_backends_exit_callback(
    tmp_path: Path, process_backend_installed: None
):
    async with running_gateway(tmp_path) as g:
        agent = Agent(
            backend="process",
            agent_id=aid("process-exit"),
            gateway_url=g.url,
            agent_token=g.join_token,
            state_dir=str(tmp_path / "agent"),
            accelerators=[],
        )
        await agent.start()
        try:
            await agent.wait_registered()
            ann = await g.user("ann")
            sid = (await ann("POST", "/v1/sessions", {"image": IMAGE}))["id"]
            model = await ann.wait_state(sid, {"RUNNING", "ERROR"}, timeout=60)
            assert model["state"] == "RUNNING", model
            ((proc, _),) = agent.container_backend.procs.values()
            proc.kill()
            model = await ann.wait_state(sid, {"ERROR", "TERMINATED"}, timeout=30)
            assert "killed" in model["reason"]
            assert [c[0] for c in agent.container_backend.calls][-2:] == ["destroy", "release"]
        finally:
            await agent.stop()


# -- the Docker backend's create arguments -----------------------------------------------------------


def _docker_backend() -> DockerBackend:
    low, high = (int(p) for p in port_span("31980-31989").split("-"))
    settings = DockerSettings(
        "agent-a", "10.0.0.5", "127.0.0.1", (low, high), "backendai-kernels", "bai0", True
    )
    return DockerBackend(settings, client=object())  # create_args needs no engine


def _spec(**overrides: Any) -> LaunchSpec:
    policy = KernelPolicy("1000:1000", HOME, "1g", "512m", 1024, "10m", 3)
    base: dict[str, Any] = dict(
        session_id="s1",
        image=IMAGE,
        command=["python", "-m", "ipykernel_launcher"],
        env={"BACKENDAI_SESSION_ID": "s1", "NVIDIA_VISIBLE_DEVICES": "void", "HOME": HOME},
        user="1000:1000",
        cpu=Decimal("1.5"),
        mem=2**30,
        connection_file="/state/kernels/s1/kernel.json",
        labels={"io.backendai-jupyter.owner": "ann", "io.backendai-jupyter.resources": '{"cpu": "1.5"}'},
        confinement=policy.confinement(),
    )
    return LaunchSpec(**{**base, **overrides})


def test_the_docker_backend_turns_a_launch_spec_into_the_create_arguments_it_always_passed():
    endpoint = Endpoint(
        "10.0.0.5", {"shell": 30000, "iopub": 30001, "stdin": 30002, "control": 30003, "hb": 30004}
    )
    gpu = DeviceGrant(
        plugin="cuda",
        driver="nvidia",
        device_ids=["GPU-1-uuid"],
        capabilities=["gpu"],
        env={"NVIDIA_VISIBLE_DEVICES": "GPU-1-uuid", "CUDA_MPS_PIPE_DIRECTORY": "/run/mps"},
        mounts=[Mount("/run/mps", "/run/mps")],
    )
    spec = _spec(
        mounts=[Mount(VOLUME_DIR, f"{HOME}/notes", read_only=True)],
        devices=[gpu],
        working_dir=f"{HOME}/notes",
    )
    assert _docker_backend().create_args(spec, endpoint, init=True) == dict(
        image=IMAGE,
        command=["python", "-m", "ipykernel_launcher"],
        name="bai-kernel-s1",
        labels={
            "io.backendai-jupyter.session": "s1",
            "io.backendai-jupyter.agent": "agent-a",
            "io.backendai-jupyter.owner": "ann",
            "io.backendai-jupyter.ports": json.dumps(endpoint.ports),
            "io.backendai-jupyter.resources": '{"cpu": "1.5"}',
        },
        environment={
            "BACKENDAI_SESSION_ID": "s1",
            "NVIDIA_VISIBLE_DEVICES": "GPU-1-uuid",
            "CUDA_MPS_PIPE_DIRECTORY": "/run/mps",
            "HOME": HOME,
        },
        ports={
            "2001/tcp": ("127.0.0.1", 30000),
            "2002/tcp": ("127.0.0.1", 30001),
            "2003/tcp": ("127.0.0.1", 30002),
            "2004/tcp": ("127.0.0.1", 30003),
            "2005/tcp": ("127.0.0.1", 30004),
        },
        volumes={
            "/state/kernels/s1/kernel.json": {"bind": "/opt/backendai/connection.json", "mode": "ro"},
            VOLUME_DIR: {"bind": f"{HOME}/notes", "mode": "ro"},
            "/run/mps": {"bind": "/run/mps", "mode": "rw"},
        },
        device_requests=[DeviceRequest(driver="nvidia", device_ids=["GPU-1-uuid"], capabilities=[["gpu"]])],
        user="1000:1000",
        cap_drop=["ALL"],
        security_opt=["no-new-privileges"],
        read_only=True,
        tmpfs={
            HOME: "size=1g,uid=1000,gid=1000,mode=0700,nosuid,nodev",
            "/tmp": "size=512m,mode=1777,nosuid,nodev,exec",
        },
        log_config=LogConfig(type="json-file", config={"max-size": "10m", "max-file": "3"}),
        network="backendai-kernels",
        pids_limit=1024,
        nano_cpus=1_500_000_000,
        mem_limit=2**30,
        memswap_limit=2**30,
        init=True,
        detach=True,
        working_dir=f"{HOME}/notes",
    )


def test_device_nodes_are_passed_through_and_a_grant_without_devices_asks_for_none():
    endpoint = Endpoint("10.0.0.5", {})
    backend = _docker_backend()
    plain = backend.create_args(
        _spec(devices=[DeviceGrant(plugin="cuda", env={"X": "1"})]), endpoint, init=False
    )
    assert plain["device_requests"] is None and "devices" not in plain and "working_dir" not in plain
    assert plain["environment"]["X"] == "1"
    nodes = DeviceGrant(plugin="rocm", device_nodes=["/dev/kfd", "/dev/dri/renderD128"])
    args = backend.create_args(_spec(devices=[nodes]), endpoint, init=False)
    assert args["devices"] == ["/dev/kfd:/dev/kfd:rwm", "/dev/dri/renderD128:/dev/dri/renderD128:rwm"]
    assert args["device_requests"] is None


async def test_the_docker_backend_gives_a_client_its_ports_back_when_free_and_says_when_none_are_left():
    backend = _docker_backend()
    low = backend.settings.port_range[0]
    wanted = {ch: low + 5 + i for i, ch in enumerate(CONTAINER_PORTS)}
    endpoint = await backend.allocate("s1", wanted)
    assert endpoint == Endpoint("10.0.0.5", wanted)
    other = await backend.allocate("s2")
    assert set(other.ports.values()).isdisjoint(wanted.values())
    with pytest.raises(BackendError, match="no 5 free ports left.*Agent.port_range"):
        await backend.allocate("s3")
    await backend.release(endpoint)
    assert await backend.allocate("s3", wanted) == endpoint
