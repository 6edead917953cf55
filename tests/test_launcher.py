"""Clients that run a kernelspec's argv themselves (VS Code local kernels, jupyter_client 6)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from jupyter_client.blocking.client import BlockingKernelClient
from jupyter_client.connect import write_connection_file
from jupyter_client.kernelspec import KernelSpecManager

from .conftest import SPEC
from .kernel_helpers import stdout
from .stack import Cluster, Stack, aid, eventually, port_is_free, port_span

pytestmark = pytest.mark.docker


def _launch(tmp_path: Path) -> tuple[subprocess.Popen[str], BlockingKernelClient]:
    """Do what VS Code does: a fresh connection file, the kernelspec's argv, a plain client."""
    fname, _ = write_connection_file(
        str(tmp_path / "kernel.json"), ip="127.0.0.1", key=os.urandom(16).hex().encode()
    )
    argv = [a.replace("{connection_file}", fname) for a in KernelSpecManager().get_kernel_spec(SPEC).argv]
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
    kc = BlockingKernelClient()
    kc.load_connection_file(fname)
    kc.start_channels()
    _wait_ready(kc, proc)
    return proc, kc


def _wait_ready(kc: BlockingKernelClient, proc: subprocess.Popen[Any]) -> None:
    """A client without a KernelManager calls the kernel dead once its heartbeat is silent for a
    second, and the remote kernel takes a few to start: ask again, as a client's retry would."""
    deadline = time.monotonic() + 60
    while True:
        try:
            kc.wait_for_ready(timeout=60)
            return
        except RuntimeError:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise
            time.sleep(0.5)


def _session_of(stack: Stack) -> dict:
    (session,) = [
        s for s in stack.api("GET", "/v1/sessions?active=1")["sessions"] if s["name"].startswith("launcher:")
    ]
    return session


def test_the_kernelspec_argv_runs_a_remote_kernel_for_clients_that_ignore_provisioners(
    stack: Stack, tmp_path: Path
):
    proc, kc = _launch(tmp_path)
    try:
        sid = _session_of(stack)["id"]
        out: list = []
        reply = kc.execute_interactive(
            "for i in range(3): print(i, flush=True)", output_hook=out.append, timeout=30
        )
        assert reply["content"]["status"] == "ok" and stdout(out) == "0\n1\n2\n"
        png: list = []
        kc.execute_interactive(
            "import matplotlib.pyplot as plt\nplt.plot([1, 2, 3])\nplt.show()",
            output_hook=lambda m: png.append(m) if m["msg_type"] == "display_data" else None,
            timeout=60,
        )
        assert png and "image/png" in png[0]["content"]["data"]
        err = kc.execute_interactive("1 / 0", timeout=30)
        assert err["content"]["status"] == "error" and err["content"]["ename"] == "ZeroDivisionError"
        typed: list = []
        kc.execute_interactive(
            "print('hello', input('name? '))",
            allow_stdin=True,
            stdin_hook=lambda m: kc.input("ada"),
            output_hook=typed.append,
            timeout=30,
        )
        assert stdout(typed) == "hello ada\n"
        kc.execute("while True: pass")
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)  # what a client does to interrupt a kernel it started
        assert kc.get_shell_msg(timeout=10)["content"]["ename"] == "KeyboardInterrupt"
        assert [c for c in stack.containers() if c.labels["io.backendai-jupyter.session"] == sid]
        kc.shutdown()
        assert proc.wait(30) == 0
        assert "relaying its channels" in proc.stderr.read()
        assert not [c for c in stack.containers() if c.labels["io.backendai-jupyter.session"] == sid]
        assert stack.api("GET", f"/v1/sessions/{sid}")["state"] == "TERMINATED"
    finally:
        kc.stop_channels()
        if proc.poll() is None:
            proc.kill()


def test_sigterm_to_the_launcher_ends_the_remote_kernel(stack: Stack, tmp_path: Path):
    proc, kc = _launch(tmp_path)
    kc.stop_channels()
    sid = _session_of(stack)["id"]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    assert stack.api("GET", f"/v1/sessions/{sid}")["state"] == "TERMINATED"


def test_a_launcher_killed_outright_leaves_no_kernel_behind(stack: Stack, tmp_path: Path):
    proc, kc = _launch(tmp_path)
    kc.stop_channels()
    sid = _session_of(stack)["id"]
    start = time.monotonic()
    proc.kill()  # SIGKILL: no chance to clean up; the gateway sees its event stream drop
    proc.wait(10)
    eventually(lambda: stack.api("GET", f"/v1/sessions/{sid}")["state"] == "TERMINATED", timeout=20)
    # Bounded by the gateway's grace for a reconnecting client (5 s) plus removing the container.
    assert time.monotonic() - start < 12
    assert not [c for c in stack.containers() if c.labels["io.backendai-jupyter.session"] == sid]


