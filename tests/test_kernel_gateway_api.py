"""The gateway as a Jupyter Kernel Gateway: `jupyter server --gateway-url`, VS Code's flow, tenancy."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import requests

from .conftest import SPEC
from .kernel_helpers import execute_over_websocket
from .stack import GATEWAY_CANARY, Stack, eventually, jupyter

pytestmark = pytest.mark.docker
V1_PROTOCOL = "v1.kernel.websocket.jupyter.org"


def _token(stack: Stack) -> str:
    return json.loads(stack.client_config.read_text())["token"]


def _h(token: str) -> dict[str, str]:
    return {"Authorization": f"token {token}"}


@pytest.fixture(scope="module")
def users(stack: Stack) -> dict[str, str]:
    """Two ordinary users' tokens."""
    return {n: stack.api("POST", "/v1/admin/users", {"name": n})["token"] for n in ("kg-ann", "kg-ben")}


@pytest.fixture
def lab_server(stack: Stack, users: dict[str, str], tmp_path: Path):
    """A stock `jupyter server --gateway-url` pointed at our gateway, as JupyterLab would run."""
    args = (f"--gateway-url={stack.url}", f"--GatewayClient.auth_token={users['kg-ann']}")
    with jupyter("server", tmp_path, "lab", *args) as url:
        yield url


def test_jupyter_server_with_gateway_url_runs_kernels_on_our_agents(stack: Stack, lab_server: str):
    h = {"Authorization": "token lab"}
    specs = requests.get(lab_server + "/api/kernelspecs", headers=h, timeout=30).json()["kernelspecs"]
    assert specs[SPEC]["spec"]["display_name"] == "Python 3 (Backend.AI)"
    logo = requests.get(lab_server + specs[SPEC]["resources"]["logo-64x64"], headers=h, timeout=30)
    assert logo.status_code == 200 and logo.content.startswith(b"\x89PNG")
    assert all(name.startswith("backendai-") for name in specs)  # never a kernel on the gateway host
    r = requests.post(lab_server + "/api/kernels", json={"name": SPEC}, headers=h, timeout=120)
    assert r.status_code == 201, r.text
    kid = r.json()["id"]
    try:
        ws = f"{lab_server}/api/kernels/{kid}/channels?token=lab"
        assert execute_over_websocket(ws, "import os; print(os.path.exists('/.dockerenv'))") == "True\n"
        r = requests.post(lab_server + f"/api/kernels/{kid}/interrupt", headers=h, timeout=30)
        assert r.status_code == 204
        r = requests.post(lab_server + f"/api/kernels/{kid}/restart", headers=h, timeout=120)
        assert r.status_code == 200
        assert execute_over_websocket(ws, "print('x' in dir())") == "False\n"
        # The same kernel is a /v1 session of the user behind the gateway token.
        mine = [s for s in stack.api("GET", "/v1/sessions?all=1&active=1")["sessions"]]
        assert len(mine) >= 1
    finally:
        assert requests.delete(lab_server + f"/api/kernels/{kid}", headers=h, timeout=60).status_code == 204
    eventually(lambda: not stack.api("GET", "/v1/sessions?all=1&active=1")["sessions"])


def test_vscode_flow_sessions_and_both_websocket_protocols(stack: Stack, users: dict[str, str]):
    h = _h(users["kg-ann"])
    assert requests.get(stack.url + "/api/kernels", headers=h, timeout=10).json() == []
    body = {
        "path": "/tmp/.vscode-1.ipynb",
        "name": "vscode-1.ipynb",
        "type": "notebook",
        "kernel": {"name": SPEC},
    }
    session = requests.post(stack.url + "/api/sessions", json=body, headers=h, timeout=120)
    assert session.status_code == 201, session.text
    kid = session.json()["kernel"]["id"]
    try:
        model = requests.get(stack.url + f"/api/kernels/{kid}", headers=h, timeout=10).json()
        assert {"id", "name", "last_activity", "execution_state", "connections"} <= set(model)
        assert model["last_activity"].endswith("Z")
        ws = f"{stack.url}/api/kernels/{kid}/channels"
        assert execute_over_websocket(ws, "print(6 * 7)", headers=h) == "42\n"
        assert (
            execute_over_websocket(f"{ws}?token={users['kg-ann']}", "print(7 * 6)", subprotocol=V1_PROTOCOL)
            == "42\n"
        )
        assert [s["id"] for s in requests.get(stack.url + "/api/sessions", headers=h, timeout=10).json()] == [
            session.json()["id"]
        ]
    finally:
        r = requests.delete(stack.url + f"/api/sessions/{session.json()['id']}", headers=h, timeout=60)
        assert r.status_code == 204


