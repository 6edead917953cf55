"""Request models parse any JSON into a model or a clear InvalidRequest, and nothing else.

Each /v1 body's model is held against the request schema ``openapi.yaml`` documents for it.
"""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import backendai_jupyter.gateway
from backendai_jupyter.common.errors import InvalidRequest
from backendai_jupyter.common.slots import ResourceSlot
from backendai_jupyter.common.wire import KERNEL_HOME
from backendai_jupyter.gateway.requests import (
    MAX_PROBLEMS,
    PolicySpec,
    RequestModel,
    ResourceRules,
    SessionRequest,
    SignalRequest,
    UserCreate,
    UserPatch,
    validate_env,
)
from backendai_jupyter.gateway.vfolders.requests import (
    AcceptInvitation,
    Copy,
    Invite,
    Mkdir,
    Move,
    ShareUpdate,
    UploadStart,
    VFolderCreate,
    VFolderPatch,
)

RULES = ResourceRules(
    default=ResourceSlot.parse({"cpu": "1", "mem": "1g"}),
    maximum=ResourceSlot.parse({"cpu": "4"}),
    minimum=ResourceSlot.parse({"cpu": "0.1", "mem": "64m"}),
)
# Every JSON body /v1 takes: the operation as openapi.yaml names it, and its model.
BODIES: dict[tuple[str, str], type[RequestModel]] = {
    ("post", "/v1/sessions"): SessionRequest,
    ("post", "/v1/sessions/{sid}/signal"): SignalRequest,
    ("post", "/v1/admin/users"): UserCreate,
    ("patch", "/v1/admin/users/{name}"): UserPatch,
    ("put", "/v1/admin/policies/{name}"): PolicySpec,
    ("post", "/v1/vfolders"): VFolderCreate,
    ("patch", "/v1/vfolders/{vid}"): VFolderPatch,
    ("post", "/v1/vfolders/invitations/{iid}/accept"): AcceptInvitation,
    ("post", "/v1/vfolders/{vid}/invitations"): Invite,
    ("put", "/v1/vfolders/{vid}/shares/{user}"): ShareUpdate,
    ("post", "/v1/vfolders/{vid}/mkdir"): Mkdir,
    ("post", "/v1/vfolders/{vid}/move"): Move,
    ("post", "/v1/vfolders/{vid}/copy"): Copy,
    ("post", "/v1/vfolders/{vid}/uploads"): UploadStart,
}
MODELS = sorted(set(BODIES.values()), key=lambda m: m.__name__)


def parse(model: type[RequestModel], body: Any) -> RequestModel:
    return model.from_json(body, rules=RULES) if model is SessionRequest else model.from_json(body)


FIELDS = sorted(
    {name for m in MODELS for name in m.model_fields} | {"cpu", "mem", "cuda.device", "LD_PRELOAD"}
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8) | st.sampled_from(FIELDS),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(FIELDS), inner, max_size=4),
    max_leaves=12,
)
bodies = st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=6)


@settings(max_examples=300, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=bodies)
def test_any_json_body_parses_or_is_refused_with_invalid_request(body: dict[str, Any]):
    for model in MODELS:
        try:
            parse(model, body)
        except InvalidRequest as e:
            assert e.status == 400 and e.type == "invalid-request" and e.title
            assert "Input should" not in e.title and "pydantic" not in e.title, e.title


@pytest.mark.parametrize("value", ["false", "true", 0, 1, None, [], {}])
def test_booleans_must_be_json_booleans(value: object):
    with pytest.raises(InvalidRequest, match="is_admin must be true or false"):
        UserCreate.from_json({"name": "ann", "is_admin": value})
    with pytest.raises(InvalidRequest, match="disabled must be true or false"):
        UserPatch.from_json({"disabled": value})
    with pytest.raises(InvalidRequest, match="bound_to_stream must be true or false"):
        SessionRequest.from_json({"image": "x", "bound_to_stream": value}, rules=RULES)
    with pytest.raises(InvalidRequest, match="overwrite must be true or false"):
        Move.from_json({"src": "a", "dst": "b", "overwrite": value})


def test_a_user_patch_changes_only_what_it_names():
    empty = UserPatch.from_json({})
    assert empty.disabled is None and not empty.given("policy")
    cleared = UserPatch.from_json({"policy": None})
    assert cleared.given("policy") and cleared.policy is None
    assert UserPatch.from_json({"disabled": True}).disabled is True


def test_resources_take_defaults_are_clamped_and_must_reach_the_minimum():
    req = SessionRequest.from_json({"image": " img ", "resources": {"cpu": "8"}}, rules=RULES)
    assert req.image == "img"
    assert req.resources == {"cpu": Decimal(4), "mem": Decimal(2**30)}
    assert isinstance(req.resources, ResourceSlot)
    with pytest.raises(InvalidRequest, match="resources: cpu 0.05 is below the minimum of 0.1"):
        SessionRequest.from_json({"image": "x", "resources": {"cpu": "0.05"}}, rules=RULES)
    with pytest.raises(InvalidRequest, match="resources: cuda.device is 0"):
        SessionRequest.from_json({"image": "x", "resources": {"cuda.device": 0}}, rules=RULES)
    at_least = SessionRequest.from_json(
        {"image": "x", "resources": {"cpu": "0.1", "mem": "64m"}}, rules=RULES
    )
    assert at_least.resources == {"cpu": Decimal("0.1"), "mem": Decimal(64 * 2**20)}


