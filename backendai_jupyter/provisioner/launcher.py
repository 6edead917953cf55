"""What a kernelspec's ``argv`` runs when a client starts kernels itself.

VS Code's local kernels and jupyter_client < 7 ignore ``metadata.kernel_provisioner`` and run
``argv`` with a connection file of their own. This launcher asks the gateway for the same kernel
session the provisioner would (same client config, same resource request from the kernelspec),
then relays the five channels between the client's ports and the remote kernel.

The remote kernel is started with the *client's* HMAC key, so every message is valid on both
sides as it is: the relay forwards frames untouched (pyzmq's proxy), with no re-signing. The
client's side stays as its connection file says (plaintext on its own host); the side to the
remote kernel speaks CurveZMQ whenever the kernel does, with the kernel's public key. Signals:
SIGINT interrupts the remote kernel (through the gateway, like the provisioner); SIGTERM ends it.
The session is bound to the launcher's event stream, so a launcher killed outright (SIGKILL)
does not leave a kernel behind: the gateway ends it a few seconds after the stream drops.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from typing import Any

import zmq
from jupyter_client.kernelspec import KernelSpecManager

from ..common.errors import ApiError, LaunchError
from ..common.states import SessionState
from .client import GatewayClient, SessionWatch
from .provisioner import client_config

CHANNELS = ("shell", "control", "stdin", "hb", "iopub")


def say(msg: str) -> None:
    """Progress and errors go to stderr: the only place such clients show them."""
    print(f"[backendai] {msg}", file=sys.stderr, flush=True)


def relay(ctx: zmq.Context[Any], local: dict[str, Any], remote: dict[str, Any]) -> list[threading.Thread]:
    """Bind the client's ports and forward each channel to the remote kernel, untouched."""
    identity = os.urandom(8).hex().encode()
    threads = []
    for channel in CHANNELS:
        if channel == "iopub":
            front, back = ctx.socket(zmq.XPUB), ctx.socket(zmq.XSUB)
        else:
            front, back = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
            # The kernel answers stdin to the shell identity it saw: both must be one peer here.
            back.setsockopt(zmq.IDENTITY, identity + (b"-c" if channel == "control" else b""))
        for sock in (front, back):
            sock.linger = 0
        if remote.get("curve_publickey"):
            # Our own keypair: the kernel's public key is all a CurveZMQ client needs.
            public, secret = zmq.curve_keypair()
            back.curve_secretkey = secret
            back.curve_publickey = public
            back.curve_serverkey = remote["curve_publickey"].encode("ascii")
        front.bind(f"tcp://{local['ip']}:{local[f'{channel}_port']}")
        back.connect(f"tcp://{remote['ip']}:{remote[f'{channel}_port']}")
        t = threading.Thread(target=_proxy, args=(front, back), name=f"relay-{channel}", daemon=True)
        t.start()
        threads.append(t)
    return threads


def _proxy(front: zmq.Socket[Any], back: zmq.Socket[Any]) -> None:
    try:
        zmq.proxy(front, back)
    except zmq.ContextTerminated:
        pass


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="backendai_jupyter.provisioner.launcher", description=__doc__)
    ap.add_argument("-f", "--connection-file", required=True)
    ap.add_argument("--kernel", required=True, help="the kernelspec name (its provisioner config)")
    args = ap.parse_args(argv)
    try:
        return run(args.connection_file, args.kernel)
    except (LaunchError, ApiError, OSError, ValueError, KeyError) as e:
        say(f"could not start the kernel: {getattr(e, 'title', None) or e}")
        return 1


def run(connection_file: str, kernel_name: str) -> int:
    with open(connection_file) as f:
        local = json.load(f)
    if local.get("transport", "tcp") != "tcp":
        raise ValueError("only tcp transport can be relayed to a remote kernel")
    if not local.get("key"):
        # An unsigned remote kernel would take orders from anyone who reaches its ports.
        raise ValueError("the connection file has no key; a remote kernel needs signed messages")
    if local.get("signature_scheme", "hmac-sha256") != "hmac-sha256":
        raise ValueError("the remote kernel signs with hmac-sha256; use that signature scheme")
    spec = KernelSpecManager().get_kernel_spec(kernel_name)
    config = spec.metadata.get("kernel_provisioner", {}).get("config", {})
    client = GatewayClient.instance(client_config("", "", "", ""))
    body = {
        "image": config.get("image", ""),
        "resources": config.get("resources", {}),
        "env": {k: v for k, v in os.environ.items() if k.startswith("KERNEL_")},
        "name": f"launcher:{kernel_name}",
        "key": local["key"],
        "bound_to_stream": True,
    }
    model = client.submit(client.request("POST", "/v1/sessions", body)).result()
    sid = model["id"]
    say(f"kernel session {sid} requested ({kernel_name})")
    ended = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: ended.set())
    signal.signal(
        signal.SIGINT, lambda *_: client.submit(client.request("POST", f"/v1/sessions/{sid}/interrupt"))
    )
    try:
        watch = client.submit(client.wait_for(sid, _progress)).result()
        if watch.state != SessionState.RUNNING:
            raise LaunchError(watch.event.get("reason") or str(watch.state))
        ctx: zmq.Context[Any] = zmq.Context()
        relay(ctx, local, watch.event["connection"])
        say(f"kernel running on agent {watch.event.get('agent')}; relaying its channels")
        # The kernel ending (shutdown_request, a crash), SIGTERM, or the client that started us
        # vanishing without a word (we get another parent): whichever comes first.
        client.submit(client.wait_for(sid, _over)).add_done_callback(lambda _: ended.set())
        parent = os.getppid()
        while not ended.wait(1.0):
            if os.getppid() != parent:
                say("the client that started this kernel is gone; ending the kernel")
                break
    finally:
        if not SessionState(client.cached_state(sid).get("state", "PENDING")).is_terminal:
            client.submit(client.request("DELETE", f"/v1/sessions/{sid}")).result()
    final = client.submit(client.request("GET", f"/v1/sessions/{sid}")).result()
    state = final["state"]
    say(f"kernel session {sid} ended: {final.get('reason') or state}")
    return 0 if state in ("TERMINATED", "CANCELLED") else int(final.get("exit_code") or 1)


_last_said: dict[str, str] = {}


def _progress(w: SessionWatch) -> bool:
    """Print each new state or waiting reason; stop waiting on RUNNING or an end."""
    if w.state is None:
        return False
    line = f"{w.state.value}: {w.event.get('reason', '')}".rstrip(": ")
    if _last_said.get("line") != line:
        _last_said["line"] = line
        say(line)
    return w.state == SessionState.RUNNING or w.state.is_terminal


def _over(w: SessionWatch) -> bool:
    return w.state is not None and w.state.is_terminal


if __name__ == "__main__":
    sys.exit(main())
