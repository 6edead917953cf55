"""vfolders inside real kernels: what the file API writes, kernels read and write, and back.

A gateway and an agent run as separate processes with a real Docker engine; each kernel is a
container started through /v1 and driven by jupyter_client, exactly as a notebook would be.
"""

from __future__ import annotations

import json
import signal
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest
from jupyter_client.blocking.client import BlockingKernelClient

from backendai_jupyter.common.clientconfig import ClientConfig
from backendai_jupyter.common.wire import KERNEL_HOME

from .kernel_helpers import run, stdout
from .stack import Api, Cluster, aid, port_span

pytestmark = pytest.mark.docker
IMAGE = "backendai-jupyter/python:latest"
SESSION_LABEL = "io.backendai-jupyter.session"


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path, aid("vf-mounts"), port_span("31970-31989"))
    c.start_agent()
    try:
        yield c
    finally:
        c.close()


def user(c: Cluster, name: str) -> Api:
    creds = c.api("POST", "/v1/admin/users", {"name": name})
    return Api(ClientConfig(c.url, creds["access_key"], creds["secret_key"]))


def q(path: str) -> str:
    return urllib.parse.quote(path, safe="")


def kernel(api: Api, **body: Any) -> tuple[str, BlockingKernelClient]:
    s = api("POST", "/v1/sessions", {"image": IMAGE, "resources": {"cpu": "0.5", "mem": "512m"}, **body})
    model = api.wait_state(s["id"], {"RUNNING", "ERROR"}, timeout=120)
    assert model["state"] == "RUNNING", model
    kc = BlockingKernelClient()
    kc.load_connection_info(api("GET", f"/v1/sessions/{s['id']}")["connection"])
    kc.start_channels()
    kc.wait_for_ready(timeout=60)
    return s["id"], kc


def py(kc: BlockingKernelClient, code: str) -> Any:
    """Run ``code`` in the kernel; it prints one JSON line, returned decoded."""
    reply, outputs = run(kc, code, timeout=60)
    assert reply["status"] == "ok", reply
    return json.loads(stdout(outputs).strip().splitlines()[-1])


def binds(sid: str) -> dict[str, tuple[str, bool]]:
    """The kernel container's bind mounts: target → (source, writable)."""
    (c,) = docker.from_env().containers.list(filters={"label": f"{SESSION_LABEL}={sid}"})
    return {m["Destination"]: (m["Source"], m["RW"]) for m in c.attrs["Mounts"] if m["Type"] == "bind"}


KERNEL_SIDE = r"""
import errno, json, os
out = {"cwd": os.getcwd(), "uid": os.getuid()}
out["api_file"] = open("../data.csv").read()
with open("../data.csv", "a") as f:          # written by the file API, appended to by the kernel
    f.write("3,4\n")
with open("result.txt", "w") as f:           # a file the kernel makes
    f.write("mean=2.5\n")
os.makedirs("made-by-kernel/inner", exist_ok=True)
os.symlink("/etc", "../etc-link")            # a link out of the vfolder, for the file API to refuse
os.symlink(os.path.abspath("result.txt"), "../abs-inside")
print(json.dumps(out))
"""


