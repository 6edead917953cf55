"""The file API over one vfolder: every path a user gives resolves inside it, whatever kernels did.

Kernels mount a vfolder read-write as an unprivileged uid. They can plant symlinks to ``/etc`` or
to another user's folder, and swap a directory for a symlink at any moment, while the gateway
(often root) serves files out of the same tree. So nothing here joins strings into host paths or
checks prefixes. Each operation starts from a descriptor of the vfolder's root and resolves the
user's path one component at a time: with ``openat2(2)`` and ``RESOLVE_BENEATH`` where the kernel
has it, else with an equivalent walk over directory descriptors. Symlinks that stay beneath the
root are followed; one that leads out is refused. Creating, renaming and deleting act on (parent
descriptor, final name), so the final component is never followed by accident: deleting a symlink
deletes the link.

Everything is synchronous; callers run it with :func:`asyncio.to_thread`.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import secrets
import shutil
import stat as st
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any

from ...common.errors import ApiError, Conflict, Forbidden, InvalidRequest, NotFound

USE_OPENAT2 = True
"""Resolve with openat2(2) when the kernel has it; False forces the descriptor walk (tests)."""

MAX_NAME_BYTES = 255
MAX_PATH_BYTES = 4096
MAX_LINK_HOPS = 40
MAX_COPY_DEPTH = 256
FILE_MODE = 0o664
DIR_MODE = 0o2775  # setgid: what kernels create inside keeps the vfolder's group
STAGED_MODE = 0o600  # nobody else reads a file before it is committed
COPY_PREFIX = ".~bai-copy-"
STAGED_ID_RE = re.compile(r"^[A-Za-z0-9_-]{8,64}$")

_UPLOAD_PREFIX = "upload-"
_WRITE_PREFIX = "write-"
_CHUNK = 1 << 20
_WALK_WINDOW = 64  # descriptors a tree walk holds open, however deep the tree
_ANCESTRY_LIMIT = 1 << 16
_EAGAIN_RETRIES = 16

_SYS_OPENAT2 = 437  # the same on every architecture (new syscalls share one table)
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_BENEATH = 0x08
_RENAME_NOREPLACE = 1
_AT_FDCWD = -100

_O_PATH = os.O_PATH | os.O_CLOEXEC
_O_PATH_DIR = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
_O_READ_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
# O_NONBLOCK: a FIFO planted where a file was expected must not hang the gateway on open.
_O_READ_ANY = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


def human_bytes(n: int) -> str:
    """``n`` bytes for a person, in decimal units as disks are sold: "512 bytes", "10.0 MB"."""
    if n < 1000:
        return f"{n} byte" if n == 1 else f"{n} bytes"
    for i, unit in enumerate(("kB", "MB", "GB", "TB", "PB"), start=1):
        value = n / 1000**i
        if round(value, 1) < 1000 or unit == "PB":
            return f"{value:.1f} {unit}"
    raise AssertionError("unreachable")


class QuotaExceeded(ApiError):
    """A write would take the vfolder past its quota, or the volume past its space.

    The caller knows the quota and what is used, so the message names them: a user told only
    "too large" cannot tell whether to delete a file or ask for more.
    """

    status = 413
    type = "quota-exceeded"

    def __init__(self, quota: int, used: int, needed: int) -> None:
        free = max(quota - used, 0)
        super().__init__(
            f"the vfolder's quota is {human_bytes(quota)} and this write needs "
            f"{human_bytes(max(needed - free, 0))} more than is free; "
            "delete files or ask for a larger quota",
            quota=quota,
            used=used,
            needed=needed,
        )

    @classmethod
    def over_limit(cls, limit: int, needed: int, quota: int | None = None) -> QuotaExceeded:
        """``needed`` bytes do not fit in the ``limit`` left; names the quota when it is known."""
        if quota is not None:
            return cls(quota, max(quota - limit, 0), needed)
        return cls._titled(
            f"this write needs {human_bytes(max(needed - limit, 0))} more than the "
            f"{human_bytes(limit)} the vfolder has free; delete files or ask for a larger quota",
            limit=limit,
            needed=needed,
        )

    @classmethod
    def volume_full(cls, dquot: bool = False) -> QuotaExceeded:
        """The storage itself refused (ENOSPC, EDQUOT): no quota of ours to name."""
        if dquot:
            return cls._titled(
                "the volume's disk quota for this vfolder is used up; "
                "delete files or ask an administrator for more"
            )
        return cls._titled("the storage volume is full; delete files or ask an administrator for more space")

    @classmethod
    def _titled(cls, title: str, **extra: Any) -> QuotaExceeded:
        err = cls.__new__(cls)
        ApiError.__init__(err, title, **extra)
        return err


def _shown(path: str) -> str:
    """A user path as messages show it; never a host path."""
    return repr(path) if path else "the vfolder's root"


def split_path(path: str) -> list[str]:
    """The components of a user path, checked; ``""`` and ``"."`` are the vfolder's root.

    Only the shape is checked here; what the components resolve to is checked on the volume.
    """
    if not isinstance(path, str):
        raise InvalidRequest(f"a path must be a string, got {type(path).__name__}")
    if "\0" in path:
        raise InvalidRequest("a path cannot contain NUL bytes")
    try:
        size = len(os.fsencode(path))
    except UnicodeEncodeError:
        raise InvalidRequest("a path must be valid UTF-8 text") from None
    if size > MAX_PATH_BYTES:
        raise InvalidRequest(f"the path is {size} bytes long; at most {MAX_PATH_BYTES} are allowed")
    if path.startswith("/"):
        raise InvalidRequest(
            f"{path!r} is absolute; paths are relative to the vfolder, e.g. 'data/train.csv'"
        )
    parts = []
    for part in path.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            raise InvalidRequest(
                f"{path!r} has a '..' component; name the file from the vfolder's root instead"
            )
        n = len(os.fsencode(part))
        if n > MAX_NAME_BYTES:
            raise InvalidRequest(
                f"the name {part[:24] + '...'!r} is {n} bytes long; a name has at most {MAX_NAME_BYTES}"
            )
        parts.append(part)
    return parts


def _join(parts: list[str]) -> str:
    return "/".join(parts)


@dataclass
class Entry:
    """What the file API tells a user about one file, directory or link."""

    name: str
    path: str
    type: str
    size: int
    mtime: float
    ctime: float
    mode: int
    writable: bool

    @classmethod
    def from_stat(cls, parts: list[str], sr: os.stat_result) -> Entry:
        """An entry for the user path ``parts`` from its (l)stat."""
        if st.S_ISREG(sr.st_mode):
            kind, size = "file", sr.st_size
        elif st.S_ISDIR(sr.st_mode):
            kind, size = "directory", 0
        elif st.S_ISLNK(sr.st_mode):
            kind, size = "symlink", 0
        else:
            kind, size = "other", 0
        return cls(
            name=parts[-1] if parts else "",
            path=_join(parts),
            type=kind,
            size=size,
            mtime=sr.st_mtime_ns / 1e9,
            ctime=sr.st_ctime_ns / 1e9,
            mode=st.S_IMODE(sr.st_mode),
            writable=bool(sr.st_mode & st.S_IWUSR),
        )

    def to_json(self) -> dict[str, Any]:
        """Wire form: times as ISO-8601 UTC with microseconds, and as raw seconds (``*_ts``)."""
        return {
            "name": self.name,
            "path": self.path,
            "type": self.type,
            "size": self.size,
            "mtime": _iso(self.mtime),
            "mtime_ts": self.mtime,
            "ctime": _iso(self.ctime),
            "ctime_ts": self.ctime,
            "mode": self.mode,
        }


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


# --- errors -----------------------------------------------------------------------------------


class _Changed(Exception):
    """The tree moved under a walk in a way the walk cannot follow safely."""


def _fail(e: OSError, path: str) -> ApiError:
    """The API error for an OSError on the user path ``path``; the message names no host path."""
    code, p = e.errno, _shown(path)
    if code == errno.ENOENT:
        return NotFound(f"{p} does not exist")
    if code == errno.EEXIST:
        return Conflict(f"{p} already exists; choose another name or delete it first")
    if code == errno.ENOTEMPTY:
        return Conflict(f"{p} is a directory that is not empty; delete it recursively or empty it first")
    if code == errno.ENOTDIR:
        return Conflict(f"{p} is not a directory, or a folder on its path is a file")
    if code == errno.EISDIR:
        return Conflict(f"{p} is a directory")
    if code in (errno.EACCES, errno.EPERM):
        return Forbidden(f"permission denied on {p}")
    if code == errno.ENOSPC:
        return QuotaExceeded.volume_full()
    if code == errno.EDQUOT:
        return QuotaExceeded.volume_full(dquot=True)
    if code == errno.ENAMETOOLONG:
        return InvalidRequest(f"{p} has a name too long for the volume; use a shorter one")
    if code == errno.ELOOP:
        return Forbidden(f"{p} goes through a symbolic link that cannot be followed here")
    if code == errno.EXDEV:
        return Forbidden(f"{p} leads outside the vfolder")
    if code in (errno.EMFILE, errno.ENFILE):
        return ApiError(f"the gateway has too many files open to handle {p} now; try again", status=503)
    if code == errno.ENXIO:  # a socket or a device without its driver
        return Conflict(f"{p} is not a regular file")
    if code == errno.EBUSY:
        return Conflict(f"{p} is in use; try again later")
    if code is None:
        return Conflict(f"{p} changed while it was being worked on; try again")
    return ApiError(f"{p}: {os.strerror(code)}", status=500)


def _resolve_fail(e: OSError, path: str) -> ApiError:
    """Like :func:`_fail`, for errors that resolving ``path`` beneath the root can give."""
    if e.errno == errno.ELOOP:
        return InvalidRequest(f"{_shown(path)}: too many levels of symbolic links")
    if e.errno == errno.EAGAIN:
        return Conflict(f"{_shown(path)} changed while it was being resolved; try again")
    return _fail(e, path)


def _close(fd: int | None) -> None:
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass


# --- resolution -------------------------------------------------------------------------------


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
_renameat2: Any = getattr(_libc, "renameat2", None)
if _renameat2 is not None:
    _renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    _renameat2.restype = ctypes.c_int
_openat2_works: bool | None = None  # probed on first use


def _openat2(dirfd: int, path: bytes, flags: int) -> int:
    """openat2(2) with RESOLVE_BENEATH: nothing, not even a symlink's target, leaves ``dirfd``."""
    how = _OpenHow(flags, 0, _RESOLVE_BENEATH | _RESOLVE_NO_MAGICLINKS)
    for _ in range(_EAGAIN_RETRIES):
        fd = _syscall(
            ctypes.c_long(_SYS_OPENAT2),
            ctypes.c_long(dirfd),
            ctypes.c_char_p(path),
            ctypes.byref(how),
            ctypes.c_size_t(ctypes.sizeof(how)),
        )
        if fd >= 0:
            return int(fd)
        code = ctypes.get_errno()
        if code != errno.EAGAIN:  # EAGAIN: a rename raced a "..": the kernel asks us to retry
            raise OSError(code, os.strerror(code))
    raise OSError(errno.EAGAIN, os.strerror(errno.EAGAIN))


