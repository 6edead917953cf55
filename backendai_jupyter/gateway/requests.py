"""Typed request models: each /v1 body is parsed once, at the handler, strictly.

Every ``from_json`` takes the decoded JSON body and returns a model or raises
:class:`InvalidRequest` with a sentence that says what to send instead. Types are JSON's own:
a boolean is ``true`` or ``false`` (never ``"false"``, which Python would take as true), a
resource map is an object, a name is a string. Fields a model does not know are ignored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

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
# What the database columns hold: counts are INTEGER (32 bits in PostgreSQL), sizes BIGINT.
MAX_COUNT = 2**31 - 1
MAX_BYTES = 2**63 - 1


def _bool(body: dict[str, Any], field: str, default: bool = False) -> bool:
    value = body.get(field, default)
    if not isinstance(value, bool):
        raise InvalidRequest(f"{field} must be true or false (a JSON boolean), got {value!r}")
    return value


def _slots(body: dict[str, Any], field: str) -> ResourceSlot:
    value = body.get(field)
    if value is None:
        return ResourceSlot()
    if not isinstance(value, dict):
        raise InvalidRequest(f'{field} must be an object of slot amounts, e.g. {{"cpu": "2", "mem": "4g"}}')
    try:
        return ResourceSlot.parse(value)
    except SlotError as e:
        raise InvalidRequest(f"{field}: {e}") from None


def _count(body: dict[str, Any], field: str) -> int | None:
    value = body.get(field)
    if value is not None and (
        isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_COUNT
    ):
        raise InvalidRequest(f"{field} must be a whole number from 0 to {MAX_COUNT} (or null for no limit)")
    return value


def parse_bytes(value: object, field: str) -> int:
    """A size in bytes: a whole number, or a string with a unit ("10g", "500m", "2 GiB")."""
    amount: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise InvalidRequest(f"{field} must be >= 0 bytes")
        amount = value
    elif isinstance(value, str):
        try:
            slots = ResourceSlot.parse({"mem": value.replace(" ", "").replace("iB", "").replace("B", "")})
            amount = int(slots["mem"])
        except (SlotError, KeyError):
            pass
    if amount is None:
        raise InvalidRequest(
            f"{field} must be a number of bytes or a size such as '10g' or '500m', got {value!r}"
        )
    if amount > MAX_BYTES:
        raise InvalidRequest(f"{field} must be at most {MAX_BYTES} bytes (8 EiB)")
    return amount


def _bytes(body: dict[str, Any], field: str) -> int | None:
    value = body.get(field)
    return None if value is None else parse_bytes(value, field)


def _policy_name(value: object) -> str | None:
    if value is not None and not isinstance(value, str):
        raise InvalidRequest(f"policy must be a policy name (a string) or null, got {value!r}")
    return value


def validate_env(env: object) -> dict[str, str]:
    """Environment variables for a kernel: names and values checked, nothing odd passes.

    The loader's and drivers' variables (``LD_PRELOAD``, ``NVIDIA_VISIBLE_DEVICES``, ...) are
    refused: the agent sets them from what the gateway allocated.
    """
    if env is None:
        return {}
    if not isinstance(env, dict):
        raise InvalidRequest("env must be an object of string values")
    if len(env) > MAX_ENV_ENTRIES:
        raise InvalidRequest(f"env has {len(env)} entries; at most {MAX_ENV_ENTRIES} are allowed")
    out = {}
    for k, v in env.items():
        if not isinstance(k, str) or not ENV_NAME_RE.match(k):
            raise InvalidRequest(f"env: {k!r} is not a valid variable name")
        if is_denied(k):
            raise InvalidRequest(
                f"env: {k} is set by the agent from what the gateway allocated; leave it out"
            )
        if not isinstance(v, str):
            raise InvalidRequest(f"env: {k} must be a string")
        if len(v) > MAX_ENV_VALUE or "\0" in v or "\n" in v or "\r" in v:
            raise InvalidRequest(
                f"env: {k} must be at most {MAX_ENV_VALUE} characters without NUL or newlines"
            )
        out[k] = v
    return out


@dataclass(frozen=True)
class ResourceRules:
    """The operator's resource settings: defaults for what a request leaves out, maxima a request
    is clamped to, and minima it must reach (``Gateway.default/max/min_resources``)."""

    default: ResourceSlot
    maximum: ResourceSlot
    minimum: ResourceSlot

    def apply(self, requested: ResourceSlot) -> ResourceSlot:
        """What a session gets for ``requested``, or :class:`InvalidRequest` naming the slot."""
        resources = ResourceSlot({**self.default, **requested}).clamp(self.maximum)
        try:
            validate_request(resources)
        except SlotError as e:
            raise InvalidRequest(f"resources: {e}") from None
        # A zero (or a sliver) would start a container with no limit at all, not an empty one.
        for slot, amount in sorted(resources.items()):
            least = self.minimum.get(slot)
            if least is not None and amount < least:
                raise InvalidRequest(
                    f"resources: {slot} {format_amount(slot, amount)} is below the minimum of "
                    f"{format_amount(slot, least)} per session; ask for at least that much"
                )
            if amount == 0:
                raise InvalidRequest(f"resources: {slot} is 0; ask for more than 0 or leave {slot} out")
        return resources


@dataclass(frozen=True)
class SessionRequest:
    """POST /v1/sessions: a kernel session to create (resources already defaulted and clamped)."""

    image: str
    name: str
    resources: ResourceSlot
    env: dict[str, str]
    restart_of: str | None = None
    key: str = ""
    bound_to_stream: bool = False
    # vfolders to mount: (name or id, "rw" | "ro"); and where the kernel starts, in the container
    mounts: tuple[tuple[str, str], ...] = ()
    working_dir: str = ""

    @classmethod
    def from_json(cls, body: dict[str, Any], rules: ResourceRules) -> SessionRequest:
        image = body.get("image")
        if not isinstance(image, str) or not image.strip():
            raise InvalidRequest("image is required (e.g. 'backendai-jupyter/python')")
        name = body.get("name")
        name = "" if name is None else name
        if not isinstance(name, str) or len(name) > MAX_SESSION_NAME:
            raise InvalidRequest(f"name must be a string of at most {MAX_SESSION_NAME} characters")
        resources = rules.apply(_slots(body, "resources"))
        restart_of = body.get("restart_of")
        if restart_of is not None and not isinstance(restart_of, str):
            raise InvalidRequest("restart_of must be a session id (a string)")
        key = body.get("key")
        if key is not None and (not isinstance(key, str) or not KEY_RE.match(key)):
            raise InvalidRequest("key must be 16-128 letters, digits, '-' or '_' (or left out)")
        return cls(
            image=image.strip(),
            name=name,
            resources=resources,
            env=validate_env(body.get("env")),
            restart_of=restart_of,
            key=key or "",
            bound_to_stream=_bool(body, "bound_to_stream"),
            mounts=_mounts(body.get("mounts")),
            working_dir=_working_dir(body.get("working_dir")),
        )


MAX_MOUNTS = 32


def _mounts(value: object) -> tuple[tuple[str, str], ...]:
    """``mounts``: vfolder names or ids, or ``{"name": ..., "mode": "ro"}`` objects."""
    if value is None:
        return ()
    if not isinstance(value, list) or len(value) > MAX_MOUNTS:
        raise InvalidRequest(f"mounts must be a list of at most {MAX_MOUNTS} vfolder names")
    out = []
    for item in value:
        if isinstance(item, str):
            ref, mode = item, "rw"
        elif isinstance(item, dict):
            ref = item.get("name", item.get("id"))
            mode = item.get("mode", "rw")
        else:
            ref, mode = None, None
        if not isinstance(ref, str) or not ref or mode not in ("ro", "rw"):
            raise InvalidRequest(
                'each mount is a vfolder name, or {"name": NAME, "mode": "ro" or "rw"}; got ' + repr(item)
            )
        out.append((ref, mode))
    return tuple(out)


def _working_dir(value: object) -> str:
    if value is None:
        return ""
    if not isinstance(value, str) or len(value) > 4096 or "\0" in value:
        raise InvalidRequest("working_dir must be a path in the container (a string)")
    return value


@dataclass(frozen=True)
class SignalRequest:
    """POST /v1/sessions/{id}/signal."""

    signal: str

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> SignalRequest:
        signal = body.get("signal", "")
        if not isinstance(signal, str):
            raise InvalidRequest(f"signal must be a signal name such as 'SIGINT', got {signal!r}")
        return cls(signal)


@dataclass(frozen=True)
class UserCreate:
    """POST /v1/admin/users."""

    name: str
    is_admin: bool = False
    policy: str | None = None

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> UserCreate:
        name = body.get("name")
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise InvalidRequest(f"name: {NAME_RULE}")
        return cls(name, _bool(body, "is_admin"), _policy_name(body.get("policy")))


@dataclass(frozen=True)
class UserPatch:
    """PATCH /v1/admin/users/{name}: only the fields present change (``policy: null`` clears it)."""

    disabled: bool | None = None
    set_policy: bool = False
    policy: str | None = None

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> UserPatch:
        disabled = _bool(body, "disabled") if "disabled" in body else None
        if "policy" not in body:
            return cls(disabled)
        return cls(disabled, True, _policy_name(body["policy"]))


@dataclass(frozen=True)
class PolicySpec:
    """PUT /v1/admin/policies/{name}: a resource policy, whole (absent fields mean no limit)."""

    max_sessions: int | None
    max_session_resources: ResourceSlot
    total_resources: ResourceSlot
    allowed_images: list[str]
    max_vfolders: int | None = None
    max_quota_bytes: int | None = None

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> PolicySpec:
        max_sessions = _count(body, "max_sessions")
        images = body.get("allowed_images")
        if images is None:
            images = []
        if not isinstance(images, list) or not all(isinstance(i, str) and i for i in images):
            raise InvalidRequest("allowed_images must be a list of image names or patterns")
        return cls(
            max_sessions,
            _slots(body, "max_session_resources"),
            _slots(body, "total_resources"),
            images,
            _count(body, "max_vfolders"),
            _bytes(body, "max_quota_bytes"),
        )
