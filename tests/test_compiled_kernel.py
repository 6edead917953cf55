"""The compiled-language kernel (kernels/compiled-base/bai_compiled_kernel).

The first part tests the source handling in pure Python: splitting cells, classifying
their chunks, keeping and replacing declarations, generating programs and mapping
compiler lines back to cells. The second part (marked ``docker``) drives the kernel in
each language image through jupyter_client, in a container started like the agent
starts kernels (read-only root, tmpfs home and /tmp, no capabilities).
"""

from __future__ import annotations

import json
import os
import queue
import secrets
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from backendai_jupyter.common.wire import KERNEL_HOME

KERNEL_SRC = Path(__file__).resolve().parent.parent / "kernels" / "compiled-base"
# Importing from the image's build context must not leave __pycache__ there: the images
# are cached by the hash of every file in it.
_dont_write = sys.dont_write_bytecode
sys.dont_write_bytecode = True
sys.path.insert(0, str(KERNEL_SRC))
try:
    from bai_compiled_kernel.languages import Program, get_language, merge
    from bai_compiled_kernel.source import completeness, mask, split
finally:
    sys.path.remove(str(KERNEL_SRC))
    sys.dont_write_bytecode = _dont_write

LANGS = ["c", "cpp", "go", "rust", "java"]


def kinds(lang: str, code: str) -> list[tuple[str, str]]:
    """(key or "stmt", first line) for each chunk of *code*."""
    plan = get_language(lang).plan(code, "cell[1]")
    out = [(d.key, d.text.split("\n")[0]) for d in plan.decls]
    out += [("stmt", c.text.split("\n")[0]) for c in plan.stmts]
    return out


def keys(lang: str, code: str) -> list[str]:
    plan = get_language(lang).plan(code, "cell[1]")
    return [d.key for d in plan.decls]


def stmts(lang: str, code: str) -> list[str]:
    return [c.text for c in get_language(lang).plan(code, "cell[1]").stmts]


# --- masking and splitting -------------------------------------------------------------------


def test_mask_blanks_comments_and_literals_but_keeps_lines() -> None:
    code = "int x = 1; // a { brace\nchar *s = \"}{;\";\n/* multi\n line { */ char c = '{';"
    masked = mask(code, "c").text
    assert len(masked) == len(code)
    assert masked.count("\n") == code.count("\n")
    assert "{" not in masked and "}" not in masked
    assert masked.count(";") == 3


def test_mask_language_specific_literals() -> None:
    assert "{" not in mask('let r = r#"raw { "# ;', "rust").text
    # A Rust lifetime is not a char literal: the rest of the line stays code.
    assert "{" in mask("fn f<'a>(x: &'a str) {", "rust").text
    assert "{" not in mask("s := `raw\n{ string`", "go").text
    assert "{" not in mask('String s = """\n  { text block\n  """;', "java").text
    assert "{" not in mask('auto s = R"x(raw { )x";', "cpp").text
    assert mask("/* open", "c").open_literal == "comment"
    # Rust block comments nest.
    assert mask("/* a /* b */ still comment */ x", "rust").text.strip() == "x"


def test_split_c_chunks_and_lines() -> None:
    code = (
        "#include <stdio.h>\n"
        "int add(int a, int b) {\n  return a + b;\n}\n"
        "\n"
        'printf("%d\\n", add(1, 2)); int y = 3;\n'
        "if (y) { y++; } else { y--; }\n"
        "do { y--; } while (y > 0);\n"
        "struct p { int x; } origin = {0};\n"
    )
    chunks = split(code, "c")
    assert [c.line for c in chunks] == [1, 2, 6, 6, 7, 8, 9]
    assert chunks[1].text.endswith("}")
    assert chunks[4].text == "if (y) { y++; } else { y--; }"
    assert chunks[5].text == "do { y--; } while (y > 0);"
    assert chunks[6].text == "struct p { int x; } origin = {0};"


def test_split_go_uses_semicolon_insertion() -> None:
    code = (
        "x := []int{1, 2,\n  3}\n"
        "if x[0] > 0 {\n  fmt.Println(x)\n} else {\n  fmt.Println(0)\n}\n"
        "y := x[\n1]\n"
    )
    texts = [c.text for c in split(code, "go")]
    assert texts == [
        "x := []int{1, 2,\n  3}",
        "if x[0] > 0 {\n  fmt.Println(x)\n} else {\n  fmt.Println(0)\n}",
        "y := x[\n1]",
    ]


