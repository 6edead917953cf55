"""Users never see, touch or starve each other's kernels, and never reach the gateway's own secrets."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from .inproc import FakeAgent, InprocGateway, running_gateway

SPEC = "backendai-python3"


async def _orders(agent: FakeAgent, method: str, count: int = 1, timeout: float = 15) -> list[dict]:
    async with asyncio.timeout(timeout):
        while True:
            found = [p for m, p in agent.calls if m == method]
            if len(found) >= count:
                return found
            await asyncio.sleep(0.05)


async def _kernel_session(g: InprocGateway, body: dict, token: str) -> dict:
    resp = await g.admin.http.fetch(
        g.url + "/api/sessions",
        method="POST",
        body=json.dumps(body),
        headers={"Authorization": f"token {token}"},
        raise_error=False,
    )
    assert resp.code == 201, resp.body
    return json.loads(resp.body)


async def test_the_gateways_own_environment_never_reaches_a_kernel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("BACKENDAI_AGENT_TOKEN_CANARY", "the-gateway's-secret")
    monkeypatch.setenv("SOME_GATEWAY_SETTING", "also-private")
    async with running_gateway(tmp_path, kernel_env_allowlist=["ALLOWED_VAR"]) as g:
        ann = await g.user("ann")
        agent = await g.agent("host-a")
        # The route JupyterLab and VS Code use: POST /api/sessions (jupyter_server passes its
        # whole os.environ to start_kernel there).
        model = await _kernel_session(
            g, {"path": "a.ipynb", "type": "notebook", "kernel": {"name": SPEC}}, ann.token
        )
        (order,) = await _orders(agent, "create_kernel")
        assert "BACKENDAI_AGENT_TOKEN_CANARY" not in order["env"]
        assert "SOME_GATEWAY_SETTING" not in order["env"]
        assert not {k for k in order["env"] if not k.startswith("KERNEL_")}, order["env"]
        # POST /api/kernels passes KERNEL_* and the allowlist, nothing else.
        body = {"name": SPEC, "env": {"KERNEL_X": "1", "ALLOWED_VAR": "2", "OTHER": "3"}}
        await ann("POST", "/api/kernels", body, auth="token")
        orders = await _orders(agent, "create_kernel", 2)
        assert {k: v for k, v in orders[1]["env"].items() if k != "KERNEL_LAUNCH_TIMEOUT"} == {
            "KERNEL_X": "1",
            "ALLOWED_VAR": "2",
        }
        # A rename (PATCH) hands jupyter_server's env to the kernel manager for the next restart:
        # still nothing of the gateway's (a restart in a real container: test_kernel_gateway_api).
        await ann("PATCH", f"/api/sessions/{model['id']}", {"path": "b.ipynb"}, auth="token")
        km = g.gw.app.settings["kernel_manager"].get_kernel(model["kernel"]["id"])
        assert "BACKENDAI_AGENT_TOKEN_CANARY" not in str(km._launch_args)
        agent.close()


async def test_listing_sessions_shows_ones_own_and_never_fails_for_others(tmp_path: Path):
    async with running_gateway(tmp_path) as g:
        ann, ben = await g.user("ann"), await g.user("ben")
        agent = await g.agent("host-a")
        mine = await _kernel_session(
            g, {"path": "a.ipynb", "type": "notebook", "kernel": {"name": SPEC}}, ann.token
        )
        # Stock jupyter_server answered 404 to ben's listing as soon as ann had a session.
        assert await ben("GET", "/api/sessions", auth="token") == []
        listed = await ann("GET", "/api/sessions", auth="token")
        assert [s["id"] for s in listed] == [mine["id"]]
        admin_view = await g.admin("GET", "/api/sessions", auth="token")
        assert [s["id"] for s in admin_view] == [mine["id"]]
        agent.close()


async def test_a_session_cannot_be_attached_to_another_users_kernel(tmp_path: Path):
    async with running_gateway(tmp_path) as g:
        ann, ben = await g.user("ann"), await g.user("ben")
        agent = await g.agent("host-a")
        anns = await _kernel_session(
            g, {"path": "a.ipynb", "type": "notebook", "kernel": {"name": SPEC}}, ann.token
        )
        kid = anns["kernel"]["id"]
        body = {"path": "steal.ipynb", "type": "notebook", "kernel": {"id": kid}}
        resp = await ben.fetch("POST", "/api/sessions", body, auth="token")
        assert resp.code == 404, resp.body
        # No row was made that points at ann's kernel: she still sees only her own session.
        assert [s["id"] for s in await ann("GET", "/api/sessions", auth="token")] == [anns["id"]]
        assert await ben("GET", "/api/sessions", auth="token") == []
        # Nor can ben move his own session onto ann's kernel, read, or delete hers.
        bens = await _kernel_session(
            g, {"path": "b.ipynb", "type": "notebook", "kernel": {"name": SPEC}}, ben.token
        )
        resp = await ben.fetch("PATCH", f"/api/sessions/{bens['id']}", {"kernel": {"id": kid}}, auth="token")
        assert resp.code in (400, 404), resp.body
        assert (await ben.fetch("GET", f"/api/sessions/{anns['id']}", auth="token")).code == 404
        assert (await ben.fetch("DELETE", f"/api/sessions/{anns['id']}", auth="token")).code == 404
        assert [s["kernel"]["id"] for s in await ann("GET", "/api/sessions", auth="token")] == [kid]
        agent.close()


async def test_kernelspec_resources_never_come_from_the_gateways_working_directory(tmp_path: Path):
    async with running_gateway(tmp_path) as g:
        ann = await g.user("ann")
        agent = FakeAgent(g.url, "host-a", join_token=g.join_token)
        agent.images = [("backendai-jupyter/r:latest", {"language": "R", "display_name": "R", "argv": ["R"]})]
        await agent.connect()
        specs = await ann("GET", "/api/kernelspecs", auth="token")
        name = "backendai-r"
        assert name in specs["kernelspecs"]
        assert Path("pyproject.toml").exists()  # noqa: ASYNC240 (tests run from the project root)
        for leaked in ("pyproject.toml", "README.md", "../pyproject.toml"):
            resp = await ann.fetch("GET", f"/kernelspecs/{name}/{leaked}", auth="token")
            assert resp.code in (403, 404), (leaked, resp.code)
        agent.close()


async def test_event_stream_requests_that_never_become_websockets_leave_nothing_behind(tmp_path: Path):
    async with running_gateway(tmp_path) as g:
        ann = await g.user("ann")
        sid = (await ann("POST", "/v1/sessions", {"image": "backendai-jupyter/python"}))["id"]
        before = g.gw.hub.subscribers
        for _ in range(20):
            resp = await ann.fetch("GET", f"/v1/sessions/{sid}/events")  # signed, but no Upgrade
            assert resp.code == 400
        assert g.gw.hub.subscribers == before
