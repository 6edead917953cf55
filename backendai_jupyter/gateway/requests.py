"""Typed request models: each /v1 body is validated once, at the handler, into one of these.

A handler turns the request's JSON bytes into a model (:meth:`ApiHandler.body_as
<.handlers.base.ApiHandler.body_as>`, which calls :meth:`RequestModel.from_body`) and hands the
model on: a service never sees a body whose shape it would have to check again. What is left to
the services is what needs state (does the image exist, does the policy allow it, is the name
free). The vfolder bodies are in :mod:`.vfolders.requests`.

The wire types are pydantic v2 models, for:

- precise errors: each problem comes with where it is (``mounts[1].mode``), and :func:`describe`
  turns them into the sentence of our 400, never a stack trace or pydantic's own dump;
- JSON Schema export, which the tests hold against the request schemas of ``openapi.yaml``;
- strict mode: JSON's own types and no others (``"false"`` is not false, ``"3"`` is not 3, a
  float is not a count), checked while the bytes are parsed;
- pydantic-core's speed: parsing and validation in one pass, in Rust.

msgspec is faster still, but its errors say less about where a problem is and its schema tooling
is thinner.

Fields a model does not know are ignored, as ``openapi.yaml`` promises: a newer client may send a
field an older gateway does not know yet.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal, NamedTuple, Self

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    WrapValidator,
    field_validator,
)
from pydantic_core import ErrorDetails, PydanticCustomError

from ..common.errors import InvalidRequest
from ..common.kernelenv import is_denied
from ..common.slots import ResourceSlot, SlotError, format_amount
from .scheduler import validate_request

ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
KEY_RE = re.compile(r"^[A-Za-z0-9_-]{16,128}$")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
NAME_RULE = "1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
MAX_ENV_VALUE = 4096
MAX_ENV_ENTRIES = 128
MAX_SESSION_NAME = 128
MAX_MOUNTS = 32
MAX_PATH = 4096
# What the database columns hold: counts are INTEGER (32 bits in PostgreSQL), sizes BIGINT.
MAX_COUNT = 2**31 - 1
MAX_BYTES = 2**63 - 1
# A 400 names this many problems of a body at most.
MAX_PROBLEMS = 5


class RequestModel(BaseModel):
    """A request body: JSON's own types only, unknown fields ignored, immutable once validated."""

    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)

    @classmethod
    def from_body(cls, body: bytes, **context: Any) -> Self:
        """The model of a request's JSON body (no body at all is ``{}``).

        ``context`` is what the model's validators need beyond the body (the session's resource
        rules). Raises :class:`InvalidRequest` naming each field that is wrong and why.
        """
        try:
            return cls.model_validate_json(body or b"{}", context=context)
        except ValidationError as e:
            raise InvalidRequest(describe(e)) from None

    @classmethod
    def from_json(cls, body: object, **context: Any) -> Self:
        """The model of an already decoded JSON value, checked exactly as a request's body is."""
        return cls.from_body(json.dumps(body).encode(), **context)

    def given(self, field: str) -> bool:
        """Whether the body had ``field`` at all (for bodies where leaving a field out keeps it)."""
        return field in self.model_fields_set


# -- errors ----------------------------------------------------------------------------------------

# Pydantic's error types in our words, as what the field must be; ``got`` is the value sent.
_PHRASES = {
    "missing": "is required",
    "bool_type": "must be true or false (a JSON boolean), got {got}",
    "string_type": "must be a string, got {got}",
    "int_type": "must be a whole number, got {got}",
    "int_from_float": "must be a whole number, got {got}",
    "dict_type": "must be an object, got {got}",
    "model_type": "must be an object, got {got}",
    "list_type": "must be a list, got {got}",
    "tuple_type": "must be a list, got {got}",
    "literal_error": "must be {expected}, got {got}",
    "string_too_long": "must be at most {max_length} characters",
    "too_long": "must have at most {max_length} items",
    "greater_than_equal": "must be at least {ge}",
    "less_than_equal": "must be at most {le}",
}
# A message that reads on from the field's name follows it ("env must be an object"); any other
# is a detail of the field ("resources: cpu: cannot read 'x' as a number").
_READS_ON = ("must ", "is ", "has ", "cannot ")
_PLAIN_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")


