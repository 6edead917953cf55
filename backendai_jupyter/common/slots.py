"""Resource slots: exact arithmetic over named resources (``cpu``, ``mem``, accelerators)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from decimal import Decimal, InvalidOperation

# Slots whose amounts are bytes: parsed from "4g"/"512m" and shown in binary units.
BYTE_SLOTS = frozenset({"mem"})
_SIZE_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)
_SLOT_NAME_RE = re.compile(r"^[a-z][a-z0-9_.-]{0,63}$")


class SlotError(ValueError):
    """A resource amount or slot name that cannot be understood."""


def parse_amount(slot: str, value: object) -> Decimal:
    """Parse one amount; byte slots accept suffixes (``"4g"``, ``"512MiB"``)."""
    if isinstance(value, bool):
        raise SlotError(f"{slot}: expected a number, got {value!r}")
    if isinstance(value, (int, Decimal)):
        amount = Decimal(value)
    elif isinstance(value, float):
        amount = Decimal(repr(value))
    elif isinstance(value, str):
        if slot in BYTE_SLOTS:
            m = _SIZE_RE.match(value)
            if not m:
                raise SlotError(f"{slot}: cannot read {value!r} as a size (try '4g' or '512m')")
            amount = Decimal(m.group(1)) * _SIZE_UNITS[m.group(2).lower()]
        else:
            try:
                amount = Decimal(value.strip())
            except InvalidOperation:
                raise SlotError(f"{slot}: cannot read {value!r} as a number") from None
    else:
        raise SlotError(f"{slot}: expected a number or string, got {type(value).__name__}")
    if not amount.is_finite() or amount < 0:
        raise SlotError(f"{slot}: amount must be a finite number >= 0, got {value!r}")
    if slot in BYTE_SLOTS:
        amount = amount.to_integral_value()
    return amount


def format_amount(slot: str, amount: Decimal) -> str:
    """A human rendering: bytes in binary units, others as plain numbers."""
    if slot in BYTE_SLOTS:
        for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
            if amount >= size:
                return f"{(amount / size).quantize(Decimal('0.01')).normalize():f} {unit}"
        return f"{amount:f} B"
    return f"{amount.normalize():f}"


class ResourceSlot(dict[str, Decimal]):
    """A map of slot name to exact amount; missing slots count as zero."""

    @classmethod
    def parse(cls, data: Mapping[str, object] | None) -> ResourceSlot:
        """Build from user or wire input, validating names and amounts."""
        slots = cls()
        for name, value in (data or {}).items():
            if not isinstance(name, str) or not _SLOT_NAME_RE.match(name):
                raise SlotError(f"invalid resource slot name {name!r}")
            slots[name] = parse_amount(name, value)
        return slots

    def to_json(self) -> dict[str, str]:
        """Wire form: amounts as strings so no float ever touches them."""
        return {k: f"{v.normalize():f}" if k not in BYTE_SLOTS else f"{v:f}" for k, v in self.items()}

    def __add__(self, other: Mapping[str, Decimal]) -> ResourceSlot:
        out = ResourceSlot(self)
        for k, v in other.items():
            out[k] = out.get(k, Decimal(0)) + v
        return out

    def __sub__(self, other: Mapping[str, Decimal]) -> ResourceSlot:
        out = ResourceSlot(self)
        for k, v in other.items():
            out[k] = out.get(k, Decimal(0)) - v
        return out

    def fits_in(self, capacity: Mapping[str, Decimal]) -> bool:
        """True when every requested amount is within ``capacity``."""
        return not self.shortfall(capacity)

    def shortfall(self, capacity: Mapping[str, Decimal]) -> list[str]:
        """The slot names whose request exceeds ``capacity`` (in name order)."""
        return sorted(k for k, v in self.items() if v > 0 and v > capacity.get(k, Decimal(0)))

    def clamp(self, limits: Mapping[str, Decimal]) -> ResourceSlot:
        """Each amount reduced to its limit, where a limit is set."""
        return ResourceSlot({k: min(v, limits[k]) if k in limits else v for k, v in self.items()})

    def describe(self) -> str:
        """``cpu 2, mem 4 GiB`` for messages."""
        return ", ".join(f"{k} {format_amount(k, v)}" for k, v in sorted(self.items()))


def total(slots: Iterable[Mapping[str, Decimal]]) -> ResourceSlot:
    """The sum of several slot maps."""
    out = ResourceSlot()
    for s in slots:
        out = out + s
    return out
