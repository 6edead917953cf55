"""One behaviour, two contents managers: jupyter_server's own on a directory, ours on a vfolder.

Every case in the first part runs against both, side by side: jupyter_server's
``AsyncLargeFileManager`` (the default ``FileContentsManager`` with chunked uploads) on a
temporary directory, and :class:`VFolderContentsManager` with ``root_vfolder`` set, on a fresh
vfolder of the real gateway running in this process (its file API needs no agent). Whatever the
file manager does is what ours must do. The second part covers what only vfolders have: the top
level listing the user's vfolders, and read-only shares.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
from base64 import b64decode, b64encode, encodebytes
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import nbformat
import pytest
import pytest_asyncio
from jupyter_core.utils import ensure_async
from jupyter_server.services.contents.largefilemanager import AsyncLargeFileManager
from nbformat import sign
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output
from tornado import web

from backendai_jupyter.common.wire import KERNEL_HOME
from backendai_jupyter.provisioner.contents import VFolderContentsManager, vfolder_of_cwd
from backendai_jupyter.provisioner.extension import use_vfolder_cwd

from .inproc import Caller, InprocGateway, running_gateway
from .test_vfolders_api import vfolder_dir

pytestmark = pytest.mark.asyncio(loop_scope="module")

_names = itertools.count()


def _notary() -> sign.NotebookNotary:
    return sign.NotebookNotary(db_file=":memory:", secret=b"contents-behaviour")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def gateway(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[InprocGateway]:
    async with running_gateway(tmp_path_factory.mktemp("contents")) as g:
        yield g


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def ann(gateway: InprocGateway) -> Caller:
    return await gateway.user("ann")


def vfolder_cm(g: InprocGateway, user: Caller, **traits: Any) -> VFolderContentsManager:
    cm = VFolderContentsManager(
        gateway_url=g.url, access_key=user.creds["access_key"], secret_key=user.creds["secret_key"], **traits
    )
    cm.notary = _notary()
    return cm


async def new_vfolder(user: Caller, name: str | None = None) -> dict[str, Any]:
    return dict(await user("POST", "/v1/vfolders", {"name": name or f"vf{next(_names)}"}))


@pytest_asyncio.fixture(params=["local", "vfolder"], loop_scope="module")
async def cm(request: pytest.FixtureRequest, tmp_path: Path, gateway: InprocGateway, ann: Caller) -> Any:
    """Each contents manager, on an empty root of its own."""
    if request.param == "local":
        root = tmp_path / "root"
        root.mkdir()
        manager: Any = AsyncLargeFileManager(root_dir=str(root), delete_to_trash=False)
        manager.notary = _notary()
        manager.disk_root = root  # where its files are, for what only the disk can make
        return manager
    vf = await new_vfolder(ann)
    manager = vfolder_cm(gateway, ann, root_vfolder=vf["name"])
    manager.disk_root = vfolder_dir(gateway, vf)
    return manager


def notebook(*sources: str) -> dict[str, Any]:
    nb = new_notebook(cells=[new_code_cell(s) for s in sources] or [new_markdown_cell("# empty")])
    return dict(nb)


async def save_text(cm: Any, path: str, text: str) -> dict[str, Any]:
    return dict(await cm.save({"type": "file", "format": "text", "content": text}, path))


async def save_bytes(cm: Any, path: str, data: bytes) -> dict[str, Any]:
    model = {"type": "file", "format": "base64", "content": b64encode(data).decode()}
    return dict(await cm.save(model, path))


async def save_nb(cm: Any, path: str, nb: dict[str, Any] | Any) -> dict[str, Any]:
    return dict(await cm.save({"type": "notebook", "content": nb}, path))


async def status_of(coro: Any) -> int:
    with pytest.raises(web.HTTPError) as exc:
        await coro
    return int(exc.value.status_code)


async def exists(cm: Any, path: str) -> bool:
    return bool(await ensure_async(cm.exists(path)))


async def read_bytes(cm: Any, path: str) -> bytes:
    model = await cm.get(path, type="file", format="base64")
    return b64decode(model["content"])


def names(model: dict[str, Any]) -> list[str]:
    return sorted(m["name"] for m in model["content"])


MODEL_KEYS = {
    "name",
    "path",
    "type",
    "last_modified",
    "created",
    "content",
    "format",
    "mimetype",
    "size",
    "writable",
    "hash",
    "hash_algorithm",
}


# -- notebooks, files and directories -----------------------------------------------------------------


async def test_an_empty_root_is_a_writable_directory_with_nothing_in_it(cm: Any) -> None:
    root = await cm.get("")
    assert root["type"] == "directory"
    assert root["path"] == "" and root["name"] == ""
    assert root["content"] == [] and root["format"] == "json"
    assert root["writable"] is True
    assert await cm.dir_exists("") and not await cm.file_exists("")


async def test_a_saved_notebook_reads_back_with_its_cells(cm: Any) -> None:
    nb = notebook("print(1)", "x = 2")
    saved = await save_nb(cm, "a.ipynb", nb)
    assert set(saved) >= MODEL_KEYS
    assert saved["type"] == "notebook" and saved["name"] == "a.ipynb" and saved["path"] == "a.ipynb"
    assert saved["content"] is None and saved["format"] is None and saved["mimetype"] is None
    assert saved["writable"] is True and saved["size"] > 0
    assert "message" not in saved
    model = await cm.get("a.ipynb")
    assert model["format"] == "json" and model["type"] == "notebook"
    assert [c["source"] for c in model["content"]["cells"]] == ["print(1)", "x = 2"]
    assert model["content"]["nbformat"] == 4
    assert isinstance(model["last_modified"], datetime) and model["last_modified"].tzinfo is not None
    assert model["size"] == saved["size"]
    bare = await cm.get("a.ipynb", content=False)
    assert bare["content"] is None and bare["format"] is None and bare["type"] == "notebook"


async def test_a_notebook_is_stored_as_nbformat_writes_it(cm: Any) -> None:
    nb = nbformat.from_dict(notebook("a = 1"))
    await save_nb(cm, "n.ipynb", nb)
    raw = await read_bytes(cm, "n.ipynb")
    assert raw == (nbformat.writes(nb) + "\n").encode()
    as_file = await cm.get("n.ipynb", type="file")
    assert as_file["type"] == "file" and as_file["format"] == "text"
    assert as_file["mimetype"] is not None


async def test_text_files_read_back_as_text_and_base64(cm: Any) -> None:
    saved = await save_text(cm, "notes.txt", "héllo\nworld\n")
    assert saved["type"] == "file" and saved["mimetype"] == "text/plain"
    assert saved["size"] == len("héllo\nworld\n".encode())
    model = await cm.get("notes.txt")
    assert model["format"] == "text" and model["content"] == "héllo\nworld\n"
    assert model["mimetype"] == "text/plain"
    b64 = await cm.get("notes.txt", format="base64")
    assert b64["format"] == "base64"
    assert b64["content"] == encodebytes("héllo\nworld\n".encode()).decode("ascii")


async def test_binary_files_read_back_as_base64_and_refuse_text(cm: Any) -> None:
    data = bytes(range(256)) * 10
    await save_bytes(cm, "blob", data)
    model = await cm.get("blob")
    assert model["format"] == "base64" and b64decode(model["content"]) == data
    assert model["mimetype"] == "application/octet-stream"
    assert await status_of(cm.get("blob", format="text")) == 400
    png = await save_bytes(cm, "pic.png", data)
    assert png["mimetype"] == "image/png"


async def test_hashes_are_of_the_stored_bytes(cm: Any) -> None:
    await save_text(cm, "h.txt", "hash me")
    model = await cm.get("h.txt", require_hash=True)
    assert model["hash_algorithm"] == "sha256"
    assert model["hash"] == hashlib.sha256(b"hash me").hexdigest()
    bare = await cm.get("h.txt", content=False, require_hash=True)
    assert bare["content"] is None and bare["hash"] == model["hash"]
    await save_nb(cm, "h.ipynb", notebook("1"))
    nb = await cm.get("h.ipynb", require_hash=True)
    assert nb["hash"] == hashlib.sha256(await read_bytes(cm, "h.ipynb")).hexdigest()
    assert (await cm.get("h.txt"))["hash"] is None


async def test_directories_list_their_entries_without_content(cm: Any) -> None:
    d = await cm.save({"type": "directory"}, "d")
    assert d["type"] == "directory" and d["size"] is None and d["content"] is None
    await cm.save({"type": "directory"}, "d/sub")
    await save_text(cm, "d/f.txt", "f")
    await save_nb(cm, "d/n.ipynb", notebook("1"))
    model = await cm.get("d")
    assert model["type"] == "directory" and model["format"] == "json" and model["size"] is None
    assert names(model) == ["f.txt", "n.ipynb", "sub"]
    kinds = {m["name"]: m for m in model["content"]}
    assert kinds["f.txt"]["type"] == "file" and kinds["f.txt"]["size"] == 1
    assert kinds["f.txt"]["mimetype"] == "text/plain"
    assert kinds["n.ipynb"]["type"] == "notebook" and kinds["sub"]["type"] == "directory"
    assert kinds["sub"]["path"] == "d/sub" and kinds["sub"]["size"] is None
    assert all(m["content"] is None and m["format"] is None for m in model["content"])
    assert all(set(m) >= MODEL_KEYS for m in model["content"])
    again = await cm.save({"type": "directory"}, "d")  # an existing directory is fine
    assert again["type"] == "directory"


async def test_a_directory_with_a_dot_in_its_name_is_still_a_directory(cm: Any) -> None:
    await cm.save({"type": "directory"}, "v1.2")
    await save_text(cm, "v1.2/x.txt", "x")
    model = await cm.get("v1.2")
    assert model["type"] == "directory" and names(model) == ["x.txt"]
    await save_text(cm, "Makefile", "all:\n")
    assert (await cm.get("Makefile"))["content"] == "all:\n"


async def test_links_show_as_what_they_lead_to(cm: Any) -> None:
    await cm.save({"type": "directory"}, "real")
    await save_text(cm, "real/f.txt", "through a link")
    (cm.disk_root / "dlink").symlink_to("real")
    (cm.disk_root / "flink.txt").symlink_to("real/f.txt")
    listed = {m["name"]: m["type"] for m in (await cm.get(""))["content"]}
    assert listed == {"real": "directory", "dlink": "directory", "flink.txt": "file"}
    assert names(await cm.get("dlink")) == ["f.txt"]
    assert (await cm.get("flink.txt"))["content"] == "through a link"
    assert (await cm.get("dlink/f.txt"))["content"] == "through a link"


async def test_asking_for_the_wrong_type_is_400(cm: Any) -> None:
    await cm.save({"type": "directory"}, "d")
    await save_text(cm, "t.txt", "t")
    assert await status_of(cm.get("d", type="file")) == 400
    assert await status_of(cm.get("d", type="notebook")) == 400
    assert await status_of(cm.get("t.txt", type="directory")) == 400
    assert await status_of(cm.save({"type": "directory"}, "t.txt")) == 400


async def test_hide_globs_and_hidden_files_stay_out_of_listings(cm: Any) -> None:
    for name in ("ok.py", "junk.pyc", "backup~"):
        await save_text(cm, name, "x")
    cm.allow_hidden = True
    await save_text(cm, ".secret", "x")
    cm.allow_hidden = False
    await cm.save({"type": "directory"}, "__pycache__")
    assert names(await cm.get("")) == ["ok.py"]
    assert await status_of(cm.get(".secret")) == 404
    assert await cm.is_hidden(".secret") and await cm.is_hidden("d/.git/config")
    assert not await cm.is_hidden("ok.py") and not await cm.is_hidden("")
    assert await status_of(cm.save({"type": "directory"}, ".hid")) == 400


async def test_hidden_files_are_served_when_allowed(cm: Any) -> None:
    cm.allow_hidden = True
    await save_text(cm, ".env", "A=1")
    await cm.save({"type": "directory"}, ".cache")
    assert {".env", ".cache"} <= set(names(await cm.get("")))
    assert (await cm.get(".env"))["content"] == "A=1"


async def test_new_untitled_names_files_notebooks_and_folders_like_jupyter(cm: Any) -> None:
    assert (await cm.new_untitled(type="file"))["name"] == "untitled"
    assert (await cm.new_untitled(type="file"))["name"] == "untitled1"
    assert (await cm.new_untitled(type="file", ext=".txt"))["name"] == "untitled.txt"
    nb = await cm.new_untitled(type="notebook")
    assert nb["name"] == "Untitled.ipynb" and nb["type"] == "notebook"
    assert (await cm.new_untitled(ext=".ipynb"))["name"] == "Untitled1.ipynb"
    d = await cm.new_untitled(type="directory")
    assert d["name"] == "Untitled Folder" and d["type"] == "directory"
    assert (await cm.new_untitled(type="directory"))["name"] == "Untitled Folder 1"
    inner = await cm.new_untitled(path="Untitled Folder", type="file")
    assert inner["path"] == "Untitled Folder/untitled"
    empty = await cm.get("Untitled.ipynb")
    assert empty["content"]["cells"] == []
    assert (await cm.get("untitled"))["content"] == ""
    assert await status_of(cm.new_untitled(path="nowhere", type="file")) == 404
    assert await status_of(cm.new_untitled(type="bogus")) == 400


async def test_new_makes_empty_files_and_notebooks_at_a_given_path(cm: Any) -> None:
    nb = await cm.new(path="fresh.ipynb")
    assert nb["type"] == "notebook"
    assert (await cm.get("fresh.ipynb"))["content"]["cells"] == []
    f = await cm.new(path="fresh.txt")
    assert f["type"] == "file" and (await cm.get("fresh.txt"))["content"] == ""
    given = await cm.new({"type": "file", "format": "text", "content": "given"}, "given.txt")
    assert given["size"] == 5


async def test_rename_moves_files_and_directories(cm: Any) -> None:
    await save_text(cm, "a.txt", "A")
    await cm.save({"type": "directory"}, "d")
    await save_text(cm, "d/in.txt", "in")
    await cm.rename("a.txt", "b.txt")
    assert not await cm.file_exists("a.txt")
    assert (await cm.get("b.txt"))["content"] == "A"
    await cm.rename("b.txt", "d/b.txt")
    assert names(await cm.get("d")) == ["b.txt", "in.txt"]
    await cm.rename("d", "e")
    assert not await cm.dir_exists("d")
    assert (await cm.get("e/in.txt"))["content"] == "in"
    updated = await cm.update({"path": "e/c.txt"}, "e/b.txt")
    assert updated["path"] == "e/c.txt" and updated["content"] is None
    await cm.rename("e/c.txt", "e/c.txt")  # onto itself: nothing happens
    assert await cm.file_exists("e/c.txt")


async def test_rename_errors(cm: Any) -> None:
    await save_text(cm, "a.txt", "A")
    await save_text(cm, "b.txt", "B")
    assert await status_of(cm.rename("a.txt", "b.txt")) == 409
    assert await status_of(cm.rename("missing.txt", "c.txt")) == 404
    assert await status_of(cm.rename("a.txt", ".a.txt")) == 400
    assert (await cm.get("b.txt"))["content"] == "B"


async def test_copy_names_copies_like_jupyter(cm: Any) -> None:
    await save_text(cm, "a.txt", "A")
    await save_text(cm, "arch.tar.gz", "gz")
    await save_nb(cm, "n.ipynb", notebook("1"))
    await cm.save({"type": "directory"}, "d")
    assert (await cm.copy("a.txt"))["path"] == "a-Copy1.txt"
    assert (await cm.copy("a.txt", ""))["path"] == "a-Copy2.txt"
    assert (await cm.copy("a-Copy1.txt", ""))["path"] == "a-Copy3.txt"
    assert (await cm.copy("arch.tar.gz", ""))["path"] == "arch-Copy1.tar.gz"
    copied = await cm.copy("n.ipynb", "")
    assert copied["path"] == "n-Copy1.ipynb" and copied["type"] == "notebook"
    assert (await cm.get("n-Copy1.ipynb"))["content"]["cells"][0]["source"] == "1"
    assert (await cm.copy("a.txt", "d"))["path"] == "d/a.txt"
    assert (await cm.copy("a.txt", "d/b.txt"))["path"] == "d/b.txt"
    assert (await cm.get("d/b.txt"))["content"] == "A"
    await save_text(cm, "z.txt", "Z")
    assert (await cm.copy("z.txt", "d/b.txt"))["path"] == "d/b.txt"  # replaces it
    assert (await cm.get("d/b.txt"))["content"] == "Z"
    assert await status_of(cm.copy("a.txt", "nowhere/b.txt")) == 404
    assert await status_of(cm.copy("missing.txt", "")) == 404


async def test_copy_of_a_directory_copies_what_is_in_it(cm: Any) -> None:
    await cm.save({"type": "directory"}, "d")
    await cm.save({"type": "directory"}, "d/sub")
    await save_text(cm, "d/sub/deep.txt", "deep")
    await save_text(cm, "d/top.txt", "top")
    copied = await cm.copy("d", "")
    assert copied["path"] == "d-Copy1" and copied["type"] == "directory"
    assert (await cm.get("d-Copy1/sub/deep.txt"))["content"] == "deep"
    assert names(await cm.get("d-Copy1")) == ["sub", "top.txt"]
    await cm.save({"type": "directory"}, "e")
    assert (await cm.copy("d", "e"))["path"] == "e/d"
    assert (await cm.get("e/d/top.txt"))["content"] == "top"
    assert (await cm.copy("d", "e"))["path"] == "e/d-Copy1"
    assert (await cm.get("d/top.txt"))["content"] == "top"  # the original stays


async def test_delete_files_and_directories(cm: Any) -> None:
    await save_text(cm, "a.txt", "A")
    await cm.delete("a.txt")
    assert not await exists(cm, "a.txt")
    await cm.save({"type": "directory"}, "empty")
    await cm.delete("empty")
    assert not await cm.dir_exists("empty")
    await cm.save({"type": "directory"}, "full")
    await save_text(cm, "full/x.txt", "x")
    assert await status_of(cm.delete("full")) == 400
    assert await cm.file_exists("full/x.txt")
    await cm.delete("full/x.txt")
    await cm.delete("full")
    assert await status_of(cm.delete("missing.txt")) == 404
    assert await status_of(cm.delete("")) == 400
    assert await status_of(cm.delete(".hidden")) == 400


async def test_a_directory_with_only_checkpoints_left_counts_as_empty(cm: Any) -> None:
    await cm.save({"type": "directory"}, "d")
    await save_nb(cm, "d/n.ipynb", notebook("1"))  # makes d/.ipynb_checkpoints/n-checkpoint.ipynb
    await cm.delete("d/n.ipynb")
    assert await cm.list_checkpoints("d/n.ipynb") == []
    await cm.delete("d")
    assert not await cm.dir_exists("d")


async def test_always_delete_dir_deletes_what_is_in_it(cm: Any) -> None:
    cm.always_delete_dir = True
    await cm.save({"type": "directory"}, "full")
    await save_text(cm, "full/x.txt", "x")
    await cm.delete("full")
    assert not await exists(cm, "full")


async def test_chunked_upload_in_three_chunks(cm: Any) -> None:
    parts = [b"first-", bytes(range(256)), b"-last"]
    for i, part in zip((1, 2, -1), parts, strict=True):
        chunk = {"type": "file", "format": "base64", "content": b64encode(part).decode(), "chunk": i}
        model = await cm.save(chunk, "big.bin")
        assert model["type"] == "file" and model["content"] is None and model["path"] == "big.bin"
    assert model["size"] == sum(map(len, parts))
    assert await read_bytes(cm, "big.bin") == b"".join(parts)
    for i, text in zip((1, 2, -1), ("a", "b", "c"), strict=True):
        await cm.save({"type": "file", "format": "text", "content": text, "chunk": i}, "t.txt")
    assert (await cm.get("t.txt"))["content"] == "abc"


async def test_chunked_upload_refuses_notebooks_and_bad_models(cm: Any) -> None:
    nb = {"type": "notebook", "content": notebook("1"), "chunk": 1}
    assert await status_of(cm.save(nb, "n.ipynb")) == 400
    assert await status_of(cm.save({"chunk": 1, "content": "x", "format": "text"}, "x.txt")) == 400
    assert await status_of(cm.save({"type": "file", "chunk": 1}, "x.txt")) == 400
    assert await status_of(cm.save({"type": "file", "chunk": 1, "content": "x"}, "x.txt")) == 400


async def test_save_refuses_incomplete_or_malformed_models(cm: Any) -> None:
    assert await status_of(cm.save({"content": "x"}, "x.txt")) == 400
    assert await status_of(cm.save({"type": "file"}, "x.txt")) == 400
    assert await status_of(cm.save({"type": "file", "content": "x"}, "x.txt")) == 400
    assert await status_of(cm.save({"type": "file", "content": "x", "format": "json"}, "x.txt")) == 400
    bad64 = {"type": "file", "content": "not base64!", "format": "base64"}
    assert await status_of(cm.save(bad64, "x.bin")) == 400
    assert await status_of(cm.save({"type": "thing", "content": "x"}, "x.txt")) == 400
    assert not await exists(cm, "x.txt")


async def test_paths_cannot_leave_the_root(cm: Any) -> None:
    assert await status_of(cm.get("../outside")) == 404
    assert await status_of(cm.get("a/../../outside")) == 404
    assert await status_of(cm.get("missing.ipynb")) == 404
    assert await status_of(cm.get("missing/inner.txt")) == 404
    await save_text(cm, "a.txt", "A")
    assert (await cm.get("d/../a.txt"))["path"] in ("a.txt", "d/../a.txt")


async def test_notebook_trust_follows_the_signature(cm: Any) -> None:
    nb = nbformat.from_dict(notebook("display('x')"))
    nb.cells[0].outputs = [new_output("display_data", data={"text/html": "<b>x</b>"})]
    cm.notary.mark_cells(nb, True)
    await save_nb(cm, "t.ipynb", nb)
    assert (await cm.get("t.ipynb"))["content"]["cells"][0]["metadata"]["trusted"] is True
    cm.notary.mark_cells(nb, False)
    nb.cells[0].outputs[0]["data"]["text/html"] = "<b>changed</b>"
    await save_nb(cm, "t.ipynb", nb)
    assert (await cm.get("t.ipynb"))["content"]["cells"][0]["metadata"]["trusted"] is False
    await cm.trust_notebook("t.ipynb")
    assert (await cm.get("t.ipynb"))["content"]["cells"][0]["metadata"]["trusted"] is True


async def test_invalid_notebooks_carry_a_validation_message(cm: Any) -> None:
    nb = notebook("1")
    nb["cells"][0]["bogus_field"] = 1
    saved = await save_nb(cm, "bad.ipynb", nb)
    assert saved["message"].startswith("Notebook validation failed")
    model = await cm.get("bad.ipynb")
    assert model["message"].startswith("Notebook validation failed")
    await save_text(cm, "broken.ipynb", "{ not json")
    assert await status_of(cm.get("broken.ipynb")) == 400
    await save_bytes(cm, "latin.ipynb", "é".encode("latin-1"))
    assert await status_of(cm.get("latin.ipynb")) == 400


async def test_last_modified_moves_forward_with_each_save(cm: Any) -> None:
    first = await save_text(cm, "m.txt", "1")
    assert first["created"] <= first["last_modified"]
    await asyncio.sleep(0.02)
    second = await save_text(cm, "m.txt", "22")
    assert second["last_modified"] > first["last_modified"]
    assert (await cm.get("m.txt", content=False))["last_modified"] == second["last_modified"]
    listed = {m["name"]: m for m in (await cm.get(""))["content"]}
    assert listed["m.txt"]["last_modified"] == second["last_modified"]
    assert listed["m.txt"]["size"] == 2


async def test_exists_answers_for_files_and_directories(cm: Any) -> None:
    await save_text(cm, "f.txt", "f")
    await cm.save({"type": "directory"}, "d")
    assert await cm.file_exists("f.txt") and not await cm.dir_exists("f.txt")
    assert await cm.dir_exists("d") and not await cm.file_exists("d")
    assert await exists(cm, "f.txt") and await exists(cm, "d") and await exists(cm, "")
    assert not await exists(cm, "nope")
    assert not await cm.file_exists("nope") and not await cm.dir_exists("nope")


async def test_kernel_path_is_the_notebooks_directory(cm: Any) -> None:
    await cm.save({"type": "directory"}, "d")
    await save_nb(cm, "d/n.ipynb", notebook("1"))
    assert await cm.get_kernel_path("d/n.ipynb") == "d"
    assert await cm.get_kernel_path("d") == "d"
    assert await cm.get_kernel_path("top.ipynb") == ""


# -- checkpoints ---------------------------------------------------------------------------------------


async def test_saving_a_notebook_makes_its_first_checkpoint(cm: Any) -> None:
    assert await cm.list_checkpoints("n.ipynb") == []
    await save_nb(cm, "n.ipynb", notebook("1"))
    (cp,) = await cm.list_checkpoints("n.ipynb")
    assert cp["id"] == "checkpoint" and isinstance(cp["last_modified"], datetime)
    await save_nb(cm, "n.ipynb", notebook("2"))
    assert len(await cm.list_checkpoints("n.ipynb")) == 1
    await save_text(cm, "f.txt", "f")
    assert await cm.list_checkpoints("f.txt") == []
    assert ".ipynb_checkpoints" not in names(await cm.get(""))


async def test_checkpoints_create_list_restore_delete(cm: Any) -> None:
    await cm.save({"type": "directory"}, "d")
    await save_text(cm, "d/f.txt", "version 1")
    cp = await cm.create_checkpoint("d/f.txt")
    assert cp["id"] == "checkpoint"
    assert [c["id"] for c in await cm.list_checkpoints("d/f.txt")] == ["checkpoint"]
    await save_text(cm, "d/f.txt", "version 2")
    await cm.restore_checkpoint("checkpoint", "d/f.txt")
    assert (await cm.get("d/f.txt"))["content"] == "version 1"
    await save_text(cm, "d/f.txt", "version 3")
    again = await cm.create_checkpoint("d/f.txt")  # replaces the one there was
    assert again["last_modified"] >= cp["last_modified"]
    await cm.restore_checkpoint("checkpoint", "d/f.txt")
    assert (await cm.get("d/f.txt"))["content"] == "version 3"
    await cm.delete_checkpoint("checkpoint", "d/f.txt")
    assert await cm.list_checkpoints("d/f.txt") == []
    assert await status_of(cm.delete_checkpoint("checkpoint", "d/f.txt")) == 404


async def test_checkpoints_of_notebooks_restore_the_notebook(cm: Any) -> None:
    await save_nb(cm, "n.ipynb", notebook("before"))
    await cm.create_checkpoint("n.ipynb")
    await save_nb(cm, "n.ipynb", notebook("after"))
    await cm.restore_checkpoint("checkpoint", "n.ipynb")
    assert (await cm.get("n.ipynb"))["content"]["cells"][0]["source"] == "before"


async def test_checkpoints_follow_renames_and_go_with_deletes(cm: Any) -> None:
    await cm.save({"type": "directory"}, "d")
    await save_nb(cm, "n.ipynb", notebook("1"))
    await cm.rename("n.ipynb", "m.ipynb")
    assert await cm.list_checkpoints("n.ipynb") == []
    assert len(await cm.list_checkpoints("m.ipynb")) == 1
    await cm.rename("m.ipynb", "d/m.ipynb")
    assert len(await cm.list_checkpoints("d/m.ipynb")) == 1
    await cm.delete("d/m.ipynb")
    assert await cm.list_checkpoints("d/m.ipynb") == []


# -- only vfolders: the top level and read-only shares ------------------------------------------------


async def test_the_top_level_lists_own_and_shared_vfolders(gateway: InprocGateway) -> None:
    eve = await gateway.user(f"eve{next(_names)}")
    bob = await gateway.user(f"bob{next(_names)}")
    await new_vfolder(eve, "alpha")
    await new_vfolder(eve, "beta")
    mine = await new_vfolder(bob, "bobs")
    await share(bob, eve, mine, "ro")
    cm = vfolder_cm(gateway, eve)
    top = await cm.get("")
    assert top["type"] == "directory" and top["path"] == "" and top["writable"] is True
    by_name = {m["name"]: m for m in top["content"]}
    assert sorted(by_name) == ["alpha", "beta", "bobs"]
    assert all(m["type"] == "directory" and m["path"] == m["name"] for m in by_name.values())
    assert by_name["alpha"]["writable"] is True and by_name["bobs"]["writable"] is False
    assert all(set(m) >= MODEL_KEYS for m in by_name.values())
    await save_text(cm, "alpha/a.txt", "in alpha")
    assert names(await cm.get("alpha")) == ["a.txt"]
    assert (await cm.get("alpha/a.txt"))["content"] == "in alpha"
    assert await cm.dir_exists("alpha") and not await cm.dir_exists("gamma")
    assert await status_of(cm.get("gamma")) == 404


async def test_a_folder_made_at_the_top_level_is_a_new_vfolder(gateway: InprocGateway) -> None:
    eve = await gateway.user(f"eve{next(_names)}")
    cm = vfolder_cm(gateway, eve)
    made = await cm.new(model={"type": "directory"}, path="gamma")
    assert made["type"] == "directory" and made["path"] == "gamma"
    await cm.save({"type": "directory"}, "delta")
    untitled = await cm.new_untitled(type="directory")
    assert untitled["name"] == "Untitled Folder"
    listed = sorted(v["name"] for v in (await eve("GET", "/v1/vfolders"))["vfolders"])
    assert listed == ["Untitled Folder", "delta", "gamma"]
    assert (await cm.save({"type": "directory"}, "gamma"))["path"] == "gamma"  # exists: fine


async def test_files_cannot_be_made_at_the_top_level(gateway: InprocGateway) -> None:
    eve = await gateway.user(f"eve{next(_names)}")
    cm = vfolder_cm(gateway, eve)
    with pytest.raises(web.HTTPError) as exc:
        await save_text(cm, "loose.txt", "x")
    assert exc.value.status_code == 403 and "vfolder" in (exc.value.log_message or "")
    assert await status_of(cm.new_untitled(type="notebook")) == 403
    assert await status_of(cm.new_untitled(type="file")) == 403
    assert await status_of(cm.new(path="x.ipynb")) == 403
    chunk = {"type": "file", "content": "x", "format": "text", "chunk": 1}
    assert await status_of(cm.save(chunk, "c")) == 403


async def test_renaming_and_deleting_at_the_top_level_act_on_vfolders(gateway: InprocGateway) -> None:
    eve = await gateway.user(f"eve{next(_names)}")
    bob = await gateway.user(f"bob{next(_names)}")
    await new_vfolder(eve, "old")
    theirs = await new_vfolder(bob, "theirs")
    await share(bob, eve, theirs, "rw")
    cm = vfolder_cm(gateway, eve)
    await save_text(cm, "old/keep.txt", "kept")
    await cm.rename("old", "new")
    assert (await cm.get("new/keep.txt"))["content"] == "kept"
    assert sorted(v["name"] for v in (await eve("GET", "/v1/vfolders"))["vfolders"]) == ["new", "theirs"]
    assert await status_of(cm.rename("theirs", "mine")) == 403
    assert await status_of(cm.rename("new", "theirs")) == 409
    assert await status_of(cm.delete("theirs")) == 403
    await cm.delete("new")
    assert [v["name"] for v in (await eve("GET", "/v1/vfolders"))["vfolders"]] == ["theirs"]
    trash = (await eve("GET", "/v1/vfolders?trash=1"))["vfolders"]
    assert [v["name"] for v in trash] == ["new"]


async def test_files_move_and_copy_between_vfolders(gateway: InprocGateway) -> None:
    eve = await gateway.user(f"eve{next(_names)}")
    await new_vfolder(eve, "one")
    await new_vfolder(eve, "two")
    cm = vfolder_cm(gateway, eve)
    await save_text(cm, "one/a.txt", "A")
    assert (await cm.copy("one/a.txt", "two"))["path"] == "two/a.txt"
    await cm.rename("one/a.txt", "two/b.txt")
    assert not await exists(cm, "one/a.txt")
    assert (await cm.get("two/b.txt"))["content"] == "A"


async def test_a_read_only_share_is_read_only_everywhere(gateway: InprocGateway) -> None:
    eve = await gateway.user(f"eve{next(_names)}")
    bob = await gateway.user(f"bob{next(_names)}")
    vf = await new_vfolder(bob, "library")
    owner_cm = vfolder_cm(gateway, bob, root_vfolder="library")
    await owner_cm.save({"type": "directory"}, "d")
    await save_text(owner_cm, "d/book.txt", "words")
    await save_nb(owner_cm, "n.ipynb", notebook("1"))
    await share(bob, eve, vf, "ro")
    cm = vfolder_cm(gateway, eve, root_vfolder="library")
    top = await cm.get("")
    assert top["writable"] is False
    assert all(m["writable"] is False for m in top["content"])
    assert (await cm.get("d/book.txt"))["writable"] is False
    assert (await cm.get("n.ipynb"))["writable"] is False
    assert (await cm.get("d"))["content"][0]["writable"] is False
    writes = [
        save_text(cm, "d/book.txt", "mine now"),
        save_text(cm, "new.txt", "x"),
        save_nb(cm, "n.ipynb", notebook("2")),
        cm.save({"type": "directory"}, "e"),
        cm.new_untitled(type="file"),
        cm.rename("d/book.txt", "d/b.txt"),
        cm.delete("d/book.txt"),
        cm.copy("d/book.txt", "d/copy.txt"),
        cm.save({"type": "file", "format": "text", "content": "x", "chunk": 1}, "c.txt"),
        cm.create_checkpoint("d/book.txt"),
    ]
    for coro in writes:
        assert await status_of(coro) == 403
    assert (await cm.get("d/book.txt"))["content"] == "words"


async def test_files_bigger_than_one_request_go_up_in_resumable_chunks(
    gateway: InprocGateway, ann: Caller, tmp_path: Path
) -> None:
    vf = await new_vfolder(ann)
    cm = vfolder_cm(gateway, ann, root_vfolder=vf["name"], max_put_size=256 * 1024, upload_chunk_size=100_000)
    data = bytes(range(256)) * 2400  # 614,400 bytes: seven requests
    await save_bytes(cm, "big.bin", data)
    assert await read_bytes(cm, "big.bin") == data
    for i, part in zip((1, 2, -1), (data[:300_000], data[300_000:500_000], data[500_000:]), strict=True):
        chunk = {"type": "file", "format": "base64", "content": b64encode(part).decode(), "chunk": i}
        await cm.save(chunk, "chunked.bin")
    assert await read_bytes(cm, "chunked.bin") == data
    nb = notebook(*(f"x = {'1' * 1000}" for _ in range(400)))
    assert (await save_nb(cm, "big.ipynb", nb))["size"] > 256 * 1024
    assert len((await cm.get("big.ipynb"))["content"]["cells"]) == 400
    local = tmp_path / "local.bin"
    local.write_bytes(data[::-1])
    assert (await cm.upload_file(str(local), "up.bin"))["size"] == len(data)
    back = tmp_path / "back.bin"
    assert (await cm.download_file("up.bin", str(back)))["size"] == len(data)
    assert back.read_bytes() == data[::-1]
    assert await status_of(cm.download_file("missing.bin", str(back))) == 404


async def test_a_write_past_the_quota_is_413_with_the_gateways_reason(
    gateway: InprocGateway, ann: Caller
) -> None:
    vf = dict(await ann("POST", "/v1/vfolders", {"name": f"small{next(_names)}", "quota": "64k"}))
    cm = vfolder_cm(gateway, ann, root_vfolder=vf["name"])
    with pytest.raises(web.HTTPError) as exc:
        await save_bytes(cm, "too-big.bin", b"x" * 100_000)
    assert exc.value.status_code == 413 and "quota" in (exc.value.log_message or "")
    assert not await exists(cm, "too-big.bin")


async def test_an_unknown_root_vfolder_is_404(gateway: InprocGateway, ann: Caller) -> None:
    cm = vfolder_cm(gateway, ann, root_vfolder="does-not-exist")
    assert await status_of(cm.get("")) == 404


async def share(owner: Caller, guest: Caller, vf: dict[str, Any], permission: str) -> None:
    body = {"user": guest.creds["name"], "permission": permission}
    inv = await owner("POST", f"/v1/vfolders/{vf['id']}/invitations", body)
    await guest("POST", f"/v1/vfolders/invitations/{inv['id']}/accept", {})


# -- kernels' working directories ---------------------------------------------------------------------


async def test_vfolder_of_cwd_names_the_vfolder_and_the_path_in_it() -> None:
    assert vfolder_of_cwd(f"{KERNEL_HOME}/data") == ("data", "")
    assert vfolder_of_cwd(f"{KERNEL_HOME}/data/runs/1") == ("data", "runs/1")
    assert vfolder_of_cwd(f"{KERNEL_HOME}/data/./runs/") == ("data", "runs")
    assert vfolder_of_cwd(f"{KERNEL_HOME}") is None
    assert vfolder_of_cwd(f"{KERNEL_HOME}/") is None
    assert vfolder_of_cwd(f"{KERNEL_HOME}shop/x") is None
    assert vfolder_of_cwd(f"{KERNEL_HOME}/../etc") is None
    assert vfolder_of_cwd(f"{KERNEL_HOME}/.cache") is None
    assert vfolder_of_cwd(KERNEL_HOME.lstrip("/") + "/data") is None  # relative
    assert vfolder_of_cwd("/") is None


async def test_the_extension_maps_kernel_paths_into_the_vfolder_mounts() -> None:
    cm = VFolderContentsManager(gateway_url="http://127.0.0.1:1", access_key="AK", secret_key="s")
    km = SimpleNamespace(cwd_for_path=lambda path, **kw: "/local/" + path)
    assert use_vfolder_cwd(SimpleNamespace(contents_manager=cm, kernel_manager=km))
    assert km.cwd_for_path("data/sub", env={}) == f"{KERNEL_HOME}/data/sub"
    assert km.cwd_for_path("data") == f"{KERNEL_HOME}/data"
    assert km.cwd_for_path("") == f"{KERNEL_HOME}"
    assert vfolder_of_cwd(km.cwd_for_path("data/sub")) == ("data", "sub")
    cm.root_vfolder = "proj"
    assert km.cwd_for_path("src/pkg") == f"{KERNEL_HOME}/proj/src/pkg"
    assert km.cwd_for_path("") == f"{KERNEL_HOME}/proj"
    other = SimpleNamespace(contents_manager=object(), kernel_manager=SimpleNamespace())
    assert not use_vfolder_cwd(other)
