"""Small helpers for talking to kernels in tests."""

from __future__ import annotations

from typing import Any

from jupyter_client.blocking.client import BlockingKernelClient
from jupyter_client.manager import KernelManager


def client(km: KernelManager) -> BlockingKernelClient:
    kc = km.client()
    kc.start_channels()
    kc.wait_for_ready(timeout=60)
    return kc


def run(
    kc: BlockingKernelClient, code: str, timeout: float = 60
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Execute ``code``; return the execute_reply content and the IOPub messages it produced."""
    outputs: list[dict[str, Any]] = []
    reply = kc.execute_interactive(code, output_hook=outputs.append, timeout=timeout)
    return reply["content"], outputs


def stdout(outputs: list[dict[str, Any]]) -> str:
    return "".join(
        m["content"]["text"]
        for m in outputs
        if m["msg_type"] == "stream" and m["content"]["name"] == "stdout"
    )
