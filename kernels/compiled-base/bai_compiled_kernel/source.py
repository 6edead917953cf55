"""Brace-aware scanning of cell source, shared by all languages.

Nothing here parses a language. Three small tools do the work:

* :func:`mask` blanks comments and the contents of string/char literals (keeping
  every newline and the length), so that braces, semicolons and keywords found in
  the masked text are real code;
* :func:`split` cuts a cell into top-level chunks (a preprocessor line, a statement,
  a function, a type definition, ...) using bracket depth and a few rules about
  where a chunk ends;
* :func:`completeness` says whether the brackets of a cell are balanced.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

LANGUAGES = ("c", "cpp", "go", "rust", "java")

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_RUST_RAW = re.compile(r'(?:b|c)?r(#*)"')
_CPP_RAW = re.compile(r'(?:u8|u|U|L)?R"([^()\\\s]{0,16})\(')
_OPEN = "([{"
_CLOSE = ")]}"
_PAIR = {")": "(", "]": "[", "}": "{"}


@dataclass(frozen=True)
class Masked:
    """*text* has the length and newlines of the source; comments and literal bodies are blanks."""

    text: str
    # What was left open at the end: "comment", "raw string", "text block", or None.
    open_literal: str | None


@dataclass
class Chunk:
    """One top-level piece of a cell."""

    text: str  # the original source of the chunk
    masked: str  # the same span of the masked source
    line: int  # 1-based line of the cell where the chunk starts
    start: int  # offset of the chunk in the cell

    @property
    def end_line(self) -> int:
        return self.line + self.text.count("\n")


def _is_ident_char(ch: str) -> bool:
    return ch.isalnum() or ch == "_"


def mask(source: str, lang: str) -> Masked:
    """Blank out comments and the contents of literals in *source* (see module docstring)."""
    out = list(source)
    n = len(source)
    open_literal: str | None = None

    def blank(a: int, b: int) -> None:
        for k in range(a, min(b, n)):
            if out[k] != "\n":
                out[k] = " "

    i = 0
    while i < n:
        c = source[i]
        nxt = source[i + 1] if i + 1 < n else ""
        prev = source[i - 1] if i > 0 else ""
        if c == "/" and nxt == "/":
            j = source.find("\n", i)
            j = n if j < 0 else j
            blank(i, j)
            i = j
            continue
        if c == "/" and nxt == "*":
            if lang == "rust":  # Rust block comments nest
                depth, j = 1, i + 2
                while j < n and depth:
                    if source.startswith("/*", j):
                        depth, j = depth + 1, j + 2
                    elif source.startswith("*/", j):
                        depth, j = depth - 1, j + 2
                    else:
                        j += 1
                end = j if depth == 0 else -1
            else:
                k = source.find("*/", i + 2)
                end = k + 2 if k >= 0 else -1
            if end < 0:
                blank(i, n)
                open_literal = "comment"
                break
            blank(i, end)
            i = end
            continue
        if lang == "go" and c == "`":
            j = source.find("`", i + 1)
            if j < 0:
                blank(i + 1, n)
                open_literal = "raw string"
                break
            blank(i + 1, j)
            i = j + 1
            continue
        if lang == "rust" and c in "bcr" and not _is_ident_char(prev):
            m = _RUST_RAW.match(source, i)
            if m:
                closer = '"' + m.group(1)
                j = source.find(closer, m.end())
                if j < 0:
                    blank(m.end(), n)
                    open_literal = "raw string"
                    break
                blank(m.end(), j)
                i = j + len(closer)
                continue
        if lang == "cpp" and c in "uULR" and not _is_ident_char(prev):
            m = _CPP_RAW.match(source, i)
            if m:
                closer = ")" + m.group(1) + '"'
                j = source.find(closer, m.end())
                if j < 0:
                    blank(m.end(), n)
                    open_literal = "raw string"
                    break
                blank(m.end(), j)
                i = j + len(closer)
                continue
        if lang == "java" and source.startswith('"""', i):
            j = i + 3
            while j < n and not source.startswith('"""', j):
                j += 2 if source[j] == "\\" else 1
            if j >= n:
                blank(i + 3, n)
                open_literal = "text block"
                break
            blank(i + 3, j)
            i = j + 3
            continue
        if c == "'":
            if lang == "rust" and nxt != "\\" and not (i + 2 < n and source[i + 2] == "'"):
                i += 1  # a lifetime or loop label, not a char literal
                continue
            if lang == "cpp" and prev.isalnum():
                i += 1  # a digit separator: 1'000'000
                continue
        if c in "\"'":
            j = i + 1
            while j < n and source[j] != c and source[j] != "\n":
                j += 2 if source[j] == "\\" else 1
            j = min(j, n)
            blank(i + 1, j)
            i = j + 1 if j < n and source[j] == c else j
            continue
        i += 1
    return Masked("".join(out), open_literal)