def describe(e: ValidationError) -> str:
    """What is wrong with a body, one clause per problem, each naming its field."""
    problems = [_problem(err) for err in e.errors(include_url=False)]
    title = "; ".join(problems[:MAX_PROBLEMS])
    if len(problems) > MAX_PROBLEMS:
        title += f" (and {len(problems) - MAX_PROBLEMS} more)"
    return title


def _problem(err: ErrorDetails) -> str:
    kind, loc, ctx = err["type"], err["loc"], err.get("ctx", {})
    if not loc and kind == "json_invalid":
        return f"the request body is not valid JSON ({ctx.get('error', 'unreadable')})"
    if not loc and kind == "model_type":
        return "the request body must be a JSON object"
    if kind == "value_error":
        text = str(ctx["error"])
    elif kind == "string_too_short":
        text = "cannot be empty"
    elif kind in _PHRASES:
        text = _PHRASES[kind].format(**ctx, got=shown(err["input"]))
    else:  # our own (PydanticCustomError) messages, and pydantic's for anything not listed above
        text = err["msg"]
    where = _where(loc)
    return f"{where} {text}" if text.startswith(_READS_ON) else f"{where}: {text}"


def _where(loc: tuple[int | str, ...]) -> str:
    """``mounts[1].mode``, ``env['A B']``: a field's place in the body."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _PLAIN_NAME.match(part):
            out += f".{part}" if out else part
        else:
            out += f"[{part!r}]"
    return out or "the request body"


def shown(value: object, limit: int = 48) -> str:
    """A value as a message quotes it: its repr, cut short."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# -- field types ---------------------------------------------------------------------------------


def null_is(default: object) -> WrapValidator:
    """For ``Annotated[T, null_is(x)]``: a null sent for the field means ``x``, as leaving it out does."""

    def check(value: object, handler: Callable[[object], object]) -> object:
        return copy.copy(default) if value is None else handler(value)

    return WrapValidator(check)


def not_null(kind: Any) -> BeforeValidator:
    """For ``Annotated[T | None, not_null(T)]``: the field may be left out (``None``), but a null
    sent for it is refused as ``T`` refuses it."""
    adapter: TypeAdapter[Any] = TypeAdapter(kind, config=ConfigDict(strict=True))

    def check(value: object) -> object:
        if value is None:
            adapter.validate_python(value)  # raises, saying what the field must be
        return value

    return BeforeValidator(check)


def expect(predicate: str) -> WrapValidator:
    """Any problem with the field's value itself is told as ``predicate`` ("must be ..."); problems
    inside it (an item of a list) keep their own message."""

    def check(value: object, handler: Callable[[object], object]) -> object:
        try:
            return handler(value)
        except ValidationError as e:
            if any(err["loc"] for err in e.errors()):
                raise
            raise PydanticCustomError(
                "expected", "{predicate}, got {got}", {"predicate": predicate, "got": shown(value)}
            ) from None

    return WrapValidator(check)


def _slots(value: object) -> ResourceSlot:
    if value is None:
        return ResourceSlot()
    if not isinstance(value, dict):
        raise ValueError('must be an object of slot amounts, e.g. {"cpu": "2", "mem": "4g"}')
    return ResourceSlot.parse(value)  # SlotError, a ValueError, names the slot


_AMOUNTS_SCHEMA = {"type": "object", "additionalProperties": {"type": ["string", "number"]}}
# Slot name to amount ("cpu": "2", "mem": "4g"); null or left out: no slots.
Slots = Annotated[
    ResourceSlot,
    PlainValidator(_slots),
    WithJsonSchema({"anyOf": [_AMOUNTS_SCHEMA, {"type": "null"}]}),
]


def _byte_size(value: object) -> int:
    amount: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValueError("must be >= 0 bytes")
        amount = value
    elif isinstance(value, str):
        try:
            slots = ResourceSlot.parse({"mem": value.replace(" ", "").replace("iB", "").replace("B", "")})
            amount = int(slots["mem"])
        except (SlotError, KeyError):
            pass
    if amount is None:
        raise ValueError(f"must be a number of bytes or a size such as '10g' or '500m', got {shown(value)}")
    if amount > MAX_BYTES:
        raise ValueError(f"must be at most {MAX_BYTES} bytes (8 EiB)")
    return amount


