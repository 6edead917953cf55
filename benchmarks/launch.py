"""Kernel launch time and execute round trip, against the bare-Docker floor.

Run it against a gateway that is already up (``backendai-jupyter up``)::

    .venv/bin/python benchmarks/launch.py --launches 10 --rtt 200

It measures two things, each next to a floor that runs in the same process, interleaved
with it, so that noise on the machine hits both alike:

Cold launch
    *Ours*: a stock ``jupyter_client.KernelManager(kernel_name=...)`` (the kernelspec uses
    our provisioner, so the kernel is placed by the gateway and started in a container by
    an agent). Timed from the ``start_kernel()`` call to the first ``kernel_info_reply``
    received by a fresh ``BlockingKernelClient`` (``km.client()``, ``start_channels()``,
    ``kernel_info()``, wait for the reply). ``wait_for_ready`` is not used: it adds a fixed
    IOPub flush that has nothing to do with the launch.

    *Floor*: the same image started with a plain ``docker run`` through the Docker SDK:
    five ports published on 127.0.0.1, a connection file mounted read-only at the same
    place, the kernel argv from the image's ``io.backendai-jupyter.kernel`` label, user
    1000:1000. Timed from the create call to the first ``kernel_info_reply`` on 127.0.0.1;
    ``kernel_info_request`` is re-sent every 50 ms until a reply comes, because published
    ports accept TCP connections before the kernel listens.

    The two alternate (ours first on even launches, the floor first on odd ones), after
    one untimed warm-up pair. Shutting down (ours) and force-removing (floor) is untimed.

Execute round trip
    One kernel launched through the ``KernelManager``; ``kc.execute("1+1")`` until its
    ``execute_reply`` arrives on shell, with a plain ``execute`` + ``get_shell_msg`` loop.
    *Ours* is ``km.client()``; the *floor* is a fresh ``BlockingKernelClient`` loaded from
    the same connection info, on the same kernel. Messages go over ZMQ straight to the
    kernel either way, so this checks that the provisioner adds nothing to the message
    path. Both clients open the shell channel only, get the same warm-ups, and alternate
    in blocks.

One JSON object goes to stdout (see ``benchmarks/README.md`` for the keys); progress goes
to stderr. The exit status is 0 when the benchmark ran, whether or not the targets were
met; 1 when it could not run (e.g. the gateway is not reachable).
"""

from __future__ import annotations

import argparse
import json
import math
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
from datetime import datetime
from pathlib import Path
from typing import Any

import docker
import docker.errors
import zmq
from jupyter_client.blocking.client import BlockingKernelClient
from jupyter_client.connect import write_connection_file
from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
from jupyter_client.manager import KernelManager
from jupyter_client.session import Session
from measure import BenchmarkError, log, percentile  # benchmarks/ is on sys.path when run as a script

from backendai_jupyter.agent.launch import CONNECTION_FILE_IN_CONTAINER, CONTAINER_PORTS
from backendai_jupyter.common.clientconfig import ENV_PATH
from backendai_jupyter.common.errors import ApiError
from backendai_jupyter.common.imagespecs import KERNEL_LABEL
from backendai_jupyter.provisioner.client import GatewayClient
from backendai_jupyter.provisioner.provisioner import LaunchError, client_config

LAUNCH_TARGET_RATIO = 1.15
RTT_TARGET_RATIO = 1.05
RELAY_TARGET_RATIO = 1.1

FLOOR_LABEL = "io.backendai-jupyter.benchmark"
FLOOR_RUN_LABEL = "io.backendai-jupyter.benchmark-run"
RESEND_INTERVAL = 0.05
LAUNCH_PHASES = ("PENDING", "SCHEDULED", "PREPARING", "CREATING", "RUNNING")


def ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


# -- setup ------------------------------------------------------------------------------------


