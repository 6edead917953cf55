"""The Jupyter kernel: compile each cell with the kept declarations, run it, stream its output."""

from __future__ import annotations

import asyncio
import atexit
import codecs
import fcntl
import os
import re
import resource
import shutil
import signal
import subprocess
import tempfile
import termios
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq
from ipykernel.kernelbase import Kernel

from . import __version__
from .languages import READ_SYSCALLS, Decl, Language, Program, merge
from .source import completeness, identifiers, mask

# How long the program must have been quiet, while blocked reading its stdin, before the
# kernel asks the frontend for a line.
STDIN_QUIET_S = 0.2
# Without /proc access to the program's syscalls, a quieter wait is needed (see _reading_stdin).
STDIN_QUIET_FALLBACK_S = 0.5
# After an interrupt (SIGINT to the program), how long before SIGKILL.
INTERRUPT_GRACE_S = 1.0
# After the program exits, how long to wait for what its leftovers still write.
DRAIN_S = 0.5
POLL_S = 0.05
FLUSH_S = 0.05
FLUSH_BYTES = 65536


class _Interrupted(Exception):
    pass


def _signal_text(signum: int) -> str:
    try:
        name = signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"
    description = signal.strsignal(signum) or name
    return f"{description} ({name})"


class CompiledKernel(Kernel):
    """One kernel class for every language; subclasses made by :func:`kernel_class` set ``lang``."""

    implementation = "bai-compiled"
    implementation_version = __version__
    lang: Language

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.kept: dict[str, Decl] = {}
        self.home = os.environ.get("HOME") or str(Path.home())
        root, self.exec_ok = _build_root(self.home)
        self.workdir = Path(tempfile.mkdtemp(prefix=f"bai-{self.lang.key}-", dir=root))
        self.run_cwd = os.getcwd()
        self.child_env = {**os.environ, **self.lang.env(self.home)}
        self._pgid: int | None = None  # process group of the running compiler or program
        self._interrupted = False
        self._interrupt_at = 0.0
        self._silent = False
        self._silent_runs = 0
        self._version = self.lang.version()
        self._prepared = threading.Thread(target=self._prepare, name="prepare", daemon=True)
        self._prepared.start()
        try:  # a crashing program must not fill the small writable filesystems with cores
            resource.setrlimit(resource.RLIMIT_CORE, (0, resource.getrlimit(resource.RLIMIT_CORE)[1]))
        except (ValueError, OSError):
            pass
        atexit.register(self._cleanup)

    # -- kernel_info ------------------------------------------------------------------------

    @property
    def language_info(self) -> dict[str, Any]:  # type: ignore[override]
        lang = self.lang
        return {
            "name": lang.language_name,
            "version": self._version,
            "mimetype": lang.mimetype,
            "file_extension": lang.file_extension,
            "codemirror_mode": lang.codemirror_mode,
            "pygments_lexer": lang.pygments_lexer,
        }

    @property
    def banner(self) -> str:  # type: ignore[override]
        return f"{self.lang.display_name} {self._version} (bai-compiled kernel {__version__})"

    # -- lifecycle ----------------------------------------------------------------------------

    def _prepare(self) -> None:
        try:
            self.lang.prepare(self.home)
        except Exception:
            self.log.warning("preparing the %s toolchain failed", self.lang.display_name, exc_info=True)

    def start(self) -> None:
        super().start()
        # Both interrupt paths end here: `interrupt_request` (ipykernel signals its own process)
        # and SIGINT from outside (the container's init forwards it). Either stops the program,
        # never the kernel.
        signal.signal(signal.SIGINT, self._on_sigint)
        signal.signal(signal.SIGTERM, self._on_sigterm)

    def pre_handler_hook(self) -> None:
        """Keep our SIGINT handler while a request runs (ipykernel would raise KeyboardInterrupt)."""

    def post_handler_hook(self) -> None:
        pass

    def _on_sigint(self, signum: int, frame: Any) -> None:
        self._interrupted = True
        self._interrupt_at = time.monotonic()
        self._kill_group(signal.SIGINT)

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        self._cleanup()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)

    def _kill_group(self, sig: int) -> None:
        pgid = self._pgid
        if pgid is not None:
            try:
                os.killpg(pgid, sig)
            except (ProcessLookupError, PermissionError):
                pass

    def _cleanup(self) -> None:
        self._kill_group(signal.SIGKILL)
        shutil.rmtree(self.workdir, ignore_errors=True)

    async def do_shutdown(self, restart: bool) -> dict[str, Any]:
        self._kill_group(signal.SIGKILL)
        if not restart:
            shutil.rmtree(self.workdir, ignore_errors=True)
        else:
            self.kept.clear()
        return {"status": "ok", "restart": restart}

    # -- execute ------------------------------------------------------------------------------

    async def do_execute(  # type: ignore[override]
        self,
        code: str,
        silent: bool,
        store_history: bool = True,
        user_expressions: dict[str, Any] | None = None,
        allow_stdin: bool = False,
        *,
        cell_meta: Any = None,
        cell_id: Any = None,
    ) -> dict[str, Any]:
        self._interrupted = False
        if not code.strip():
            return self._ok()
        if silent:  # does not count: a label of its own, not the last cell's
            self._silent_runs += 1
            label = f"silent[{self._silent_runs}]"
        else:
            label = f"cell[{self.execution_count}]"
        self._silent = silent
        try:
            return await self._execute(code, label, allow_stdin)
        except _Interrupted:
            return self._error("KeyboardInterrupt", "interrupted by the user", ["KeyboardInterrupt"])
        except Exception as exc:  # a bug of ours must not leave the cell without a reply
            self.log.exception("executing a cell failed")
            return self._error(
                "KernelError", f"{type(exc).__name__}: {exc}", [f"{type(exc).__name__}: {exc}"]
            )

    async def _execute(self, code: str, label: str, allow_stdin: bool) -> dict[str, Any]:
        plan = self.lang.plan(code, label)
        # The cell's text under its label, so that compilers that quote the source line (gcc
        # reads the file named by #line) show the cell's own lines.
        (self.workdir / label).write_text(code)
        if self._prepared.is_alive():
            await asyncio.to_thread(self._prepared.join)
        kept = merge(self.kept, plan)
        for _attempt in range(5):
            program = self.lang.generate(kept.values(), plan)
            ok, output = await self._build(program)
            if ok or not self.lang.retry_after_error(output, kept, plan):
                break
        if not ok:
            return self._error(
                "CompileError", self.lang.error_summary(output), output.rstrip("\n").split("\n")
            )
        if output.strip():
            self._stream("stderr", output if output.endswith("\n") else output + "\n")
        if not plan.whole:
            self.kept = kept
        if not self.exec_ok and self.lang.runs_built_binary:
            evalue = (
                f"cannot run the compiled program: {self.workdir.parent} is mounted noexec (and no "
                "other writable place allows running programs)"
            )
            return self._error("RuntimeError", evalue, [evalue])
        argv = self.lang.run_argv(self.workdir, program)
        stderr_map = self._line_mapper(program)
        returncode, _ = await self._run(
            argv, self.run_cwd, stream=True, stdin=allow_stdin, code=code, map_stderr=stderr_map
        )
        if returncode < 0:
            evalue = f"the program was killed by signal {-returncode}: {_signal_text(-returncode)}"
            return self._error("RuntimeError", evalue, [evalue])
        if returncode > 0:
            evalue = f"the program exited with code {returncode}"
            return self._error("RuntimeError", evalue, [evalue])
        return self._ok()

    def _line_mapper(self, program: Program) -> Callable[[str], str]:
        return lambda text: self.lang.map_output(text, program)

    async def _build(self, program: Program) -> tuple[bool, str]:
        for name, text in program.files.items():
            (self.workdir / name).write_text(text)
        (self.workdir / "prog").unlink(missing_ok=True)
        self.lang.write_extra(self.workdir)
        outputs = []
        for step in self.lang.build_steps(program):
            returncode, out = await self._run(step.argv, str(self.workdir), stream=False)
            text = self.lang.map_output(out.decode(errors="replace"), program)
            outputs.append(text)
            if returncode != 0:
                return False, "".join(outputs)
        return True, "".join(outputs)

    # -- running a process ---------------------------------------------------------------------

    async def _run(
        self,
        argv: list[str],
        cwd: str,
        *,
        stream: bool,
        stdin: bool = False,
        code: str = "",
        map_stderr: Callable[[str], str] | None = None,
    ) -> tuple[int, bytes]:
        """Run *argv* in a new session; stream (or collect) its output; return (code, collected).

        Raises _Interrupted when the kernel was interrupted meanwhile.
        """
        if self._interrupted:
            raise _Interrupted
        try:
            # Popen, not asyncio's subprocesses: the pipes are read with add_reader below, and
            # the process group is ours to signal from the SIGINT handler.
            proc = subprocess.Popen(  # noqa: ASYNC220
                argv,
                cwd=cwd,
                env=self.child_env,
                stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE if stream else subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as exc:
            return 127, f"{argv[0]}: {exc.strerror or exc}\n".encode()
        self._pgid = proc.pid
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()
        collected = bytearray()
        decoders = {
            "stdout": codecs.getincrementaldecoder("utf-8")(errors="replace"),
            "stderr": codecs.getincrementaldecoder("utf-8")(errors="replace"),
        }
        fds: dict[int, str] = {}
        last_output = time.monotonic()
        # Output waits up to FLUSH_S (or FLUSH_BYTES) so that a chatty program sends a few
        # messages a second, not one per write; stdout and stderr keep their order.
        pending: list[tuple[str, str]] = []
        pending_since = 0.0
        pending_size = 0

        def flush() -> None:
            nonlocal pending_size
            merged: list[tuple[str, str]] = []
            for name, text in pending:
                if merged and merged[-1][0] == name:
                    merged[-1] = (name, merged[-1][1] + text)
                else:
                    merged.append((name, text))
            pending.clear()
            pending_size = 0
            for name, text in merged:
                self._emit(name, text, map_stderr)

        def add(name: str, text: str) -> None:
            nonlocal pending_since, pending_size
            if not text:
                return
            if not pending:
                pending_since = time.monotonic()
            pending.append((name, text))
            pending_size += len(text)
            if pending_size >= FLUSH_BYTES:
                flush()

        def on_readable(fd: int) -> None:
            nonlocal last_output
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                loop.remove_reader(fd)
                name = fds.pop(fd, "stdout")
                if stream:
                    add(name, decoders[name].decode(b"", final=True))
                wake.set()
                return
            last_output = time.monotonic()
            name = fds[fd]
            if stream:
                add(name, decoders[name].decode(data))
            else:
                collected.extend(data)

        for name, pipe in (("stdout", proc.stdout), ("stderr", proc.stderr)):
            if pipe is not None:
                fd = pipe.fileno()
                os.set_blocking(fd, False)
                fds[fd] = name
                loop.add_reader(fd, on_readable, fd)

        stdin_pipe = proc.stdin
        stdin_ino = os.fstat(stdin_pipe.fileno()).st_ino if stdin_pipe is not None else 0
        asking = False
        exited_at: float | None = None
        killed = False
        try:
            while True:
                now = time.monotonic()
                if pending and now - pending_since >= FLUSH_S:
                    flush()
                if proc.poll() is not None:
                    if exited_at is None:
                        exited_at = now
                        # Whatever the program left running in its group goes with it.
                        self._kill_group(signal.SIGKILL)
                        self._pgid = None
                    if not fds or now - exited_at > DRAIN_S:
                        break
                elif self._interrupted and not killed and now - self._interrupt_at > INTERRUPT_GRACE_S:
                    self._kill_group(signal.SIGKILL)
                    killed = True
                if stdin_pipe is not None and exited_at is None and not self._interrupted:
                    if asking:
                        value = self._poll_input_reply()
                        if value is not None:
                            asking = False
                            last_output = time.monotonic()
                            stdin_pipe = self._feed_stdin(stdin_pipe, value)
                    elif now - last_output >= STDIN_QUIET_S and _pipe_empty(stdin_pipe):
                        waiting = _reading_stdin(proc.pid, stdin_ino)
                        if waiting is None:  # the syscalls cannot be seen: guess from source
                            waiting = (
                                now - last_output >= STDIN_QUIET_FALLBACK_S
                                and bool(re.search(self.lang.stdin_apis, mask(code, self.lang.key).text))
                                and _all_sleeping(proc.pid)
                            )
                        if waiting:
                            flush()
                            self._send_input_request()
                            asking = True
                wake.clear()
                try:
                    await asyncio.wait_for(wake.wait(), POLL_S)
                except TimeoutError:
                    pass
        finally:
            flush()
            for fd in list(fds):
                loop.remove_reader(fd)
            if proc.poll() is None:
                self._kill_group(signal.SIGKILL)
                proc.wait()
            self._pgid = None
            for pipe in (proc.stdin, proc.stdout, proc.stderr):
                if pipe is not None:
                    try:
                        pipe.close()
                    except OSError:
                        pass
        if self._interrupted:
            raise _Interrupted
        return proc.returncode, bytes(collected)

    def _emit(self, name: str, text: str, map_stderr: Callable[[str], str] | None) -> None:
        if not text:
            return
        if name == "stderr" and map_stderr is not None:
            text = map_stderr(text)
        self._stream(name, text)

    def _feed_stdin(self, pipe: Any, value: str | None) -> Any:
        """Write one line to the program; a lone Ctrl-D (EOT) closes its stdin instead."""
        try:
            if value == "\x04":
                pipe.close()
                return None
            pipe.write((value + "\n").encode())
            pipe.flush()
        except (BrokenPipeError, OSError, ValueError):
            return None
        return pipe

    # -- stdin over the Jupyter stdin channel (without blocking the event loop) ----------------

    def _send_input_request(self, prompt: str = "") -> None:
        while True:  # drop stale replies
            try:
                self.stdin_socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
        # The execute_request being handled (ipykernel 6 and 7 both offer _parent_ident).
        ident, parent = self._parent_ident["shell"], self.get_parent("shell")
        assert self.session is not None
        content = {"prompt": prompt, "password": False}
        self.session.send(self.stdin_socket, "input_request", content, parent, ident=ident)

    def _poll_input_reply(self) -> str | None:
        assert self.session is not None
        try:
            _, reply = self.session.recv(self.stdin_socket, zmq.NOBLOCK)
        except Exception:
            self.log.warning("invalid input_reply", exc_info=True)
            return None
        if reply is None:
            return None
        return str(reply.get("content", {}).get("value", ""))

    # -- replies ---------------------------------------------------------------------------------

    def _stream(self, name: str, text: str) -> None:
        if not self._silent:
            self.send_response(self.iopub_socket, "stream", {"name": name, "text": text})

    def _ok(self) -> dict[str, Any]:
        return {
            "status": "ok",
            "execution_count": self.execution_count,
            "payload": [],
            "user_expressions": {},
        }

    def _error(self, ename: str, evalue: str, traceback: list[str]) -> dict[str, Any]:
        content = {"ename": ename, "evalue": evalue, "traceback": traceback}
        if not self._silent:
            self.send_response(self.iopub_socket, "error", content)
        return {"status": "error", "execution_count": self.execution_count, **content}

    # -- is_complete / complete ------------------------------------------------------------------

    async def do_is_complete(self, code: str) -> dict[str, Any]:
        status, indent = completeness(code, self.lang.key)
        reply: dict[str, Any] = {"status": status}
        if status == "incomplete":
            reply["indent"] = indent
        return reply

    async def do_complete(self, code: str, cursor_pos: int | None) -> dict[str, Any]:
        if cursor_pos is None:
            cursor_pos = len(code)
        m = re.search(r"[A-Za-z_][A-Za-z0-9_]*$", code[:cursor_pos])
        prefix = m.group(0) if m else ""
        known = self.lang.completion_names(self.kept.values())
        in_cell = set(identifiers(mask(code, self.lang.key).text))
        # The word being typed is in the cell too; offer it only if it is known elsewhere.
        if prefix and code.count(prefix) <= 1:
            in_cell.discard(prefix)
        candidates = known | in_cell
        matches = sorted(n for n in candidates if n.startswith(prefix)) if prefix else []
        return {
            "status": "ok",
            "matches": matches,
            "cursor_start": cursor_pos - len(prefix),
            "cursor_end": cursor_pos,
            "metadata": {},
        }


def _build_root(home: str) -> tuple[str | None, bool]:
    """Where to build: the temp dir or the home, the first writable one that allows exec.

    Returns (directory, whether programs there can run); (None, False) means the default
    temp dir, where they cannot.
    """
    for candidate in (tempfile.gettempdir(), home):
        try:
            if os.access(candidate, os.W_OK | os.X_OK) and not os.statvfs(candidate).f_flag & os.ST_NOEXEC:
                return candidate, True
        except OSError:
            continue
    return None, False


def _pipe_empty(pipe: Any) -> bool:
    """Whether everything written to the program's stdin has been read."""
    buf = bytearray(4)
    try:
        fcntl.ioctl(pipe.fileno(), termios.FIONREAD, buf)
    except (OSError, ValueError):
        return True
    return int.from_bytes(buf, "little") == 0


def _group_pids(pid: int) -> list[int]:
    """*pid* and its descendants (via /proc/<pid>/task/*/children)."""
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        try:
            for tid in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{tid}/children") as f:
                    todo.extend(int(p) for p in f.read().split())
        except OSError:
            continue
    return out


def _reading_stdin(pid: int, pipe_ino: int) -> bool | None:
    """Whether a process of the program blocks in read() on the stdin pipe we hold.

    Looks at /proc/<pid>/fd/0 (is it our pipe?) and /proc/<pid>/task/<tid>/syscall (is a
    thread in read/readv/pread64 on fd 0?). Returns None when /proc does not tell (no
    permission, or an architecture whose syscall numbers we do not know).
    """
    if not READ_SYSCALLS:
        return None
    unknown = False
    for p in _group_pids(pid):
        try:
            if os.readlink(f"/proc/{p}/fd/0") != f"pipe:[{pipe_ino}]":
                continue
            tids = os.listdir(f"/proc/{p}/task")
        except PermissionError:
            unknown = True
            continue
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{p}/task/{tid}/syscall") as f:
                    fields = f.read().split()
            except PermissionError:
                unknown = True
                continue
            except OSError:
                continue
            if len(fields) >= 2 and fields[0].isdigit() and int(fields[0]) in READ_SYSCALLS:
                if int(fields[1], 16) == 0:
                    return True
    return None if unknown else False


def _all_sleeping(pid: int) -> bool:
    """Whether every thread of the program's processes sleeps (state S)."""
    for p in _group_pids(pid):
        try:
            tids = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{p}/task/{tid}/stat") as f:
                    state = f.read().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                continue
            if state != "S":
                return False
    return True


def kernel_class(language: Language) -> type[CompiledKernel]:
    """The kernel class for one language."""
    name = f"{type(language).__name__}Kernel"
    return type(name, (CompiledKernel,), {"lang": language})
