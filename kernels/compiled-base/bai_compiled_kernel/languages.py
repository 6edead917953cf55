"""What differs between the languages: classifying chunks, generating the program, toolchains.

Each :class:`Language` turns a cell into a :class:`CellPlan` (its declarations, which
the kernel keeps, and its statements, which run once in ``main``), generates a
:class:`Program` from the kept declarations plus the cell, and knows how to compile and
run it and how to map the compiler's ``file:LINE`` back to the cells' lines.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from .source import _LONE_EQ, Chunk, _depth0, head_before_block, identifiers, mask, split

# A line of generated source comes from (cell label, line in that cell), or from the kernel.
Origin = tuple[str, int] | None


@dataclass
class Decl:
    """A kept top-level declaration; a later one with the same key replaces it."""

    key: str
    category: str  # "attr", "pp", "import", "type", "proto", "var", "fn", "item"
    text: str
    label: str  # the cell it came from, e.g. "cell[3]"
    line: int  # its first line in that cell
    names: tuple[str, ...] = ()
    # C: the function's prototype; Java: the text rewritten to go inside the class.
    extra: str | None = None


@dataclass
class CellPlan:
    """A classified cell."""

    label: str
    code: str = ""
    decls: list[Decl] = field(default_factory=list)
    stmts: list[Chunk] = field(default_factory=list)
    whole: bool = False  # the cell has its own main and runs as written
    main_class: str | None = None  # Java: the type holding the cell's main


@dataclass
class Program:
    """Generated sources and where each of their lines came from."""

    files: dict[str, str]
    origins: dict[str, list[Origin]]
    main_class: str = "Main"


class _Builder:
    """Accumulates generated lines together with their origins."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.origins: list[Origin] = []

    def add(self, text: str, label: str | None = None, line: int = 0) -> None:
        for k, piece in enumerate(text.split("\n")):
            self.lines.append(piece)
            self.origins.append((label, line + k) if label is not None else None)

    @property
    def next_line(self) -> int:
        return len(self.lines) + 1

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def merge(kept: dict[str, Decl], plan: CellPlan) -> dict[str, Decl]:
    """The kept declarations after *plan*: same key replaces in place, new keys append."""
    merged = dict(kept)
    if not plan.whole:
        for decl in plan.decls:
            merged[decl.key] = decl
    return merged


def _norm(text: str) -> str:
    return " ".join(text.split())