def _use_openat2() -> bool:
    global _openat2_works
    if not USE_OPENAT2:
        return False
    if _openat2_works is None:
        try:
            os.close(_openat2(_AT_FDCWD, b".", _O_PATH_DIR))
            _openat2_works = True
        except OSError as e:
            # ENOSYS: an old kernel; EPERM: a seccomp filter that predates the call.
            _openat2_works = e.errno not in (errno.ENOSYS, errno.EPERM)
    return _openat2_works


def _walk_beneath(root_fd: int, parts: list[str], flags: int) -> int:
    """What openat2 with RESOLVE_BENEATH does, with one descriptor per directory on the way.

    Each component is opened with O_NOFOLLOW relative to the one before. A symlink is read
    through its own descriptor and its target pushed back as components to resolve from the
    link's directory: ``..`` pops the stack, and popping the root, or an absolute target, is
    EXDEV. Since every step is relative to a descriptor on the stack, swapping a directory for
    a symlink between steps only sends us through that symlink, which is checked the same way.
    """
    stack: list[tuple[int, str, os.stat_result]] = []
    root_copy = os.open(".", _O_PATH_DIR, dir_fd=root_fd)
    stack.append((root_copy, "", os.fstat(root_copy)))
    todo = list(reversed(parts))
    hops = 0
    try:
        while True:
            while todo:
                name = todo.pop()
                if name in ("", "."):
                    continue
                if name == "..":
                    if len(stack) == 1:
                        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))
                    os.close(stack.pop()[0])
                    continue
                fd = os.open(name, _O_PATH | os.O_NOFOLLOW, dir_fd=stack[-1][0])
                try:
                    sr = os.fstat(fd)
                    if st.S_ISLNK(sr.st_mode):
                        hops += 1
                        if hops > MAX_LINK_HOPS:
                            raise OSError(errno.ELOOP, os.strerror(errno.ELOOP))
                        target = os.readlink("", dir_fd=fd)
                        if target.startswith("/"):
                            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))
                        if not target:
                            raise OSError(errno.ENOENT, os.strerror(errno.ENOENT))
                        todo.extend(reversed(target.split("/")))
                        os.close(fd)
                        continue
                    if todo and not st.S_ISDIR(sr.st_mode):
                        raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
                except BaseException:
                    os.close(fd)
                    raise
                stack.append((fd, name, sr))
            top_fd, top_name, top_st = stack[-1]
            if flags & os.O_DIRECTORY and not st.S_ISDIR(top_st.st_mode):
                raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
            if flags & os.O_PATH:
                stack.pop()
                return top_fd
            if st.S_ISDIR(top_st.st_mode):
                return os.open(".", flags | os.O_CLOEXEC, dir_fd=top_fd)
            # A file: reopen it by name with the real flags, and make sure it is still the
            # same inode (it may have been swapped for a symlink since); if not, go again.
            try:
                fd = os.open(top_name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=stack[-2][0])
            except OSError as e:
                if e.errno != errno.ELOOP:
                    raise
                fd = -1
            if fd >= 0:
                sr = os.fstat(fd)
                if (sr.st_dev, sr.st_ino) == (top_st.st_dev, top_st.st_ino):
                    return fd
                os.close(fd)
            hops += 1
            if hops > MAX_LINK_HOPS:
                raise OSError(errno.ELOOP, os.strerror(errno.ELOOP))
            os.close(stack.pop()[0])
            todo.append(top_name)
    finally:
        for fd, _, _ in stack:
            os.close(fd)


