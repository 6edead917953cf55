"""The places Jupyter users already are: jupyter console, jupyter execute, nbclient, papermill."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nbformat
import pexpect
import pytest
from nbclient import NotebookClient

from .conftest import SPEC
from .stack import Stack, eventually

pytestmark = pytest.mark.docker
BIN = Path(sys.executable).parent


def _two_cell_notebook(path: Path) -> None:
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell("import os\nin_container = os.path.exists('/.dockerenv')"),
        nbformat.v4.new_code_cell("print('container:', in_container, 6 * 7)"),
    ]
    nbformat.write(nb, path)


def _printed(nb) -> str:
    return "".join(o.get("text", "") for o in nb.cells[1].outputs if o.output_type == "stream")


def test_jupyter_console_runs_a_line_under_a_terminal(stack: Stack):
    before = len(stack.containers())
    child = pexpect.spawn(
        str(BIN / "jupyter"),
        ["console", "--kernel", SPEC, "--ZMQTerminalInteractiveShell.simple_prompt=True"],
        encoding="utf-8",
        timeout=60,
    )
    try:
        child.expect(r"In \[1\]: ")
        child.sendline("import os; print('in container:', os.path.exists('/.dockerenv'))")
        child.expect("in container: True")
        child.expect(r"In \[2\]: ")
        assert len(stack.containers()) == before + 1
        child.sendline("exit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    # The console asks its kernel to shut down; the kernel exits and the agent removes it.
    eventually(lambda: len(stack.containers()) == before)


def test_jupyter_execute_runs_a_two_cell_notebook(stack: Stack, tmp_path: Path):
    nb_path = tmp_path / "nb.ipynb"
    _two_cell_notebook(nb_path)
    subprocess.run(
        [str(BIN / "jupyter"), "execute", f"--kernel_name={SPEC}", "--inplace", str(nb_path)],
        check=True,
        timeout=120,
        capture_output=True,
    )
    assert _printed(nbformat.read(nb_path, as_version=4)) == "container: True 42\n"


def test_nbclient_executes_a_notebook(stack: Stack, tmp_path: Path):
    nb_path = tmp_path / "nb.ipynb"
    _two_cell_notebook(nb_path)
    nb = nbformat.read(nb_path, as_version=4)
    NotebookClient(nb, kernel_name=SPEC, timeout=60).execute()
    assert _printed(nb) == "container: True 42\n"


def test_papermill_executes_a_parameterised_notebook(stack: Stack, tmp_path: Path):
    import papermill

    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell("n = 1")
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell("print(n * 2)")]
    nb.metadata["kernelspec"] = {"name": SPEC, "display_name": "Python 3 (Backend.AI)", "language": "python"}
    src, out = tmp_path / "in.ipynb", tmp_path / "out.ipynb"
    nbformat.write(nb, src)
    papermill.execute_notebook(str(src), str(out), parameters={"n": 21}, kernel_name=SPEC, progress_bar=False)
    result = nbformat.read(out, as_version=4)
    printed = "".join(o.get("text", "") for o in result.cells[-1].outputs if o.output_type == "stream")
    assert printed == "42\n"
