"""Execute round trip through the gateway's kernel websocket, against direct ZMQ and a stock server.

Run it against a gateway that is already up (``backendai-jupyter up``)::

    .venv/bin/python benchmarks/gateway_ws.py --requests 200

Every client sends ``execute_request`` (``1+1``) on shell and waits for the ``execute_reply``
whose parent is that request; one request at a time, timed from building the message to
reading the reply. In one run, interleaved in blocks so that noise on the machine hits all
alike:

*Ours*
    A kernel started with ``POST /api/kernels`` on the gateway (it runs in a container on an
    agent), driven through the gateway's ``/api/kernels/<id>/channels`` websocket (legacy
    JSON messages) with tornado's websocket client.

*Direct* (the floor)
    An ``AsyncKernelClient`` on the same kernel's ZMQ ports, from the connection info the
    ``/v1`` session model gives its owner: the path the gateway's websocket relays over.

*Stock*
    A stock ``jupyter server`` started by this benchmark, with a local kernel of the stock
    ``python3`` kernelspec, driven through its websocket with the same client code. Next to
    it, *stock direct*: an ``AsyncKernelClient`` on that local kernel's ZMQ ports (from its
    connection file), so that the stock server's own cost shows too.

The websocket client turns Nagle off on its socket (``--no-client-nodelay`` leaves it on):
what is compared is the server side. Nothing on the stock server is tuned.

One JSON object goes to stdout (see ``benchmarks/README.md`` for the keys); progress goes
to stderr. The exit status is 0 when the benchmark ran, whether or not the target was met;
1 when it could not run (e.g. the gateway is not reachable).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import queue
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from jupyter_client.asynchronous.client import AsyncKernelClient
from measure import BenchmarkError, log, percentile  # benchmarks/ is on sys.path when run as a script
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest
from tornado.websocket import WebSocketClientConnection, websocket_connect

from backendai_jupyter.common.clientconfig import ENV_PATH, ClientConfig, default_path

WS_TARGET_RATIO = 1.5
STOCK_KERNEL_NAME = "python3"
READY_RESEND = 1.0  # seconds between kernel_info_requests while waiting for a kernel
CODE = "1+1"
# The same content for every client (jupyter_client's execute() defaults, without stdin).
EXECUTE_CONTENT = {
    "code": CODE,
    "silent": False,
    "store_history": True,
    "user_expressions": {},
    "allow_stdin": False,
    "stop_on_error": True,
}
CLIENTS = ("ours", "direct", "stock", "stock_direct")


def ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- HTTP -------------------------------------------------------------------------------------


async def call(base: str, token: str, method: str, path: str, body: Any = None, timeout: float = 30.0) -> Any:
    """One token-authenticated JSON request; the decoded body (``None`` when empty)."""
    req = HTTPRequest(
        base.rstrip("/") + path,
        method=method,
        headers={"Authorization": f"token {token}", "Content-Type": "application/json"},
        body=None if body is None else json.dumps(body),
        allow_nonstandard_methods=True,
        connect_timeout=min(timeout, 10.0),
        request_timeout=timeout,
    )
    resp = await AsyncHTTPClient().fetch(req)
    return json.loads(resp.body) if resp.body else None


def _http_error(e: Exception) -> str:
    if isinstance(e, HTTPClientError) and e.response is not None and e.response.body:
        try:
            body = json.loads(e.response.body)
            return f"{e.code} {body.get('title') or body.get('message') or body}"
        except ValueError:
            pass
    return str(e)


# -- clients ----------------------------------------------------------------------------------


class WsClient:
    """A kernel's websocket (``/api/kernels/<id>/channels``), legacy JSON messages, shell only."""

    def __init__(self, conn: WebSocketClientConnection, session: str) -> None:
        self.conn = conn
        self.session = session

    @classmethod
    async def connect(cls, base: str, token: str, kernel_id: str, nodelay: bool, timeout: float) -> WsClient:
        parts = urlsplit(base)
        scheme = "wss" if parts.scheme == "https" else "ws"
        path = parts.path.rstrip("/") + f"/api/kernels/{kernel_id}/channels"
        session = uuid.uuid4().hex  # as Jupyter's own front ends do, one per client
        url = urlunsplit((scheme, parts.netloc, path, f"session_id={session}", ""))
        req = HTTPRequest(url, headers={"Authorization": f"token {token}"}, request_timeout=timeout)
        conn = await websocket_connect(req)
        if nodelay:
            conn.stream.set_nodelay(True)
        return cls(conn, session)

    def send(self, msg_type: str, content: dict[str, Any]) -> str:
        msg_id = uuid.uuid4().hex
        header = {
            "msg_id": msg_id,
            "msg_type": msg_type,
            "username": "benchmark",
            "session": self.session,
            "date": datetime.now(UTC).isoformat(),
            "version": "5.3",
        }
        msg = {
            "header": header,
            "parent_header": {},
            "metadata": {},
            "content": content,
            "channel": "shell",
            "buffers": [],
        }
        self.conn.write_message(json.dumps(msg))
        return msg_id

    async def reply(self, msg_ids: set[str], msg_type: str, timeout: float) -> dict[str, Any] | None:
        """The next shell message of ``msg_type`` answering one of ``msg_ids``; None after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            try:
                raw = await asyncio.wait_for(self.conn.read_message(), left)
            except TimeoutError:
                return None
            if raw is None:
                raise BenchmarkError(
                    f"the websocket closed ({self.conn.close_code} {self.conn.close_reason})"
                )
            msg = json.loads(raw)
            if (
                msg.get("channel") == "shell"
                and msg["msg_type"] == msg_type
                and msg["parent_header"].get("msg_id") in msg_ids
            ):
                return msg

    async def kernel_info(self, timeout: float) -> dict[str, Any] | None:
        return await self.reply({self.send("kernel_info_request", {})}, "kernel_info_reply", timeout)

    async def execute(self, timeout: float) -> dict[str, Any] | None:
        return await self.reply({self.send("execute_request", EXECUTE_CONTENT)}, "execute_reply", timeout)

    async def close(self) -> None:
        self.conn.close()


class ZmqClient:
    """A jupyter_client ``AsyncKernelClient`` on the kernel's own ports, shell only."""

    def __init__(self, connection: dict[str, Any]) -> None:
        self.kc = AsyncKernelClient()
        self.kc.load_connection_info(connection)
        self.kc.start_channels(shell=True, iopub=False, stdin=False, hb=False, control=False)

    async def reply(self, msg_id: str, msg_type: str, timeout: float) -> dict[str, Any] | None:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            try:
                msg = await self.kc.get_shell_msg(timeout=left)
            except queue.Empty:
                return None
            if msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == msg_type:
                return msg

    async def kernel_info(self, timeout: float) -> dict[str, Any] | None:
        return await self.reply(self.kc.kernel_info(), "kernel_info_reply", timeout)

    async def execute(self, timeout: float) -> dict[str, Any] | None:
        return await self.reply(self.kc.execute(CODE, allow_stdin=False), "execute_reply", timeout)

    async def close(self) -> None:
        self.kc.stop_channels()