def test_split_go_for_and_if_clauses_keep_their_semicolons() -> None:
    code = "for i := 0; i < 3; i++ {\n\tfmt.Println(i)\n}\nif v, ok := m[1]; ok {\n}\na := 1; b := 2\n"
    texts = [c.text for c in split(code, "go")]
    assert texts == [
        "for i := 0; i < 3; i++ {\n\tfmt.Println(i)\n}",
        "if v, ok := m[1]; ok {\n}",
        "a := 1;",
        "b := 2",
    ]


def test_split_initializers_and_lambdas_run_to_the_semicolon() -> None:
    assert len(split("auto f = [](int x) { return x; };\nf(1);", "cpp")) == 2
    assert len(split('let y = if a { 1 } else { 2 };\nprintln!("{}", y);', "rust")) == 2
    assert len(split("Runnable r = new Runnable() { public void run() {} };\nr.run();", "java")) == 2
    assert len(split("int a[] = {1, 2};\nint b;", "c")) == 2


@pytest.mark.parametrize(
    ("lang", "code", "status"),
    [
        ("c", "int f() {", "incomplete"),
        ("c", 'printf("%d",', "incomplete"),
        ("c", "int x = 1;", "complete"),
        ("c", "}", "invalid"),
        ("c", "int f() { return (1]; }", "invalid"),
        ("c", "/* not closed", "incomplete"),
        ("c", "#define LONG \\", "incomplete"),
        ("cpp", "class A {\n public:", "incomplete"),
        ("go", "func f() {\n", "incomplete"),
        ("go", "s := `raw", "incomplete"),
        ("rust", "fn f<'a>(x: &'a str) -> &'a str { x }", "complete"),
        ("rust", "fn f() {", "incomplete"),
        ("java", 'String s = """\n  text', "incomplete"),
        ("java", 'String s = "{";', "complete"),
        ("c", "", "complete"),
    ],
)
def test_completeness(lang: str, code: str, status: str) -> None:
    assert completeness(code, lang)[0] == status


def test_completeness_indent_follows_depth() -> None:
    assert completeness("int f() {\n  if (x) {", "c") == ("incomplete", "        ")


# --- classification ---------------------------------------------------------------------------


def test_c_declarations_and_statements() -> None:
    code = """#include <stdio.h>
#define N 10
struct point { int x, y; };
typedef struct { int a; } pair_t;
typedef int (*fn_t)(int);
static int counter = 0;
int add(int a, int b) { return a + b; }
struct point make(int x) { struct point p = {x, x}; return p; }
int later(int x);
enum color { RED, GREEN = 3 };
int x = add(1, 2);
printf("%d\\n", x);
int arr[] = {1, 2};
"""
    assert keys("c", code) == [
        "pp:#include <stdio.h>",
        "define:N",
        "type:point",
        "type:pair_t",
        "type:fn_t",
        "var:counter",
        "fn:add",
        "fn:make",
        "proto:later",
        "type:color",
    ]
    assert stmts("c", code) == ["int x = add(1, 2);", 'printf("%d\\n", x);', "int arr[] = {1, 2};"]


def test_c_control_flow_and_calls_are_statements() -> None:
    code = 'for (int i = 0; i < 3; i++) { puts("x"); }\nwhile (0) {}\nFOO(x) { }\nfoo(3);\nx = y(2);'
    assert keys("c", code) == []
    assert keys("c", "p->next = make(1);\nobj.f(2);\nint y = g(3);") == []


def test_cpp_declarations() -> None:
    code = """using namespace std;
template <typename T>
T twice(T v) { return v * 2; }
class Foo { public: int v; };
int Foo::count = 0;
bool operator==(const Foo& a, const Foo& b) { return a.v == b.v; }
int twice(int x, int y) { return x; }
namespace util { int one() { return 1; } }
using Vec = std::vector<int>;
auto sq = [](int x) { return x * x; };
std::vector<int> v(10);
std::cout << twice(3) << std::endl;
throw std::runtime_error("x");
std::abort();
Counter::reset();
std::cout << s.items.size() << std::endl;
std::cout << geo::area(2.0) << std::endl;
"""
    assert keys("cpp", code) == [
        "using:using namespace std;",
        "fn:twice(T)",
        "type:Foo",
        "var:Foo::count",
        "fn:operator==(constFoo&,constFoo&)",
        "fn:twice(int,int)",
        "ns:util",
        "type:Vec",
    ]
    assert len(stmts("cpp", code)) == 8


def test_go_declarations() -> None:
    code = """package main
import "fmt"
import (
    "strings"
    m "math"
)
type Point struct{ X, Y int }
func (p *Point) Norm() float64 { return m.Sqrt(float64(p.X)) }
func add(a, b int) int {
    return a + b
}
var g = 5
const (
    A = 1
    B = 2
)
x := add(1, 2)
func() { fmt.Println(x) }()
"""
    assert keys("go", code) == [
        "import:fmt",
        "import:strings",
        "import:math",
        "type:Point",
        "fn:Point.Norm",
        "fn:add",
        "var:g",
        "var:A,B",
    ]
    assert stmts("go", code) == ["x := add(1, 2)", "func() { fmt.Println(x) }()"]