def test_the_kernelspec_works_under_jupyter_client_6_with_nbclient(stack: Stack, tmp_path: Path):
    import sys

    import nbformat

    python = Path(__file__).resolve().parent.parent / ".venv-jc6" / "bin" / "python"
    assert python.exists(), "`make test` creates .venv-jc6 (jupyter_client<7, nbclient<0.6)"
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell("import os\nhere = os.path.exists('/.dockerenv')"),
        nbformat.v4.new_code_cell("print('container:', here, 6 * 7)"),
    ]
    path = tmp_path / "nb.ipynb"
    nbformat.write(nb, path)
    script = (
        "import sys, jupyter_client, nbclient, nbformat\n"
        "assert jupyter_client.__version__.startswith('6.'), jupyter_client.__version__\n"
        "nb = nbformat.read(sys.argv[1], as_version=4)\n"
        "client = nbclient.NotebookClient(nb, kernel_name='backendai-python3', startup_timeout=120)\n"
        "client.execute()\n"
        "nbformat.write(nb, sys.argv[1])\n"
    )
    env = {**os.environ, "JUPYTER_PATH": str(Path(sys.prefix) / "share" / "jupyter")}
    subprocess.run([str(python), "-c", script, str(path)], check=True, env=env, timeout=300)
    outputs = nbformat.read(path, as_version=4).cells[1].outputs
    assert "".join(o.get("text", "") for o in outputs) == "container: True 42\n"
    eventually(
        lambda: (
            not [
                s
                for s in stack.api("GET", "/v1/sessions?active=1")["sessions"]
                if s["name"].startswith("launcher:")
            ]
        ),
        timeout=20,
    )


def test_a_launcher_whose_client_vanished_ends_its_kernel(stack: Stack, tmp_path: Path):
    fname, _ = write_connection_file(
        str(tmp_path / "kernel.json"), ip="127.0.0.1", key=os.urandom(16).hex().encode()
    )
    argv = [a.replace("{connection_file}", fname) for a in KernelSpecManager().get_kernel_spec(SPEC).argv]
    # A stand-in client process that starts the launcher and then dies without a word.
    client = subprocess.Popen(["sh", "-c", " ".join(f"'{a}'" for a in argv) + " & wait"])
    kc = BlockingKernelClient()
    kc.load_connection_file(fname)
    kc.start_channels()
    _wait_ready(kc, client)
    kc.stop_channels()
    sid = _session_of(stack)["id"]
    client.kill()
    client.wait(10)
    eventually(lambda: stack.api("GET", f"/v1/sessions/{sid}")["state"] == "TERMINATED", timeout=15)
    assert not [c for c in stack.containers() if c.labels["io.backendai-jupyter.session"] == sid]


def test_the_launcher_holds_the_clients_ports_while_the_kernel_waits(tmp_path: Path, docker_engine):
    # A gateway with no agent: the kernel waits in the queue for as long as the test likes.
    cluster = Cluster(tmp_path, aid("test-bind"), port_span("31960-31969"))
    try:
        fname, info = write_connection_file(
            str(tmp_path / "kernel.json"), ip="127.0.0.1", key=os.urandom(16).hex().encode()
        )
        argv = [a.replace("{connection_file}", fname) for a in KernelSpecManager().get_kernel_spec(SPEC).argv]
        env = {**os.environ, "BACKENDAI_CLIENT_CONFIG": str(cluster.client_config())}
        proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, env=env)
        try:
            assert "requested" in proc.stderr.readline()
            waiting = cluster.api("GET", "/v1/sessions?active=1")["sessions"]
            assert [s["state"] for s in waiting] == ["PENDING"]
            ports = [v for k, v in info.items() if k.endswith("_port")]
            assert not [p for p in ports if port_is_free(p)], "a waiting kernel's ports must stay taken"
            # The client sees a live kernel process (heartbeats answered) while it waits.
            kc = BlockingKernelClient()
            kc.load_connection_file(fname)
            kc.start_channels()
            time.sleep(3)
            assert kc.is_alive()
            kc.stop_channels()
        finally:
            proc.terminate()
            proc.wait(30)
        assert cluster.api("GET", f"/v1/sessions/{waiting[0]['id']}")["state"] == "CANCELLED"
    finally:
        cluster.close()
