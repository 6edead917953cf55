"""The vfolder file API against what a hostile kernel can do to its own folder.

A kernel mounts its vfolder read-write, so it can plant symlinks to /etc or to the next user's
folder, and swap directories for links between two gateway calls. Every test builds a volume
with two users' vfolders and a directory next to them, runs file operations on one vfolder, and
checks nothing outside it changed. Resolution tests run twice: with openat2(2) and with the
descriptor walk used where the kernel lacks it.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from backendai_jupyter.common.errors import ApiError, Conflict, Forbidden, InvalidRequest, NotFound
from backendai_jupyter.gateway.vfolders import fs as fsmod
from backendai_jupyter.gateway.vfolders.fs import (
    QuotaExceeded,
    VFolderFS,
    create_root,
    human_bytes,
    split_path,
)

IS_ROOT = os.geteuid() == 0
OWNER = (1000, 1000)


@pytest.fixture(params=["openat2", "walk"])
def resolver(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run the test with openat2(2), then with the descriptor walk (and only that one)."""

    def unused(*args: object) -> int:
        raise AssertionError(f"resolved without {request.param}")

    if request.param == "walk":
        monkeypatch.setattr(fsmod, "USE_OPENAT2", False)
        monkeypatch.setattr(fsmod, "_openat2", unused)
    else:
        monkeypatch.setattr(fsmod, "USE_OPENAT2", True)
        if not fsmod._use_openat2():
            pytest.skip("this kernel has no openat2(2)")
        monkeypatch.setattr(fsmod, "_walk_beneath", unused)
    return str(request.param)


def snapshot(top: Path, skip: Path | None = None) -> dict[str, tuple[object, ...]]:
    """Everything under ``top`` (but ``skip``): kind, content or link target, mode, owner."""
    out: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(top):
        d = Path(dirpath)
        if skip is not None and d == skip:
            dirnames[:] = []
            continue
        for name in dirnames + filenames:
            p = d / name
            if skip is not None and p == skip:
                continue
            s = p.lstat()
            if stat.S_ISLNK(s.st_mode):
                body: object = os.readlink(p)
            elif stat.S_ISREG(s.st_mode):
                body = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                body = None
            out[str(p.relative_to(top))] = (stat.S_IFMT(s.st_mode), body, s.st_mode, s.st_uid, s.st_gid)
    return out


def etc_state() -> tuple[object, ...]:
    passwd = Path("/etc/passwd")
    s = passwd.lstat()
    return (sorted(os.listdir("/etc")), passwd.read_bytes(), s.st_mode, s.st_mtime_ns)


@dataclass
class Volume:
    top: Path  # the volume: vfolders, staging, and a directory that is no one's
    root: Path  # alice's vfolder, the one under test
    bob: Path  # another user's vfolder next to it
    staging: Path
    fs: VFolderFS

    def outside(self) -> tuple[object, ...]:
        return (snapshot(self.top, skip=self.root), etc_state())

    def staged_names(self) -> list[str]:
        return sorted(os.listdir(self.staging))