def connect_gateway(args: argparse.Namespace) -> GatewayClient:
    """The gateway client the provisioner will use too; fails clearly when it is not there."""
    # The provisioner reads these in this very process, so both sides use the same gateway.
    if args.client_config:
        os.environ[ENV_PATH] = str(Path(args.client_config).resolve())
    if args.gateway_url:
        os.environ["BACKENDAI_GATEWAY_URL"] = args.gateway_url
    try:
        cfg = client_config(
            os.environ.get("BACKENDAI_GATEWAY_URL", ""),
            os.environ.get("BACKENDAI_ACCESS_KEY", ""),
            os.environ.get("BACKENDAI_SECRET_KEY", ""),
            "",
        )
    except LaunchError as e:
        raise BenchmarkError(str(e)) from None
    gw = GatewayClient.instance(cfg)
    try:
        agents = gw.submit(gw.request("GET", "/v1/agents", timeout=10)).result(timeout=15)["agents"]
    except ApiError as e:
        raise BenchmarkError(e.title) from None
    except TimeoutError:
        raise BenchmarkError(f"the gateway at {cfg.url} did not answer within 15 s") from None
    if not any(a["status"] == "ALIVE" for a in agents):
        raise BenchmarkError(f"the gateway at {cfg.url} has no connected agent to run kernels on")
    log(f"gateway {cfg.url}: {len(agents)} agent(s)")
    return gw


def kernel_image(kernel_name: str) -> str:
    """The image the kernelspec's provisioner starts."""
    try:
        spec = KernelSpecManager().get_kernel_spec(kernel_name)
    except NoSuchKernel:
        raise BenchmarkError(
            f"no kernelspec {kernel_name!r}; install it with "
            "`backendai-jupyter kernelspecs install --sys-prefix`"
        ) from None
    prov = spec.metadata.get("kernel_provisioner", {})
    if prov.get("provisioner_name") != "backendai-provisioner":
        raise BenchmarkError(f"kernelspec {kernel_name!r} does not use the backendai-provisioner")
    return str(prov.get("config", {}).get("image") or "backendai-jupyter/python:latest")


def image_argv(client: docker.DockerClient, image: str) -> list[str]:
    """The kernel command the image declares, for the mounted connection file."""
    try:
        labels = client.images.get(image).labels or {}
    except docker.errors.ImageNotFound:
        raise BenchmarkError(f"image {image} is not in the local Docker engine") from None
    argv = json.loads(labels.get(KERNEL_LABEL, "{}")).get("argv") or []
    if not argv:
        raise BenchmarkError(f"image {image} has no kernel command in its {KERNEL_LABEL} label")
    return [a.replace("{connection_file}", CONNECTION_FILE_IN_CONTAINER) for a in argv]


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports that are free on 127.0.0.1 right now."""
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


# -- ours -------------------------------------------------------------------------------------


def _iso(at: str) -> float:
    return datetime.fromisoformat(at.replace("Z", "+00:00")).timestamp()


def launch_ours(kernel_name: str, gw: GatewayClient, timeout: float) -> tuple[float, dict[str, float]]:
    """One cold launch through the KernelManager; (seconds, where the time went)."""
    km = KernelManager(kernel_name=kernel_name)
    kc: BlockingKernelClient | None = None
    try:
        wall0 = time.time()
        t0 = time.perf_counter()
        km.start_kernel()
        t_started = time.perf_counter()
        kc = km.client()
        kc.start_channels()
        msg_id = kc.kernel_info()
        _wait_reply(kc, msg_id, "kernel_info_reply", timeout)
        t1 = time.perf_counter()
        phases = _phases(gw, km, wall0, wall0 + (t_started - t0))
        phases["start_kernel_return_to_reply"] = t1 - t_started
        return t1 - t0, phases
    finally:
        if kc is not None:
            kc.stop_channels()
        end_kernel(km, gw)


def end_kernel(km: KernelManager, gw: GatewayClient) -> None:
    """Shut the kernel down; when jupyter_client cannot (say, its start was interrupted),
    end the kernel's session at the gateway directly."""
    try:
        if km.has_kernel:
            km.shutdown_kernel()
            return
    except Exception as e:
        log(f"kernel shutdown through jupyter_client failed ({e!r}); ending its session directly")
    # The provisioner names the session after the kernel. A POST that was still in flight when
    # the start was interrupted completes on the gateway client's own thread: give it a moment.
    time.sleep(0.5)
    name = f"jupyter:{km.kernel_id}"
    try:
        found = gw.submit(gw.request("GET", "/v1/sessions?active=1", timeout=10)).result(timeout=15)
        for s in found["sessions"]:
            if s["name"] == name:
                gw.submit(gw.request("DELETE", f"/v1/sessions/{s['id']}", timeout=30)).result(timeout=35)
    except (ApiError, TimeoutError) as e:
        log(f"warning: could not end the kernel session {name}: {e}")


