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


def execute_over_websocket(
    url: str,
    code: str,
    headers: dict[str, str] | None = None,
    subprotocol: str | None = None,
    ca_file: str = "",
) -> str:
    """Run ``code`` through a kernel's channels websocket (as JupyterLab or VS Code do); stdout."""
    import asyncio
    import json
    import ssl
    import uuid

    from jupyter_server.services.kernels.connection.base import (
        deserialize_msg_from_ws_v1,
        serialize_msg_to_ws_v1,
    )
    from tornado import httpclient, websocket

    async def go() -> str:
        ssl_options = ssl.create_default_context(cafile=ca_file) if ca_file else None
        req = httpclient.HTTPRequest(
            url.replace("http", "ws", 1), headers=headers or {}, ssl_options=ssl_options
        )
        conn = await websocket.websocket_connect(req, subprotocols=[subprotocol] if subprotocol else None)
        msg_id = uuid.uuid4().hex
        msg = {
            "header": {
                "msg_id": msg_id,
                "username": "t",
                "session": uuid.uuid4().hex,
                "msg_type": "execute_request",
                "version": "5.3",
                "date": "",
            },
            "parent_header": {},
            "metadata": {},
            "buffers": [],
            "content": {
                "code": code,
                "silent": False,
                "store_history": False,
                "user_expressions": {},
                "allow_stdin": False,
            },
        }
        if subprotocol:
            parts = [json.dumps(msg[k]).encode() for k in ("header", "parent_header", "metadata", "content")]
            conn.write_message(serialize_msg_to_ws_v1(parts, "shell"), binary=True)
        else:
            conn.write_message(json.dumps({**msg, "channel": "shell"}))
        text = ""
        replied = idle = False  # shell and IOPub are separate streams: wait for both ends
        while not (replied and idle):
            raw = await asyncio.wait_for(conn.read_message(), 60)
            assert raw is not None, "the websocket closed"
            if isinstance(raw, bytes):
                channel, parts = deserialize_msg_from_ws_v1(raw)
                reply = {
                    k: json.loads(p)
                    for k, p in zip(
                        ("header", "parent_header", "metadata", "content"), parts[:4], strict=False
                    )
                }
                reply["msg_type"] = reply["header"]["msg_type"]
            else:
                reply = json.loads(raw)
            if reply.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            if reply["msg_type"] == "stream":
                text += reply["content"]["text"]
            replied = replied or reply["msg_type"] == "execute_reply"
            idle = idle or (reply["msg_type"] == "status" and reply["content"]["execution_state"] == "idle")
        conn.close()
        return text

    return asyncio.run(go())
