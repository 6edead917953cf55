"""Jupyter contents on Backend.AI vfolders, through the gateway's signed ``/v1`` file API.

Enable it in a Jupyter Server's config (``jupyter_server_config.py``)::

    c.ServerApp.contents_manager_class = "backendai_jupyter.provisioner.contents.VFolderContentsManager"

The file browser's top level then lists the user's vfolders (their own and those shared with
them) as folders; a folder made there is a new vfolder, renaming one renames the vfolder and
deleting one moves it to the gateway's trash (both for its owner only). Files and notebooks
live inside a vfolder. With ``VFolderContentsManager.root_vfolder`` set, that one vfolder is
the top level instead. Kernels mount a vfolder at ``~/<name>``; the server extension
starts a notebook's kernel in the notebook's folder there.

It behaves as jupyter_server's ``FileContentsManager`` (with ``LargeFileManager``'s chunked
uploads) does, with the same models and HTTP errors, except where the storage differs:

- Deleting a file or folder inside a vfolder is final: the file API has no trash. A folder
  that holds more than checkpoints is refused (400) unless ``always_delete_dir`` is set, as
  ``FileContentsManager`` does when ``delete_to_trash`` is off.
- Everything in a read-only share is ``writable: false`` and every write to it is refused with
  403 (``FileContentsManager`` would keep checkpoints of a read-only directory in /tmp).
- Hidden means a path component starting with a dot (there are no hidden-file flags). Saving a
  hidden file while ``allow_hidden`` is off is refused (400) before anything is written;
  ``FileContentsManager`` writes it and then answers 404, as it cannot read it back.
- ``created`` is the entry's ctime (never after its mtime: the gateway renames a written file
  into place); a vfolder listed at the top level has its creation time as ``last_modified``.
- Copying a folder is not limited by ``max_copy_folder_size_mb`` (the vfolder's quota applies),
  and the gateway copies it (and a file) in one request: nothing passes through this server.
  Files move and copy between vfolders through this server; folders do not (400).
- Post-save hooks get the path as kernels see it (``~/<vfolder>/<path>``) as ``os_path``:
  nothing is on this server's disk.
- A chunked upload (``chunk`` in the model) is staged on this server and written to the vfolder
  when its last chunk arrives, in one atomic step; until then the file keeps its old content.
- A notebook that does not parse is 400, with no recovery from an atomic-write leftover (the
  gateway replaces files atomically, so there is none).
- ``/files/`` streams (:class:`VFolderFilesHandler`); a file whose name says nothing of its type
  is served as text when its first chunk is UTF-8, not the whole file.
"""

from __future__ import annotations

import asyncio
import codecs
import hashlib
import http.client
import itertools
import json
import mimetypes
import os
import posixpath
import secrets
import ssl
import tempfile
import time
import weakref
from base64 import decodebytes, encodebytes
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import IO, Any
from urllib.parse import quote, urlsplit

import nbformat
from anyio.to_thread import run_sync
from jupyter_server.auth.decorator import authorized
from jupyter_server.files.handlers import FilesHandler
from jupyter_server.services.contents.checkpoints import AsyncCheckpoints
from jupyter_server.services.contents.manager import AsyncContentsManager, copy_pat
from tornado import httpclient, web
from tornado.http1connection import HTTP1Connection
from traitlets import Bool, Enum, Float, Int, Unicode, default

from ..common import signing
from ..common.clientconfig import ClientConfig
from ..common.errors import LaunchError
from ..common.tls import ENV_CA_FILE, client_context, untrusted
from ..common.wire import KERNEL_HOME
from .settings import GatewaySettings

VFOLDER_MOUNT = KERNEL_HOME  # where kernels see the user's vfolders, one directory each
CHECKPOINT_ID = "checkpoint"
ENTRY_HEADER = "X-BackendAI-Entry"
# The gateway takes file bodies up to 64 MiB (Gateway.max_upload_chunk); bigger files go up in
# resumable chunks.
MAX_PUT_BYTES = 64 * 2**20
# Largest response read into memory (a file's whole content, as FileContentsManager reads it).
MAX_RESPONSE_BYTES = 2**40
# Bodies bigger than this are hashed for their signature on a worker thread.
_HASH_OFF_LOOP = 2**20
_BULK_PIECE = 4 * 2**20  # bytes read at a time from a large download
_nbformat: Any = nbformat  # untyped
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_CA_SETTING = f"ca_file in the client config (or {ENV_CA_FILE})"
TOP_LEVEL_FILES = (
    "Files and notebooks cannot be created at the top level: each folder there is a Backend.AI "
    "vfolder. Open a vfolder first (or create one: a new folder here is a new vfolder)."
)


def vfolder_of_cwd(cwd: str, mount: str = VFOLDER_MOUNT) -> tuple[str, str] | None:
    """The vfolder and the path inside it that a kernel's working directory names.

    ``~/proj/runs/1`` is ``("proj", "runs/1")``; ``~/proj`` is ``("proj", "")``.
    Anything not inside one vfolder under ``mount`` (the mount itself, relative paths, paths
    that climb out with ``..``) is ``None``.
    """
    if not cwd.startswith("/"):
        return None
    path = posixpath.normpath(cwd)
    prefix = mount.rstrip("/") + "/"
    if not path.startswith(prefix):
        return None
    name, _, sub = path[len(prefix) :].partition("/")
    if not name or name.startswith("."):
        return None
    return name, sub


def _hidden(path: str) -> bool:
    return any(part.startswith(".") for part in path.split("/") if part)


def _when(ts: Any, iso: Any = None) -> datetime:
    if isinstance(ts, int | float):
        try:
            return datetime.fromtimestamp(ts, UTC)
        except (ValueError, OverflowError, OSError):
            return _EPOCH
    if isinstance(iso, str) and iso:
        try:
            when = datetime.fromisoformat(iso)
        except ValueError:
            return _EPOCH
        return when if when.tzinfo else when.replace(tzinfo=UTC)
    return _EPOCH