def _open_beneath(root_fd: int, parts: list[str], flags: int) -> int:
    """A descriptor for ``parts`` resolved beneath ``root_fd``, following links that stay there."""
    if _use_openat2():
        try:
            return _openat2(root_fd, os.fsencode(_join(parts) or "."), flags | os.O_CLOEXEC)
        except OSError as e:
            if e.errno != errno.ENOSYS:
                raise
    return _walk_beneath(root_fd, parts, flags)


def _may_chown(owner: tuple[int, int] | None) -> bool:
    return owner is not None and (os.geteuid() == 0 or owner[0] == os.geteuid())


def _set_owner(fd: int, mode: int, owner: tuple[int, int] | None) -> None:
    """Give what the fs created to the kernels' uid:gid, with an explicit mode (not the umask's)."""
    if owner is not None and _may_chown(owner):
        try:
            os.fchown(fd, owner[0], owner[1])
        except PermissionError:
            if os.geteuid() == 0:
                raise
            # Not root and not in the owner's group: the uid is ours already, the group stays.
    os.fchmod(fd, mode)  # after chown, which may clear set-id bits


def create_root(path: str | os.PathLike[str], owner: tuple[int, int] | None) -> Path:
    """Create a vfolder's directory on its volume: mode 0o2775, owned by the kernels' uid:gid.

    Missing parents are made 0o755. An existing directory is refused: two vfolders must never
    share one.
    """
    p = Path(path)
    missing = []
    parent = p.parent
    while not parent.exists():
        missing.append(parent)
        parent = parent.parent
    for d in reversed(missing):
        try:
            os.mkdir(d, 0o755)
        except FileExistsError:
            continue
        os.chmod(d, 0o755)
    try:
        os.mkdir(p, 0o700)
    except FileExistsError:
        raise Conflict(
            "the vfolder's directory already exists on its volume; choose another name or id"
        ) from None
    fd = os.open(p, _O_READ_DIR | os.O_NOFOLLOW)
    try:
        _set_owner(fd, DIR_MODE, owner)
    finally:
        os.close(fd)
    return p


# --- tree walks --------------------------------------------------------------------------------


def _scan(fd: int, subdirs: list[str]) -> list[os.stat_result]:
    """The lstat of each regular file in the directory ``fd``; subdirectories go to ``subdirs``."""
    files = []
    with os.scandir(fd) as it:
        for e in it:
            try:
                if e.is_dir(follow_symlinks=False):
                    subdirs.append(e.name)
                elif e.is_file(follow_symlinks=False):
                    files.append(e.stat(follow_symlinks=False))
            except FileNotFoundError:
                continue
    return files


