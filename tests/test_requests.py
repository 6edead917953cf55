"""Request models parse any JSON into a model or a clear InvalidRequest, and nothing else."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backendai_jupyter.common.errors import InvalidRequest
from backendai_jupyter.common.slots import ResourceSlot
from backendai_jupyter.gateway.requests import (
    PolicySpec,
    ResourceRules,
    SessionRequest,
    SignalRequest,
    UserCreate,
    UserPatch,
)

RULES = ResourceRules(
    default=ResourceSlot.parse({"cpu": "1", "mem": "1g"}),
    maximum=ResourceSlot.parse({"cpu": "4"}),
    minimum=ResourceSlot.parse({"cpu": "0.1", "mem": "64m"}),
)
FIELDS = ["image", "name", "resources", "env", "restart_of", "key", "bound_to_stream", "signal"]
FIELDS += ["is_admin", "policy", "disabled", "max_sessions", "max_session_resources"]
FIELDS += ["total_resources", "allowed_images", "cpu", "mem", "cuda.device", "LD_PRELOAD"]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8) | st.sampled_from(FIELDS),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(FIELDS), inner, max_size=4),
    max_leaves=12,
)
bodies = st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=6)


@settings(max_examples=400, derandomize=True, database=None)
@given(body=bodies)
def test_any_json_body_parses_or_is_refused_with_invalid_request(body: dict[str, Any]):
    for parse in (
        lambda b: SessionRequest.from_json(b, RULES),
        SignalRequest.from_json,
        UserCreate.from_json,
        UserPatch.from_json,
        PolicySpec.from_json,
    ):
        try:
            parse(body)
        except InvalidRequest as e:
            assert e.status == 400 and e.title


@pytest.mark.parametrize("value", ["false", "true", 0, 1, None, [], {}])
def test_booleans_must_be_json_booleans(value: object):
    with pytest.raises(InvalidRequest, match="is_admin must be true or false"):
        UserCreate.from_json({"name": "ann", "is_admin": value})
    with pytest.raises(InvalidRequest, match="disabled must be true or false"):
        UserPatch.from_json({"disabled": value})
    with pytest.raises(InvalidRequest, match="bound_to_stream must be true or false"):
        SessionRequest.from_json({"image": "x", "bound_to_stream": value}, RULES)


def test_a_user_patch_changes_only_what_it_names():
    assert UserPatch.from_json({}) == UserPatch(disabled=None, set_policy=False)
    assert UserPatch.from_json({"policy": None}) == UserPatch(set_policy=True, policy=None)
    assert UserPatch.from_json({"disabled": True}).disabled is True


def test_resources_take_defaults_are_clamped_and_must_reach_the_minimum():
    req = SessionRequest.from_json({"image": " img ", "resources": {"cpu": "8"}}, RULES)
    assert req.image == "img"
    assert req.resources == {"cpu": Decimal(4), "mem": Decimal(2**30)}
    with pytest.raises(InvalidRequest, match="cpu 0.05 is below the minimum of 0.1"):
        SessionRequest.from_json({"image": "x", "resources": {"cpu": "0.05"}}, RULES)
    with pytest.raises(InvalidRequest, match="cuda.device is 0"):
        SessionRequest.from_json({"image": "x", "resources": {"cuda.device": 0}}, RULES)
    at_least = SessionRequest.from_json({"image": "x", "resources": {"cpu": "0.1", "mem": "64m"}}, RULES)
    assert at_least.resources == {"cpu": Decimal("0.1"), "mem": Decimal(64 * 2**20)}


@pytest.mark.parametrize("name", ["LD_PRELOAD", "ld_library_path", "NVIDIA_VISIBLE_DEVICES", "HOME"])
def test_variables_the_agent_sets_are_refused(name: str):
    with pytest.raises(InvalidRequest, match=f"{name} is set by the agent"):
        SessionRequest.from_json({"image": "x", "env": {name: "v"}}, RULES)


def test_policy_limits_are_typed():
    spec = PolicySpec.from_json({"max_sessions": 2, "total_resources": {"cpu": 4}})
    assert spec.max_sessions == 2 and spec.total_resources == {"cpu": Decimal(4)}
    assert PolicySpec.from_json({}).allowed_images == []
    for bad in ({"max_sessions": True}, {"max_sessions": 1.5}, {"allowed_images": [""]}):
        with pytest.raises(InvalidRequest):
            PolicySpec.from_json(bad)
