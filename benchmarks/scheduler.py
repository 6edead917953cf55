"""Scheduler throughput and decision latency, in process (no containers, no network).

10,000 pending requests of mixed shapes (CPU-only, whole GPUs, GPU fractions) from 50 users
are placed over 1,000 simulated agents of mixed sizes (CPU-only, 4- and 8-GPU hosts on two
NUMA nodes, some with fractional sharing), in one scheduling pass per policy, exactly as the
gateway runs it. Prints one JSON object: ``placements_per_s``, ``decision_p50_ms``,
``decision_p99_ms``, ``overallocations`` (must be 0), and the targets.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from decimal import Decimal

from backendai_jupyter.common.slots import ResourceSlot
from backendai_jupyter.common.wire import Device
from backendai_jupyter.gateway.scheduler import Cluster, Request, choose

IMAGE = "backendai-jupyter/python:latest"


def build_cluster(n_agents: int, rng: random.Random) -> Cluster:
    cluster = Cluster()
    for i in range(n_agents):
        kind = rng.choice(["cpu", "gpu4", "gpu8", "gpu8-shared"])
        ngpu = {"cpu": 0, "gpu4": 4, "gpu8": 8, "gpu8-shared": 8}[kind]
        sharing = kind.endswith("shared")
        devices = [
            Device(
                "cuda",
                f"{j}",
                f"GPU-{i}-{j}",
                "Sim GPU",
                80 * 2**30,
                numa_node=j % 2,
                shares="1" if sharing else "0",
                mock=True,
            )
            for j in range(ngpu)
        ]
        capacity = {"cpu": rng.choice([16, 32, 64]), "mem": f"{rng.choice([64, 128, 256])}g"}
        if ngpu:
            capacity["cuda.device"] = ngpu
            if sharing:
                capacity["cuda.shares"] = ngpu
        cluster.add_agent(f"agent-{i:04d}", ResourceSlot.parse(capacity), devices, [IMAGE])
    return cluster


def make_requests(n: int, rng: random.Random) -> list[Request]:
    shapes = [
        {"cpu": "1", "mem": "2g"},
        {"cpu": "2", "mem": "8g"},
        {"cpu": "4", "mem": "16g", "cuda.device": 1},
        {"cpu": "8", "mem": "32g", "cuda.device": 2},
        {"cpu": "8", "mem": "64g", "cuda.device": 4},
        {"cpu": "2", "mem": "8g", "cuda.shares": "0.5"},
        {"cpu": "1", "mem": "4g", "cuda.shares": "0.25"},
    ]
    return [
        Request(f"s{i}", f"user{rng.randrange(50)}", ResourceSlot.parse(rng.choice(shapes)), IMAGE, i)
        for i in range(n)
    ]


def overallocations(cluster: Cluster) -> int:
    """Count violated capacities and over-given devices (independently of Cluster.check)."""
    bad = 0
    for agent in cluster.agents.values():
        mine = [a for a in cluster.allocations.values() if a.agent_id == agent.id]
        total = ResourceSlot()
        per_device: dict[str, Decimal] = {}
        for a in mine:
            total = total + a.resources
            for devs in a.devices.values():
                for d, amount in devs.items():
                    per_device[d] = per_device.get(d, Decimal(0)) + min(amount, Decimal(1))
        bad += len(total.shortfall(agent.capacity))
        bad += sum(1 for v in per_device.values() if v > 1)
    return bad


def run(policy: str, n_agents: int, n_requests: int, seed: int) -> dict[str, float]:
    from backendai_jupyter.gateway.scheduler.placement import order

    rng = random.Random(seed)
    cluster = build_cluster(n_agents, rng)
    pending = make_requests(n_requests, rng)
    latencies = []
    placed = 0
    start = time.perf_counter()
    for request in order(pending, policy, cluster):
        t0 = time.perf_counter()
        alloc = choose(cluster, request, "auto")
        if alloc is not None:
            cluster.allocate(request.session_id, alloc)
            placed += 1
        else:  # the gateway tells every waiting request why; that is part of the decision
            cluster.shortfall_reason(request.resources, request.image)
        latencies.append(time.perf_counter() - t0)
    elapsed = time.perf_counter() - start
    latencies.sort()
    return {
        "placements": placed,
        "decisions": len(latencies),
        "elapsed_s": round(elapsed, 3),
        "placements_per_s": round(placed / elapsed, 1),
        "decision_p50_ms": round(latencies[len(latencies) // 2] * 1000, 3),
        "decision_p99_ms": round(latencies[int(len(latencies) * 0.99)] * 1000, 3),
        "overallocations": overallocations(cluster),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--agents", type=int, default=1000)
    ap.add_argument("--requests", type=int, default=10000)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args(argv)
    results = {}
    for policy in ("fifo", "drf"):
        print(f"policy {policy} ...", file=sys.stderr)
        results[policy] = run(policy, args.agents, args.requests, args.seed)
    worst = max(results.values(), key=lambda r: r["decision_p99_ms"])
    slowest = min(results.values(), key=lambda r: r["placements_per_s"])
    out = {
        "agents": args.agents,
        "requests": args.requests,
        "placements_per_s": slowest["placements_per_s"],
        "decision_p50_ms": max(r["decision_p50_ms"] for r in results.values()),
        "decision_p99_ms": worst["decision_p99_ms"],
        "overallocations": sum(r["overallocations"] for r in results.values()),
        "by_policy": results,
        "target_placements_per_s": 2000,
        "target_decision_p99_ms": 5,
    }
    out["targets_met"] = (
        out["placements_per_s"] >= 2000 and out["decision_p99_ms"] <= 5 and out["overallocations"] == 0
    )
    print(json.dumps(out))
    return 0 if out["overallocations"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