def test_rust_declarations() -> None:
    code = """#![allow(unused)]
use std::collections::HashMap;
#[derive(Debug, Clone)]
pub struct Point { x: i32, y: i32 }
impl Point { fn norm(&self) -> i32 { self.x } }
impl std::fmt::Display for Point { fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result { Ok(()) } }
pub(crate) fn add<'a>(a: &'a str) -> &'a str { a }
const N: usize = 3;
static mut COUNT: u32 = 0;
macro_rules! sq { ($x:expr) => { $x * $x }; }
enum E { A, B(i32) }
let v = vec![1, 2, 3];
for i in 0..N { println!("{}", i); }
"""
    assert keys("rust", code) == [
        "attr:#![allow(unused)]",
        "use:use std::collections::HashMap;",
        "type:Point",
        "impl:impl Point",
        "impl:impl std::fmt::Display for Point",
        "fn:add",
        "var:N",
        "var:COUNT",
        "macro:sq",
        "type:E",
    ]
    assert len(stmts("rust", code)) == 2


def test_java_declarations() -> None:
    code = """import java.util.*;
class Dog { String name; }
public record Pt(int x, int y) {}
static int counter = 0;
@SuppressWarnings("unchecked")
public static <T> List<T> first(List<T> xs, int n) { return xs; }
int square(int x) { return x * x; }
double square(double x) { return x * x; }
List<Integer> xs = new ArrayList<>();
if (xs.isEmpty()) { System.out.println("empty"); }
"""
    assert keys("java", code) == [
        "import:import java.util.*;",
        "type:Dog",
        "type:Pt",
        "var:counter",
        "fn:first(List<T>,int)",
        "fn:square(int)",
        "fn:square(double)",
    ]
    assert len(stmts("java", code)) == 2


@pytest.mark.parametrize(
    ("lang", "code"),
    [
        ("c", "#include <stdio.h>\nint main(void) { return 0; }"),
        ("cpp", "int main() { return 0; }"),
        ("go", "package main\nfunc main() {}"),
        ("rust", "fn main() {}"),
        ("java", "public class Hello { public static void main(String[] a) {} }"),
        ("java", "static void main(String[] a) {}"),
    ],
)
def test_a_cell_with_main_is_a_whole_program(lang: str, code: str) -> None:
    assert get_language(lang).plan(code, "cell[1]").whole


# --- state across cells -----------------------------------------------------------------------


def run_cells(lang: str, *cells: str) -> tuple[dict[str, Any], Program]:
    """Merge cells like the kernel does; return the kept state and the last cell's program."""
    language = get_language(lang)
    kept: dict[str, Any] = {}
    program = None
    for n, code in enumerate(cells, 1):
        plan = language.plan(code, f"cell[{n}]")
        kept = merge(kept, plan)
        program = language.generate(kept.values(), plan)
    assert program is not None
    return kept, program


def source_of(program: Program) -> str:
    return next(iter(program.files.values()))


def test_redefinition_replaces_in_place_and_statements_do_not_rerun() -> None:
    kept, program = run_cells(
        "cpp",
        "int sq(int x) { return x * x; }\nstd::cout << sq(2);",
        "int sumsq(int a, int b) { return sq(a) + sq(b); }",
        "int sq(int x) { return x * x * x; }\nstd::cout << sumsq(1, 2);",
    )
    assert list(kept) == ["fn:sq(int)", "fn:sumsq(int,int)"]
    text = source_of(program)
    assert "x * x * x" in text and "return x * x; }" not in text
    # sq stays before sumsq, which calls it.
    assert text.index("int sq(") < text.index("int sumsq(")
    assert "sq(2)" not in text  # cell 1's statement is not run again
    assert "sumsq(1, 2)" in text


def test_overloads_coexist_and_a_whole_program_leaves_state_alone() -> None:
    kept, _ = run_cells(
        "java",
        "int f(int x) { return x; }",
        "int f(String s) { return 0; }",
        "public class P { public static void main(String[] a) {} }",
    )
    assert list(kept) == ["fn:f(int)", "fn:f(String)"]


def test_c_gets_prototypes_so_definition_order_does_not_matter() -> None:
    _, program = run_cells("c", "int a(void) { return b(); }", "int b(void) { return 1; }")
    text = source_of(program)
    assert text.index("int b(void);") < text.index("int a(void) {")
    assert '#line 1 "cell[1]"' in text and '#line 1 "cell[2]"' in text


