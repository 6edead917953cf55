"""Every route of the gateway, generated from its route table, called by a second user on the first's objects.

A route added later is covered without anyone remembering to: each pattern's parameters are
filled with the first user's objects (their /v1 session, their Kernel Gateway kernel and session,
their user name, an agent), each method the handler implements is called with the second user's
credentials, and the answer must be a refusal (401/403/404) or, where the route lists or describes
shared things, data that holds nothing of the first user's. A route whose parameters this suite
cannot fill fails the test until it is taught what they mean.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from tornado import httpclient, websocket

from .inproc import IMAGE, Caller, InprocGateway, running_gateway

SPEC = "backendai-python3"
METHODS = ("get", "post", "put", "patch", "delete")
REFUSED = {401, 403, 404}
# Routes anyone signed in may read, about shared things: their answers must hold nothing of another's.
SHARED = {
    r"/v1/?$",
    r"/v1/agents/?$",
    r"/v1/sessions/?$",
    r"/api/kernels$",
    r"/api/sessions$",
    r"/api/kernelspecs$",
    r"/api/kernelspecs/(?P<kernel_name>[\w\.\-%]+)$",
    r"/kernelspecs/(?P<kernel_name>[\w\.\-%]+)/(?P<path>.*)$",
    r"/api/status$",
    r"/api/me$",
    r"/api/spec.yaml$",
    r"/v1/openapi.json$",
    r"/api/resolvePath$",
    r"/(robots\.txt)$",
    r"/(favicon\.ico)$",
    r"/static/(.*)$",
    r"/v1/vfolders/?$",
    r"/v1/vfolders/invitations/?$",
}
# Served to anyone (jupyter_server's static files): not even a credential is needed.
PUBLIC = {
    r"/(robots\.txt)$",
    r"/(favicon\.ico)$",
    r"/static/(.*)$",
    r"/api/spec.yaml$",
    r"/v1/openapi.json$",
}
WEBSOCKETS = {"SessionEventsHandler", "FastKernelWebsocketHandler", "AgentConnectHandler"}


def _methods(handler: type) -> list[str]:
    """The HTTP methods a handler really implements (ours or jupyter_server's, not tornado's 405s)."""
    return [
        m
        for m in METHODS
        if any(m in c.__dict__ for c in handler.__mro__ if c.__module__.startswith(("backendai", "jupyter")))
    ]


def _fill(pattern: str, objects: dict[str, str]) -> str:
    """A concrete path for ``pattern`` with the first user's objects in its parameters."""
    path = pattern.rstrip("$").replace("/?", "")

    def named(m: re.Match[str]) -> str:
        name = m.group(1)
        if name in ("action", "answer"):
            return m.group(2).split("|")[0]
        assert name in objects, f"route {pattern}: the cross-tenant suite does not know what {name!r} is"
        return objects[name]

    path = re.sub(r"\(\?P<(\w+)>((?:[^()]|\([^()]*\))*)\)", named, path)
    path = re.sub(
        r"\((?:[^()]|\\\.)*\)", lambda m: m.group(0)[1:-1].replace("\\.", ".").replace(".*", "x"), path
    )
    return path.replace("\\", "")


def _leaks(body: bytes, secrets: list[str], sent: str = "") -> list[str]:
    """The first user's secrets in an answer, but for ids the caller sent itself (a 404 names them)."""
    text = body.decode(errors="replace")
    return [s for s in secrets if s in text and s not in sent]


async def _ws_refused(g: InprocGateway, path: str, headers: dict[str, str]) -> int:
    req = httpclient.HTTPRequest(g.url.replace("http", "ws", 1) + path, headers=headers)
    try:
        conn = await websocket.websocket_connect(req)
    except httpclient.HTTPClientError as e:
        return e.code
    conn.close()
    return 101