# A size in bytes: a whole number, or a string with a unit ("10g", "500m", "2 GiB").
ByteSize = Annotated[
    int,
    PlainValidator(_byte_size),
    WithJsonSchema({"anyOf": [{"type": "integer", "minimum": 0}, {"type": "string", "minLength": 1}]}),
]


def parse_bytes(value: object, field: str) -> int:
    """A size in bytes outside a body (a configured quota); :class:`InvalidRequest` naming ``field``."""
    try:
        return _byte_size(value)
    except ValueError as e:
        raise InvalidRequest(f"{field} {e}") from None


def _env(env: dict[str, str]) -> dict[str, str]:
    if len(env) > MAX_ENV_ENTRIES:
        raise ValueError(f"has {len(env)} entries; at most {MAX_ENV_ENTRIES} are allowed")
    for k, v in env.items():
        if not ENV_NAME_RE.match(k):
            raise ValueError(f"{k!r} is not a valid variable name")
        if is_denied(k):
            raise ValueError(f"{k} is set by the agent from what the gateway allocated; leave it out")
        if len(v) > MAX_ENV_VALUE or "\0" in v or "\n" in v or "\r" in v:
            raise ValueError(f"{k} must be at most {MAX_ENV_VALUE} characters without NUL or newlines")
    return env


# Environment variables for a kernel. The loader's and drivers' (``LD_PRELOAD``,
# ``NVIDIA_VISIBLE_DEVICES``, ...) are refused: the agent sets them from what the gateway allocated.
Env = Annotated[dict[str, str], AfterValidator(_env)]


class _KernelEnv(RequestModel):
    env: Annotated[Env, null_is({})] = Field(default_factory=dict)


def validate_env(env: object) -> dict[str, str]:
    """A kernel's environment given outside a /v1 body (the Kernel Gateway API), checked as in one."""
    return _KernelEnv.from_json({"env": env}).env


def _stripped(value: str) -> str:
    if not value.strip():
        raise ValueError("is blank")
    return value.strip()


def _key(value: str) -> str:
    if not KEY_RE.match(value):
        raise ValueError("must be 16-128 letters, digits, '-' or '_' (or left out)")
    return value


def _no_nul(value: str) -> str:
    if "\0" in value:
        raise ValueError("cannot contain NUL")
    return value


def _user_name(value: str) -> str:
    if not NAME_RE.match(value):
        raise ValueError(NAME_RULE)
    return value


class MountRef(NamedTuple):
    """A vfolder to mount into a kernel: its name or id, and how."""

    name: Annotated[str, Field(min_length=1)]
    mode: Literal["ro", "rw"] = "rw"


def _mounts(value: object) -> object:
    # The JSON array, handed on by null_is as a Python list, is kept as the tuple it becomes.
    return tuple(value) if isinstance(value, list) else value


def _mount(item: object) -> object:
    if isinstance(item, str):
        return {"name": item}
    if isinstance(item, dict):
        if "name" not in item and "id" in item:  # {"id": ...} names it as well
            item = {**item, "name": item["id"]}
        return {k: item[k] for k in ("name", "mode") if k in item}
    raise ValueError(f'must be a vfolder name, or {{"name": NAME, "mode": "ro" or "rw"}}, got {shown(item)}')


_MOUNT_SCHEMA = {
    "oneOf": [
        {"type": "string", "minLength": 1},
        {
            "type": "object",
            "required": ["name"],
            "properties": {
                "name": {"type": "string", "minLength": 1},
                "mode": {"type": "string", "enum": ["ro", "rw"], "default": "rw"},
            },
        },
    ]
}
# vfolders by name or id, each read-write, or {"name": ..., "mode": "ro" or "rw"}.
Mounts = Annotated[
    tuple[Annotated[MountRef, BeforeValidator(_mount), WithJsonSchema(_MOUNT_SCHEMA)], ...],
    Field(max_length=MAX_MOUNTS),
    BeforeValidator(_mounts),
]
Count = Annotated[
    Annotated[int, Field(ge=0, le=MAX_COUNT)] | None,
    expect(f"must be a whole number from 0 to {MAX_COUNT} (or null for no limit)"),
]
PolicyName = Annotated[str | None, expect("must be a policy name (a string) or null")]


