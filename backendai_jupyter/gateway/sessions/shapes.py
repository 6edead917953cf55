"""What clients see of a session: its API model and its events.

An event is versioned: ``"version"`` is :data:`EVENT_VERSION`, and its JSON Schema is
``session-event.v1.json`` beside this module. A new field is added without changing the
version; a field that changes meaning or goes away gets a new version (and schema file), so
a client written against one version keeps understanding what it receives. We keep our own
schema rather than route events through jupyter_events: that library serves telemetry sinks
(logging handlers, validated per emit); ours go to websockets in the hot path of every launch.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any

from ...common.states import SessionState
from ..models import KernelSession
from ..scheduler import with_position

EVENT_VERSION = 1
EVENT_SCHEMA = Path(__file__).with_name("session-event.v1.json")


@cache
def event_schema() -> dict[str, Any]:
    return json.loads(EVENT_SCHEMA.read_text())


def iso(dt: datetime) -> str:
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.isoformat().replace("+00:00", "Z")


def position(row: KernelSession) -> dict[str, Any]:
    """A waiting request's place in line (nothing for any other)."""
    if row.state != SessionState.PENDING.value or not (row.reason or "").startswith("waiting"):
        return {}
    ahead = row.ahead or 0
    return {"reason": with_position(row.reason, ahead), "requests_ahead": ahead}


def session_json(row: KernelSession, *, with_connection: bool) -> dict[str, Any]:
    """The API model of a session, with a waiting one's place in line."""
    d: dict[str, Any] = {
        "id": row.id,
        "name": row.name,
        "owner": row.owner_id,
        "image": row.image,
        "resources": row.resources,
        "state": row.state,
        "reason": row.reason,
        "agent": row.agent_id,
        "devices": row.devices or {},
        "exit_code": row.exit_code,
        "mounts": [
            {
                "vfolder_id": m.get("vfolder_id"),
                "name": m.get("name"),
                "path": m.get("target"),
                "mode": m.get("mode"),
            }
            for m in row.mounts or []
        ],
        "working_dir": row.working_dir or "",
        "created_at": iso(row.created_at),
        "updated_at": iso(row.updated_at),
    }
    if with_connection and row.connection:
        d["connection"] = row.connection
    d.update(position(row))
    return d


def event_of(
    row: KernelSession, seq: int, *, state: str = "", reason: str = "", at: datetime | None = None
) -> dict[str, Any]:
    """The event of transition ``seq``. ``row`` is the session as stored at that transition or
    later; ``state``, ``reason`` and ``at`` are the transition's own when the row has moved on
    since (then the connection, which belongs to the row's newer state, is left out)."""
    moved_on = bool(state) and state != row.state
    event: dict[str, Any] = {
        "version": EVENT_VERSION,
        "seq": seq,
        "session_id": row.id,
        "owner": row.owner_id,
        "state": state if moved_on else row.state,
        "reason": reason if moved_on else row.reason,
        "agent": row.agent_id,
        "exit_code": row.exit_code,
        "at": iso(at if moved_on and at is not None else row.updated_at),
    }
    if not moved_on:
        if row.state == SessionState.RUNNING.value and row.connection:
            event["connection"] = row.connection
        event.update(position(row))
    return event
