"""jupyter_kernel_test's protocol conformance suite for the C, C++, Go, Rust and Java kernels.

jupyter_kernel_test starts kernels by kernelspec name with a stock KernelManager, so each
language gets a temporary kernelspec whose argv runs the language image with
``docker run``: the kernel under test is the one users get, in its image, with the
toolchain of the image (the host may have none), in a container restricted like the
agent's (read-only root, tmpfs home and /tmp, no capabilities). ``--network host`` lets
the KernelManager reach the ports of its connection file, which is mounted read-only;
the container runs as the host user so that it can read that file (written with mode 0600).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any, ClassVar

import pytest

from backendai_jupyter.common.wire import KERNEL_HOME

jupyter_kernel_test = pytest.importorskip("jupyter_kernel_test")

pytestmark = pytest.mark.docker

CONTAINER_LABEL = "io.backendai-jupyter.conformance-test"
CONN_IN_CONTAINER = "/conn.json"


def _docker() -> Any:
    import docker

    try:
        client = docker.from_env()
        client.ping()
    except Exception as exc:
        raise __import__("unittest").SkipTest(f"no Docker engine: {exc}") from exc
    return client


class _CompiledKernelTests(jupyter_kernel_test.KernelTests):
    """The suite against one language image; subclasses set ``lang`` and the samples."""

    __test__ = False
    lang: ClassVar[str] = ""
    _spec_dir: ClassVar[str] = ""
    _old_jupyter_path: ClassVar[str | None] = None

    @classmethod
    def setUpClass(cls) -> None:
        import unittest

        client = _docker()
        image_ref = f"backendai-jupyter/{cls.lang}:latest"
        try:
            image = client.images.get(image_ref)
        except Exception as exc:
            raise unittest.SkipTest(
                f"{image_ref} not built (python -m backendai_jupyter.images {cls.lang})"
            ) from exc
        label = json.loads(image.labels["io.backendai-jupyter.kernel"])
        uid, gid = os.getuid(), os.getgid()
        argv = [
            "docker",
            "run",
            "--rm",
            "--network",
            "host",
            "--read-only",
            "--tmpfs",
            f"{KERNEL_HOME}:size=512m,uid={uid},gid={gid},mode=0700,nosuid,nodev",
            "--tmpfs",
            "/tmp:size=256m,mode=1777,nosuid,nodev,exec",
            "--cap-drop",
            "ALL",
            "--security-opt",
            "no-new-privileges",
            "--user",
            f"{uid}:{gid}",
            "--env",
            f"HOME={KERNEL_HOME}",
            "--label",
            CONTAINER_LABEL,
            "--volume",
            f"{{connection_file}}:{CONN_IN_CONTAINER}:ro",
            image.id,
            *[a.replace("{connection_file}", CONN_IN_CONTAINER) for a in label["argv"]],
        ]
        cls._spec_dir = tempfile.mkdtemp(prefix="bai-compiled-specs-")
        spec = os.path.join(cls._spec_dir, "kernels", cls.kernel_name)
        os.makedirs(spec)
        with open(os.path.join(spec, "kernel.json"), "w") as f:
            json.dump(
                {
                    "argv": argv,
                    "display_name": label["display_name"],
                    "language": label["language"],
                    "interrupt_mode": label["interrupt_mode"],
                },
                f,
            )
        cls._old_jupyter_path = os.environ.get("JUPYTER_PATH")
        os.environ["JUPYTER_PATH"] = os.pathsep.join(filter(None, [cls._spec_dir, cls._old_jupyter_path]))
        super().setUpClass()

    @classmethod
    def tearDownClass(cls) -> None:
        try:
            super().tearDownClass()
        finally:
            if cls._old_jupyter_path is None:
                os.environ.pop("JUPYTER_PATH", None)
            else:
                os.environ["JUPYTER_PATH"] = cls._old_jupyter_path
            shutil.rmtree(cls._spec_dir, ignore_errors=True)
            # A kernel that did not stop by itself leaves its container behind `docker run`.
            for container in _docker().containers.list(all=True, filters={"label": CONTAINER_LABEL}):
                container.remove(force=True)

    complete_code_samples: ClassVar[list[str]] = []
    incomplete_code_samples: ClassVar[list[str]] = []
    invalid_code_samples: ClassVar[list[str]] = ["}", "x = (1];"]


class TestCConformance(_CompiledKernelTests):
    __test__ = True
    lang = "c"
    kernel_name = "bai-compiled-test-c"
    language_name = "c"
    file_extension = ".c"
    code_hello_world = 'printf("hello, world\\n");'
    code_stderr = 'fprintf(stderr, "error\\n");'
    code_generate_error = "int x = undefined_name;"
    completion_samples: ClassVar[list[dict[str, Any]]] = [{"text": "prin", "matches": {"printf"}}]
    complete_code_samples = ['printf("hi");', "int f(void) { return 1; }"]
    incomplete_code_samples = ["int f(void) {", 'printf("a",', "/* comment"]


class TestCppConformance(_CompiledKernelTests):
    __test__ = True
    lang = "cpp"
    kernel_name = "bai-compiled-test-cpp"
    language_name = "c++"
    file_extension = ".cpp"
    code_hello_world = 'std::cout << "hello, world" << std::endl;'
    code_stderr = 'std::cerr << "error" << std::endl;'
    code_generate_error = "int x = undefined_name;"
    completion_samples: ClassVar[list[dict[str, Any]]] = [{"text": "make_un", "matches": {"make_unique"}}]
    complete_code_samples = ['std::cout << "hi";', "class A {};"]
    incomplete_code_samples = ["class A {", "std::cout << f(1,"]


class TestGoConformance(_CompiledKernelTests):
    __test__ = True
    lang = "go"
    kernel_name = "bai-compiled-test-go"
    language_name = "go"
    file_extension = ".go"
    code_hello_world = 'fmt.Println("hello, world")'
    code_stderr = 'fmt.Fprintln(os.Stderr, "error")'
    code_generate_error = "x := undefinedName"
    completion_samples: ClassVar[list[dict[str, Any]]] = [{"text": "fmt.Printl", "matches": {"Println"}}]
    complete_code_samples = ['fmt.Println("hi")', "func f() int { return 1 }"]
    incomplete_code_samples = ["func f() {", "fmt.Println(1,"]


class TestRustConformance(_CompiledKernelTests):
    __test__ = True
    lang = "rust"
    kernel_name = "bai-compiled-test-rust"
    language_name = "rust"
    file_extension = ".rs"
    code_hello_world = 'println!("hello, world");'
    code_stderr = 'eprintln!("error");'
    code_generate_error = "let x = undefined_name;"
    completion_samples: ClassVar[list[dict[str, Any]]] = [{"text": "eprintl", "matches": {"eprintln"}}]
    complete_code_samples = ['println!("hi");', "fn f<'a>(x: &'a str) -> &'a str { x }"]
    incomplete_code_samples = ["fn f() {", "let v = vec![1,"]


class TestJavaConformance(_CompiledKernelTests):
    __test__ = True
    lang = "java"
    kernel_name = "bai-compiled-test-java"
    language_name = "java"
    file_extension = ".java"
    code_hello_world = 'System.out.println("hello, world");'
    code_stderr = 'System.err.println("error");'
    code_generate_error = "int x = undefinedName;"
    completion_samples: ClassVar[list[dict[str, Any]]] = [
        {"text": "System.out.printl", "matches": {"println"}}
    ]
    complete_code_samples = ['System.out.println("hi");', "int f() { return 1; }"]
    incomplete_code_samples = ["int f() {", 'String s = """', "System.out.println(1,"]
