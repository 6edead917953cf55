"""bash_kernel, with failed cells reported as ``BashError`` instead of an unnamed error.

bash_kernel reports a cell whose last command failed with ``ename`` empty and the bare exit
status as ``evalue`` (and no traceback), which frontends show as an empty error. Here the same
error says what it is: ``BashError``, "exit status N", and a one-line traceback.
"""

from __future__ import annotations

from typing import Any

from bash_kernel.kernel import BashKernel

ENAME = "BashError"


def name_error(content: dict[str, Any]) -> None:
    """Fill in a bash_kernel error in place (the same dict is sent and then returned)."""
    if content.get("ename"):
        return
    value = str(content.get("evalue", ""))
    if value.isdigit():
        value = f"exit status {value}"
    content["ename"] = ENAME
    content["evalue"] = value
    content["traceback"] = content.get("traceback") or [f"{ENAME}: {value}"]


class BashErrorKernel(BashKernel):
    def send_response(self, stream: Any, msg_or_type: Any, content: Any = None, *args: Any, **kwargs: Any):
        if msg_or_type == "error" and isinstance(content, dict):
            name_error(content)
        return super().send_response(stream, msg_or_type, content, *args, **kwargs)

    # The same parameters as bash_kernel's: ipykernel passes newer ones (cell_meta, cell_id)
    # only to a do_execute whose signature takes them.
    def do_execute(
        self,
        code: str,
        silent: bool,
        store_history: bool = True,
        user_expressions: dict[str, Any] | None = None,
        allow_stdin: bool = False,
    ) -> dict[str, Any]:
        reply = super().do_execute(code, silent, store_history, user_expressions, allow_stdin)
        if reply.get("status") == "error":
            name_error(reply)
        return reply