def test_a_kernel_started_for_a_session_sees_nothing_of_the_gateways_environment(
    stack: Stack, users: dict[str, str]
):
    h = _h(users["kg-ben"])
    body = {"path": "env.ipynb", "type": "notebook", "kernel": {"name": SPEC}}
    session = requests.post(stack.url + "/api/sessions", json=body, headers=h, timeout=120)
    assert session.status_code == 201, session.text
    sid, kid = session.json()["id"], session.json()["kernel"]["id"]
    ws = f"{stack.url}/api/kernels/{kid}/channels"
    probe = (
        f"import os; print(sorted(k for k in os.environ if k in ('{GATEWAY_CANARY}', 'JUPYTER_CONFIG_DIR')))"
    )
    try:
        assert execute_over_websocket(ws, probe, headers=h) == "[]\n"
        # A rename hands jupyter_server's environment to the kernel for its next restart.
        r = requests.patch(
            stack.url + f"/api/sessions/{sid}", json={"path": "renamed.ipynb"}, headers=h, timeout=30
        )
        assert r.status_code == 200, r.text
        r = requests.post(stack.url + f"/api/kernels/{kid}/restart", headers=h, timeout=120)
        assert r.status_code == 200, r.text
        assert execute_over_websocket(ws, probe, headers=h) == "[]\n"
    finally:
        assert requests.delete(stack.url + f"/api/sessions/{sid}", headers=h, timeout=60).status_code == 204


def test_a_second_user_cannot_see_connect_to_or_delete_the_first_users_kernel(
    stack: Stack, users: dict[str, str]
):
    ann, ben = _h(users["kg-ann"]), _h(users["kg-ben"])
    kid = requests.post(stack.url + "/api/kernels", json={"name": SPEC}, headers=ann, timeout=120).json()[
        "id"
    ]
    try:
        assert requests.get(stack.url + "/api/kernels", headers=ben, timeout=10).json() == []
        assert requests.get(stack.url + "/api/sessions", headers=ben, timeout=10).json() == []
        for method, path in [
            ("GET", f"/api/kernels/{kid}"),
            ("DELETE", f"/api/kernels/{kid}"),
            ("POST", f"/api/kernels/{kid}/interrupt"),
            ("POST", f"/api/kernels/{kid}/restart"),
        ]:
            r = requests.request(method, stack.url + path, headers=ben, timeout=30)
            assert r.status_code == 404, (method, path, r.status_code)
        with pytest.raises(Exception, match="404"):
            execute_over_websocket(f"{stack.url}/api/kernels/{kid}/channels", "print(1)", headers=ben)
        # Listing is allowed (clients' cullers need it), and shows each user their own.
        assert [
            k["id"] for k in requests.get(stack.url + "/api/kernels", headers=ann, timeout=10).json()
        ] == [kid]
        admin = _h(_token(stack))
        assert kid in [
            k["id"] for k in requests.get(stack.url + "/api/kernels", headers=admin, timeout=10).json()
        ]
        assert requests.get(stack.url + "/api/kernels", timeout=10).status_code in (401, 403)
        assert requests.get(stack.url + "/api/kernels?token=nope", timeout=10).status_code in (401, 403)
    finally:
        assert requests.delete(stack.url + f"/api/kernels/{kid}", headers=ann, timeout=60).status_code == 204


def test_kernel_env_passes_kernel_variables_only_and_bad_requests_create_nothing(
    stack: Stack, users: dict[str, str]
):
    h = _h(users["kg-ben"])
    before = len(stack.containers())
    r = requests.post(stack.url + "/api/kernels", json={"name": "no-such-spec"}, headers=h, timeout=30)
    assert r.status_code == 404 and "no-such-spec" in r.json()["message"]
    r = requests.post(
        stack.url + "/api/kernels",
        json={"name": SPEC, "env": {"KERNEL_X": "a" * 5000}},
        headers=h,
        timeout=30,
    )
    assert r.status_code == 400 and "4096" in r.json()["message"]
    r = requests.post(
        stack.url + "/api/kernels", json={"name": SPEC, "env": {"KERNEL_X": "a\nb"}}, headers=h, timeout=30
    )
    assert r.status_code == 400
    r = requests.post(stack.url + "/api/kernels", data=b"{not json", headers=h, timeout=30)
    assert r.status_code == 400
    r = requests.post(stack.url + "/api/kernels", json={"name": 42}, headers=h, timeout=30)
    assert r.status_code == 400
    time.sleep(0.5)
    assert len(stack.containers()) == before
    # KERNEL_WORKING_DIR names a directory on the client's host; with no user storage mapped into
    # kernels it maps nowhere, so the kernel starts in its own home directory.
    env = {
        "KERNEL_PROJECT": "demo",
        "SECRET_FROM_CLIENT": "nope",
        "KERNEL_USERNAME": "root",
        "KERNEL_WORKING_DIR": "/home/someone/project",
    }
    kid = requests.post(
        stack.url + "/api/kernels", json={"name": SPEC, "env": env}, headers=h, timeout=120
    ).json()["id"]
    try:
        code = "import os; print(os.environ.get('KERNEL_PROJECT'), os.environ.get('SECRET_FROM_CLIENT'))"
        out = execute_over_websocket(f"{stack.url}/api/kernels/{kid}/channels", code, headers=h)
        cwd = execute_over_websocket(
            f"{stack.url}/api/kernels/{kid}/channels", "import os; print(os.getcwd())", headers=h
        )
        assert cwd == "/home/work\n"
        assert out == "demo None\n"
        # Identity comes from the token, not from KERNEL_USERNAME.
        sessions = stack.api("GET", "/v1/sessions?all=1&active=1")["sessions"]
        ben_id = next(u["id"] for u in stack.api("GET", "/v1/admin/users")["users"] if u["name"] == "kg-ben")
        assert [s["owner"] for s in sessions] == [ben_id]
    finally:
        requests.delete(stack.url + f"/api/kernels/{kid}", headers=h, timeout=60)


