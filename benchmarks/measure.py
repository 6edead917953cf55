"""What the benchmarks share: their error type, progress output and percentiles."""

from __future__ import annotations

import math
import subprocess
import sys
import time
from pathlib import Path


class BenchmarkError(Exception):
    """The benchmark cannot run; the message says why."""


def log(msg: str) -> None:
    """Progress goes to stderr: stdout carries only the JSON result."""
    print(msg, file=sys.stderr, flush=True)


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) with linear interpolation between the closest ranks."""
    if not values:
        return math.nan
    s = sorted(values)
    k = (len(s) - 1) * q
    lo = math.floor(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def start_gateway(
    cmd: list[str],
    log_path: Path,
    timeout: float,
    env: dict[str, str] | None = None,
    name: str = "the gateway",
) -> subprocess.Popen[bytes]:
    """Start a gateway process logging to ``log_path``; return it once it says it is ready."""
    out = open(log_path, "wb")  # noqa: SIM115 (the process keeps it)
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchmarkError(f"{name} exited: {log_path.read_text()[-2000:]}")
        if b"gateway ready at" in log_path.read_bytes():
            return proc
        time.sleep(0.05)
    raise BenchmarkError(f"{name} did not start in {timeout} s: {log_path.read_text()[-2000:]}")
