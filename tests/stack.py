"""Running the real system for tests: `backendai-jupyter up` (or a gateway and agents) as processes."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import requests

from backendai_jupyter.common import signing
from backendai_jupyter.common.clientconfig import ClientConfig

BAI = str(Path(sys.executable).with_name("backendai-jupyter"))
AGENT_LABEL = "io.backendai-jupyter.agent"
GATEWAY_CANARY = "BACKENDAI_GATEWAY_SECRET_CANARY"
# Several test runs can share one Docker engine when each sets its own BAI_TEST_SLOT (0-9): agent ids
# and kernel port ranges then differ, so no run re-adopts or removes another's containers.
SLOT = int(os.environ.get("BAI_TEST_SLOT", "0"))


def aid(name: str) -> str:
    """A test agent id, unique to this run's slot."""
    return f"{name}-s{SLOT}" if SLOT else name


def port_span(span: str) -> str:
    """A kernel port range (``LOW-HIGH`` under 32000), moved into this run's slot."""
    low, high = (int(p) + SLOT * 1000 for p in span.split("-"))
    return f"{low}-{high}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def wait_for_line(proc: subprocess.Popen[str], log: Path, text: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in log.read_text():
            return
        if proc.poll() is not None:
            raise RuntimeError(f"process exited ({proc.returncode}):\n{log.read_text()}")
        time.sleep(0.1)
    raise TimeoutError(f"no {text!r} within {timeout} s:\n{log.read_text()}")


@dataclass
class Api:
    """A signed /v1 client for tests."""

    config: ClientConfig

    def request(self, method: str, path: str, body: Any = None, *, sign: bool = True) -> requests.Response:
        data = json.dumps(body).encode() if body is not None else b""
        headers = {"Content-Type": "application/json"}
        if sign:
            headers.update(signing.sign(self.config.access_key, self.config.secret_key, method, path, data))
        return requests.request(
            method,
            self.config.url + path,
            data=data or None,
            headers=headers,
            timeout=60,
            verify=self.config.ca_file or True,
        )

    def raw(self, method: str, path: str, data: bytes = b"") -> requests.Response:
        """A signed request with a raw body (a file for the vfolder file API)."""
        headers = signing.sign(self.config.access_key, self.config.secret_key, method, path, data)
        return requests.request(
            method,
            self.config.url + path,
            data=data if method in ("PUT", "PATCH", "POST") else None,
            headers=headers,
            timeout=60,
            verify=self.config.ca_file or True,
        )

    def __call__(self, method: str, path: str, body: Any = None) -> Any:
        resp = self.request(method, path, body)
        assert resp.status_code < 400, resp.text
        return resp.json() if resp.content else None

    def wait_state(self, sid: str, states: set[str], timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            model = self("GET", f"/v1/sessions/{sid}")
            if model["state"] in states:
                return model
            time.sleep(0.1)
        raise TimeoutError(f"session {sid} never reached {states}: {model}")


@dataclass
class Stack:
    """A running `backendai-jupyter up` and what a test needs to reach it."""

    proc: subprocess.Popen[str]
    log: Path
    url: str
    client_config: Path
    data_dir: Path
    agent_id: str
    api: Api

    def containers(self, all_: bool = True) -> list[Any]:
        client = docker.from_env()
        # (A container removed between the listing and its inspection is not there: no error.)
        return client.containers.list(
            all=all_, filters={"label": f"{AGENT_LABEL}={self.agent_id}"}, ignore_removed=True
        )

    def stop(self, sig: int = signal.SIGINT, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout)
        return self.proc.returncode


def start_up(tmp: Path, agent_id: str, port_range: str, *extra: str, db_url: str | None = None) -> Stack:
    """Start `backendai-jupyter up` in its own data directory and wait until it is ready.

    ``db_url``: its database (BACKENDAI_DB_URL), when not the environment's.
    """
    port = free_port()
    cfg_path = tmp / "client.json"
    log = tmp / "up.log"
    # A secret-looking variable in the gateway's own environment: tests check it reaches no kernel.
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(tmp / "jupyter-config"), GATEWAY_CANARY: "gateway-only"}
    if db_url is not None:
        env["BACKENDAI_DB_URL"] = db_url
    cmd = [
        BAI,
        "up",
        "--port",
        str(port),
        "--data-dir",
        str(tmp / "data"),
        f"--UpApp.client_config={cfg_path}",
        f"--Agent.agent_id={agent_id}",
        f"--Agent.port_range={port_range}",
        *extra,
    ]
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, text=True)
    wait_for_line(proc, log, "backendai-jupyter is up")
    config = ClientConfig.load(cfg_path)
    assert config is not None
    return Stack(proc, log, config.url, cfg_path, tmp / "data", agent_id, Api(config))


def remove_containers(agent_id: str) -> int:
    """Remove the agent's containers; one its agent is removing already counts as removed."""
    client = docker.from_env()
    found = client.containers.list(
        all=True, filters={"label": f"{AGENT_LABEL}={agent_id}"}, ignore_removed=True
    )
    for c in found:
        try:
            c.remove(force=True)
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError as e:
            if e.status_code != 409:  # 409: its removal is already in progress
                raise
    return len(found)