def _join(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


def _q(value: str) -> str:
    return quote(value, safe="")


class GatewayError(web.HTTPError):
    """An error answered by the gateway, with its ``type`` and its message as ``log_message``."""

    def __init__(self, status: int, message: str, type: str = "") -> None:
        super().__init__(status, message)
        self.type = type

    def __str__(self) -> str:
        return f"HTTP {self.status_code}: {self.log_message}"


# -- the file API -----------------------------------------------------------------------------


class VFolderClient:
    """Signed requests to the gateway's vfolder API, on whatever loop the caller runs.

    One tornado HTTP client per event loop (a Jupyter server has one), made to take bodies as
    large as a file can be.
    """

    def __init__(self, config: ClientConfig) -> None:
        self.config = config
        self.base = config.url.rstrip("/")
        self._clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, httpclient.AsyncHTTPClient] = (
            weakref.WeakKeyDictionary()
        )
        self._ssl: ssl.SSLContext | None = None

    def _http(self) -> httpclient.AsyncHTTPClient:
        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None:
            client = self._clients[loop] = httpclient.AsyncHTTPClient(
                force_instance=True, max_body_size=MAX_RESPONSE_BYTES, max_buffer_size=MAX_RESPONSE_BYTES
            )
        return client

    def _ssl_options(self) -> ssl.SSLContext | None:
        if not self.base.startswith("https:"):
            return None
        if self._ssl is None:
            self._ssl = client_context(self.config.ca_file, _CA_SETTING)
        return self._ssl

    def sign(self, method: str, path: str, body: bytes) -> dict[str, str]:
        return signing.sign(self.config.access_key, self.config.secret_key, method, path, body)

    async def fetch(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        *,
        content_type: str = "application/json",
        headers: dict[str, str] | None = None,
        signed: dict[str, str] | None = None,
        timeout: float = 300.0,
        streaming_callback: Callable[[bytes], Any] | None = None,
        header_callback: Callable[[str], None] | None = None,
    ) -> httpclient.HTTPResponse:
        """One signed request; a :class:`GatewayError` unless it succeeds.

        ``signed``: headers from :meth:`sign` made beforehand (for bodies hashed off the loop).
        ``streaming_callback`` gets the body of a successful answer only (what it returns is
        awaited before more is read); ``header_callback`` gets each header line.
        """
        if signed is None:
            if len(body) > _HASH_OFF_LOOP:
                signed = await run_sync(self.sign, method, path, body)
            else:
                signed = self.sign(method, path, body)
        h = {**signed, "Content-Type": content_type, **(headers or {})}
        status = 0
        error_body = bytearray()
        on_chunk: Callable[[bytes], Any] | None = None
        on_header: Callable[[str], None] | None = header_callback
        if streaming_callback is not None:
            sink = streaming_callback

            def on_header(line: str) -> None:
                nonlocal status
                if line.startswith("HTTP/"):
                    status = int(line.split(" ", 2)[1])
                if header_callback is not None:
                    header_callback(line)

            def on_chunk(chunk: bytes) -> Any:
                if status >= 400:
                    error_body.extend(chunk)
                    return None
                return sink(chunk)

        req = httpclient.HTTPRequest(
            self.base + path,
            method=method,
            headers=h,
            body=body if method in ("POST", "PUT", "PATCH") else None,
            allow_nonstandard_methods=True,
            request_timeout=timeout,
            connect_timeout=10,
            decompress_response=False,
            ssl_options=self._ssl_options(),
            streaming_callback=on_chunk,
            header_callback=on_header,
        )
        try:
            resp = await self._http().fetch(req, raise_error=False)
        except ssl.SSLCertVerificationError as e:
            raise GatewayError(503, str(untrusted(self.base, self.config.ca_file, _CA_SETTING, e))) from None
        except OSError as e:
            raise self._unreachable(e) from None
        if resp.code == 599:
            raise self._unreachable(resp.error)
        if resp.code >= 400:
            raise self._error(resp, bytes(error_body) if streaming_callback is not None else resp.body)
        return resp

    async def bulk(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        *,
        signed: dict[str, str],
        headers: dict[str, str] | None = None,
        sink: IO[bytes] | None = None,
        timeout: float = 3600.0,
    ) -> tuple[dict[str, str], bytes]:
        """A large transfer on a worker thread with the standard library's HTTP client.

        Bodies of hundreds of megabytes move several times faster this way than through
        tornado's client on the event loop, which handles them 64 KiB at a time. ``sink`` takes
        a successful answer's body; returns (headers, body when there is no sink).
        """
        extra = {**signed, "Content-Type": "application/octet-stream", **(headers or {})}
        try:
            code, answer_headers, data = await run_sync(self._bulk, method, path, body, extra, sink, timeout)
        except ssl.SSLCertVerificationError as e:
            raise GatewayError(503, str(untrusted(self.base, self.config.ca_file, _CA_SETTING, e))) from None
        except OSError as e:
            raise self._unreachable(e) from None
        if code >= 400:
            raise self._error_of(code, data)
        return answer_headers, data

    def _bulk(
        self,
        method: str,
        path: str,
        body: bytes | None,
        headers: dict[str, str],
        sink: IO[bytes] | None,
        timeout: float,
    ) -> tuple[int, dict[str, str], bytes]:
        url = urlsplit(self.base)
        conn: http.client.HTTPConnection
        if url.scheme == "https":
            conn = http.client.HTTPSConnection(
                url.hostname or "", url.port, timeout=timeout, context=self._ssl_options()
            )
        else:
            conn = http.client.HTTPConnection(url.hostname or "", url.port, timeout=timeout)
        try:
            conn.request(method, url.path + path, body=body, headers=headers)
            resp = conn.getresponse()
            answer_headers = {k: v for k, v in resp.getheaders()}
            if resp.status >= 400 or sink is None:
                return resp.status, answer_headers, resp.read()
            buf = memoryview(bytearray(_BULK_PIECE))
            while n := resp.readinto(buf):
                sink.write(buf[:n])
            return resp.status, answer_headers, b""
        finally:
            conn.close()

    async def call(self, method: str, path: str, body: Any = None, timeout: float = 300.0) -> Any:
        """A JSON request; its JSON answer (``None`` for an empty one)."""
        data = json.dumps(body).encode() if body is not None else b""
        resp = await self.fetch(method, path, data, timeout=timeout)
        return json.loads(resp.body) if resp.body else None

    def _unreachable(self, err: Any) -> GatewayError:
        return GatewayError(
            503,
            f"the Backend.AI gateway at {self.base} is not reachable ({err}). Start it with "
            "`backendai-jupyter up`, or point this server at the right URL (BACKENDAI_GATEWAY_URL, or "
            "the client config file).",
            "gateway-unreachable",
        )

    def _error(self, resp: httpclient.HTTPResponse, body: bytes) -> GatewayError:
        return self._error_of(resp.code, body)

    def _error_of(self, code: int, body: bytes) -> GatewayError:
        try:
            payload = json.loads(body) if body else None
        except ValueError:
            payload = None
        title = f"the gateway answered HTTP {code}"
        kind = ""
        if isinstance(payload, dict):
            title = str(payload.get("title") or title)
            kind = str(payload.get("type") or "")
        status = code
        if status == 401:
            # 401 to a Jupyter client means its own login; this is the server's keypair.
            status = 403
            title = f"the gateway refused this server's credentials: {title}"
        return GatewayError(status, title, kind)


# -- staged chunked uploads -------------------------------------------------------------------


@dataclass
class _Staged:
    """A chunked upload in progress: the chunks so far, in a temporary file."""

    file: IO[bytes]
    size: int = 0
    started: datetime = field(default_factory=lambda: datetime.now(UTC))
    touched: float = field(default_factory=time.monotonic)


@dataclass
class _Target:
    """Where an API path is: a vfolder and the path inside it, or the top level (``vf`` None)."""

    path: str
    vf: dict[str, Any] | None
    sub: str

    @property
    def base(self) -> str:
        assert self.vf is not None
        return f"/v1/vfolders/{self.vf['id']}"

    @property
    def writable(self) -> bool:
        return bool(self.vf["writable"]) if self.vf is not None else True


def _read_notebook(data: bytes, path: str) -> tuple[Any, dict[str, Any]]:
    """Decode and parse a notebook (on a worker thread, as FileContentsManager does)."""
    try:
        text = data.decode("utf8")
    except UnicodeError as e:
        raise web.HTTPError(400, f"{path} is not UTF-8 encoded", reason="bad format") from e
    validation_error: dict[str, Any] = {}
    try:
        nb = _nbformat.reads(text, as_version=4, capture_validation_error=validation_error)
    except Exception as e:
        raise web.HTTPError(400, f"Unreadable Notebook: {path} {e!r}") from e
    return nb, validation_error


def _write_notebook(nb: Any) -> tuple[bytes, dict[str, Any]]:
    """A notebook's bytes as ``nbformat.write`` would put them in a file."""
    validation_error: dict[str, Any] = {}
    text = _nbformat.writes(nb, version=nbformat.NO_CONVERT, capture_validation_error=validation_error)
    if not text.endswith("\n"):
        text += "\n"
    return text.encode("utf8"), validation_error


def _decode_content(content: Any, format: Any, path: str) -> bytes:
    if format not in {"text", "base64"}:
        raise web.HTTPError(400, "Must specify format of file contents as 'text' or 'base64'")
    try:
        if format == "text":
            return bytes(content.encode("utf8"))
        return decodebytes(content.encode("ascii"))
    except Exception as e:
        raise web.HTTPError(400, f"Encoding error saving {path}: {e}") from e


