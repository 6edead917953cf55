"""Fixtures that run the real system: Docker engine, gateway, agent, kernelspecs."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import io
import json
import os
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import docker
import pytest
import pytest_asyncio
from jupyter_client.manager import KernelManager
from selenium import webdriver

from . import databases
from .language_kernels import LANGUAGE_IMAGES, launcher_argv, write_kernelspecs
from .stack import Stack, aid, port_span, remove_containers, start_up

SPEC = "backendai-python3"


@contextlib.contextmanager
def environ(**values: str) -> Iterator[None]:
    """Set environment variables for a fixture's lifetime (longer than a test's monkeypatch)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def pytest_sessionstart(session: pytest.Session) -> None:
    problem = databases.check_server_url()
    if problem:
        raise pytest.UsageError(problem)


@pytest.fixture(scope="session")
def _databases_in_use() -> Iterator[list[str]]:
    """Databases whose tests ended while something still used them: dropped at the end."""
    left: list[str] = []
    yield left
    for url in left:
        databases.drop(url, force=True)


@pytest.fixture(autouse=True)
def test_database(_databases_in_use: list[str], monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """With BAI_TEST_POSTGRES: a fresh PostgreSQL database for the gateways this test starts."""
    if not databases.server_url():
        yield ""
        return
    url = databases.create()
    monkeypatch.setenv("BACKENDAI_DB_URL", url)
    yield url
    if not databases.drop(url):
        _databases_in_use.append(url)


@pytest.fixture(scope="session")
def docker_engine() -> docker.DockerClient:
    client = docker.from_env()
    client.ping()
    assert client.images.list(name="backendai-jupyter/python"), "run `make setup` to build the kernel images"
    return client


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory, docker_engine: docker.DockerClient) -> Iterator[Stack]:
    """One `backendai-jupyter up` for the test session; its client config is what clients use."""
    tmp = tmp_path_factory.mktemp("up")
    # Its own database (with BAI_TEST_POSTGRES), not that of the test that happens to start it.
    db_url = databases.create() if databases.server_url() else ""
    s = start_up(tmp, aid("test-up"), port_span("31000-31499"), db_url=db_url)
    try:
        with environ(BACKENDAI_CLIENT_CONFIG=str(s.client_config)):
            yield s
    finally:
        code = s.stop()
        if db_url:
            databases.drop(db_url, force=True)
        leftovers = remove_containers(s.agent_id)
        assert code == 0, s.log.read_text()[-3000:]
        assert leftovers == 0, "`backendai-jupyter up` left kernel containers behind"


@pytest.fixture
def km(stack: Stack) -> Iterator[KernelManager]:
    """A stock KernelManager with a started kernel on our kernelspec."""
    manager = KernelManager(kernel_name=SPEC)
    manager.start_kernel()
    try:
        yield manager
    finally:
        if manager.has_kernel:
            manager.shutdown_kernel(now=True)


@pytest.fixture
def extra_kernelspecs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Write throwaway kernelspecs (same provisioner, other config) onto JUPYTER_PATH."""

    def make(name: str, **config: object) -> str:
        src = json.loads((Path(__file__).parent.parent / "kernelspecs" / SPEC / "kernel.json").read_text())
        src["metadata"]["kernel_provisioner"]["config"].update(config)
        src["argv"] = launcher_argv(name, "python")
        d = tmp_path / "kernels" / name
        d.mkdir(parents=True)
        (d / "kernel.json").write_text(json.dumps(src))
        return name

    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path))
    return make


@pytest.fixture(scope="session")
def language_kernelspecs(
    tmp_path_factory: pytest.TempPathFactory, stack: Stack, docker_engine: docker.DockerClient
) -> Iterator[dict[str, str]]:
    """Kernelspecs for every language image (image name -> kernelspec name) on JUPYTER_PATH."""
    missing = [
        name for name in LANGUAGE_IMAGES if not docker_engine.images.list(name=f"backendai-jupyter/{name}")
    ]
    assert not missing, (
        f"build the kernel images first: python -m backendai_jupyter.images {' '.join(missing)}"
    )
    root = tmp_path_factory.mktemp("jupyter-path")
    names = write_kernelspecs(docker_engine, root)
    old = os.environ.get("JUPYTER_PATH")
    with environ(JUPYTER_PATH=os.pathsep.join([str(root), *([old] if old else [])])):
        yield names


@pytest.fixture
def browser():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, (
        "Chromium is needed for the browser test: `make setup` installs it (apt-get install chromium)"
    )
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1400,900",
    ):
        options.add_argument(arg)
    service = webdriver.ChromeService(executable_path=shutil.which("chromedriver"))
    driver = webdriver.Chrome(options=options, service=service)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(autouse=True)
def _stray_tasks_end(request: pytest.FixtureRequest) -> Iterator[None]:
    """For coroutine tests: :func:`_tasks_left_end` (sync tests run no loop of pytest-asyncio's)."""
    if inspect.iscoroutinefunction(getattr(request.node, "function", None)):
        request.getfixturevalue("_tasks_left_end")
    yield


@pytest_asyncio.fixture(loop_scope="function")
async def _tasks_left_end() -> AsyncIterator[None]:
    """After each test, tasks it left behind must end when cancelled.

    pytest-asyncio cancels what is left when it closes the test's event loop and waits for all of
    it: one task that ignores its cancellation would hold the whole run there, silently. Here it is
    a failure of the test that left it, with the task's stack.
    """
    yield
    me = asyncio.current_task()
    left = [t for t in asyncio.all_tasks() if t is not me and not t.done()]
    for t in left:
        t.cancel()
    if left:
        _, pending = await asyncio.wait(left, timeout=10)
        if pending:
            out = io.StringIO()
            for t in pending:
                t.print_stack(file=out)
            pytest.fail(f"{len(pending)} task(s) ignore cancellation:\n{out.getvalue()}")
