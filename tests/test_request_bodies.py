"""Every JSON body /v1 takes goes through its model: a wrong value in any field is a 400 naming it.

Driven through the in-process gateway, as a client would: for each operation with a JSON body
(the table of ``test_requests``, itself checked against ``openapi.yaml``), each field of its model
is sent with a value of the wrong JSON type, and the whole body as something that is no JSON
object. The caller may do each operation, so what refuses the body is its validation.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from .inproc import running_gateway
from .test_requests import BODIES

# The wrong JSON type for every field of every model (an object where a string, number, boolean
# or list goes; an object of the wrong contents where an object goes).
WRONG = {"__": [1]}
PATH_PARAMS = {"sid": "00000000-0000-0000-0000-000000000000", "iid": "00000000-0000-0000-0000-000000000001"}


async def test_a_wrong_value_in_any_field_of_any_body_is_a_400_naming_the_field(tmp_path: Path):
    async with running_gateway(tmp_path) as g:
        admin = g.admin
        await g.user("bob")
        params = {
            **PATH_PARAMS,
            "name": "bob",
            "user": "bob",
            "vid": (await admin("POST", "/v1/vfolders", {"name": "fuzzed"}))["id"],
        }
        failures = []
        for (method, template), model in sorted(BODIES.items()):
            path = re.sub(r"\{(\w+)\}", lambda m: params[m.group(1)], template)
            if template == "/v1/admin/policies/{name}":
                path = "/v1/admin/policies/fuzzed"
            cases = [(field, {field: WRONG}) for field in model.model_fields]
            cases += [("the request body", [1]), ("the request body", "{")]
            for field, body in cases:
                raw = body.encode() if isinstance(body, str) else json.dumps(body).encode()
                resp = await admin.fetch(method.upper(), path, raw=raw)
                answer = json.loads(resp.body)
                title = answer.get("title", "")
                named = re.search(rf"(^|; ){re.escape(field)}[ :.\[]", title)
                if resp.code != 400 or answer.get("type") != "invalid-request" or not named:
                    failures.append(f"{method.upper()} {path} {body!r}: {resp.code} {title!r}")
                if "Input should" in title or "pydantic" in title or "Traceback" in title:
                    failures.append(f"{method.upper()} {path} {body!r}: pydantic's words in {title!r}")
        assert not failures, "\n".join(failures)
        # Nothing of it took: no policy, bob as he was, the one vfolder, no sessions.
        assert (await admin("GET", "/v1/admin/policies"))["policies"] == []
        bob = next(u for u in (await admin("GET", "/v1/admin/users"))["users"] if u["name"] == "bob")
        assert bob["disabled"] is False and bob["policy"] is None
        assert [v["name"] for v in (await admin("GET", "/v1/vfolders"))["vfolders"]] == ["fuzzed"]
        assert (await admin("GET", "/v1/sessions"))["sessions"] == []
