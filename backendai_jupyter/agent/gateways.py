"""The gateways an agent may register with: their URLs, and the order it tries them in.

An agent lists one gateway URL or several: replicas of one gateway on one database, any of which
can take any agent. It links to the first that answers, earlier ones preferred. When a link it
registered on drops, it tries the others at once; while none answers, it goes round all of them,
pausing between rounds (the pause grows up to ``AGENT_RECONNECT_MAX``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import TypeVar
from urllib.parse import urlsplit, urlunsplit

T = TypeVar("T")

DEFAULT_GATEWAY_URL = "http://127.0.0.1:8470"
# How long an attempt has to itself before the next gateway is tried beside it: a gateway whose
# host vanished without a trace delays the others by this much, not by a whole connect timeout.
CONNECT_STAGGER = 1.0


def split_gateway_urls(text: str) -> list[str]:
    """The URLs of a comma-separated list, as BACKENDAI_GATEWAY_URL and --gateway-url take them."""
    return [url.strip() for url in text.split(",") if url.strip()]


def check_gateway_urls(urls: Iterable[str]) -> list[str]:
    """``urls`` in order, each once and normalised; a ValueError names the first unusable one."""
    checked = [_check(url) for url in urls]
    if not checked:
        raise ValueError(
            "no gateway URL: give --gateway-url=URL (several: comma-separated), or set BACKENDAI_GATEWAY_URL"
        )
    return list(dict.fromkeys(checked))


def _check(url: str) -> str:
    example = "write it like https://gw.example.org:8470"
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or any(c.isspace() for c in url):
        raise ValueError(f"gateway URL {url!r} is not an http:// or https:// URL with a host; {example}")
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0:
        raise ValueError(f"gateway URL {url!r} has no valid port (1-65535); {example}")
    if parts.query or parts.fragment:
        raise ValueError(f"gateway URL {url!r} has a query or fragment; give the gateway's base URL")
    return urlunsplit(parts).rstrip("/")


def others(urls: Sequence[str], lost: str) -> list[str]:
    """The gateways to try at once after the link to ``lost`` dropped: the rest, from the next one on."""
    i = urls.index(lost)
    return [*urls[i + 1 :], *urls[:i]]


async def first_to_answer(
    urls: Sequence[str],
    connect: Callable[[str], Awaitable[T]],
    discard: Callable[[T], object],
    stagger: float = CONNECT_STAGGER,
) -> tuple[str, T] | None:
    """Connect to the first of ``urls`` that answers, earlier ones preferred; None when none does.

    Each attempt has ``stagger`` seconds to itself before the next one starts beside it, and a
    failed attempt starts the next one at once. ``connect`` reports its own failures (they end
    its attempt and nothing else). Attempts still under way when one succeeds are left to finish,
    not cancelled (a cancelled handshake can still complete, unseen): a link one of them opens
    after all goes to ``discard``.
    """
    waiting = list(urls)
    attempts: dict[asyncio.Future[T], str] = {}
    pending: set[asyncio.Future[T]] = set()
    try:
        while waiting or pending:
            if waiting:
                url = waiting.pop(0)
                attempt = asyncio.ensure_future(connect(url))
                attempts[attempt] = url
                pending.add(attempt)
            done, pending = await asyncio.wait(
                pending, timeout=stagger if waiting else None, return_when=asyncio.FIRST_COMPLETED
            )
            # Of those done together, the earliest in the list wins; any other link is discarded.
            won = [t for t in attempts if t in done and not t.exception()]
            if won:
                for extra in won[1:]:
                    discard(extra.result())
                return attempts[won[0]], won[0].result()
        return None
    finally:
        for late in pending:
            late.add_done_callback(lambda t: t.cancelled() or t.exception() or discard(t.result()))