def eventually(check: Any, timeout: float = 15, interval: float = 0.1) -> Any:
    """Wait until ``check()`` is truthy and return it; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"still not true after {timeout} s: {check}")
        time.sleep(interval)


@contextlib.contextmanager
def jupyter(app: str, root: Path, token: str, *args: str) -> Iterator[str]:
    """Run `jupyter server` or `jupyter lab` on a free port; yields its URL once it answers."""
    port = free_port()
    log = root / f"{app}.log"
    proc = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("jupyter")),
            app,
            "--no-browser",
            f"--port={port}",
            "--ServerApp.ip=127.0.0.1",
            f"--IdentityProvider.token={token}",
            f"--ServerApp.root_dir={root}",
            "--allow-root",
            *args,
        ],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_line(proc, log, "Jupyter Server")
        eventually(lambda: _answers(url), timeout=30)
        yield url
    except BaseException:
        print(f"--- {app} log ---\n{log.read_text()[-4000:]}")  # shown by pytest on failure
        raise
    finally:
        proc.terminate()  # the server shuts down the kernels it started
        proc.wait(30)


def _answers(url: str) -> bool:
    try:
        return requests.get(url + "/api", timeout=2).ok
    except requests.ConnectionError:
        return False


def make_certs(directory: Path, *hosts: str) -> Path:
    """A private CA and gateway certificate from `backendai-jupyter certs create`."""
    cmd = [BAI, "certs", "create", "--dir", str(directory), *(a for h in hosts for a in ("--host", h))]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return directory


class Cluster:
    """A gateway and an agent as separate processes, the way several hosts would run them.

    With ``tls=True`` the gateway serves HTTPS with a certificate from ``certs create`` (in
    ``tmp/certs``), and agents and the admin client trust its CA.
    """

    def __init__(
        self, tmp: Path, agent_id: str, port_range: str, *gateway_args: str, tls: bool = False
    ) -> None:
        self.tmp, self.agent_id, self.port_range = tmp, agent_id, port_range
        self.port = free_port()
        self.ca_file = ""
        if tls:
            certs = make_certs(tmp / "certs")
            self.ca_file = str(certs / "ca.pem")
            gateway_args = (
                f"--Gateway.certfile={certs / 'gateway.pem'}",
                f"--Gateway.keyfile={certs / 'gateway-key.pem'}",
                *gateway_args,
            )
        self.gateway_args = gateway_args
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self.gateway_runs = 0
        self.start_gateway()
        keys = json.loads((tmp / "gw" / "admin-keypair.json").read_text())
        self.api = Api(ClientConfig(self.url, keys["access_key"], keys["secret_key"], ca_file=self.ca_file))
        self.agent: subprocess.Popen[str] | None = None
        self.agent_runs = 0
        self.others: dict[str, subprocess.Popen[str]] = {}

    def start_gateway(self) -> None:
        self.gateway_runs += 1
        log = self.tmp / f"gateway{self.gateway_runs}.log"
        self.gateway = subprocess.Popen(
            [
                BAI,
                "gateway",
                "--port",
                str(self.port),
                "--data-dir",
                str(self.tmp / "gw"),
                *self.gateway_args,
            ],
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
            text=True,
        )
        wait_for_line(self.gateway, log, "gateway ready")

    def start_agent(self) -> None:
        """(Re)start the main agent; its state directory survives restarts."""
        self.agent_runs += 1
        self.agent = self._agent(self.agent_id, self.port_range, "agent", f"agent{self.agent_runs}.log")

    def _agent(
        self,
        agent_id: str,
        port_range: str,
        state: str,
        log_name: str,
        *args: str,
        wait: bool = True,
        gateway_urls: Sequence[str] = (),
    ) -> subprocess.Popen[str]:
        log = self.tmp / log_name
        own_ca = (a.startswith("--Agent.ca_file=") for a in args)  # a test's own CA wins
        env = {**os.environ, "BACKENDAI_AGENT_TOKEN": (self.tmp / "gw" / "agent-token").read_text()}
        cmd = [
            BAI,
            "agent",
            f"--gateway-url={','.join(gateway_urls or [self.url])}",
            f"--id={agent_id}",
            f"--port-range={port_range}",
            f"--state-dir={self.tmp / state}",
            *([f"--Agent.ca_file={self.ca_file}"] if self.ca_file and not any(own_ca) else []),
            *args,
        ]
        proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, text=True, env=env)
        if wait:
            wait_for_line(proc, log, "registered with the gateway")
        return proc

    def agent_status(self) -> str:
        agents = self.api("GET", "/v1/agents")["agents"]
        return next((a["status"] for a in agents if a["id"] == self.agent_id), "")

    def add_agent(
        self, agent_id: str, port_range: str, *args: str, wait: bool = True, gateway_urls: Sequence[str] = ()
    ) -> subprocess.Popen[str]:
        """Another agent process with its own id, ports and state directory (log: agent-ID.log).

        ``gateway_urls``: the gateways it links to, when not just this cluster's.
        """
        proc = self._agent(
            agent_id,
            port_range,
            f"agent-{agent_id}",
            f"agent-{agent_id}.log",
            *args,
            wait=wait,
            gateway_urls=gateway_urls,
        )
        self.others[agent_id] = proc
        return proc

    def client_config(self) -> Path:
        """A client config file for this cluster's admin (for the CLI and kernelspecs)."""
        path = self.tmp / "client.json"
        self.api.config.save(path)
        return path

    def close(self) -> None:
        for p in (self.agent, *self.others.values(), self.gateway):
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGINT)
                p.wait(30)
        for agent_id in (self.agent_id, *self.others):
            remove_containers(agent_id)