def test_go_program_imports_what_it_uses_and_marks_variables_used() -> None:
    _, program = run_cells("go", 'x := strings.ToUpper("a")\ny := 2\nfmt.Println(x)')
    text = source_of(program)
    assert '"strings"' in text and '"fmt"' in text
    assert "_ = x" in text and "_ = y" in text


def test_go_unused_import_is_dropped_on_retry() -> None:
    go = get_language("go")
    plan = go.plan('import "os"\nfmt.Println(1)', "cell[1]")
    kept = merge({}, plan)
    output = 'cell[1]:1:8: "os" imported and not used'
    assert go.retry_after_error(output, kept, plan)
    assert "import:os" not in kept
    assert '"os"' not in source_of(go.generate(kept.values(), plan))


# --- line mapping -------------------------------------------------------------------------------


def test_line_mapping_go_java_rust() -> None:
    _, program = run_cells("go", "func f() int { return 1 }", "a := 1\nb := undefinedName")
    line = source_of(program).split("\n").index("b := undefinedName") + 1
    go = get_language("go")
    out = go.map_output(f"# cell\n./main.go:{line}:6: undefined: undefinedName\n", program)
    assert out.strip() == "cell[2]:2:6: undefined: undefinedName"
    # Runtime traces show absolute paths.
    assert go.map_output(f"\t/tmp/bai-go-x/main.go:{line} +0x1d", program).strip() == "cell[2]:2 +0x1d"

    _, program = run_cells("java", "int x = 1;\nint y = nope;")
    line = source_of(program).split("\n").index("int y = nope;") + 1
    java = get_language("java")
    assert java.map_output(f"Main.java:{line}: error: cannot find symbol", program).startswith("cell[1]:2:")
    assert "(cell[1]:2)" in java.map_output(f"\tat Main.main(Main.java:{line})", program)

    _, program = run_cells("rust", 'let a = 1;\n\nlet b: i32 = "no";')
    line = source_of(program).split("\n").index('let b: i32 = "no";') + 1
    rustc = (
        "error[E0308]: mismatched types\n"
        f" --> main.rs:{line}:14\n"
        "  |\n"
        f'{line} | let b: i32 = "no";\n'
        "  |        ---   ^^^^ expected `i32`, found `&str`\n"
        "  ::: /rustc/library/core/src/lib.rs:10:5\n"
        "10 | fn other() {}\n"
    )
    mapped = get_language("rust").map_output(rustc, program)
    assert " --> cell[1]:3:14" in mapped
    assert '3 | let b: i32 = "no";' in mapped
    assert "10 | fn other() {}" in mapped  # other files keep their numbers


def test_whole_program_maps_lines_one_to_one() -> None:
    _, program = run_cells(
        "java", "import java.util.*;\npublic class Hi {\n  public static void main(String[] a) {}\n}"
    )
    assert list(program.files) == ["Hi.java"]
    assert program.main_class == "Hi"
    assert get_language("java").map_output("Hi.java:3: error: x", program) == "cell[1]:3: error: x"


# --- in containers --------------------------------------------------------------------------------

CONN_IN_CONTAINER = "/conn.json"


@dataclass
class Sample:
    hello: str
    define: str
    call: str
    redefine: str
    compile_error: str  # the error is on line 2
    exits: list[tuple[str, str]]  # (code, text the error names)
    stream: str  # prints "tick 0..2", 0.5 s apart
    endless: str  # prints "started", then loops forever
    stdin: str  # reads a line, prints "got <line>"
    extra: dict[str, str] = field(default_factory=dict)


