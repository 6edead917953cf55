"""Each language image through the real path: kernelspec -> provisioner -> gateway -> agent.

One kernel per language (started with a stock ``KernelManager`` on a kernelspec like the ones
users install) serves that language's tests: output, errors, state, rich output, interrupts and
stdin where the kernel has it.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from jupyter_client.blocking.client import BlockingKernelClient
from jupyter_client.manager import KernelManager

from .kernel_helpers import client, run, stdout

pytestmark = pytest.mark.docker

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True)
class Language:
    image: str
    hello: str  # prints "hello, world"
    error: str  # fails at run time with a message containing "boom"
    ename: str  # the error's name
    set_state: str  # x = 42
    get_state: str  # prints x
    endless: str  # runs until interrupted
    stdin: str | None  # reads a line and prints "got " + it; None: the kernel has no stdin
    # What the error's evalue says, when the kernel reports a process's exit rather than the
    # message (the message, "boom", is then on the program's stderr).
    exit_evalue: str | None = None
    # The program prints its own prompt (on stdout) and the input_request's prompt is empty.
    prompt_on_stdout: bool = False


LANGUAGES = {
    lang.image: lang
    for lang in (
        Language(
            "python",
            hello="print('hello, world')",
            error="raise ValueError('boom')",
            ename="ValueError",
            set_state="x = 6 * 7",
            get_state="print(x)",
            endless="while True:\n    pass",
            stdin="print('got', input('name? '))",
        ),
        Language(
            "r",
            hello='cat("hello, world\\n")',
            error='stop("boom")',
            ename="ERROR",
            set_state="x <- 6 * 7",
            get_state='cat(x, "\\n")',
            endless="while (TRUE) {}",
            stdin='cat("got", readline("name? "), "\\n")',
        ),
        Language(
            "bash",
            hello='echo "hello, world"',
            error='echo boom >&2; exit_with() { return "$1"; }; exit_with 3',
            ename="BashError",
            exit_evalue="exit status 3",
            set_state="x=$((6 * 7))",
            get_state='echo "$x"',
            endless="while true; do :; done",
            # bash_kernel runs bash behind a pty of its own and has no stdin channel: `read`
            # waits until interrupted.
            stdin=None,
        ),
        Language(
            "deno",
            hello='console.log("hello, world")',
            error='throw new Error("boom")',
            ename="Error",
            set_state="var x = 6 * 7",
            get_state="console.log(x)",
            endless="while (true) {}",
            stdin='console.log("got", prompt("name?"))',
        ),
        Language(
            "octave",
            hello='disp("hello, world")',
            error='error("boom")',
            ename="OctaveError",
            set_state="x = 6 * 7;",
            get_state="disp(x)",
            endless="while true\nend",
            stdin='name = input("name? ", "s"); disp(["got " name])',
        ),
        # Our compiled-language kernel: declarations are kept across cells, statements run in
        # the cell's own main; a failing program is a RuntimeError naming its exit code.
        Language(
            "c",
            hello='printf("hello, world\\n");',
            error='fprintf(stderr, "boom\\n"); exit(3);',
            ename="RuntimeError",
            exit_evalue="the program exited with code 3",
            prompt_on_stdout=True,
            set_state="static int x = 6 * 7;",
            get_state='printf("%d\\n", x);',
            endless="for (;;) {}",
            stdin='char name[64]; printf("name? "); fflush(stdout);\n'
            'if (scanf("%63s", name) == 1) printf("got %s\\n", name);',
        ),
        Language(
            "cpp",
            hello='std::cout << "hello, world" << std::endl;',
            error='std::cerr << "boom" << std::endl; std::exit(3);',
            ename="RuntimeError",
            exit_evalue="the program exited with code 3",
            prompt_on_stdout=True,
            set_state="static int x = 6 * 7;",
            get_state="std::cout << x << std::endl;",
            endless="for (;;) {}",
            stdin='std::string name; std::cout << "name? " << std::flush;\n'
            'std::cin >> name; std::cout << "got " << name << std::endl;',
        ),
        Language(
            "go",
            hello='fmt.Println("hello, world")',
            error='fmt.Fprintln(os.Stderr, "boom")\nos.Exit(3)',
            ename="RuntimeError",
            exit_evalue="the program exited with code 3",
            prompt_on_stdout=True,
            set_state="var x = 6 * 7",
            get_state="fmt.Println(x)",
            endless="for {\n}",
            stdin='var name string\nfmt.Print("name? ")\nfmt.Scanln(&name)\nfmt.Println("got", name)',
        ),
        Language(
            "rust",
            hello='println!("hello, world");',
            error='eprintln!("boom");\nstd::process::exit(3);',
            ename="RuntimeError",
            exit_evalue="the program exited with code 3",
            prompt_on_stdout=True,
            set_state="const X: i32 = 6 * 7;",
            get_state='println!("{}", X);',
            endless="loop {}",
            stdin='use std::io::Write;\nprint!("name? ");\nstd::io::stdout().flush().unwrap();\n'
            "let mut name = String::new();\nstd::io::stdin().read_line(&mut name).unwrap();\n"
            'println!("got {}", name.trim());',
        ),
        Language(
            "java",
            hello='System.out.println("hello, world");',
            error='System.err.println("boom");\nSystem.exit(3);',
            ename="RuntimeError",
            exit_evalue="the program exited with code 3",
            prompt_on_stdout=True,
            set_state="static int x = 6 * 7;",
            get_state="System.out.println(x);",
            endless="while (true) {}",
            stdin='System.out.print("name? ");\nSystem.out.flush();\n'
            "String name = new java.util.Scanner(System.in).nextLine();\n"
            'System.out.println("got " + name);',
        ),
    )
}


@dataclass
class Running:
    lang: Language
    km: KernelManager
    kc: BlockingKernelClient


@pytest.fixture(scope="module", params=list(LANGUAGES))
def kernel(request: pytest.FixtureRequest, language_kernelspecs: dict[str, str]) -> Iterator[Running]:
    image = request.param
    km = KernelManager(kernel_name=language_kernelspecs[image])
    km.start_kernel()
    try:
        kc = client(km)
        try:
            yield Running(LANGUAGES[image], km, kc)
        finally:
            kc.stop_channels()
    finally:
        if km.has_kernel:
            km.shutdown_kernel(now=True)


def _errors(outputs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [m["content"] for m in outputs if m["msg_type"] == "error"]


def _data(outputs: list[dict[str, Any]], mime: str) -> list[Any]:
    return [
        m["content"]["data"][mime]
        for m in outputs
        if m["msg_type"] in ("display_data", "execute_result") and mime in m["content"]["data"]
    ]


def _text(outputs: list[dict[str, Any]]) -> str:
    """Everything the cell printed, on either stream."""
    return "".join(m["content"]["text"] for m in outputs if m["msg_type"] == "stream")


def _wait_idle(kc: BlockingKernelClient, msg_id: str) -> None:
    while True:
        msg = kc.get_iopub_msg(timeout=30)
        if (
            msg["parent_header"].get("msg_id") == msg_id
            and msg["msg_type"] == "status"
            and msg["content"]["execution_state"] == "idle"
        ):
            return


def test_hello_world(kernel: Running):
    reply, outputs = run(kernel.kc, kernel.lang.hello)
    assert reply["status"] == "ok", reply
    assert stdout(outputs) == "hello, world\n"


def test_a_runtime_error_is_a_jupyter_error(kernel: Running):
    reply, outputs = run(kernel.kc, kernel.lang.error)
    assert reply["status"] == "error", (reply, outputs)
    assert reply["ename"] == kernel.lang.ename
    errors = _errors(outputs)
    assert len(errors) == 1, outputs
    assert errors[0]["ename"] == kernel.lang.ename
    assert errors[0]["traceback"], "a traceback for frontends to show"
    if kernel.lang.exit_evalue is not None:
        # A process's message is its stderr; the error carries the exit status.
        assert errors[0]["evalue"] == kernel.lang.exit_evalue
        assert "boom" in _text(outputs)
    else:
        assert "boom" in errors[0]["evalue"]
    # The kernel goes on after the error.
    reply, outputs = run(kernel.kc, kernel.lang.hello)
    assert stdout(outputs) == "hello, world\n"


def test_executions_share_state(kernel: Running):
    reply, _ = run(kernel.kc, kernel.lang.set_state)
    assert reply["status"] == "ok", reply
    reply, outputs = run(kernel.kc, kernel.lang.get_state)
    assert stdout(outputs).strip() == "42"


def test_interrupt_stops_an_endless_loop(kernel: Running):
    kc = kernel.kc
    msg_id = kc.execute(kernel.lang.endless)
    while True:
        msg = kc.get_iopub_msg(timeout=30)
        if msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "execute_input":
            break
    time.sleep(1)  # inside the loop by now
    # The kernelspec's interrupt_mode decides: a signal through the provisioner and the agent,
    # or an interrupt_request on the control channel.
    kernel.km.interrupt_kernel()
    deadline = time.monotonic() + 30
    while True:
        reply = kc.get_shell_msg(timeout=max(0.1, deadline - time.monotonic()))
        if reply["parent_header"].get("msg_id") == msg_id:
            break
    assert reply["content"]["status"] in ("error", "aborted", "abort"), reply["content"]
    # Done with the cell once idle: IRkernel answers requests that come before that "aborted".
    _wait_idle(kc, msg_id)
    assert kernel.km.is_alive()
    reply, outputs = run(kc, kernel.lang.hello)
    assert stdout(outputs) == "hello, world\n"


def test_stdin(kernel: Running):
    if kernel.lang.stdin is None:
        pytest.skip(f"the {kernel.lang.image} kernel has no stdin")
    kc = kernel.kc
    prompts: list[str] = []

    def answer(msg: dict[str, Any]) -> None:
        prompts.append(msg["content"]["prompt"])
        kc.input("Ada")

    outputs: list[dict[str, Any]] = []
    reply = kc.execute_interactive(
        kernel.lang.stdin, allow_stdin=True, stdin_hook=answer, output_hook=outputs.append, timeout=60
    )
    assert reply["content"]["status"] == "ok", reply["content"]
    assert len(prompts) == 1
    if kernel.lang.prompt_on_stdout:
        assert stdout(outputs).startswith("name? ")
    else:
        assert "name?" in prompts[0]
    assert "got Ada" in stdout(outputs)


def _png(outputs: list[dict[str, Any]]) -> bytes:
    images = _data(outputs, "image/png")
    assert len(images) == 1, [m["msg_type"] for m in outputs]
    png = base64.b64decode(images[0])
    assert png.startswith(PNG_MAGIC)
    return png


@pytest.mark.parametrize("kernel", ["python"], indirect=True)
def test_python_has_pandas(kernel: Running):
    reply, outputs = run(kernel.kc, "import pandas as pd\npd.DataFrame({'a': [1, 2]})")
    assert reply["status"] == "ok", reply
    assert "<table" in _data(outputs, "text/html")[0]


@pytest.mark.parametrize("kernel", ["r"], indirect=True)
def test_r_plot_is_a_png(kernel: Running):
    reply, outputs = run(kernel.kc, "plot(1:10)")
    assert reply["status"] == "ok", reply
    _png(outputs)


@pytest.mark.parametrize("kernel", ["r"], indirect=True)
def test_r_has_ggplot2(kernel: Running):
    code = "library(ggplot2)\nggplot(data.frame(x = 1:3, y = 1:3), aes(x, y)) + geom_point()"
    reply, outputs = run(kernel.kc, code)
    assert reply["status"] == "ok", reply
    _png(outputs)


@pytest.mark.parametrize("kernel", ["octave"], indirect=True)
def test_octave_plot_is_a_png(kernel: Running):
    reply, outputs = run(kernel.kc, "plot(1:10)")
    assert reply["status"] == "ok", (reply, outputs)
    _png(outputs)


@pytest.mark.parametrize("kernel", ["octave"], indirect=True)
def test_octave_undefined_name_and_parse_error(kernel: Running):
    reply, outputs = run(kernel.kc, 'disp("before")\nno_such_thing_here + 1\ndisp("after")')
    assert reply["status"] == "error"
    assert stdout(outputs) == "before\n"
    assert reply["evalue"].startswith("'no_such_thing_here' undefined")
    reply, outputs = run(kernel.kc, "x = = 1")
    assert reply["status"] == "error"
    assert reply["ename"] == "OctaveError"
    assert reply["evalue"].startswith("parse error")


@pytest.mark.parametrize("kernel", ["deno"], indirect=True)
def test_deno_html_and_plain_text_without_colours(kernel: Running):
    reply, outputs = run(kernel.kc, "Deno.jupyter.html`<b>bold</b>`")
    assert reply["status"] == "ok", reply
    assert _data(outputs, "text/html") == ["<b>bold</b>"]
    reply, outputs = run(kernel.kc, '({ a: 1, b: "two" })')
    (plain,) = _data(outputs, "text/plain")
    assert "\x1b[" not in plain
    assert plain == '{ a: 1, b: "two" }'


@pytest.mark.parametrize("kernel", ["deno"], indirect=True)
def test_deno_typescript(kernel: Running):
    reply, outputs = run(kernel.kc, "const n: number = 40 + 2;\nn")
    assert reply["status"] == "ok", reply
    assert _data(outputs, "text/plain") == ["42"]


@pytest.mark.parametrize("kernel", ["deno"], indirect=True)
def test_deno_results_come_before_idle(kernel: Running):
    """Deno publishes a result after its idle status now and then; the image's relay reorders."""
    for i in range(30):
        reply, outputs = run(kernel.kc, f"{i} + 1")
        assert _data(outputs, "text/plain") == [str(i + 1)], outputs