class VFolderContentsManager(GatewaySettings, AsyncContentsManager):
    """Notebooks and files in the user's Backend.AI vfolders (see the module's docstring)."""

    # The base class's untyped methods this one calls, with their types.
    emit: Callable[..., None]
    should_list: Callable[[str], bool]
    run_pre_save_hooks: Callable[..., None]
    run_post_save_hooks: Callable[..., None]
    check_and_sign: Callable[..., None]
    mark_trusted_cells: Callable[..., None]
    validate_notebook_model: Callable[..., dict[str, Any]]

    root_vfolder = Unicode(
        "",
        help="Name of the one vfolder to show as the top level; empty: the top level lists all of "
        "the user's vfolders.",
    ).tag(config=True)

    vfolder_cache_ttl = Float(
        5.0, help="Seconds the list of the user's vfolders is reused before it is asked for again."
    ).tag(config=True)

    max_put_size = Int(
        MAX_PUT_BYTES,
        help="Largest file written in one request: the gateway's Gateway.max_upload_chunk (64 MiB "
        "unless set there). Bigger files go up in resumable chunks of upload_chunk_size.",
    ).tag(config=True)

    upload_chunk_size = Int(
        16 * 2**20,
        help="Bytes per request when a file bigger than max_put_size is uploaded in chunks (at "
        "most max_put_size).",
    ).tag(config=True)

    always_delete_dir = Bool(
        False,
        help="Delete folders that hold more than checkpoints. Deleting is final (vfolders have no "
        "trash for single files and folders), so this is off unless set.",
    ).tag(config=True)

    hash_algorithm = Enum(
        sorted(hashlib.algorithms_available),
        default_value="sha256",
        help="Hash algorithm for file content (models' `hash`), any that hashlib has.",
    ).tag(config=True)

    staged_upload_timeout = Float(
        3600.0, help="Seconds after which an unfinished chunked upload is forgotten."
    ).tag(config=True)

    @default("checkpoints_class")
    def _checkpoints_class_default(self) -> type:
        return VFolderCheckpoints

    @default("files_handler_class")
    def _files_handler_class_default(self) -> type:
        return VFolderFilesHandler

    @default("files_handler_params")
    def _files_handler_params_default(self) -> dict[str, Any]:
        return {"path": ""}  # FilesHandler is a StaticFileHandler, which wants one; nothing is read there

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._api: VFolderClient | None = None
        self._vf_by_name: dict[str, dict[str, Any]] = {}
        self._vf_at = -1e9
        self._staged: dict[str, _Staged] = {}

    # -- plumbing ----------------------------------------------------------------------------------

    @property
    def api(self) -> VFolderClient:
        if self._api is None:
            from .provisioner import client_config

            try:
                cfg = client_config(self.gateway_url, self.access_key, self.secret_key, "")
            except LaunchError as e:
                raise web.HTTPError(503, str(e)) from None
            self._api = VFolderClient(cfg)
        return self._api

    def info_string(self) -> str:
        where = f"vfolder {self.root_vfolder!r}" if self.root_vfolder else "the user's vfolders"
        try:
            url = self.api.base
        except web.HTTPError:
            url = "(no gateway configured)"
        return f"Serving contents from {where} at the Backend.AI gateway {url}"

    def _norm(self, path: str) -> str:
        """An API path without empty, ``.`` and ``..`` components; 404 if it climbs out of the root."""
        path = (path or "").strip("/")
        if "\0" in path:
            raise web.HTTPError(404, f"{path} is not a valid path")
        if not path:
            return ""
        parts: list[str] = []
        for part in path.split("/"):
            if part in ("", "."):
                continue
            if part == "..":
                if not parts:
                    raise web.HTTPError(404, f"{path} is outside root contents directory")
                parts.pop()
            else:
                parts.append(part)
        return "/".join(parts)

    async def _vfolders(self, refresh: bool = False) -> dict[str, dict[str, Any]]:
        """The user's vfolders by name, as recently as ``vfolder_cache_ttl`` (or fresh)."""
        now = time.monotonic()
        if refresh or now - self._vf_at > self.vfolder_cache_ttl:
            listing = await self.api.call("GET", "/v1/vfolders")
            self._vf_by_name = {
                v["name"]: v for v in listing["vfolders"] if v.get("status", "ready") == "ready"
            }
            self._vf_at = now
        return self._vf_by_name

    async def _vfolder(self, name: str) -> dict[str, Any]:
        vfs = await self._vfolders()
        vf = vfs.get(name)
        if vf is None and self._vf_at < time.monotonic() - 0.05:
            vf = (await self._vfolders(refresh=True)).get(name)
        if vf is None:
            raise web.HTTPError(404, f"No such vfolder: {name}")
        return vf

    @property
    def _checkpoints(self) -> VFolderCheckpoints:
        cp = self.checkpoints
        if not isinstance(cp, VFolderCheckpoints):
            raise TypeError("VFolderContentsManager keeps its checkpoints with VFolderCheckpoints")
        return cp

    def _forget_vfolders(self) -> None:
        self._vf_at = -1e9

    def _split(self, path: str) -> tuple[str | None, str]:
        """(vfolder name, path inside it) of a normalised API path; (None, "") for the top."""
        if self.root_vfolder:
            return self.root_vfolder, path
        if not path:
            return None, ""
        name, _, sub = path.partition("/")
        return name, sub

    async def _target(self, path: str) -> _Target:
        name, sub = self._split(path)
        if name is None:
            return _Target(path, None, "")
        return _Target(path, await self._vfolder(name), sub)

    def _at_top(self, path: str) -> bool:
        """Is this normalised API path the top level or an entry of it (a vfolder's place)?"""
        return not self.root_vfolder and "/" not in path

    def _top_entry(self, t: _Target) -> bool:
        """Is this a vfolder itself, as an entry of the top level?"""
        return not self.root_vfolder and t.vf is not None and t.sub == ""

    def _check_writable(self, t: _Target) -> None:
        if not t.writable:
            raise web.HTTPError(
                403, f"Permission denied: {t.path} (the vfolder is shared with you read-only)"
            )

    def _kernel_path(self, t: _Target) -> str:
        assert t.vf is not None
        return posixpath.join(VFOLDER_MOUNT, t.vf["name"], t.sub).rstrip("/")

    def kernel_cwd(self, path: str, **kwargs: Any) -> str:
        """The directory kernels see for an API path: ``~/<vfolder>/<path>``.

        The server extension makes this the kernel manager's ``cwd_for_path``.
        """
        try:
            api_path = self._norm(path)
        except web.HTTPError:
            api_path = ""
        if self.root_vfolder:
            return posixpath.join(VFOLDER_MOUNT, self.root_vfolder, api_path).rstrip("/")
        return posixpath.join(VFOLDER_MOUNT, api_path).rstrip("/") if api_path else VFOLDER_MOUNT

    # -- requests ----------------------------------------------------------------------------------

    async def _stat(self, t: _Target) -> dict[str, Any]:
        entry: dict[str, Any] = await self.api.call("GET", f"{t.base}/stat?path={_q(t.sub)}")
        return entry

    async def _list(self, t: _Target) -> list[dict[str, Any]]:
        listing = await self.api.call("GET", f"{t.base}/files?path={_q(t.sub)}")
        return list(listing["entries"])

    async def _download(self, t: _Target) -> tuple[bytes, dict[str, Any]]:
        resp = await self.api.fetch("GET", f"{t.base}/download?path={_q(t.sub)}")
        raw = resp.headers.get(ENTRY_HEADER)
        entry = json.loads(raw) if raw else await self._stat(t)
        return resp.body, entry

    def _content_path(self, t: _Target) -> str:
        return f"{t.base}/content?path={_q(t.sub)}"

    async def _put(self, t: _Target, data: bytes, signed: dict[str, str] | None = None) -> dict[str, Any]:
        """Write a whole file (atomically replacing it); its entry.

        ``signed``: the PUT's headers from ``api.sign``, made where the bytes were made.
        """
        if len(data) > self.max_put_size:
            view = memoryview(data)
            pos = 0

            def read(n: int) -> bytes:
                nonlocal pos
                piece = bytes(view[pos : pos + n])
                pos += len(piece)
                return piece

            return await self._upload(t, read, len(data))
        resp = await self.api.fetch(
            "PUT", self._content_path(t), data, content_type="application/octet-stream", signed=signed
        )
        entry: dict[str, Any] = json.loads(resp.body)
        return entry

    async def _upload(self, t: _Target, read: Callable[[int], bytes], size: int) -> dict[str, Any]:
        """A resumable upload of ``size`` bytes from ``read``; the file's entry once committed.

        The next chunk is read and hashed on a worker thread while the current one is sent.
        """
        up = await self.api.call("POST", f"{t.base}/uploads", {"path": t.sub, "size": size})
        upath = f"{t.base}/uploads/{up['upload_id']}"
        chunk = max(1, min(self.upload_chunk_size, self.max_put_size))

        def prepare() -> tuple[bytes, dict[str, str]]:
            piece = read(chunk)
            return piece, self.api.sign("PATCH", upath, piece)

        offset = int(up.get("offset", 0))
        result: dict[str, Any] = {"done": size == 0}
        try:
            pending = asyncio.ensure_future(run_sync(prepare)) if size else None
            while pending is not None:
                piece, signed = await pending
                pending = None
                if not piece:
                    raise web.HTTPError(
                        500, f"{t.path}: the data to upload ended at {offset} of {size} bytes"
                    )
                if offset + len(piece) < size:
                    pending = asyncio.ensure_future(run_sync(prepare))
                _, answer = await self.api.bulk(
                    "PATCH", upath, piece, signed=signed, headers={"Upload-Offset": str(offset)}
                )
                result = json.loads(answer)
                offset = int(result["offset"])
            if not result.get("done") or "entry" not in result:
                result = await self.api.call("GET", upath)
                if "entry" not in result:
                    return await self._stat(t)
            entry: dict[str, Any] = result["entry"]
            return entry
        except BaseException:
            if pending is not None:
                pending.cancel()
            try:
                await self.api.call("DELETE", upath)
            except Exception:
                self.log.debug("could not abort upload %s", upath, exc_info=True)
            raise

    async def upload_file(self, local_path: str, path: str) -> dict[str, Any]:
        """Upload a local file to an API path (in resumable chunks when big); its model."""
        path = self._norm(path)
        if self._at_top(path):
            raise web.HTTPError(403, TOP_LEVEL_FILES)
        t = await self._target(path)
        self._check_writable(t)
        f: IO[bytes] = await run_sync(open, local_path, "rb")
        try:
            size = os.fstat(f.fileno()).st_size
            if size <= self.max_put_size:
                entry = await self._put(t, await run_sync(f.read))
            else:
                entry = await self._upload(t, f.read, size)
        finally:
            f.close()
        return self._model(t, entry)

    async def download_file(self, path: str, local_path: str) -> dict[str, Any]:
        """Stream a file at an API path into a local file; its model."""
        t = await self._target(self._norm(path))
        if t.vf is None or self._top_entry(t):
            raise web.HTTPError(400, f"{t.path} is not a file")
        f: IO[bytes] = await run_sync(open, local_path, "wb")

        path = f"{t.base}/download?path={_q(t.sub)}"
        try:
            answer_headers, _ = await self.api.bulk(
                "GET", path, signed=self.api.sign("GET", path, b""), sink=f
            )
        finally:
            f.close()
        raw = answer_headers.get(ENTRY_HEADER)
        return self._model(t, json.loads(raw) if raw else await self._stat(t))

    # -- models ------------------------------------------------------------------------------------

    def _kind(self, path: str, entry_type: str, type: str | None = None) -> str:
        if entry_type == "directory":
            return "directory"
        if type == "notebook" or (type is None and path.endswith(".ipynb")):
            return "notebook"
        return "file"

    def _base(self, path: str, kind: str, writable: bool, mtime: datetime, ctime: datetime) -> dict[str, Any]:
        return {
            "name": path.rsplit("/", 1)[-1],
            "path": path,
            "type": kind,
            "last_modified": mtime,
            "created": ctime,
            "content": None,
            "format": None,
            "mimetype": mimetypes.guess_type(path)[0] if kind == "file" else None,
            "size": None,
            "writable": writable,
            "hash": None,
            "hash_algorithm": None,
        }

    def _entry_model(
        self, path: str, entry: dict[str, Any], writable: bool, type: str | None = None
    ) -> dict[str, Any]:
        kind = self._kind(path, entry.get("type", "file"), type)
        mtime = _when(entry.get("mtime_ts"), entry.get("mtime"))
        # Creation time, as FileContentsManager guesses it on Linux: the ctime. A file the
        # gateway wrote is renamed into place after it was written: it was not made after that.
        ctime = min(mtime, _when(entry.get("ctime_ts"), entry.get("ctime")))
        model = self._base(path, kind, writable, mtime, ctime)
        if kind != "directory":
            model["size"] = entry.get("size")
        return model

    def _model(self, t: _Target, entry: dict[str, Any], type: str | None = None) -> dict[str, Any]:
        return self._entry_model(t.path, entry, t.writable, type)

    def _vfolder_model(self, vf: dict[str, Any], path: str | None = None) -> dict[str, Any]:
        created = _when(None, vf.get("created_at"))
        return self._base(
            path if path is not None else vf["name"], "directory", bool(vf["writable"]), created, created
        )

    def _listing(self, parent: str, entries: list[dict[str, Any]], writable: bool) -> list[dict[str, Any]]:
        contents = []
        for e in entries:
            name = e["name"]
            if e.get("type") not in ("file", "directory", "symlink"):
                continue
            if not self.should_list(name) or (not self.allow_hidden and name.startswith(".")):
                continue
            contents.append(self._entry_model(_join(parent, name), e, writable))
        return contents

    def _get_hash(self, data: bytes) -> dict[str, str]:
        h = hashlib.new(self.hash_algorithm)
        h.update(data)
        return {"hash": h.hexdigest(), "hash_algorithm": self.hash_algorithm}

    async def _content_model(
        self,
        t: _Target,
        entry: dict[str, Any],
        data: bytes,
        type: str | None,
        format: str | None,
        content: bool,
        require_hash: bool,
    ) -> dict[str, Any]:
        model = self._model(t, entry, type)
        if content and model["type"] == "notebook":
            nb, validation_error = await run_sync(_read_notebook, data, t.path)
            self.mark_trusted_cells(nb, t.path)
            model["content"] = nb
            model["format"] = "json"
            self.validate_notebook_model(model, validation_error)
        elif content:
            text: str | None = None
            if format is None or format == "text":
                try:
                    text = data.decode("utf8")
                except UnicodeError as e:
                    if format == "text":
                        raise web.HTTPError(400, f"{t.path} is not UTF-8 encoded", reason="bad format") from e
            if text is not None:
                model.update(content=text, format="text")
            else:
                model.update(content=encodebytes(data).decode("ascii"), format="base64")
            if model["mimetype"] is None:
                model["mimetype"] = "text/plain" if model["format"] == "text" else "application/octet-stream"
        if require_hash:
            model.update(self._get_hash(data))
        return model

    async def _top_model(self, content: bool) -> dict[str, Any]:
        vfs = await self._vfolders(refresh=content)
        times = [_when(None, v.get("created_at")) for v in vfs.values()]
        latest = max(times, default=_EPOCH)
        model = self._base("", "directory", True, latest, min(times, default=_EPOCH))
        if content:
            model["content"] = [
                self._vfolder_model(vf) for name, vf in sorted(vfs.items()) if self.should_list(name)
            ]
            model["format"] = "json"
        return model

    async def _dir_model(
        self, t: _Target, entry: dict[str, Any], entries: list[dict[str, Any]] | None
    ) -> dict[str, Any]:
        model = self._model(t, entry)
        if entries is not None:
            links = [e for e in entries if e.get("type") == "symlink"]
            if links:
                # A listing reports links as links; FileContentsManager shows what they lead to.
                targets = await asyncio.gather(
                    *(self._stat(_Target(t.path, t.vf, _join(t.sub, e["name"]))) for e in links),
                    return_exceptions=True,
                )
                for e, found in zip(links, targets, strict=True):
                    if isinstance(found, dict):
                        e["type"] = "directory" if found.get("type") == "directory" else "file"
            model["content"] = self._listing(t.path, entries, t.writable)
            model["format"] = "json"
        return model

    # -- ContentsManager API: reading --------------------------------------------------------------

    async def get(
        self,
        path: str,
        content: bool = True,
        type: str | None = None,
        format: str | None = None,
        require_hash: bool = False,
    ) -> dict[str, Any]:
        path = self._norm(path)
        if not self.allow_hidden and _hidden(path):
            raise web.HTTPError(404, f"file or directory does not exist: {path!r}")
        try:
            t = await self._target(path)
        except web.HTTPError as e:
            if e.status_code == 404:
                raise web.HTTPError(404, f"No such file or directory: {path}") from None
            raise
        if t.vf is None:
            if type not in (None, "directory"):
                raise web.HTTPError(400, f"{path} is a directory, not a {type}", reason="bad type")
            model = await self._top_model(content)
        else:
            model = await self._get_in(t, content, type, format, require_hash)
        self.emit(data={"action": "get", "path": path})
        return model

    def _guess_dir(self, t: _Target, type: str | None) -> bool:
        if type is not None:
            return type == "directory"
        return t.sub == "" or "." not in t.sub.rsplit("/", 1)[-1]

    async def _get_in(
        self, t: _Target, content: bool, type: str | None, format: str | None, require_hash: bool
    ) -> dict[str, Any]:
        missing = f"No such file or directory: {t.path}"
        entries: list[dict[str, Any]] | None = None
        try:
            if (content or require_hash) and not self._guess_dir(t, type):
                # Most likely a file: one request brings its content and its entry.
                try:
                    data, entry = await self._download(t)
                except web.HTTPError as e:
                    if e.status_code not in (400, 409):
                        raise
                else:
                    if entry.get("type") != "directory":
                        if type == "directory":
                            raise web.HTTPError(400, f"{t.path} is not a directory", reason="bad type")
                        return await self._content_model(t, entry, data, type, format, content, require_hash)
            if content and self._guess_dir(t, type):
                stat, listing = await asyncio.gather(self._stat(t), self._list(t), return_exceptions=True)
                if isinstance(stat, BaseException):
                    raise stat
                entry = stat
                if entry.get("type") == "directory":
                    if isinstance(listing, BaseException):
                        raise listing
                    entries = listing
            else:
                entry = await self._stat(t)
        except web.HTTPError as e:
            if e.status_code == 404:
                raise web.HTTPError(404, missing) from None
            raise
        if entry.get("type") == "directory":
            if type not in (None, "directory"):
                raise web.HTTPError(400, f"{t.path} is a directory, not a {type}", reason="bad type")
            if content and entries is None:
                entries = await self._list(t)
            model = await self._dir_model(t, entry, entries)
            if self._top_entry(t):
                model["writable"] = t.writable
            return model
        if type == "directory":
            raise web.HTTPError(400, f"{t.path} is not a directory", reason="bad type")
        if content or require_hash:
            data, entry = await self._download(t)
            return await self._content_model(t, entry, data, type, format, content, require_hash)
        return self._model(t, entry, type)

    async def _exists_as(self, path: str, kinds: tuple[str, ...], *, top: bool) -> bool:
        """Whether ``path`` is there as one of ``kinds`` (any kind when empty); ``top``: the answer
        for the top level and a vfolder's own root."""
        try:
            t = await self._target(self._norm(path))
            if t.vf is None or t.sub == "":
                return top
            entry = await self._stat(t)
        except web.HTTPError as e:
            if e.status_code in (404, 409):
                return False
            raise
        return not kinds or entry.get("type") in kinds

    async def dir_exists(self, path: str) -> bool:
        return await self._exists_as(path, ("directory",), top=True)

    async def file_exists(self, path: str) -> bool:
        return await self._exists_as(path, ("file", "symlink"), top=False)

    async def exists(self, path: str) -> bool:
        return await self._exists_as(path, (), top=True)

    async def is_hidden(self, path: str) -> bool:
        try:
            return _hidden(self._norm(path))
        except web.HTTPError:
            return False

    async def get_kernel_path(self, path: str, model: Any = None) -> str:
        if await self.dir_exists(path):
            return path
        return path.rsplit("/", 1)[0] if "/" in path else ""

    async def increment_filename(self, filename: str, path: str = "", insert: str = "") -> str:
        """As the base class does, with the directory listed once instead of a request per name."""
        path = self._norm(path)
        taken = await self._names_in(path)
        basename, dot, ext = filename.rpartition(".")
        if ext != "ipynb":
            basename, dot, ext = filename.partition(".")
        suffix = dot + ext
        for i in itertools.count():
            insert_i = f"{insert}{i}" if i else ""
            name = f"{basename}{insert_i}{suffix}"
            if name not in taken:
                return name
        raise AssertionError("unreachable")

    async def _names_in(self, path: str) -> set[str]:
        try:
            t = await self._target(path)
            if t.vf is None:
                return set(await self._vfolders(refresh=True))
            return {e["name"] for e in await self._list(t)}
        except web.HTTPError as e:
            if e.status_code in (404, 409):
                return set()
            raise

    # -- ContentsManager API: writing --------------------------------------------------------------

    def _check_file_place(self, t: _Target) -> None:
        if t.vf is None or self._top_entry(t):
            raise web.HTTPError(403, TOP_LEVEL_FILES)

    async def save(self, model: dict[str, Any], path: str = "") -> dict[str, Any]:
        path = self._norm(path)
        if model.get("chunk") is not None:
            return await self._save_chunk(model, path, int(model["chunk"]))
        self.run_pre_save_hooks(model=model, path=path)
        if "type" not in model:
            raise web.HTTPError(400, "No file type provided")
        if "content" not in model and model["type"] != "directory":
            raise web.HTTPError(400, "No file content provided")
        if not self.allow_hidden and _hidden(path) and model["type"] != "directory":
            # FileContentsManager writes it, then fails to read it back (404); refuse it first.
            raise web.HTTPError(400, f"Cannot create file or directory {path!r}")
        if self._at_top(path) and path:
            saved = await self._save_top_entry(path, model)
            self.emit(data={"action": "save", "path": path})
            return saved
        t = await self._target(path)
        if model["type"] == "directory":
            saved = await self._save_directory(t)
        elif model["type"] in ("notebook", "file"):
            self._check_file_place(t)
            self._check_writable(t)
            saved = await self._save_file(t, model)
        else:
            raise web.HTTPError(400, "Unhandled contents type: {}".format(model["type"]))
        self.run_post_save_hooks(model=saved, os_path=self._kernel_path(t) if t.vf else VFOLDER_MOUNT)
        self.emit(data={"action": "save", "path": path})
        return saved

    async def _save_file(self, t: _Target, model: dict[str, Any]) -> dict[str, Any]:
        validation_error: dict[str, Any] = {}
        signed: dict[str, str] | None = None
        cps: asyncio.Future[Any] | None = None
        try:
            if model["type"] == "notebook":
                nb = _nbformat.from_dict(model["content"])
                self.check_and_sign(nb, t.path)
                api, content_path, most = self.api, self._content_path(t), self.max_put_size

                def serialise() -> tuple[bytes, dict[str, Any], dict[str, str] | None]:
                    data, validation_error = _write_notebook(nb)
                    # Sign in the same worker-thread trip (the signature hashes the bytes).
                    fits = len(data) <= most
                    return data, validation_error, api.sign("PUT", content_path, data) if fits else None

                data, validation_error, signed = await run_sync(serialise)
                # One checkpoint should always exist for notebooks: look while the file goes up
                # (unless this server saw it lately).
                if not self._checkpoints.seen(t.path):
                    cps = asyncio.ensure_future(self._checkpoints.list_checkpoints(t.path))
            else:
                data = _decode_content(model["content"], model.get("format"), t.path)
            entry = await self._put(t, data, signed)
            if cps is not None and not await cps:
                await self._checkpoints.create_checkpoint(self, t.path)
        except web.HTTPError:
            raise
        except Exception as e:
            self.log.error("Error while saving file: %s %s", t.path, e, exc_info=True)
            raise web.HTTPError(500, f"Unexpected error while saving file: {t.path} {e}") from e
        finally:
            if cps is not None and not cps.done():
                cps.cancel()
        saved = self._model(t, entry, "notebook" if model["type"] == "notebook" else None)
        if model["type"] == "notebook":
            self.validate_notebook_model(model, validation_error=validation_error)
            if model.get("message"):
                saved["message"] = model["message"]
        return saved

    async def _save_directory(self, t: _Target) -> dict[str, Any]:
        if not self.allow_hidden and _hidden(t.path):
            raise web.HTTPError(400, f"Cannot create hidden directory {t.path!r}")
        if t.vf is None:
            return await self._top_model(False)
        self._check_writable(t)
        try:
            entry = await self.api.call("POST", f"{t.base}/mkdir", {"path": t.sub})
        except web.HTTPError as e:
            if e.status_code != 409:
                raise
            entry = await self._stat(t)
            if entry.get("type") != "directory":
                raise web.HTTPError(400, f"Not a directory: {t.path}") from None
            self.log.debug("Directory %r already exists", t.path)
        return self._model(t, entry)

    async def _create_vfolder(self, name: str) -> dict[str, Any]:
        vf: dict[str, Any] = await self.api.call("POST", "/v1/vfolders", {"name": name})
        self._vf_by_name[vf["name"]] = vf
        return vf

    async def _save_top_entry(self, path: str, model: dict[str, Any]) -> dict[str, Any]:
        """Save at the top level: a directory there is a vfolder (made if it is new)."""
        if model["type"] != "directory":
            raise web.HTTPError(403, TOP_LEVEL_FILES)
        if not self.allow_hidden and _hidden(path):
            raise web.HTTPError(400, f"Cannot create hidden directory {path!r}")
        vf = (await self._vfolders(refresh=True)).get(path)
        if vf is None:
            vf = await self.api.call("POST", "/v1/vfolders", {"name": path})
            self._vf_by_name[vf["name"]] = vf
        return self._vfolder_model(vf, path)

    async def _save_chunk(self, model: dict[str, Any], path: str, chunk: int) -> dict[str, Any]:
        """LargeFileManager's chunked upload: chunk 1 starts the file, later ones append, -1 ends."""
        if chunk == 1:
            self.run_pre_save_hooks(model=model, path=path)
        if "type" not in model:
            raise web.HTTPError(400, "No file type provided")
        if model["type"] != "file":
            raise web.HTTPError(
                400, 'File type "{}" is not supported for large file transfer'.format(model["type"])
            )
        if "content" not in model:
            raise web.HTTPError(400, "No file content provided")
        if not self.allow_hidden and _hidden(path):
            raise web.HTTPError(400, f"Cannot create file or directory {path!r}")
        if self._at_top(path):
            raise web.HTTPError(403, TOP_LEVEL_FILES)
        t = await self._target(path)
        self._check_file_place(t)
        self._check_writable(t)
        data = _decode_content(model["content"], model.get("format"), path)
        self._drop_stale_uploads()
        staged = self._staged.get(path)
        if chunk == 1 or staged is None:
            if staged is not None:
                staged.file.close()
            staged = self._staged[path] = _Staged(tempfile.SpooledTemporaryFile(max_size=8 * 2**20))
            if chunk == 1:
                await self._check_parent(t)
            else:
                await self._stage_existing(t, staged)
        try:
            await run_sync(staged.file.write, data)
            staged.size += len(data)
            staged.touched = time.monotonic()
            if chunk != -1:
                now = datetime.now(UTC)
                saved = self._base(path, "file", True, now, staged.started)
                saved["size"] = staged.size
                self.emit(data={"action": "save", "path": path})
                return saved
            staged.file.seek(0)
            if staged.size <= self.max_put_size:
                entry = await self._put(t, await run_sync(staged.file.read))
            else:
                entry = await self._upload(t, staged.file.read, staged.size)
        except BaseException:
            self._discard_upload(path)
            raise
        self._discard_upload(path)
        saved = self._model(t, entry)
        self.run_post_save_hooks(model=saved, os_path=self._kernel_path(t))
        self.emit(data={"action": "save", "path": path})
        return saved

    async def _check_parent(self, t: _Target) -> None:
        parent = t.sub.rsplit("/", 1)[0] if "/" in t.sub else ""
        if not parent:
            return
        try:
            entry = await self._stat(_Target(t.path, t.vf, parent))
        except web.HTTPError as e:
            if e.status_code == 404:
                raise web.HTTPError(404, f"No such directory: {parent}") from None
            raise
        if entry.get("type") != "directory":
            raise web.HTTPError(400, f"Not a directory: {parent}")

    async def _stage_existing(self, t: _Target, staged: _Staged) -> None:
        """A chunk after the first with nothing staged (e.g. after a restart): append to the file."""
        try:
            data, _ = await self._download(t)
        except web.HTTPError as e:
            if e.status_code != 404:
                raise
            await self._check_parent(t)
            return
        await run_sync(staged.file.write, data)
        staged.size = len(data)

    def _discard_upload(self, path: str) -> None:
        staged = self._staged.pop(path, None)
        if staged is not None:
            staged.file.close()

    def _drop_stale_uploads(self) -> None:
        cutoff = time.monotonic() - self.staged_upload_timeout
        for p in [p for p, s in self._staged.items() if s.touched < cutoff]:
            self.log.info("Forgetting the unfinished upload of %s", p)
            self._discard_upload(p)

    async def delete_file(self, path: str) -> None:
        path = self._norm(path)
        if not self.allow_hidden and _hidden(path):
            raise web.HTTPError(400, f"Cannot delete file or directory {path!r}")
        t = await self._target(path)
        if t.vf is None:
            raise web.HTTPError(400, "Can't delete root")
        if self._top_entry(t):
            await self.api.call("DELETE", f"/v1/vfolders/{t.vf['id']}")
            self._vf_by_name.pop(t.vf["name"], None)
            self._forget_vfolders()
            return
        self._check_writable(t)
        try:
            await self.api.call("DELETE", f"{t.base}/files?path={_q(t.sub)}")
            return
        except web.HTTPError as e:
            if e.status_code == 404:
                raise web.HTTPError(404, f"File or directory does not exist: {path}") from None
            if e.status_code != 409:
                raise
        # A directory with something in it: only leftover checkpoints do not count.
        if not self.always_delete_dir:
            names = {e["name"] for e in await self._list(t)}
            if names - {self._checkpoints.checkpoint_dir}:
                raise web.HTTPError(400, f"Directory {path} not empty")
        await self.api.call("DELETE", f"{t.base}/files?path={_q(t.sub)}&recursive=1")

    async def rename_file(self, old_path: str, new_path: str) -> None:
        old_path, new_path = self._norm(old_path), self._norm(new_path)
        if old_path == new_path:
            return
        if not self.allow_hidden and (_hidden(old_path) or _hidden(new_path)):
            raise web.HTTPError(400, f"Cannot rename file or directory {old_path!r}")
        old, new = await self._target(old_path), await self._target_for_new(new_path)
        if old.vf is None or new.vf is None:
            raise web.HTTPError(400, "Can't rename the root")
        if self._top_entry(old):
            if not self._top_entry(new):
                raise web.HTTPError(400, f"A vfolder cannot be moved into a folder: {old_path}")
            await self._rename_vfolder(old.vf, new_path)
            return
        if self._top_entry(new):
            raise web.HTTPError(403, TOP_LEVEL_FILES)
        self._check_writable(old)
        self._check_writable(new)
        if old.vf["id"] != new.vf["id"]:
            await self._move_across(old, new)
            return
        try:
            await self.api.call("POST", f"{old.base}/move", {"src": old.sub, "dst": new.sub})
        except web.HTTPError as e:
            if e.status_code == 409:
                raise web.HTTPError(409, f"File already exists: {new_path}") from None
            if e.status_code == 404:
                raise web.HTTPError(404, f"File or directory does not exist: {old_path}") from None
            raise

    async def _target_for_new(self, path: str) -> _Target:
        """Like _target, but a top-level name that is not a vfolder yet is a place for one."""
        name, sub = self._split(path)
        if name is not None and not sub and not self.root_vfolder:
            vfs = await self._vfolders()
            if name in vfs:
                return _Target(path, vfs[name], "")
            return _Target(path, {"id": "", "name": name, "writable": True}, "")
        return await self._target(path)

    async def _rename_vfolder(self, vf: dict[str, Any], name: str) -> None:
        if vf.get("permission", "owner") != "owner":
            raise web.HTTPError(403, f"Only the owner of the vfolder {vf['name']!r} can rename it")
        if name in await self._vfolders(refresh=True):
            raise web.HTTPError(409, f"File already exists: {name}")
        renamed = await self.api.call("PATCH", f"/v1/vfolders/{vf['id']}", {"name": name})
        self._vf_by_name.pop(vf["name"], None)
        self._vf_by_name[renamed["name"]] = renamed

    async def _move_across(self, old: _Target, new: _Target) -> None:
        """A file moved to another vfolder: copied there, then deleted here."""
        entry = await self._stat(old)
        if entry.get("type") == "directory":
            raise web.HTTPError(400, f"Folders cannot be moved to another vfolder: {old.path}")
        if await self.exists(new.path):
            raise web.HTTPError(409, f"File already exists: {new.path}")
        data, _ = await self._download(old)
        await self._put(new, data)
        await self.api.call("DELETE", f"{old.base}/files?path={_q(old.sub)}")

    async def copy(self, from_path: str, to_path: str | None = None) -> dict[str, Any]:
        """Copy a file or a directory, named as FileContentsManager names copies.

        The copy is made by the gateway (one request), not through this server.
        """
        path = self._norm(from_path)
        dest = self._norm(to_path) if to_path is not None else None
        from_dir, _, from_name = path.rpartition("/")
        src = await self._target(path)
        if src.vf is None or self._top_entry(src):
            raise web.HTTPError(400, f"A vfolder cannot be copied: {path or '/'}")
        if not self.allow_hidden and _hidden(path):
            raise web.HTTPError(404, f"file or directory does not exist: {path!r}")
        try:
            entry = await self._stat(src)
        except web.HTTPError as e:
            if e.status_code == 404:
                raise web.HTTPError(404, f"No such file or directory: {path}") from None
            raise
        is_dir = entry.get("type") == "directory"
        if dest is None:
            dest = from_dir
        if is_dir:
            to_name = copy_pat.sub(".", from_name)
            if await self.dir_exists(dest):
                to_name = await self.increment_filename(to_name, dest, insert="-Copy")
            dst_path = _join(dest, to_name)
        elif await self.dir_exists(dest):
            to_name = await self.increment_filename(copy_pat.sub(".", from_name), dest, insert="-Copy")
            dst_path = _join(dest, to_name)
        elif to_path is not None:
            if "/" in dest:
                to_dir = dest.rsplit("/", 1)[0]
                if not await self.dir_exists(to_dir):
                    raise web.HTTPError(404, f"No such parent directory: {to_dir} to copy file in")
            dst_path = dest
        else:
            raise web.HTTPError(404, f"No such directory: {dest}")
        dst = await self._target_for_new(dst_path)
        if dst.vf is None or self._top_entry(dst):
            if is_dir:
                raise web.HTTPError(400, f"A folder cannot be copied to the top level: {path}")
            raise web.HTTPError(403, TOP_LEVEL_FILES)
        self._check_writable(dst)
        if dst.vf["id"] != src.vf["id"]:
            if is_dir:
                raise web.HTTPError(400, f"Folders cannot be copied to another vfolder: {path}")
            data, _ = await self._download(src)
            new_entry = await self._put(dst, data)
        elif is_dir:
            parent = dst.sub.rpartition("/")[0]
            if parent:  # as copytree does, make the destination's parents
                await self.api.call("POST", f"{dst.base}/mkdir", {"path": parent, "parents": True})
            new_entry = await self.api.call("POST", f"{src.base}/copy", {"src": src.sub, "dst": dst.sub})
        else:
            new_entry = await self._copy_within(src, dst.sub, overwrite=True)
        model = self._model(dst, new_entry)
        if model["type"] == "notebook" and not await self._checkpoints.list_checkpoints(dst.path):
            await self._checkpoints.create_checkpoint(self, dst.path)
        self.emit(data={"action": "copy", "path": dst_path, "source_path": from_path})
        return model

    async def _copy_within(self, src: _Target, dst_sub: str, *, overwrite: bool) -> dict[str, Any]:
        """Copy a file inside one vfolder; with ``overwrite``, atomically replace what is there."""
        try:
            entry: dict[str, Any] = await self.api.call(
                "POST", f"{src.base}/copy", {"src": src.sub, "dst": dst_sub}
            )
            return entry
        except web.HTTPError as e:
            if e.status_code != 409 or not overwrite:
                raise
        parent = dst_sub.rpartition("/")[0]
        tmp = _join(parent, f".~copy-{secrets.token_hex(6)}")
        await self.api.call("POST", f"{src.base}/copy", {"src": src.sub, "dst": tmp})
        try:
            entry = await self.api.call(
                "POST", f"{src.base}/move", {"src": tmp, "dst": dst_sub, "overwrite": True}
            )
        except BaseException:
            try:
                await self.api.call("DELETE", f"{src.base}/files?path={_q(tmp)}")
            except Exception:
                pass
            raise
        return entry


