"""Scheduling throughput, create latency and failover with one and two gateway replicas.

Three configurations run side by side, each gateway a process of its own (``python -m
backendai_jupyter.cli gateway``; replicas in one process would share one GIL): one gateway on
SQLite (``sqlite``), one on PostgreSQL (``pg1``), two replicas on one PostgreSQL database
(``pg2``). Each configuration has its own data directory (its replicas share it, and with it the
admin keypair and the agent token) and its own fresh database. Its agents are simulated in this
process and speak the real wire (``tests/inproc.py``'s ``RoamingAgent``): they register with mock
GPUs, report a created kernel RUNNING and a destroyed one TERMINATED, heartbeat, and when their
replica dies they move to the other one at once, as the agent does.

A wave is N concurrent signed ``POST /v1/sessions``, one whole GPU each, spread round-robin over
the configuration's replicas and over several users; each client then opens the session's event
stream and waits for RUNNING, as the provisioner does. Waves alternate between the
configurations, so noise on the machine hits all alike; each wave's sessions are deleted before
the next. Then, with two replicas, the leader is killed with SIGKILL a few times, and each time a
session created on the survivor is timed until it is RUNNING.

Prints one JSON object on stdout (progress on stderr).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

from measure import (  # benchmarks/ is on sys.path when run as a script
    BenchmarkError,
    log,
    percentile,
    start_gateway,
)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # for the simulated agent and the signed client of tests/inproc.py

from tornado import httpclient  # noqa: E402

from backendai_jupyter.common.slots import ResourceSlot  # noqa: E402
from backendai_jupyter.common.wire import Device  # noqa: E402
from tests.inproc import IMAGE, Caller, RoamingAgent  # noqa: E402

PG2_TARGET_RATIO = 1.5  # two replicas: at least this many times one replica's creates per second
FAILOVER_TARGET_S = 5.0  # leader killed → a new session on the survivor RUNNING within this
REQUEST = {"image": IMAGE, "resources": {"cpu": "0.25", "mem": "256m", "cuda.device": "1"}}
TERMINAL = {"TERMINATED", "CANCELLED", "ERROR", "LOST"}
CONFIGS = ("sqlite", "pg1", "pg2")
TICK = os.sysconf("SC_CLK_TCK")


# -- the machine ------------------------------------------------------------------------------


def machine_ticks() -> tuple[int, int]:
    """(busy, total) CPU ticks of the whole machine so far, from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    total = sum(fields[:8])  # up to steal; guest time is counted in user already
    return total - idle, total


def process_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    after_name = stat.rsplit(")", 1)[1].split()
    return (int(after_name[11]) + int(after_name[12])) / TICK  # utime, stime


# -- PostgreSQL -------------------------------------------------------------------------------


def _pg_admin(server: str) -> Any:
    import psycopg

    url = server.replace("postgresql+asyncpg://", "postgresql://", 1)
    return psycopg.connect(f"{url}/postgres", autocommit=True, connect_timeout=10)


def create_database(server: str) -> str:
    """A new, empty database on ``server``; its async URL."""
    name = f"bai_bench_{uuid.uuid4().hex[:16]}"
    with _pg_admin(server) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"{server}/{name}"


def drop_database(server: str, url: str) -> None:
    name = url.rsplit("/", 1)[1]
    with _pg_admin(server) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def check_server(server: str) -> None:
    if not server.startswith("postgresql+asyncpg://") or server.count("/") != 2:
        raise BenchmarkError(
            f"--postgres must be postgresql+asyncpg://ROLE:PASSWORD@HOST:PORT (no database), not {server!r}"
        )
    try:
        with _pg_admin(server):
            pass
    except Exception as e:
        raise BenchmarkError(
            f"cannot reach PostgreSQL at {server} ({e}): start it, or pass --postgres"
        ) from None


# -- gateways ---------------------------------------------------------------------------------


