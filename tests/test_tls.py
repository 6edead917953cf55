"""TLS and replay protection, with real processes: `certs create`, an https gateway, agents over wss,
clients that verify it, the refused insecure bind, and signed requests that are good only once."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import requests
from jupyter_client.manager import KernelManager

from backendai_jupyter.common import signing
from backendai_jupyter.common.clientconfig import ClientConfig
from backendai_jupyter.common.tls import TLSError
from backendai_jupyter.gateway.app import is_loopback
from backendai_jupyter.provisioner.client import GatewayClient

from .kernel_helpers import client, execute_over_websocket, run, stdout
from .stack import BAI, Cluster, aid, free_port, jupyter, make_certs, port_span, start_up, wait_for_line

IMAGE = "backendai-jupyter/python"
SPEC = "backendai-python3"


# -- certs create -------------------------------------------------------------------------------------


def test_certs_create_writes_private_keys_0600_and_refuses_to_overwrite(tmp_path: Path):
    out = subprocess.run(
        [BAI, "certs", "create", "--dir", str(tmp_path), "--host", "gw.example.org", "--host", "10.0.0.5"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert "--Gateway.certfile=" in out.stdout and "--Agent.ca_file=" in out.stdout
    assert "BACKENDAI_CA_FILE" in out.stdout
    for key in ("ca-key.pem", "gateway-key.pem"):
        assert stat.S_IMODE((tmp_path / key).stat().st_mode) == 0o600
    from cryptography import x509

    cert = x509.load_pem_x509_certificate((tmp_path / "gateway.pem").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    names = {str(n.value) for n in san}
    assert {"gw.example.org", "10.0.0.5", "localhost", "127.0.0.1"} <= names
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    again = subprocess.run([BAI, "certs", "create", "--dir", str(tmp_path)], capture_output=True, text=True)
    assert again.returncode == 1
    assert "not overwriting" in again.stderr and "--force" in again.stderr
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before

    forced = subprocess.run(
        [BAI, "certs", "create", "--dir", str(tmp_path), "--force"], capture_output=True, text=True
    )
    assert forced.returncode == 0, forced.stderr
    assert (tmp_path / "ca.pem").read_bytes() != before["ca.pem"]


# -- the insecure-bind rule ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "host, loopback",
    [
        ("127.0.0.1", True),
        ("127.3.2.1", True),
        ("::1", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("", False),
        ("10.0.0.5", False),
        ("gw.example.org", False),
    ],
)
def test_only_loopback_addresses_count_as_local(host: str, loopback: bool):
    assert is_loopback(host) is loopback


def _gateway(tmp: Path, *args: str) -> tuple[subprocess.Popen[str], Path]:
    log = tmp / f"gateway-{len(list(tmp.glob('gateway-*.log')))}.log"
    proc = subprocess.Popen(
        [BAI, "gateway", "--port", str(free_port()), "--data-dir", str(tmp / "gw"), *args],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        text=True,
    )
    return proc, log


def test_plain_http_on_all_addresses_is_refused_unless_explicitly_allowed(tmp_path: Path):
    proc, log = _gateway(tmp_path, "--ip=0.0.0.0")
    assert proc.wait(60) == 1
    text = log.read_text()
    assert "refusing to serve plain HTTP on 0.0.0.0" in text
    assert "certs create" in text and "allow_insecure" in text
    assert "Traceback" not in text
    assert not (tmp_path / "gw").exists()  # refused before it touched anything

    proc, log = _gateway(tmp_path, "--ip=0.0.0.0", "--Gateway.allow_insecure=True")
    try:
        wait_for_line(proc, log, "gateway ready")
        assert "INSECURE: serving plain HTTP on 0.0.0.0" in log.read_text()
    finally:
        proc.terminate()
        proc.wait(30)


# -- an https cluster ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory: pytest.TempPathFactory, docker_engine) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("tls"), aid("test-tls"), port_span("31850-31899"), tls=True)
    try:
        c.start_agent()
        yield c
    finally:
        c.close()


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The CA of another cluster: it did not sign our gateway's certificate."""
    return str(make_certs(tmp_path_factory.mktemp("other-ca")) / "ca.pem")


@pytest.mark.docker
def test_https_v1_answers_clients_that_trust_the_ca(tls_cluster: Cluster):
    assert tls_cluster.url.startswith("https://")
    assert tls_cluster.api("GET", "/v1")["is_admin"] is True
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(tls_cluster.url + "/v1", timeout=10)  # the system store does not know our CA