class VFolderCheckpoints(AsyncCheckpoints):
    """Checkpoints beside the files, in the vfolder: ``<dir>/.ipynb_checkpoints/<name>-checkpoint<ext>``.

    As FileCheckpoints keeps them, one per file (id ``checkpoint``), through the same file API.
    """

    checkpoint_dir = Unicode(
        ".ipynb_checkpoints",
        help="The directory, in the file's own directory, that keeps its checkpoint.",
    ).tag(config=True)

    seen_ttl = Float(
        30.0,
        help="Seconds a checkpoint this server made or listed is taken to still be there when a "
        "notebook is saved (saving makes the first checkpoint of a notebook).",
    ).tag(config=True)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._seen: dict[str, float] = {}

    def seen(self, path: str) -> bool:
        """Did this server make or list the file's checkpoint within ``seen_ttl``?"""
        at = self._seen.get(path.strip("/"))
        return at is not None and time.monotonic() - at < self.seen_ttl

    def _saw(self, path: str, there: bool) -> None:
        path = path.strip("/")
        if there:
            self._seen[path] = time.monotonic()
        else:
            self._seen.pop(path, None)

    @property
    def cm(self) -> VFolderContentsManager:
        parent = self.parent
        assert isinstance(parent, VFolderContentsManager), (
            "VFolderCheckpoints works with VFolderContentsManager"
        )
        return parent

    def _cp_sub(self, sub: str, checkpoint_id: str) -> str:
        parent, _, name = sub.rpartition("/")
        basename, ext = os.path.splitext(name)
        return _join(_join(parent, self.checkpoint_dir), f"{basename}-{checkpoint_id}{ext}")

    async def _targets(self, path: str, checkpoint_id: str) -> tuple[_Target, _Target] | None:
        """The file's target and its checkpoint's; None where there are no checkpoints (the top)."""
        cm = self.cm
        t = await cm._target(cm._norm(path))
        if t.vf is None or cm._top_entry(t):
            return None
        cp_sub = self._cp_sub(t.sub, checkpoint_id)
        cp_path = _join(_join(t.path.rpartition("/")[0], self.checkpoint_dir), cp_sub.rpartition("/")[2])
        return t, _Target(cp_path, t.vf, cp_sub)

    def _info(self, checkpoint_id: str, entry: dict[str, Any]) -> dict[str, Any]:
        return {"id": checkpoint_id, "last_modified": _when(entry.get("mtime_ts"), entry.get("mtime"))}

    def no_such_checkpoint(self, path: str, checkpoint_id: str) -> None:
        raise web.HTTPError(404, f"Checkpoint does not exist: {path}@{checkpoint_id}")

    async def _copy(self, t: _Target, src_sub: str, dst_sub: str) -> dict[str, Any]:
        """Copy src over dst inside one vfolder, replacing dst atomically; dst's entry.

        The copy is staged next to the checkpoint (in the checkpoint directory), then moved.
        """
        api, cm = self.cm.api, self.cm
        cp_dir = _join(t.sub.rpartition("/")[0], self.checkpoint_dir)
        tmp = _join(cp_dir, f".~{secrets.token_hex(6)}")
        try:
            await api.call("POST", f"{t.base}/copy", {"src": src_sub, "dst": tmp})
        except web.HTTPError as e:
            if e.status_code != 404:
                raise
            await self._mkdir(t, cp_dir)
            await api.call("POST", f"{t.base}/copy", {"src": src_sub, "dst": tmp})
        try:
            entry: dict[str, Any] = await api.call(
                "POST", f"{t.base}/move", {"src": tmp, "dst": dst_sub, "overwrite": True}
            )
        except BaseException:
            try:
                await api.call("DELETE", f"{t.base}/files?path={_q(tmp)}")
            except Exception:
                cm.log.debug("could not remove %s", tmp, exc_info=True)
            raise
        return entry

    async def create_checkpoint(self, contents_mgr: Any, path: str) -> dict[str, Any]:
        targets = await self._targets(path, CHECKPOINT_ID)
        if targets is None:
            raise web.HTTPError(400, f"No checkpoints at the top level: {path}")
        t, cp = targets
        self.cm._check_writable(t)
        try:
            entry = await self._copy(t, t.sub, cp.sub)
        except web.HTTPError as e:
            if e.status_code == 404:
                raise web.HTTPError(404, f"No such file: {path}") from None
            raise
        self._saw(t.path, True)
        return self._info(CHECKPOINT_ID, entry)

    async def restore_checkpoint(self, contents_mgr: Any, checkpoint_id: str, path: str) -> None:
        targets = await self._targets(path, checkpoint_id)
        if targets is None:
            self.no_such_checkpoint(path, checkpoint_id)
            return
        t, cp = targets
        self.cm._check_writable(t)
        try:
            await self.cm._stat(cp)
        except web.HTTPError as e:
            if e.status_code == 404:
                self.no_such_checkpoint(path, checkpoint_id)
            raise
        await self._copy(t, cp.sub, t.sub)

    async def rename_checkpoint(self, checkpoint_id: str, old_path: str, new_path: str) -> None:
        old = await self._targets(old_path, checkpoint_id)
        if old is None:
            return
        old_cp = old[1]
        new = await self._targets(new_path, checkpoint_id)
        if new is None or new[1].base != old_cp.base:
            # Not in the same vfolder: the checkpoint does not follow the file.
            await self.delete_checkpoint(checkpoint_id, old_path)
            return
        new_file, new_cp = new
        self._saw(old[0].path, False)
        api = self.cm.api
        body = {"src": old_cp.sub, "dst": new_cp.sub, "overwrite": True}
        try:
            await api.call("POST", f"{old_cp.base}/move", body)
        except web.HTTPError as e:
            if e.status_code != 404:
                raise
            await self._mkdir(new_cp, new_cp.sub.rpartition("/")[0])
            await api.call("POST", f"{old_cp.base}/move", body)
        self._saw(new_file.path, True)

    async def _mkdir(self, t: _Target, sub: str) -> None:
        try:
            await self.cm.api.call("POST", f"{t.base}/mkdir", {"path": sub, "parents": True})
        except web.HTTPError as e:
            if e.status_code != 409:
                raise

    async def delete_checkpoint(self, checkpoint_id: str, path: str) -> None:
        targets = await self._targets(path, checkpoint_id)
        if targets is None:
            self.no_such_checkpoint(path, checkpoint_id)
            return
        t, cp = targets
        self.cm._check_writable(t)
        self._saw(t.path, False)
        try:
            await self.cm.api.call("DELETE", f"{cp.base}/files?path={_q(cp.sub)}")
        except web.HTTPError as e:
            if e.status_code == 404:
                self.no_such_checkpoint(path, checkpoint_id)
            raise

    async def list_checkpoints(self, path: str) -> list[dict[str, Any]]:
        try:
            targets = await self._targets(path, CHECKPOINT_ID)
        except web.HTTPError as e:
            if e.status_code == 404:
                return []
            raise
        if targets is None:
            return []
        try:
            entry = await self.cm._stat(targets[1])
        except web.HTTPError as e:
            if e.status_code in (404, 409):
                self._saw(targets[0].path, False)
                return []
            raise
        there = entry.get("type") != "directory"
        self._saw(targets[0].path, there)
        return [self._info(CHECKPOINT_ID, entry)] if there else []

    async def rename_all_checkpoints(self, old_path: str, new_path: str) -> None:
        for cp in await self.list_checkpoints(old_path):
            await self.rename_checkpoint(cp["id"], old_path, new_path)

    async def delete_all_checkpoints(self, path: str) -> None:
        for cp in await self.list_checkpoints(path):
            await self.delete_checkpoint(cp["id"], path)