class Replica:
    """One gateway process (``backendai-jupyter gateway``) of a configuration."""

    def __init__(self, name: str, data_dir: Path, db_url: str) -> None:
        self.name, self.data_dir, self.db_url = name, data_dir, db_url
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.runs = 0
        self.log_path = data_dir.parent / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60) -> None:
        """Start it (again: same port, data directory and database) and wait until it serves."""
        self.runs += 1
        self.log_path = self.data_dir.parent / f"{self.name}.{self.runs}.log"
        env = {k: v for k, v in os.environ.items() if k != "BACKENDAI_DB_URL"}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
        if self.db_url:
            env["BACKENDAI_DB_URL"] = self.db_url
        cmd = [sys.executable, "-m", "backendai_jupyter.cli", "gateway"]
        cmd += ["--port", str(self.port), "--data-dir", str(self.data_dir)]
        self.proc = start_gateway(cmd, self.log_path, timeout, env, f"gateway {self.name}")

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def leads(self) -> bool:
        """Whether it leads scheduling now, as its log says (bus.Leadership logs each change)."""
        text = self.log_path.read_text()
        return self.alive and text.count("now leads scheduling") > text.count("no longer leads scheduling")

    def cpu_s(self) -> float:
        assert self.proc is not None
        return process_cpu_s(self.proc.pid)

    def kill(self) -> None:
        """SIGKILL: no clean stop, its connections just drop."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        if not self.alive:
            return
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Wave:
    """What one wave measured."""

    creates_per_s: float
    latencies_s: list[float]
    failed: list[str]
    double_allocations: int
    gateway_cpu_s: float
    bench_cpu_s: float
    machine_busy: float  # the fraction of all cores busy while it ran


@dataclass
class Config:
    """A configuration: its replicas, database, users and agents."""

    name: str
    base: Path
    db_url: str = ""  # "" for SQLite
    replicas: list[Replica] = field(default_factory=list)
    admin: Caller | None = None
    users: list[dict[str, Any]] = field(default_factory=list)
    agents: list[RoamingAgent] = field(default_factory=list)
    waves: list[Wave] = field(default_factory=list)

    @property
    def data_dir(self) -> Path:
        return self.base / self.name / "data"

    def sync_db_url(self) -> str:
        from backendai_jupyter.gateway.db import sync_url

        return sync_url(self.db_url or f"sqlite+aiosqlite:///{self.data_dir / 'gateway.sqlite'}")

    def caller(self, i: int) -> Caller:
        """The client of request ``i``: replicas round-robin, each user on every replica."""
        replica = self.replicas[i % len(self.replicas)]
        return Caller(replica.url, self.users[(i // len(self.replicas)) % len(self.users)])

    async def start(self, n_replicas: int, n_users: int, n_agents: int, gpus: int) -> None:
        self.data_dir.mkdir(parents=True)
        # One at a time: the first makes the schema and the admin, the others find them.
        for r in range(n_replicas):
            replica = Replica(
                f"{self.name}-{'ab'[r] if n_replicas > 1 else 'gw'}", self.data_dir, self.db_url
            )
            await asyncio.to_thread(replica.start)
            self.replicas.append(replica)
        creds = json.loads((self.data_dir / "admin-keypair.json").read_text())
        self.admin = Caller(self.replicas[0].url, creds)
        for u in range(n_users):
            self.users.append(await self.admin("POST", "/v1/admin/users", {"name": f"bench{u}"}))
        token = (self.data_dir / "agent-token").read_text().strip()
        urls = [r.url for r in self.replicas]
        for a in range(n_agents):
            agent_id = f"{self.name}-agent{a}"
            devices = [
                Device(
                    plugin="cuda",
                    id=str(d),
                    uuid=f"GPU-{agent_id}-{d}",
                    model="Mock GPU",
                    memory=16 << 30,
                    mock=True,
                )
                for d in range(gpus)
            ]
            first = a % len(urls)  # agents spread over the replicas
            agent = RoamingAgent(urls[first:] + urls[:first], agent_id, join_token=token, devices=devices)
            agent.capacity = ResourceSlot.parse({"cpu": "64", "mem": "256g", "cuda.device": str(gpus)})
            await agent.start()
            self.agents.append(agent)
        if n_replicas > 1:
            await self.leader()

    async def leader(self, timeout: float = 30) -> Replica:
        """The replica that leads scheduling (waits until exactly one does)."""
        async with asyncio.timeout(timeout):
            while True:
                leaders = [r for r in self.replicas if r.leads()]
                if len(leaders) > 1:
                    raise BenchmarkError(
                        f"{self.name}: {', '.join(r.name for r in leaders)} all lead at once"
                    )
                if leaders:
                    return leaders[0]
                await asyncio.sleep(0.05)

    def gateway_cpu_s(self) -> float:
        return sum(r.cpu_s() for r in self.replicas if r.alive)

    def double_allocations(self) -> int:
        """(agent, device) pairs held more than whole, counted from the database's rows."""
        from sqlalchemy import create_engine, select

        from backendai_jupyter.gateway.models import KernelSession
        from backendai_jupyter.gateway.sessions.store import HOLDING

        engine = create_engine(self.sync_db_url())
        try:
            with engine.connect() as conn:
                rows = conn.execute(
                    select(KernelSession.agent_id, KernelSession.devices).where(
                        KernelSession.state.in_(HOLDING)
                    )
                ).all()
        finally:
            engine.dispose()
        held: Counter[tuple[str, str, str]] = Counter()
        for agent_id, devices in rows:
            for plugin, devs in (devices or {}).items():
                for dev, amount in devs.items():
                    held[(agent_id, plugin, dev)] += Decimal(amount)
        return sum(1 for total in held.values() if total > 1)

    async def stop(self) -> None:
        for agent in self.agents:
            agent.close()
        for replica in self.replicas:
            await asyncio.to_thread(replica.stop)