Client = WsClient | ZmqClient


async def wait_ready(client: Client, what: str, timeout: float) -> None:
    """Send kernel_info_request until one is answered (a request sent too early can be lost)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await client.kernel_info(min(READY_RESEND, max(0.01, deadline - time.monotonic()))):
            return
    raise BenchmarkError(f"{what}: no kernel_info_reply within {timeout:.0f} s")


async def execute_rtt(client: Client, n: int, timeout: float) -> list[float]:
    """``n`` sequential execute round trips, in seconds."""
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        reply = await client.execute(timeout)
        out.append(time.perf_counter() - t0)
        if reply is None:
            raise BenchmarkError(f"no execute_reply within {timeout:.0f} s")
        if reply["content"].get("status") != "ok":
            raise BenchmarkError(f"execute failed: {reply['content']}")
    return out


# -- the gateway ------------------------------------------------------------------------------


def gateway_config(args: argparse.Namespace) -> ClientConfig:
    """The client config, found like the provisioner finds it; URL and token may be overridden."""
    path = Path(args.client_config) if args.client_config else default_path()
    cfg = ClientConfig.load(path)
    if cfg is None:
        raise BenchmarkError(
            f"no client config at {path}; start the gateway with `backendai-jupyter up` "
            f"(it writes that file), or pass --client-config"
        )
    cfg.url = args.gateway_url or os.environ.get("BACKENDAI_GATEWAY_URL", "") or cfg.url
    cfg.token = args.token or cfg.token
    if not cfg.token:
        raise BenchmarkError(f"the client config at {path} has no API token; pass --token")
    return cfg


async def check_gateway(cfg: ClientConfig) -> None:
    try:
        agents = (await call(cfg.url, cfg.token, "GET", "/v1/agents", timeout=15))["agents"]
    except (HTTPClientError, OSError) as e:
        raise BenchmarkError(f"the gateway at {cfg.url} is not usable: {_http_error(e)}") from None
    if not any(a["status"] == "ALIVE" for a in agents):
        raise BenchmarkError(f"the gateway at {cfg.url} has no connected agent to run kernels on")
    log(f"gateway {cfg.url}: {len(agents)} agent(s)")


async def kernel_connection(cfg: ClientConfig, kernel_id: str) -> dict[str, Any]:
    """The kernel's ZMQ connection info, from its ``/v1`` session (the provisioner names it)."""
    found = await call(cfg.url, cfg.token, "GET", "/v1/sessions?active=1", timeout=15)
    for s in found["sessions"]:
        if s["name"] == f"jupyter:{kernel_id}":
            if not s.get("connection"):
                raise BenchmarkError(f"session {s['id']} of kernel {kernel_id} has no connection info")
            return dict(s["connection"])
    raise BenchmarkError(f"no active /v1 session for kernel {kernel_id}")


