"""Bad input to the gateway is a 4xx JSON error, never a 500, and costs it nothing before auth.

These run a gateway with no agent (sessions stay PENDING and start nothing), so they need no
kernel images.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests

from backendai_jupyter.common import signing
from backendai_jupyter.common.clientconfig import ClientConfig
from backendai_jupyter.common.wire import AGENT_ID_HEADER, AGENT_KEY_HEADER, AGENT_WS_PATH, JOIN_TOKEN_HEADER

from .stack import Api, Cluster, aid, port_span

IMAGE = "backendai-jupyter/python"
LIMIT = 64 * 1024  # the test gateway's Gateway.max_request_body


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(
        tmp_path_factory.mktemp("input"),
        aid("test-input"),
        port_span("31700-31749"),
        f"--Gateway.max_request_body={LIMIT}",
    )
    # Token callers are the admin too.
    c.api.config.token = json.loads((c.tmp / "gw" / "admin-keypair.json").read_text())["token"]
    try:
        yield c
    finally:
        c.close()


def _user(gw: Cluster, name: str) -> Api:
    created = gw.api("POST", "/v1/admin/users", {"name": name})
    return Api(ClientConfig(gw.url, created["access_key"], created["secret_key"], created["token"]))


def _signed(api: Api, method: str, path: str, body: bytes) -> requests.Response:
    headers = signing.sign(api.config.access_key, api.config.secret_key, method, path, body)
    return requests.request(method, api.config.url + path, data=body, headers=headers, timeout=30)


def _is_error(resp: requests.Response, status: int, type_: str | None = None) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    assert resp.headers["Content-Type"].startswith("application/json")
    body = resp.json()
    assert body["status"] == status and body["title"] and body["type"]
    if type_:
        assert body["type"] == type_, body
    return body


def _raw(gw: Cluster, head: str, body: bytes = b"") -> tuple[int, bytes, float]:
    """Send ``head`` (and ``body``) on a fresh socket; the status, response and seconds to answer."""
    u = urlsplit(gw.url)
    with socket.create_connection((u.hostname, u.port), timeout=10) as s:
        start = time.monotonic()
        s.sendall(head.encode("latin-1") + body)
        data = b""
        while b"\r\n\r\n" not in data or len(data) < data.index(b"\r\n\r\n") + 4 + _length(data):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        took = time.monotonic() - start
    return int(data.split(b" ", 2)[1]), data, took


def _length(data: bytes) -> int:
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":", 1)[1])
    return 0


# -- the body limit and authentication before the body ------------------------------------------


def test_an_unauthenticated_request_is_refused_before_its_body_is_read(gw: Cluster):
    # The headers promise 100 MB that never come: an answer at all proves the body was not awaited.
    head = (
        "POST /v1/sessions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {100 * 2**20}\r\n\r\n"
    )
    status, data, took = _raw(gw, head, b"{")
    assert status == 401 and took < 5
    assert json.loads(data.split(b"\r\n\r\n", 1)[1])["type"] == "unauthorized"


def test_a_stale_signature_is_refused_before_the_body_is_read(gw: Cluster):
    cfg = gw.api.config
    headers = signing.sign(cfg.access_key, cfg.secret_key, "POST", "/v1/sessions", b"{}")
    headers[signing.DATE_HEADER] = "2001-01-01T00:00:00+00:00"
    head = "POST /v1/sessions HTTP/1.1\r\nHost: x\r\nContent-Length: 50000000\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    status, data, _ = _raw(gw, head)
    assert status == 401 and b"minutes off" in data


def test_a_body_over_the_limit_is_413_json_and_creates_nothing(gw: Cluster):
    before = gw.api("GET", "/v1/sessions")["sessions"]
    big = json.dumps({"image": IMAGE, "name": "x", "env": {"A": "y" * 4000}, "pad": "z" * LIMIT}).encode()
    _is_error(_signed(gw.api, "POST", "/v1/sessions", big), 413, "payload-too-large")
    # A token caller too, and the Content-Length alone decides: nothing of the body is awaited.
    cfg = gw.api.config
    head = (
        f"POST /v1/sessions HTTP/1.1\r\nHost: x\r\nAuthorization: token {cfg.token}\r\n"
        f"Content-Length: {LIMIT + 1}\r\n\r\n"
    )
    status, _, took = _raw(gw, head)
    assert status == 413 and took < 5
    assert gw.api("GET", "/v1/sessions")["sessions"] == before


def test_a_body_within_the_limit_is_read_and_its_signature_checked(gw: Cluster):
    body = json.dumps({"image": IMAGE, "name": "fits", "pad": "z" * (LIMIT - 100)}).encode()
    assert len(body) <= LIMIT
    resp = _signed(gw.api, "POST", "/v1/sessions", body)
    assert resp.status_code == 201, resp.text
    gw.api("DELETE", f"/v1/sessions/{resp.json()['id']}")
    # The signature still covers the body: another body under the same headers is refused.
    cfg = gw.api.config
    headers = signing.sign(cfg.access_key, cfg.secret_key, "POST", "/v1/sessions", body)
    other = body.replace(b"fits", b"fitz")
    resp = requests.post(gw.url + "/v1/sessions", data=other, headers=headers, timeout=30)
    _is_error(resp, 401, "unauthorized")


def test_the_kernel_gateway_api_refuses_bodies_over_the_limit(gw: Cluster):
    cfg = gw.api.config
    head = (
        f"POST /api/kernels HTTP/1.1\r\nHost: x\r\nAuthorization: token {cfg.token}\r\n"
        f"Content-Length: {LIMIT + 1}\r\n\r\n"
    )
    status, _, took = _raw(gw, head)
    assert 400 <= status < 500 and took < 5


def test_unknown_access_key_and_wrong_secret_get_the_same_answer(gw: Cluster):
    cfg = gw.api.config
    wrong_secret = signing.sign(cfg.access_key, "not-the-secret", "GET", "/v1/sessions")
    unknown_key = signing.sign("AKNOSUCHKEY0000000", "x", "GET", "/v1/sessions")
    answers = [
        requests.get(gw.url + "/v1/sessions", headers=h, timeout=10) for h in (wrong_secret, unknown_key)
    ]
    assert [r.status_code for r in answers] == [401, 401]
    assert answers[0].json() == answers[1].json()


@pytest.mark.parametrize("header", [AGENT_KEY_HEADER, JOIN_TOKEN_HEADER])
def test_agent_websocket_with_a_non_ascii_key_is_4xx_json(gw: Cluster, header: str):
    head = (
        f"GET {AGENT_WS_PATH} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        f"{AGENT_ID_HEADER}: agent-\u00e9\r\n{header}: \u00e9t\u00e9\r\n\r\n"
    )
    status, data, _ = _raw(gw, head)
    assert 400 <= status < 500
    assert json.loads(data.split(b"\r\n\r\n", 1)[1])["status"] == status


# -- wrong JSON types -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body, fragment",
    [
        ({"image": IMAGE, "resources": ["cpu", 1]}, "resources must be an object"),
        ({"image": IMAGE, "resources": {"cpu": "0", "mem": "0"}}, "cpu"),
        ({"image": IMAGE, "resources": {"cpu": "0.05"}}, "minimum"),
        ({"image": IMAGE, "resources": {"mem": "1m"}}, "mem"),
        ({"image": IMAGE, "resources": {"cuda.device": "0"}}, "cuda.device"),
        ({"image": IMAGE, "env": {"LD_PRELOAD": "libx.so"}}, "LD_PRELOAD is set by the agent"),
        ({"image": IMAGE, "env": {"NVIDIA_VISIBLE_DEVICES": "all"}}, "set by the agent"),
        ({"image": IMAGE, "env": {"CUDA_VISIBLE_DEVICES": "0,1"}}, "set by the agent"),
        ({"image": IMAGE, "bound_to_stream": "false"}, "bound_to_stream must be true or false"),
        ({"image": IMAGE, "restart_of": 5}, "restart_of"),
        ({"image": 5}, "image is required"),
    ],
)
def test_bad_session_requests_are_400_naming_the_problem_and_create_nothing(
    gw: Cluster, body: dict[str, Any], fragment: str
):
    before = gw.api("GET", "/v1/sessions")["sessions"]
    err = _is_error(gw.api.request("POST", "/v1/sessions", body), 400, "invalid-request")
    assert fragment in err["title"], err
    assert gw.api("GET", "/v1/sessions")["sessions"] == before


def test_the_minimum_names_the_slot_and_the_amount(gw: Cluster):
    err = _is_error(
        gw.api.request("POST", "/v1/sessions", {"image": IMAGE, "resources": {"cpu": "0", "mem": "1g"}}), 400
    )
    assert "cpu" in err["title"] and "0.1" in err["title"]
    err = _is_error(
        gw.api.request("POST", "/v1/sessions", {"image": IMAGE, "resources": {"cpu": "1", "mem": "1k"}}), 400
    )
    assert "mem" in err["title"] and "64 MiB" in err["title"]


def test_a_request_at_the_minimum_is_accepted(gw: Cluster):
    model = gw.api("POST", "/v1/sessions", {"image": IMAGE, "resources": {"cpu": "0.1", "mem": "64m"}})
    assert model["state"] == "PENDING" and model["resources"] == {"cpu": "0.1", "mem": str(64 * 2**20)}
    gw.api("DELETE", f"/v1/sessions/{model['id']}")


@pytest.mark.parametrize(
    "body, fragment",
    [
        ({"name": "u-str-admin", "is_admin": "false"}, "is_admin must be true or false"),
        ({"name": "u-int-admin", "is_admin": 1}, "is_admin must be true or false"),
        ({"name": 5}, "name"),
        ({"name": "u-pol", "policy": 5}, "policy must be a policy name"),
    ],
)
def test_bad_user_creation_is_400_and_makes_no_user(gw: Cluster, body: dict[str, Any], fragment: str):
    err = _is_error(gw.api.request("POST", "/v1/admin/users", body), 400, "invalid-request")
    assert fragment in err["title"], err
    names = [u["name"] for u in gw.api("GET", "/v1/admin/users")["users"]]
    assert body["name"] not in names


def test_a_string_false_does_not_disable_or_promote_a_user(gw: Cluster):
    _user(gw, "strict-patch")
    for body, fragment in [
        ({"disabled": "false"}, "disabled must be true or false"),
        ({"disabled": 0}, "disabled must be true or false"),
        ({"policy": 5}, "policy must be a policy name"),
        ({"policy": ["p"]}, "policy must be a policy name"),
    ]:
        err = _is_error(gw.api.request("PATCH", "/v1/admin/users/strict-patch", body), 400, "invalid-request")
        assert fragment in err["title"], err
    me = next(u for u in gw.api("GET", "/v1/admin/users")["users"] if u["name"] == "strict-patch")
    assert me["disabled"] is False and me["is_admin"] is False
    # Real booleans still work.
    assert gw.api("PATCH", "/v1/admin/users/strict-patch", {"disabled": True})["disabled"] is True


@pytest.mark.parametrize(
    "body, fragment",
    [
        ({"max_sessions": True}, "max_sessions"),
        ({"max_sessions": -1}, "max_sessions"),
        ({"max_sessions": "3"}, "max_sessions"),
        ({"max_session_resources": ["cpu"]}, "max_session_resources must be an object"),
        ({"total_resources": "4"}, "total_resources must be an object"),
        ({"allowed_images": "python"}, "allowed_images"),
    ],
)
def test_bad_policies_are_400_and_change_nothing(gw: Cluster, body: dict[str, Any], fragment: str):
    err = _is_error(gw.api.request("PUT", "/v1/admin/policies/strict", body), 400, "invalid-request")
    assert fragment in err["title"], err
    assert "strict" not in [p["name"] for p in gw.api("GET", "/v1/admin/policies")["policies"]]


def test_a_non_string_signal_is_400(gw: Cluster):
    sid = gw.api("POST", "/v1/sessions", {"image": IMAGE})["id"]
    try:
        err = _is_error(gw.api.request("POST", f"/v1/sessions/{sid}/signal", {"signal": 9}), 400)
        assert "signal" in err["title"]
    finally:
        gw.api("DELETE", f"/v1/sessions/{sid}")


def test_kernel_gateway_refuses_agent_variables_in_env(gw: Cluster):
    cfg = gw.api.config
    r = requests.post(
        gw.url + "/api/kernels",
        json={"name": "backendai-python3", "env": {"KERNEL_X": "1", "LD_PRELOAD": "libx.so"}},
        headers={"Authorization": f"token {cfg.token}"},
        timeout=30,
    )
    assert r.status_code == 400, r.text
    assert "LD_PRELOAD" in r.text and "set by the agent" in r.text
    kernels = requests.get(
        gw.url + "/api/kernels", headers={"Authorization": f"token {cfg.token}"}, timeout=30
    )
    assert kernels.json() == []


def test_openapi_spec_is_served_without_credentials(gw: Cluster):
    r = requests.get(gw.url + "/v1/openapi.json", timeout=10)
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("application/json")
    spec = r.json()
    assert spec["openapi"].startswith("3.")
    assert {"/v1/sessions", "/v1/sessions/{sid}", "/v1/admin/users"} <= set(spec["paths"])


@pytest.mark.parametrize(
    "body",
    [
        b"[1, 2]",
        b'"text"',
        b'{"path": 1, "type": "notebook"}',
        b'{"path": "a.ipynb"}',
        b'{"path": "a.ipynb", "type": "notebook", "kernel": "python"}',
        b'{"path": "a.ipynb", "type": "notebook", "kernel": {"name": 5}}',
    ],
)
def test_kernel_gateway_session_bodies_of_the_wrong_shape_are_400(gw: Cluster, body: bytes):
    headers = {"Authorization": f"token {gw.api.config.token}"}
    resp = requests.post(gw.url + "/api/sessions", data=body, headers=headers, timeout=30)
    assert resp.status_code == 400, resp.text
    assert requests.get(gw.url + "/api/sessions", headers=headers, timeout=30).json() == []