# -- the work ---------------------------------------------------------------------------------


async def until_running(caller: Caller, sid: str) -> None:
    """Wait on the session's event stream until it is RUNNING (raise if it ends instead)."""
    ws = await caller.stream(sid)
    try:
        while True:
            raw = await ws.read_message()
            if raw is None:
                raise BenchmarkError(f"the event stream of {sid} closed")
            event = json.loads(raw)
            if event["state"] == "RUNNING":
                return
            if event["state"] in TERMINAL:
                raise BenchmarkError(f"session {sid} ended {event['state']}: {event['reason']}")
    finally:
        ws.close()


async def create(caller: Caller) -> str:
    resp = await caller.fetch("POST", "/v1/sessions", REQUEST)
    if resp.code != 201:
        raise BenchmarkError(f"POST /v1/sessions: {resp.code} {resp.body[:300]!r}")
    return str(json.loads(resp.body)["id"])


async def wave(cfg: Config, n: int, timeout: float) -> tuple[Wave, list[tuple[Caller, str]]]:
    """N creates at once until all are RUNNING; the sessions made, for the cleanup."""
    made: list[tuple[Caller, str]] = []
    failed: list[str] = []

    async def one(i: int) -> float | None:
        caller = cfg.caller(i)
        t0 = time.perf_counter()
        try:
            sid = await create(caller)
            made.append((caller, sid))
            await until_running(caller, sid)
        except (BenchmarkError, OSError, httpclient.HTTPClientError) as e:
            failed.append(str(e))
            return None
        return time.perf_counter() - t0

    cpu0, bench0, (busy0, total0) = cfg.gateway_cpu_s(), time.process_time(), machine_ticks()
    start = time.perf_counter()
    try:
        async with asyncio.timeout(timeout):
            done = await asyncio.gather(*(one(i) for i in range(n)))
    except TimeoutError:
        raise BenchmarkError(f"{cfg.name}: {n} sessions were not all RUNNING within {timeout} s") from None
    elapsed = time.perf_counter() - start
    busy1, total1 = machine_ticks()
    latencies = [d for d in done if d is not None]
    result = Wave(
        creates_per_s=len(latencies) / elapsed,
        latencies_s=latencies,
        failed=failed,
        double_allocations=await asyncio.to_thread(cfg.double_allocations),  # all of them hold a GPU now
        gateway_cpu_s=cfg.gateway_cpu_s() - cpu0,
        bench_cpu_s=time.process_time() - bench0,
        machine_busy=(busy1 - busy0) / max(1, total1 - total0),
    )
    return result, made