def post_kernel(base: str, token: str, name: str, timeout: float) -> asyncio.Task[Any]:
    """``POST /api/kernels`` as a task of its own: it runs on when the benchmark is interrupted
    meanwhile, so that the kernel it starts can still be deleted."""
    return asyncio.ensure_future(call(base, token, "POST", "/api/kernels", {"name": name}, timeout))


async def kernel_started(task: asyncio.Task[Any], base: str, name: str) -> str:
    try:
        model = await asyncio.shield(task)
    except (HTTPClientError, OSError) as e:
        raise BenchmarkError(f"starting a {name!r} kernel at {base} failed: {_http_error(e)}") from None
    return str(model["id"])


async def delete_kernel(base: str, token: str, kernel_id: str | None, task: asyncio.Task[Any] | None) -> None:
    """Delete the kernel; when its start was interrupted, wait for the start first."""
    if kernel_id is None and task is not None:
        try:
            kernel_id = (await asyncio.wait_for(task, 120))["id"]
        except Exception:
            return  # it did not start (or we cannot know its id)
    if kernel_id is None:
        return
    try:
        await call(base, token, "DELETE", f"/api/kernels/{kernel_id}", timeout=60)
    except HTTPClientError as e:
        if e.code != 404:
            log(f"warning: could not delete kernel {kernel_id} at {base}: {_http_error(e)}")
    except OSError as e:
        log(f"warning: could not delete kernel {kernel_id} at {base}: {e}")


# -- the stock server -------------------------------------------------------------------------