SAMPLES: dict[str, Sample] = {
    "c": Sample(
        hello='printf("hello, world\\n");',
        define="int twice(int x) { return 2 * x; }",
        call='printf("%d\\n", twice(21));',
        redefine="int twice(int x) { return 3 * x; }",
        compile_error="int ok = 1;\nint bad = undefined_name;",
        exits=[
            ("exit(3);", "exited with code 3"),
            ("volatile int *p = NULL;\n*p = 42;", "Segmentation fault (SIGSEGV)"),
        ],
        stream='for (int i = 0; i < 3; i++) { printf("tick %d\\n", i); usleep(500000); }',
        endless='puts("started");\nfor (;;) {}',
        stdin='char buf[64];\nif (fgets(buf, sizeof buf, stdin)) printf("got %s", buf);',
    ),
    "cpp": Sample(
        hello='std::cout << "hello, world" << std::endl;',
        define="int twice(int x) { return 2 * x; }",
        call="std::cout << twice(21) << std::endl;",
        redefine="int twice(int x) { return 3 * x; }",
        compile_error="int ok = 1;\nint bad = undefined_name;",
        exits=[("return 3;", "exited with code 3"), ("std::abort();", "Aborted (SIGABRT)")],
        stream=(
            '#include <thread>\nfor (int i = 0; i < 3; i++) { std::cout << "tick " << i << std::endl;'
            " std::this_thread::sleep_for(std::chrono::milliseconds(500)); }"
        ),
        endless='std::cout << "started" << std::endl;\nwhile (true) {}',
        stdin='std::string s;\nstd::getline(std::cin, s);\nstd::cout << "got " << s << std::endl;',
    ),
    "go": Sample(
        hello='fmt.Println("hello, world")',
        define="func twice(x int) int { return 2 * x }",
        call="fmt.Println(twice(21))",
        redefine="func twice(x int) int { return 3 * x }",
        compile_error="ok := 1\nbad := undefinedName",
        exits=[("os.Exit(3)", "exited with code 3"), ('panic("boom")', "exited with code 2")],
        stream='for i := 0; i < 3; i++ {\n\tfmt.Println("tick", i)\n\ttime.Sleep(500 * time.Millisecond)\n}',
        endless='fmt.Println("started")\nfor {\n}',
        stdin="r := bufio.NewReader(os.Stdin)\nline, _ := r.ReadString('\\n')\nfmt.Print(\"got \", line)",
    ),
    "rust": Sample(
        hello='println!("hello, world");',
        define="fn twice(x: i32) -> i32 { 2 * x }",
        call='println!("{}", twice(21));',
        redefine="fn twice(x: i32) -> i32 { 3 * x }",
        compile_error="let ok = 1;\nlet bad = undefined_name;",
        exits=[
            ("std::process::exit(3);", "exited with code 3"),
            ('panic!("boom");', "exited with code 101"),
            ("std::process::abort();", "Aborted (SIGABRT)"),
        ],
        stream=(
            'for i in 0..3 {\n    println!("tick {}", i);\n'
            "    std::thread::sleep(std::time::Duration::from_millis(500));\n}"
        ),
        endless='println!("started");\nloop {}',
        stdin=(
            'let mut s = String::new();\nstd::io::stdin().read_line(&mut s).unwrap();\nprint!("got {}", s);'
        ),
    ),
    "java": Sample(
        hello='System.out.println("hello, world");',
        define="int twice(int x) { return 2 * x; }",
        call="System.out.println(twice(21));",
        redefine="int twice(int x) { return 3 * x; }",
        compile_error="int ok = 1;\nint bad = undefinedName;",
        exits=[("System.exit(3);", "exited with code 3"), ('throw new RuntimeException("boom");', "code 1")],
        stream='for (int i = 0; i < 3; i++) {\n  System.out.println("tick " + i);\n  Thread.sleep(500);\n}',
        endless='System.out.println("started");\nwhile (true) {}',
        stdin=(
            "var r = new java.io.BufferedReader(new java.io.InputStreamReader(System.in));\n"
            'System.out.println("got " + r.readLine());'
        ),
    ),
}


@dataclass
class Result:
    reply: dict[str, Any]
    outputs: list[tuple[float, dict[str, Any]]]  # (arrival time, iopub message)
    done: float  # when the kernel went idle
    input_requests: int = 0

    @property
    def status(self) -> str:
        return str(self.reply["content"]["status"])

    def stream(self, name: str = "stdout") -> str:
        return "".join(
            m["content"]["text"]
            for _, m in self.outputs
            if m["msg_type"] == "stream" and m["content"]["name"] == name
        )

    @property
    def error(self) -> dict[str, Any]:
        errors = [m["content"] for _, m in self.outputs if m["msg_type"] == "error"]
        assert len(errors) == 1, self.outputs
        return errors[0]


