"""Several agents with (mock) GPUs: where kernels land, what they see, draining, policies, load."""

from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess

import pytest
from jupyter_client.blocking.client import BlockingKernelClient
from jupyter_client.manager import KernelManager

from .stack import BAI, Cluster, aid, eventually, ports

pytestmark = pytest.mark.docker
IMAGE = "backendai-jupyter/python"
SMALL = {"cpu": "0.25", "mem": "128m"}


@pytest.fixture(scope="module")
def gpus(tmp_path_factory, docker_engine):
    """A gateway and three agents: 2 mock GPUs, 4 mock GPUs on two NUMA nodes, and CPU only."""
    tmp = tmp_path_factory.mktemp("gpus")
    c = Cluster(tmp, aid("gpu-a"), ports("31800-31849"), "--Gateway.heartbeat_interval=0.5")
    c.agent_id = aid("gpu-a")
    c.add_agent(aid("gpu-a"), ports("31800-31849"), "--Agent.mock_devices=2", "--cpu=4", "--mem=8g")
    c.add_agent(
        aid("gpu-b"),
        ports("31850-31899"),
        "--cpu=4",
        "--mem=8g",
        "--Agent.accelerators=['mock']",
        "--Agent.accelerator_config="
        + json.dumps({"mock": {"devices": [{"id": str(i), "numa_node": i % 2} for i in range(4)]}}),
    )
    c.add_agent(aid("cpu-c"), ports("31900-31949"), "--cpu=4", "--mem=8g", "--Agent.accelerators=[]")
    try:
        yield c
    finally:
        c.close()


def _end_all(c: Cluster) -> None:
    # Cancel the waiting ones first, or each ended kernel would let the next one start.
    active = c.api("GET", "/v1/sessions?active=1")["sessions"]
    for s in sorted(active, key=lambda s: s["state"] != "PENDING"):
        c.api("DELETE", f"/v1/sessions/{s['id']}")


def _create(c: Cluster, **resources: object) -> dict:
    return c.api("POST", "/v1/sessions", {"image": IMAGE, "resources": {**SMALL, **resources}})


def _env_in_kernel(connection: dict, names: list[str]) -> dict:
    kc = BlockingKernelClient()
    kc.load_connection_info(connection)
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=30)
        out: list = []
        code = f"import os, json; print(json.dumps({{n: os.environ.get(n) for n in {names!r}}}))"
        kc.execute_interactive(code, output_hook=out.append, timeout=30)
        return json.loads("".join(m["content"]["text"] for m in out if m["msg_type"] == "stream"))
    finally:
        kc.stop_channels()


def test_agents_list_their_mock_devices_as_mock(gpus: Cluster):
    agents = {a["id"]: a for a in gpus.api("GET", "/v1/agents")["agents"]}
    assert agents[aid("gpu-a")]["capacity"]["cuda.device"] == "2"
    assert agents[aid("gpu-b")]["capacity"]["cuda.device"] == "4"
    assert "cuda.device" not in agents[aid("cpu-c")]["capacity"]
    for d in agents[aid("gpu-b")]["devices"]:
        assert d["mock"] is True and "(mock)" in d["label"]
        assert d["numa_node"] == int(d["id"]) % 2
    # Live per-device numbers arrive with the heartbeats.
    stats = eventually(
        lambda: next(a for a in gpus.api("GET", "/v1/agents")["agents"] if a["id"] == aid("gpu-a"))[
            "devices"
        ][0]["stats"]
    )
    assert stats["memory_total"] == 16 * 2**30
    assert len({d["uuid"] for a in agents.values() for d in a["devices"]}) == 6


def test_gpu_kernels_get_free_devices_packed_and_see_exactly_those(gpus: Cluster):
    try:
        first = gpus.api.wait_state(_create(gpus, **{"cuda.device": 2})["id"], {"RUNNING"})
        second = gpus.api.wait_state(_create(gpus, **{"cuda.device": 2})["id"], {"RUNNING"})
        third = gpus.api.wait_state(_create(gpus, **{"cuda.device": 2})["id"], {"RUNNING"})
        # Concentrated: the smaller GPU agent fills first, then the other, two GPUs on one NUMA node.
        assert first["agent"] == aid("gpu-a")
        assert second["agent"] == third["agent"] == aid("gpu-b")
        assert {frozenset(second["devices"]["cuda"]), frozenset(third["devices"]["cuda"])} == {
            frozenset({"0", "2"}),
            frozenset({"1", "3"}),
        }
        agents = {a["id"]: a for a in gpus.api("GET", "/v1/agents")["agents"]}
        uuids = {d["id"]: d["uuid"] for d in agents[aid("gpu-b")]["devices"]}
        env = _env_in_kernel(second["connection"], ["NVIDIA_VISIBLE_DEVICES", "BACKENDAI_ACCELERATOR_MOCK"])
        assert env["NVIDIA_VISIBLE_DEVICES"].split(",") == [
            uuids[i] for i in sorted(second["devices"]["cuda"])
        ]
        assert env["BACKENDAI_ACCELERATOR_MOCK"] == "1"
        waiting = _create(gpus, **{"cuda.device": 1})
        model = eventually(lambda: (m := gpus.api("GET", f"/v1/sessions/{waiting['id']}"))["reason"] and m)
        assert model["state"] == "PENDING"
        assert model["reason"] == "waiting: 1 cuda.device requested, most free on any agent is 0"
        gpus.api("DELETE", f"/v1/sessions/{first['id']}")
        placed = gpus.api.wait_state(waiting["id"], {"RUNNING"})
        assert placed["agent"] == aid("gpu-a")
    finally:
        _end_all(gpus)