def test_a_session_request_cannot_be_made_without_the_resource_rules():
    with pytest.raises(TypeError, match="rules"):
        SessionRequest.from_json({"image": "x"})


def test_a_session_request_has_the_attributes_the_session_service_reads():
    req = SessionRequest.from_json({"image": "img"}, rules=RULES)
    assert (req.name, req.env, req.restart_of, req.key, req.bound_to_stream) == ("", {}, None, "", False)
    assert (req.mounts, req.working_dir) == ((), "")
    full = SessionRequest.from_json(
        {
            "image": "img",
            "name": "n",
            "env": {"A": "1"},
            "restart_of": "sid",
            "key": "k" * 16,
            "bound_to_stream": True,
            "mounts": ["data", {"name": "ref", "mode": "ro"}, {"id": "by-id"}],
            "working_dir": f"{KERNEL_HOME}/data",
        },
        rules=RULES,
    )
    assert full.mounts == (("data", "rw"), ("ref", "ro"), ("by-id", "rw"))
    assert all(isinstance(m, tuple) for m in full.mounts)
    assert (full.name, full.env, full.restart_of, full.key) == ("n", {"A": "1"}, "sid", "k" * 16)
    assert full.bound_to_stream and full.working_dir == f"{KERNEL_HOME}/data"


def test_null_is_the_same_as_leaving_a_nullable_field_out():
    nulls = {f: None for f in ("name", "resources", "env", "restart_of", "key", "mounts", "working_dir")}
    assert SessionRequest.from_json({"image": "x", **nulls}, rules=RULES) == SessionRequest.from_json(
        {"image": "x"}, rules=RULES
    )
    nulls = {f: None for f in PolicySpec.model_fields}
    assert PolicySpec.from_json(nulls) == PolicySpec.from_json({})
    assert PolicySpec.from_json({}).allowed_images == []
    assert VFolderCreate.from_json({"name": "d", "quota": None, "volume": None}).quota is None
    assert AcceptInvitation.from_json({"name": None}).name is None


@pytest.mark.parametrize(
    "model, body, fragment",
    [
        (VFolderPatch, {"name": None}, "name must be a string, got None"),
        (VFolderPatch, {"quota": None}, "quota must be a number of bytes"),
        (UserPatch, {"disabled": None}, "disabled must be true or false"),
        (SessionRequest, {"image": None}, "image is required"),
        (Invite, {"user": "u", "permission": None}, "permission must be 'ro' or 'rw', got None"),
    ],
)
def test_a_field_that_may_be_left_out_may_not_be_null(model: type[RequestModel], body: Any, fragment: str):
    with pytest.raises(InvalidRequest, match=fragment):
        parse(model, body)


def test_fields_a_model_does_not_know_are_ignored():
    req = SessionRequest.from_json({"image": "x", "imagee": 5, "extra": {"a": []}}, rules=RULES)
    assert not hasattr(req, "imagee") and "imagee" not in req.model_dump()
    assert Move.from_json({"src": "a", "dst": "b", "force": True}).overwrite is False


def test_models_are_immutable():
    req = Copy.from_json({"src": "a", "dst": "b"})
    with pytest.raises(ValueError):
        req.src = "c"  # type: ignore[misc]


@pytest.mark.parametrize("name", ["LD_PRELOAD", "ld_library_path", "NVIDIA_VISIBLE_DEVICES", "HOME"])
def test_variables_the_agent_sets_are_refused(name: str):
    with pytest.raises(InvalidRequest, match=f"env: {name} is set by the agent"):
        SessionRequest.from_json({"image": "x", "env": {name: "v"}}, rules=RULES)
    with pytest.raises(InvalidRequest, match=f"env: {name} is set by the agent"):
        validate_env({name: "v"})


@pytest.mark.parametrize(
    "env, fragment",
    [
        ({f"V{i}": "" for i in range(129)}, "env has 129 entries; at most 128"),
        ({"1BAD": "x"}, "env: '1BAD' is not a valid variable name"),
        ({"A": "x" * 4097}, "env: A must be at most 4096 characters"),
        ({"A": "a\nb"}, "without NUL or newlines"),
        ({"A": 5}, "env.A must be a string, got 5"),
        (["A=1"], "env must be an object"),
    ],
)
def test_env_limits(env: Any, fragment: str):
    with pytest.raises(InvalidRequest, match=fragment):
        SessionRequest.from_json({"image": "x", "env": env}, rules=RULES)
    assert validate_env({f"V{i}": "x" * 4096 for i in range(128)})