async def delete_all(cfg: Config, made: list[tuple[Caller, str]], timeout: float) -> None:
    """End the sessions made and wait until nothing is open (the next wave starts from empty)."""
    sem = asyncio.Semaphore(50)

    async def end(caller: Caller, sid: str) -> None:
        async with sem:
            await caller.fetch("DELETE", f"/v1/sessions/{sid}")

    assert cfg.admin is not None
    async with asyncio.timeout(timeout):
        await asyncio.gather(*(end(c, s) for c, s in made))
        while True:
            if not (await cfg.admin("GET", "/v1/sessions?all=1&active=1"))["sessions"]:
                return
            await asyncio.sleep(0.2)


async def failover(cfg: Config, trials: int, kept: int, timeout: float) -> dict[str, Any]:
    """Kill the leader with SIGKILL ``trials`` times, each time timing a new session on the survivor
    until it is RUNNING; ``kept`` sessions started before must stay RUNNING throughout."""
    assert cfg.admin is not None
    kept_made = [(c, await create(c)) for c in map(cfg.caller, range(kept))]
    for caller, sid in kept_made:
        await until_running(caller, sid)
    samples: list[float | None] = []  # None: that session never ran
    leader_s, agents_s, failures = [], [], []
    for trial in range(trials):
        leader = await cfg.leader()
        survivor = next(r for r in cfg.replicas if r is not leader)
        moving = [a for a in cfg.agents if a.linked_to == leader.url]
        caller = Caller(survivor.url, cfg.users[trial % len(cfg.users)])
        led: list[float] = []
        t_kill = time.monotonic()
        t0 = time.perf_counter()
        leader.kill()
        watcher = asyncio.ensure_future(watch_leadership(survivor, t0, led))
        sid = ""
        try:
            async with asyncio.timeout(timeout):
                sid = await create(caller)
                await until_running(caller, sid)
            samples.append(time.perf_counter() - t0)
        except (TimeoutError, BenchmarkError) as e:
            # Reported, not fatal: how a failover goes wrong is a result too.
            samples.append(None)
            model = await caller("GET", f"/v1/sessions/{sid}") if sid else {}
            dropped = [a.agent_id for a in cfg.agents if any(r.session_id == sid for r in a.dropped)]
            failures.append(
                f"failover {trial + 1}: {str(e) or f'not RUNNING within {timeout} s'}"
                + (f" (session {sid}: {model['state']}, {model['reason']!r})" if model else "")
                + (f"; agent {dropped[0]} ran it before its registration was answered" if dropped else "")
            )
        try:
            async with asyncio.timeout(timeout):
                await watcher
                for agent in moving:
                    await agent.registered_after(t_kill, timeout)
        except TimeoutError:
            raise BenchmarkError(
                f"failover {trial + 1}: {survivor.name} did not lead, or the agents did not come back, "
                f"within {timeout} s"
            ) from None
        leader_s.append(led[0])
        back = [min(t for t, _ in a.registrations if t > t_kill) for a in moving]
        agents_s.append(max((t - t_kill for t in back), default=0.0))
        ran = f"new session RUNNING after {samples[-1]:.2f} s" if samples[-1] else failures[-1]
        log(
            f"  failover {trial + 1}: killed {leader.name}; {ran}; {survivor.name} led after {led[0]:.2f} s, "
            f"{len(moving)} agents back after {agents_s[-1]:.2f} s"
        )
        if sid:
            await caller.fetch("DELETE", f"/v1/sessions/{sid}")
        await asyncio.to_thread(leader.start)  # back as a follower, for the next trial
    states = [(await c("GET", f"/v1/sessions/{s}"))["state"] for c, s in kept_made]
    await delete_all(cfg, kept_made, timeout)
    return {
        "failover_samples_s": [None if s is None else round(s, 3) for s in samples],
        "failover_failures": failures,
        "new_leader_s": [round(s, 3) for s in leader_s],
        "agents_back_s": [round(s, 3) for s in agents_s],
        "failover_sessions": len(states),
        "failover_sessions_kept": states.count("RUNNING"),
    }


