"""Kernelspecs for the language images, written for a test session onto JUPYTER_PATH.

Each spec is what a user would install for that image: the Backend.AI provisioner with the
image and resources in its config, the launcher as ``argv`` (as in kernelspecs/), and the
language, display name and interrupt mode the image's kernel label declares.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import docker

from backendai_jupyter.images import KERNEL_LABEL, image_repository

# The images under kernels/ that run a kernel.
LANGUAGE_IMAGES = ("python", "r", "bash", "deno", "octave", "c", "cpp", "go", "rust", "java")
RESOURCES = {"cpu": "1", "mem": "1g"}


def launcher_argv(kernel_name: str, python: str = sys.executable) -> list[str]:
    """A kernelspec's argv that starts it through our launcher, as kernelspecs/ do."""
    return [
        python,
        "-m",
        "backendai_jupyter.provisioner.launcher",
        "-f",
        "{connection_file}",
        "--kernel",
        kernel_name,
    ]


def spec_name(image: str) -> str:
    return f"backendai-test-{image}"


def image_label(client: docker.DockerClient, image: str) -> dict[str, Any]:
    """The kernel label of ``backendai-jupyter/<image>:latest``."""
    return json.loads(client.images.get(f"{image_repository(image)}:latest").labels[KERNEL_LABEL])


def write_kernelspecs(client: docker.DockerClient, root: Path) -> dict[str, str]:
    """Write one kernelspec per language image under ``root/kernels``; image -> spec name."""
    names = {}
    for image in LANGUAGE_IMAGES:
        label = image_label(client, image)
        name = spec_name(image)
        spec = {
            "display_name": f"{label['display_name']} (Backend.AI test)",
            "language": label["language"],
            "argv": launcher_argv(name),
            "interrupt_mode": label.get("interrupt_mode", "signal"),
            "metadata": {
                "debugger": False,
                "kernel_provisioner": {
                    "provisioner_name": "backendai-provisioner",
                    "config": {
                        "image": f"{image_repository(image)}:latest",
                        "resources": RESOURCES,
                    },
                },
            },
        }
        d = root / "kernels" / name
        d.mkdir(parents=True, exist_ok=True)
        (d / "kernel.json").write_text(json.dumps(spec, indent=2))
        names[image] = name
    return names
