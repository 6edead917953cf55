#!/usr/bin/python3
"""Run a kernel that cannot serve CurveZMQ behind a relay that does.

The agent gives every kernel a connection file with a CurveZMQ keypair and expects all five
channels to be served with it. Kernels not built on ipykernel (IRkernel, Deno) speak plain ZMQ
only. This relay binds the ports of that connection file as a CurveZMQ server, starts the
kernel on a private connection file (same HMAC key, loopback ports of its own, no curve) and
forwards every frame untouched: the kernel signs and checks messages as usual.

    kernel_relay.py [--interrupt-mode signal|message] [--hold-idle-ms N] CONNECTION_FILE -- KERNEL_ARGV...

Every argument of KERNEL_ARGV equal to CONNECTION_FILE is replaced by the private file. A
connection file without curve keys (an agent allowed to run plaintext kernels) serves plaintext;
when nothing else is asked of the relay either, the kernel replaces this process and gets the
file as it is.

``--hold-idle-ms``: some kernels (Deno's) now and then publish a cell's result just after the
``status: idle`` that should close it, and clients that stop reading at idle (nbclient, ``jupyter
execute``, papermill) lose the result. The relay then holds each idle back that long, passing on
what the same request still publishes before it; anything for another request releases it.

Signals: the kernel runs in a process group of its own, so an interrupt sent to the container
(`docker kill --signal SIGINT`, which tini passes to our group) reaches the kernel only through
here. In ``signal`` mode SIGINT is passed on; in ``message`` mode (kernels that SIGINT would
kill, e.g. Deno) it becomes an ``interrupt_request`` on the kernel's control channel. SIGTERM and
SIGHUP are passed on; the relay exits with the kernel's exit status.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import hashlib
import hmac
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid

import zmq

CHANNELS = ("shell", "control", "stdin", "hb", "iopub")
DELIMITER = b"<IDS|MSG>"


def free_loopback_ports(count: int) -> list[int]:
    """Ports free on 127.0.0.1 now; all held open together so that they differ."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def write_private(path: str, data: dict) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f)