class ContainerKernel:
    """A kernel in a container of a language image, and a client talking to it."""

    def __init__(self, docker_client: Any, lang: str, tmp: Path) -> None:
        from jupyter_client.blocking.client import BlockingKernelClient
        from jupyter_client.connect import write_connection_file

        image = docker_client.images.get(f"backendai-jupyter/{lang}:latest")
        label = json.loads(image.labels["io.backendai-jupyter.kernel"])
        assert label["interrupt_mode"] == "message"
        conn = tmp / f"{lang}-connection.json"
        write_connection_file(str(conn), ip="127.0.0.1", key=secrets.token_hex(16).encode())
        conn.chmod(0o644)  # read by the image's user
        argv = [a.replace("{connection_file}", CONN_IN_CONTAINER) for a in label["argv"]]
        # Like the agent: read-only image, private tmpfs home and /tmp, no capabilities.
        self.container = docker_client.containers.run(
            image.id,
            command=argv,
            detach=True,
            name=f"bai-compiled-test-{lang}-{secrets.token_hex(3)}",
            network_mode="host",
            read_only=True,
            tmpfs={
                KERNEL_HOME: "size=512m,uid=1000,gid=1000,mode=0700,nosuid,nodev",
                "/tmp": "size=256m,mode=1777,nosuid,nodev,exec",
            },
            cap_drop=["ALL"],
            security_opt=["no-new-privileges"],
            pids_limit=256,
            mem_limit="1g",
            nano_cpus=10**9,
            volumes={str(conn): {"bind": CONN_IN_CONTAINER, "mode": "ro"}},
        )
        self.kc = BlockingKernelClient(connection_file=str(conn))
        self.kc.load_connection_file()
        self.kc.start_channels()
        # Without a KernelManager, the client judges the kernel by heartbeats: on a busy host a
        # starting kernel can miss one and be called dead. Believe the container instead.
        deadline = time.monotonic() + 90
        while True:
            try:
                self.kc.wait_for_ready(timeout=max(1.0, deadline - time.monotonic()))
                break
            except RuntimeError:
                self.container.reload()
                if self.container.status != "running" or time.monotonic() > deadline:
                    logs = self.logs()
                    self.close()
                    raise RuntimeError(f"kernel in {image.tags} did not start:\n{logs}") from None
                time.sleep(0.5)

    def logs(self) -> str:
        return self.container.logs().decode(errors="replace")[-3000:]

    def close(self) -> None:
        self.kc.stop_channels()
        self.container.remove(force=True)

    def execute(
        self,
        code: str,
        *,
        timeout: float = 60,
        stdin_lines: list[str] | None = None,
        allow_stdin: bool = False,
        on_output: Any = None,
    ) -> Result:
        kc = self.kc
        msg_id = kc.execute(code, allow_stdin=allow_stdin or stdin_lines is not None)
        outputs: list[tuple[float, dict[str, Any]]] = []
        requests = 0
        deadline = time.monotonic() + timeout
        done = None
        while done is None:
            assert time.monotonic() < deadline, f"no idle status within {timeout} s: {outputs}\n{self.logs()}"
            if stdin_lines is not None:
                try:
                    req = kc.get_stdin_msg(timeout=0.01)
                except queue.Empty:
                    pass
                else:
                    assert req["msg_type"] == "input_request"
                    requests += 1
                    kc.input(stdin_lines.pop(0) if stdin_lines else "")
            try:
                msg = kc.get_iopub_msg(timeout=0.05)
            except queue.Empty:
                continue
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                done = time.monotonic()
            elif msg["msg_type"] in ("stream", "error", "display_data", "execute_result"):
                outputs.append((time.monotonic(), msg))
                if on_output is not None:
                    on_output(msg)
        reply = kc.get_shell_msg(timeout=10)
        while reply["parent_header"].get("msg_id") != msg_id:  # e.g. wait_for_ready's kernel_info
            reply = kc.get_shell_msg(timeout=10)
        return Result(reply, outputs, done, requests)


def _docker() -> Any:
    import docker

    try:
        client = docker.from_env()
        client.ping()
    except Exception as exc:
        pytest.skip(f"no Docker engine: {exc}")
    return client


@pytest.fixture(scope="module", params=LANGS)
def kernel(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ContainerKernel]:
    client = _docker()
    lang = request.param
    if not client.images.list(name=f"backendai-jupyter/{lang}"):
        pytest.skip(f"image backendai-jupyter/{lang} not built (python -m backendai_jupyter.images {lang})")
    k = ContainerKernel(client, lang, tmp_path_factory.mktemp(f"conn-{lang}"))
    k.lang = lang  # type: ignore[attr-defined]
    try:
        yield k
    finally:
        k.close()


def _lang(kernel: ContainerKernel) -> str:
    return kernel.lang  # type: ignore[attr-defined,no-any-return]


@pytest.mark.docker
def test_kernel_info(kernel: ContainerKernel) -> None:
    kernel.kc.kernel_info()
    reply = kernel.kc.get_shell_msg(timeout=10)["content"]
    info = reply["language_info"]
    lang = _lang(kernel)
    assert reply["implementation"] == "bai-compiled"
    assert info["name"] == {"cpp": "c++"}.get(lang, lang)
    assert (
        info["file_extension"]
        == {"c": ".c", "cpp": ".cpp", "go": ".go", "rust": ".rs", "java": ".java"}[lang]
    )
    assert info["version"][:1].isdigit(), info
    for key in ("mimetype", "codemirror_mode", "pygments_lexer"):
        assert info[key]