def _split_top(text: str, sep: str = ",", angle: bool = False) -> list[str]:
    """Split *text* at *sep* outside brackets (and <> if *angle*)."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch in "([{" or (angle and ch == "<"):
            depth += 1
        elif ch in ")]}" or (angle and ch == ">"):
            depth -= 1
        if ch == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return [p.strip() for p in parts if p.strip()]


def _paren_inner(masked: str) -> str:
    """The text inside the first top-level pair of parentheses."""
    start = masked.find("(")
    if start < 0:
        return ""
    depth = 0
    for i in range(start, len(masked)):
        if masked[i] == "(":
            depth += 1
        elif masked[i] == ")":
            depth -= 1
            if depth == 0:
                return masked[start + 1 : i]
    return masked[start + 1 :]


def _param_types(params: str, type_words: frozenset[str], angle: bool) -> str:
    """A parameter list without parameter names and defaults: "int x, char *s" -> "int,char*"."""
    out = []
    for param in _split_top(params, angle=angle):
        param = re.sub(r"=.*", "", param, flags=re.S)
        param = re.sub(r"\[[^\]]*\]", "[]", param).strip()
        param = re.sub(r"@\w+(?:\([^)]*\))?\s*", "", param)
        m = re.match(r"(.*?[\w>\]*&.]\s*?)\s*\b([A-Za-z_]\w*)\s*(\[\])?$", param, re.S)
        if m and m.group(2) not in type_words and m.group(1).strip():
            param = m.group(1) + (m.group(3) or "")
        out.append(re.sub(r"\s+", "", param))
    return ",".join(out)


def _tool_output(argv: list[str], timeout: float = 20) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError):
        return ""
    return (done.stdout + done.stderr).strip()


@dataclass
class Step:
    """One toolchain command: argv, run in the build directory."""

    argv: list[str]
    env: dict[str, str] | None = None


class Language:
    """Behaviour of one language (subclasses below)."""

    key = ""
    display_name = ""
    language_name = ""
    mimetype = ""
    file_extension = ""
    codemirror_mode = ""
    pygments_lexer = ""
    source_name = ""
    keywords: tuple[str, ...] = ()
    builtins: tuple[str, ...] = ()
    # Whether the build makes a binary that is executed (not so for Java's class files).
    runs_built_binary = True
    # Regex of the language's stdin-reading APIs (only used when the kernel cannot look at
    # the program's syscalls to see that it waits for input).
    stdin_apis = ""

    # -- classification -----------------------------------------------------------------

    def plan(self, code: str, label: str) -> CellPlan:
        """Classify the chunks of a cell."""
        plan = CellPlan(label=label, code=code)
        for chunk in split(code, self.key):
            result = self.classify(chunk, label, plan)
            if result is None:
                plan.stmts.append(chunk)
            else:
                plan.decls.extend(result)
        return plan

    def classify(self, chunk: Chunk, label: str, plan: CellPlan) -> list[Decl] | None:
        """Return the declarations a chunk makes ([] to drop it), or None for a statement."""
        raise NotImplementedError

    # -- generation ---------------------------------------------------------------------

    def generate(self, kept: Iterable[Decl], plan: CellPlan) -> Program:
        raise NotImplementedError

    def whole_program(self, plan: CellPlan, name: str | None = None, header: str = "") -> Program:
        """A cell with its own main, as written (after *header*, lines the kernel adds)."""
        name = name or self.source_name
        b = _Builder()
        if header:
            b.add(header)
        b.add(plan.code, plan.label, 1)
        return Program({name: b.text()}, {name: b.origins}, main_class=plan.main_class or "Main")

    # -- toolchain ----------------------------------------------------------------------

    def env(self, home: str) -> dict[str, str]:
        """Environment additions for the toolchain and the program."""
        return {}

    def prepare(self, home: str) -> None:
        """One-time work before the first build (may be slow; runs in a thread)."""

    def build_steps(self, program: Program) -> list[Step]:
        raise NotImplementedError

    def write_extra(self, build_dir: Path) -> None:
        """Write files the build needs besides the generated sources."""

    def run_argv(self, build_dir: Path, program: Program) -> list[str]:
        return [str(build_dir / "prog")]

    def version(self) -> str:
        return ""

    def retry_after_error(self, output: str, kept: dict[str, Decl], plan: CellPlan) -> bool:
        """Fix what the kernel itself caused (e.g. Go's unused imports); True to rebuild."""
        return False

    # -- diagnostics --------------------------------------------------------------------

    def map_output(self, text: str, program: Program) -> str:
        """Rewrite ``generated_file:LINE`` in compiler or runtime output to ``cell[N]:LINE``."""
        for name, origins in program.origins.items():
            pattern = re.compile(r"(?:[^\s:()\"'`]*/)?" + re.escape(name) + r":(\d+)")

            def repl(m: re.Match[str], origins: list[Origin] = origins) -> str:
                line = int(m.group(1))
                origin = origins[line - 1] if 0 < line <= len(origins) else None
                if origin is None:
                    return m.group(0)
                return f"{origin[0]}:{origin[1]}"

            text = pattern.sub(repl, text)
        return text

    def error_summary(self, output: str) -> str:
        """The line of compiler output that says what went wrong (an error's evalue)."""
        lines = [ln.strip() for ln in output.split("\n") if ln.strip()]
        return next((ln for ln in lines if re.search(r"\berror\b", ln)), lines[0] if lines else "")

    def completion_names(self, kept: Iterable[Decl]) -> set[str]:
        names = set(self.keywords) | set(self.builtins)
        for decl in kept:
            names.update(decl.names)
        return names


# --- C and C++ ---------------------------------------------------------------------------

_C_CONTROL = frozenset(
    "if else for while do switch case default return goto break continue sizeof try catch "
    "throw new delete co_return co_await co_yield static_assert typeid alignof".split()
)
_C_TYPE_WORDS = frozenset(
    "void char short int long float double signed unsigned bool _Bool const volatile auto "
    "size_t wchar_t char8_t char16_t char32_t".split()
)
_C_GLOBAL_START = re.compile(
    r"\s*(?:static|extern|const|constexpr|constinit|inline|thread_local|_Thread_local|volatile)\b"
)
_C_TYPE_DEF = re.compile(
    r"\s*(?P<typedef>typedef\s+)?(?P<kind>struct|union|enum|class)\b"
    r"(?:\s+(?:class|struct)\b)?"
    r"(?:\s*(?:\[\[[^\]]*\]\]|__attribute__\s*\(\([^)]*\)\)|alignas\s*\([^)]*\)))*"
    r"\s*(?P<name>[A-Za-z_]\w*)?"
)


def _strip_template(head: str) -> str:
    m = re.match(r"\s*template\s*<", head)
    if not m:
        return head
    depth = 0
    for i in range(m.end() - 1, len(head)):
        if head[i] == "<":
            depth += 1
        elif head[i] == ">":
            depth -= 1
            if depth == 0:
                return head[i + 1 :]
    return head


def _first_word(text: str) -> str:
    m = re.match(r"\s*([A-Za-z_]\w*)", text)
    return m.group(1) if m else ""


class _CFamily(Language):
    # Included before the kept declarations of every cell (not in whole programs).
    prelude = ""
    compiler = ""
    std_flag = ""
    extra_flags: tuple[str, ...] = ()
    libs: tuple[str, ...] = ()
    stdin_apis = r"\b(?:scanf|fscanf|getchar|fgets|getline|gets|fgetc|getc|read|cin|getdelim)\b"

    def _function(self, head: str) -> tuple[str, str] | None:
        """(name, parameter list) if *head* (masked, before the body) declares a function."""
        d0 = _depth0(head)
        if "(" not in d0 or _first_word(d0) in _C_CONTROL:
            return None
        before = d0[: d0.index("(")]
        m = re.search(r"(operator\s*(?:\(\)|[^\s\w(]+|\s\w[\w\s*&:<>]*?))\s*$", before) or re.search(
            r"((?:[A-Za-z_]\w*\s*::\s*)*~?[A-Za-z_]\w*)\s*$", before
        )
        if not m:
            return None
        name = re.sub(r"\s+", "", m.group(1)) if "operator" not in m.group(1) else _norm(m.group(1))
        prefix = before[: m.start()].strip()
        if not prefix and "::" not in name:
            return None  # a call like FOO(x) { ... }: no return type
        # A return type is words, ::, template arguments, * and &: not `std::cout << x.f(`.
        if not re.fullmatch(r"[\w\s:*&<>,\[\]]*", prefix) or "<<" in prefix:
            return None
        if _LONE_EQ.search(re.sub(r"\boperator\s*\S+", " ", before)):
            return None
        return name, _paren_inner(head)

    def _key(self, name: str, params: str) -> str:
        if self.key == "cpp":
            return f"fn:{name}({_param_types(params, _C_TYPE_WORDS, angle=True)})"
        return f"fn:{name}"

    def classify(self, chunk: Chunk, label: str, plan: CellPlan) -> list[Decl] | None:
        m, text = chunk.masked, chunk.text

        def decl(key: str, category: str, names: Iterable[str] = (), extra: str | None = None) -> list[Decl]:
            return [Decl(key, category, text, label, chunk.line, tuple(names), extra)]

        if m.startswith("#"):
            define = re.match(r"#\s*define\s+([A-Za-z_]\w*)", m)
            if define:
                return decl(f"define:{define.group(1)}", "pp", [define.group(1)])
            return decl(f"pp:{_norm(text)}", "pp")
        head = head_before_block(m)
        has_block = len(head) < len(m)
        h = _strip_template(head) if self.key == "cpp" else head
        word = _first_word(h)

        if self.key == "cpp":
            if word == "namespace":
                name = re.match(r"\s*namespace\s*([\w:]*)", h)
                return decl(f"ns:{name.group(1) if name else _norm(text)}", "type")
            if word == "using":
                alias = re.match(r"\s*using\s+([A-Za-z_]\w*)\s*=", h)
                if alias:
                    return decl(f"type:{alias.group(1)}", "type", [alias.group(1)])
                return decl(f"using:{_norm(text)}", "type")
            if re.match(r'\s*extern\s*"', h) and has_block:
                return decl(f"extern:{_norm(text)}", "type")

        type_def = _C_TYPE_DEF.match(h)
        if type_def and (has_block and "(" not in _depth0(h) or type_def.group("typedef")):
            names = [type_def.group("name")] if type_def.group("name") else []
            key_name = type_def.group("name")
            if type_def.group("typedef"):
                tail = _depth0(m)
                fp = re.search(r"\(\s*\*\s*([A-Za-z_]\w*)\s*\)", tail[tail.rfind("}") + 1 :])
                idents = identifiers(tail[: tail.rfind(";")] if ";" in tail else tail)
                alias = fp.group(1) if fp else (idents[-1] if idents else None)
                if alias:
                    names.append(alias)
                    key_name = alias
            if type_def.group("kind") == "enum" and has_block:
                body = m[len(head) + 1 : m.rfind("}")]
                names += [p.split("=")[0].strip() for p in _split_top(body) if p.split("=")[0].strip()]
            if not key_name:
                return decl(f"type:{_norm(text)}", "type", names)
            forward = not has_block and not type_def.group("typedef")
            return decl(f"{'fwd' if forward else 'type'}:{key_name}", "type", names)
        if word == "typedef":
            tail = _depth0(m)
            fp = re.search(r"\(\s*\*\s*([A-Za-z_]\w*)\s*\)", m)
            idents = identifiers(tail.rstrip("; \n"))
            alias = fp.group(1) if fp else (idents[-1] if idents else "")
            return decl(f"type:{alias or _norm(text)}", "type", [alias] if alias else [])

        if has_block:
            fn = self._function(head)
            if fn is not None:
                name, params = fn
                if name == "main":
                    plan.whole = True
                    return decl("fn:main", "fn", [])
                proto = text[: len(head)].rstrip() + ";"
                return decl(self._key(name, params), "fn", [name.split("::")[-1]], proto)
        else:
            fn = self._function(m)
            # A prototype has a return type: `Foo::reset();` is a call.
            has_type = fn is not None and bool(_depth0(m)[: _depth0(m).index("(")].strip().split()[:-1])
            if fn is not None and has_type and m.rstrip().endswith(";") and self._looks_like_prototype(fn[1]):
                name, params = fn
                return decl("proto:" + self._key(name, params)[3:], "proto", [name.split("::")[-1]])

        d0 = _depth0(m)
        # C++ definitions of static members: `int Foo::count = 0;`, `std::string Foo::name;`
        qualified = re.match(
            r"\s*(?:const\s+)?[A-Za-z_][\w:]*(?:<[^;=()]*>)?[\s*&]+(\w+(?:::\w+)+)\s*(?:=|;|\{)", d0
        )
        if qualified and (word in _C_CONTROL or "<<" in d0 or ">>" in d0 or self.key != "cpp" or has_block):
            qualified = None
        if _C_GLOBAL_START.match(m) or qualified:
            if qualified:
                name = qualified.group(1)
            else:
                found = re.search(r"([A-Za-z_]\w*)\s*(?:\[\s*\]\s*)*(?:=|;|,|\{|\()", d0)
                name = found.group(1) if found else _norm(text)
            return decl(f"var:{name}", "var", [name.split("::")[-1]])
        return None

    @staticmethod
    def _looks_like_prototype(params: str) -> bool:
        """Whether a parenthesised list holds parameter declarations rather than arguments."""
        if re.search(r"[\"'0-9]", params):
            return False
        for param in _split_top(params, angle=True):
            words = re.findall(r"[A-Za-z_][\w:]*", param)
            if param == "..." or len(words) >= 2 or any(w in _C_TYPE_WORDS for w in words):
                continue
            return False
        return True

    def _ordered(self, kept: list[Decl]) -> list[tuple[Decl, str]]:
        """Kept declarations in output order, as (decl, text to emit)."""
        pp = [(d, d.text) for d in kept if d.category == "pp"]
        rest = [d for d in kept if d.category != "pp"]
        if self.key == "cpp":
            return pp + [(d, d.text) for d in rest]
        # C: types, then prototypes of every function, then globals, then function bodies, so
        # that definition order between cells does not matter.
        types = [(d, d.text) for d in rest if d.category == "type"]
        protos = [(d, d.text) for d in rest if d.category == "proto"]
        protos += [(d, d.extra) for d in rest if d.category == "fn" and d.extra]
        others = [(d, d.text) for d in rest if d.category not in ("type", "proto")]
        return pp + types + protos + others  # type: ignore[return-value]

    def generate(self, kept: Iterable[Decl], plan: CellPlan) -> Program:
        if plan.whole:
            return self.whole_program(plan, header=f'#line 1 "{plan.label}"')
        b = _Builder()
        b.add(self.prelude)
        for decl, text in self._ordered(list(kept)):
            b.add(f'#line {decl.line} "{decl.label}"')
            b.add(text, decl.label, decl.line)
        b.add(f'#line {b.next_line + 1} "{self.source_name}"')
        b.add("int main(void) {" if self.key == "c" else "int main() {")
        for chunk in plan.stmts:
            b.add(f'#line {chunk.line} "{plan.label}"')
            b.add(chunk.text, plan.label, chunk.line)
        b.add(f'#line {b.next_line + 1} "{self.source_name}"')
        b.add("return 0;\n}")
        return Program({self.source_name: b.text()}, {self.source_name: b.origins})

    def build_steps(self, program: Program) -> list[Step]:
        argv = [self.compiler, self.std_flag, "-O1", "-fdiagnostics-color=never", *self.extra_flags]
        return [Step([*argv, "-o", "prog", self.source_name, *self.libs])]

    def run_argv(self, build_dir: Path, program: Program) -> list[str]:
        prog = str(build_dir / "prog")
        # Line-buffer stdout (a pipe would make it fully buffered, so nothing would stream);
        # unbuffered stdin makes glibc flush a prompt on stdout before it reads.
        stdbuf = shutil.which("stdbuf")
        return [stdbuf, "-i0", "-oL", prog] if stdbuf else [prog]

    def version(self) -> str:
        out = _tool_output([self.compiler, "-dumpfullversion"])
        return out.splitlines()[0] if out else ""


class C(_CFamily):
    key = "c"
    display_name = "C"
    language_name = "c"
    mimetype = "text/x-csrc"
    file_extension = ".c"
    codemirror_mode = "text/x-csrc"
    pygments_lexer = "c"
    source_name = "main.c"
    compiler = "gcc"
    std_flag = "-std=c17"
    libs = ("-lm",)
    # _GNU_SOURCE: -std=c17 would hide POSIX functions such as usleep, getline or strdup.
    prelude = "\n".join(
        ["#define _GNU_SOURCE"]
        + [f"#include <{h}.h>" for h in ("stdio", "stdlib", "string", "math", "stdbool", "stdint")]
    )
    keywords = tuple(
        "auto break case char const continue default do double else enum extern float for goto if "
        "inline int long register restrict return short signed sizeof static struct switch typedef "
        "union unsigned void volatile while _Bool _Complex _Static_assert bool true false NULL".split()
    )
    builtins = tuple(
        "printf fprintf sprintf snprintf puts putchar scanf fgets getchar malloc calloc realloc free "
        "memcpy memset strlen strcmp strcpy strncpy strcat strdup qsort abs exit sqrt pow sin cos "
        "fabs floor ceil rand srand time stdout stderr stdin EOF size_t include stdio stdlib string "
        "math".split()
    )


class Cpp(_CFamily):
    key = "cpp"
    display_name = "C++"
    language_name = "c++"
    mimetype = "text/x-c++src"
    file_extension = ".cpp"
    codemirror_mode = "text/x-c++src"
    pygments_lexer = "cpp"
    source_name = "main.cpp"
    compiler = "g++"
    std_flag = "-std=c++20"
    prelude = "#include <iostream>\n#include <string>\n#include <vector>"
    keywords = C.keywords + tuple(
        "alignas alignof and bool catch class concept const_cast constexpr consteval constinit "
        "decltype delete dynamic_cast explicit export friend mutable namespace new noexcept nullptr "
        "operator private protected public reinterpret_cast requires static_assert static_cast "
        "template this thread_local throw try typeid typename using virtual co_await co_return "
        "co_yield".split()
    )
    builtins = C.builtins + tuple(
        "std cout cin cerr endl string vector map unordered_map set unordered_set pair tuple array "
        "deque list queue stack priority_queue optional variant unique_ptr shared_ptr make_unique "
        "make_shared sort find accumulate min max swap move iostream algorithm numeric size push_back "
        "emplace_back begin end".split()
    )


# --- Go ---------------------------------------------------------------------------------

# Package names used as `name.` in a cell that the kernel imports by itself.
GO_AUTO_IMPORTS = {
    "fmt": "fmt",
    "os": "os",
    "strings": "strings",
    "strconv": "strconv",
    "math": "math",
    "sort": "sort",
    "time": "time",
    "bufio": "bufio",
    "errors": "errors",
    "bytes": "bytes",
    "unicode": "unicode",
    "sync": "sync",
    "io": "io",
    "slices": "slices",
    "maps": "maps",
    "rand": "math/rand",
    "regexp": "regexp",
    "json": "encoding/json",
    "utf8": "unicode/utf8",
    "big": "math/big",
    "heap": "container/heap",
    "list": "container/list",
    "atomic": "sync/atomic",
    "bits": "math/bits",
    "cmplx": "math/cmplx",
    "filepath": "path/filepath",
    "context": "context",
    "runtime": "runtime",
    "reflect": "reflect",
    "hex": "encoding/hex",
    "base64": "encoding/base64",
    "sha256": "crypto/sha256",
    "cmp": "cmp",
}


def _go_group_names(body: str) -> list[str]:
    names = []
    for line in body.splitlines():
        m = re.match(r"\s*([A-Za-z_]\w*(?:\s*,\s*[A-Za-z_]\w*)*)", line)
        if m:
            names += [n.strip() for n in m.group(1).split(",")]
    return names


class Go(Language):
    key = "go"
    display_name = "Go"
    language_name = "go"
    mimetype = "text/x-go"
    file_extension = ".go"
    codemirror_mode = "go"
    pygments_lexer = "go"
    source_name = "main.go"
    stdin_apis = r"\b(?:os\.Stdin|bufio\.NewReader|bufio\.NewScanner|fmt\.Scan\w*)\b"
    keywords = tuple(
        "break case chan const continue default defer else fallthrough for func go goto if import "
        "interface map package range return select struct switch type var true false nil iota "
        "append cap close complex copy delete imag len make new panic print println real recover "
        "any bool byte error float32 float64 int int8 int16 int32 int64 rune string uint uint8 "
        "uint16 uint32 uint64 uintptr min max clear".split()
    )
    builtins = tuple(
        sorted(GO_AUTO_IMPORTS)
        + "Println Printf Sprintf Print Sprint Errorf Fprintln Fprintf Scan Scanln Sscanf Itoa Atoi "
        "Sqrt Pow Abs Join Split Contains Repeat Builder NewReader NewScanner Stdin Stdout Stderr "
        "Exit Now Sleep Second Millisecond Ints Strings Slice".split()
    )
    go_version = ""

    def classify(self, chunk: Chunk, label: str, plan: CellPlan) -> list[Decl] | None:
        m, text = chunk.masked, chunk.text
        word = _first_word(m)

        def decl(key: str, category: str, names: Iterable[str] = ()) -> Decl:
            return Decl(key, category, text, label, chunk.line, tuple(names))

        if word == "package":
            return []
        if word == "import":
            specs = []
            if "(" in m:
                inner_start = m.index("(") + 1
                inner_end = m.rfind(")")
                offset = inner_start
                for raw in text[inner_start:inner_end].split("\n"):
                    masked_line = m[offset : offset + len(raw)]
                    line_no = chunk.line + m[:offset].count("\n")
                    offset += len(raw) + 1
                    if masked_line.strip():
                        specs.append((raw[: len(masked_line.rstrip())].strip(), line_no))
            else:
                specs.append((text[len("import") :].strip().rstrip(";"), chunk.line))
            out = []
            for spec, line_no in specs:
                path = re.search(r'"([^"]*)"', spec)
                key = f"import:{path.group(1) if path else spec}"
                alias = re.match(r"\s*([A-Za-z_]\w*)\s+\"", spec)
                short = alias.group(1) if alias else (path.group(1).rsplit("/", 1)[-1] if path else "")
                out.append(Decl(key, "import", spec, label, line_no, (short,) if short else ()))
            return out
        if word == "func":
            method = re.match(r"\s*func\s*\(([^)]*)\)\s*([A-Za-z_]\w*)", m)
            if method:
                recv = re.sub(r"\[.*?\]", "", method.group(1)).replace("*", " ").split()
                return [decl(f"fn:{recv[-1] if recv else ''}.{method.group(2)}", "fn", [method.group(2)])]
            fn = re.match(r"\s*func\s+([A-Za-z_]\w*)", m)
            if fn:
                if fn.group(1) == "main":
                    plan.whole = True
                return [decl(f"fn:{fn.group(1)}", "fn", [fn.group(1)])]
            return None  # a function literal called in place
        if word == "type":
            group = re.match(r"\s*type\s*\(", m)
            if group:
                names = _go_group_names(_paren_inner(m))
                return [decl(f"type:{','.join(names)}", "type", names)]
            name = re.match(r"\s*type\s+([A-Za-z_]\w*)", m)
            return [
                decl(
                    f"type:{name.group(1) if name else _norm(text)}", "type", [name.group(1)] if name else []
                )
            ]
        if word in ("var", "const"):
            if re.match(rf"\s*{word}\s*\(", m):
                names = _go_group_names(_paren_inner(m))
            else:
                found = re.match(rf"\s*{word}\s+([A-Za-z_]\w*(?:\s*,\s*[A-Za-z_]\w*)*)", m)
                names = [n.strip() for n in found.group(1).split(",")] if found else []
            return [decl(f"var:{','.join(names) or _norm(text)}", "var", [n for n in names if n != "_"])]
        return None

    def generate(self, kept: Iterable[Decl], plan: CellPlan) -> Program:
        if plan.whole:
            has_package = any(_first_word(c.masked) == "package" for c in split(plan.code, self.key))
            return self.whole_program(plan, header="" if has_package else "package main")
        decls = list(kept)
        imports = [d for d in decls if d.category == "import"]
        have = {d.key for d in imports}
        # Import the standard packages the code uses by their usual name.
        used = set()
        for text in [d.text for d in decls if d.category != "import"] + [c.masked for c in plan.stmts]:
            used.update(re.findall(r"(?<![\w.])([a-z][a-z0-9]*)\.[A-Za-z_]", text))
        shadowed = {n for d in imports for n in d.names}
        auto = sorted(
            GO_AUTO_IMPORTS[n]
            for n in used
            if n in GO_AUTO_IMPORTS and f"import:{GO_AUTO_IMPORTS[n]}" not in have and n not in shadowed
        )
        b = _Builder()
        b.add("package main")
        if imports or auto:
            b.add("import (")
            for d in imports:
                b.add(d.text, d.label, d.line)
            for path in auto:
                b.add(f'"{path}"')
            b.add(")")
        for d in decls:
            if d.category != "import":
                b.add(d.text, d.label, d.line)
        b.add("func main() {")
        declared: list[str] = []
        for chunk in plan.stmts:
            b.add(chunk.text, plan.label, chunk.line)
            short = re.match(r"\s*([A-Za-z_]\w*(?:\s*,\s*[A-Za-z_]\w*)*)\s*:=", chunk.masked)
            if short:
                declared += [n.strip() for n in short.group(1).split(",") if n.strip() != "_"]
        # A cell's variables are often only printed later, or not at all: do not let
        # "declared and not used" stop the cell.
        for name in dict.fromkeys(declared):
            b.add(f"_ = {name}")
        b.add("}")
        return Program({self.source_name: b.text()}, {self.source_name: b.origins})

    def retry_after_error(self, output: str, kept: dict[str, Decl], plan: CellPlan) -> bool:
        unused = set(re.findall(r'"([^"]+)" imported(?: as \w+)? and not used', output))
        if not unused or plan.whole:
            return False
        dropped = False
        for store in (kept, None):
            if store is None:
                before = len(plan.decls)
                plan.decls = [d for d in plan.decls if d.key.removeprefix("import:") not in unused]
                dropped |= len(plan.decls) != before
            else:
                for key in [k for k in store if k.removeprefix("import:") in unused]:
                    del store[key]
                    dropped = True
        return dropped

    def env(self, home: str) -> dict[str, str]:
        return {
            "GOCACHE": f"{home}/.cache/go-build",
            "GOPATH": f"{home}/go",
            "GOPROXY": "off",
            "GOFLAGS": "-mod=mod",
            "GOTOOLCHAIN": "local",
            "GOTELEMETRY": "off",
            "CGO_ENABLED": "0",
        }

    def prepare(self, home: str) -> None:
        """Start from the build cache made when the image was built (standard packages)."""
        seed = os.environ.get("BAI_GO_CACHE_SEED", "")
        target = Path(self.env(home)["GOCACHE"])
        if seed and Path(seed).is_dir() and not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(target.name + ".seeding")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(seed, tmp, symlinks=True)
            tmp.rename(target)

    def build_steps(self, program: Program) -> list[Step]:
        return [Step(["go", "build", "-o", "prog", "."])]

    def write_extra(self, build_dir: Path) -> None:
        version = self.go_version or self.version()
        short = ".".join(version.split(".")[:2]) or "1.21"
        (build_dir / "go.mod").write_text(f"module cell\n\ngo {short}\n")

    def map_output(self, text: str, program: Program) -> str:
        text = "\n".join(line for line in text.split("\n") if not line.startswith("# "))
        return super().map_output(text, program)

    def version(self) -> str:
        out = _tool_output(["go", "env", "GOVERSION"])
        self.go_version = out.removeprefix("go") if out.startswith("go") else ""
        return self.go_version


# --- Rust -------------------------------------------------------------------------------

_RUST_ALLOW = (
    "dead_code",
    "unused_imports",
    "unused_variables",
    "unused_mut",
    "unused_assignments",
    "unused_macros",
    "non_snake_case",
)


class Rust(Language):
    key = "rust"
    display_name = "Rust"
    language_name = "rust"
    mimetype = "text/rust"
    file_extension = ".rs"
    codemirror_mode = "rust"
    pygments_lexer = "rust"
    source_name = "main.rs"
    stdin_apis = r"\b(?:stdin|read_line|lines|read_to_string)\b"
    keywords = tuple(
        "as async await break const continue crate dyn else enum extern false fn for if impl in let "
        "loop match mod move mut pub ref return self Self static struct super trait true type unsafe "
        "use where while i8 i16 i32 i64 i128 isize u8 u16 u32 u64 u128 usize f32 f64 bool char str "
        "String Vec Option Some None Result Ok Err Box".split()
    )
    builtins = tuple(
        "println print eprintln eprint format vec assert assert_eq panic std io collections HashMap "
        "HashSet BTreeMap VecDeque iter map filter collect len push unwrap expect clone to_string "
        "read_line stdin".split()
    )

    def classify(self, chunk: Chunk, label: str, plan: CellPlan) -> list[Decl] | None:
        m, text = chunk.masked, chunk.text

        def decl(key: str, category: str, names: Iterable[str] = ()) -> list[Decl]:
            return [Decl(key, category, text, label, chunk.line, tuple(names))]

        if re.match(r"#!\s*\[", m):
            return decl(f"attr:{_norm(text)}", "attr")
        rest = m
        while True:
            attr = re.match(r"\s*#\s*\[", rest)
            if not attr:
                break
            depth, end = 0, len(rest)
            for i in range(attr.end() - 1, len(rest)):
                if rest[i] == "[":
                    depth += 1
                elif rest[i] == "]":
                    depth -= 1
                    if depth == 0:
                        end = i + 1
                        break
            rest = rest[end:]
        rest = re.sub(r"^\s*pub\s*(?:\([^)]*\))?\s*", "", rest)
        rest = re.sub(
            r'^\s*(?:(?:default|unsafe|async|const(?=\s+(?:unsafe\s+|async\s+|extern\s+(?:"[^"]*"\s*)?)*fn\b)'
            r'|extern\s*(?:"[^"]*")?(?=\s*(?:fn|unsafe|\{)))\s*)+',
            "",
            rest,
        )
        item = re.match(
            r"\s*(fn|struct|enum|union|trait|type|mod|const|static|macro_rules!)\s*(?:mut\s+)?(\w+)?", rest
        )
        if item:
            kind, name = item.group(1), item.group(2) or ""
            if kind == "fn":
                if name == "main":
                    plan.whole = True
                return decl(f"fn:{name}", "item", [name])
            if kind in ("const", "static"):
                return decl(f"var:{name}", "item", [name])
            if kind == "macro_rules!":
                return decl(f"macro:{name}", "item", [name])
            if kind == "mod":
                return decl(f"mod:{name}", "item", [name])
            names = [name]
            if kind == "enum" and "{" in rest:
                body = rest[rest.index("{") + 1 : rest.rfind("}")]
                variants = (re.match(r"\s*(\w+)", p) for p in _split_top(body))
                names += [v.group(1) for v in variants if v]
            return decl(f"type:{name}", "item", names)
        if re.match(r"\s*impl\b", rest):
            return decl(f"impl:{_norm(head_before_block(rest))}", "item")
        if re.match(r"\s*use\b", rest):
            return decl(f"use:{_norm(text)}", "use")
        if re.match(r"\s*extern\s+crate\b", rest) or re.match(r'\s*extern\s*(?:"[^"]*")?\s*\{', rest):
            return decl(f"extern:{_norm(text)}", "item")
        return None

    def generate(self, kept: Iterable[Decl], plan: CellPlan) -> Program:
        if plan.whole:
            return self.whole_program(plan)
        decls = list(kept)
        b = _Builder()
        for category in ("attr", "use", "item"):
            for d in decls:
                if d.category == category:
                    b.add(d.text, d.label, d.line)
        # With `?` in the cell, main returns a Result so that `?` works on any error type.
        uses_try = any("?" in c.masked for c in plan.stmts)
        b.add("fn main() -> Result<(), Box<dyn std::error::Error>> {" if uses_try else "fn main() {")
        for chunk in plan.stmts:
            b.add(chunk.text, plan.label, chunk.line)
        if uses_try:
            b.add("#[allow(unreachable_code)]\nOk(())")
        b.add("}")
        return Program({self.source_name: b.text()}, {self.source_name: b.origins})

    def build_steps(self, program: Program) -> list[Step]:
        allow = [a for lint in _RUST_ALLOW for a in ("-A", lint)]
        argv = [
            "rustc",
            "--edition",
            "2021",
            "-O",
            "--color",
            "never",
            *allow,
            "-o",
            "prog",
            self.source_name,
        ]
        return [Step(argv)]

    def map_output(self, text: str, program: Program) -> str:
        # Besides "main.rs:LINE:COL", rustc's snippets number their lines in a gutter
        # ("12 |     foo();"): renumber those that show our file.
        origins = program.origins[self.source_name]
        out = []
        ours = False
        for line in text.split("\n"):
            loc = re.match(r"\s*(?:-->|:::)\s+(\S+?):\d+:\d+", line)
            if loc:
                ours = loc.group(1).endswith(self.source_name)
            gutter = re.match(r"(\s*)(\d+)(\s*\|)", line) if ours else None
            if gutter:
                number = int(gutter.group(2))
                origin = origins[number - 1] if 0 < number <= len(origins) else None
                if origin is not None:
                    width = len(gutter.group(1)) + len(gutter.group(2))
                    line = str(origin[1]).rjust(width) + line[gutter.end(2) :]
            out.append(line)
        return super().map_output("\n".join(out), program)

    def error_summary(self, output: str) -> str:
        # rustc puts the location on the line after the message: " --> cell[2]:1:5".
        lines = output.split("\n")
        for i, line in enumerate(lines):
            if line.startswith("error"):
                for follow in lines[i + 1 : i + 3]:
                    loc = re.match(r"\s*-->\s+(\S+)", follow)
                    if loc:
                        return f"{loc.group(1)}: {line.strip()}"
                return line.strip()
        return super().error_summary(output)

    def version(self) -> str:
        out = _tool_output(["rustc", "--version"])
        m = re.search(r"rustc\s+(\S+)", out)
        return m.group(1) if m else ""


# --- Java -------------------------------------------------------------------------------

_JAVA_MODIFIERS = (
    r"(?:public|protected|private|static|final|abstract|sealed|non-sealed|strictfp|synchronized"
    r"|native|default|transient|volatile)\b"
)
_JAVA_CONTROL = frozenset(
    "if else for while do switch case default try catch finally synchronized return throw new "
    "assert yield break continue var this super".split()
)
_JAVA_TYPE_WORDS = frozenset("byte short int long float double char boolean void final".split())


def _java_prefix(masked: str) -> tuple[int, list[str]]:
    """Length of the annotations and modifiers at the start of a chunk, and the modifiers."""
    pos, mods = 0, []
    while True:
        space = re.match(r"\s*", masked[pos:])
        pos += space.end() if space else 0
        ann = re.match(r"@(?!interface\b)[A-Za-z_][\w.]*", masked[pos:])
        if ann:
            pos += ann.end()
            if masked[pos:].lstrip().startswith("("):
                pos += len(masked[pos:]) - len(masked[pos:].lstrip())
                depth = 0
                for i in range(pos, len(masked)):
                    if masked[i] == "(":
                        depth += 1
                    elif masked[i] == ")":
                        depth -= 1
                        if depth == 0:
                            pos = i + 1
                            break
            continue
        mod = re.match(_JAVA_MODIFIERS, masked[pos:])
        if mod:
            mods.append(mod.group(0))
            pos += mod.end()
            continue
        return pos, mods


class Java(Language):
    key = "java"
    display_name = "Java"
    language_name = "java"
    mimetype = "text/x-java"
    file_extension = ".java"
    codemirror_mode = "text/x-java"
    pygments_lexer = "java"
    source_name = "Main.java"
    class_name = "Main"
    runs_built_binary = False
    stdin_apis = r"\b(?:System\.in|Scanner|BufferedReader|Console|readLine)\b"
    keywords = tuple(
        "abstract assert boolean break byte case catch char class const continue default do double "
        "else enum extends final finally float for goto if implements import instanceof int interface "
        "long native new package private protected public return short static strictfp super switch "
        "synchronized this throw throws transient try void volatile while var record sealed permits "
        "yield true false null".split()
    )
    builtins = tuple(
        "System out println print printf String Integer Long Double Math List ArrayList Map HashMap "
        "Set HashSet Arrays Collections Scanner StringBuilder Optional Stream IntStream Collectors "
        "Object Exception RuntimeException length size add get put".split()
    )

    def classify(self, chunk: Chunk, label: str, plan: CellPlan) -> list[Decl] | None:
        m, text = chunk.masked, chunk.text
        word = _first_word(m)
        if word == "package":
            return []
        if word == "import":
            return [Decl(f"import:{_norm(text)}", "import", text, label, chunk.line)]
        pos, mods = _java_prefix(m)
        rest = m[pos:]

        def decl(key: str, category: str, names: Iterable[str], extra: str) -> list[Decl]:
            return [Decl(key, category, text, label, chunk.line, tuple(names), extra)]

        type_decl = re.match(r"(class|interface|enum|record|@interface)\s+([A-Za-z_]\w*)", rest)
        if type_decl:
            name = type_decl.group(2)
            if re.search(r"\bstatic\b[^;{}=]*\bvoid\s+main\s*\(", m):
                plan.whole = True
                plan.main_class = plan.main_class or name
            # Nested in the generated class: without `public` (one public class per file), and
            # static so that main and the methods can use it.
            top = _blank_word(text, m[:pos], "public")
            inner = top
            if "static" not in mods and type_decl.group(1) == "class":
                inner = top[:pos] + "static " + top[pos:]
            return [Decl(f"type:{name}", "type", top, label, chunk.line, (name,), inner)]
        head = head_before_block(m)
        has_block = len(head) < len(m)
        head_rest = _depth0(head[pos:])
        method = re.match(
            r"\s*(?:<[^>]*>\s*)?([A-Za-z_][\w.<>\[\],?\s]*?)\s*\b([A-Za-z_]\w*)\s*\(\)\s*(?:throws\s+[\w.,\s]+)?$",
            head_rest,
        )
        if (
            has_block
            and method
            and _first_word(method.group(1)) not in _JAVA_CONTROL
            and "=" not in head_rest
        ):
            name = method.group(2)
            params = _param_types(_paren_inner(head[pos:]), _JAVA_TYPE_WORDS, angle=True)
            added = ("" if "public" in mods or name != "main" else "public ") + (
                "" if "static" in mods else "static "
            )
            inner = text[:pos] + added + text[pos:]
            if name == "main":
                plan.whole = True
            return decl(f"fn:{name}({params})", "fn", [name], inner)
        if "static" in mods:
            d0 = _depth0(rest)
            found = re.search(r"([A-Za-z_]\w*)\s*(?:\[\s*\]\s*)*(?:=|;|,)", d0)
            name = found.group(1) if found else _norm(text)
            return decl(f"var:{name}", "var", [name], text)
        return None

    def generate(self, kept: Iterable[Decl], plan: CellPlan) -> Program:
        if plan.whole and plan.main_class:
            # The cell's own class holds main: compile it as written, in the file its public
            # class (if any) must be in.
            public = re.search(
                r"^\s*(?:@\w+\s*)*(?:\w+\s+)*?public\s+(?:\w+\s+)*?(?:class|interface|enum|record)\s+(\w+)",
                mask(plan.code, self.key).text,
                re.M,
            )
            return self.whole_program(plan, name=f"{public.group(1)}.java" if public else None)
        decls = plan.decls if plan.whole else list(kept)
        b = _Builder()
        for d in decls:
            if d.category == "import":
                b.add(d.text, d.label, d.line)
        members = [d for d in decls if d.category != "import"]
        b.add(f"public class {self.class_name} {{")
        for d in members:
            b.add(d.extra or d.text, d.label, d.line)
        if not plan.whole:
            b.add("public static void main(String[] args) throws Throwable {")
            for chunk in plan.stmts:
                b.add(chunk.text, plan.label, chunk.line)
            b.add("}")
        b.add("}")
        return Program(
            {self.source_name: b.text()}, {self.source_name: b.origins}, main_class=self.class_name
        )

    def write_extra(self, build_dir: Path) -> None:
        shutil.rmtree(build_dir / "classes", ignore_errors=True)

    def build_steps(self, program: Program) -> list[Step]:
        fast = ["-J-XX:+UseSerialGC", "-J-XX:TieredStopAtLevel=1", "-J-Xshare:auto"]
        return [Step(["javac", *fast, "-encoding", "UTF-8", "-d", "classes", *program.files])]

    def run_argv(self, build_dir: Path, program: Program) -> list[str]:
        return [
            "java",
            "-XX:+UseSerialGC",
            "-Xshare:auto",
            "-cp",
            str(build_dir / "classes"),
            program.main_class,
        ]

    def version(self) -> str:
        javac = shutil.which("javac")
        if javac:
            release = Path(os.path.realpath(javac)).parent.parent / "release"
            try:
                m = re.search(r'JAVA_VERSION="([^"]+)"', release.read_text())
                if m:
                    return m.group(1)
            except OSError:
                pass
        out = _tool_output(["javac", "-version"])
        m = re.search(r"javac\s+(\S+)", out)
        return m.group(1) if m else ""


def _blank_word(text: str, masked_prefix: str, word: str) -> str:
    """Replace *word* in the modifier prefix of *text* by spaces (keeps lines and columns)."""
    m = re.search(rf"\b{word}\b", masked_prefix)
    if not m:
        return text
    return text[: m.start()] + " " * len(word) + text[m.end() :]


LANGUAGE_CLASSES: dict[str, type[Language]] = {"c": C, "cpp": Cpp, "go": Go, "rust": Rust, "java": Java}
ALIASES = {"c++": "cpp", "golang": "go", "rs": "rust"}


def get_language(name: str) -> Language:
    """Return the Language for a name such as "c", "cpp"/"c++", "go", "rust", "java"."""
    key = ALIASES.get(name.lower(), name.lower())
    if key not in LANGUAGE_CLASSES:
        raise ValueError(f"unknown language {name!r}; choose one of {', '.join(LANGUAGE_CLASSES)}")
    return LANGUAGE_CLASSES[key]()


# Syscall numbers of read, readv and pread64, for telling that a program waits on stdin.
READ_SYSCALLS = {"x86_64": (0, 19, 17), "aarch64": (63, 65, 67)}.get(platform.machine(), ())
