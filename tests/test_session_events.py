"""Session events follow their published, versioned schema, from the first to the last."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import jsonschema
import pytest
from tornado import httpclient

from backendai_jupyter.gateway.events import EventHub
from backendai_jupyter.gateway.sessions import EVENT_VERSION
from backendai_jupyter.gateway.sessions.shapes import event_schema

from .inproc import IMAGE, running_gateway


def test_the_schema_is_a_valid_json_schema_of_its_version():
    schema = event_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["properties"]["version"] == {"const": EVENT_VERSION}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"version": EVENT_VERSION, "seq": 1}, schema)


async def test_every_event_of_a_session_matches_the_schema(tmp_path: Path):
    validator = jsonschema.Draft202012Validator(event_schema())
    async with running_gateway(tmp_path, heartbeat_timeout=60) as g:
        ann = await g.user("ann")
        model = await ann(
            "POST", "/v1/sessions", {"image": IMAGE, "resources": {"cpu": "0.25", "mem": "128m"}}
        )
        ws = await ann.stream(model["id"])  # waiting: no agent yet, so it has a place in line
        agent = await g.agent("host-a")
        events = []
        async with asyncio.timeout(20):
            while not events or events[-1]["state"] != "RUNNING":
                events.append(json.loads(await ws.read_message()))
            await ann("DELETE", f"/v1/sessions/{model['id']}")
            while events[-1]["state"] != "TERMINATED":
                events.append(json.loads(await ws.read_message()))
        for event in events:
            validator.validate(event)
        assert [e["state"] for e in events][0] == "PENDING"
        assert {"RUNNING", "TERMINATED"} <= {e["state"] for e in events}
        assert "connection" in next(e for e in events if e["state"] == "RUNNING")
        ws.close()
        agent.close()


async def test_a_stream_resumed_from_its_last_event_misses_no_change(tmp_path: Path):
    async with running_gateway(tmp_path, heartbeat_timeout=60) as g:
        ann = await g.user("ann")
        agent = await g.agent("host-a")
        sid = (
            await ann("POST", "/v1/sessions", {"image": IMAGE, "resources": {"cpu": "0.25", "mem": "128m"}})
        )["id"]
        ws = await ann.stream(sid)
        first = json.loads(await asyncio.wait_for(ws.read_message(), 10))
        ws.close()  # away while the session runs and ends
        await ann.wait_state(sid, {"RUNNING"})
        await ann("DELETE", f"/v1/sessions/{sid}")
        await ann.wait_state(sid, {"TERMINATED"})
        model = await ann("GET", f"/v1/sessions/{sid}")
        stored = [t["state"] for t in model["transitions"]]

        ws = await ann.stream(sid, last_event_id=first["seq"])
        told = []
        async with asyncio.timeout(10):
            while not told or told[-1]["state"] != "TERMINATED":
                told.append(json.loads(await ws.read_message()))
        seqs = [e["seq"] for e in told]
        assert seqs == sorted(set(seqs)) and seqs[0] > first["seq"]
        assert [first["state"], *(e["state"] for e in told)] == stored[-len(told) - 1 :]
        ws.close()

        other = await g.user("bob")  # resuming is no way into someone else's session
        resp = await other.fetch("GET", f"/v1/sessions/{sid}")
        assert resp.code == 404
        with pytest.raises(httpclient.HTTPClientError) as refused:
            await other.stream(sid, last_event_id=0)
        assert refused.value.code == 404
        agent.close()


async def test_the_event_hub_hands_each_session_its_own_events():
    hub = EventHub()
    one, two, also_one = hub.subscribe("s1"), hub.subscribe("s2"), hub.subscribe("s1")
    hub.publish({"session_id": "s1", "seq": 1})
    hub.publish({"session_id": "s3", "seq": 2})
    assert [q.qsize() for q in (one, two, also_one)] == [1, 0, 1]
    assert hub.watched("s1") and not hub.watched("s3") and hub.subscribers == 3
    hub.unsubscribe(one)
    hub.unsubscribe(also_one)
    hub.unsubscribe(also_one)  # twice: nothing more happens
    assert not hub.watched("s1") and hub.subscribers == 1
