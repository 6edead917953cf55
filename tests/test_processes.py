"""Process-level behaviour: Ctrl-C on `up`, agents that restart or vanish."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
from jupyter_client.blocking.client import BlockingKernelClient

from .stack import (
    AGENT_LABEL,
    Cluster,
    aid,
    eventually,
    port_is_free,
    port_span,
    remove_containers,
    start_up,
)

pytestmark = pytest.mark.docker
IMAGE = "backendai-jupyter/python"


def _kernel_client(connection: dict) -> BlockingKernelClient:
    kc = BlockingKernelClient()
    kc.load_connection_info(connection)
    kc.start_channels()
    kc.wait_for_ready(timeout=30)
    return kc


def test_ctrl_c_on_up_shuts_down_its_kernels_and_exits_cleanly(tmp_path: Path, docker_engine):
    s = start_up(tmp_path, aid("test-ctrl-c"), port_span("31500-31599"))
    try:
        sids = [s.api("POST", "/v1/sessions", {"image": IMAGE})["id"] for _ in range(2)]
        models = [s.api.wait_state(sid, {"RUNNING"}) for sid in sids]
        assert len(s.containers()) == 2
        held = [v for m in models for k, v in m["connection"].items() if k.endswith("_port")]
        start = time.monotonic()
        assert s.stop(signal.SIGINT) == 0
        assert time.monotonic() - start < 15
        assert s.containers() == []
        assert all(port_is_free(p) for p in held)
    finally:
        s.stop(signal.SIGKILL)
        remove_containers(aid("test-ctrl-c"))


@pytest.fixture
def cluster(tmp_path: Path, docker_engine):
    c = Cluster(
        tmp_path,
        aid("test-cluster"),
        port_span("31600-31699"),
        "--Gateway.heartbeat_interval=0.5",
        "--Gateway.heartbeat_timeout=3",
    )
    try:
        yield c
    finally:
        c.close()


def test_a_restarted_agent_readopts_its_running_kernels(cluster: Cluster):
    cluster.start_agent()
    sid = cluster.api("POST", "/v1/sessions", {"image": IMAGE})["id"]
    model = cluster.api.wait_state(sid, {"RUNNING"})
    kc = _kernel_client(model["connection"])
    kc.execute_interactive("state = 'kept'", timeout=30)
    assert cluster.agent is not None
    cluster.agent.send_signal(signal.SIGKILL)  # the agent dies; its kernel must not
    cluster.agent.wait(10)
    cluster.start_agent()
    assert cluster.api("GET", f"/v1/sessions/{sid}")["state"] == "RUNNING"
    outputs: list = []
    kc.execute_interactive("print(state)", output_hook=outputs.append, timeout=30)
    assert [m["content"]["text"] for m in outputs if m["msg_type"] == "stream"] == ["kept\n"]
    kc.stop_channels()
    cluster.api("DELETE", f"/v1/sessions/{sid}")
    assert not [c for c in cluster_containers(cluster) if c.labels["io.backendai-jupyter.session"] == sid]


def cluster_containers(cluster: Cluster) -> list:
    import docker

    return docker.from_env().containers.list(
        all=True, filters={"label": f"{AGENT_LABEL}={cluster.agent_id}"}, ignore_removed=True
    )


def test_an_agent_that_stops_heartbeating_is_lost_with_its_kernels(cluster: Cluster):
    cluster.start_agent()
    sid = cluster.api("POST", "/v1/sessions", {"image": IMAGE})["id"]
    cluster.api.wait_state(sid, {"RUNNING"})
    assert cluster.agent is not None
    cluster.agent.send_signal(signal.SIGKILL)
    cluster.agent.wait(10)
    start = time.monotonic()
    model = cluster.api.wait_state(sid, {"LOST"}, timeout=15)
    assert time.monotonic() - start < 6  # heartbeat timeout 3 s, checked several times a second
    assert "no heartbeat" in model["reason"]
    assert cluster.agent_status() == "LOST"
    # When the agent comes back, the kernel the gateway gave up on is removed, not left running.
    cluster.start_agent()
    assert cluster.agent_status() == "ALIVE"
    eventually(lambda: not cluster_containers(cluster))


def test_requests_are_clamped_to_the_maximum_in_the_gateways_config_file(tmp_path: Path, docker_engine):
    config = tmp_path / "backendai_config.py"
    config.write_text('c.Gateway.max_resources = {"cpu": "1", "mem": "256m"}\n')
    cluster = Cluster(tmp_path, aid("test-clamp"), port_span("31700-31799"), f"--config={config}")
    try:
        cluster.start_agent()
        model = cluster.api("POST", "/v1/sessions", {"image": IMAGE, "resources": {"cpu": "2", "mem": "4g"}})
        assert model["resources"] == {"cpu": "1", "mem": str(256 * 2**20)}
        cluster.api.wait_state(model["id"], {"RUNNING"})
        (container,) = cluster_containers(cluster)
        assert container.attrs["HostConfig"]["Memory"] == 256 * 2**20
        assert container.attrs["HostConfig"]["NanoCpus"] == 10**9
    finally:
        cluster.close()


def test_a_restarted_gateway_loses_no_kernel(cluster: Cluster):
    cluster.start_agent()
    sid = cluster.api("POST", "/v1/sessions", {"image": IMAGE})["id"]
    model = cluster.api.wait_state(sid, {"RUNNING"})
    cluster.gateway.send_signal(signal.SIGINT)
    assert cluster.gateway.wait(30) == 0
    cluster.start_gateway()
    # The agent reconnects by itself and reports the kernel it still runs.
    eventually(lambda: cluster.agent_status() == "ALIVE", timeout=20)
    assert cluster.api("GET", f"/v1/sessions/{sid}")["state"] == "RUNNING"
    kc = _kernel_client(model["connection"])
    outputs: list = []
    kc.execute_interactive("print('still here')", output_hook=outputs.append, timeout=30)
    assert [m["content"]["text"] for m in outputs if m["msg_type"] == "stream"] == ["still here\n"]
    kc.stop_channels()
    cluster.api("DELETE", f"/v1/sessions/{sid}")
    assert not cluster_containers(cluster)


def test_a_request_that_waits_too_long_ends_with_the_reason(tmp_path: Path, docker_engine):
    cluster = Cluster(tmp_path, aid("test-timeout"), port_span("31950-31999"), "--Gateway.pending_timeout=2")
    try:
        cluster.add_agent(aid("test-timeout"), port_span("31950-31999"), "--cpu=1", "--Agent.accelerators=[]")
        first = cluster.api("POST", "/v1/sessions", {"image": IMAGE, "resources": {"cpu": "1"}})["id"]
        cluster.api.wait_state(first, {"RUNNING"})
        second = cluster.api("POST", "/v1/sessions", {"image": IMAGE, "resources": {"cpu": "1"}})["id"]
        model = cluster.api.wait_state(second, {"ERROR"}, timeout=10)
        assert model["reason"] == (
            "not placed within 2 s (waiting: 1 cpu requested, most free on any agent is 0)"
        )
        gpu = cluster.api.request("POST", "/v1/sessions", {"image": IMAGE, "resources": {"cuda.device": 1}})
        assert gpu.status_code == 400 and "no agent offers cuda.device" in gpu.json()["title"]
    finally:
        cluster.close()
