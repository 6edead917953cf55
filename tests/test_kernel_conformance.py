"""jupyter_kernel_test's protocol conformance suite for every language image, through the real path.

Each class starts its kernel with ``start_new_kernel`` on the test kernelspec of its image
(Backend.AI provisioner -> gateway -> agent -> container), as any Jupyter client would.
"""

from __future__ import annotations

import jupyter_kernel_test
import pytest

from .language_kernels import spec_name

pytestmark = [pytest.mark.docker, pytest.mark.usefixtures("language_kernelspecs")]


class PythonKernelTests(jupyter_kernel_test.KernelTests):
    kernel_name = spec_name("python")
    language_name = "python"
    file_extension = ".py"
    code_hello_world = "print('hello, world')"
    code_stderr = "import sys; print('oops', file=sys.stderr)"
    completion_samples = [{"text": "zi", "matches": {"zip"}}]
    complete_code_samples = ["1", "print('hello, world')", "def f(x):\n  return x*2\n\n\n"]
    incomplete_code_samples = ["print('''hello", "def f(x):\n  x*2"]
    invalid_code_samples = ["import = 7q"]
    code_page_something = "zip?"
    code_generate_error = "raise ValueError('boom')"
    code_execute_result = [
        {"code": "1+2+3", "result": "6"},
        {"code": "[n*n for n in range(1, 4)]", "result": "[1, 4, 9]"},
    ]
    code_display_data = [
        {
            "code": "from IPython.display import HTML, display; display(HTML('<b>test</b>'))",
            "mime": "text/html",
        },
        {"code": "import pandas as pd; display(pd.DataFrame({'a': [1]}))", "mime": "text/html"},
    ]
    code_history_pattern = "1?2*"
    supported_history_operations = ("tail", "search")
    code_inspect_sample = "zip"
    code_clear_output = "from IPython.display import clear_output; clear_output()"


class RKernelTests(jupyter_kernel_test.KernelTests):
    kernel_name = spec_name("r")
    language_name = "R"
    file_extension = ".r"
    code_hello_world = 'cat("hello, world\\n")'
    code_stderr = 'message("oops")'
    completion_samples = [{"text": "seq_alon", "matches": {"seq_along"}}]
    complete_code_samples = ["1", 'print("hello, world")', "f <- function(x) {\n  x * 2\n}"]
    incomplete_code_samples = ['print("hello', "f <- function(x) {\n  x * 2"]
    code_generate_error = 'stop("boom")'
    # IRkernel shows a cell's value as display_data, never as execute_result.
    code_display_data = [
        {"code": "6 * 7", "mime": "text/plain"},
        {"code": "plot(1:10)", "mime": "image/png"},
        {"code": "IRdisplay::display_html('<b>test</b>')", "mime": "text/html"},
    ]
    code_inspect_sample = "print"
    code_clear_output = "IRdisplay::clear_output()"


class BashKernelTests(jupyter_kernel_test.KernelTests):
    kernel_name = spec_name("bash")
    language_name = "bash"
    file_extension = ".sh"
    code_hello_world = 'echo "hello, world"'
    completion_samples = [{"text": "ech", "matches": {"echo"}}]
    # An error with no other output: the suite expects the error message alone.
    code_generate_error = "false"


class DenoKernelTests(jupyter_kernel_test.KernelTests):
    kernel_name = spec_name("deno")
    language_name = "typescript"
    file_extension = ".ts"
    code_hello_world = 'console.log("hello, world")'
    code_stderr = 'console.error("oops")'
    code_generate_error = 'throw new Error("boom")'
    code_execute_result = [{"code": "6 * 7", "result": "42"}, {"code": '"a" + "b"', "result": '"ab"'}]
    completion_samples = [{"text": "consol", "matches": {"console"}}]
    # No inspect: Deno answers inspect_request with found: false.
    code_display_data = [
        {"code": 'await Deno.jupyter.display({"text/html": "<b>test</b>"}, {raw: true})', "mime": "text/html"}
    ]