# -- sessions --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResourceRules:
    """The operator's resource settings: defaults for what a request leaves out, maxima a request
    is clamped to, and minima it must reach (``Gateway.default/max/min_resources``)."""

    default: ResourceSlot
    maximum: ResourceSlot
    minimum: ResourceSlot

    def apply(self, requested: ResourceSlot) -> ResourceSlot:
        """What a session gets for ``requested``, or :class:`SlotError` naming the slot."""
        resources = ResourceSlot({**self.default, **requested}).clamp(self.maximum)
        validate_request(resources)
        # A zero (or a sliver) would start a container with no limit at all, not an empty one.
        for slot, amount in sorted(resources.items()):
            least = self.minimum.get(slot)
            if least is not None and amount < least:
                raise SlotError(
                    f"{slot} {format_amount(slot, amount)} is below the minimum of "
                    f"{format_amount(slot, least)} per session; ask for at least that much"
                )
            if amount == 0:
                raise SlotError(f"{slot} is 0; ask for more than 0 or leave {slot} out")
        return resources


class SessionRequest(RequestModel):
    """POST /v1/sessions: a kernel session to create.

    Its resources are settled while it is validated: the operator's :class:`ResourceRules`, passed
    as ``rules``, fill in the defaults, clamp to the maxima and refuse what falls below a minimum.
    They are part of validation, not a step after it, so that no SessionRequest exists with
    resources the gateway would not grant, and their refusals read like every other field's.
    """

    image: Annotated[str, AfterValidator(_stripped), expect("is required (e.g. 'backendai-jupyter/python')")]
    name: Annotated[str, Field(max_length=MAX_SESSION_NAME), null_is("")] = ""
    resources: Slots = Field(default_factory=ResourceSlot, validate_default=True)
    env: Annotated[Env, null_is({})] = Field(default_factory=dict)
    # The id of an ended session this one replaces.
    restart_of: str | None = None
    # The kernel's HMAC key, when the client chooses it ("" for one of the gateway's).
    key: Annotated[str, AfterValidator(_key), null_is("")] = ""
    bound_to_stream: bool = False
    mounts: Annotated[Mounts, null_is(())] = ()
    # Where the kernel starts, a path in the container.
    working_dir: Annotated[str, Field(max_length=MAX_PATH), AfterValidator(_no_nul), null_is("")] = ""

    @field_validator("resources")
    @classmethod
    def _settle(cls, requested: ResourceSlot, info: ValidationInfo) -> ResourceSlot:
        rules = (info.context or {}).get("rules")
        if not isinstance(rules, ResourceRules):
            raise TypeError(
                "a SessionRequest is validated with the gateway's rules: from_body(body, rules=...)"
            )
        return rules.apply(requested)


class SignalRequest(RequestModel):
    """POST /v1/sessions/{id}/signal (which signals a kernel may be sent is the session service's)."""

    signal: str


# -- admin ---------------------------------------------------------------------------------------


class UserCreate(RequestModel):
    """POST /v1/admin/users."""

    name: Annotated[str, AfterValidator(_user_name)]
    is_admin: bool = False
    policy: PolicyName = None


class UserPatch(RequestModel):
    """PATCH /v1/admin/users/{name}: only the fields sent change (``policy: null`` removes it)."""

    disabled: Annotated[bool | None, not_null(bool)] = None
    policy: PolicyName = None


class PolicySpec(RequestModel):
    """PUT /v1/admin/policies/{name}: a resource policy, whole (a field left out or null: no limit)."""

    max_sessions: Count = None
    max_session_resources: Slots = Field(default_factory=ResourceSlot)
    total_resources: Slots = Field(default_factory=ResourceSlot)
    # Image names or patterns; none: any image.
    allowed_images: Annotated[list[Annotated[str, Field(min_length=1)]], null_is([])] = Field(
        default_factory=list
    )
    max_vfolders: Count = None
    max_quota_bytes: ByteSize | None = None