@pytest.mark.docker
def test_hello_world(kernel: ContainerKernel) -> None:
    result = kernel.execute(SAMPLES[_lang(kernel)].hello)
    assert result.status == "ok", (result.outputs, kernel.logs())
    assert result.stream() == "hello, world\n"


@pytest.mark.docker
def test_state_across_cells_and_redefinition(kernel: ContainerKernel) -> None:
    sample = SAMPLES[_lang(kernel)]
    assert kernel.execute(sample.define).status == "ok"
    result = kernel.execute(sample.call)
    assert (result.status, result.stream()) == ("ok", "42\n"), result.outputs
    assert kernel.execute(sample.redefine).status == "ok"
    result = kernel.execute(sample.call)
    assert (result.status, result.stream()) == ("ok", "63\n"), result.outputs


@pytest.mark.docker
def test_compile_error_names_the_cell_line(kernel: ContainerKernel) -> None:
    result = kernel.execute(SAMPLES[_lang(kernel)].compile_error)
    assert result.status == "error"
    count = result.reply["content"]["execution_count"]
    error = result.error
    assert error["ename"] == "CompileError"
    assert f"cell[{count}]:2" in error["evalue"], error
    assert f"cell[{count}]:2" in "\n".join(error["traceback"])
    # Only the error, no stray compiler output.
    assert [m["msg_type"] for _, m in result.outputs] == ["error"]
    # The failed cell's declarations were not kept, the kernel still works.
    assert kernel.execute(SAMPLES[_lang(kernel)].hello).status == "ok"


@pytest.mark.docker
def test_runtime_errors_name_exit_code_or_signal(kernel: ContainerKernel) -> None:
    for code, expected in SAMPLES[_lang(kernel)].exits:
        result = kernel.execute(code)
        assert result.status == "error", (code, result.outputs)
        assert result.error["ename"] == "RuntimeError"
        assert expected in result.error["evalue"], (code, result.error)
        assert result.reply["content"]["evalue"] == result.error["evalue"]


@pytest.mark.docker
def test_output_streams_while_the_program_runs(kernel: ContainerKernel) -> None:
    result = kernel.execute(SAMPLES[_lang(kernel)].stream)
    assert result.status == "ok", result.outputs
    assert result.stream().split() == ["tick", "0", "tick", "1", "tick", "2"]
    first = next(t for t, m in result.outputs if m["msg_type"] == "stream" and "tick" in m["content"]["text"])
    # The program runs about a second after its first line: that line came while it ran.
    assert result.done - first > 0.7, result.done - first


def _wait_started(kernel: ContainerKernel, code: str, interrupt: Any) -> Result:
    started: list[float] = []

    def on_output(msg: dict[str, Any]) -> None:
        if msg["msg_type"] == "stream" and "started" in msg["content"]["text"] and not started:
            started.append(time.monotonic())
            time.sleep(0.3)
            interrupt()

    return kernel.execute(code, on_output=on_output, timeout=60)


@pytest.mark.docker
def test_interrupt_request_stops_the_program(kernel: ContainerKernel) -> None:
    from jupyter_client.blocking.client import BlockingKernelClient

    def interrupt() -> None:
        kc: BlockingKernelClient = kernel.kc
        msg = kc.session.msg("interrupt_request", {})
        kc.control_channel.send(msg)

    t0 = time.monotonic()
    result = _wait_started(kernel, SAMPLES[_lang(kernel)].endless, interrupt)
    assert result.status == "error"
    assert result.error["ename"] == "KeyboardInterrupt"
    assert time.monotonic() - t0 < 30
    assert kernel.execute(SAMPLES[_lang(kernel)].hello).stream() == "hello, world\n"


@pytest.mark.docker
def test_sigint_to_the_container_stops_the_program(kernel: ContainerKernel) -> None:
    result = _wait_started(
        kernel, SAMPLES[_lang(kernel)].endless, lambda: kernel.container.kill(signal="SIGINT")
    )
    assert result.status == "error"
    assert result.error["ename"] == "KeyboardInterrupt"
    kernel.container.reload()
    assert kernel.container.status == "running"
    assert kernel.execute(SAMPLES[_lang(kernel)].hello).stream() == "hello, world\n"


@pytest.mark.docker
def test_stdin_goes_through_input_requests(kernel: ContainerKernel) -> None:
    result = kernel.execute(SAMPLES[_lang(kernel)].stdin, stdin_lines=["hello stdin"])
    assert result.status == "ok", result.outputs
    assert result.input_requests == 1
    assert result.stream() == "got hello stdin\n"


