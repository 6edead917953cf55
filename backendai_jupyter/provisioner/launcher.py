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
from typing import TYPE_CHECKING, Any

import zmq

from ..common.errors import ApiError, LaunchError
from ..common.states import SessionState

if TYPE_CHECKING:
    from .client import SessionWatch

# Only what binding the client's ports needs is imported up front: a client that started us
# checks heartbeats within a second, and jupyter_client and tornado take longer than that to
# import on a busy machine. The rest is imported once the ports answer.

CHANNELS = ("shell", "control", "stdin", "hb", "iopub")


def say(msg: str) -> None:
    """Progress and errors go to stderr: the only place such clients show them."""
    print(f"[backendai] {msg}", file=sys.stderr, flush=True)


RELAYED = ("shell", "control", "stdin", "iopub")


def bind_client_ports(ctx: zmq.Context[Any], local: dict[str, Any]) -> dict[str, zmq.Socket[Any]]:
    """Bind every port of the client's connection file now, before the remote kernel exists.

    A kernel may wait minutes in the queue; ports bound only then could be taken meanwhile by
    another local user, who would then receive the client's messages. Heartbeats are answered
    here from the start: for the client this process is the kernel, and it is alive while it
    waits (the remote kernel's end ends this process, which the client sees).
    """
    fronts: dict[str, zmq.Socket[Any]] = {}
    for channel in CHANNELS:
        front = ctx.socket(zmq.XPUB if channel == "iopub" else zmq.ROUTER)
        front.linger = 0
        front.bind(f"tcp://{local['ip']}:{local[f'{channel}_port']}")
        fronts[channel] = front
    threading.Thread(target=_proxy, args=(fronts["hb"], fronts["hb"]), name="heartbeat", daemon=True).start()
    return fronts


def relay(
    ctx: zmq.Context[Any], fronts: dict[str, zmq.Socket[Any]], remote: dict[str, Any]
) -> list[threading.Thread]:
    """Forward each channel from the client's bound ports to the remote kernel, untouched."""
    identity = os.urandom(8).hex().encode()
    threads = []
    for channel in RELAYED:
        if channel == "iopub":
            back = ctx.socket(zmq.XSUB)
        else:
            back = ctx.socket(zmq.DEALER)
            # The kernel answers stdin to the shell identity it saw: both must be one peer here.
            back.setsockopt(zmq.IDENTITY, identity + (b"-c" if channel == "control" else b""))
        back.linger = 0
        if remote.get("curve_publickey"):
            # Our own keypair: the kernel's public key is all a CurveZMQ client needs.
            public, secret = zmq.curve_keypair()
            back.curve_secretkey = secret
            back.curve_publickey = public
            back.curve_serverkey = remote["curve_publickey"].encode("ascii")
        back.connect(f"tcp://{remote['ip']}:{remote[f'{channel}_port']}")
        t = threading.Thread(
            target=_proxy, args=(fronts[channel], back), name=f"relay-{channel}", daemon=True
        )
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
    ctx: zmq.Context[Any] = zmq.Context()
    fronts = bind_client_ports(ctx, local)
    from jupyter_client.kernelspec import KernelSpecManager

    from .client import GatewayClient
    from .provisioner import client_config

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
    parent = os.getppid()

    def stop_waiting() -> bool:
        """SIGTERM, or the client that started us vanished without a word (we get another parent)."""
        if os.getppid() != parent:
            say("the client that started this kernel is gone; ending the kernel")
            return True
        return ended.is_set()

    try:
        # A kernel may wait long in the queue: SIGTERM or a vanished client cancel it meanwhile.
        started = client.submit(client.wait_for(sid, _progress))
        while not started.done():
            if stop_waiting():
                break
            ended.wait(0.2)
        if started.done():
            watch = started.result()
            if watch.state != SessionState.RUNNING:
                raise LaunchError(watch.event.get("reason") or str(watch.state))
            relay(ctx, fronts, watch.event["connection"])
            say(f"kernel running on agent {watch.event.get('agent')}; relaying its channels")
            # Then: the kernel ending (shutdown_request, a crash), SIGTERM or the client vanishing.
            client.submit(client.wait_for(sid, _over)).add_done_callback(lambda _: ended.set())
            while not stop_waiting():
                ended.wait(1.0)
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