def _wait_reply(kc: BlockingKernelClient, msg_id: str, msg_type: str, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise BenchmarkError(f"no {msg_type} within {timeout:.0f} s")
        try:
            msg = kc.get_shell_msg(timeout=left)
        except queue.Empty:
            continue
        if msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == msg_type:
            return msg


def _phases(gw: GatewayClient, km: KernelManager, wall0: float, wall_started: float) -> dict[str, float]:
    """Seconds between the session's recorded transitions (gateway clock, same host)."""
    sid = getattr(km.provisioner, "session_id", None)
    if not sid:
        return {}
    try:
        model = gw.submit(gw.request("GET", f"/v1/sessions/{sid}", timeout=10)).result(timeout=15)
    except (ApiError, TimeoutError):
        return {}
    at = {}
    boot = math.nan
    for t in model.get("transitions", []):
        at.setdefault(t["state"], _iso(t["at"]))
        if t["state"] == "RUNNING" and "after" in t["reason"]:
            # "kernel ready after N ms of boot": readiness probe time after the container started.
            try:
                boot = float(t["reason"].split("after", 1)[1].split("ms", 1)[0]) / 1000
            except ValueError:
                pass
    if not all(s in at for s in LAUNCH_PHASES):
        return {}
    out = {"start_kernel_to_pending": at["PENDING"] - wall0}
    for a, b in zip(LAUNCH_PHASES, LAUNCH_PHASES[1:], strict=False):
        out[f"{a.lower()}_to_{b.lower()}"] = at[b] - at[a]
    if not math.isnan(boot):
        out["creating_container_start"] = out["creating_to_running"] - boot
        out["creating_readiness_probe"] = boot
    out["running_to_start_kernel_return"] = wall_started - at["RUNNING"]
    return out


# -- the floor --------------------------------------------------------------------------------


def launch_floor(
    client: docker.DockerClient,
    image: str,
    argv: list[str],
    workdir: Path,
    labels: dict[str, str],
    timeout: float,
) -> tuple[float, float]:
    """One bare ``docker run`` of the image; (seconds to kernel_info_reply, seconds in the run call)."""
    ports = dict(zip(CONTAINER_PORTS, free_ports(len(CONTAINER_PORTS)), strict=True))
    key = uuid.uuid4().hex
    # The kernel's own view, as the agent writes it: listen on all interfaces, fixed ports.
    conn_file = workdir / f"{uuid.uuid4().hex}.json"
    fd = os.open(conn_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    with os.fdopen(fd, "w") as f:
        json.dump(
            {
                "ip": "0.0.0.0",
                "transport": "tcp",
                "signature_scheme": "hmac-sha256",
                "key": key,
                "kernel_name": "",
                **{f"{ch}_port": port for ch, port in CONTAINER_PORTS.items()},
            },
            f,
        )
    os.chmod(conn_file, 0o644)
    name = f"bai-bench-floor-{uuid.uuid4().hex[:12]}"
    try:
        t0 = time.perf_counter()
        client.containers.run(
            image,
            command=argv,
            name=name,
            labels=labels,
            ports={f"{CONTAINER_PORTS[ch]}/tcp": ("127.0.0.1", port) for ch, port in ports.items()},
            volumes={str(conn_file): {"bind": CONNECTION_FILE_IN_CONTAINER, "mode": "ro"}},
            user="1000:1000",
            detach=True,
        )
        t_run = time.perf_counter()
        _probe_kernel_info(ports["shell"], key, t0 + timeout)
        t1 = time.perf_counter()
        return t1 - t0, t_run - t0
    finally:
        # By name: the container exists even when the run call itself was interrupted.
        remove_container(client, name)
        conn_file.unlink(missing_ok=True)


def remove_container(client: docker.DockerClient, name: str) -> None:
    try:
        client.api.remove_container(name, force=True)
    except docker.errors.NotFound:
        pass
    except docker.errors.APIError as e:
        if e.status_code != 409:  # 409: its removal is already under way
            raise


def _probe_kernel_info(shell_port: int, key: str, deadline: float) -> None:
    """Send kernel_info_request every 50 ms until a kernel_info_reply arrives."""
    session = Session(key=key.encode(), signature_scheme="hmac-sha256")
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    # As the agent's readiness probe does: the default 100 ms reconnect interval would add
    # up to 100 ms to every launch.
    sock.setsockopt(zmq.RECONNECT_IVL, 10)
    sock.connect(f"tcp://127.0.0.1:{shell_port}")
    try:
        next_send = 0.0
        while True:
            now = time.perf_counter()
            if now > deadline:
                raise BenchmarkError("the floor kernel did not answer kernel_info in time")
            if now >= next_send:
                session.send(sock, "kernel_info_request", {})
                next_send = now + RESEND_INTERVAL
            if sock.poll(timeout=max(1, int((next_send - now) * 1000))):
                _, parts = session.feed_identities(sock.recv_multipart())
                if session.deserialize(parts, content=False)["msg_type"] == "kernel_info_reply":
                    return
    finally:
        sock.close(0)


# -- round trips ------------------------------------------------------------------------------


def execute_rtt(kc: BlockingKernelClient, n: int, timeout: float) -> list[float]:
    """``n`` sequential execute("1+1") round trips on shell, in seconds."""
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        msg_id = kc.execute("1+1")
        reply = _wait_reply(kc, msg_id, "execute_reply", timeout)
        out.append(time.perf_counter() - t0)
        if reply["content"].get("status") != "ok":
            raise BenchmarkError(f"execute failed: {reply['content']}")
    return out


def measure_rtt(
    kernel_name: str, gw: GatewayClient, n: int, warmup: int, block: int, timeout: float
) -> tuple[list[float], list[float]]:
    """(ours, floor) round trips on one kernel, alternating in blocks."""
    km = KernelManager(kernel_name=kernel_name)
    clients: list[BlockingKernelClient] = []
    try:
        km.start_kernel()
        ours = km.client()
        floor = BlockingKernelClient()
        floor.load_connection_info(km.get_connection_info())
        clients = [ours, floor]
        return interleaved_rtt(clients, n, warmup, block, timeout)
    finally:
        for kc in clients:
            kc.stop_channels()
        end_kernel(km, gw)


def interleaved_rtt(
    clients: list[BlockingKernelClient], n: int, warmup: int, block: int, timeout: float
) -> tuple[list[float], list[float]]:
    """Round trips of two clients, in alternating blocks (and alternating which goes first)."""
    for kc in clients:
        kc.start_channels(shell=True, iopub=False, stdin=False, hb=False, control=False)
        _wait_reply(kc, kc.kernel_info(), "kernel_info_reply", timeout)
        execute_rtt(kc, warmup, timeout)
    samples: dict[int, list[float]] = {0: [], 1: []}
    i = 0
    while len(samples[0]) < n or len(samples[1]) < n:
        order = (0, 1) if i % 2 == 0 else (1, 0)
        for which in order:
            take = min(block, n - len(samples[which]))
            if take > 0:
                samples[which] += execute_rtt(clients[which], take, timeout)
        i += 1
    return samples[0], samples[1]


def measure_relay_rtt(
    kernel_name: str, gw: GatewayClient, n: int, warmup: int, block: int, timeout: float
) -> tuple[list[float], list[float]]:
    """(through the launcher's relay, direct to the same kernel): the argv path VS Code uses."""
    with tempfile.TemporaryDirectory() as tmp:
        fname, _ = write_connection_file(
            os.path.join(tmp, "kernel.json"), ip="127.0.0.1", key=secrets.token_hex(16).encode()
        )
        argv = [
            a.replace("{connection_file}", fname)
            for a in KernelSpecManager().get_kernel_spec(kernel_name).argv
        ]
        proc = subprocess.Popen(argv, stderr=subprocess.DEVNULL)
        clients: list[BlockingKernelClient] = []
        try:
            ready = BlockingKernelClient()
            ready.load_connection_file(fname)
            ready.start_channels()
            ready.wait_for_ready(timeout=timeout)  # the launcher started the kernel and relays
            ready.stop_channels()
            relayed = BlockingKernelClient()
            relayed.load_connection_file(fname)
            sessions = gw.submit(gw.request("GET", "/v1/sessions?active=1")).result()["sessions"]
            (mine,) = [s for s in sessions if s["name"] == f"launcher:{kernel_name}" and s.get("connection")]
            direct = BlockingKernelClient()
            direct.load_connection_info(mine["connection"])
            clients = [relayed, direct]
            return interleaved_rtt(clients, n, warmup, block, timeout)
        finally:
            for kc in clients:
                kc.stop_channels()
            proc.send_signal(signal.SIGTERM)  # the launcher ends its kernel
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


# -- main -------------------------------------------------------------------------------------


def measure_launches(
    args: argparse.Namespace, gw: GatewayClient, client: docker.DockerClient, image: str, argv: list[str]
) -> tuple[list[float], list[float], list[float], list[dict[str, float]]]:
    """(ours, floor, floor run-call, our phases) over the launches, ours and the floor alternating."""
    ours: list[float] = []
    floor: list[float] = []
    floor_run: list[float] = []
    phases: list[dict[str, float]] = []
    run_id = uuid.uuid4().hex[:12]
    labels = {FLOOR_LABEL: "launch-floor", FLOOR_RUN_LABEL: run_id}
    try:
        with tempfile.TemporaryDirectory(prefix="bai-bench-") as tmp:
            total = args.warmup_launches + args.launches
            for i in range(total):
                warm = i < args.warmup_launches
                order = ("ours", "floor") if i % 2 == 0 else ("floor", "ours")
                got: dict[str, float] = {}
                for which in order:
                    if which == "ours":
                        took, where = launch_ours(args.kernel_name, gw, args.timeout)
                        if not warm:
                            phases.append(where)
                    else:
                        took, run_call = launch_floor(client, image, argv, Path(tmp), labels, args.timeout)
                        if not warm:
                            floor_run.append(run_call)
                    got[which] = took
                    time.sleep(args.pause)
                line = f"ours {ms(got['ours'])} ms, floor {ms(got['floor'])} ms"
                if warm:
                    log(f"warm-up launch: {line}")
                else:
                    ours.append(got["ours"])
                    floor.append(got["floor"])
                    log(f"launch {i - args.warmup_launches + 1}/{args.launches}: {line}")
    finally:
        # A create the daemon was still working on when we gave up would otherwise survive.
        for c in client.containers.list(all=True, filters={"label": f"{FLOOR_RUN_LABEL}={run_id}"}):
            remove_container(client, c.name)
    return ours, floor, floor_run, phases


def run(args: argparse.Namespace) -> dict[str, Any]:
    gw = connect_gateway(args)
    image = kernel_image(args.kernel_name)
    try:
        client = docker.from_env()
        client.ping()
    except docker.errors.DockerException as e:
        raise BenchmarkError(f"Docker engine not reachable for the floor ({e})") from None
    argv = image_argv(client, image)
    log(f"kernel {args.kernel_name!r}, image {image}, floor argv {argv}")

    ours, floor, floor_run, phases = measure_launches(args, gw, client, image, argv)

    log(f"execute round trips: {args.rtt} per client after {args.rtt_warmup} warm-ups")
    rtt_ours, rtt_floor = measure_rtt(
        args.kernel_name, gw, args.rtt, args.rtt_warmup, args.rtt_block, args.timeout
    )

    log(f"relay round trips: {args.rtt} through the launcher's relay and direct, same kernel")
    rtt_relay, rtt_direct = measure_relay_rtt(
        args.kernel_name, gw, args.rtt, args.rtt_warmup, args.rtt_block, args.timeout
    )
    relay_ratio = percentile(rtt_relay, 0.5) / percentile(rtt_direct, 0.5)

    launch_p50, floor_p50 = percentile(ours, 0.5), percentile(floor, 0.5)
    rtt_p50, floor_rtt_p50 = percentile(rtt_ours, 0.5), percentile(rtt_floor, 0.5)
    launch_ratio = launch_p50 / floor_p50
    rtt_ratio = rtt_p50 / floor_rtt_p50
    phase_names = sorted({k for p in phases for k in p})
    return {
        "launch_p50_ms": ms(launch_p50),
        "launch_p90_ms": ms(percentile(ours, 0.9)),
        "floor_launch_p50_ms": ms(floor_p50),
        "floor_launch_p90_ms": ms(percentile(floor, 0.9)),
        "launch_ratio": round(launch_ratio, 3),
        "launch_target_ratio": LAUNCH_TARGET_RATIO,
        "launch_target_met": launch_ratio <= LAUNCH_TARGET_RATIO,
        "rtt_p50_ms": round(rtt_p50 * 1000, 3),
        "rtt_p90_ms": round(percentile(rtt_ours, 0.9) * 1000, 3),
        "floor_rtt_p50_ms": round(floor_rtt_p50 * 1000, 3),
        "floor_rtt_p90_ms": round(percentile(rtt_floor, 0.9) * 1000, 3),
        "rtt_ratio": round(rtt_ratio, 3),
        "rtt_target_ratio": RTT_TARGET_RATIO,
        "rtt_target_met": rtt_ratio <= RTT_TARGET_RATIO,
        "relay_rtt_p50_ms": round(percentile(rtt_relay, 0.5) * 1000, 3),
        "direct_rtt_p50_ms": round(percentile(rtt_direct, 0.5) * 1000, 3),
        "relay_ratio": round(relay_ratio, 3),
        "relay_target_ratio": RELAY_TARGET_RATIO,
        "relay_target_met": relay_ratio <= RELAY_TARGET_RATIO,
        "launches": len(ours),
        "rtt_requests": len(rtt_ours),
        "launch_samples_ms": [ms(x) for x in ours],
        "floor_launch_samples_ms": [ms(x) for x in floor],
        "floor_docker_run_call_p50_ms": ms(percentile(floor_run, 0.5)),
        "launch_phases_p50_ms": {
            k: ms(percentile([p[k] for p in phases if k in p], 0.5)) for k in phase_names
        },
        "kernel_name": args.kernel_name,
        "image": image,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--launches", type=int, default=10, help="timed cold launches of each kind (default 10)")
    p.add_argument("--warmup-launches", type=int, default=1, help="untimed launch pairs first (default 1)")
    p.add_argument("--rtt", type=int, default=200, help="timed execute round trips per client (default 200)")
    p.add_argument(
        "--rtt-warmup", type=int, default=20, help="untimed round trips per client first (default 20)"
    )
    p.add_argument(
        "--rtt-block", type=int, default=10, help="round trips per block when alternating (default 10)"
    )
    p.add_argument(
        "--kernel-name", default="backendai-python3", help="kernelspec to launch (default backendai-python3)"
    )
    p.add_argument("--gateway-url", default="", help="gateway URL; overrides the client config")
    p.add_argument(
        "--client-config",
        default="",
        help=f"client config file (default: ${ENV_PATH}, else <jupyter config dir>/backendai_client.json)",
    )
    p.add_argument(
        "--pause", type=float, default=0.3, help="seconds to settle between launches (default 0.3)"
    )
    p.add_argument("--timeout", type=float, default=120.0, help="seconds any one launch or reply may take")
    args = p.parse_args(argv)
    if args.launches < 1 or args.rtt < 1 or args.rtt_block < 1:
        p.error("--launches, --rtt and --rtt-block must be at least 1")
    return args


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM cleans up like Ctrl-C does: kernels shut down, floor containers removed.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        result = run(args)
    except (BenchmarkError, LaunchError) as e:
        log(f"error: {e}")
        return 1
    except docker.errors.DockerException as e:
        log(f"error: Docker: {e}")
        return 1
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