def test_cpu_kernels_spread_over_agents(gpus: Cluster):
    try:
        sids = [_create(gpus)["id"] for _ in range(3)]
        agents = {gpus.api.wait_state(sid, {"RUNNING"})["agent"] for sid in sids}
        assert agents == {aid("gpu-a"), aid("gpu-b"), aid("cpu-c")}
    finally:
        _end_all(gpus)


def test_a_drained_agent_gets_no_new_kernels_and_keeps_its_running_ones(gpus: Cluster):
    env = {**os.environ, "BACKENDAI_CLIENT_CONFIG": str(gpus.client_config())}
    try:
        running = gpus.api.wait_state(_create(gpus, **{"cuda.device": 1})["id"], {"RUNNING"})
        out = subprocess.run(
            [BAI, "admin", "agents", "drain", running["agent"]],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        assert "false" in out.stdout.lower() or out.returncode == 0
        listing = subprocess.run(
            [BAI, "admin", "agents", "list"], env=env, capture_output=True, text=True, check=True
        ).stdout
        assert f"{running['agent']}" in listing and "DRAINED" in listing
        drained = running["agent"]
        for _ in range(3):
            model = gpus.api.wait_state(_create(gpus, **{"cuda.device": 1})["id"], {"RUNNING"})
            assert model["agent"] != drained
        assert gpus.api("GET", f"/v1/sessions/{running['id']}")["state"] == "RUNNING"
        subprocess.run([BAI, "admin", "agents", "undrain", drained], env=env, check=True, capture_output=True)
        assert next(a for a in gpus.api("GET", "/v1/agents")["agents"] if a["id"] == drained)["schedulable"]
    finally:
        _end_all(gpus)


def test_a_hundred_concurrent_creates_never_share_a_device(gpus: Cluster):
    try:
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            models = list(pool.map(lambda _: _create(gpus, **{"cuda.device": 1}), range(100)))
        sids = [m["id"] for m in models]

        def settled():
            states = [gpus.api("GET", f"/v1/sessions/{sid}") for sid in sids]
            return states if sum(s["state"] == "RUNNING" for s in states) == 6 else None

        states = eventually(settled, timeout=120, interval=0.5)
        held = [
            (s["agent"], d) for s in states if s["state"] != "PENDING" for d in s["devices"].get("cuda", {})
        ]
        assert len(held) == 6 and len(set(held)) == 6  # six GPUs, six kernels, no device twice
        assert sum(s["state"] == "PENDING" for s in states) == 94
        reasons = [s["reason"] for s in states if s["state"] == "PENDING"]
        assert all(
            r.startswith("waiting: 1 cuda.device requested, most free on any agent is 0") for r in reasons
        )
        assert any(r.endswith("93 requests ahead") for r in reasons)
    finally:
        _end_all(gpus)
    eventually(
        lambda: (
            not any(
                s["state"] not in ("TERMINATED", "CANCELLED")
                for s in gpus.api("GET", "/v1/sessions?active=1")["sessions"]
            )
        )
    )


def test_resource_policies_refuse_at_once_and_name_the_limit(gpus: Cluster):
    api = gpus.api
    api(
        "PUT",
        "/v1/admin/policies/students",
        {
            "max_sessions": 2,
            "max_session_resources": {"cuda.device": 1},
            "total_resources": {"cpu": "1"},
            "allowed_images": ["backendai-jupyter/*"],
        },
    )
    created = api("POST", "/v1/admin/users", {"name": "student1", "policy": "students"})
    from backendai_jupyter.common.clientconfig import ClientConfig

    from .stack import Api

    student = Api(ClientConfig(gpus.url, created["access_key"], created["secret_key"]))
    try:
        r = student.request(
            "POST", "/v1/sessions", {"image": IMAGE, "resources": {**SMALL, "cuda.device": 2}}
        )
        assert r.status_code == 403 and r.json()["type"] == "policy-violation"
        assert r.json()["limit"] == "max_session_resources.cuda.device"
        assert "at most 1 cuda.device per session" in r.json()["title"]
        r = student.request("POST", "/v1/sessions", {"image": "other/image", "resources": SMALL})
        assert r.status_code == 403 and r.json()["limit"] == "allowed_images"
        r = student.request(
            "POST", "/v1/sessions", {"image": IMAGE, "resources": {"cpu": "2", "mem": "128m"}}
        )
        assert r.status_code == 403 and r.json()["limit"] == "total_resources.cpu"
        # Ten at once: the limit holds (no race lets more than two through).
        with concurrent.futures.ThreadPoolExecutor(10) as pool:
            codes = list(
                pool.map(
                    lambda _: (
                        student.request(
                            "POST", "/v1/sessions", {"image": IMAGE, "resources": SMALL}
                        ).status_code
                    ),
                    range(10),
                )
            )
        assert sorted(codes) == [201, 201] + [403] * 8
        # Users see only their own sessions.
        assert len(student("GET", "/v1/sessions")["sessions"]) == 2
    finally:
        for s in student("GET", "/v1/sessions?active=1")["sessions"]:
            student("DELETE", f"/v1/sessions/{s['id']}")


def test_the_gpu_kernelspec_gets_one_device(gpus: Cluster, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("BACKENDAI_CLIENT_CONFIG", str(gpus.client_config()))
    km = KernelManager(kernel_name="backendai-python3-gpu")
    km.start_kernel()
    try:
        env = _env_in_kernel(km.get_connection_info(), ["NVIDIA_VISIBLE_DEVICES"])
        assert len(env["NVIDIA_VISIBLE_DEVICES"].split(",")) == 1
        assert env["NVIDIA_VISIBLE_DEVICES"].startswith("GPU-mock-")
    finally:
        km.shutdown_kernel(now=True)