async def watch_leadership(replica: Replica, t0: float, led: list[float]) -> None:
    """Append the seconds since ``t0`` at which ``replica`` leads (its log says so)."""
    while True:
        if replica.leads():
            led.append(time.perf_counter() - t0)
            return
        await asyncio.sleep(0.02)


def summary(waves: list[Wave]) -> dict[str, Any]:
    latencies = [x for w in waves for x in w.latencies_s]
    return {
        "creates_per_s": round(statistics.median(w.creates_per_s for w in waves), 1),
        "creates_per_s_by_wave": [round(w.creates_per_s, 1) for w in waves],
        "create_p50_ms": round(percentile(latencies, 0.5) * 1000, 1),
        "create_p99_ms": round(percentile(latencies, 0.99) * 1000, 1),
        "failed": sum(len(w.failed) for w in waves),
        "failures": sorted({f for w in waves for f in w.failed})[:3],
        "gateway_cpu_s_per_wave": round(statistics.median(w.gateway_cpu_s for w in waves), 2),
        "bench_cpu_s_per_wave": round(statistics.median(w.bench_cpu_s for w in waves), 2),
        "machine_busy": round(statistics.median(w.machine_busy for w in waves), 2),
    }


async def run(args: argparse.Namespace, base: Path) -> dict[str, Any]:
    # Every request at once: tornado's client otherwise queues all but 10.
    httpclient.AsyncHTTPClient.configure(None, max_clients=args.sessions + 64)
    gpus = max(1, math.ceil(args.sessions / args.agents))
    configs = {name: Config(name, base) for name in CONFIGS}
    try:
        for name, cfg in configs.items():
            if name != "sqlite":
                cfg.db_url = await asyncio.to_thread(create_database, args.postgres)
            n_replicas = 2 if name == "pg2" else 1
            log(f"starting {name}: {n_replicas} gateway(s), {args.agents} agents of {gpus} mock GPUs ...")
            await cfg.start(n_replicas, args.users, args.agents, gpus)
        log(f"warm-up: {args.warmup} sessions on each ...")
        for cfg in configs.values():
            _, made = await wave(cfg, args.warmup, args.timeout)
            await delete_all(cfg, made, args.timeout)
        order = list(configs.values())
        for r in range(args.rounds):
            for cfg in order[r % len(order) :] + order[: r % len(order)]:  # a different one first each round
                result, made = await wave(cfg, args.sessions, args.timeout)
                cfg.waves.append(result)
                log(
                    f"round {r + 1} {cfg.name}: {result.creates_per_s:.1f} creates/s, p99 "
                    f"{percentile(result.latencies_s, 0.99) * 1000:.0f} ms, {len(result.failed)} failed, "
                    f"machine {result.machine_busy:.0%} busy"
                )
                await delete_all(cfg, made, args.timeout)
        log(f"failover: SIGKILL the pg2 leader {args.failovers} times ...")
        fail = await failover(configs["pg2"], args.failovers, min(args.kept, args.sessions), args.timeout)
        # Counted while each wave's sessions all held their GPU, and once more at the end.
        double = sum(w.double_allocations for c in configs.values() for w in c.waves)
        double += sum([await asyncio.to_thread(c.double_allocations) for c in configs.values()])
    finally:
        for cfg in configs.values():
            await cfg.stop()
            if cfg.db_url:
                await asyncio.to_thread(drop_database, args.postgres, cfg.db_url)
    by = {name: summary(cfg.waves) for name, cfg in configs.items()}
    ratio = by["pg2"]["creates_per_s"] / by["pg1"]["creates_per_s"]
    # The slowest failover; null when a session created after a kill never ran.
    failover_s = None if fail["failover_failures"] else max(fail["failover_samples_s"])
    failover_met = failover_s is not None and failover_s <= FAILOVER_TARGET_S
    failed = sum(b["failed"] for b in by.values())
    return {
        "sessions": args.sessions,
        "rounds": args.rounds,
        "users": args.users,
        "agents": args.agents,
        "gpus_per_agent": gpus,
        "cores": os.cpu_count(),
        "sqlite_creates_per_s": by["sqlite"]["creates_per_s"],
        "pg1_creates_per_s": by["pg1"]["creates_per_s"],
        "pg2_creates_per_s": by["pg2"]["creates_per_s"],
        "create_p50_ms": by["pg2"]["create_p50_ms"],
        "create_p99_ms": by["pg2"]["create_p99_ms"],
        "failover_s": failover_s,
        **fail,
        "double_allocations": double,
        "failed_creates": failed,
        "by_config": by,
        "pg2_vs_pg1": round(ratio, 2),
        "pg2_target_ratio": PG2_TARGET_RATIO,
        "pg2_target_met": ratio >= PG2_TARGET_RATIO,
        "failover_target_s": FAILOVER_TARGET_S,
        "failover_target_met": failover_met,
        "targets_met": ratio >= PG2_TARGET_RATIO
        and failover_met
        and double == 0
        and failed == 0
        and fail["failover_sessions_kept"] == fail["failover_sessions"],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--postgres",
        default=os.environ.get("BAI_TEST_POSTGRES", ""),
        help="PostgreSQL server as postgresql+asyncpg://ROLE:PASSWORD@HOST:PORT, a role that may "
        "create databases (default: $BAI_TEST_POSTGRES)",
    )
    ap.add_argument("--sessions", type=int, default=200, help="sessions created at once per wave")
    ap.add_argument("--rounds", type=int, default=3, help="timed waves per configuration, alternating")
    ap.add_argument("--users", type=int, default=8, help="client users the sessions are spread over")
    ap.add_argument("--agents", type=int, default=3, help="simulated agents per configuration")
    ap.add_argument("--warmup", type=int, default=10, help="sessions of the untimed first wave")
    ap.add_argument("--failovers", type=int, default=3, help="times the pg2 leader is killed")
    ap.add_argument("--kept", type=int, default=20, help="sessions left running across the failovers")
    ap.add_argument("--timeout", type=float, default=180, help="seconds one wave or failover may take")
    ap.add_argument("--dir", help="where the gateways' data directories and logs go (a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the data directories and logs")
    args = ap.parse_args(argv)
    base = Path(tempfile.mkdtemp(prefix="bench-replicas-", dir=args.dir))
    ok = False
    try:
        if not args.postgres:
            raise BenchmarkError(
                "no PostgreSQL server: pass --postgres postgresql+asyncpg://ROLE:PASSWORD@HOST:PORT "
                "(scripts/ensure-postgres.sh starts one and prints it) or set BAI_TEST_POSTGRES"
            )
        check_server(args.postgres.rstrip("/"))
        args.postgres = args.postgres.rstrip("/")
        out = asyncio.run(run(args, base))
        ok = True
    except BenchmarkError as e:
        log(f"error: {e} (the gateways' logs are under {base})")
        return 1
    finally:
        if ok and not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