def test_a_kernel_no_agent_can_hold_is_refused_at_once_with_the_reason(stack: Stack, users: dict[str, str]):
    # The GPU kernelspec asks for a cuda.device; this gateway's agent has none.
    r = requests.post(
        stack.url + "/api/kernels",
        json={"name": "backendai-python3-gpu"},
        headers=_h(users["kg-ann"]),
        timeout=30,
    )
    assert r.status_code == 400
    assert "no agent offers cuda.device" in r.json()["message"]
    assert requests.get(stack.url + "/api/kernels", headers=_h(users["kg-ann"]), timeout=10).json() == []


def test_a_waiting_kernel_says_why_and_the_clients_launch_timeout_is_the_one_timeout(
    stack: Stack, users: dict[str, str]
):
    me = next(a for a in stack.api("GET", "/v1/agents")["agents"] if a["id"] == stack.agent_id)
    blocker = stack.api(
        "POST",
        "/v1/sessions",
        {"image": "backendai-jupyter/python", "resources": {"cpu": me["capacity"]["cpu"], "mem": "128m"}},
    )["id"]
    h = _h(users["kg-ann"])
    try:
        stack.api.wait_state(blocker, {"RUNNING"})
        start = time.monotonic()
        r = requests.post(
            stack.url + "/api/kernels",
            json={"name": SPEC, "env": {"KERNEL_LAUNCH_TIMEOUT": "3"}},
            headers=h,
            timeout=60,
        )
        assert r.status_code == 201 and time.monotonic() - start < 2  # no silent blocking POST
        kid = r.json()["id"]
        # While it waits, its model says why (the same words as /v1 and the event stream).
        waiting = eventually(
            lambda: (
                (m := requests.get(stack.url + f"/api/kernels/{kid}", headers=h, timeout=10).json())
                .get("backendai", {})
                .get("reason")
                and m
            )
        )
        assert waiting["execution_state"] == "starting"
        assert waiting["backendai"]["state"] == "PENDING"
        assert "cpu requested, most free on any agent is 0" in waiting["backendai"]["reason"]
        # After the client's own launch timeout the kernel is dead, with the reason, and cancelled.
        dead = eventually(
            lambda: (
                (m := requests.get(stack.url + f"/api/kernels/{kid}", headers=h, timeout=10).json())[
                    "execution_state"
                ]
                == "dead"
                and m
            )
        )
        assert "did not start within 3 s" in dead["reason"] and "it was cancelled" in dead["reason"]
        assert requests.delete(stack.url + f"/api/kernels/{kid}", headers=h, timeout=30).status_code == 204
        assert requests.get(stack.url + "/api/kernels", headers=h, timeout=10).json() == []
        # A waiting kernel can be deleted at once, and nothing of it stays behind.
        kid = requests.post(stack.url + "/api/kernels", json={"name": SPEC}, headers=h, timeout=60).json()[
            "id"
        ]
        assert requests.delete(stack.url + f"/api/kernels/{kid}", headers=h, timeout=30).status_code == 204
        assert requests.get(stack.url + "/api/kernels", headers=h, timeout=10).json() == []
    finally:
        stack.api("DELETE", f"/v1/sessions/{blocker}")
    assert stack.api("GET", "/v1/sessions?all=1&active=1")["sessions"] == []


def test_kernelspecs_come_from_presets_and_from_the_agents_images(stack: Stack, users: dict[str, str]):
    h = _h(users["kg-ann"])
    specs = requests.get(stack.url + "/api/kernelspecs", headers=h, timeout=10).json()["kernelspecs"]
    assert {SPEC, "backendai-python3-gpu"} <= set(specs)
    # One card per language and size: Python's are the presets; no card names an image tag.
    names = [s["spec"]["display_name"] for s in specs.values()]
    assert len(names) == len(set(names)), names
    assert not any(":" in n or "backendai-jupyter/" in n for n in names), names
    python = [n for n, s in specs.items() if s["spec"]["language"] == "python"]
    assert sorted(python) == [SPEC, "backendai-python3-gpu"]
    name = SPEC
    assert requests.get(stack.url + "/api/kernelspecs/python3", headers=h, timeout=10).status_code == 404
    r = requests.post(stack.url + "/api/kernels", json={"name": "python3"}, headers=h, timeout=30)
    assert r.status_code == 404  # a local kernel on the gateway host is never offered
    kid = requests.post(stack.url + "/api/kernels", json={"name": name}, headers=h, timeout=120).json()["id"]
    try:
        out = execute_over_websocket(f"{stack.url}/api/kernels/{kid}/channels", "print(2 + 2)", headers=h)
        assert out == "4\n"
    finally:
        requests.delete(stack.url + f"/api/kernels/{kid}", headers=h, timeout=60)