def _regular_files(top: int) -> Iterator[os.stat_result]:
    """The lstat of every regular file under the directory ``top``, never following a link.

    At most :data:`_WALK_WINDOW` descriptors stay open however deep a kernel nests directories:
    the shallowest are closed on the way down and reopened through ``..`` of their child on the
    way up, checked to be the same inode (if a kernel moved it meanwhile: :class:`_Changed`).
    """
    fds: list[int | None] = []
    keys: list[tuple[int, int]] = []
    pending: list[list[str]] = []
    closed_upto = 0  # levels 1..closed_upto have their descriptor closed
    try:
        first = os.open(".", _O_READ_DIR, dir_fd=top)
        fds.append(first)
        sr = os.fstat(first)
        keys.append((sr.st_dev, sr.st_ino))
        pending.append([])
        yield from _scan(first, pending[-1])
        while fds:
            if not pending[-1]:
                fd = fds.pop()
                keys.pop()
                pending.pop()
                assert fd is not None
                try:
                    if fds and fds[-1] is None:
                        parent = os.open("..", _O_READ_DIR, dir_fd=fd)
                        ps = os.fstat(parent)
                        if (ps.st_dev, ps.st_ino) != keys[-1]:
                            os.close(parent)
                            raise _Changed
                        fds[-1] = parent
                        closed_upto -= 1
                finally:
                    os.close(fd)
                continue
            name = pending[-1].pop()
            here = fds[-1]
            assert here is not None
            try:
                child = os.open(name, _O_READ_DIR | os.O_NOFOLLOW, dir_fd=here)
            except OSError as e:
                if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                    continue  # gone, or swapped for a file or a link since it was listed
                raise
            fds.append(child)
            sr = os.fstat(child)
            keys.append((sr.st_dev, sr.st_ino))
            pending.append([])
            if len(fds) - closed_upto > _WALK_WINDOW and closed_upto + 1 < len(fds) - 1:
                closed_upto += 1
                _close(fds[closed_upto])
                fds[closed_upto] = None
            yield from _scan(child, pending[-1])
    finally:
        for fd in fds:
            _close(fd)


def _stays_beneath(target: str, depth: int) -> bool:
    """Whether a link ``target`` in a directory ``depth`` levels below the root stays beneath it."""
    if target.startswith("/"):
        return False
    for part in target.split("/"):
        if part in ("", "."):
            continue
        depth = depth - 1 if part == ".." else depth + 1
        if depth < 0:
            return False
    return True


# --- the file API -----------------------------------------------------------------------------


