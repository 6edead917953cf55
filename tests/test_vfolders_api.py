"""vfolders through /v1: ownership, sharing with permissions, trash, quotas, the file API, mounts.

The gateway runs in the test's process with its own data directory (its default volume lives
there); files are checked on that disk directly, as a kernel would see them.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import urllib.parse
from pathlib import Path
from typing import Any

import pytest

from backendai_jupyter.common import signing
from backendai_jupyter.common.wire import KERNEL_HOME, CreateKernel

from .inproc import Caller, InprocGateway, running_gateway


def q(path: str) -> str:
    return urllib.parse.quote(path, safe="")


async def put(c: Caller, vid: str, path: str, data: bytes, **params: str) -> Any:
    extra = "".join(f"&{k}={v}" for k, v in params.items())
    return await c.fetch("PUT", f"/v1/vfolders/{vid}/content?path={q(path)}{extra}", raw=data)


async def get_bytes(c: Caller, vid: str, path: str, headers: dict[str, str] | None = None) -> Any:
    p = f"/v1/vfolders/{vid}/download?path={q(path)}"
    h = c.signed("GET", p)
    h.update(headers or {})
    return await c.http.fetch(c.url + p, headers=h, raise_error=False)


def error(resp: Any) -> dict[str, Any]:
    return json.loads(resp.body)


def vfolder_dir(g: InprocGateway, vf: dict[str, Any]) -> Path:
    svc = g.gw.vfolders
    return Path(svc.volumes[vf["volume"]]) / svc_owner(g, vf) / vf["id"]


def svc_owner(g: InprocGateway, vf: dict[str, Any]) -> str:
    # The owner's user id is the first level under the volume.
    vol = Path(g.gw.vfolders.volumes[vf["volume"]])
    return next(p.name for p in vol.iterdir() if (p / vf["id"]).is_dir())


async def test_create_list_rename_trash_restore_and_purge(tmp_path: Path):
    async with running_gateway(tmp_path) as g:
        alice = await g.user("alice")
        vf = await alice("POST", "/v1/vfolders", {"name": "data"})
        assert vf["permission"] == "owner" and vf["writable"] and vf["owner"] == "alice"
        assert vf["mount_path"] == f"{KERNEL_HOME}/data"
        assert vf["quota_enforced_in_kernels"] is False
        assert vfolder_dir(g, vf).is_dir()
        # Names: unique per owner, no slash, no leading dot, at most 64 characters.
        for bad, word in [("a/b", "'/'"), (".hidden", "dot"), ("x" * 65, "64"), ("", "required")]:
            resp = await alice.fetch("POST", "/v1/vfolders", {"name": bad})
            assert resp.code == 400 and word in error(resp)["title"], (bad, resp.body)
        resp = await alice.fetch("POST", "/v1/vfolders", {"name": "data"})
        assert resp.code == 409 and "already" in error(resp)["title"]
        listed = await alice("GET", "/v1/vfolders")
        assert [v["name"] for v in listed["vfolders"]] == ["data"]

        renamed = await alice("PATCH", f"/v1/vfolders/{vf['id']}", {"name": "results"})
        assert renamed["name"] == "results"
        await put(alice, vf["id"], "keep.txt", b"kept")
        trashed = await alice("DELETE", f"/v1/vfolders/{vf['id']}")
        assert trashed["status"] == "trash"
        assert (await alice("GET", "/v1/vfolders"))["vfolders"] == []
        assert [v["id"] for v in (await alice("GET", "/v1/vfolders?trash=1"))["vfolders"]] == [vf["id"]]
        resp = await alice.fetch("GET", f"/v1/vfolders/{vf['id']}/files?path=")
        assert resp.code == 404  # a trashed vfolder has no files to serve
        # Its name is free while it is in the trash; restoring it then needs the name back.
        other = await alice("POST", "/v1/vfolders", {"name": "results"})
        resp = await alice.fetch("POST", f"/v1/vfolders/{vf['id']}/restore")
        assert resp.code == 409
        await alice("PATCH", f"/v1/vfolders/{other['id']}", {"name": "other"})
        restored = await alice("POST", f"/v1/vfolders/{vf['id']}/restore")
        assert restored["status"] == "ready"
        assert (await get_bytes(alice, vf["id"], "keep.txt")).body == b"kept"

        resp = await alice.fetch("POST", f"/v1/vfolders/{vf['id']}/purge")
        assert resp.code == 409 and "trash" in error(resp)["title"]
        where = vfolder_dir(g, vf)
        await alice("DELETE", f"/v1/vfolders/{vf['id']}")
        await alice("POST", f"/v1/vfolders/{vf['id']}/purge")
        assert not where.exists()
        assert (await alice.fetch("GET", f"/v1/vfolders/{vf['id']}")).code == 404


async def _share(owner: Caller, invitee: Caller, vid: str, permission: str) -> dict[str, Any]:
    inv = await owner(
        "POST", f"/v1/vfolders/{vid}/invitations", {"user": invitee_name(invitee), "permission": permission}
    )
    received = (await invitee("GET", "/v1/vfolders/invitations"))["received"]
    assert [i["id"] for i in received] == [inv["id"]]
    return await invitee("POST", f"/v1/vfolders/invitations/{inv['id']}/accept")


def invitee_name(c: Caller) -> str:
    return str(c.creds["name"])


async def test_read_only_and_read_write_shares_are_enforced_by_the_file_api(tmp_path: Path):
    async with running_gateway(tmp_path) as g:
        alice, bob, carol = await g.user("alice"), await g.user("bob"), await g.user("carol")
        vf = await alice("POST", "/v1/vfolders", {"name": "project"})
        vid = vf["id"]
        assert (await put(alice, vid, "data.csv", b"a,b\n1,2\n")).code == 200
        await alice("POST", f"/v1/vfolders/{vid}/mkdir", {"path": "sub"})

        shared = await _share(alice, bob, vid, "ro")
        assert shared["permission"] == "ro" and shared["writable"] is False
        mine = await bob("GET", "/v1/vfolders")
        assert [(v["name"], v["owner"], v["permission"]) for v in mine["vfolders"]] == [
            ("project", "alice", "ro")
        ]
        # Bob reads...
        assert (await get_bytes(bob, vid, "data.csv")).body == b"a,b\n1,2\n"
        names = [e["name"] for e in (await bob("GET", f"/v1/vfolders/{vid}/files?path="))["entries"]]
        assert names == ["data.csv", "sub"]
        # ...and every write is refused, leaving the files as they were.
        refusals = [
            await put(bob, vid, "data.csv", b"overwritten"),
            await put(bob, vid, "new.txt", b"x"),
            await bob.fetch("POST", f"/v1/vfolders/{vid}/mkdir", {"path": "d"}),
            await bob.fetch("POST", f"/v1/vfolders/{vid}/move", {"src": "data.csv", "dst": "moved.csv"}),
            await bob.fetch("POST", f"/v1/vfolders/{vid}/copy", {"src": "data.csv", "dst": "copy.csv"}),
            await bob.fetch("DELETE", f"/v1/vfolders/{vid}/files?path=data.csv"),
            await bob.fetch("POST", f"/v1/vfolders/{vid}/uploads", {"path": "big.bin", "size": 10}),
        ]
        for resp in refusals:
            assert resp.code == 403 and "read-only" in error(resp)["title"], resp.body
        listed = sorted(p.name for p in vfolder_dir(g, vf).iterdir())
        assert listed == ["data.csv", "sub"]
        # An invitee never deletes, renames or re-shares the vfolder, whatever their permission.
        await alice("PUT", f"/v1/vfolders/{vid}/shares/bob", {"permission": "rw"})
        for resp in [
            await bob.fetch("DELETE", f"/v1/vfolders/{vid}"),
            await bob.fetch("DELETE", f"/v1/vfolders/{vid}?force=1"),
            await bob.fetch("PATCH", f"/v1/vfolders/{vid}", {"name": "mine-now"}),
            await bob.fetch("POST", f"/v1/vfolders/{vid}/invitations", {"user": "carol", "permission": "rw"}),
            await bob.fetch("PUT", f"/v1/vfolders/{vid}/shares/bob", {"permission": "rw"}),
            await bob.fetch("DELETE", f"/v1/vfolders/{vid}/shares/bob"),
            await bob.fetch("GET", f"/v1/vfolders/{vid}/shares"),
        ]:
            assert resp.code == 403 and "owner" in error(resp)["title"], resp.body
        assert (await alice("GET", f"/v1/vfolders/{vid}"))["name"] == "project"
        # With rw, bob writes; alice sees it.
        assert (await put(bob, vid, "sub/bob.txt", b"from bob")).code == 200
        assert (await get_bytes(alice, vid, "sub/bob.txt")).body == b"from bob"
        # Carol, never invited, sees nothing of it: 404 everywhere, as if it did not exist.
        for method, path in [
            ("GET", f"/v1/vfolders/{vid}"),
            ("GET", f"/v1/vfolders/{vid}/files?path="),
            ("GET", f"/v1/vfolders/{vid}/download?path=data.csv"),
            ("POST", f"/v1/vfolders/{vid}/leave"),
        ]:
            assert (await carol.fetch(method, path)).code == 404
        assert (await put(carol, vid, "x", b"x")).code == 404
        # Revoked: bob no longer has it. Leaving works the same way from bob's side.
        await alice("DELETE", f"/v1/vfolders/{vid}/shares/bob")
        assert (await bob.fetch("GET", f"/v1/vfolders/{vid}")).code == 404
        await _share(alice, bob, vid, "rw")
        await bob("POST", f"/v1/vfolders/{vid}/leave")
        assert (await bob("GET", "/v1/vfolders"))["vfolders"] == []


async def test_invitations_can_be_rejected_canceled_and_renamed_on_a_name_clash(tmp_path: Path):
    async with running_gateway(tmp_path) as g:
        alice, bob = await g.user("alice"), await g.user("bob")
        vf = await alice("POST", "/v1/vfolders", {"name": "data"})
        await bob("POST", "/v1/vfolders", {"name": "data"})
        inv = await alice("POST", f"/v1/vfolders/{vf['id']}/invitations", {"user": "bob", "permission": "ro"})
        assert (await alice("GET", "/v1/vfolders/invitations"))["sent"][0]["id"] == inv["id"]
        # Bob has a "data" of his own: accepting asks for another name for this one.
        resp = await bob.fetch("POST", f"/v1/vfolders/invitations/{inv['id']}/accept")
        assert resp.code == 409 and "name" in error(resp)["title"]
        shared = await bob("POST", f"/v1/vfolders/invitations/{inv['id']}/accept", {"name": "alices-data"})
        assert shared["name"] == "alices-data" and shared["mount_path"] == f"{KERNEL_HOME}/alices-data"
        assert sorted(v["name"] for v in (await bob("GET", "/v1/vfolders"))["vfolders"]) == [
            "alices-data",
            "data",
        ]

        other = await alice("POST", "/v1/vfolders", {"name": "other"})
        inv2 = await alice(
            "POST", f"/v1/vfolders/{other['id']}/invitations", {"user": "bob", "permission": "rw"}
        )
        await bob("POST", f"/v1/vfolders/invitations/{inv2['id']}/reject")
        assert (await bob.fetch("GET", f"/v1/vfolders/{other['id']}")).code == 404
        inv3 = await alice(
            "POST", f"/v1/vfolders/{other['id']}/invitations", {"user": "bob", "permission": "rw"}
        )
        # Only the inviter cancels; the invitee cannot accept a canceled invitation.
        assert (await bob.fetch("DELETE", f"/v1/vfolders/invitations/{inv3['id']}")).code == 403
        await alice("DELETE", f"/v1/vfolders/invitations/{inv3['id']}")
        resp = await bob.fetch("POST", f"/v1/vfolders/invitations/{inv3['id']}/accept")
        assert resp.code == 404
        # Invitation ids are no use to anyone else.
        carol = await g.user("carol")
        inv4 = await alice(
            "POST", f"/v1/vfolders/{other['id']}/invitations", {"user": "bob", "permission": "rw"}
        )
        assert (await carol.fetch("POST", f"/v1/vfolders/invitations/{inv4['id']}/accept")).code == 404


async def test_quota_refusals_name_the_quota_and_leave_nothing_behind(tmp_path: Path):
    async with running_gateway(tmp_path) as g:
        alice = await g.user("alice")
        vf = await alice("POST", "/v1/vfolders", {"name": "small", "quota": 1000})
        vid = vf["id"]
        assert (await put(alice, vid, "a.bin", b"a" * 800)).code == 200
        assert (await alice("GET", f"/v1/vfolders/{vid}"))["usage_bytes"] == 800
        resp = await put(alice, vid, "b.bin", b"b" * 300)
        assert resp.code == 413 and error(resp)["type"] == "quota-exceeded"
        assert "quota is 1.0 kB" in error(resp)["title"]
        # Overwriting a file frees its old size first: replacing a.bin with 900 bytes fits.
        assert (await put(alice, vid, "a.bin", b"c" * 900)).code == 200
        resp = await alice.fetch("POST", f"/v1/vfolders/{vid}/copy", {"src": "a.bin", "dst": "a2.bin"})
        assert resp.code == 413
        resp = await alice.fetch("POST", f"/v1/vfolders/{vid}/uploads", {"path": "big.bin", "size": 5000})
        assert resp.code == 413
        root = vfolder_dir(g, vf)
        assert sorted(p.name for p in root.iterdir()) == ["a.bin"]
        assert (root / "a.bin").read_bytes() == b"c" * 900
        staging = Path(g.gw.vfolders.volumes["local"]) / ".staging"
        assert list(staging.iterdir()) == []
        assert (await alice("GET", f"/v1/vfolders/{vid}"))["usage_bytes"] == 900
        # What a kernel writes past the quota is measured; the API then refuses every write.
        (root / "kernel.bin").write_bytes(b"k" * 500)
        measured = await alice("POST", f"/v1/vfolders/{vid}/usage")
        assert measured["usage_bytes"] == 1400
        assert (await put(alice, vid, "tiny.txt", b"x")).code == 413
        # Deleting gives the room back.
        await alice("DELETE", f"/v1/vfolders/{vid}/files?path=kernel.bin")
        await alice("DELETE", f"/v1/vfolders/{vid}/files?path=a.bin")
        assert (await alice("GET", f"/v1/vfolders/{vid}"))["usage_bytes"] == 0
        assert (await put(alice, vid, "tiny.txt", b"x")).code == 200
        # A file a kernel wrote since the last measurement, deleted through the API, frees no room
        # that was never counted: the usage never goes below zero.
        (root / "unmeasured.bin").write_bytes(b"u" * 700)
        await alice("DELETE", f"/v1/vfolders/{vid}/files?path=unmeasured.bin")
        assert (await alice("GET", f"/v1/vfolders/{vid}"))["usage_bytes"] == 0


async def test_policy_limits_the_number_and_total_quota_of_vfolders(tmp_path: Path):
    async with running_gateway(tmp_path) as g:
        await g.admin("PUT", "/v1/admin/policies/small", {"max_vfolders": 2, "max_quota_bytes": "1m"})
        alice = await g.user("alice", policy="small")
        a = await alice("POST", "/v1/vfolders", {"name": "a", "quota": "600k"})
        resp = await alice.fetch("POST", "/v1/vfolders", {"name": "b", "quota": "600k"})
        assert resp.code == 403 and "policy small" in error(resp)["title"], resp.body
        await alice("POST", "/v1/vfolders", {"name": "b", "quota": "400k"})
        resp = await alice.fetch("POST", "/v1/vfolders", {"name": "c", "quota": "1k"})
        assert resp.code == 403 and "allows 2" in error(resp)["title"]
        resp = await alice.fetch("PATCH", f"/v1/vfolders/{a['id']}", {"quota": "700k"})
        assert resp.code == 403
        policy = await g.admin("GET", "/v1/admin/policies")
        assert policy["policies"][0]["max_vfolders"] == 2
        assert policy["policies"][0]["max_quota_bytes"] == 2**20


ESCAPES = [
    ("../x", 400),
    ("sub/../../x", 400),
    ("/etc/passwd", 400),
    ("a\0b", 400),
    ("n" * 256, 400),
    ("/".join(["d"] * 2100), 400),
]


async def test_no_path_leads_outside_its_vfolder(tmp_path: Path):
    async with running_gateway(tmp_path) as g:
        alice, bob = await g.user("alice"), await g.user("bob")
        vf = await alice("POST", "/v1/vfolders", {"name": "mine"})
        bobs = await bob("POST", "/v1/vfolders", {"name": "secret"})
        await put(bob, bobs["id"], "private.txt", b"bob's secret")
        vid, root = vf["id"], vfolder_dir(g, vf)
        for path, status in ESCAPES:
            for resp in [
                await get_bytes(alice, vid, path),
                await alice.fetch("GET", f"/v1/vfolders/{vid}/files?path={q(path)}"),
                await put(alice, vid, path, b"x"),
                await alice.fetch("POST", f"/v1/vfolders/{vid}/mkdir", {"path": path}),
                await alice.fetch("DELETE", f"/v1/vfolders/{vid}/files?path={q(path)}"),
            ]:
                assert resp.code == status, (path[:40], resp.code, resp.body[:200])
        # Links a kernel planted: to the host's /etc, to another user's vfolder (absolute and
        # relative), and a directory swapped for a link. None is followed out.
        bob_dir = vfolder_dir(g, bobs)
        os.symlink("/etc", root / "etc")
        os.symlink(str(bob_dir), root / "bob-abs")
        os.symlink(Path("..", "..", bob_dir.parent.name, bob_dir.name), root / "bob-rel")
        os.symlink("bob-rel/private.txt", root / "chain")
        for path in ["etc/passwd", "bob-abs/private.txt", "bob-rel/private.txt", "chain"]:
            resp = await get_bytes(alice, vid, path)
            assert resp.code == 403 and b"bob's secret" not in resp.body and b"root:" not in resp.body, path
            resp = await put(alice, vid, path, b"planted")
            assert resp.code == 403, path
            resp = await alice.fetch("POST", f"/v1/vfolders/{vid}/copy", {"src": path, "dst": "loot"})
            assert resp.code == 403, path
        resp = await alice.fetch(
            "POST", f"/v1/vfolders/{vid}/move", {"src": "bob-abs/private.txt", "dst": "x"}
        )
        assert resp.code == 403
        resp = await alice.fetch("GET", f"/v1/vfolders/{vid}/files?path=bob-abs")
        assert resp.code == 403
        # Deleting a link removes the link, never what it points at.
        await alice("DELETE", f"/v1/vfolders/{vid}/files?path=bob-abs")
        assert (bob_dir / "private.txt").read_bytes() == b"bob's secret"
        assert not (root / "loot").exists() and not (root / "x").exists()
        # The listing shows the links as links.
        entries = {
            e["name"]: e["type"] for e in (await alice("GET", f"/v1/vfolders/{vid}/files?path="))["entries"]
        }
        assert entries["etc"] == "symlink" and entries["chain"] == "symlink"
        # A link that stays inside is followed.
        await put(alice, vid, "real.txt", b"inside")
        os.symlink("real.txt", root / "alias.txt")
        assert (await get_bytes(alice, vid, "alias.txt")).body == b"inside"


async def test_download_ranges_and_a_resumable_upload_that_survives_a_dropped_connection(tmp_path: Path):
    async with running_gateway(tmp_path) as g:
        alice = await g.user("alice")
        vf = await alice("POST", "/v1/vfolders", {"name": "big"})
        vid = vf["id"]
        blob = bytes(range(256)) * 4096  # 1 MiB
        up = await alice("POST", f"/v1/vfolders/{vid}/uploads", {"path": "dir/blob.bin", "size": len(blob)})
        assert up["offset"] == 0
        resp = await alice.fetch("POST", f"/v1/vfolders/{vid}/mkdir", {"path": "dir"})
        assert resp.code == 201
        uid = up["upload_id"]
        path = f"/v1/vfolders/{vid}/uploads/{uid}"

        async def chunk(offset: int, data: bytes) -> Any:
            h = alice.signed("PATCH", path, data)
            h["Upload-Offset"] = str(offset)
            return await alice.http.fetch(
                alice.url + path, method="PATCH", headers=h, body=data, raise_error=False
            )

        first = await chunk(0, blob[:300_000])
        assert first.code == 200 and json.loads(first.body)["offset"] == 300_000
        # A connection that drops halfway through a chunk: that chunk is undone, not half kept.
        host, port = alice.url.split("//")[1].split(":")
        data = blob[300_000:600_000]
        h = alice.signed("PATCH", path, data)
        head = f"PATCH {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len(data)}\r\n"
        head += "Upload-Offset: 300000\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in h.items()) + "\r\n"
        with socket.create_connection((host, int(port))) as s:
            s.sendall(head.encode() + data[:100_000])
            await asyncio.sleep(0.3)
        await asyncio.sleep(0.3)
        status = await alice("GET", path)
        assert status["offset"] == 300_000 and status["done"] is False
        # A chunk at the wrong offset is told where to resume.
        wrong = await chunk(0, blob[:10])
        assert wrong.code == 409 and error(wrong)["offset"] == 300_000
        # A chunk whose signature does not cover what arrived is refused and undone.
        h = alice.signed("PATCH", path, blob[300_000:400_000])
        h["Upload-Offset"] = "300000"
        forged = await alice.http.fetch(
            alice.url + path, method="PATCH", headers=h, body=b"z" * 100_000, raise_error=False
        )
        assert forged.code == 401
        assert (await alice("GET", path))["offset"] == 300_000
        assert not (vfolder_dir(g, vf) / "dir" / "blob.bin").exists()  # nothing in place before the end
        last = await chunk(300_000, blob[300_000:])
        body = json.loads(last.body)
        assert body["done"] is True and body["entry"]["size"] == len(blob)
        assert (vfolder_dir(g, vf) / "dir" / "blob.bin").read_bytes() == blob
        assert (await alice.fetch("GET", path)).code == 404  # finished uploads are gone

        whole = await get_bytes(alice, vid, "dir/blob.bin")
        assert whole.code == 200 and whole.body == blob
        entry = json.loads(whole.headers["X-BackendAI-Entry"])
        assert entry["size"] == len(blob) and entry["type"] == "file"
        part = await get_bytes(alice, vid, "dir/blob.bin", {"Range": "bytes=1000-1999"})
        assert part.code == 206 and part.body == blob[1000:2000]
        assert part.headers["Content-Range"] == f"bytes 1000-1999/{len(blob)}"
        tail = await get_bytes(alice, vid, "dir/blob.bin", {"Range": "bytes=-10"})
        assert tail.body == blob[-10:]
        assert (await get_bytes(alice, vid, "dir/blob.bin", {"Range": f"bytes={len(blob)}-"})).code == 416


async def test_a_body_whose_signature_fails_writes_nothing(tmp_path: Path):
    async with running_gateway(tmp_path) as g:
        alice = await g.user("alice")
        vf = await alice("POST", "/v1/vfolders", {"name": "v"})
        path = f"/v1/vfolders/{vf['id']}/content?path=f.txt"
        h = signing.sign(alice.creds["access_key"], alice.creds["secret_key"], "PUT", path, b"signed body")
        resp = await alice.http.fetch(
            alice.url + path, method="PUT", headers=h, body=b"other body!", raise_error=False
        )
        assert resp.code == 401
        assert list(vfolder_dir(g, vf).iterdir()) == []
        # Chunked bodies (no length) are refused before anything is read.
        resp = await alice.fetch("PUT", path, raw=b"")
        assert resp.code == 200  # an empty file is fine
        assert (vfolder_dir(g, vf) / "f.txt").read_bytes() == b""


async def test_file_operations_mkdir_move_copy_delete_and_stat(tmp_path: Path):
    async with running_gateway(tmp_path) as g:
        alice = await g.user("alice")
        vid = (await alice("POST", "/v1/vfolders", {"name": "w"}))["id"]
        await alice("POST", f"/v1/vfolders/{vid}/mkdir", {"path": "a/b/c", "parents": True})
        await put(alice, vid, "a/b/c/f.txt", b"hello")
        assert (await alice.fetch("POST", f"/v1/vfolders/{vid}/mkdir", {"path": "a"})).code == 409
        copied = await alice("POST", f"/v1/vfolders/{vid}/copy", {"src": "a", "dst": "a-copy"})
        assert copied["type"] == "directory"
        assert (await get_bytes(alice, vid, "a-copy/b/c/f.txt")).body == b"hello"
        assert (await alice("GET", f"/v1/vfolders/{vid}"))["usage_bytes"] == 10
        await alice("POST", f"/v1/vfolders/{vid}/move", {"src": "a-copy/b/c/f.txt", "dst": "g.txt"})
        stat = await alice("GET", f"/v1/vfolders/{vid}/stat?path=g.txt")
        assert stat["size"] == 5 and stat["type"] == "file"
        resp = await alice.fetch("POST", f"/v1/vfolders/{vid}/move", {"src": "g.txt", "dst": "a/b/c/f.txt"})
        assert resp.code == 409
        resp = await alice.fetch("DELETE", f"/v1/vfolders/{vid}/files?path=a")
        assert resp.code == 409  # not empty, not recursive
        await alice("DELETE", f"/v1/vfolders/{vid}/files?path=a&recursive=1")
        assert (await alice.fetch("GET", f"/v1/vfolders/{vid}/stat?path=a")).code == 404
        assert (await alice("GET", f"/v1/vfolders/{vid}"))["usage_bytes"] == 5
        assert (await put(alice, vid, "g.txt", b"again", exclusive="1")).code == 409


async def test_mounts_are_checked_at_request_time_and_sent_to_the_agent(tmp_path: Path):
    async with running_gateway(tmp_path) as g:
        agent = await g.agent("agent-1")
        alice, bob, carol = await g.user("alice"), await g.user("bob"), await g.user("carol")
        vf = await alice("POST", "/v1/vfolders", {"name": "proj"})
        await alice("POST", f"/v1/vfolders/{vf['id']}/mkdir", {"path": "nb/deep", "parents": True})
        await _share(alice, bob, vf["id"], "ro")
        image = "backendai-jupyter/python:latest"
        # Carol may not mount it, by name or by id: refused before anything is placed.
        for ref in ["proj", vf["id"]]:
            resp = await carol.fetch("POST", "/v1/sessions", {"image": image, "mounts": [ref]})
            assert resp.code == 404, resp.body
        assert (await carol("GET", "/v1/sessions"))["sessions"] == []
        # Bob mounts the ro share: read-only, asked rw or not.
        s = await bob("POST", "/v1/sessions", {"image": image, "mounts": ["proj"]})
        await bob.wait_state(s["id"], {"RUNNING"})
        order = CreateKernel.from_json(next(p for m, p in agent.calls if m == "create_kernel"))
        assert [(m.name, m.mode, m.target) for m in order.mounts] == [("proj", "ro", f"{KERNEL_HOME}/proj")]
        assert order.mounts[0].subpath.endswith(vf["id"])
        # Alice's notebook folder inside the vfolder: mounted, and the kernel starts there.
        s2 = await alice(
            "POST", "/v1/sessions", {"image": image, "working_dir": f"{KERNEL_HOME}/proj/nb/deep"}
        )
        await alice.wait_state(s2["id"], {"RUNNING"})
        order2 = CreateKernel.from_json([p for m, p in agent.calls if m == "create_kernel"][-1])
        assert [(m.name, m.mode) for m in order2.mounts] == [("proj", "rw")]
        assert order2.working_dir == f"{KERNEL_HOME}/proj/nb/deep"
        model = await alice("GET", f"/v1/sessions/{s2['id']}")
        assert model["working_dir"] == f"{KERNEL_HOME}/proj/nb/deep" and model["mounts"][0]["mode"] == "rw"
        # A working directory outside every vfolder keeps today's behaviour: nothing mounted.
        s3 = await alice("POST", "/v1/sessions", {"image": image, "working_dir": "/somewhere/else"})
        assert s3["mounts"] == [] and s3["working_dir"] == ""
        # Deleting a mounted vfolder is refused, naming the sessions; forced, it goes to the
        # trash and the kernels keep it; purging waits until they end.
        resp = await alice.fetch("DELETE", f"/v1/vfolders/{vf['id']}")
        assert resp.code == 409 and s2["id"] in error(resp)["title"] and s["id"] in error(resp)["sessions"]
        await alice("DELETE", f"/v1/vfolders/{vf['id']}?force=1")
        resp = await alice.fetch("POST", f"/v1/vfolders/{vf['id']}/purge")
        assert resp.code == 409 and "mounted" in error(resp)["title"]
        for sid, who in [(s["id"], bob), (s2["id"], alice), (s3["id"], alice)]:
            await who("DELETE", f"/v1/sessions/{sid}")
            await who.wait_state(sid, {"TERMINATED"})
        await alice("POST", f"/v1/vfolders/{vf['id']}/purge")


@pytest.mark.parametrize("spec", [[1], [{"name": "x", "mode": "wx"}], "proj", [""]])
async def test_malformed_mounts_are_refused(tmp_path: Path, spec: Any):
    async with running_gateway(tmp_path) as g:
        alice = await g.user("alice")
        resp = await alice.fetch("POST", "/v1/sessions", {"image": "x", "mounts": spec})
        assert resp.code == 400 and "mount" in error(resp)["title"]


async def _orders(agent: Any, count: int, timeout: float = 20) -> list[CreateKernel]:
    async with asyncio.timeout(timeout):
        while True:
            found = [CreateKernel.from_json(p) for m, p in agent.calls if m == "create_kernel"]
            if len(found) >= count:
                return found
            await asyncio.sleep(0.05)


async def test_kernel_gateway_clients_name_vfolders_and_the_notebooks_folder(tmp_path: Path):
    """``jupyter lab --gateway-url`` sends the notebook's folder as KERNEL_WORKING_DIR; with the vfolder
    contents manager that is its place under the kernel home. KERNEL_VFOLDERS names more mounts."""
    async with running_gateway(tmp_path) as g:
        agent = await g.agent("host-a")
        ann = await g.user("ann")
        proj = await ann("POST", "/v1/vfolders", {"name": "proj"})
        await ann("POST", f"/v1/vfolders/{proj['id']}/mkdir", {"path": "notebooks"})
        await ann("POST", "/v1/vfolders", {"name": "refs"})
        env = {"KERNEL_WORKING_DIR": f"{KERNEL_HOME}/proj/notebooks", "KERNEL_VFOLDERS": "refs"}
        await ann("POST", "/api/kernels", {"name": "backendai-python3", "env": env}, auth="token")
        (order,) = await _orders(agent, 1)
        assert sorted((m.name, m.mode) for m in order.mounts) == [("proj", "rw"), ("refs", "rw")]
        assert order.working_dir == f"{KERNEL_HOME}/proj/notebooks"
        # A working directory that is no vfolder of the caller's (a local path) changes nothing.
        env = {"KERNEL_WORKING_DIR": "/home/someone/notebooks"}
        await ann("POST", "/api/kernels", {"name": "backendai-python3", "env": env}, auth="token")
        order = (await _orders(agent, 2))[1]
        assert order.mounts == [] and order.working_dir == ""
        # Naming a vfolder one may not use fails the start with the reason.
        ben = await g.user("ben")
        resp = await ben.fetch(
            "POST",
            "/api/kernels",
            {"name": "backendai-python3", "env": {"KERNEL_VFOLDERS": "refs"}},
            auth="token",
        )
        assert resp.code >= 400 and b"refs" in resp.body, resp.body
        assert len(await _orders(agent, 2)) == 2
        agent.close()


async def test_a_kernelspec_names_mounts_for_its_kernels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The provisioner's ``mounts`` (kernelspec config) and the cwd jupyter_client passes."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import AsyncKernelManager

    async with running_gateway(tmp_path) as g:
        agent = await g.agent("host-a")
        ann = await g.user("ann")
        await ann("POST", "/v1/vfolders", {"name": "data"})
        await ann("POST", "/v1/vfolders", {"name": "code"})
        spec_dir = tmp_path / "kernels" / "with-data"
        spec_dir.mkdir(parents=True)
        config = {"image": "backendai-jupyter/python:latest", "mounts": [{"name": "data", "mode": "ro"}]}
        spec_dir.joinpath("kernel.json").write_text(
            json.dumps(
                {
                    "display_name": "with data",
                    "language": "python",
                    "argv": ["python", "-f", "{connection_file}"],
                    "metadata": {
                        "kernel_provisioner": {"provisioner_name": "backendai-provisioner", "config": config}
                    },
                }
            )
        )
        for name, value in [
            ("BACKENDAI_GATEWAY_URL", g.url),
            ("BACKENDAI_ACCESS_KEY", ann.creds["access_key"]),
            ("BACKENDAI_SECRET_KEY", ann.creds["secret_key"]),
        ]:
            monkeypatch.setenv(name, value)
        km = AsyncKernelManager(
            kernel_name="with-data", kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(spec_dir.parent)])
        )
        await km.start_kernel(cwd=Path(KERNEL_HOME, "code"))  # nbclient and `jupyter execute` pass a Path
        try:
            (order,) = await _orders(agent, 1)
            assert sorted((m.name, m.mode) for m in order.mounts) == [("code", "rw"), ("data", "ro")]
            assert order.working_dir == f"{KERNEL_HOME}/code"
        finally:
            await km.shutdown_kernel(now=True)
        agent.close()


async def raw_http(c: Caller, head: bytes, body: bytes = b"") -> tuple[int, bytes, bytes]:
    """One request written byte for byte (headers a client library would not send); the answer's
    status, headers and body."""
    host, port = c.url.split("//")[1].split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(head + b"Connection: close\r\n\r\n" + body)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    headers, _, content = answer.partition(b"\r\n\r\n")
    return int(headers.split(b" ")[1]), headers, content


def signed_head(c: Caller, method: str, path: str, body: bytes, extra: bytes) -> bytes:
    h = c.signed(method, path, body)
    head = f"{method} {path} HTTP/1.1\r\nHost: {c.url.split('//')[1]}\r\n".encode() + extra
    return head + "".join(f"{k}: {v}\r\n" for k, v in h.items()).encode()


async def test_numbers_in_headers_are_ascii_digits_or_refused(tmp_path: Path):
    # "²" is a digit to str.isdigit() but not to int(): it was a 500, not a 400.
    async with running_gateway(tmp_path) as g:
        alice = await g.user("alice")
        vid = (await alice("POST", "/v1/vfolders", {"name": "v"}))["id"]
        up = await alice("POST", f"/v1/vfolders/{vid}/uploads", {"path": "f.bin", "size": 3})
        path = f"/v1/vfolders/{vid}/uploads/{up['upload_id']}"
        bad_offset = b"Content-Length: 3\r\nUpload-Offset: \xb2\r\n"
        status, _, body = await raw_http(alice, signed_head(alice, "PATCH", path, b"abc", bad_offset), b"abc")
        assert status == 400 and b"Upload-Offset" in body, body
        for method, target in [("PUT", f"/v1/vfolders/{vid}/content?path=g"), ("POST", "/v1/vfolders")]:
            head = signed_head(alice, method, target, b"abc", b"Content-Length: \xb2\r\n")
            status, _, body = await raw_http(alice, head, b"abc")
            assert status == 400 and b"Content-Length" in body, (method, body)
        # The upload is where it was, and goes on with a proper offset.
        assert (await alice("GET", path))["offset"] == 0
        offset = b"Content-Length: 3\r\nUpload-Offset: 0\r\n"
        status, _, body = await raw_http(alice, signed_head(alice, "PATCH", path, b"abc", offset), b"abc")
        assert status == 200 and json.loads(body)["done"] is True, body


async def test_download_errors_are_json_and_a_range_past_the_end_names_the_size(tmp_path: Path):
    async with running_gateway(tmp_path) as g:
        alice = await g.user("alice")
        vid = (await alice("POST", "/v1/vfolders", {"name": "v"}))["id"]
        await put(alice, vid, "a.txt", b"hello")
        # Refused before the handler runs (no credentials): JSON all the same, not text/html.
        resp = await alice.fetch("GET", f"/v1/vfolders/{vid}/download?path=a.txt", auth="none")
        assert resp.code == 401 and resp.headers["Content-Type"] == "application/json"
        assert error(resp)["type"] == "unauthorized"
        resp = await get_bytes(alice, vid, "nothing.txt")
        assert resp.code == 404 and resp.headers["Content-Type"] == "application/json"
        # 416 says how large the file is, so that the client can ask again.
        resp = await get_bytes(alice, vid, "a.txt", {"Range": "bytes=10-"})
        assert resp.code == 416 and resp.headers["Content-Type"] == "application/json"
        assert resp.headers["Content-Range"] == "bytes */5" and error(resp)["status"] == 416
        ok = await get_bytes(alice, vid, "a.txt", {"Range": "bytes=1-2"})
        assert ok.code == 206 and ok.body == b"el"
        assert ok.headers["Content-Type"] == "application/octet-stream"


async def test_sizes_and_counts_past_what_the_database_holds_are_refused(tmp_path: Path):
    # They were stored as given, and the database's overflow came back as a 500.
    async with running_gateway(tmp_path) as g:
        alice = await g.user("alice")
        for quota in [2**63, 10**30, "99999999999999999999g"]:
            resp = await alice.fetch("POST", "/v1/vfolders", {"name": "huge", "quota": quota})
            assert resp.code == 400 and "at most" in error(resp)["title"], (quota, resp.body)
        vf = await alice("POST", "/v1/vfolders", {"name": "huge", "quota": 2**63 - 1})
        assert vf["quota_bytes"] == 2**63 - 1
        resp = await alice.fetch("PATCH", f"/v1/vfolders/{vf['id']}", {"quota": 2**64})
        assert resp.code == 400 and "at most" in error(resp)["title"]
        for field, value in [("max_quota_bytes", 2**63), ("max_vfolders", 2**31), ("max_sessions", 2**31)]:
            resp = await g.admin.fetch("PUT", "/v1/admin/policies/big", {field: value})
            assert resp.code == 400 and field in error(resp)["title"], (field, resp.body)
        policy = await g.admin("PUT", "/v1/admin/policies/big", {"max_vfolders": 2**31 - 1})
        assert policy["max_vfolders"] == 2**31 - 1


async def test_every_upload_answer_names_its_path(tmp_path: Path):
    async with running_gateway(tmp_path) as g:
        alice = await g.user("alice")
        vid = (await alice("POST", "/v1/vfolders", {"name": "v"}))["id"]
        empty = await alice("POST", f"/v1/vfolders/{vid}/uploads", {"path": "empty.bin", "size": 0})
        assert empty["done"] is True and empty["path"] == "empty.bin"
        up = await alice("POST", f"/v1/vfolders/{vid}/uploads", {"path": "f.bin", "size": 4})
        path = f"/v1/vfolders/{vid}/uploads/{up['upload_id']}"
        assert up["path"] == (await alice("GET", path))["path"] == "f.bin"
        for offset, data in [(0, b"ab"), (2, b"cd")]:
            h = alice.signed("PATCH", path, data)
            h["Upload-Offset"] = str(offset)
            resp = await alice.http.fetch(
                alice.url + path, method="PATCH", headers=h, body=data, raise_error=False
            )
            assert resp.code == 200 and json.loads(resp.body)["path"] == "f.bin", resp.body


async def _usage_becomes(c: Caller, vid: str, expected: int, timeout: float = 10) -> None:
    async with asyncio.timeout(timeout):
        while True:
            if (await c("GET", f"/v1/vfolders/{vid}"))["usage_bytes"] == expected:
                return
            await asyncio.sleep(0.1)


async def test_what_kernels_write_shows_in_the_usage_without_asking(tmp_path: Path):
    """The vfolders running kernels mount are re-measured every vfolder_usage_interval, and once
    more when such a kernel ends."""
    async with running_gateway(tmp_path, vfolder_usage_interval=0.2) as g:
        agent = await g.agent("host-a")
        ann = await g.user("ann")
        vf = await ann("POST", "/v1/vfolders", {"name": "out"})
        s = await ann("POST", "/v1/sessions", {"image": "backendai-jupyter/python:latest", "mounts": ["out"]})
        await ann.wait_state(s["id"], {"RUNNING"})
        root = vfolder_dir(g, vf)
        (root / "written-by-the-kernel.bin").write_bytes(b"k" * 4096)  # as the kernel would
        await _usage_becomes(ann, vf["id"], 4096)
        # A vfolder no running kernel mounts is not walked on every round.
        other = await ann("POST", "/v1/vfolders", {"name": "idle"})
        (vfolder_dir(g, other) / "x.bin").write_bytes(b"x" * 100)
        await asyncio.sleep(0.6)
        assert (await ann("GET", f"/v1/vfolders/{other['id']}"))["usage_bytes"] == 0
        # The last writes of a kernel count once it is over.
        (root / "last.bin").write_bytes(b"l" * 1000)
        await ann("DELETE", f"/v1/sessions/{s['id']}")
        await ann.wait_state(s["id"], {"TERMINATED"})
        await _usage_becomes(ann, vf["id"], 5096)
        agent.close()
