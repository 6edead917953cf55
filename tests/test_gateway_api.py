"""The gateway's /v1 API driven directly: authentication, validation, events, agents, status."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest
from tornado import httpclient, websocket

from backendai_jupyter.common import signing

from .stack import Stack, eventually

pytestmark = pytest.mark.docker
IMAGE = "backendai-jupyter/python"


def test_requests_without_valid_signature_get_401_json(stack: Stack):
    api = stack.api
    for resp in [
        api.request("GET", "/v1/sessions", sign=False),
        api.request("POST", "/v1/sessions", {"image": IMAGE}, sign=False),
        api.request("GET", "/v1/agents", sign=False),
    ]:
        assert resp.status_code == 401
        assert resp.headers["Content-Type"].startswith("application/json")
        assert resp.json()["type"] == "unauthorized"
    forged = signing.sign(api.config.access_key, "not-the-secret", "GET", "/v1/sessions")
    resp = api.request("GET", "/v1/sessions", sign=False)
    import requests

    resp = requests.get(stack.url + "/v1/sessions", headers=forged, timeout=10)
    assert resp.status_code == 401
    wrong_secret = resp.json()
    # An unknown access key gets the very same answer: nobody can probe which keys exist.
    unknown = signing.sign("AKNOSUCHKEY", "x", "GET", "/v1/sessions")
    resp = requests.get(stack.url + "/v1/sessions", headers=unknown, timeout=10)
    assert resp.status_code == 401 and resp.json() == wrong_secret
    assert "signature does not match" in wrong_secret["title"]
    # A signature is bound to its body: replaying it with another body fails.
    good = signing.sign(
        api.config.access_key, api.config.secret_key, "POST", "/v1/sessions", b'{"image": "a"}'
    )
    resp = requests.post(stack.url + "/v1/sessions", data=b'{"image": "b"}', headers=good, timeout=10)
    assert resp.status_code == 401


@pytest.mark.parametrize(
    "body, fragment",
    [
        (b"not json", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (json.dumps({}).encode(), "image is required"),
        (json.dumps({"image": IMAGE, "env": {"A": "x\ny"}}).encode(), "without NUL or newlines"),
        (json.dumps({"image": IMAGE, "env": {"1BAD": "x"}}).encode(), "not a valid variable name"),
        (json.dumps({"image": IMAGE, "env": ["A=1"]}).encode(), "env must be an object"),
        (json.dumps({"image": IMAGE, "env": {"A": "x" * 5000}}).encode(), "at most 4096"),
        (json.dumps({"image": IMAGE, "resources": {"cpu": "many"}}).encode(), "resources: cpu"),
    ],
)
def test_bad_bodies_get_4xx_json_and_create_nothing(stack: Stack, body: bytes, fragment: str):
    import requests

    before = stack.api("GET", "/v1/sessions")["sessions"]
    headers = signing.sign(
        stack.api.config.access_key, stack.api.config.secret_key, "POST", "/v1/sessions", body
    )
    resp = requests.post(stack.url + "/v1/sessions", data=body, headers=headers, timeout=10)
    assert resp.status_code == 400, resp.text
    assert resp.json()["type"] == "invalid-request"
    assert fragment in resp.json()["title"]
    assert stack.api("GET", "/v1/sessions")["sessions"] == before


def test_unknown_session_is_404_json(stack: Stack):
    resp = stack.api.request("GET", "/v1/sessions/00000000-0000-0000-0000-000000000000")
    assert resp.status_code == 404 and resp.json()["type"] == "not-found"
    resp = stack.api.request("GET", "/v1/no-such-thing")
    assert resp.status_code == 404 and resp.headers["Content-Type"].startswith("application/json")


async def _events(stack: Stack, sid: str, until: set[str]) -> list[dict]:
    path = f"/v1/sessions/{sid}/events"
    cfg = stack.api.config
    req = httpclient.HTTPRequest(
        stack.url.replace("http", "ws", 1) + path,
        headers=signing.sign(cfg.access_key, cfg.secret_key, "GET", path),
    )
    conn = await websocket.websocket_connect(req)
    events = []
    while True:
        raw = await conn.read_message()
        assert raw is not None, events
        events.append(json.loads(raw))
        if events[-1]["state"] in until:
            conn.close()
            return events


async def test_event_stream_shows_each_state_change_of_a_launch(stack: Stack):
    model = stack.api("POST", "/v1/sessions", {"image": IMAGE, "resources": {"cpu": "0.5", "mem": "512m"}})
    assert model["state"] == "PENDING"
    events = await _events(stack, model["id"], {"RUNNING", "ERROR"})
    states = [e["state"] for e in events]
    assert states[-1] == "RUNNING", events
    # The stream starts from the current state, then every later change, in order.
    order = ["PENDING", "SCHEDULED", "PREPARING", "CREATING", "RUNNING"]
    assert states == order[order.index(states[0]) :]
    running = events[-1]
    assert set(running["connection"]) >= {
        "ip",
        "key",
        "shell_port",
        "iopub_port",
        "stdin_port",
        "control_port",
        "hb_port",
        "transport",
        "signature_scheme",
    }
    agents = stack.api("GET", "/v1/agents")["agents"]
    me = next(a for a in agents if a["id"] == stack.agent_id)
    assert me["used"]["cpu"] == "0.5" and me["used"]["mem"] == str(512 * 2**20)
    stack.api("DELETE", f"/v1/sessions/{model['id']}")
    events = await _events(stack, model["id"], {"TERMINATED"})
    assert events[-1]["state"] == "TERMINATED"
    me = next(a for a in stack.api("GET", "/v1/agents")["agents"] if a["id"] == stack.agent_id)
    assert me["used"].get("cpu", "0") == "0"


def test_interrupt_and_restart_through_v1(stack: Stack):
    from jupyter_client.blocking.client import BlockingKernelClient

    sid = stack.api("POST", "/v1/sessions", {"image": IMAGE})["id"]
    try:
        model = stack.api.wait_state(sid, {"RUNNING"})
        first = next(c.id for c in stack.containers() if c.labels["io.backendai-jupyter.session"] == sid)
        kc = BlockingKernelClient()
        kc.load_connection_info(model["connection"])
        kc.start_channels()
        kc.wait_for_ready(timeout=30)
        kc.execute("import time; time.sleep(60)")
        eventually(lambda: stack.api.request("POST", f"/v1/sessions/{sid}/interrupt").status_code == 204)
        reply = kc.get_shell_msg(timeout=10)
        assert reply["content"]["ename"] == "KeyboardInterrupt"
        restarted = stack.api("POST", f"/v1/sessions/{sid}/restart")
        assert restarted["state"] == "RUNNING"
        assert restarted["connection"] == model["connection"]
        second = next(c.id for c in stack.containers() if c.labels["io.backendai-jupyter.session"] == sid)
        assert second != first
        kc.wait_for_ready(timeout=30)
        kc.stop_channels()
        bad = stack.api.request("POST", f"/v1/sessions/{sid}/signal", {"signal": "SIGSTOP"})
        assert bad.status_code == 400 and "signal must be one of" in bad.json()["title"]
    finally:
        stack.api("DELETE", f"/v1/sessions/{sid}")
    assert stack.api("GET", f"/v1/sessions/{sid}")["state"] == "TERMINATED"
    conflict = stack.api.request("POST", f"/v1/sessions/{sid}/interrupt")
    assert conflict.status_code == 409


def test_status_command_shows_agents_sessions_and_config(stack: Stack):
    sid = stack.api("POST", "/v1/sessions", {"image": IMAGE})["id"]
    try:
        stack.api.wait_state(sid, {"RUNNING"})
        bai = str(Path(sys.executable).with_name("backendai-jupyter"))
        env = {"BACKENDAI_CLIENT_CONFIG": str(stack.client_config), "PATH": str(Path(sys.executable).parent)}
        out = subprocess.run([bai, "status", "--json"], capture_output=True, text=True, env=env, check=True)
        status = json.loads(out.stdout)
        assert status["gateway"] == stack.url
        assert status["client_config"] == str(stack.client_config)
        assert [a["id"] for a in status["agents"]] == [stack.agent_id]
        assert status["agents"][0]["status"] == "ALIVE"
        assert sid in [s["id"] for s in status["sessions"]]
        human = subprocess.run([bai, "status"], capture_output=True, text=True, env=env, check=True).stdout
        assert stack.url in human and stack.agent_id in human and sid in human
    finally:
        stack.api("DELETE", f"/v1/sessions/{sid}")


def test_status_without_a_gateway_says_how_to_start_one(tmp_path: Path):
    bai = str(Path(sys.executable).with_name("backendai-jupyter"))
    env = {"BACKENDAI_CLIENT_CONFIG": str(tmp_path / "none.json")}
    out = subprocess.run([bai, "status"], capture_output=True, text=True, env=env)
    assert out.returncode == 1
    assert "backendai-jupyter up" in out.stderr


def test_a_request_that_must_wait_says_why_can_be_cancelled_and_starts_when_room_frees(stack: Stack):
    me = next(a for a in stack.api("GET", "/v1/agents")["agents"] if a["id"] == stack.agent_id)
    whole = {"cpu": me["capacity"]["cpu"], "mem": "256m"}
    first = stack.api("POST", "/v1/sessions", {"image": IMAGE, "resources": whole})["id"]
    waiting = cancelled = None
    try:
        stack.api.wait_state(first, {"RUNNING"})
        cancelled = stack.api("POST", "/v1/sessions", {"image": IMAGE, "resources": whole})["id"]
        model = eventually(lambda: (m := stack.api("GET", f"/v1/sessions/{cancelled}"))["reason"] and m)
        assert model["state"] == "PENDING"
        cpu = me["capacity"]["cpu"]
        assert model["reason"] == f"waiting: {cpu} cpu requested, most free on any agent is 0"
        # The event stream says the same to whoever watches the launch.
        (first_event,) = asyncio.run(_events(stack, cancelled, {"PENDING"}))
        assert first_event["reason"] == model["reason"]
        assert stack.api("DELETE", f"/v1/sessions/{cancelled}")["state"] == "CANCELLED"
        waiting = stack.api("POST", "/v1/sessions", {"image": IMAGE, "resources": whole})["id"]
        eventually(lambda: stack.api("GET", f"/v1/sessions/{waiting}")["reason"].startswith("waiting"))
        stack.api("DELETE", f"/v1/sessions/{first}")
        stack.api.wait_state(waiting, {"RUNNING"}, timeout=30)
    finally:
        for sid in (first, waiting):
            if sid:
                stack.api("DELETE", f"/v1/sessions/{sid}")


def test_users_see_and_touch_only_their_own_sessions(stack: Stack):
    import requests

    from backendai_jupyter.common.clientconfig import ClientConfig

    from .stack import Api

    def user(name: str) -> tuple[Api, str, str]:
        created = stack.api("POST", "/v1/admin/users", {"name": name})
        api = Api(ClientConfig(stack.url, created["access_key"], created["secret_key"]))
        return api, created["token"], created["id"]

    alice, alice_token, alice_id = user("alice-t")
    bob, bob_token, _ = user("bob-t")
    sid = alice("POST", "/v1/sessions", {"image": IMAGE, "resources": {"cpu": "0.25", "mem": "128m"}})["id"]
    try:
        # Tokens work as a header and as ?token=, and name the same user as the keypair.
        by_header = requests.get(
            stack.url + "/v1/sessions", headers={"Authorization": f"token {alice_token}"}, timeout=10
        ).json()["sessions"]
        by_query = requests.get(stack.url + f"/v1/sessions?token={alice_token}", timeout=10).json()[
            "sessions"
        ]
        assert [s["id"] for s in by_header] == [s["id"] for s in by_query] == [sid]
        assert requests.get(stack.url + "/v1/sessions?token=wrong", timeout=10).status_code == 401
        # Bob sees nothing of Alice's, and cannot touch it.
        assert bob("GET", "/v1/sessions")["sessions"] == []
        for method, path in [
            ("GET", f"/v1/sessions/{sid}"),
            ("DELETE", f"/v1/sessions/{sid}"),
            ("POST", f"/v1/sessions/{sid}/interrupt"),
            ("POST", f"/v1/sessions/{sid}/restart"),
        ]:
            r = bob.request(method, path)
            assert r.status_code == 404, (method, path, r.text)
        assert (
            requests.get(stack.url + f"/v1/sessions/{sid}?token={bob_token}", timeout=10).status_code == 404
        )
        r = bob.request("GET", "/v1/admin/users")
        assert r.status_code == 403
        # The admin sees everyone's sessions when asking for all.
        assert sid in [s["id"] for s in stack.api("GET", "/v1/sessions?all=1")["sessions"]]
        assert stack.api("GET", f"/v1/sessions/{sid}")["owner"] == alice_id
        # A disabled user is locked out at once, token and keypair alike.
        stack.api("PATCH", "/v1/admin/users/bob-t", {"disabled": True})
        assert bob.request("GET", "/v1/sessions").status_code == 401
        assert requests.get(stack.url + f"/v1/sessions?token={bob_token}", timeout=10).status_code == 401
    finally:
        alice("DELETE", f"/v1/sessions/{sid}")
