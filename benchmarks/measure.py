"""What the benchmarks share: their error type, progress output and percentiles."""

from __future__ import annotations

import math
import sys


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