def write_inner(conn_path: str, inner: dict) -> str:
    """Write the kernel's own connection file; its path.

    Beside the given file, the kernel's private place where the agent writes it; where that
    directory is not ours (a connection file mounted alone into the image), a private
    temporary file.
    """
    beside = os.path.join(os.path.dirname(os.path.abspath(conn_path)), ".kernel-relay-inner.json")
    try:
        write_private(beside, inner)
        return beside
    except OSError:  # not ours, or a read-only file system
        fd, path = tempfile.mkstemp(prefix="kernel-relay-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(inner, f)
        return path


def bind_fronts(ctx: zmq.Context, conn: dict) -> dict[str, zmq.Socket]:
    """The ports clients connect to, served with the connection file's CurveZMQ keypair."""
    fronts = {}
    for channel in CHANNELS:
        sock = ctx.socket(zmq.XPUB if channel == "iopub" else zmq.ROUTER)
        sock.linger = 0
        if conn.get("curve_secretkey"):
            sock.curve_server = True
            sock.curve_secretkey = conn["curve_secretkey"].encode("ascii")
            sock.curve_publickey = conn["curve_publickey"].encode("ascii")
        sock.bind(f"{conn.get('transport', 'tcp')}://{conn['ip']}:{conn[f'{channel}_port']}")
        fronts[channel] = sock
    return fronts


class Router:
    """Forward shell, control, stdin and heartbeat frames between clients and the kernel.

    Each client gets sockets of its own to the kernel, so the kernel's replies come back on the
    socket of the client that asked: some kernels (Deno's) answer only to the identity their
    own socket saw and drop any routing frames in front of a message, so one shared socket with
    the client's identity as an extra frame would lose every reply. A client's sockets on all
    channels share one identity, derived from its own: a kernel sends ``input_request`` on stdin
    to the identity its shell request came from, and a client's stdin socket has the identity
    of its shell socket (jupyter_client's do).
    """

    CHANNELS = ("shell", "control", "stdin", "hb")
    # Clients beyond this many, least recently heard from first, lose their sockets (reconnecting
    # probes and clients would otherwise pile up sockets for the kernel's whole life).
    MAX_CLIENTS = 100

    def __init__(self, ctx: zmq.Context, fronts: dict[str, zmq.Socket], inner: dict) -> None:
        self.ctx = ctx
        self.fronts = {ch: fronts[ch] for ch in self.CHANNELS}
        self.inner = inner
        self.poller = zmq.Poller()
        for sock in self.fronts.values():
            self.poller.register(sock, zmq.POLLIN)
        self.front_channel = {sock: ch for ch, sock in self.fronts.items()}
        # client identity -> channel -> socket to the kernel; oldest first.
        self.clients: collections.OrderedDict[bytes, dict[str, zmq.Socket]] = collections.OrderedDict()
        self.owner: dict[zmq.Socket, tuple[str, bytes]] = {}

    def _backs(self, client: bytes) -> dict[str, zmq.Socket]:
        backs = self.clients.get(client)
        if backs is not None:
            self.clients.move_to_end(client)
            return backs
        while len(self.clients) >= self.MAX_CLIENTS:
            _, old = self.clients.popitem(last=False)
            for sock in old.values():
                self.poller.unregister(sock)
                del self.owner[sock]
                sock.close(0)
        identity = b"relay-" + hashlib.sha256(client).hexdigest()[:32].encode()
        backs = {}
        for channel in self.CHANNELS:
            sock = self.ctx.socket(zmq.DEALER)
            sock.linger = 0
            sock.setsockopt(zmq.IDENTITY, identity)
            sock.connect(f"tcp://127.0.0.1:{self.inner[f'{channel}_port']}")
            self.poller.register(sock, zmq.POLLIN)
            self.owner[sock] = (channel, client)
            backs[channel] = sock
        self.clients[client] = backs
        return backs

    def run(self) -> None:
        while True:
            for sock, _ in self.poller.poll():
                frames = sock.recv_multipart(copy=True)
                channel = self.front_channel.get(sock)
                if channel is not None:
                    client, *rest = frames
                    self._backs(client)[channel].send_multipart(rest)
                elif sock in self.owner:
                    channel, client = self.owner[sock]
                    self.fronts[channel].send_multipart([client, *frames])


class IopubRelay:
    """IOPub from the kernel to clients (subscriptions the other way), idle held back a moment."""

    def __init__(self, front: zmq.Socket, back: zmq.Socket, hold_idle: float) -> None:
        self.front, self.back, self.hold_idle = front, back, hold_idle

    def run(self) -> None:
        try:
            self._run()
        except zmq.ContextTerminated:
            self.front.close(0)
            self.back.close(0)

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.front, zmq.POLLIN)
        poller.register(self.back, zmq.POLLIN)
        held: list[bytes] | None = None
        held_parent: str | None = None
        deadline = 0.0
        while True:
            timeout = None if held is None else max(0, int((deadline - time.monotonic()) * 1000))
            events = dict(poller.poll(timeout))
            if self.front in events:
                self.back.send_multipart(self.front.recv_multipart())
            if self.back in events:
                frames = self.back.recv_multipart()
                idle, parent = idle_status(frames)
                if held is not None and (idle or parent != held_parent):
                    self.front.send_multipart(held)
                    held = None
                if idle:
                    held, held_parent, deadline = frames, parent, time.monotonic() + self.hold_idle
                else:
                    self.front.send_multipart(frames)
            if held is not None and time.monotonic() >= deadline:
                self.front.send_multipart(held)
                held = None


def idle_status(frames: list[bytes]) -> tuple[bool, str | None]:
    """Whether an IOPub message is ``status: idle``, and the msg_id of its request."""
    try:
        i = frames.index(DELIMITER)
        header, parent = json.loads(frames[i + 2]), json.loads(frames[i + 3])
        idle = (
            header.get("msg_type") == "status" and json.loads(frames[i + 5]).get("execution_state") == "idle"
        )
        return idle, parent.get("msg_id")
    except (ValueError, IndexError, AttributeError):
        return False, None


def _proxy(front: zmq.Socket, back: zmq.Socket) -> None:
    try:
        zmq.proxy(front, back)
    except zmq.ContextTerminated:
        pass