def completeness(source: str, lang: str) -> tuple[str, str]:
    """Return ("complete" | "incomplete" | "invalid", indent) for an is_complete request."""
    if not source.strip():
        return "complete", ""
    masked = mask(source, lang)
    if masked.open_literal is not None:
        return "incomplete", ""
    stack: list[str] = []
    for ch in masked.text:
        if ch in _OPEN:
            stack.append(ch)
        elif ch in _CLOSE:
            if not stack or stack[-1] != _PAIR[ch]:
                return "invalid", ""
            stack.pop()
    if stack:
        return "incomplete", "    " * stack.count("{") if "{" in stack else "    "
    if lang in ("c", "cpp") and masked.text.rstrip(" \t").endswith("\\"):
        return "incomplete", ""
    return "complete", ""


# --- splitting --------------------------------------------------------------------------

# After a `}` that closes a top-level block, these keep the chunk going.
_CONTINUE_AFTER_BLOCK = re.compile(r"(?:else|catch|finally)\b|\.(?!\.)|\?")
# C/C++ type definitions that need a `;` after their closing brace.
_C_TYPE_HEAD = re.compile(r"\s*(?:template\s*<[^{]*>\s*)?(?:typedef\s+)?(?:struct|union|enum|class)\b[^()]*$")
# A lone `=` (an initializer or assignment), not part of ==, <=, =>, operator= ...
_LONE_EQ = re.compile(r"(?<![=!<>+\-*/%&|^:])=(?![=>])")
_OPERATOR = re.compile(r"\boperator\s*[^\s(]*")
# Go: keywords after which a newline ends the statement (the spec's semicolon insertion).
_GO_SEMI_KEYWORDS = frozenset("break continue fallthrough return".split())
_GO_KEYWORDS = frozenset(
    "break case chan const continue default defer else fallthrough for func go goto if import "
    "interface map package range return select struct switch type var".split()
)


def _skip_space(text: str, i: int) -> int:
    while i < len(text) and text[i].isspace():
        i += 1
    return i


def _depth0(text: str) -> str:
    """Return *text* with everything inside brackets removed (depth-0 characters only)."""
    out, depth = [], 0
    for ch in text:
        if ch in _OPEN:
            if depth == 0:
                out.append(ch)
            depth += 1
        elif ch in _CLOSE:
            depth = max(depth - 1, 0)
            if depth == 0:
                out.append(ch)
        elif depth == 0:
            out.append(ch)
    return "".join(out)


def head_before_block(masked: str) -> str:
    """The part of a chunk before its first top-level `{` (all of it if there is none)."""
    depth = 0
    for i, ch in enumerate(masked):
        if ch == "{" and depth == 0:
            return masked[:i]
        if ch in _OPEN:
            depth += 1
        elif ch in _CLOSE:
            depth = max(depth - 1, 0)
    return masked