def test_files_cross_between_the_file_api_and_kernels_both_ways(cluster: Cluster):
    alice, bob = user(cluster, "alice"), user(cluster, "bob")
    vf = alice("POST", "/v1/vfolders", {"name": "proj"})
    vid = vf["id"]
    assert alice.raw("PUT", f"/v1/vfolders/{vid}/content?path=data.csv", b"a,b\n1,2\n").status_code == 200
    alice("POST", f"/v1/vfolders/{vid}/mkdir", {"path": "nb"})

    # The notebook's folder in the vfolder: mounted with no extra step, and the kernel starts there.
    sid, kc = kernel(alice, working_dir=f"{KERNEL_HOME}/proj/nb")
    try:
        seen = py(kc, KERNEL_SIDE)
    finally:
        kc.stop_channels()
    assert seen["cwd"] == f"{KERNEL_HOME}/proj/nb"
    assert seen["api_file"] == "a,b\n1,2\n"
    # What the kernel wrote is there for the file API: read, overwritten, deleted.
    got = alice.raw("GET", f"/v1/vfolders/{vid}/download?path={q('nb/result.txt')}")
    assert got.content == b"mean=2.5\n"
    assert alice.raw("GET", f"/v1/vfolders/{vid}/download?path=data.csv").content == b"a,b\n1,2\n3,4\n"
    assert alice.raw("PUT", f"/v1/vfolders/{vid}/content?path={q('nb/result.txt')}", b"mean=3\n").ok
    alice("POST", f"/v1/vfolders/{vid}/move", {"src": "nb/made-by-kernel", "dst": "moved"})
    alice.request("DELETE", f"/v1/vfolders/{vid}/files?path=moved&recursive=1").raise_for_status()
    # The link the kernel planted leads nowhere through the API.
    for path in ["etc-link/passwd", "etc-link"]:
        resp = alice.raw("GET", f"/v1/vfolders/{vid}/download?path={q(path)}")
        assert resp.status_code == 403 and b"root:" not in resp.content, path
    resp = alice.raw("PUT", f"/v1/vfolders/{vid}/content?path={q('etc-link/evil')}", b"x")
    assert resp.status_code == 403
    # An absolute link is the container's path: outside the vfolder on the host, so refused too.
    assert alice.raw("GET", f"/v1/vfolders/{vid}/download?path=abs-inside").status_code == 403

    # Back in a kernel: the API's edit is there and the kernel can still change the file.
    sid2, kc = kernel(alice, mounts=["proj"])
    try:
        after = py(
            kc,
            "import json, os; p = 'proj/nb/result.txt'; t = open(p).read(); open(p, 'a').write('x');"
            "os.remove('proj/data.csv');"
            "print(json.dumps({'text': t, 'gone': not os.path.exists('proj/data.csv')}))",
        )
    finally:
        kc.stop_channels()
    assert after == {"text": "mean=3\n", "gone": True}
    alice("DELETE", f"/v1/sessions/{sid2}")

    # A read-only share is mounted read-only: the kernel reads, and a write fails with EROFS.
    inv = alice("POST", f"/v1/vfolders/{vid}/invitations", {"user": "bob", "permission": "ro"})
    bob("POST", f"/v1/vfolders/invitations/{inv['id']}/accept")
    bsid, kc = kernel(bob, mounts=["proj"])
    try:
        found = py(
            kc,
            "import errno, json\n"
            "try:\n    open('proj/bob.txt', 'w'); err = None\n"
            "except OSError as e:\n    err = errno.errorcode[e.errno]\n"
            "print(json.dumps({'read': open('proj/nb/result.txt').read(), 'write': err}))",
        )
    finally:
        kc.stop_channels()
    assert found == {"read": "mean=3\nx", "write": "EROFS"}
    assert binds(bsid)[f"{KERNEL_HOME}/proj"][1] is False
    assert binds(sid)[f"{KERNEL_HOME}/proj"][1] is True
    # Someone who was never invited cannot mount it: refused before anything is placed.
    carol = user(cluster, "carol")
    resp = carol.request("POST", "/v1/sessions", {"image": IMAGE, "mounts": ["proj"]})
    assert resp.status_code == 404
    assert carol("GET", "/v1/sessions")["sessions"] == []


def test_an_agent_restart_keeps_mounts_and_files(cluster: Cluster):
    alice = user(cluster, "alice")
    vid = alice("POST", "/v1/vfolders", {"name": "keep"})["id"]
    alice("POST", f"/v1/vfolders/{vid}/mkdir", {"path": "work"})
    sid, kc = kernel(alice, working_dir=f"{KERNEL_HOME}/keep/work")
    try:
        py(kc, "import json; open('before.txt', 'w').write('before'); print(json.dumps(1))")
    finally:
        kc.stop_channels()
    before = binds(sid)

    assert cluster.agent is not None
    cluster.agent.send_signal(signal.SIGINT)
    cluster.agent.wait(30)
    cluster.start_agent()  # re-adopts the running kernel
    assert alice.wait_state(sid, {"RUNNING"})["state"] == "RUNNING"
    assert binds(sid) == before
    # A kernel restart after the re-adoption makes a new container: same mounts, same folder.
    alice("POST", f"/v1/sessions/{sid}/restart")
    assert binds(sid) == before
    kc = BlockingKernelClient()
    kc.load_connection_info(alice("GET", f"/v1/sessions/{sid}")["connection"])
    kc.start_channels()
    kc.wait_for_ready(timeout=60)
    try:
        seen = py(
            kc,
            "import json, os; open('after.txt', 'w').write('after');"
            "print(json.dumps({'cwd': os.getcwd(), 'before': open('before.txt').read()}))",
        )
    finally:
        kc.stop_channels()
    assert seen == {"cwd": f"{KERNEL_HOME}/keep/work", "before": "before"}
    names = [e["name"] for e in alice("GET", f"/v1/vfolders/{vid}/files?path=work")["entries"]]
    assert names == ["after.txt", "before.txt"]
