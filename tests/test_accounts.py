"""Accounts fail closed: policies cannot vanish from under users, revoked credentials stay revoked."""

from __future__ import annotations

from pathlib import Path

from .inproc import IMAGE, Caller, running_gateway

SMALL = {"cpu": "1", "mem": "256m"}


async def test_a_policy_in_use_cannot_be_deleted_so_its_users_never_lose_their_limits(tmp_path: Path):
    async with running_gateway(tmp_path) as g:
        await g.admin("PUT", "/v1/admin/policies/tight", {"max_sessions": 1})
        ann = await g.user("ann", policy="tight")
        resp = await g.admin.fetch("DELETE", "/v1/admin/policies/tight")
        assert resp.code == 409 and b"ann" in resp.body
        await ann("POST", "/v1/sessions", {"image": IMAGE, "resources": SMALL})
        resp = await ann.fetch("POST", "/v1/sessions", {"image": IMAGE, "resources": SMALL})
        assert resp.code == 403  # the limit still holds
        # Once nobody uses it, it can go.
        await g.admin("PATCH", "/v1/admin/users/ann", {"policy": None})
        assert (await g.admin.fetch("DELETE", "/v1/admin/policies/tight")).code == 204


async def test_every_user_has_a_limit_on_waiting_sessions(tmp_path: Path):
    async with running_gateway(tmp_path, max_pending_per_user=3) as g:
        ann, ben = await g.user("ann"), await g.user("ben")  # no policy at all
        for _ in range(3):
            await ann("POST", "/v1/sessions", {"image": IMAGE, "resources": SMALL})  # no agent: they wait
        resp = await ann.fetch("POST", "/v1/sessions", {"image": IMAGE, "resources": SMALL})
        assert resp.code == 403 and b"at most 3 may wait" in resp.body
        # One user's queue does not take another's turn away.
        await ben("POST", "/v1/sessions", {"image": IMAGE, "resources": SMALL})


async def test_a_deleted_users_credentials_never_work_again_even_when_re_enabled(tmp_path: Path):
    async with running_gateway(tmp_path) as g:
        ann = await g.user("ann")
        assert (await ann.fetch("GET", "/v1/sessions")).code == 200
        assert (await ann.fetch("GET", "/v1/sessions", auth="token")).code == 200
        assert (await g.admin.fetch("DELETE", "/v1/admin/users/ann")).code == 204
        await g.admin("PATCH", "/v1/admin/users/ann", {"disabled": False})
        assert (await ann.fetch("GET", "/v1/sessions")).code == 401
        assert (await ann.fetch("GET", "/v1/sessions", auth="token")).code == 401
        assert (await ann.fetch("GET", "/api/kernels", auth="token")).code in (401, 403)
        # An admin can issue new ones.
        fresh = await g.admin("POST", "/v1/admin/users/ann/token")
        keys = await g.admin("POST", "/v1/admin/users/ann/keypair")
        again = Caller(g.url, {**fresh, **keys})
        assert (await again.fetch("GET", "/v1/sessions", auth="token")).code == 200
        assert (await again.fetch("GET", "/v1/sessions")).code == 200


async def test_rotating_a_token_or_keypair_revokes_the_old_one_at_once(tmp_path: Path):
    async with running_gateway(tmp_path) as g:
        ann = await g.user("ann")
        assert (await ann.fetch("GET", "/v1/sessions", auth="token")).code == 200
        new = await g.admin("POST", "/v1/admin/users/ann/token")
        assert (await ann.fetch("GET", "/v1/sessions", auth="token")).code == 401
        assert (
            await Caller(g.url, {**ann.creds, **new}).fetch("GET", "/v1/sessions", auth="token")
        ).code == 200
        keys = await g.admin("POST", "/v1/admin/users/ann/keypair")
        assert (await ann.fetch("GET", "/v1/sessions")).code == 401
        assert (await Caller(g.url, {**ann.creds, **keys}).fetch("GET", "/v1/sessions")).code == 200
        # Only admins rotate.
        other = await g.user("ben")
        assert (await other.fetch("POST", "/v1/admin/users/ann/token")).code == 403


async def test_users_see_agents_capacity_but_not_where_they_are_or_whose_kernels_they_hold(tmp_path: Path):
    async with running_gateway(tmp_path) as g:
        ann = await g.user("ann")
        agent = await g.agent("host-a")
        (seen,) = (await ann("GET", "/v1/agents"))["agents"]
        assert seen["capacity"] == {"cpu": "4", "mem": str(8 * 2**30)}
        assert not {"address", "devices", "kernels"} & set(seen)
        (full,) = (await g.admin("GET", "/v1/agents"))["agents"]
        assert full["address"] == "127.0.0.1" and "devices" in full
        agent.close()
