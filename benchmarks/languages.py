"""Cold launch and first execute of every language's kernel, each against its bare-Docker floor.

Run it against a gateway that is already up (``backendai-jupyter up``), after
``backendai-jupyter images build`` and ``backendai-jupyter kernelspecs install --sys-prefix``::

    .venv/bin/python benchmarks/languages.py --launches 3

For each installed Backend.AI kernelspec (one per language; ``--languages r bash`` picks some),
the same measurement as ``benchmarks/launch.py``'s cold launch, interleaved in the same run:

- *ours*: a stock ``KernelManager`` with the kernelspec (our provisioner, the gateway, an
  agent, a container), from ``start_kernel()`` to the first ``kernel_info_reply``;
- *floor*: a plain ``docker run`` of the same image with the argv of its label, to the first
  ``kernel_info_reply``;

and ``first_exec_ms``: on one of our launched kernels, the first ``execute_request`` of a trivial
statement in that language to its ``execute_reply`` (compilers and interpreters that load lazily
pay here, not in the launch).

Prints one JSON object: ``{"languages": {NAME: {launch_p50_ms, floor_launch_p50_ms,
launch_ratio, first_exec_ms, ...}}, "target_ratio": 1.15, "targets_met": {NAME: bool}}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import docker
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from launch import (
    FLOOR_LABEL,
    FLOOR_RUN_LABEL,
    _wait_reply,
    connect_gateway,
    end_kernel,
    image_argv,
    launch_floor,
    launch_ours,
    ms,
    remove_container,
)
from measure import BenchmarkError, log, percentile

TARGET_RATIO = 1.15
# A statement that does next to nothing, per kernelspec language (lower-case); others get "1".
TRIVIAL = {
    "python": "1 + 1",
    "r": "1 + 1",
    "bash": "true",
    "typescript": "1 + 1",
    "javascript": "1 + 1",
    "octave": "1 + 1;",
    "c": 'printf("1\\n");',
    "c++": "std::cout << 1 << std::endl;",
    "go": "fmt.Println(1)",
    "rust": 'println!("1");',
    "java": "System.out.println(1);",
}


def our_kernelspecs(only: list[str]) -> dict[str, tuple[str, str]]:
    """Kernelspec name → (image, language) for every installed Backend.AI kernelspec, one per image."""
    out: dict[str, tuple[str, str]] = {}
    seen: set[str] = set()
    ksm = KernelSpecManager()
    for name in sorted(ksm.find_kernel_specs()):
        spec = ksm.get_kernel_spec(name)
        prov = spec.metadata.get("kernel_provisioner", {})
        if prov.get("provisioner_name") != "backendai-provisioner":
            continue
        config = prov.get("config", {})
        image = str(config.get("image") or "")
        if not image or image in seen or any(k.startswith("cuda") for k in config.get("resources", {})):
            continue  # one kernelspec per image; GPU variants measure the same launch
        if only and name not in only and name.removeprefix("backendai-") not in only:
            continue
        seen.add(image)
        out[name] = (image, spec.language.lower())
    return out


def first_execute(kernel_name: str, language: str, gw: Any, timeout: float) -> float:
    """Seconds from the first execute_request on a fresh kernel to its execute_reply."""
    km = KernelManager(kernel_name=kernel_name)
    kc = None
    try:
        km.start_kernel()
        kc = km.client()
        kc.start_channels()
        _wait_reply(kc, kc.kernel_info(), "kernel_info_reply", timeout)
        t0 = time.perf_counter()
        reply = _wait_reply(kc, kc.execute(TRIVIAL.get(language, "1")), "execute_reply", timeout)
        took = time.perf_counter() - t0
        if reply["content"]["status"] != "ok":
            raise BenchmarkError(f"{kernel_name}: the trivial statement failed: {reply['content']}")
        return took
    finally:
        if kc is not None:
            kc.stop_channels()
        end_kernel(km, gw)


def run(args: argparse.Namespace) -> dict[str, Any]:
    gw = connect_gateway(args)
    specs = our_kernelspecs(args.languages)
    if not specs:
        raise BenchmarkError(
            "no Backend.AI kernelspecs installed: run `backendai-jupyter kernelspecs install`"
        )
    client = docker.from_env()
    results: dict[str, Any] = {}
    run_id = uuid.uuid4().hex[:12]
    labels = {FLOOR_LABEL: "languages-floor", FLOOR_RUN_LABEL: run_id}
    try:
        with tempfile.TemporaryDirectory(prefix="bai-bench-") as tmp:
            for name, (image, language) in specs.items():
                argv = image_argv(client, image)
                ours: list[float] = []
                floor: list[float] = []
                for i in range(args.warmup_launches + args.launches):
                    order = ("ours", "floor") if i % 2 == 0 else ("floor", "ours")
                    got = {}
                    for which in order:
                        if which == "ours":
                            got[which] = launch_ours(name, gw, args.timeout)[0]
                        else:
                            got[which] = launch_floor(client, image, argv, Path(tmp), labels, args.timeout)[0]
                    if i >= args.warmup_launches:
                        ours.append(got["ours"])
                        floor.append(got["floor"])
                    log(f"{name}: ours {ms(got['ours'])} ms, floor {ms(got['floor'])} ms")
                first = first_execute(name, language, gw, args.timeout)
                p50, floor_p50 = percentile(ours, 0.5), percentile(floor, 0.5)
                results[name] = {
                    "image": image,
                    "language": language,
                    "launch_p50_ms": ms(p50),
                    "floor_launch_p50_ms": ms(floor_p50),
                    "launch_ratio": round(p50 / floor_p50, 3),
                    "first_exec_ms": ms(first),
                    "launches": len(ours),
                }
                log(f"{name}: {json.dumps(results[name])}")
    finally:
        for c in client.containers.list(all=True, filters={"label": f"{FLOOR_RUN_LABEL}={run_id}"}):
            remove_container(client, c.name)
    return {
        "languages": results,
        "target_ratio": TARGET_RATIO,
        "targets_met": {n: r["launch_ratio"] <= TARGET_RATIO for n, r in results.items()},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--launches", type=int, default=3, help="timed cold launches of each kind per language")
    p.add_argument("--warmup-launches", type=int, default=1, help="untimed launch pairs first, per language")
    p.add_argument(
        "--languages", nargs="*", default=[], help="kernelspec names (or their part after backendai-)"
    )
    p.add_argument("--gateway-url", default="", help="gateway URL; overrides the client config")
    p.add_argument("--client-config", default="", help="client config file; the default one when empty")
    p.add_argument("--timeout", type=float, default=180.0, help="seconds one launch or execute may take")
    args = p.parse_args(argv)
    try:
        out = run(args)
    except BenchmarkError as e:
        log(f"error: {e}")
        return 1
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