class StockServer:
    """A stock ``jupyter server`` on 127.0.0.1 with its own token, config and runtime dirs."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.token = secrets.token_hex(24)
        self.url = f"http://127.0.0.1:{self.port}"
        self.runtime_dir = workdir / "runtime"
        self.log_path = workdir / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def spawn(self) -> None:
        root = self.workdir / "root"
        root.mkdir()
        env = {
            **os.environ,
            "JUPYTER_CONFIG_DIR": str(self.workdir / "config"),
            "JUPYTER_RUNTIME_DIR": str(self.runtime_dir),
        }
        argv = [
            sys.executable,
            "-m",
            "jupyter_server",
            "--no-browser",
            f"--port={self.port}",
            "--port-retries=0",
            f"--IdentityProvider.token={self.token}",
            "--ServerApp.ip=127.0.0.1",
            "--allow-root",
            f"--ServerApp.root_dir={root}",
        ]
        with open(self.log_path, "wb") as out:
            # Its own session: a Ctrl-C meant for the benchmark reaches it only through stop().
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )

    async def wait_up(self, timeout: float) -> None:
        """Until ``/api/status`` answers."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise BenchmarkError(
                    f"the stock jupyter server exited ({self.proc.returncode}):\n{self.log_tail()}"
                )
            try:
                await call(self.url, self.token, "GET", "/api/status", timeout=5)
                return
            except (HTTPClientError, OSError):
                pass
            if time.monotonic() > deadline:
                raise BenchmarkError(f"the stock jupyter server did not come up in {timeout:.0f} s")
            await asyncio.sleep(0.1)

    def connection_file(self, kernel_id: str) -> dict[str, Any]:
        return dict(json.loads((self.runtime_dir / f"kernel-{kernel_id}.json").read_text()))

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM (it shuts its kernels down), then SIGKILL for its process group if need be."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            log("warning: the stock jupyter server did not stop on SIGTERM; killing it")
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)


# -- main -------------------------------------------------------------------------------------


async def measure(
    clients: dict[str, Client], n: int, warmup: int, block: int, timeout: float
) -> dict[str, list[float]]:
    """``n`` timed round trips per client after ``warmup`` untimed ones, alternating in blocks
    (the order rotates each round, so no client is always first or always after another)."""
    names = list(clients)
    for name in names:
        await execute_rtt(clients[name], warmup, timeout)
    samples: dict[str, list[float]] = {name: [] for name in names}
    i = 0
    while any(len(v) < n for v in samples.values()):
        order = names[i % len(names) :] + names[: i % len(names)]
        for name in order:
            take = min(block, n - len(samples[name]))
            if take > 0:
                samples[name] += await execute_rtt(clients[name], take, timeout)
        i += 1
        if i % 5 == 0:
            done = min(len(v) for v in samples.values())
            line = ", ".join(f"{k} {ms(percentile(v, 0.5))}" for k, v in samples.items())
            log(f"{done}/{n} round trips each; p50 so far (ms): {line}")
    return samples