class VFolderFS:
    """The gateway's only way into the files of one vfolder.

    ``root`` is the vfolder's directory, ``staging`` a directory on the same filesystem that
    kernels do not mount (uploads wait there and are renamed in), ``owner`` the uid:gid kernels
    run as: what the fs creates is given to them, so both sides can read, write and delete it.
    ``quota`` (bytes), when known, is named in quota errors; ``limit`` arguments are what the
    caller lets one operation add.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        staging: str | os.PathLike[str],
        owner: tuple[int, int] | None = None,
        *,
        quota: int | None = None,
    ) -> None:
        self.owner = owner
        self.quota = quota
        self._root_fd: int | None = None
        self._staging_fd: int | None = None
        try:
            self._root_fd = os.open(root, _O_PATH_DIR | os.O_NOFOLLOW)
            self._staging_fd = os.open(staging, _O_PATH_DIR | os.O_NOFOLLOW)
        except OSError:
            self.close()
            raise NotFound(
                "the vfolder's directory or its volume's staging directory is missing; "
                "ask an administrator to check the volume"
            ) from None
        sr = os.fstat(self._root_fd)
        self._root_key = (sr.st_dev, sr.st_ino)

    # -- plumbing

    @property
    def _root(self) -> int:
        if self._root_fd is None:
            raise RuntimeError("this VFolderFS is closed")
        return self._root_fd

    @property
    def _staging(self) -> int:
        if self._staging_fd is None:
            raise RuntimeError("this VFolderFS is closed")
        return self._staging_fd

    def _open(self, parts: list[str], flags: int) -> int:
        try:
            return _open_beneath(self._root, parts, flags)
        except OSError as e:
            raise _resolve_fail(e, _join(parts)) from None

    def _parent(self, parts: list[str]) -> tuple[int, str]:
        """(descriptor of the parent directory, final name); the final name is never followed."""
        try:
            return _open_beneath(self._root, parts[:-1], _O_PATH_DIR), parts[-1]
        except OSError as e:
            if e.errno == errno.ENOENT:
                raise NotFound(
                    f"the folder {_shown(_join(parts[:-1]))} does not exist; create it first"
                ) from None
            raise _resolve_fail(e, _join(parts[:-1])) from None

    def _own(self, fd: int, mode: int) -> None:
        _set_owner(fd, mode, self.owner)

    def _quota_error(self, limit: int, needed: int) -> QuotaExceeded:
        return QuotaExceeded.over_limit(limit, needed, self.quota)

    def _lstat_at(self, pfd: int, name: str) -> os.stat_result | None:
        try:
            return os.stat(name, dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def _rename(self, src_dir: int, src: str, dst_dir: int, dst: str, *, replace: bool) -> None:
        """rename(2) by (dir, name) on both sides; without ``replace``, atomically refuse to."""
        if not replace and _renameat2 is not None:
            r = _renameat2(src_dir, os.fsencode(src), dst_dir, os.fsencode(dst), _RENAME_NOREPLACE)
            if r == 0:
                return
            code = ctypes.get_errno()
            # ENOSYS/EINVAL: no renameat2 or no NOREPLACE on this filesystem; rename checks.
            if code not in (errno.ENOSYS, errno.EINVAL):
                raise OSError(code, os.strerror(code))
        if not replace and self._lstat_at(dst_dir, dst) is not None:
            raise OSError(errno.EEXIST, os.strerror(errno.EEXIST))
        os.rename(src, dst, src_dir_fd=src_dir, dst_dir_fd=dst_dir)

    def _ancestry(self, fd: int) -> list[tuple[int, int]]:
        """(dev, ino) of the directory ``fd`` and each one above it, up to the root."""
        chain: list[tuple[int, int]] = []
        cur = os.open(".", _O_PATH_DIR, dir_fd=fd)
        try:
            for _ in range(_ANCESTRY_LIMIT):
                sr = os.fstat(cur)
                key = (sr.st_dev, sr.st_ino)
                if chain and key == chain[-1]:
                    break  # the top of the filesystem, without passing the root: moved away
                chain.append(key)
                if key == self._root_key:
                    return chain
                up = os.open("..", _O_PATH_DIR, dir_fd=cur)
                os.close(cur)
                cur = up
        finally:
            os.close(cur)
        raise _Changed

    def _remove_quietly(self, pfd: int, name: str) -> None:
        sr = self._lstat_at(pfd, name)
        try:
            if sr is not None and st.S_ISDIR(sr.st_mode):
                shutil.rmtree(name, dir_fd=pfd)
            elif sr is not None:
                os.unlink(name, dir_fd=pfd)
        except OSError:
            pass

    # -- reading

    def stat(self, path: str) -> Entry:
        """What ``path`` is, following symlinks that stay inside; one that leads out: Forbidden."""
        parts = split_path(path)
        fd = self._open(parts, _O_PATH)
        try:
            return Entry.from_stat(parts, os.fstat(fd))
        finally:
            os.close(fd)

    def lstat(self, path: str) -> Entry:
        """What ``path``'s final component itself is: a symlink is reported, not followed."""
        parts = split_path(path)
        if not parts:
            return Entry.from_stat(parts, os.fstat(self._root))
        pfd, name = self._parent(parts)
        try:
            return Entry.from_stat(parts, os.stat(name, dir_fd=pfd, follow_symlinks=False))
        except OSError as e:
            raise _fail(e, path) from None
        finally:
            os.close(pfd)

    def listdir(self, path: str) -> list[Entry]:
        """The entries of a directory, sorted by name; symlinks are listed, never followed."""
        parts = split_path(path)
        fd = self._open(parts, _O_READ_DIR)
        entries = []
        try:
            with os.scandir(fd) as it:
                for e in it:
                    try:
                        sr = e.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue  # deleted since it was listed
                    entries.append(Entry.from_stat([*parts, e.name], sr))
        except OSError as e:
            raise _fail(e, path) from None
        finally:
            os.close(fd)
        entries.sort(key=lambda en: en.name)
        return entries

    def open_read(self, path: str) -> tuple[int, Entry]:
        """A blocking O_RDONLY descriptor of the regular file ``path``, and its entry; caller closes."""
        parts = split_path(path)
        fd = self._open(parts, _O_READ_ANY)
        try:
            sr = os.fstat(fd)
            if st.S_ISDIR(sr.st_mode):
                raise Conflict(f"{_shown(path)} is a directory; list it or read the files in it")
            if not st.S_ISREG(sr.st_mode):
                raise Conflict(f"{_shown(path)} is not a regular file, so it cannot be read")
            os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        return fd, Entry.from_stat(parts, sr)

    def usage(self) -> int:
        """Bytes used: the sizes of the regular files, each inode once, no link followed."""
        seen: set[tuple[int, int]] = set()
        total = 0
        try:
            for sr in _regular_files(self._root):
                if sr.st_nlink > 1:
                    key = (sr.st_dev, sr.st_ino)
                    if key in seen:
                        continue
                    seen.add(key)
                total += sr.st_size
        except _Changed:
            raise Conflict("the vfolder changed while its usage was being measured; try again") from None
        except OSError as e:
            raise _fail(e, "") from None
        return total

    # -- writing

    def staged(self, name: str, *, create: bool, limit: int | None = None) -> StagedFile:
        """A resumable upload's partial file, by the id the caller chose for it.

        ``create``: start a new one (Conflict if the id is taken); else reopen one (NotFound if
        there is none) to append to it. A failed write leaves it as it was, for the next try.
        """
        if not isinstance(name, str) or not STAGED_ID_RE.match(name):
            raise InvalidRequest("an upload id is 8 to 64 letters, digits, '_' or '-'")
        fname = _UPLOAD_PREFIX + name
        try:
            if create:
                fd = os.open(
                    fname,
                    os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                    STAGED_MODE,
                    dir_fd=self._staging,
                )
            else:
                fd = os.open(fname, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self._staging)
        except FileExistsError:
            raise Conflict(
                f"an upload with id {name!r} is already staged; resume it or use another id"
            ) from None
        except FileNotFoundError:
            raise NotFound(f"no upload with id {name!r} is staged; start it again") from None
        except OSError as e:
            raise _fail(e, name) from None
        try:
            if not st.S_ISREG(os.fstat(fd).st_mode):
                raise Conflict(f"the upload {name!r} is not a regular file; start it again with another id")
            os.fchmod(fd, STAGED_MODE)
        except BaseException:
            os.close(fd)
            raise
        return StagedFile(self, fname, fd, limit)

    def writer(self, path: str, *, limit: int | None) -> StagedFile:
        """One streamed write to ``path``: a fresh staged file that ``commit()`` renames onto it.

        Readers see the old file or the new one, never a part. A write or commit that fails
        removes the staged file.
        """
        parts = split_path(path)
        if not parts:
            raise Conflict("the vfolder's root is a directory; name a file to write")
        pfd, name = self._parent(parts)
        try:
            cur = self._lstat_at(pfd, name)
        except OSError as e:
            raise _fail(e, path) from None
        finally:
            os.close(pfd)
        if cur is not None and st.S_ISDIR(cur.st_mode):
            raise Conflict(f"{_shown(path)} is a directory; name a file to write")
        fname = _WRITE_PREFIX + secrets.token_hex(16)
        try:
            fd = os.open(
                fname,
                os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                STAGED_MODE,
                dir_fd=self._staging,
            )
        except OSError as e:
            raise _fail(e, path) from None
        try:
            os.fchmod(fd, STAGED_MODE)
        except BaseException:
            os.close(fd)
            os.unlink(fname, dir_fd=self._staging)
            raise
        return StagedFile(self, fname, fd, limit, target=path, discard_on_error=True)

    def mkdir(self, path: str, *, parents: bool = False) -> Entry:
        """Create a directory (0o2775, the owner's); ``parents`` also makes missing ones, like -p."""
        parts = split_path(path)
        if not parts:
            if parents:
                return self.stat("")
            raise Conflict("the vfolder's root already exists")
        start = 1 if not parents else len(parts)  # without parents only the final one is made
        for i in range(len(parts) - start, len(parts)):
            pfd, name = self._parent(parts[: i + 1])
            try:
                self._mkdir_at(pfd, name)
            except FileExistsError:
                if i == len(parts) - 1 and not parents:
                    raise Conflict(f"{_shown(path)} already exists") from None
                entry = self.stat(_join(parts[: i + 1]))  # exists: fine when it is a directory
                if entry.type != "directory":
                    raise Conflict(f"{_shown(entry.path)} exists and is not a directory") from None
            except OSError as e:
                raise _fail(e, _join(parts[: i + 1])) from None
            finally:
                os.close(pfd)
        return self.stat(path)

    def _mkdir_at(self, pfd: int, name: str) -> None:
        os.mkdir(name, 0o700, dir_fd=pfd)  # 0o700 until it is the owner's, then 0o2775
        fd = os.open(name, _O_READ_DIR | os.O_NOFOLLOW, dir_fd=pfd)
        try:
            self._own(fd, DIR_MODE)
        finally:
            os.close(fd)

    def move(self, src: str, dst: str, *, overwrite: bool = False) -> Entry:
        """Rename ``src`` to ``dst`` (whose folder must exist); the links themselves move."""
        sp, dp = split_path(src), split_path(dst)
        if not sp:
            raise InvalidRequest("the vfolder's root cannot be moved; move what is inside it")
        if not dp:
            raise InvalidRequest("the vfolder's root cannot be replaced; name a path inside it")
        spfd, sname = self._parent(sp)
        try:
            dpfd, dname = self._parent(dp)
        except BaseException:
            os.close(spfd)
            raise
        try:
            try:
                os.stat(sname, dir_fd=spfd, follow_symlinks=False)
            except OSError as e:
                raise _fail(e, src) from None
            try:
                self._rename(spfd, sname, dpfd, dname, replace=overwrite)
            except OSError as e:
                raise self._move_fail(e, src, dst, overwrite) from None
            try:
                return Entry.from_stat(dp, os.stat(dname, dir_fd=dpfd, follow_symlinks=False))
            except OSError as e:
                raise _fail(e, dst) from None
        finally:
            os.close(spfd)
            os.close(dpfd)

    @staticmethod
    def _move_fail(e: OSError, src: str, dst: str, overwrite: bool) -> ApiError:
        s, d = _shown(src), _shown(dst)
        if e.errno == errno.EINVAL:
            return InvalidRequest(f"{s} cannot be moved into itself ({d} is inside it)")
        if e.errno == errno.EEXIST and not overwrite:
            return Conflict(f"{d} already exists; delete it first or ask to overwrite it")
        if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
            return Conflict(f"{d} is a directory that is not empty, so it cannot be replaced")
        if e.errno == errno.EISDIR:
            return Conflict(f"{d} is a directory; a file cannot replace it")
        if e.errno == errno.ENOTDIR:
            return Conflict(f"{s} is a directory and {d} is not; a directory can only replace one")
        if e.errno == errno.ENOENT:
            return NotFound(f"{s} does not exist")
        return _fail(e, src)

    def copy(self, src: str, dst: str, *, limit: int | None) -> tuple[Entry, int]:
        """Copy a file or a whole directory to ``dst`` (which must not exist); returns bytes added.

        The copy is built under a temporary name in ``dst``'s folder and renamed into place, so a
        failure leaves nothing half-copied. Inside a directory, symlinks are copied as links when
        they stay beneath the vfolder, and skipped otherwise; FIFOs, sockets and devices are
        skipped. Too large for ``limit``: QuotaExceeded before anything is written.
        """
        sp, dp = split_path(src), split_path(dst)
        if not dp:
            raise Conflict("the vfolder's root already exists; name a new path to copy to")
        sfd = self._open(sp, _O_READ_ANY)
        try:
            ssr = os.fstat(sfd)
            if not (st.S_ISREG(ssr.st_mode) or st.S_ISDIR(ssr.st_mode)):
                raise Conflict(f"{_shown(src)} is not a regular file or a directory, so it cannot be copied")
            dpfd, dname = self._parent(dp)
            try:
                return self._copy(sfd, ssr, src, dpfd, dname, dp, limit)
            finally:
                os.close(dpfd)
        finally:
            os.close(sfd)

    def _copy(
        self,
        sfd: int,
        ssr: os.stat_result,
        src: str,
        dpfd: int,
        dname: str,
        dp: list[str],
        limit: int | None,
    ) -> tuple[Entry, int]:
        dst = _join(dp)
        is_dir = st.S_ISDIR(ssr.st_mode)
        try:
            if self._lstat_at(dpfd, dname) is not None:
                raise Conflict(f"{_shown(dst)} already exists; choose another name or delete it first")
            ancestry = self._ancestry(dpfd)
            if is_dir and (ssr.st_dev, ssr.st_ino) in ancestry:
                raise InvalidRequest(
                    f"{_shown(src)} cannot be copied into itself ({_shown(dst)} is inside it)"
                )
            size = sum(sr.st_size for sr in _regular_files(sfd)) if is_dir else ssr.st_size
        except _Changed:
            raise Conflict(f"{_shown(src)} or {_shown(dst)} moved during the copy; try again") from None
        except OSError as e:
            raise _fail(e, src) from None
        if limit is not None and size > limit:
            raise self._quota_error(limit, size)
        budget = _Budget(limit, self._quota_error)
        tmp = COPY_PREFIX + secrets.token_hex(8)
        try:
            if is_dir:
                # The copy's top sits len(ancestry) levels below the root: links are judged there.
                self._copy_dir(sfd, dpfd, tmp, budget, len(ancestry), 0)
            else:
                self._copy_file(sfd, dpfd, tmp, budget)
            self._rename(dpfd, tmp, dpfd, dname, replace=False)
            sr = os.stat(dname, dir_fd=dpfd, follow_symlinks=False)
        except BaseException as e:
            self._remove_quietly(dpfd, tmp)
            if isinstance(e, FileExistsError):
                raise Conflict(
                    f"{_shown(dst)} already exists; choose another name or delete it first"
                ) from None
            if isinstance(e, OSError):
                raise _fail(e, src) from None
            raise
        return Entry.from_stat(dp, sr), budget.used

    def _copy_file(self, sfd: int, dpfd: int, name: str, budget: _Budget) -> None:
        dfd = os.open(
            name,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            STAGED_MODE,
            dir_fd=dpfd,
        )
        try:
            self._own(dfd, FILE_MODE)
            fast = True
            while True:
                if fast:
                    try:
                        n = os.copy_file_range(sfd, dfd, _CHUNK)
                    except OSError as e:
                        if e.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                            raise
                        fast = False
                        continue
                    if n == 0:
                        break
                    budget.add(n)
                else:
                    data = os.read(sfd, _CHUNK)
                    if not data:
                        break
                    budget.add(len(data))
                    view = memoryview(data)
                    while view:
                        view = view[os.write(dfd, view) :]
        finally:
            os.close(dfd)

    def _copy_dir(self, sfd: int, dpfd: int, name: str, budget: _Budget, depth: int, level: int) -> None:
        if level > MAX_COPY_DEPTH:
            raise InvalidRequest(
                f"the directory is nested more than {MAX_COPY_DEPTH} levels deep; copy it in parts"
            )
        os.mkdir(name, 0o700, dir_fd=dpfd)
        dfd = os.open(name, _O_READ_DIR | os.O_NOFOLLOW, dir_fd=dpfd)
        try:
            self._own(dfd, DIR_MODE)
            with os.scandir(sfd) as it:
                entries = list(it)
            for e in entries:
                try:
                    if e.is_symlink():
                        target = os.readlink(e.name, dir_fd=sfd)
                        if _stays_beneath(target, depth):
                            os.symlink(target, e.name, dir_fd=dfd)
                            if self.owner is not None and _may_chown(self.owner):
                                os.chown(e.name, *self.owner, dir_fd=dfd, follow_symlinks=False)
                    elif e.is_dir(follow_symlinks=False):
                        cfd = os.open(e.name, _O_READ_DIR | os.O_NOFOLLOW, dir_fd=sfd)
                        try:
                            self._copy_dir(cfd, dfd, e.name, budget, depth + 1, level + 1)
                        finally:
                            os.close(cfd)
                    elif e.is_file(follow_symlinks=False):
                        cfd = os.open(e.name, _O_READ_ANY | os.O_NOFOLLOW, dir_fd=sfd)
                        try:
                            if st.S_ISREG(os.fstat(cfd).st_mode):
                                os.set_blocking(cfd, True)
                                self._copy_file(cfd, dfd, e.name, budget)
                        finally:
                            os.close(cfd)
                    # FIFOs, sockets and devices are not copied.
                except OSError as err:
                    if err.errno in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR, errno.EINVAL):
                        continue  # gone or swapped for something else since it was listed
                    raise
        finally:
            os.close(dfd)

    def delete(self, path: str, *, recursive: bool = False) -> int:
        """Delete a file, a link (never its target) or a directory; returns the bytes freed.

        A directory that is not empty needs ``recursive``. Bytes freed count a file only when
        its last hard link goes.
        """
        parts = split_path(path)
        if not parts:
            raise InvalidRequest("the vfolder's root cannot be deleted; delete what is inside it")
        pfd, name = self._parent(parts)
        try:
            sr = os.stat(name, dir_fd=pfd, follow_symlinks=False)
            if not st.S_ISDIR(sr.st_mode):
                os.unlink(name, dir_fd=pfd)
                return sr.st_size if st.S_ISREG(sr.st_mode) and sr.st_nlink == 1 else 0
            if not recursive:
                try:
                    os.rmdir(name, dir_fd=pfd)
                except OSError as e:
                    if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
                        raise Conflict(
                            f"{_shown(path)} is a directory that is not empty; "
                            "delete it recursively or empty it first"
                        ) from None
                    raise
                return 0
            dfd = os.open(name, _O_READ_DIR | os.O_NOFOLLOW, dir_fd=pfd)
            try:
                freed = _freed(dfd)
            finally:
                os.close(dfd)
            shutil.rmtree(name, dir_fd=pfd)
            return freed
        except _Changed:
            raise Conflict(f"{_shown(path)} changed while it was being deleted; try again") from None
        except OSError as e:
            if e.errno == errno.ELOOP:  # swapped for a link since the lstat
                raise Conflict(f"{_shown(path)} changed while it was being deleted; try again") from None
            raise _fail(e, path) from None
        finally:
            os.close(pfd)

    def close(self) -> None:
        """Release the descriptors of the root and the staging directory."""
        _close(self._root_fd)
        _close(self._staging_fd)
        self._root_fd = self._staging_fd = None

    def __enter__(self) -> VFolderFS:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _freed(dfd: int) -> int:
    """Bytes that deleting the tree under ``dfd`` frees: files whose every hard link is in it."""
    freed = 0
    linked: dict[tuple[int, int], list[int]] = {}
    for sr in _regular_files(dfd):
        if sr.st_nlink == 1:
            freed += sr.st_size
            continue
        seen = linked.setdefault((sr.st_dev, sr.st_ino), [sr.st_size, sr.st_nlink, 0])
        seen[2] += 1
    return freed + sum(size for size, nlink, count in linked.values() if count >= nlink)