def interrupt_request(conn: dict) -> list[bytes]:
    """A signed ``interrupt_request`` for the kernel's control channel."""
    header = {
        "msg_id": uuid.uuid4().hex,
        "msg_type": "interrupt_request",
        "username": "kernel-relay",
        "session": uuid.uuid4().hex,
        "date": datetime.datetime.now(datetime.UTC).isoformat(),
        "version": "5.3",
    }
    parts = [json.dumps(p).encode() for p in (header, {}, {}, {})]
    key = conn.get("key", "").encode()
    signature = b""
    if key:
        scheme = conn.get("signature_scheme", "hmac-sha256").split("-", 1)[1]
        mac = hmac.new(key, digestmod=getattr(hashlib, scheme))
        for part in parts:
            mac.update(part)
        signature = mac.hexdigest().encode()
    return [DELIMITER, signature, *parts]


def parse_args(argv: list[str]) -> argparse.Namespace:
    if "--" not in argv:
        sys.exit(__doc__)
    split = argv.index("--")
    parser = argparse.ArgumentParser(prog="kernel_relay.py", usage=__doc__)
    parser.add_argument("--interrupt-mode", choices=("signal", "message"), default="signal")
    parser.add_argument("--hold-idle-ms", type=float, default=0)
    parser.add_argument("connection_file")
    args = parser.parse_args(argv[:split])
    args.kernel_argv = argv[split + 1 :]
    if not args.kernel_argv:
        sys.exit(__doc__)
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    mode, conn_path, kernel_argv = args.interrupt_mode, args.connection_file, args.kernel_argv
    with open(conn_path) as f:
        conn = json.load(f)
    curve = bool(conn.get("curve_publickey") and conn.get("curve_secretkey"))
    if not curve and mode == "signal" and not args.hold_idle_ms:
        os.execv(kernel_argv[0], kernel_argv)

    inner = {k: v for k, v in conn.items() if not k.startswith("curve_")}
    inner.update(ip="127.0.0.1", transport="tcp")
    for channel, port in zip(CHANNELS, free_loopback_ports(len(CHANNELS)), strict=True):
        inner[f"{channel}_port"] = port
    inner_path = write_inner(conn_path, inner)
    kernel_argv = [inner_path if a == conn_path else a for a in kernel_argv]

    ctx = zmq.Context()
    fronts = bind_fronts(ctx, conn)
    # IOPub has no identities: subscriptions go up, everything published comes down.
    iopub = ctx.socket(zmq.XSUB)
    iopub.linger = 0
    iopub.connect(f"tcp://127.0.0.1:{inner['iopub_port']}")
    if args.hold_idle_ms:
        target, targs = IopubRelay(fronts["iopub"], iopub, args.hold_idle_ms / 1000).run, ()
    else:
        target, targs = _proxy, (fronts["iopub"], iopub)
    threading.Thread(target=target, args=targs, name="relay-iopub", daemon=True).start()
    router = Router(ctx, fronts, inner)
    threading.Thread(target=router.run, name="relay", daemon=True).start()

    kernel = subprocess.Popen(kernel_argv, start_new_session=True)
    interrupter = ctx.socket(zmq.DEALER)
    interrupter.linger = 0
    interrupter.connect(f"tcp://127.0.0.1:{inner['control_port']}")
    lock = threading.Lock()

    def on_interrupt(signum: int, frame: object) -> None:
        if mode == "message":
            with lock:
                interrupter.send_multipart(interrupt_request(conn))
                # The reply is of no use here; drop it, and any earlier one.
                while interrupter.poll(0):
                    interrupter.recv_multipart()
        else:
            _signal_kernel(kernel, signal.SIGINT)

    def pass_on(signum: int, frame: object) -> None:
        _signal_kernel(kernel, signum)

    signal.signal(signal.SIGINT, on_interrupt)
    for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(signum, pass_on)
    code = kernel.wait()
    if os.path.basename(inner_path).startswith("kernel-relay-"):
        os.unlink(inner_path)  # a temporary file of ours
    # The relay threads block in zmq.proxy; nothing needs a clean shutdown.
    os._exit(128 - code if code < 0 else code)


def _signal_kernel(kernel: subprocess.Popen, signum: int) -> None:
    """Signal the kernel's whole process group (its own children too), as a terminal would."""
    try:
        os.killpg(kernel.pid, signum)
    except ProcessLookupError:
        pass


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