@pytest.mark.parametrize("kernel", ["deno"], indirect=True)
def test_deno_survives_a_sigint_sent_to_its_container(kernel: Running):
    """Deno dies of SIGINT; an interrupt signal (what the launcher sends) must not end it."""
    kc = kernel.kc
    msg_id = kc.execute(kernel.lang.endless)
    while True:
        msg = kc.get_iopub_msg(timeout=30)
        if msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "execute_input":
            break
    time.sleep(1)
    kernel.km.signal_kernel(2)  # SIGINT through the provisioner, gateway and agent
    while True:
        reply = kc.get_shell_msg(timeout=30)
        if reply["parent_header"].get("msg_id") == msg_id:
            break
    _wait_idle(kc, msg_id)
    assert kernel.km.is_alive()
    reply, outputs = run(kc, kernel.lang.hello)
    assert stdout(outputs) == "hello, world\n"


@pytest.mark.parametrize("kernel", ["bash"], indirect=True)
def test_bash_error_names_the_exit_status(kernel: Running):
    reply, outputs = run(kernel.kc, "ls /no/such/dir")
    assert reply["status"] == "error"
    assert reply["ename"] == "BashError"
    assert reply["evalue"] == "exit status 2"
    assert "No such file or directory" in _text(outputs)


@pytest.mark.parametrize(
    ("kernel", "cell", "line"),
    [
        ("c", "int a = 1;\nint b = undefined_name;", 2),
        ("cpp", "int a = 1;\n\nstd::string s = undefined_name;", 3),
        ("go", "a := 1\nfmt.Println(a)\nb := undefinedName", 3),
        ("rust", "let a = 1;\nlet b: i32 = undefined_name;", 2),
        ("java", "int a = 1;\nint b = undefinedName;", 2),
    ],
    indirect=["kernel"],
)
def test_a_compile_error_names_the_cells_line(kernel: Running, cell: str, line: int):
    reply, outputs = run(kernel.kc, cell)
    assert reply["status"] == "error", (reply, outputs)
    assert reply["ename"] == "CompileError"
    count = reply["execution_count"]
    traceback = "\n".join(_errors(outputs)[0]["traceback"])
    assert f"cell[{count}]:{line}:" in traceback, traceback
    # A cell that did not compile leaves nothing kept: the next one runs.
    reply, outputs = run(kernel.kc, kernel.lang.hello)
    assert stdout(outputs) == "hello, world\n"


@pytest.mark.parametrize("kernel", ["c", "go"], indirect=True)
def test_compiled_output_streams_while_the_program_runs(kernel: Running):
    cell = {
        "c": 'for (int i = 0; i < 3; i++) { printf("tick %d\\n", i); usleep(700000); }',
        "go": 'for i := 0; i < 3; i++ {\n\tfmt.Println("tick", i)\n\ttime.Sleep(700 * time.Millisecond)\n}',
    }[kernel.lang.image]
    kc = kernel.kc
    msg_id = kc.execute(cell)
    arrivals: list[float] = []
    while True:
        msg = kc.get_iopub_msg(timeout=60)
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        if msg["msg_type"] == "stream" and msg["content"]["name"] == "stdout":
            arrivals += [time.monotonic()] * msg["content"]["text"].count("tick")
        if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            break
    assert len(arrivals) == 3
    # Each line came as it was printed, not all at the end.
    assert arrivals[2] - arrivals[0] > 1.0, arrivals
