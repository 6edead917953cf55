"""A real `jupyter server` with the vfolder contents manager, driven as JupyterLab drives it.

The gateway runs in the test's process (its file API needs no agent or Docker); the Jupyter
server is a process of its own, configured with one line, and talks to the gateway with a
user's keypair. Every request goes through jupyter_server's own contents, checkpoints and
files handlers.
"""

from __future__ import annotations

import json
from base64 import b64encode
from pathlib import Path
from typing import Any

import pytest
from nbformat.v4 import new_code_cell, new_notebook
from tornado import httpclient

from .inproc import running_gateway
from .stack import jupyter

TOKEN = "contents-token"
CM = "backendai_jupyter.provisioner.contents.VFolderContentsManager"
pytestmark = pytest.mark.asyncio(loop_scope="module")


class Lab:
    """What JupyterLab sends: the contents REST API with the server's token."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.http = httpclient.AsyncHTTPClient()

    async def fetch(self, method: str, path: str, body: Any = None) -> httpclient.HTTPResponse:
        data = json.dumps(body).encode() if body is not None else None
        if data is None and method in ("POST", "PUT", "PATCH"):
            data = b""
        return await self.http.fetch(
            self.url + path,
            method=method,
            body=data,
            headers={"Authorization": f"token {TOKEN}"},
            raise_error=False,
            request_timeout=60,
        )

    async def __call__(self, method: str, path: str, body: Any = None, status: int = 200) -> Any:
        resp = await self.fetch(method, path, body)
        assert resp.code == status, f"{method} {path}: {resp.code} {resp.body[:500]!r}"
        return json.loads(resp.body) if resp.body else None


async def test_jupyter_server_serves_vfolders_through_its_contents_api(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running_gateway(tmp_path) as g:
        ann = await g.user("ann")
        await ann("POST", "/v1/vfolders", {"name": "notes"})
        monkeypatch.setenv("BACKENDAI_GATEWAY_URL", g.url)
        monkeypatch.setenv("BACKENDAI_ACCESS_KEY", ann.creds["access_key"])
        monkeypatch.setenv("BACKENDAI_SECRET_KEY", ann.creds["secret_key"])
        monkeypatch.setenv("BACKENDAI_CLIENT_CONFIG", str(tmp_path / "no-client-config.json"))
        root = tmp_path / "server"
        root.mkdir()
        with jupyter("server", root, TOKEN, f"--ServerApp.contents_manager_class={CM}") as url:
            await _session(Lab(url))


async def _session(lab: Lab) -> None:
    # The file browser at the top: the user's vfolders.
    top = await lab("GET", "/api/contents?content=1")
    assert [m["name"] for m in top["content"]] == ["notes"]
    assert top["content"][0]["type"] == "directory"

    # New notebook from the launcher, edited and saved.
    nb = await lab("POST", "/api/contents/notes", {"type": "notebook"}, status=201)
    assert nb["path"] == "notes/Untitled.ipynb"
    doc = new_notebook(cells=[new_code_cell("print('hello')")])
    saved = await lab("PUT", "/api/contents/notes/Untitled.ipynb", {"type": "notebook", "content": doc})
    assert saved["type"] == "notebook" and saved["writable"] is True
    got = await lab("GET", "/api/contents/notes/Untitled.ipynb?content=1&hash=1")
    assert got["content"]["cells"][0]["source"] == "print('hello')"
    assert got["hash_algorithm"] == "sha256" and got["hash"]

    # Checkpoints: the first came with the first save; save one, change, revert.
    cps = await lab("GET", "/api/contents/notes/Untitled.ipynb/checkpoints")
    assert [c["id"] for c in cps] == ["checkpoint"]
    cp = await lab("POST", "/api/contents/notes/Untitled.ipynb/checkpoints", status=201)
    doc.cells[0].source = "changed"
    await lab("PUT", "/api/contents/notes/Untitled.ipynb", {"type": "notebook", "content": doc})
    await lab("POST", f"/api/contents/notes/Untitled.ipynb/checkpoints/{cp['id']}", status=204)
    reverted = await lab("GET", "/api/contents/notes/Untitled.ipynb")
    assert reverted["content"]["cells"][0]["source"] == "print('hello')"

    # An upload in chunks, as JupyterLab sends files over 1 MB, then served by /files/.
    data = b"x,y\n" + b"".join(b"%d,%d\n" % (i, 2 * i) for i in range(30000))
    pieces = [data[:100_000], data[100_000:200_000], data[200_000:]]
    for n, piece in zip((1, 2, -1), pieces, strict=True):
        model = {"type": "file", "format": "base64", "content": b64encode(piece).decode(), "chunk": n}
        up = await lab.fetch("PUT", "/api/contents/notes/data.csv", model)
        assert up.code in (200, 201), up.body
    assert json.loads(up.body)["size"] == len(data)
    raw = await lab.fetch("GET", "/files/notes/data.csv")
    assert raw.code == 200 and raw.body == data
    assert raw.headers["Content-Type"].startswith("text/csv")
    attached = await lab.fetch("GET", "/files/notes/data.csv?download=1")
    assert "attachment" in attached.headers["Content-Disposition"]
    assert (await lab.fetch("GET", "/files/notes/missing.csv")).code == 404
    assert (await lab.fetch("GET", "/files/notes")).code == 400

    # Rename, copy, new folder, delete.
    await lab("PATCH", "/api/contents/notes/data.csv", {"path": "notes/measurements.csv"})
    copied = await lab("POST", "/api/contents/notes", {"copy_from": "notes/measurements.csv"}, status=201)
    assert copied["path"] == "notes/measurements-Copy1.csv"
    folder = await lab("POST", "/api/contents/notes", {"type": "directory"}, status=201)
    assert folder["path"] == "notes/Untitled Folder"
    await lab("DELETE", "/api/contents/notes/measurements-Copy1.csv", status=204)
    listing = await lab("GET", "/api/contents/notes")
    assert sorted(m["name"] for m in listing["content"]) == [
        "Untitled Folder",
        "Untitled.ipynb",
        "measurements.csv",
    ]

    # What the top level refuses, with the reason JupyterLab shows.
    refused = await lab.fetch(
        "PUT", "/api/contents/loose.txt", {"type": "file", "format": "text", "content": ""}
    )
    assert refused.code == 403 and "vfolder" in json.loads(refused.body)["message"]
    assert (await lab.fetch("GET", "/api/contents/notes/.hidden")).code == 404
    # A new folder at the top is a new vfolder.
    await lab("PUT", "/api/contents/results", {"type": "directory"}, status=201)
    top = await lab("GET", "/api/contents")
    assert sorted(m["name"] for m in top["content"]) == ["notes", "results"]