async def run(args: argparse.Namespace) -> dict[str, Any]:
    cfg = gateway_config(args)
    await check_gateway(cfg)
    clients: dict[str, Client] = {}
    ours_id: str | None = None
    ours_task: asyncio.Task[Any] | None = None
    stock_id: str | None = None
    stock_task: asyncio.Task[Any] | None = None
    stock: StockServer | None = None
    with tempfile.TemporaryDirectory(prefix="bai-bench-ws-") as tmp:
        try:
            log(f"starting a {args.kernel_name!r} kernel through {cfg.url}/api/kernels")
            t0 = time.perf_counter()
            ours_task = post_kernel(cfg.url, cfg.token, args.kernel_name, args.timeout)
            ours_id = await kernel_started(ours_task, cfg.url, args.kernel_name)
            log(f"kernel {ours_id} started in {time.perf_counter() - t0:.1f} s")
            conn_info = await kernel_connection(cfg, ours_id)
            log(f"its ZMQ ports: {conn_info.get('ip')} shell {conn_info.get('shell_port')}")

            log("starting a stock jupyter server")
            stock = StockServer(Path(tmp))
            stock.spawn()
            await stock.wait_up(args.timeout)
            stock_task = post_kernel(stock.url, stock.token, STOCK_KERNEL_NAME, args.timeout)
            stock_id = await kernel_started(stock_task, stock.url, STOCK_KERNEL_NAME)
            log(f"stock server {stock.url}, local {STOCK_KERNEL_NAME!r} kernel {stock_id}")

            clients["ours"] = await WsClient.connect(
                cfg.url, cfg.token, ours_id, args.client_nodelay, args.timeout
            )
            clients["direct"] = ZmqClient(conn_info)
            clients["stock"] = await WsClient.connect(
                stock.url, stock.token, stock_id, args.client_nodelay, args.timeout
            )
            clients["stock_direct"] = ZmqClient(stock.connection_file(stock_id))
            for name in CLIENTS:
                await wait_ready(clients[name], name, args.timeout)
            log(
                f"execute round trips: {args.requests} per client after {args.warmup} warm-ups, "
                f"blocks of {args.block}; client TCP_NODELAY {'on' if args.client_nodelay else 'off'}"
            )
            samples = await measure(clients, args.requests, args.warmup, args.block, args.timeout)
        finally:
            for c in clients.values():
                try:
                    await c.close()
                except Exception as e:
                    log(f"warning: closing a client failed: {e!r}")
            await delete_kernel(cfg.url, cfg.token, ours_id, ours_task)
            if stock is not None:
                if stock.proc is not None and stock.proc.poll() is None:
                    await delete_kernel(stock.url, stock.token, stock_id, stock_task)
                stock.stop()

    p50 = {k: percentile(v, 0.5) for k, v in samples.items()}
    p90 = {k: percentile(v, 0.9) for k, v in samples.items()}
    ws_ratio = p50["ours"] / p50["direct"]
    return {
        "ws_rtt_p50_ms": ms(p50["ours"]),
        "ws_rtt_p90_ms": ms(p90["ours"]),
        "direct_rtt_p50_ms": ms(p50["direct"]),
        "direct_rtt_p90_ms": ms(p90["direct"]),
        "stock_ws_rtt_p50_ms": ms(p50["stock"]),
        "stock_ws_rtt_p90_ms": ms(p90["stock"]),
        "stock_direct_rtt_p50_ms": ms(p50["stock_direct"]),
        "stock_direct_rtt_p90_ms": ms(p90["stock_direct"]),
        "ws_ratio": round(ws_ratio, 3),
        "ws_target_ratio": WS_TARGET_RATIO,
        "ws_target_met": ws_ratio <= WS_TARGET_RATIO,
        "ws_overhead_p50_ms": ms(p50["ours"] - p50["direct"]),
        "stock_ws_overhead_p50_ms": ms(p50["stock"] - p50["stock_direct"]),
        "ws_vs_stock_ratio": round(p50["ours"] / p50["stock"], 3),
        "requests": min(len(v) for v in samples.values()),
        "warmup_requests": args.warmup,
        "block": args.block,
        "client_nodelay": args.client_nodelay,
        "kernel_name": args.kernel_name,
        "stock_kernel_name": STOCK_KERNEL_NAME,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--requests", type=int, default=200, help="timed execute round trips per client (default 200)"
    )
    p.add_argument("--warmup", type=int, default=20, help="untimed round trips per client first (default 20)")
    p.add_argument(
        "--block", type=int, default=10, help="round trips per block when alternating (default 10)"
    )
    p.add_argument(
        "--kernel-name",
        default="backendai-python3",
        help="kernelspec to start at the gateway (default backendai-python3)",
    )
    p.add_argument("--gateway-url", default="", help="gateway URL; overrides the client config")
    p.add_argument(
        "--client-config",
        default="",
        help=f"client config file (default: ${ENV_PATH}, else <jupyter config dir>/backendai_client.json)",
    )
    p.add_argument("--token", default="", help="API token; overrides the client config's")
    p.add_argument(
        "--no-client-nodelay",
        dest="client_nodelay",
        action="store_false",
        help="leave Nagle on in the websocket client (to see what it costs)",
    )
    p.add_argument("--timeout", type=float, default=120.0, help="seconds any one start or reply may take")
    args = p.parse_args(argv)
    if args.requests < 1 or args.block < 1 or args.warmup < 0:
        p.error("--requests and --block must be at least 1, --warmup at least 0")
    return args


async def _main(args: argparse.Namespace) -> dict[str, Any]:
    # SIGTERM cleans up like Ctrl-C does: the kernels are deleted and the stock server stopped.
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    return await run(args)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = asyncio.run(_main(args))
    except BenchmarkError as e:
        log(f"error: {e}")
        return 1
    except (KeyboardInterrupt, asyncio.CancelledError):
        log("interrupted")
        return 130
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
