"""Is a kernel ready? Ready means shell answered kernel_info *and* IOPub delivers.

With published ports, a TCP connect succeeds against the port proxy before the kernel
listens, and a client that does not wait for IOPub loses the output of its first execute.
So: keep asking kernel_info on shell until a reply comes and an IOPub message has arrived.
An encrypted kernel is probed the way its clients talk to it, over CurveZMQ.
"""

from __future__ import annotations

import time
from typing import Any

import zmq
import zmq.asyncio
from jupyter_client.session import Session

RETRY_INTERVAL = 0.05


class KernelNotReady(Exception):
    """The kernel did not become ready in time."""


def use_curve(sock: zmq.Socket[Any], connection: dict[str, Any]) -> None:
    """Make ``sock`` a CurveZMQ client of the kernel when it serves curve (a throwaway keypair
    of our own; the kernel's public key authenticates it)."""
    server_key = connection.get("curve_publickey")
    if not server_key:
        return
    public, secret = zmq.curve_keypair()
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_serverkey = server_key.encode("ascii") if isinstance(server_key, str) else server_key


async def wait_until_ready(connection: dict[str, Any], timeout: float) -> float:
    """Return the seconds it took; raise :class:`KernelNotReady` on timeout."""
    ctx = zmq.asyncio.Context.instance()
    session = Session(key=connection["key"].encode(), signature_scheme=connection["signature_scheme"])
    host = connection["ip"]
    shell = ctx.socket(zmq.DEALER)
    iopub = ctx.socket(zmq.SUB)
    for sock in (shell, iopub):
        sock.linger = 0
        use_curve(sock, connection)
        # The default 100 ms reconnect interval would add up to 100 ms to every launch.
        sock.setsockopt(zmq.RECONNECT_IVL, 10)
    iopub.setsockopt(zmq.SUBSCRIBE, b"")
    shell.connect(f"tcp://{host}:{connection['shell_port']}")
    iopub.connect(f"tcp://{host}:{connection['iopub_port']}")
    start = time.monotonic()
    deadline = start + timeout
    got_reply = got_iopub = False
    poller = zmq.asyncio.Poller()
    poller.register(shell, zmq.POLLIN)
    poller.register(iopub, zmq.POLLIN)
    try:
        next_send = 0.0
        while not (got_reply and got_iopub):
            now = time.monotonic()
            if now > deadline:
                raise KernelNotReady(f"the kernel did not answer on shell and IOPub within {timeout:.0f} s")
            if now >= next_send:
                session.send(shell, "kernel_info_request", {})
                next_send = now + RETRY_INTERVAL
            events = dict(await poller.poll(timeout=max(1, int((next_send - now) * 1000))))
            if shell in events:
                await shell.recv_multipart()
                got_reply = True
            if iopub in events:
                await iopub.recv_multipart()
                got_iopub = True
        return time.monotonic() - start
    finally:
        shell.close(0)
        iopub.close(0)