async def test_every_route_refuses_a_second_user_and_never_shows_the_first_users_data(tmp_path: Path):
    async with running_gateway(tmp_path) as g:
        ann, ben = await g.user("ann"), await g.user("ben")
        agent = await g.agent("host-a")
        await g.admin("PUT", "/v1/admin/policies/anns-policy", {"max_sessions": 5})
        await g.admin("PATCH", "/v1/admin/users/ann", {"policy": "anns-policy"})
        sid = (await ann("POST", "/v1/sessions", {"image": IMAGE, "resources": {"cpu": "1", "mem": "256m"}}))[
            "id"
        ]
        await ann.wait_state(sid, {"RUNNING"})
        kid = (await ann("POST", "/api/kernels", {"name": SPEC}, auth="token"))["id"]
        ks = await ann(
            "POST",
            "/api/sessions",
            {"path": "a.ipynb", "type": "notebook", "kernel": {"name": SPEC}},
            auth="token",
        )
        # Ann's vfolder with a file, a share, an invitation she sent and an upload in progress.
        carol = await g.user("carol")
        vid = (await ann("POST", "/v1/vfolders", {"name": "anns-files"}))["id"]
        await ann.fetch("PUT", f"/v1/vfolders/{vid}/content?path=a.ipynb", raw=b"ann's notebook")
        inv = await ann("POST", f"/v1/vfolders/{vid}/invitations", {"user": "carol", "permission": "ro"})
        await carol("POST", f"/v1/vfolders/invitations/{inv['id']}/accept")
        other = (await ann("POST", "/v1/vfolders", {"name": "anns-other"}))["id"]
        iid = (await ann("POST", f"/v1/vfolders/{other}/invitations", {"user": "carol", "permission": "rw"}))[
            "id"
        ]
        uid = (await ann("POST", f"/v1/vfolders/{vid}/uploads", {"path": "up.bin", "size": 10}))["upload_id"]
        objects = {
            "vid": vid,
            "iid": iid,
            "uid": uid,
            "user": "carol",
            "sid": sid,
            "kernel_id": kid,
            "session_id": ks["id"],
            "name": "ann",
            "agent_id": "host-a",
            "kernel_name": SPEC,
            "path": "logo-64x64.png",
        }
        secrets = [
            vid,
            iid,
            uid,
            other,
            "ann's notebook",
            sid,
            kid,
            ks["id"],
            ks["kernel"]["id"],
            ann.token,
            ann.creds["secret_key"],
            ann.creds["access_key"],
        ]
        # A body that points at the first user's things wherever a body is read.
        body = {
            "image": IMAGE,
            "restart_of": sid,
            "path": "a.ipynb",
            "type": "notebook",
            "name": "ann",
            "kernel": {"id": kid},
            "signal": "SIGINT",
            "disabled": True,
            "policy": None,
            "src": "a.ipynb",
            "dst": "b.ipynb",
            "size": 10,
            "user": "ben",
            "permission": "rw",
        }
        rules = g.gw.app.wildcard_router.rules
        covered, calls, failures = 0, 0, []
        for rule in rules:
            pattern = rule.matcher.regex.pattern
            handler = rule.target
            methods = _methods(handler)
            if pattern == r"/v1/.*$":  # the catch-all: anything else under /v1 is 404
                methods, path = ["get", "post"], "/v1/not-a-route"
            else:
                path = _fill(pattern, objects)
            if handler.__name__ in WEBSOCKETS:
                for headers in (ben.signed("GET", path), {"Authorization": f"token {ben.token}"}):
                    code = await _ws_refused(g, path, headers)
                    calls += 1
                    if code not in REFUSED:
                        failures.append(f"websocket {path}: {code}")
                covered += 1
                continue
            assert methods, f"route {pattern} ({handler.__name__}) implements no method this suite knows"
            for method in methods:
                verb = method.upper()
                for auth in ("sign", "token"):
                    sent = body if verb in ("POST", "PUT", "PATCH") else None
                    resp = await ben.fetch(verb, path, sent, auth=auth)
                    calls += 1
                    leaked = _leaks(resp.body or b"", secrets, path + json.dumps(sent))
                    if leaked:
                        failures.append(f"{verb} {path} ({auth}): {resp.code} shows {leaked}")
                    elif resp.code >= 500:
                        failures.append(f"{verb} {path} ({auth}): {resp.code} {resp.body[:200]!r}")
                    elif pattern not in SHARED and resp.code not in REFUSED:
                        failures.append(f"{verb} {path} ({auth}): {resp.code} {resp.body[:200]!r}")
                # And with no credentials at all.
                if pattern not in PUBLIC:
                    resp = await ben.fetch(verb, path, auth="none")
                    calls += 1
                    if resp.code not in REFUSED or _leaks(resp.body or b"", secrets, path):
                        failures.append(f"{verb} {path} (no credentials): {resp.code}")
            covered += 1
        print(
            f"cross-tenant: {covered} of {len(rules)} routes covered, {calls} calls, {len(failures)} failures"
        )
        assert covered == len(rules)
        assert not failures, "\n".join(failures)
        # Nothing of ann's changed.
        assert (await ann("GET", f"/v1/sessions/{sid}"))["state"] == "RUNNING"
        assert {k["id"] for k in await ann("GET", "/api/kernels", auth="token")} == {kid, ks["kernel"]["id"]}
        users = {u["name"]: u for u in (await g.admin("GET", "/v1/admin/users"))["users"]}
        assert users["ann"]["disabled"] is False and users["ann"]["policy"] == "anns-policy"
        assert (await Caller(g.url, ann.creds).fetch("GET", "/v1/sessions", auth="token")).code == 200
        mine = {v["name"]: v for v in (await ann("GET", "/v1/vfolders"))["vfolders"]}
        assert set(mine) == {"anns-files", "anns-other"}
        assert (await ann("GET", f"/v1/vfolders/{vid}/shares"))["shares"][0]["permission"] == "ro"
        assert (await ann("GET", f"/v1/vfolders/{vid}/uploads/{uid}"))["offset"] == 0
        assert (await ann("GET", "/v1/vfolders/invitations"))["sent"][0]["id"] == iid
        got = await ann.fetch("GET", f"/v1/vfolders/{vid}/download?path=a.ipynb")
        assert got.body == b"ann's notebook"
        assert json.loads((await ann.fetch("GET", "/v1/sessions")).body)["sessions"]
        agent.close()