def test_policy_limits_are_typed():
    spec = PolicySpec.from_json({"max_sessions": 2, "total_resources": {"cpu": 4}, "max_quota_bytes": "1g"})
    assert spec.max_sessions == 2 and spec.total_resources == {"cpu": Decimal(4)}
    assert spec.max_quota_bytes == 2**30 and spec.max_session_resources == {}
    for bad in (
        {"max_sessions": True},
        {"max_sessions": 1.5},
        {"max_sessions": 2**31},
        {"allowed_images": [""]},
    ):
        with pytest.raises(InvalidRequest):
            PolicySpec.from_json(bad)
    assert PolicySpec.from_json({"max_sessions": 2**31 - 1, "max_quota_bytes": 2**63 - 1}).max_sessions


@pytest.mark.parametrize(
    "model, body, fragment",
    [
        (SessionRequest, {"image": "x", "name": "n" * 129}, "name must be at most 128 characters"),
        (SessionRequest, {"image": "x", "mounts": ["m"] * 33}, "mounts must have at most 32 items"),
        (
            SessionRequest,
            {"image": "x", "mounts": [{"name": "m", "mode": "wx"}]},
            "mounts[0].mode must be 'ro'",
        ),
        (SessionRequest, {"image": "x", "mounts": ["a", 7]}, "mounts[1] must be a vfolder name"),
        (SessionRequest, {"image": "x", "key": "short"}, "key must be 16-128 letters"),
        (SessionRequest, {"image": "x", "working_dir": "x" * 4097}, "working_dir must be at most 4096"),
        (SessionRequest, {"image": "x", "resources": {"cpu": "many"}}, "resources: cpu: cannot read 'many'"),
        (VFolderCreate, {"name": "d", "quota": 0}, "quota must be more than 0 bytes"),
        (VFolderCreate, {"name": "d", "quota": 2**63}, "quota must be at most"),
        (VFolderCreate, {"name": "a/b"}, "name cannot contain '/'"),
        (VFolderCreate, {"name": "x" * 65}, "name must have at most 64 characters"),
        (VFolderCreate, {"name": ""}, "name is required"),
        (UploadStart, {"path": "f", "size": -1}, "size must be at least 0"),
        (UploadStart, {"path": "", "size": 1}, "path cannot be empty"),
        (Invite, {"user": ""}, "user cannot be empty"),
        (UserCreate, {"name": "-x"}, "name: 1-64 letters"),
        (UserCreate, {"name": "u", "policy": 5}, "policy must be a policy name"),
    ],
)
def test_limits_are_refused_naming_the_field(model: type[RequestModel], body: Any, fragment: str):
    with pytest.raises(InvalidRequest) as e:
        parse(model, body)
    assert fragment in e.value.title


def test_every_problem_is_named_up_to_a_limit():
    with pytest.raises(InvalidRequest) as e:
        Move.from_json({"src": 1, "dst": 2})
    assert e.value.title == "src must be a string, got 1; dst must be a string, got 2"
    with pytest.raises(InvalidRequest) as e:
        SessionRequest.from_json({"image": "x", "mounts": [1] * 10}, rules=RULES)
    assert e.value.title.count("must be a vfolder name") == MAX_PROBLEMS
    assert e.value.title.endswith(f"(and {10 - MAX_PROBLEMS} more)")


@pytest.mark.parametrize(
    "body, title",
    [
        (b"not json", "the request body is not valid JSON"),
        (b"\xff", "the request body is not valid JSON"),
        (b"[1, 2]", "the request body must be a JSON object"),
        (b'"text"', "the request body must be a JSON object"),
        (b"", "src is required; dst is required"),
    ],
)
def test_a_body_that_is_not_a_json_object_is_refused_as_such(body: bytes, title: str):
    with pytest.raises(InvalidRequest) as e:
        Copy.from_body(body)
    assert e.value.title.startswith(title)


def _resolve(spec: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        *_, section, name = schema["$ref"].split("/")
        schema = spec["components"][section][name]
    return schema


def _openapi() -> dict[str, Any]:
    return yaml.safe_load(Path(backendai_jupyter.gateway.__file__).with_name("openapi.yaml").read_text())


def test_every_json_body_of_the_api_has_a_model():
    spec = _openapi()
    documented = {
        (method, path)
        for path, item in spec["paths"].items()
        for method, op in item.items()
        if isinstance(op, dict) and "application/json" in op.get("requestBody", {}).get("content", {})
    }
    assert documented == set(BODIES)


@pytest.mark.parametrize("op", sorted(BODIES), ids=lambda op: f"{op[0]} {op[1]}")
def test_each_model_agrees_with_its_openapi_request_schema(op: tuple[str, str]):
    spec = _openapi()
    method, path = op
    documented = _resolve(
        spec, spec["paths"][path][method]["requestBody"]["content"]["application/json"]["schema"]
    )
    ours = BODIES[op].model_json_schema()
    assert ours["type"] == documented["type"] == "object"
    assert set(ours["properties"]) == set(documented["properties"]), op
    assert set(ours.get("required", [])) == set(documented.get("required", [])), op


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
def test_each_models_json_schema_is_json(model: type[RequestModel]):
    schema = model.model_json_schema()
    assert json.loads(json.dumps(schema)) == schema