def _needs_semicolon(lang: str, masked_chunk: str) -> bool:
    """Whether a chunk whose top-level block just closed goes on to a `;`."""
    head = head_before_block(masked_chunk)
    if lang in ("c", "cpp") and _C_TYPE_HEAD.match(head):
        return True
    if lang == "rust" and re.match(r"\s*(?:let|static|const)\b", head):
        return True
    return bool(_LONE_EQ.search(_depth0(_OPERATOR.sub(" ", head))))


def _go_ends_statement(masked: str, newline: int) -> bool:
    """Go's semicolon insertion: does the line ending at *newline* end a statement?"""
    j = newline - 1
    while j >= 0 and masked[j] in " \t\r":
        j -= 1
    if j < 0 or masked[j] == "\n":
        return False
    ch = masked[j]
    if _is_ident_char(ch):
        k = j
        while k >= 0 and _is_ident_char(masked[k]):
            k -= 1
        word = masked[k + 1 : j + 1]
        return word in _GO_SEMI_KEYWORDS or word not in _GO_KEYWORDS
    if ch in ")]}\"'`":
        return True
    return masked[j - 1 : j + 1] in ("++", "--")


def _scan_chunk(masked: str, start: int, lang: str) -> int:
    """Return the end offset of the chunk starting at *start*."""
    n = len(masked)
    depth = 0
    i = start
    while i < n:
        c = masked[i]
        if c in _OPEN:
            depth += 1
        elif c in _CLOSE:
            depth -= 1
            if depth < 0:  # a stray closer: let the compiler complain about it
                return i + 1
            if depth == 0 and c == "}" and lang != "go":
                j = _skip_space(masked, i + 1)
                if j < n and masked[j] == ";":
                    return j + 1
                chunk = masked[start : i + 1]
                if j < n and (
                    _CONTINUE_AFTER_BLOCK.match(masked, j)
                    or (re.match(r"while\b", masked[j:]) and re.match(r"\s*do\b", chunk))
                    or _needs_semicolon(lang, chunk)
                ):
                    i += 1
                    continue
                return i + 1
        elif c == ";" and depth == 0:
            # Go's `for i := 0; i < n; i++ {` and `if v, ok := m[k]; ok {` go on to their block.
            if lang == "go" and re.match(r"\s*(?:for|if|switch|select)\b", masked[start:i]):
                i += 1
                continue
            return i + 1
        elif c == "\n" and depth == 0 and lang == "go" and _go_ends_statement(masked, i):
            return i
        i += 1
    return n


def _pp_end(masked: str, start: int) -> int:
    """End of a preprocessor directive starting at *start* (honours backslash-newlines)."""
    i = start
    n = len(masked)
    while True:
        j = masked.find("\n", i)
        if j < 0:
            return n
        if masked[i:j].rstrip(" \t\r").endswith("\\"):
            i = j + 1
            continue
        return j


def split(source: str, lang: str) -> list[Chunk]:
    """Cut *source* into top-level chunks (comments between chunks are dropped)."""
    masked = mask(source, lang).text
    chunks: list[Chunk] = []
    n = len(masked)
    i = 0
    line = 1
    pos_line = 0  # offset up to which *line* has been counted
    while True:
        i = _skip_space(masked, i)
        if i >= n:
            break
        if lang in ("c", "cpp") and masked[i] == "#":
            end = _pp_end(masked, i)
        elif lang == "rust" and re.match(r"#!\s*\[", masked[i:]):
            # An inner attribute (#![...]) stands alone.
            depth, end = 0, n
            for k in range(masked.index("[", i), n):
                if masked[k] in _OPEN:
                    depth += 1
                elif masked[k] in _CLOSE:
                    depth -= 1
                    if depth == 0:
                        end = k + 1
                        break
        else:
            end = _scan_chunk(masked, i, lang)
        line += source.count("\n", pos_line, i)
        pos_line = i
        text = source[i:end].rstrip()
        if text:
            chunks.append(Chunk(text=text, masked=masked[i : i + len(text)], line=line, start=i))
        i = max(end, i + 1)
    return chunks


def identifiers(masked: str) -> list[str]:
    """All identifiers in masked text, in order."""
    return _IDENT.findall(masked)
