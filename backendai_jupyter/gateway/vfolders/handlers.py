"""/v1/vfolders: the vfolders, their sharing, and the file API over them.

Every request is authenticated like any /v1 request. A file body (``PUT .../content``, a chunk
of a resumable upload) is never held in memory: it goes to the volume's staging directory as it
arrives, hashed on the way for the signature check, and is put in place only once the whole
body is in, its signature holds and the caller may write there.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import urllib.parse
from typing import Any

from ...common.errors import ApiError, InvalidRequest, LengthRequired, PayloadTooLarge
from ..handlers.base import ApiHandler, M
from .fs import Entry
from .requests import (
    AcceptInvitation,
    Copy,
    Invite,
    Mkdir,
    Move,
    ShareUpdate,
    UploadStart,
    VFolderCreate,
    VFolderPatch,
)
from .service import ChunkSink, VFolderService, WriteSink

VID = r"(?P<vid>[0-9a-f-]{36})"
IID = r"(?P<iid>[0-9a-f-]{36})"
UID = r"(?P<uid>[A-Za-z0-9_-]{16,64})"
READ_CHUNK = 4 << 20
RANGE_RE = re.compile(r"^bytes=(\d*)-(\d*)$")


class VFolderHandler(ApiHandler):
    @property
    def vfolders(self) -> VFolderService:
        return self.settings["vfolders"]

    def arg(self, name: str, default: str = "") -> str:
        """A query argument exactly as sent (tornado's own accessors blank control characters, and a
        path with a NUL in it must be refused, not quietly turned into another path)."""
        values = self.request.query_arguments.get(name)
        if not values:
            return default
        try:
            return values[-1].decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidRequest(f"the {name} argument is not valid UTF-8") from None

    def flag(self, name: str) -> bool:
        return self.arg(name).lower() in ("1", "true", "yes")

    def done(self, status: int = 204) -> None:
        self.set_status(status)
        self.finish()

    async def body_for(self, vid: str, model: type[M], *, write: bool = False, owner: bool = False) -> M:
        """The body as ``model``, read once the caller may do this to vfolder ``vid`` at all: one
        who may not is told so, not what is wrong with their body."""
        await self.vfolders.access(self.current_user, vid, write=write, owner=owner)
        return self.body_as(model)


class VFoldersHandler(VFolderHandler):
    async def get(self) -> None:
        self.write_json({"vfolders": await self.vfolders.list(self.current_user, trash=self.flag("trash"))})

    async def post(self) -> None:
        req = self.body_as(VFolderCreate)
        model = await self.vfolders.create(self.current_user, req.name, req.quota, req.volume)
        self.set_header("Location", f"/v1/vfolders/{model['id']}")
        self.write_json(model, status=201)


class OneVFolderHandler(VFolderHandler):
    async def get(self, vid: str) -> None:
        a = await self.vfolders.access(self.current_user, vid, trash=True)
        shares = await self.vfolders.shares(self.current_user, vid) if a.is_owner else None
        self.write_json(self.vfolders.model(a, shares=shares))

    async def patch(self, vid: str) -> None:
        patch = await self.body_for(vid, VFolderPatch, owner=True)
        self.write_json(await self.vfolders.update(self.current_user, vid, patch.name, patch.quota))

    async def delete(self, vid: str) -> None:
        self.write_json(await self.vfolders.trash(self.current_user, vid, force=self.flag("force")))


class RestoreHandler(VFolderHandler):
    async def post(self, vid: str) -> None:
        self.write_json(await self.vfolders.restore(self.current_user, vid))


class PurgeHandler(VFolderHandler):
    async def post(self, vid: str) -> None:
        await self.vfolders.purge(self.current_user, vid)
        self.done()


class UsageHandler(VFolderHandler):
    """POST: measure the vfolder's usage now (kernels' writes show up without waiting)."""

    async def post(self, vid: str) -> None:
        await self.vfolders.access(self.current_user, vid)
        await self.vfolders.measure(vid)
        a = await self.vfolders.access(self.current_user, vid)
        self.write_json(self.vfolders.model(a))


class InviteHandler(VFolderHandler):
    async def post(self, vid: str) -> None:
        req = await self.body_for(vid, Invite, owner=True)
        inv = await self.vfolders.invite(self.current_user, vid, req.user, req.permission)
        self.write_json(inv, status=201)


class InvitationsHandler(VFolderHandler):
    async def get(self) -> None:
        self.write_json(await self.vfolders.invitations(self.current_user))


class InvitationHandler(VFolderHandler):
    async def delete(self, iid: str) -> None:
        await self.vfolders.cancel_invitation(self.current_user, iid)
        self.done()


class AnswerHandler(VFolderHandler):
    async def post(self, iid: str, answer: str) -> None:
        if answer == "reject":  # takes no body
            self.write_json(await self.vfolders.answer(self.current_user, iid, False))
            return
        req = self.body_as(AcceptInvitation)
        self.write_json(await self.vfolders.answer(self.current_user, iid, True, req.name))


class SharesHandler(VFolderHandler):
    async def get(self, vid: str) -> None:
        self.write_json({"shares": await self.vfolders.shares(self.current_user, vid)})


class ShareHandler(VFolderHandler):
    async def put(self, vid: str, user: str) -> None:
        req = await self.body_for(vid, ShareUpdate, owner=True)
        self.write_json(await self.vfolders.set_share(self.current_user, vid, user, req.permission))

    async def delete(self, vid: str, user: str) -> None:
        await self.vfolders.unshare(self.current_user, vid, user)
        self.done()


class LeaveHandler(VFolderHandler):
    async def post(self, vid: str) -> None:
        await self.vfolders.leave(self.current_user, vid)
        self.done()


# -- files ---------------------------------------------------------------------------------------------


class FilesHandler(VFolderHandler):
    async def get(self, vid: str) -> None:
        self.write_json(await self.vfolders.listdir(self.current_user, vid, self.arg("path")))

    async def delete(self, vid: str) -> None:
        await self.vfolders.delete_path(
            self.current_user, vid, self.arg("path"), recursive=self.flag("recursive")
        )
        self.done()


class StatHandler(VFolderHandler):
    async def get(self, vid: str) -> None:
        self.write_json(await self.vfolders.stat(self.current_user, vid, self.arg("path")))


class MkdirHandler(VFolderHandler):
    async def post(self, vid: str) -> None:
        req = await self.body_for(vid, Mkdir, write=True)
        entry = await self.vfolders.mkdir(self.current_user, vid, req.path, parents=req.parents)
        self.write_json(entry, status=201)


class MoveHandler(VFolderHandler):
    async def post(self, vid: str) -> None:
        req = await self.body_for(vid, Move, write=True)
        entry = await self.vfolders.move(self.current_user, vid, req.src, req.dst, overwrite=req.overwrite)
        self.write_json(entry)


class CopyHandler(VFolderHandler):
    async def post(self, vid: str) -> None:
        req = await self.body_for(vid, Copy, write=True)
        entry = await self.vfolders.copy(self.current_user, vid, req.src, req.dst)
        self.write_json(entry, status=201)


class DownloadHandler(VFolderHandler):
    """GET: a file's bytes, streamed from disk (``Range`` honoured), its entry in a header.

    Errors are JSON like everywhere else; the bytes go as ``application/octet-stream``.
    """

    async def get(self, vid: str) -> None:
        fd, entry = await self.vfolders.open_read(self.current_user, vid, self.arg("path"))
        try:
            await self._send(fd, entry)
        finally:
            os.close(fd)

    async def _send(self, fd: int, entry: Entry) -> None:
        size = entry.size
        start, end = 0, size  # [start, end)
        header = self.request.headers.get("Range", "")
        if header:
            m = RANGE_RE.match(header.strip())
            if not m or (not m.group(1) and not m.group(2)):
                raise ApiError("Range must be a single 'bytes=START-END' range", status=416)
            if m.group(1):
                start = int(m.group(1))
                end = min(size, int(m.group(2)) + 1) if m.group(2) else size
            else:
                start = max(0, size - int(m.group(2)))
            if start >= size or start >= end:
                # Sent as is: raising would clear the headers, and the client needs to know the size.
                self.set_header("Content-Range", f"bytes */{size}")
                self.send_api_error(ApiError(f"the range is outside the file ({size} bytes)", status=416))
                return
            self.set_status(206)
            self.set_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
        self.set_header("Content-Type", "application/octet-stream")
        self.set_header("Accept-Ranges", "bytes")
        self.set_header("Content-Length", str(end - start))
        self.set_header("X-BackendAI-Entry", json.dumps(entry.to_json()))
        quoted = urllib.parse.quote(entry.name)
        self.set_header("Content-Disposition", f"attachment; filename*=UTF-8''{quoted}")
        # The next piece is read while the current one goes out; at most two are in memory.
        pos = start
        ahead = asyncio.ensure_future(asyncio.to_thread(os.pread, fd, min(READ_CHUNK, end - pos), pos))
        while ahead is not None:
            chunk = await ahead
            ahead = None
            if not chunk:
                break  # the file shrank while it was being sent: the client sees a short body
            pos += len(chunk)
            if pos < end:
                ahead = asyncio.ensure_future(
                    asyncio.to_thread(os.pread, fd, min(READ_CHUNK, end - pos), pos)
                )
            self.write(chunk)
            try:
                await self.flush()
            except BaseException:
                if ahead is not None:
                    await asyncio.wait([ahead])  # the fd is closed after this returns
                raise
        self.finish()


class BodySinkHandler(VFolderHandler):
    """A handler whose body goes to a file sink as it arrives, never into memory.

    The body may be up to ``Gateway.max_upload_chunk`` bytes and must announce its length. The
    caller is authenticated from the headers first (as every /v1 request); a signed request's
    signature is checked over the body's hash once it is all in, and the written bytes are
    dropped when it does not hold.
    """

    _sink: WriteSink | ChunkSink | None = None
    _sha: Any = None
    _failed = False

    async def prepare(self) -> None:
        try:
            await self.authenticate()
            length = self._declared_length()
            self.request.connection.set_max_body_size(length)
            self._sha = hashlib.sha256()
            user = self.claimed_user()
            if user is not None:
                self._sink = await self.open_sink(user, length)
        except ApiError as e:
            self.send_api_error(e)
            return
        self._body = bytearray()  # stays empty: marks the request as accepted so far

    def _declared_length(self) -> int:
        length = self.request.headers.get("Content-Length")
        if length is None:
            raise LengthRequired("send the file with a Content-Length header, not chunked")
        if not (length.isascii() and length.strip().isdigit()):  # not "²", which int() refuses
            raise InvalidRequest("Content-Length must be a whole number of bytes")
        most = int(self.settings["max_upload_chunk"])
        if int(length) > most:
            raise PayloadTooLarge(
                f"the body is {length} bytes; one request takes at most {most} "
                "(Gateway.max_upload_chunk): send larger files in chunks through /uploads"
            )
        return int(length)

    async def open_sink(self, user: Any, length: int) -> WriteSink | ChunkSink:
        raise NotImplementedError

    def data_received(self, chunk: bytes) -> None:
        if self._finished or self._failed:
            return
        self._sha.update(chunk)
        if self._sink is None:
            return
        try:
            self._sink.write(chunk)
        except ApiError as e:
            self._failed = True
            self._abort()
            self.send_api_error(e)
        except OSError as e:
            self._failed = True
            self._abort()
            self.send_api_error(ApiError(f"writing the file failed: {e.strerror}", status=507))

    def _abort(self) -> None:
        if self._sink is not None:
            sink, self._sink = self._sink, None
            sink.abort()

    async def body_received(self) -> None:
        self.request.body = b""
        try:
            await self.verify_signature(b"", digest=self._sha.hexdigest())
            self.authorize()
        except ApiError:
            self._abort()
            raise
        if self._sink is None:  # nobody could be named from the headers: refused above
            raise InvalidRequest("the request was not accepted")

    async def commit(self) -> dict[str, Any]:
        sink, self._sink = self._sink, None
        assert sink is not None
        try:
            return await sink.commit()
        except BaseException:
            sink.abort()
            raise

    def on_connection_close(self) -> None:
        self._abort()  # a dropped connection leaves an upload where its last whole chunk ended
        super().on_connection_close()

    def on_finish(self) -> None:
        self._abort()


class ContentHandler(BodySinkHandler):
    """PUT: a whole file in one request (``?exclusive=1``: only if it does not exist yet)."""

    async def open_sink(self, user: Any, length: int) -> WriteSink:
        vid = self.path_kwargs["vid"]
        return await self.vfolders.open_writer(
            user, vid, self.arg("path"), length, exclusive=self.flag("exclusive")
        )

    async def put(self, vid: str) -> None:
        self.write_json(await self.commit())


class UploadsHandler(VFolderHandler):
    async def post(self, vid: str) -> None:
        req = await self.body_for(vid, UploadStart, write=True)
        up = await self.vfolders.start_upload(self.current_user, vid, req.path, req.size)
        self.set_header("Location", f"/v1/vfolders/{vid}/uploads/{up['upload_id']}")
        if up["size"] == 0:  # nothing to send: an empty file, in place at once
            sink = await self.vfolders.open_chunk(self.current_user, vid, up["upload_id"], 0, 0)
            up = await sink.commit()
        self.write_json(up, status=201)


class UploadHandler(BodySinkHandler):
    """One resumable upload: GET where it stands, PATCH the next chunk, DELETE to give it up."""

    async def prepare(self) -> None:
        if self.request.method == "PATCH":
            await super().prepare()
        else:
            await ApiHandler.prepare(self)

    async def open_sink(self, user: Any, length: int) -> ChunkSink:
        raw = self.request.headers.get("Upload-Offset", "").strip()
        kw = self.path_kwargs
        return await self.vfolders.open_chunk(
            user, kw["vid"], kw["uid"], int(raw) if raw.isascii() and raw.isdigit() else None, length
        )

    def data_received(self, chunk: bytes) -> None:
        if self.request.method == "PATCH":
            super().data_received(chunk)
        else:
            ApiHandler.data_received(self, chunk)

    async def body_received(self) -> None:
        if self.request.method == "PATCH":
            await super().body_received()
        else:
            await ApiHandler.body_received(self)

    async def get(self, vid: str, uid: str) -> None:
        self.write_json(await self.vfolders.upload_status(self.current_user, vid, uid))

    async def patch(self, vid: str, uid: str) -> None:
        self.write_json(await self.commit())

    async def delete(self, vid: str, uid: str) -> None:
        await self.vfolders.abort_upload(self.current_user, vid, uid)
        self.done()


def vfolder_routes() -> list[tuple[str, type]]:
    base = r"/v1/vfolders"
    return [
        (rf"{base}/?", VFoldersHandler),
        (rf"{base}/invitations/?", InvitationsHandler),
        (rf"{base}/invitations/{IID}", InvitationHandler),
        (rf"{base}/invitations/{IID}/(?P<answer>accept|reject)", AnswerHandler),
        (rf"{base}/{VID}/?", OneVFolderHandler),
        (rf"{base}/{VID}/restore", RestoreHandler),
        (rf"{base}/{VID}/purge", PurgeHandler),
        (rf"{base}/{VID}/usage", UsageHandler),
        (rf"{base}/{VID}/invitations", InviteHandler),
        (rf"{base}/{VID}/shares/?", SharesHandler),
        (rf"{base}/{VID}/shares/(?P<user>[^/]+)", ShareHandler),
        (rf"{base}/{VID}/leave", LeaveHandler),
        (rf"{base}/{VID}/files", FilesHandler),
        (rf"{base}/{VID}/stat", StatHandler),
        (rf"{base}/{VID}/download", DownloadHandler),
        (rf"{base}/{VID}/content", ContentHandler),
        (rf"{base}/{VID}/mkdir", MkdirHandler),
        (rf"{base}/{VID}/move", MoveHandler),
        (rf"{base}/{VID}/copy", CopyHandler),
        (rf"{base}/{VID}/uploads", UploadsHandler),
        (rf"{base}/{VID}/uploads/{UID}", UploadHandler),
    ]
