"""A Jupyter kernel for compiled languages: C, C++, Go, Rust and Java.

``python -m bai_compiled_kernel --language {c,cpp,go,rust,java} -f CONNECTION_FILE``

Each cell is compiled together with the declarations kept from earlier cells and run as
a new process. Its stdout and stderr stream to the notebook while it runs; compile
errors, a non-zero exit and a crash come back as Jupyter errors.

State across cells
==================

A cell is cut into top-level chunks by a brace-aware splitter (comments and literals are
blanked first; a chunk ends at a top-level ``;``, at the ``}`` closing a top-level block
unless ``else``/``catch``/``finally``/``while`` (after ``do``), ``.`` or ``?`` follows or the
chunk is an initializer or a C/C++ type definition that goes on to ``;``; in Go, at a
newline where Go inserts a semicolon). Each chunk is either a *declaration*, which the
kernel keeps, or a *statement*, which goes into ``main`` of this cell's program only.

Declarations, per language (anything else is a statement):

* C/C++: preprocessor lines; function definitions (a header with a return type and a
  parameter list, then a body) and prototypes; ``struct``/``union``/``enum``/``class``
  definitions, ``typedef``; C++ ``namespace``, ``using``, ``template`` definitions, and
  out-of-class definitions such as ``int Foo::count = 0;``; global variables, that is
  declarations starting with ``static``, ``extern``, ``const``, ``constexpr``, ``inline``
  or ``thread_local``. (So ``int x = 1;`` in a cell is a local of that cell's ``main``,
  while ``static int x = 1;`` is a global that later cells see.)
* Go: ``import``, ``func`` (methods too), ``type``, package-level ``var`` and ``const``;
  ``package`` is dropped. ``x := ...`` is a statement. Standard packages used as
  ``fmt.``, ``strings.``, ``os.`` ... are imported automatically, and imports that end up
  unused are dropped; variables declared with ``:=`` at the top of a cell are marked used.
* Rust: items — ``fn``, ``struct``, ``enum``, ``union``, ``trait``, ``type``, ``impl``,
  ``use``, ``mod``, ``const``, ``static``, ``macro_rules!``, ``extern``, inner attributes
  ``#![...]`` — with their attributes and ``pub``. ``let`` and expressions are statements.
  Unused-code lints are silenced.
* Java: ``import``; classes, interfaces, enums and records (nested as static members of
  the generated class ``Main``); methods (``int f(int x) { ... }``, made ``static``); fields
  declared ``static``. Everything else runs in ``main``.

A declaration is identified by its kind and name (C++ and Java functions also by their
parameter types, so overloads coexist; Go methods by receiver and name; a Rust ``impl``
by its header). A later cell declaring the same thing replaces it *in place*; new
declarations are appended. Declarations of a cell that does not compile are not kept.
Statements are never re-run: each cell's program runs only that cell's statements, so
values computed in one cell are not seen by the next (globals start from their
initializers in every cell).

A cell that has its own ``main`` (C/C++ ``int main``, Go ``func main``, Rust ``fn main``,
Java ``static void main`` in a class or on its own) is a whole program: it is compiled
and run as written, without the kept declarations, and it does not change them.

Errors name the cell and its line: ``cell[3]:2:5: error: ...`` where 3 is the cell's
execution count. C/C++ get ``#line`` directives; for Go, Rust and Java the kernel maps
``main.go:LINE``, ``main.rs:LINE`` and ``Main.java:LINE`` (also in panics and stack
traces) through its own line map.

Input
=====

With ``allow_stdin`` the program's stdin is a pipe held by the kernel. When the program
has been quiet for 200 ms and one of its threads blocks in ``read`` on fd 0 of that pipe
(``/proc/<pid>/task/<tid>/syscall`` and ``/proc/<pid>/fd/0``; Linux only), the kernel sends
an ``input_request`` and writes the reply, plus a newline, to the pipe; a reply of a lone
Ctrl-D character (``\\x04``) closes it. Where /proc cannot be read the kernel falls back to
asking when the cell uses a stdin API and every thread of the program has slept for
500 ms. Without ``allow_stdin`` stdin is ``/dev/null``.

Interrupts
==========

Compilers and programs run in their own session. SIGINT to the kernel — sent by
ipykernel itself for an ``interrupt_request`` on the control channel, or forwarded by the
container's init — sends SIGINT to that process group and SIGKILL one second later; the
kernel stays up. Shutting the kernel down kills a running program.
"""

__version__ = "0.1.0"