class OctaveKernelTests(jupyter_kernel_test.KernelTests):
    kernel_name = spec_name("octave")
    language_name = "octave"
    file_extension = ".m"
    code_hello_world = 'disp("hello, world")'
    completion_samples = [{"text": "one", "matches": {"ones"}}]
    complete_code_samples = ["1", 'disp("hello, world")']
    incomplete_code_samples = ["for i = 1:3"]
    code_generate_error = 'error("boom")'
    code_display_data = [{"code": "plot(1:10)", "mime": "image/png"}]
    code_inspect_sample = "disp"


class CKernelTests(jupyter_kernel_test.KernelTests):
    kernel_name = spec_name("c")
    language_name = "c"
    file_extension = ".c"
    code_hello_world = 'printf("hello, world\\n");'
    code_stderr = 'fprintf(stderr, "error\\n");'
    code_generate_error = "int x = undefined_name;"
    completion_samples = [{"text": "prin", "matches": {"printf"}}]
    complete_code_samples = ['printf("hi");', "int f(void) { return 1; }"]
    incomplete_code_samples = ["int f(void) {", 'printf("a",', "/* comment"]
    invalid_code_samples = ["}", "x = (1];"]


class CppKernelTests(jupyter_kernel_test.KernelTests):
    kernel_name = spec_name("cpp")
    language_name = "c++"
    file_extension = ".cpp"
    code_hello_world = 'std::cout << "hello, world" << std::endl;'
    code_stderr = 'std::cerr << "error" << std::endl;'
    code_generate_error = "int x = undefined_name;"
    completion_samples = [{"text": "make_un", "matches": {"make_unique"}}]
    complete_code_samples = ['std::cout << "hi";', "class A {};"]
    incomplete_code_samples = ["class A {", "std::cout << f(1,"]
    invalid_code_samples = ["}", "x = (1];"]


class GoKernelTests(jupyter_kernel_test.KernelTests):
    kernel_name = spec_name("go")
    language_name = "go"
    file_extension = ".go"
    code_hello_world = 'fmt.Println("hello, world")'
    code_stderr = 'fmt.Fprintln(os.Stderr, "error")'
    code_generate_error = "x := undefinedName"
    completion_samples = [{"text": "fmt.Printl", "matches": {"Println"}}]
    complete_code_samples = ['fmt.Println("hi")', "func f() int { return 1 }"]
    incomplete_code_samples = ["func f() {", "fmt.Println(1,"]
    invalid_code_samples = ["}", "x = (1];"]


class RustKernelTests(jupyter_kernel_test.KernelTests):
    kernel_name = spec_name("rust")
    language_name = "rust"
    file_extension = ".rs"
    code_hello_world = 'println!("hello, world");'
    code_stderr = 'eprintln!("error");'
    code_generate_error = "let x = undefined_name;"
    completion_samples = [{"text": "eprintl", "matches": {"eprintln"}}]
    complete_code_samples = ['println!("hi");', "fn f<'a>(x: &'a str) -> &'a str { x }"]
    incomplete_code_samples = ["fn f() {", "let v = vec![1,"]
    invalid_code_samples = ["}", "x = (1];"]


class JavaKernelTests(jupyter_kernel_test.KernelTests):
    kernel_name = spec_name("java")
    language_name = "java"
    file_extension = ".java"
    code_hello_world = 'System.out.println("hello, world");'
    code_stderr = 'System.err.println("error");'
    code_generate_error = "int x = undefinedName;"
    completion_samples = [{"text": "System.out.printl", "matches": {"println"}}]
    complete_code_samples = ['System.out.println("hi");', "int f() { return 1; }"]
    incomplete_code_samples = ["int f() {", 'String s = """', "System.out.println(1,"]
    invalid_code_samples = ["}", "x = (1];"]