class _Budget:
    """Bytes an operation has added, against the limit it was given."""

    def __init__(self, limit: int | None, error: Any) -> None:
        self.limit = limit
        self.used = 0
        self._error = error

    def add(self, n: int) -> None:
        self.used += n
        if self.limit is not None and self.used > self.limit:
            raise self._error(self.limit, self.used)


class StagedFile:
    """A file being written in the staging directory, renamed into the vfolder on commit.

    ``size`` is what has been written so far; ``limit``, when set, is the most it may reach.
    """

    def __init__(
        self,
        fs: VFolderFS,
        name: str,
        fd: int,
        limit: int | None,
        *,
        target: str | None = None,
        discard_on_error: bool = False,
    ) -> None:
        self._fs = fs
        self._name = name
        self._fd: int | None = fd
        self._target = target
        self._discard = discard_on_error
        self.limit = limit
        self.size = os.fstat(fd).st_size

    @property
    def done(self) -> bool:
        """Committed or aborted: nothing more can be written."""
        return self._fd is None

    def _check_open(self) -> int:
        if self._fd is None:
            raise Conflict("this upload was already committed or aborted; start a new one")
        return self._fd

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Append ``data``. Over ``limit``: QuotaExceeded, the file as it was before this chunk."""
        fd = self._check_open()
        view = memoryview(data).cast("B")
        new = self.size + len(view)
        if self.limit is not None and new > self.limit:
            err = self._fs._quota_error(self.limit, new)
            if self._discard:
                self.abort()
            raise err
        off = 0
        try:
            while off < len(view):
                n = os.pwrite(fd, view[off:], self.size + off)
                if n <= 0:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                off += n
        except OSError as e:
            try:
                os.ftruncate(fd, self.size)
            except OSError:
                pass
            if self._discard:
                self.abort()
            raise _fail(e, self._target or "the upload") from None
        self.size = new

    def commit(self, path: str | None = None, *, overwrite: bool = True) -> Entry:
        """fsync, then rename onto ``path`` (a writer's own path by default) in one step.

        ``path``'s folder is resolved beneath the root like any other; an existing directory
        there is a Conflict, and so is an existing file without ``overwrite``.
        """
        fd = self._check_open()
        if path is None:
            path = self._target
        if path is None:
            raise InvalidRequest("name the path to commit the upload to")
        try:
            entry = self._commit(fd, path, overwrite)
        except BaseException:
            if self._discard:
                self.abort()
            raise
        return entry

    def _commit(self, fd: int, path: str, overwrite: bool) -> Entry:
        fs = self._fs
        parts = split_path(path)
        if not parts:
            raise Conflict("the vfolder's root is a directory; name a file to write")
        pfd, name = fs._parent(parts)
        try:
            cur = fs._lstat_at(pfd, name)
            if cur is not None and st.S_ISDIR(cur.st_mode):
                raise Conflict(f"{_shown(path)} is a directory; name a file to write")
            if cur is not None and not overwrite:
                raise Conflict(f"{_shown(path)} already exists; delete it first or ask to overwrite it")
            fs._own(fd, FILE_MODE)
            os.fsync(fd)
            fs._rename(fs._staging, self._name, pfd, name, replace=overwrite)
            sr = os.fstat(fd)
            self._fd = None
            os.close(fd)
            _fsync_dir(pfd)
            return Entry.from_stat(parts, sr)
        except OSError as e:
            if e.errno == errno.EXDEV:
                raise ApiError(
                    "the staging directory is on another filesystem than the vfolder; "
                    "ask an administrator to fix the volume's layout",
                    status=500,
                ) from None
            if e.errno == errno.EISDIR:
                raise Conflict(f"{_shown(path)} is a directory; name a file to write") from None
            if e.errno == errno.EEXIST:
                raise Conflict(
                    f"{_shown(path)} already exists; delete it first or ask to overwrite it"
                ) from None
            raise _fail(e, path) from None
        finally:
            os.close(pfd)

    def truncate(self, size: int) -> None:
        """Cut the staged file back to ``size`` bytes (undo a chunk that was refused)."""
        fd = self._check_open()
        if size < self.size:
            os.ftruncate(fd, size)
            self.size = size

    def close(self) -> None:
        """Let go of the staged file, keeping it (a resumable upload goes on later)."""
        if self._fd is not None:
            _close(self._fd)
            self._fd = None

    def abort(self) -> None:
        """Remove the staged file; a no-op after commit or abort."""
        if self._fd is None:
            return
        _close(self._fd)
        self._fd = None
        try:
            os.unlink(self._name, dir_fd=self._fs._staging)
        except FileNotFoundError:
            pass

    def __enter__(self) -> StagedFile:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.abort()


def _fsync_dir(pfd: int) -> None:
    """Make a rename into the directory ``pfd`` durable; best effort (it may not be readable)."""
    try:
        fd = os.open(".", _O_READ_DIR, dir_fd=pfd)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