@pytest.mark.docker
def test_without_allow_stdin_a_read_sees_end_of_file(kernel: ContainerKernel) -> None:
    result = kernel.execute(SAMPLES[_lang(kernel)].stdin, timeout=30)
    assert result.status == "ok", result.outputs
    assert result.input_requests == 0


@pytest.mark.docker
def test_complete_and_is_complete(kernel: ContainerKernel) -> None:
    sample = SAMPLES[_lang(kernel)]
    kernel.execute(sample.define)
    kernel.kc.complete("twi", 3)
    reply = kernel.kc.get_shell_msg(timeout=10)["content"]
    assert reply["matches"] == ["twice"]
    assert (reply["cursor_start"], reply["cursor_end"]) == (0, 3)
    kernel.kc.is_complete("x = f(1,")
    assert kernel.kc.get_shell_msg(timeout=10)["content"]["status"] == "incomplete"


@pytest.mark.docker
def test_home_is_the_only_place_written(kernel: ContainerKernel) -> None:
    """The build directory lives in /tmp (a tmpfs); the image itself stays untouched."""
    out = kernel.container.exec_run(["sh", "-c", "ls -d /tmp/bai-* && touch /opt/x"], user="work")
    assert b"/tmp/bai-" in out.output
    assert out.exit_code != 0


def test_samples_cover_every_language() -> None:
    assert set(SAMPLES) == set(LANGS)


# --- through the gateway and an agent -------------------------------------------------------------


@pytest.fixture(scope="module")
def compiled_kernelspecs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Kernelspecs that start each language image through our provisioner (the gateway picks an
    agent, the agent runs the container); interrupts go as signals through the provisioner."""
    root = tmp_path_factory.mktemp("compiled-specs")
    for lang in LANGS:
        name = f"bai-compiled-e2e-{lang}"
        spec = root / "kernels" / name
        spec.mkdir(parents=True)
        argv = [sys.executable, "-m", "backendai_jupyter.provisioner.launcher", "-f", "{connection_file}"]
        config = {"image": f"backendai-jupyter/{lang}:latest", "resources": {"cpu": "1", "mem": "1g"}}
        kernel_json = {
            "display_name": f"{lang} (e2e)",
            "language": lang,
            "argv": [*argv, "--kernel", name],
            "interrupt_mode": "signal",
            "metadata": {
                "kernel_provisioner": {"provisioner_name": "backendai-provisioner", "config": config}
            },
        }
        (spec / "kernel.json").write_text(json.dumps(kernel_json))
    old = os.environ.get("JUPYTER_PATH")
    os.environ["JUPYTER_PATH"] = os.pathsep.join(filter(None, [str(root), old]))
    try:
        yield str(root)
    finally:
        if old is None:
            os.environ.pop("JUPYTER_PATH", None)
        else:
            os.environ["JUPYTER_PATH"] = old


@pytest.mark.docker
@pytest.mark.parametrize("lang", LANGS)
def test_through_gateway_and_agent(lang: str, stack: Any, compiled_kernelspecs: str) -> None:
    """The agent's container (CurveZMQ, /tmp with exec, its init) runs the kernel; an interrupt
    from KernelManager travels provisioner -> gateway -> agent -> SIGINT to the container."""
    import threading

    from jupyter_client.manager import KernelManager

    from .kernel_helpers import client, run, stdout

    if not _docker().images.list(name=f"backendai-jupyter/{lang}"):
        pytest.skip(f"image backendai-jupyter/{lang} not built")
    sample = SAMPLES[lang]
    km = KernelManager(kernel_name=f"bai-compiled-e2e-{lang}")
    km.start_kernel()
    try:
        kc = client(km)
        reply, outputs = run(kc, sample.hello)
        assert (reply["status"], stdout(outputs)) == ("ok", "hello, world\n"), outputs
        assert run(kc, sample.define)[0]["status"] == "ok"
        reply, outputs = run(kc, sample.call)
        assert stdout(outputs) == "42\n", outputs

        started = threading.Event()

        def hook(msg: dict[str, Any]) -> None:
            if msg["msg_type"] == "stream" and "started" in msg["content"]["text"]:
                started.set()

        timer = threading.Thread(target=lambda: started.wait(60) and km.interrupt_kernel())
        timer.start()
        reply = kc.execute_interactive(sample.endless, output_hook=hook, timeout=90)["content"]
        timer.join()
        assert (reply["status"], reply["ename"]) == ("error", "KeyboardInterrupt")
        reply, outputs = run(kc, sample.call)
        assert stdout(outputs) == "42\n", outputs
        kc.stop_channels()
    finally:
        km.shutdown_kernel(now=True)