@pytest.mark.docker
def test_an_agent_given_several_gateways_uses_the_ca_for_the_https_one(tls_cluster: Cluster):
    agent_id = aid("test-tls-several")
    dead = f"http://127.0.0.1:{free_port()}"
    proc = tls_cluster.add_agent(agent_id, port_span("31900-31949"), gateway_urls=[dead, tls_cluster.url])
    try:
        text = (tls_cluster.tmp / f"agent-{agent_id}.log").read_text()
        assert f"registered with the gateway at {tls_cluster.url} as {agent_id}" in text
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.mark.docker
@pytest.mark.parametrize("trusting", ["nothing", "other"])
def test_client_that_does_not_trust_the_gateway_gets_an_error_naming_the_fix(
    tls_cluster: Cluster, other_ca: str, trusting: str
):
    cfg = tls_cluster.api.config
    ca_file = other_ca if trusting == "other" else ""
    gc = GatewayClient(ClientConfig(cfg.url, cfg.access_key, cfg.secret_key, ca_file=ca_file))
    with pytest.raises(TLSError) as e:
        gc.submit(gc.request("GET", "/v1", timeout=10)).result()
    assert "does not trust" in e.value.title
    assert "ca_file in the client config" in e.value.title and "BACKENDAI_CA_FILE" in e.value.title
    assert (other_ca if ca_file else "system trust store") in e.value.title


@pytest.mark.docker
def test_status_cli_verifies_with_the_ca_from_env_or_config_and_explains_a_failure(
    tls_cluster: Cluster, tmp_path: Path
):
    cfg = tls_cluster.api.config
    path = ClientConfig(cfg.url, cfg.access_key, cfg.secret_key).save(tmp_path / "client.json")
    env = {**os.environ, "BACKENDAI_CLIENT_CONFIG": str(path)}
    env.pop("BACKENDAI_CA_FILE", None)
    bad = subprocess.run([BAI, "status"], capture_output=True, text=True, env=env, timeout=60)
    assert bad.returncode == 1
    assert "does not trust" in bad.stderr and "BACKENDAI_CA_FILE" in bad.stderr
    assert "Traceback" not in bad.stderr
    good = subprocess.run(
        [BAI, "status", "--json"],
        capture_output=True,
        text=True,
        env={**env, "BACKENDAI_CA_FILE": tls_cluster.ca_file},
        timeout=60,
    )
    assert good.returncode == 0, good.stderr
    # (Other tests of this module add agents of their own to the cluster.)
    assert tls_cluster.agent_id in [a["id"] for a in json.loads(good.stdout)["agents"]]


@pytest.mark.docker
def test_agent_over_wss_runs_a_kernel(tls_cluster: Cluster):
    assert "registered with the gateway at https://" in (tls_cluster.tmp / "agent1.log").read_text()
    sid = tls_cluster.api("POST", "/v1/sessions", {"image": IMAGE})["id"]
    try:
        model = tls_cluster.api.wait_state(sid, {"RUNNING", "ERROR"})
        assert model["state"] == "RUNNING", model
        assert model["agent"] == tls_cluster.agent_id
    finally:
        tls_cluster.api("DELETE", f"/v1/sessions/{sid}")


