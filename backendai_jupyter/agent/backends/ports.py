"""Host ports for kernels, from a configured range, never two kernels on one port.

For backends that publish a kernel's ports on its agent's host (Docker).
"""

from __future__ import annotations

import socket


class PortsExhausted(Exception):
    """No free ports are left in the range."""


class PortPool:
    """Hands out host ports from ``[low, high]`` that nothing else on the host holds."""

    def __init__(self, low: int, high: int, bind_host: str) -> None:
        self.low, self.high = low, high
        self.bind_host = bind_host
        self.used: set[int] = set()
        self._next = low

    def _free_on_host(self, port: int) -> bool:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            # Connections a removed kernel left in TIME_WAIT must not make its port look taken
            # (a restart reuses the ports); a live listener still makes bind() fail.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((self.bind_host, port))
            except OSError:
                return False
        return True

    def take(self, count: int) -> list[int]:
        """``count`` ports, marked used until :meth:`give_back`."""
        got: list[int] = []
        span = self.high - self.low + 1
        for _ in range(span):
            port = self._next
            self._next = self.low + (self._next - self.low + 1) % span
            if port not in self.used and self._free_on_host(port):
                got.append(port)
                self.used.add(port)
                if len(got) == count:
                    return got
        self.give_back(got)
        raise PortsExhausted(f"no {count} free ports left in {self.low}-{self.high}")

    def take_exactly(self, ports: list[int]) -> bool:
        """Take these very ports if all are in range and free; else take none."""
        if not all(
            self.low <= p <= self.high and p not in self.used and self._free_on_host(p) for p in ports
        ):
            return False
        self.used.update(ports)
        return True

    def claim(self, ports: list[int]) -> None:
        """Mark ports as used (a recovered kernel already holds them)."""
        self.used.update(ports)

    def give_back(self, ports: list[int]) -> None:
        self.used.difference_update(ports)
