"""An agent's list of gateways: which URLs it takes, and in which order it tries them."""

from __future__ import annotations

import asyncio
import time

import pytest

from backendai_jupyter.agent.app import Agent
from backendai_jupyter.agent.gateways import check_gateway_urls, first_to_answer, others, split_gateway_urls

A, B, C = "http://gw-a:8470", "https://gw-b:8470", "http://10.0.0.7:8470"


def test_a_comma_separated_list_gives_each_url_once_in_order():
    assert split_gateway_urls(f" {A}, {B} ,,{C}/ ") == [A, B, f"{C}/"]
    assert check_gateway_urls([A, B, f"{C}/", A]) == [A, B, C]
    assert check_gateway_urls(["HTTPS://GW-B:8470"]) == ["https://GW-B:8470"]  # the scheme is case-blind
    assert check_gateway_urls(["https://gw.example.org/backendai/"]) == ["https://gw.example.org/backendai"]


@pytest.mark.parametrize(
    "bad",
    [
        "gw.example.org:8470",
        "ftp://gw.example.org",
        "ws://gw.example.org:8470",
        "http://",
        "http://:8470",
        "http://gw.example.org:99999",
        "http://gw.example.org:port",
        "http://gw.example.org/?x=1",
        "http://gw.example.org/#top",
        "http://gw example.org",
    ],
)
def test_a_bad_url_is_refused_by_name(bad: str):
    with pytest.raises(ValueError) as e:
        check_gateway_urls([A, bad])
    assert repr(bad) in str(e.value)


def test_no_url_at_all_is_refused_with_where_to_give_one():
    with pytest.raises(ValueError) as e:
        check_gateway_urls(split_gateway_urls(" , "))
    assert "--gateway-url" in str(e.value) and "BACKENDAI_GATEWAY_URL" in str(e.value)


def test_the_agent_reads_its_gateways_from_the_environment(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("BACKENDAI_GATEWAY_URL", raising=False)
    assert Agent().gateway_urls == ["http://127.0.0.1:8470"]
    monkeypatch.setenv("BACKENDAI_GATEWAY_URL", f"{A},{B}")
    assert Agent().gateway_urls == [A, B]
    monkeypatch.setenv("BACKENDAI_GATEWAY_URL", "gw-a:8470")
    with pytest.raises(ValueError, match="'gw-a:8470'"):
        Agent().gateway_urls  # noqa: B018 (the default is read, and checked, here)


def test_gateway_url_is_the_one_url_form_of_gateway_urls():
    assert Agent(gateway_url=A).gateway_urls == [A]
    assert Agent(gateway_url=f"{A},{B}").gateway_urls == [A, B]  # as in the environment
    assert Agent(gateway_urls=[B, C]).gateway_urls == [B, C]
    agent = Agent(gateway_urls=[B, C])
    agent.gateway_url = A  # what `up` does with its own gateway
    assert agent.gateway_urls == [A]


@pytest.mark.parametrize("urls", [[], [A, "ftp://gw-b"]])
def test_a_bad_gateway_list_in_the_config_is_refused(urls: list[str]):
    with pytest.raises(ValueError):
        Agent(gateway_urls=urls)


def test_after_a_lost_link_the_others_come_first_from_the_next_one_on():
    assert others([A, B, C], A) == [B, C]
    assert others([A, B, C], B) == [C, A]
    assert others([A, B, C], C) == [A, B]
    assert others([A], A) == []


class FakeGateways:
    """Connects that answer, fail or hang as told, and what became of each link."""

    def __init__(self, **behaviour: str) -> None:
        # name -> "ok", "fail", "late" (answers after 0.3 s) or "hang" (times out after 2 s)
        self.behaviour = behaviour
        self.tried: list[str] = []
        self.discarded: list[str] = []

    async def connect(self, url: str) -> str:
        self.tried.append(url)
        match self.behaviour[url]:
            case "fail":
                raise OSError("connection refused")
            case "hang":
                await asyncio.sleep(2)
                raise TimeoutError("connect timed out")
            case "late":
                await asyncio.sleep(0.3)
        return f"link to {url}"

    def discard(self, link: str) -> None:
        self.discarded.append(link)


async def test_the_first_url_that_answers_wins_earlier_ones_preferred():
    gws = FakeGateways(a="fail", b="ok", c="ok")
    assert await first_to_answer(["a", "b", "c"], gws.connect, gws.discard, stagger=1.0) == ("b", "link to b")
    assert gws.tried == ["a", "b"]  # a refusal moves on at once; c is never needed


async def test_a_gateway_that_hangs_delays_the_next_only_by_the_stagger():
    gws = FakeGateways(a="hang", b="hang", c="ok")
    start = time.monotonic()
    found = await first_to_answer(["a", "b", "c"], gws.connect, gws.discard, stagger=0.2)
    assert found == ("c", "link to c")
    assert 0.35 < time.monotonic() - start < 1.5


async def test_a_link_that_answers_after_the_winner_is_discarded():
    gws = FakeGateways(a="late", b="ok")
    found = await first_to_answer(["a", "b"], gws.connect, gws.discard, stagger=0.1)
    assert found == ("b", "link to b")
    await asyncio.sleep(0.5)
    assert gws.discarded == ["link to a"]


async def test_when_none_answers_each_was_tried_once():
    gws = FakeGateways(a="fail", b="fail")
    assert await first_to_answer(["a", "b"], gws.connect, gws.discard, stagger=1.0) is None
    assert gws.tried == ["a", "b"]
