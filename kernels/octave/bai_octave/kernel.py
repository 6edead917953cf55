"""octave_kernel, with Octave's errors reported as Jupyter errors.

octave_kernel drives Octave through a terminal, where Octave's error messages (``error: ...``)
arrive as ordinary output: the cell "succeeds" and the message shows as stdout. It also feeds a
cell to Octave line by line, so the lines after a failing one still run. Here output is passed
on line by line until an error line; from there on the text is the error, and the cell's
remaining lines are not run (they are sent as empty lines, so the terminal dialogue stays in
step), as in a script. The cell's reply has status ``error``, ename ``OctaveError``, evalue the
message and the error's lines as traceback, also sent on IOPub as an ``error`` message. Plots are
made with gnuplot and shown as PNG.
"""

from __future__ import annotations

import re
from typing import Any

from metakernel import ExceptionWrapper
from octave_kernel.kernel import OctaveKernel
from traitlets import Unicode

ENAME = "OctaveError"
ERROR_START = re.compile(r"^(error|parse error)(:|\b)")


class OutputSplitter:
    """Pass complete lines on to ``write`` until the first error line; keep the rest."""

    def __init__(self, write: Any) -> None:
        self.write = write
        self.pending = ""
        self.error_lines: list[str] | None = None

    @property
    def failed(self) -> bool:
        return self.error_lines is not None

    def feed(self, text: str) -> None:
        self.pending += text
        while "\n" in self.pending:
            line, self.pending = self.pending.split("\n", 1)
            self._line(line.rstrip("\r"))

    def close(self) -> None:
        """The end of the cell's output: a last line without a newline."""
        if self.pending:
            rest, self.pending = self.pending, ""
            if self.error_lines is None and not ERROR_START.match(rest):
                self.write(rest)
            else:
                self._line(rest.rstrip("\r"))

    def _line(self, line: str) -> None:
        if self.error_lines is None and ERROR_START.match(line):
            self.error_lines = []
        if self.error_lines is None:
            self.write(line + "\n")
        else:
            self.error_lines.append(line)

    def error(self) -> ExceptionWrapper | None:
        if not self.error_lines:
            return None
        lines = list(self.error_lines)
        while lines and not lines[-1].strip():
            lines.pop()
        return ExceptionWrapper(ENAME, error_message(lines), lines)


def error_message(lines: list[str]) -> str:
    """``error: 'x' undefined`` -> ``'x' undefined``; ``parse error: syntax error`` for those."""
    first = lines[0]
    message = first.partition(":")[2].strip() if first.startswith("error") else first.strip()
    if message.startswith("parse error"):
        detail = next((line.strip() for line in lines[1:] if line.strip()), "")
        if detail and not detail.startswith(">>>"):
            return f"{message.rstrip(':')}: {detail}"
        return message.rstrip(":")
    return message


class OctaveErrorKernel(OctaveKernel):
    # No display: gnuplot (gnuplot-nox) draws the inline plots, as PNG.
    inline_toolkit = Unicode("gnuplot").tag(config=True)
    # The home directory is a fresh tmpfs in every kernel: a history file there is of no use.
    cli_options = Unicode("--no-history").tag(config=True)

    _splitter: OutputSplitter | None = None

    _interrupted = False

    def do_execute_direct(self, code: str, silent: bool = False) -> Any:
        self._guard_repl()
        self._interrupted = False
        splitter = self._splitter = OutputSplitter(super().Write)
        try:
            value = super().do_execute_direct(code, silent=silent)
        finally:
            self._splitter = None
            splitter.close()
        if self._interrupted:
            # metakernel answers an interrupted cell with status "ok"; ipykernel's way instead.
            return ExceptionWrapper("KeyboardInterrupt", "interrupted", ["KeyboardInterrupt: interrupted"])
        error = splitter.error()
        if error is None and self.kernel_resp.get("status") == "error" and not self.kernel_resp.get("ename"):
            # metakernel's own failures (e.g. incomplete input): unnamed, with a string traceback.
            lines = str(self.kernel_resp.get("evalue") or "error").splitlines()
            error = ExceptionWrapper(ENAME, lines[0], lines)
        return error or value

    def _guard_repl(self) -> None:
        """Hook Octave's terminal: after an error the cell's remaining lines go as empty lines,
        and an interrupt is noted."""
        repl = self.octave_engine.repl
        if getattr(repl, "_guarded", False):
            return
        sendline, interrupt = repl.sendline, repl.interrupt

        def guarded_sendline(line: str) -> None:
            splitter = self._splitter
            sendline("" if splitter is not None and splitter.failed else line)

        def noted_interrupt(continuation: bool = False, **kwargs: Any) -> Any:
            # With continuation=True it only ends incomplete input, which fails the cell anyway.
            if not continuation:
                self._interrupted = True
            return interrupt(continuation=continuation, **kwargs)

        repl.sendline, repl.interrupt = guarded_sendline, noted_interrupt
        repl._guarded = True

    def Write(self, message: str) -> None:
        if self._splitter is not None:
            self._splitter.feed(message)
        else:
            super().Write(message)