@pytest.mark.docker
@pytest.mark.parametrize("trusting", ["nothing", "other"])
def test_agent_that_does_not_trust_the_gateway_logs_the_fix_and_never_registers(
    tls_cluster: Cluster, other_ca: str, trusting: str
):
    agent_id = aid(f"test-tls-{trusting}")
    args = [f"--Agent.ca_file={other_ca}"] if trusting == "other" else ["--Agent.ca_file="]
    proc = tls_cluster.add_agent(agent_id, port_span("31900-31949"), *args, wait=False)
    log = tls_cluster.tmp / f"agent-{agent_id}.log"
    try:
        wait_for_line(proc, log, "does not trust", timeout=60)
        text = log.read_text()
        assert "--Agent.ca_file" in text and "BACKENDAI_CA_FILE" in text
        assert "Traceback" not in text
        assert agent_id not in [a["id"] for a in tls_cluster.api("GET", "/v1/agents")["agents"]]
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.mark.docker
def test_kernel_manager_launches_a_kernel_through_the_https_gateway(
    tls_cluster: Cluster, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("BACKENDAI_CLIENT_CONFIG", str(tls_cluster.client_config()))
    assert ClientConfig.load(tls_cluster.client_config()).ca_file == tls_cluster.ca_file
    km = KernelManager(kernel_name=SPEC)
    km.start_kernel()
    try:
        kc = client(km)
        reply, outputs = run(kc, "print(6 * 7)")
        assert reply["status"] == "ok" and stdout(outputs).strip() == "42"
        kc.stop_channels()
    finally:
        km.shutdown_kernel(now=True)


@pytest.mark.docker
def test_kernel_gateway_api_runs_a_kernel_over_https_and_wss(tls_cluster: Cluster):
    # The gateway provisions these kernels by calling its own /v1 over https: it trusts its own CA.
    token = json.loads((tls_cluster.tmp / "gw" / "admin-keypair.json").read_text())["token"]
    h = {"Authorization": f"token {token}"}
    url, ca = tls_cluster.url, tls_cluster.ca_file
    r = requests.post(url + "/api/kernels", json={"name": SPEC}, headers=h, verify=ca, timeout=120)
    assert r.status_code == 201, r.text
    kid = r.json()["id"]
    try:
        ws = f"{url}/api/kernels/{kid}/channels"
        assert execute_over_websocket(ws, "print(6 * 7)", headers=h, ca_file=ca) == "42\n"
    finally:
        requests.delete(f"{url}/api/kernels/{kid}", headers=h, verify=ca, timeout=60)


@pytest.mark.docker
def test_jupyter_server_with_an_https_gateway_url_trusts_the_ca_from_ssl_cert_file(
    tls_cluster: Cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    # jupyter_server passes GatewayClient.ca_certs on only with a client certificate, so a private
    # CA reaches `jupyter lab --gateway-url` through OpenSSL's SSL_CERT_FILE (or the system store).
    monkeypatch.setenv("SSL_CERT_FILE", tls_cluster.ca_file)
    token = json.loads((tls_cluster.tmp / "gw" / "admin-keypair.json").read_text())["token"]
    args = (f"--gateway-url={tls_cluster.url}", f"--GatewayClient.auth_token={token}")
    with jupyter("server", tmp_path, "lab", *args) as url:
        r = requests.get(url + "/api/kernelspecs", headers={"Authorization": "token lab"}, timeout=30)
        assert r.status_code == 200, r.text
        assert SPEC in r.json()["kernelspecs"]


# -- replays -------------------------------------------------------------------------------------------


def _send(cluster: Cluster, method: str, path: str, headers: dict[str, str], body: bytes = b"") -> dict:
    resp = requests.request(
        method, cluster.url + path, headers=headers, data=body or None, verify=cluster.ca_file, timeout=30
    )
    return {"status": resp.status_code, **resp.json()}


@pytest.mark.docker
def test_a_signed_request_is_good_once_and_tampering_never_spends_its_nonce(tls_cluster: Cluster):
    cfg = tls_cluster.api.config
    body = json.dumps({"image": "no-such-image"}).encode()
    signed = signing.sign(cfg.access_key, cfg.secret_key, "POST", "/v1/sessions", body)
    later = (datetime.fromisoformat(signed[signing.DATE_HEADER]) + timedelta(seconds=1)).isoformat()
    tampered = [
        ("POST", "/v1/sessions", {**signed, signing.NONCE_HEADER: signing.new_nonce()}, body),
        ("POST", "/v1/sessions?all=1", signed, body),
        ("POST", "/v1/sessions", signed, json.dumps({"image": "other"}).encode()),
        ("POST", "/v1/sessions", {**signed, signing.DATE_HEADER: later}, body),
    ]
    for method, path, headers, data in tampered:
        answer = _send(tls_cluster, method, path, headers, data)
        assert answer["status"] == 401 and answer["type"] == "unauthorized", answer
        assert "signature does not match" in answer["title"]  # the same answer as an unknown key
    # None of those spent the nonce: the genuine request still passes, once.
    first = _send(tls_cluster, "POST", "/v1/sessions", signed, body)
    assert first["status"] == 400 and first["type"] == "unknown-image", first
    again = _send(tls_cluster, "POST", "/v1/sessions", signed, body)
    assert again["status"] == 401 and again["type"] == "unauthorized"
    assert "already received" in again["title"] and signing.NONCE_HEADER in again["title"]


@pytest.mark.docker
def test_a_signed_request_without_a_nonce_is_refused(tls_cluster: Cluster):
    cfg = tls_cluster.api.config
    signed = signing.sign(cfg.access_key, cfg.secret_key, "GET", "/v1/sessions")
    del signed[signing.NONCE_HEADER]
    answer = _send(tls_cluster, "GET", "/v1/sessions", signed)
    assert answer["status"] == 401 and answer["type"] == "unauthorized"
    assert answer["title"].startswith(f"{signing.NONCE_HEADER} is missing")


@pytest.mark.docker
def test_the_event_stream_refuses_replayed_signed_headers_too(tls_cluster: Cluster):
    cfg = tls_cluster.api.config
    path = "/v1/sessions/00000000-0000-0000-0000-000000000000/events"
    signed = signing.sign(cfg.access_key, cfg.secret_key, "GET", path)
    assert _send(tls_cluster, "GET", path, signed)["status"] == 404  # authenticated; no such session
    again = _send(tls_cluster, "GET", path, signed)
    assert again["status"] == 401 and "already received" in again["title"]


# -- `up` with a certificate ---------------------------------------------------------------------------


@pytest.mark.docker
def test_up_with_a_certificate_serves_https_and_writes_a_client_config_that_trusts_the_ca(
    tmp_path: Path, docker_engine
):
    certs = make_certs(tmp_path / "certs")
    s = start_up(
        tmp_path,
        aid("test-tls-up"),
        port_span("31900-31949"),
        f"--certfile={certs / 'gateway.pem'}",
        f"--keyfile={certs / 'gateway-key.pem'}",
    )
    try:
        assert s.url.startswith("https://127.0.0.1:")
        assert s.api.config.ca_file == str(certs / "ca.pem")
        agents = s.api("GET", "/v1/agents")["agents"]
        assert [(a["id"], a["status"]) for a in agents] == [(aid("test-tls-up"), "ALIVE")]
        start = time.monotonic()
        sid = s.api("POST", "/v1/sessions", {"image": IMAGE})["id"]
        assert s.api.wait_state(sid, {"RUNNING", "ERROR"})["state"] == "RUNNING"
        print(f"launch over https: {time.monotonic() - start:.2f} s")
    finally:
        assert s.stop() == 0, s.log.read_text()[-3000:]
