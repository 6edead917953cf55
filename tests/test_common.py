"""The shared pieces: exact resource arithmetic, request signing, the state machine, placement."""

from __future__ import annotations

from decimal import Decimal

import pytest

from backendai_jupyter.common import signing
from backendai_jupyter.common.slots import ResourceSlot, SlotError
from backendai_jupyter.common.states import SessionState, is_forward
from backendai_jupyter.gateway.scheduler import Allocation, Cluster


def test_sizes_parse_to_exact_bytes_and_cpu_stays_decimal():
    slots = ResourceSlot.parse({"cpu": "0.1", "mem": "1.5g"})
    assert slots["mem"] == Decimal(3 * 2**29)
    assert slots["cpu"] == Decimal("0.1")
    three = slots + slots + slots
    assert three["cpu"] == Decimal("0.3")  # no float drift
    assert three.to_json() == {"cpu": "0.3", "mem": str(9 * 2**29)}


@pytest.mark.parametrize(
    "bad", [{"mem": "lots"}, {"cpu": "-1"}, {"cpu": True}, {"BAD NAME": 1}, {"cpu": "nan"}]
)
def test_bad_amounts_are_refused_with_the_slot_named(bad):
    with pytest.raises(SlotError) as e:
        ResourceSlot.parse(bad)
    assert list(bad)[0].split()[0].lower() in str(e.value).lower()


def test_clamp_and_shortfall():
    req = ResourceSlot.parse({"cpu": 8, "mem": "64g"})
    assert req.clamp(ResourceSlot.parse({"cpu": 4})) == ResourceSlot.parse({"cpu": 4, "mem": "64g"})
    assert req.shortfall(ResourceSlot.parse({"cpu": 16, "mem": "8g"})) == ["mem"]


def test_signature_covers_method_path_body_and_nonce():
    ak, sk = signing.new_keypair()
    h = signing.sign(ak, sk, "POST", "/v1/sessions", b'{"image": "x"}')
    got_ak, sig = signing.parse_authorization(h["Authorization"])
    assert got_ak == ak
    date, nonce = h[signing.DATE_HEADER], h[signing.NONCE_HEADER]
    signing.verify(sk, sig, "POST", "/v1/sessions", date, b'{"image": "x"}', nonce)
    for method, path, body, n in [
        ("DELETE", "/v1/sessions", b'{"image": "x"}', nonce),
        ("POST", "/v1/agents", b'{"image": "x"}', nonce),
        ("POST", "/v1/sessions", b'{"image": "y"}', nonce),
        ("POST", "/v1/sessions", b'{"image": "x"}', signing.new_nonce()),
    ]:
        with pytest.raises(signing.SignatureError):
            signing.verify(sk, sig, method, path, date, body, n)
    with pytest.raises(signing.SignatureError):
        signing.verify("other-secret", sig, "POST", "/v1/sessions", date, b'{"image": "x"}', nonce)


def test_each_signing_makes_a_new_nonce_and_one_is_required():
    ak, sk = signing.new_keypair()
    first, second = (signing.sign(ak, sk, "GET", "/v1/sessions") for _ in range(2))
    assert first[signing.NONCE_HEADER] != second[signing.NONCE_HEADER]
    _, sig = signing.parse_authorization(first["Authorization"])
    with pytest.raises(signing.SignatureError, match="Nonce is missing"):
        signing.verify(sk, sig, "GET", "/v1/sessions", first[signing.DATE_HEADER], b"", "")
    with pytest.raises(signing.SignatureError, match="URL-safe"):
        signing.verify(sk, sig, "GET", "/v1/sessions", first[signing.DATE_HEADER], b"", "short")


def test_stale_dates_are_refused():
    ak, sk = signing.new_keypair()
    h = signing.sign(ak, sk, "GET", "/v1/sessions")
    _, sig = signing.parse_authorization(h["Authorization"])
    with pytest.raises(signing.SignatureError, match="5 minutes"):
        signing.verify(
            sk, sig, "GET", "/v1/sessions", "2020-01-01T00:00:00+00:00", b"", h[signing.NONCE_HEADER]
        )


def test_states_only_move_forward():
    assert is_forward(SessionState.PENDING, SessionState.SCHEDULED)
    assert is_forward(SessionState.RUNNING, SessionState.ERROR)
    assert not is_forward(SessionState.RUNNING, SessionState.CREATING)
    assert not is_forward(SessionState.TERMINATED, SessionState.RUNNING)


def _cluster(*agents: tuple[str, str, str]) -> Cluster:
    c = Cluster()
    for aid, cpu, mem in agents:
        c.add_agent(aid, ResourceSlot.parse({"cpu": cpu, "mem": mem}), [], ["img:latest"])
    return c


def test_waiting_reasons_name_the_short_resource_or_the_split():
    c = _cluster(("a", "4", "8g"), ("b", "4", "8g"))
    c.allocate("x", Allocation("a", ResourceSlot.parse({"cpu": 3})))
    c.allocate("y", Allocation("b", ResourceSlot.parse({"cpu": 3, "mem": "6g"})))
    req = ResourceSlot.parse({"cpu": 2, "mem": "4g"})
    assert c.shortfall_reason(req, "img:latest") == "2 cpu requested, most free on any agent is 1"
    c.release("y")
    c.allocate("z", Allocation("b", ResourceSlot.parse({"mem": "6g"})))
    assert c.shortfall_reason(req, "img:latest") == "no single agent has cpu 2, mem 4 GiB free at once"
    assert c.shortfall_reason(req, "other:latest") == "no connected agent has the image other:latest"


def test_a_request_larger_than_every_agent_names_the_resource():
    c = _cluster(("a", "4", "8g"), ("b", "2", "16g"))
    assert c.exceeds_every_agent(ResourceSlot.parse({"cpu": 2, "mem": "12g"})) is None
    msg = c.exceeds_every_agent(ResourceSlot.parse({"mem": "64g"}))
    assert msg == "requested 64 GiB mem, but the largest agent has 16 GiB: ask for at most that"
