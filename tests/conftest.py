"""Fixtures that run the real system: Docker engine, gateway, agent, kernelspecs."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest
from jupyter_client.manager import KernelManager
from selenium import webdriver

from .stack import Stack, aid, port_span, remove_containers, start_up

SPEC = "backendai-python3"


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
    s = start_up(tmp, aid("test-up"), port_span("31000-31499"))
    old = os.environ.get("BACKENDAI_CLIENT_CONFIG")
    os.environ["BACKENDAI_CLIENT_CONFIG"] = str(s.client_config)
    try:
        yield s
    finally:
        if old is None:
            os.environ.pop("BACKENDAI_CLIENT_CONFIG", None)
        else:
            os.environ["BACKENDAI_CLIENT_CONFIG"] = old
        code = s.stop()
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
        src["argv"] = [
            "python",
            "-m",
            "backendai_jupyter.provisioner.launcher",
            "-f",
            "{connection_file}",
            "--kernel",
            name,
        ]
        d = tmp_path / "kernels" / name
        d.mkdir(parents=True)
        (d / "kernel.json").write_text(json.dumps(src))
        return name

    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path))
    return make


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