class VFolderFilesHandler(FilesHandler):
    """``/files/<path>``: a file streamed from its vfolder as it arrives from the gateway.

    Answers as jupyter_server's FilesHandler does (content type, ``?download=1``, the sandbox
    policy), without holding the file in memory or going through base64. A file whose name
    says nothing of its type is served as text when its first chunk is UTF-8.
    """

    @web.authenticated
    @authorized
    async def get(self, path: str, include_body: bool = True) -> None:  # type: ignore[override]
        self.check_xsrf_cookie()
        cm = self.contents_manager
        if not isinstance(cm, VFolderContentsManager):
            raise web.HTTPError(500, "VFolderFilesHandler serves files for VFolderContentsManager only")
        path = cm._norm(path)
        if not cm.allow_hidden and _hidden(path):
            raise web.HTTPError(404)
        name = path.rsplit("/", 1)[-1]
        t = await cm._target(path) if not cm._at_top(path) else None
        if t is None or t.vf is None:
            raise web.HTTPError(400, f"{path or '/'} is a directory, not a file", reason="bad type")
        if self.get_argument("download", None):
            self.set_attachment_header(name)
        if not include_body:
            try:
                entry = await cm._stat(t)
            except web.HTTPError as e:
                if e.status_code == 404:
                    raise web.HTTPError(404, f"No such file or directory: {path}") from None
                raise
            if entry.get("type") == "directory":
                raise web.HTTPError(400, f"{path} is a directory, not a file", reason="bad type")
            self._content_type(name, None)
            return
        started = False
        decoder = codecs.getincrementaldecoder("utf8")()

        def on_header(line: str) -> None:
            key, _, value = line.partition(":")
            if key.lower() == "content-length":
                self.set_header("Content-Length", value.strip())

        def on_chunk(chunk: bytes) -> Any:
            nonlocal started
            if not started:
                started = True
                try:
                    decoder.decode(chunk, final=False)
                    self._content_type(name, "text")
                except UnicodeDecodeError:
                    self._content_type(name, "base64")
            self.write(chunk)
            return self.flush()

        try:
            await cm.api.fetch(
                "GET",
                f"{t.base}/download?path={_q(t.sub)}",
                streaming_callback=on_chunk,
                header_callback=on_header,
                timeout=24 * 3600,
            )
        except web.HTTPError as e:
            if started:  # the answer is under way: all that is left is to cut it short
                cm.log.warning("Serving %s failed midway: %s", path, e)
                conn = self.request.connection
                if isinstance(conn, HTTP1Connection):
                    conn.close()
                return
            self.clear_header("Content-Length")
            if e.status_code == 404:
                raise web.HTTPError(404, f"No such file or directory: {path}") from None
            if e.status_code == 409:
                raise web.HTTPError(400, f"{path} is a directory, not a file", reason="bad type") from None
            raise
        if not started:
            self._content_type(name, "text")
        await self.finish()

    def _content_type(self, name: str, format: str | None) -> None:
        """The content type FilesHandler gives: by name, else by the content's format."""
        if name.lower().endswith(".ipynb"):
            self.set_header("Content-Type", "application/x-ipynb+json")
            return
        mime, encoding = mimetypes.guess_type(name)
        if mime == "text/plain":
            self.set_header("Content-Type", "text/plain; charset=UTF-8")
        if encoding == "gzip":
            self.set_header("Content-Type", "application/gzip")
        elif encoding is not None:
            self.set_header("Content-Type", "application/octet-stream")
        elif mime is not None:
            self.set_header("Content-Type", mime)
        elif format != "text":
            self.set_header("Content-Type", "application/octet-stream")
        else:
            self.set_header("Content-Type", "text/plain; charset=UTF-8")