@pytest.fixture
def vol(tmp_path: Path) -> Iterator[Volume]:
    top = tmp_path / "volume"
    owner = OWNER if IS_ROOT else None
    root = create_root(top / "vfolders" / "alice", owner)
    bob = create_root(top / "vfolders" / "bob", owner)
    (bob / "secret.txt").write_bytes(b"bob's secret\n")
    (top / "shared").mkdir()
    (top / "shared" / "notes.txt").write_text("not alice's\n")
    (top / "etc").mkdir()  # a decoy /etc: what writes are aimed at, never the host's own
    (top / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    staging = top / ".staging"
    staging.mkdir(mode=0o700)
    with VFolderFS(root, staging, owner) as fs:
        yield Volume(top, root, bob, staging, fs)


# case: (link inside alice's folder, a file that exists beyond it). Operations that could
# change what they reach use only these: every target is under the test's own directory, so a
# broken resolver fails the test instead of writing to the host's /etc.
ESCAPES = {
    "absolute-etc": ("etc", "passwd"),
    "sibling-absolute": ("bob_abs", "secret.txt"),
    "sibling-relative": ("bob_rel", "secret.txt"),
    "chain": ("chain1", "secret.txt"),
    "from-subdir": ("sub/up", "secret.txt"),
    "loop": ("loop_a", "secret.txt"),
}
# Reads also go through a link to the host's real /etc.
READ_ESCAPES = {**ESCAPES, "system-etc": ("sysetc", "passwd")}


@pytest.fixture
def planted(vol: Volume) -> Volume:
    """Alice's folder after a kernel planted every link it could to escape."""
    r = vol.root
    (r / "file.txt").write_bytes(b"alice's file\n")
    (r / "sub").mkdir()
    (r / "etc").symlink_to(vol.top / "etc")
    (r / "sysetc").symlink_to("/etc")
    (r / "bob_abs").symlink_to(vol.bob)
    (r / "bob_rel").symlink_to("../bob")
    (r / "chain1").symlink_to("chain2")
    (r / "chain2").symlink_to("sub/chain3")
    (r / "sub" / "chain3").symlink_to("../../bob")
    (r / "sub" / "up").symlink_to("../../bob")
    (r / "loop_a").symlink_to("loop_b")
    (r / "loop_b").symlink_to("loop_a")
    return vol


def refused(case: str) -> type[ApiError]:
    return InvalidRequest if case == "loop" else Forbidden


def attempt(vol: Volume, case: str, op: Callable[[], object]) -> None:
    """``op`` is refused, and nothing outside alice's folder changed or appeared."""
    before = vol.outside()
    with pytest.raises(refused(case)) as info:
        op()
    err = info.value
    if case == "loop":
        assert err.status == 400 and "too many levels of symbolic links" in err.title
    else:
        assert err.status == 403 and "leads outside the vfolder" in err.title
    assert str(vol.top) not in err.title  # messages name the user's path, not the host's
    assert vol.outside() == before
    assert vol.staged_names() == []


# --- path rules -----------------------------------------------------------------------------


def test_split_path_normalises() -> None:
    assert split_path("") == []
    assert split_path(".") == []
    assert split_path("a//b/./c/") == ["a", "b", "c"]
    assert split_path("./a") == ["a"]
    assert split_path("é" * 127) == ["é" * 127]  # 254 bytes: fits


@pytest.mark.parametrize(
    ("path", "words"),
    [
        ("/etc/passwd", "paths are relative to the vfolder"),
        ("..", "'..'"),
        ("../bob/secret.txt", "'..'"),
        ("a/../../bob", "'..'"),
        ("a\0b", "NUL"),
        ("x" * 256, "at most 255"),
        ("é" * 128, "256 bytes long"),
        ("ab/" * 1366, "at most 4096"),
        (b"file.txt", "must be a string"),
        (None, "must be a string"),
        ("\ud800", "UTF-8"),
    ],
)
def test_bad_paths_are_refused(path: object, words: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        split_path(path)  # type: ignore[arg-type]
    assert info.value.status == 400
    assert words in info.value.title


@pytest.mark.parametrize("kind", ["absolute", "dotdot", "nul"])
def test_bad_paths_are_refused_by_every_operation(vol: Volume, kind: str) -> None:
    # The absolute path names the volume's decoy /etc, so a regression cannot touch the host's.
    path = {"absolute": str(vol.top / "etc" / "passwd"), "dotdot": "../bob/secret.txt", "nul": "a\0b"}[kind]
    before = vol.outside()
    ops: list[Callable[[], object]] = [
        lambda: vol.fs.stat(path),
        lambda: vol.fs.lstat(path),
        lambda: vol.fs.listdir(path),
        lambda: vol.fs.open_read(path),
        lambda: vol.fs.writer(path, limit=None),
        lambda: vol.fs.mkdir(path),
        lambda: vol.fs.move(path, "x"),
        lambda: vol.fs.move("x", path),
        lambda: vol.fs.copy(path, "x", limit=None),
        lambda: vol.fs.delete(path),
    ]
    for op in ops:
        with pytest.raises(InvalidRequest):
            op()
    assert vol.outside() == before


# --- links that lead out ---------------------------------------------------------------------


@pytest.mark.parametrize("case", READ_ESCAPES)
def test_read_through_escaping_link(planted: Volume, resolver: str, case: str) -> None:
    link, inner = READ_ESCAPES[case]
    attempt(planted, case, lambda: planted.fs.open_read(f"{link}/{inner}"))


@pytest.mark.parametrize("case", READ_ESCAPES)
def test_stat_through_escaping_link(planted: Volume, resolver: str, case: str) -> None:
    link, inner = READ_ESCAPES[case]
    attempt(planted, case, lambda: planted.fs.stat(f"{link}/{inner}"))
    attempt(planted, case, lambda: planted.fs.stat(link))
    attempt(planted, case, lambda: planted.fs.lstat(f"{link}/{inner}"))
    assert planted.fs.lstat(link).type == "symlink"


@pytest.mark.parametrize("case", READ_ESCAPES)
def test_list_into_escaping_link(planted: Volume, resolver: str, case: str) -> None:
    link, _ = READ_ESCAPES[case]
    attempt(planted, case, lambda: planted.fs.listdir(link))


@pytest.mark.parametrize("case", ESCAPES)
def test_write_through_escaping_link(planted: Volume, resolver: str, case: str) -> None:
    link, inner = ESCAPES[case]
    fs = planted.fs
    attempt(planted, case, lambda: fs.writer(f"{link}/{inner}", limit=None))
    attempt(planted, case, lambda: fs.writer(f"{link}/new.txt", limit=None))

    def commit_through() -> None:
        w = fs.writer("fine.txt", limit=None)
        w.write(b"planted\n")
        w.commit(f"{link}/{inner}")

    attempt(planted, case, commit_through)

    def upload_through() -> None:
        up = fs.staged("upload-0001", create=True)
        up.write(b"planted\n")
        try:
            up.commit(f"{link}/{inner}")
        finally:
            up.abort()

    attempt(planted, case, upload_through)


@pytest.mark.parametrize("case", ESCAPES)
def test_mkdir_through_escaping_link(planted: Volume, resolver: str, case: str) -> None:
    link, _ = ESCAPES[case]
    attempt(planted, case, lambda: planted.fs.mkdir(f"{link}/newdir"))
    attempt(planted, case, lambda: planted.fs.mkdir(f"{link}/a/b", parents=True))


@pytest.mark.parametrize("case", ESCAPES)
def test_move_onto_and_from_escaping_link(planted: Volume, resolver: str, case: str) -> None:
    link, inner = ESCAPES[case]
    fs = planted.fs
    attempt(planted, case, lambda: fs.move("file.txt", f"{link}/{inner}", overwrite=True))
    attempt(planted, case, lambda: fs.move("file.txt", f"{link}/new.txt"))
    attempt(planted, case, lambda: fs.move(f"{link}/{inner}", "stolen.txt"))
    assert (planted.root / "file.txt").read_bytes() == b"alice's file\n"
    assert not (planted.root / "stolen.txt").exists()


@pytest.mark.parametrize("case", READ_ESCAPES)
def test_copy_from_escaping_link(planted: Volume, resolver: str, case: str) -> None:
    link, inner = READ_ESCAPES[case]
    fs = planted.fs
    attempt(planted, case, lambda: fs.copy(f"{link}/{inner}", "copied.txt", limit=None))
    attempt(planted, case, lambda: fs.copy(link, "copied_dir", limit=None))
    assert not (planted.root / "copied.txt").exists()
    assert not (planted.root / "copied_dir").exists()


@pytest.mark.parametrize("case", ESCAPES)
def test_copy_to_escaping_link(planted: Volume, resolver: str, case: str) -> None:
    link, _ = ESCAPES[case]
    attempt(planted, case, lambda: planted.fs.copy("file.txt", f"{link}/copied.txt", limit=None))


@pytest.mark.parametrize("case", ESCAPES)
def test_delete_through_escaping_link(planted: Volume, resolver: str, case: str) -> None:
    link, inner = ESCAPES[case]
    attempt(planted, case, lambda: planted.fs.delete(f"{link}/{inner}"))
    attempt(planted, case, lambda: planted.fs.delete(f"{link}/{inner}", recursive=True))


@pytest.mark.parametrize("case", ESCAPES)
def test_deleting_a_link_removes_only_the_link(planted: Volume, resolver: str, case: str) -> None:
    link, _ = ESCAPES[case]
    before = planted.outside()
    assert planted.fs.delete(link, recursive=True) == 0
    assert not os.path.lexists(planted.root / link)
    assert planted.outside() == before


@pytest.mark.parametrize("case", ESCAPES)
def test_writing_onto_a_link_replaces_the_link(planted: Volume, resolver: str, case: str) -> None:
    link, _ = ESCAPES[case]
    before = planted.outside()
    with planted.fs.writer(link, limit=None) as w:
        w.write(b"now a file\n")
        entry = w.commit()
    assert entry.type == "file"
    assert (planted.root / link).read_bytes() == b"now a file\n"
    assert not (planted.root / link).is_symlink()
    assert planted.outside() == before


def test_listing_shows_links_without_following_them(planted: Volume, resolver: str) -> None:
    entries = {e.name: e for e in planted.fs.listdir("")}
    for name in ("etc", "sysetc", "bob_abs", "bob_rel", "chain1", "loop_a"):
        assert entries[name].type == "symlink"
        assert entries[name].size == 0
    assert entries["file.txt"].type == "file"
    assert entries["sub"].type == "directory"


# --- links that stay inside ------------------------------------------------------------------


@pytest.fixture
def inside(vol: Volume) -> Volume:
    r = vol.root
    (r / "data").mkdir()
    (r / "data" / "real.txt").write_bytes(b"real\n")
    (r / "inlink").symlink_to("data")
    (r / "data" / "flink").symlink_to("real.txt")
    (r / "deep" / "er").mkdir(parents=True)
    (r / "deep" / "er" / "up").symlink_to("../../data/real.txt")
    (r / "dotlink").symlink_to(".")
    return vol


def test_links_inside_are_followed(inside: Volume, resolver: str) -> None:
    fs = inside.fs
    for path in ("inlink/real.txt", "data/flink", "inlink/flink", "deep/er/up", "dotlink/data/real.txt"):
        fd, entry = fs.open_read(path)
        with os.fdopen(fd, "rb") as f:
            assert f.read() == b"real\n"
        assert entry.type == "file" and entry.size == 5
        assert fs.stat(path).type == "file"
    assert [e.name for e in fs.listdir("inlink")] == ["flink", "real.txt"]
    assert fs.stat("inlink").type == "directory"
    assert fs.lstat("inlink").type == "symlink"
    assert fs.stat("dotlink").type == "directory"


def test_writes_follow_links_inside(inside: Volume, resolver: str) -> None:
    fs = inside.fs
    with fs.writer("inlink/new.txt", limit=None) as w:
        w.write(b"new\n")
        w.commit()
    assert (inside.root / "data" / "new.txt").read_bytes() == b"new\n"
    fs.mkdir("inlink/made")
    assert (inside.root / "data" / "made").is_dir()


def test_dangling_link_inside_is_not_found(vol: Volume, resolver: str) -> None:
    (vol.root / "dangling").symlink_to("nowhere")
    with pytest.raises(NotFound) as info:
        vol.fs.stat("dangling")
    assert info.value.status == 404 and "'dangling'" in info.value.title


# --- races -----------------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["absolute", "relative"])
def test_directory_swapped_for_a_link_is_refused(vol: Volume, resolver: str, target: str) -> None:
    fs = vol.fs
    (vol.root / "work").mkdir()
    (vol.root / "work" / "secret.txt").write_bytes(b"alice's\n")
    fd, _ = fs.open_read("work/secret.txt")
    os.close(fd)
    assert [e.name for e in fs.listdir("work")] == ["secret.txt"]

    # Between two calls, a kernel swaps the directory for a link to bob's folder.
    os.rename(vol.root / "work", vol.root / "work.old")
    os.symlink(vol.bob if target == "absolute" else "../bob", vol.root / "work")
    before = vol.outside()
    for op in (
        lambda: fs.open_read("work/secret.txt"),
        lambda: fs.listdir("work"),
        lambda: fs.stat("work/secret.txt"),
        lambda: fs.writer("work/secret.txt", limit=None),
        lambda: fs.delete("work/secret.txt"),
        lambda: fs.move("work.old/secret.txt", "work/secret.txt", overwrite=True),
    ):
        with pytest.raises(Forbidden):
            op()
    assert vol.outside() == before


def test_swap_after_writer_opened_is_caught_at_commit(vol: Volume, resolver: str) -> None:
    (vol.root / "work").mkdir()
    before = vol.outside()
    w = vol.fs.writer("work/out.txt", limit=None)
    w.write(b"result\n")
    os.rename(vol.root / "work", vol.root / "work.old")
    os.symlink("../bob", vol.root / "work")
    with pytest.raises(Forbidden):
        w.commit()
    assert vol.outside() == before
    assert vol.staged_names() == []


# --- atomic writes -----------------------------------------------------------------------------


def test_writer_over_its_limit_leaves_the_target_alone(vol: Volume) -> None:
    (vol.root / "t.txt").write_bytes(b"old")
    w = vol.fs.writer("t.txt", limit=10)
    w.write(b"12345")
    with pytest.raises(QuotaExceeded) as info:
        w.write(b"678901")
    assert info.value.status == 413
    assert info.value.type == "quota-exceeded"
    assert (vol.root / "t.txt").read_bytes() == b"old"
    assert vol.staged_names() == []
    assert w.done
    with pytest.raises(Conflict):
        w.write(b"more")


def test_abort_leaves_nothing(vol: Volume) -> None:
    w = vol.fs.writer("new.txt", limit=None)
    w.write(b"partial")
    assert vol.staged_names() != []
    w.abort()
    w.abort()
    assert not (vol.root / "new.txt").exists()
    assert vol.staged_names() == []


def test_context_manager_aborts_an_uncommitted_writer(vol: Volume) -> None:
    with pytest.raises(RuntimeError), vol.fs.writer("new.txt", limit=None) as w:
        w.write(b"partial")
        raise RuntimeError("client went away")
    assert not (vol.root / "new.txt").exists()
    assert vol.staged_names() == []


def test_commit_replaces_atomically(vol: Volume) -> None:
    target = vol.root / "t.txt"
    target.write_bytes(b"old contents")
    old_ino = target.stat().st_ino
    reader = os.open(target, os.O_RDONLY)
    try:
        w = vol.fs.writer("t.txt", limit=None)
        w.write(b"new ")
        assert target.read_bytes() == b"old contents"  # readers see the old file meanwhile
        w.write(b"contents")
        entry = w.commit()
        assert entry.size == len(b"new contents") and entry.path == "t.txt"
        assert target.read_bytes() == b"new contents"
        assert target.stat().st_ino != old_ino
        assert os.pread(reader, 100, 0) == b"old contents"  # an open reader keeps the old one
    finally:
        os.close(reader)
    assert vol.staged_names() == []
    assert w.done


def test_commit_refuses_a_directory_and_existing_without_overwrite(vol: Volume) -> None:
    (vol.root / "d").mkdir()
    with pytest.raises(Conflict):
        vol.fs.writer("d", limit=None)
    (vol.root / "f.txt").write_bytes(b"keep")
    w = vol.fs.writer("f.txt", limit=None)
    w.write(b"other")
    with pytest.raises(Conflict):
        w.commit(overwrite=False)
    assert (vol.root / "f.txt").read_bytes() == b"keep"
    assert vol.staged_names() == []
    up = vol.fs.staged("upload-0002", create=True)
    up.write(b"x")
    with pytest.raises(Conflict):
        up.commit("d")
    up.abort()


def test_writer_into_missing_folder_is_not_found(vol: Volume) -> None:
    with pytest.raises(NotFound) as info:
        vol.fs.writer("nope/x.txt", limit=None)
    assert "'nope'" in info.value.title


def test_resumable_upload(vol: Volume) -> None:
    fs = vol.fs
    up = fs.staged("upload-0003", create=True, limit=10)
    up.write(b"12345")
    assert up.size == 5
    with pytest.raises(Conflict):
        fs.staged("upload-0003", create=True)
    again = fs.staged("upload-0003", create=False, limit=10)
    assert again.size == 5
    with pytest.raises(QuotaExceeded):
        again.write(b"123456")
    assert again.size == 5 and not again.done  # a resumable upload survives a refused chunk
    again.write(b"67890")
    entry = again.commit("up.txt")
    assert entry.size == 10
    assert (vol.root / "up.txt").read_bytes() == b"1234567890"
    with pytest.raises(NotFound):
        fs.staged("upload-0003", create=False)
    assert vol.staged_names() == []


@pytest.mark.parametrize("name", ["short", "has space!", "a" * 65, "../../etc", 12345678])
def test_upload_ids_are_checked(vol: Volume, name: object) -> None:
    with pytest.raises(InvalidRequest):
        vol.fs.staged(name, create=True)  # type: ignore[arg-type]


def test_quota_message_names_the_quota(vol: Volume) -> None:
    err = QuotaExceeded(10_000_000, 8_000_000, 14_000_000)
    assert err.title == (
        "the vfolder's quota is 10.0 MB and this write needs 12.0 MB more than is free; "
        "delete files or ask for a larger quota"
    )
    assert err.to_json()["quota"] == 10_000_000
    fs = VFolderFS(vol.root, vol.staging, quota=10_000_000)
    try:
        w = fs.writer("big.bin", limit=2_000_000)
        with pytest.raises(QuotaExceeded) as info:
            w.write(b"\0" * 3_000_000)
        assert "quota is 10.0 MB" in info.value.title
        assert "needs 1.0 MB more" in info.value.title
    finally:
        fs.close()


def test_human_bytes() -> None:
    assert human_bytes(0) == "0 bytes"
    assert human_bytes(1) == "1 byte"
    assert human_bytes(999) == "999 bytes"
    assert human_bytes(1000) == "1.0 kB"
    assert human_bytes(999_999) == "1.0 MB"
    assert human_bytes(12_000_000) == "12.0 MB"
    assert human_bytes(3 * 10**12) == "3.0 TB"


# --- ownership ---------------------------------------------------------------------------------


@pytest.fixture
def tight_umask() -> Iterator[None]:
    """A umask that would spoil the modes if the fs left them to it."""
    old = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(old)


def assert_owned(p: Path, mode: int) -> None:
    s = p.lstat()
    assert stat.S_IMODE(s.st_mode) == mode, oct(s.st_mode)
    if IS_ROOT:
        assert (s.st_uid, s.st_gid) == OWNER


def test_what_the_fs_creates_is_the_owners(vol: Volume, tight_umask: None) -> None:
    fs = vol.fs
    assert_owned(vol.root, 0o2775)
    w = fs.writer("made.txt", limit=None)
    w.write(b"x")
    staged = vol.staging / vol.staged_names()[0]
    assert stat.S_IMODE(staged.stat().st_mode) == 0o600
    w.commit()
    assert_owned(vol.root / "made.txt", 0o664)
    fs.mkdir("d1")
    assert_owned(vol.root / "d1", 0o2775)
    fs.mkdir("p/q/r", parents=True)
    for d in ("p", "p/q", "p/q/r"):
        assert_owned(vol.root / d, 0o2775)
    (vol.root / "d1" / "f.txt").write_bytes(b"abc")
    fs.copy("d1", "d2", limit=None)
    assert_owned(vol.root / "d2", 0o2775)
    assert_owned(vol.root / "d2" / "f.txt", 0o664)
    fs.copy("made.txt", "made2.txt", limit=None)
    assert_owned(vol.root / "made2.txt", 0o664)
    up = fs.staged("upload-0004", create=True)
    up.write(b"y")
    up.commit("uploaded.txt")
    assert_owned(vol.root / "uploaded.txt", 0o664)


def test_create_root(tmp_path: Path, tight_umask: None) -> None:
    root = create_root(tmp_path / "a" / "b" / "vf", OWNER if IS_ROOT else None)
    assert_owned(root, 0o2775)
    for d in (tmp_path / "a", tmp_path / "a" / "b"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o755
    with pytest.raises(Conflict) as info:
        create_root(root, None)
    assert str(tmp_path) not in info.value.title


def test_kernel_files_can_be_overwritten_moved_and_deleted(vol: Volume) -> None:
    fd = os.open(vol.root / "k.txt", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    os.write(fd, b"from the kernel")
    if IS_ROOT:
        os.fchown(fd, *OWNER)
    os.fchmod(fd, 0o644)
    os.close(fd)
    kdir = vol.root / "kdir"
    kdir.mkdir(mode=0o755)
    (kdir / "inner.txt").write_bytes(b"inner")
    if IS_ROOT:
        os.chown(kdir, *OWNER)
        os.chown(kdir / "inner.txt", *OWNER)

    fs = vol.fs
    with fs.writer("k.txt", limit=None) as w:
        w.write(b"from the gateway")
        w.commit()
    assert (vol.root / "k.txt").read_bytes() == b"from the gateway"
    assert_owned(vol.root / "k.txt", 0o664)
    fs.move("k.txt", "kdir/k.txt")
    assert (kdir / "k.txt").read_bytes() == b"from the gateway"
    assert fs.delete("kdir/k.txt") == len(b"from the gateway")
    assert fs.delete("kdir", recursive=True) == len(b"inner")
    assert not kdir.exists()


# --- copy, usage, delete ------------------------------------------------------------------------


@pytest.fixture
def tree(vol: Volume) -> Volume:
    t = vol.root / "tree"
    (t / "sub" / "deep").mkdir(parents=True)
    (t / "a.txt").write_bytes(b"a" * 100)
    (t / "sub" / "b.txt").write_bytes(b"b" * 200)
    (t / "sub" / "deep" / "c.txt").write_bytes(b"c" * 300)
    (t / "inlink").symlink_to("a.txt")
    (t / "sub" / "sidelink").symlink_to("../../tree/a.txt")
    (t / "outlink").symlink_to(vol.top / "etc")
    (t / "uplink").symlink_to("../../bob")
    (t / "sub" / "deep_up").symlink_to("../../../bob/secret.txt")
    os.mkfifo(t / "fifo")
    return vol


def test_copy_tree(tree: Volume, resolver: str) -> None:
    before = tree.outside()
    entry, added = tree.fs.copy("tree", "tree2", limit=None)
    assert entry.type == "directory" and entry.path == "tree2"
    assert added == 600
    t2 = tree.root / "tree2"
    assert (t2 / "a.txt").read_bytes() == b"a" * 100
    assert (t2 / "sub" / "b.txt").read_bytes() == b"b" * 200
    assert (t2 / "sub" / "deep" / "c.txt").read_bytes() == b"c" * 300
    assert os.readlink(t2 / "inlink") == "a.txt"
    assert os.readlink(t2 / "sub" / "sidelink") == "../../tree/a.txt"
    for skipped in ("outlink", "uplink", "sub/deep_up", "fifo"):
        assert not os.path.lexists(t2 / skipped), skipped
    assert tree.outside() == before
    assert not [n for n in os.listdir(tree.root) if n.startswith(fsmod.COPY_PREFIX)]


def test_copy_judges_links_where_the_copy_lands(tree: Volume, resolver: str) -> None:
    (tree.root / "x" / "y").mkdir(parents=True)
    tree.fs.copy("tree/sub", "x/y/sub", limit=None)
    # "../../tree/a.txt" from x/y/sub still stays beneath the vfolder: kept.
    assert os.readlink(tree.root / "x" / "y" / "sub" / "sidelink") == "../../tree/a.txt"
    tree.fs.copy("tree/sub", "sub_top", limit=None)
    # From the top, it would climb out: skipped.
    assert not os.path.lexists(tree.root / "sub_top" / "sidelink")


def test_copy_file(tree: Volume, resolver: str) -> None:
    entry, added = tree.fs.copy("tree/a.txt", "a_copy.txt", limit=100)
    assert added == 100 and entry.type == "file" and entry.size == 100
    assert (tree.root / "a_copy.txt").read_bytes() == b"a" * 100
    entry, _ = tree.fs.copy("tree/inlink", "via_link.txt", limit=None)
    assert entry.type == "file"


def test_copy_over_limit_writes_nothing(tree: Volume) -> None:
    with pytest.raises(QuotaExceeded):
        tree.fs.copy("tree", "tree2", limit=599)
    with pytest.raises(QuotaExceeded):
        tree.fs.copy("tree/a.txt", "a2.txt", limit=99)
    assert sorted(os.listdir(tree.root)) == ["tree"]


def test_copy_failure_leaves_nothing_half_copied(tree: Volume, monkeypatch: pytest.MonkeyPatch) -> None:
    real = VFolderFS._copy_file
    calls = []

    def flaky(self: VFolderFS, *args: object) -> None:
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(VFolderFS, "_copy_file", flaky)
    with pytest.raises(QuotaExceeded) as info:
        tree.fs.copy("tree", "tree2", limit=None)
    assert "volume is full" in info.value.title
    assert sorted(os.listdir(tree.root)) == ["tree"]


def test_copy_refusals(tree: Volume, resolver: str) -> None:
    fs = tree.fs
    with pytest.raises(InvalidRequest) as info:
        fs.copy("tree", "tree/sub/again", limit=None)
    assert "into itself" in info.value.title
    with pytest.raises(InvalidRequest):
        fs.copy("", "tree/all", limit=None)
    with pytest.raises(Conflict):
        fs.copy("tree/a.txt", "tree/sub", limit=None)
    with pytest.raises(NotFound):
        fs.copy("nope", "x", limit=None)
    with pytest.raises(Conflict):
        fs.copy("tree/fifo", "x", limit=None)
    assert sorted(os.listdir(tree.root)) == ["tree"]
    assert sorted(os.listdir(tree.root / "tree" / "sub")) == ["b.txt", "deep", "deep_up", "sidelink"]


def test_usage_counts_hard_links_once_and_follows_no_link(vol: Volume) -> None:
    r = vol.root
    (r / "d").mkdir()
    (r / "one.bin").write_bytes(b"1" * 1000)
    (r / "d" / "two.bin").write_bytes(b"2" * 20)
    os.link(r / "one.bin", r / "d" / "one-again.bin")
    (r / "bob").symlink_to("../bob")
    (r / "etc").symlink_to("/etc")
    (r / "d" / "self").symlink_to("..")
    assert vol.fs.usage() == 1020


def test_usage_and_delete_in_a_deep_tree(vol: Volume, resolver: str, monkeypatch: pytest.MonkeyPatch) -> None:
    depth = 3 * fsmod._WALK_WINDOW  # deeper than the descriptors a walk keeps open
    d = vol.root
    for i in range(depth):
        d = d / "d"
        d.mkdir()
        (d / f"f{i}").write_bytes(b"x" * i)
        if i % 50 == 0:
            (d / "side").mkdir()
            (d / "side" / "s").write_bytes(b"s" * 7)
    expected = sum(range(depth)) + 7 * len(range(0, depth, 50))

    scan = fsmod._scan
    most_open = []

    def counting(fd: int, subdirs: list[str]) -> list[os.stat_result]:
        most_open.append(len(os.listdir("/proc/self/fd")))
        return scan(fd, subdirs)

    monkeypatch.setattr(fsmod, "_scan", counting)
    baseline = len(os.listdir("/proc/self/fd"))
    assert vol.fs.usage() == expected
    assert max(most_open) <= baseline + fsmod._WALK_WINDOW + 2  # however deep the tree
    assert len(os.listdir("/proc/self/fd")) == baseline  # and all closed again
    assert vol.fs.delete("d", recursive=True) == expected
    assert os.listdir(vol.root) == []


def test_delete(vol: Volume, resolver: str) -> None:
    r = vol.root
    (r / "t" / "u").mkdir(parents=True)
    (r / "t" / "a").write_bytes(b"a" * 10)
    (r / "t" / "u" / "b").write_bytes(b"b" * 20)
    os.link(r / "t" / "a", r / "t" / "u" / "a-again")  # both links inside: freed
    (r / "kept").write_bytes(b"k" * 40)
    os.link(r / "kept", r / "t" / "kept-link")  # a link outside survives: not freed
    (r / "t" / "u" / "ln").symlink_to("../../kept")
    (r / "empty").mkdir()
    fs = vol.fs
    with pytest.raises(Conflict) as info:
        fs.delete("t")
    assert info.value.status == 409 and "not empty" in info.value.title
    assert fs.delete("t", recursive=True) == 30
    assert not (r / "t").exists()
    assert (r / "kept").read_bytes() == b"k" * 40
    assert fs.delete("empty") == 0
    assert fs.delete("kept") == 40
    with pytest.raises(NotFound):
        fs.delete("kept")
    with pytest.raises(InvalidRequest):
        fs.delete("")
    with pytest.raises(InvalidRequest):
        fs.delete(".", recursive=True)
    assert os.listdir(r) == []


# --- the rest of the API -----------------------------------------------------------------------


def test_listdir_of_many_files(vol: Volume) -> None:
    names = [f"file-{i:04d}.txt" for i in range(1000)]
    for n in reversed(names):
        (vol.root / n).write_bytes(b"x")
    (vol.root / "zz-link").symlink_to("file-0000.txt")
    entries = vol.fs.listdir("")
    assert [e.name for e in entries] == [*names, "zz-link"]
    assert all(e.type == "file" and e.size == 1 for e in entries[:-1])
    assert entries[-1].type == "symlink" and entries[-1].size == 0


def test_mkdir(vol: Volume, resolver: str) -> None:
    fs = vol.fs
    entry = fs.mkdir("a")
    assert entry.type == "directory" and entry.path == "a" and entry.name == "a"
    with pytest.raises(Conflict):
        fs.mkdir("a")
    with pytest.raises(NotFound) as info:
        fs.mkdir("x/y")
    assert "'x'" in info.value.title
    assert fs.mkdir("a/b/c", parents=True).path == "a/b/c"
    assert fs.mkdir("a/b/c", parents=True).type == "directory"
    (vol.root / "f").write_bytes(b"")
    with pytest.raises(Conflict):
        fs.mkdir("f/g", parents=True)
    with pytest.raises(Conflict):
        fs.mkdir("")


def test_move(vol: Volume, resolver: str) -> None:
    r = vol.root
    fs = vol.fs
    (r / "a.txt").write_bytes(b"a")
    (r / "b.txt").write_bytes(b"b")
    (r / "d" / "e").mkdir(parents=True)
    (r / "ln").symlink_to("a.txt")
    assert fs.move("a.txt", "d/a.txt").path == "d/a.txt"
    assert (r / "d" / "a.txt").read_bytes() == b"a"
    with pytest.raises(Conflict):
        fs.move("b.txt", "d/a.txt")
    fs.move("b.txt", "d/a.txt", overwrite=True)
    assert (r / "d" / "a.txt").read_bytes() == b"b"
    with pytest.raises(NotFound):
        fs.move("b.txt", "c.txt")
    with pytest.raises(NotFound):
        fs.move("d/a.txt", "nope/a.txt")
    with pytest.raises(InvalidRequest) as info:
        fs.move("d", "d/e/d")
    assert "into itself" in info.value.title
    with pytest.raises(InvalidRequest):
        fs.move("", "x")
    with pytest.raises(InvalidRequest):
        fs.move("d", "")
    with pytest.raises(Conflict):
        fs.move("d/a.txt", "d/e", overwrite=True)
    assert fs.move("ln", "ln2").type == "symlink"  # the link moves, dangling now
    assert os.readlink(r / "ln2") == "a.txt"


def test_rename_without_replace_refuses_in_one_step(vol: Volume) -> None:
    # What commit(overwrite=False), move and copy rely on when a kernel creates the target
    # between their check and their rename.
    (vol.root / "a").write_bytes(b"a")
    (vol.root / "b").write_bytes(b"b")
    root = vol.fs._root
    with pytest.raises(FileExistsError):
        vol.fs._rename(root, "a", root, "b", replace=False)
    assert (vol.root / "b").read_bytes() == b"b"
    vol.fs._rename(root, "a", root, "c", replace=False)
    assert (vol.root / "c").read_bytes() == b"a"


def test_errors_name_the_users_path(vol: Volume, resolver: str) -> None:
    fs = vol.fs
    (vol.root / "d").mkdir()
    (vol.root / "f.txt").write_bytes(b"f")
    cases: list[tuple[Callable[[], object], type[ApiError], str]] = [
        (lambda: fs.stat("missing.txt"), NotFound, "'missing.txt' does not exist"),
        (lambda: fs.open_read("d"), Conflict, "'d' is a directory"),
        (lambda: fs.open_read(""), Conflict, "is a directory"),
        (lambda: fs.listdir("f.txt"), Conflict, "'f.txt' is not a directory"),
        (lambda: fs.stat("f.txt/x"), Conflict, "is not a directory"),
        (lambda: fs.lstat("missing/x"), NotFound, "'missing'"),
    ]
    for op, kind, words in cases:
        with pytest.raises(kind) as info:
            op()
        assert words in info.value.title
        assert str(vol.top) not in info.value.title


def test_entry_json(vol: Volume) -> None:
    (vol.root / "f.txt").write_bytes(b"12345")
    os.utime(vol.root / "f.txt", ns=(0, 1_700_000_000_123_456_000))
    entry = vol.fs.stat("./f.txt")
    body = entry.to_json()
    assert body["name"] == "f.txt" and body["path"] == "f.txt"
    assert body["type"] == "file" and body["size"] == 5
    assert body["mtime"] == "2023-11-14T22:13:20.123456Z"
    assert body["mtime_ts"] == pytest.approx(1_700_000_000.123456)
    assert body["ctime"].endswith("Z") and isinstance(body["ctime_ts"], float)
    assert body["mode"] == stat.S_IMODE((vol.root / "f.txt").stat().st_mode)
    root = vol.fs.stat("")
    assert root.name == "" and root.path == "" and root.type == "directory"


def test_special_files_are_not_read(vol: Volume, resolver: str) -> None:
    os.mkfifo(vol.root / "fifo")  # opening it for reading must not wait for a writer
    os.mknod(vol.root / "sock", 0o644 | stat.S_IFSOCK)
    for name in ("fifo", "sock"):
        with pytest.raises(Conflict) as info:
            vol.fs.open_read(name)
        assert f"'{name}' is not a regular file" in info.value.title
        assert vol.fs.lstat(name).type == "other"


def test_resolving_to_a_directory_refuses_a_file(vol: Volume, resolver: str) -> None:
    (vol.root / "f.txt").write_bytes(b"f")
    (vol.root / "flink").symlink_to("f.txt")
    for parts in (["f.txt"], ["flink"], ["f.txt", "x"]):
        for flags in (fsmod._O_PATH_DIR, fsmod._O_READ_DIR):
            with pytest.raises(NotADirectoryError):
                fsmod._open_beneath(vol.fs._root, parts, flags)


def test_falls_back_when_openat2_is_missing(vol: Volume, monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(*args: object) -> int:
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))

    monkeypatch.setattr(fsmod, "_openat2", missing)
    monkeypatch.setattr(fsmod, "_openat2_works", None)
    (vol.root / "bob").symlink_to("../bob")
    (vol.root / "f.txt").write_bytes(b"f")
    assert vol.fs.stat("f.txt").size == 1
    with pytest.raises(Forbidden):
        vol.fs.stat("bob/secret.txt")
    assert fsmod._openat2_works is False


def test_closed_fs_refuses_work(vol: Volume) -> None:
    fs = VFolderFS(vol.root, vol.staging)
    fs.close()
    fs.close()
    with pytest.raises(RuntimeError):
        fs.stat("")


def test_missing_root_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(NotFound) as info:
        VFolderFS(tmp_path / "nope", tmp_path)
    assert str(tmp_path) not in info.value.title
