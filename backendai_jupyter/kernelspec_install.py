"""Installing our kernelspecs into Jupyter's kernelspec path."""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from importlib import resources
from pathlib import Path

from jupyter_client.kernelspec import KernelSpecManager

from .common.imagespecs import (
    KERNEL_LABEL,
    LOGO_LABEL,
    ImageKernel,
    image_kernel,
    kernelspec_json,
    one_per_repository,
    repository_of,
)

DEFAULT_RESOURCES = {"cpu": "1", "mem": "1g"}  # what an image kernelspec asks for unless its label says


def templates() -> dict[str, Path]:
    """Kernelspec name → template directory."""
    root = resources.files("backendai_jupyter.kernelspecs")
    return {p.name: Path(str(p)) for p in root.iterdir() if p.is_dir() and (p / "kernel.json").is_file()}


def local_image_kernels() -> list[ImageKernel]:
    """The kernels the local Docker engine's images offer (none when there is no engine)."""
    try:
        import docker

        client = docker.from_env()
        images = client.images.list(filters={"label": KERNEL_LABEL})
    except Exception:  # no engine here: Jupyter may well run elsewhere than the agents
        return []
    found = []
    for img in images:
        try:
            label = json.loads(img.labels.get(KERNEL_LABEL, "{}"))
        except ValueError:
            continue
        k = image_kernel(list(img.tags), label, img.labels.get(LOGO_LABEL))
        if k is not None:
            found.append(k)
    return found


def _template_images() -> set[str]:
    """The image repositories the shipped templates start already."""
    out = set()
    for src in templates().values():
        spec = json.loads((src / "kernel.json").read_text())
        image = spec.get("metadata", {}).get("kernel_provisioner", {}).get("config", {}).get("image")
        if isinstance(image, str):
            out.add(repository_of(image))
    return out


def _write_image_spec(dst: Path, name: str, k: ImageKernel) -> None:
    argv = [sys.executable, "-m", "backendai_jupyter.provisioner.launcher", "-f", "{connection_file}"]
    spec = kernelspec_json(k, [*argv, "--kernel", name], {**DEFAULT_RESOURCES, **k.resources})
    dst.mkdir(parents=True)
    (dst / "kernel.json").write_text(json.dumps(spec, indent=2))
    if k.logo:
        (dst / "logo-64x64.png").write_bytes(k.logo)


def install(
    *,
    user: bool = False,
    prefix: str | None = None,
    names: list[str] | None = None,
    image_kernels: list[ImageKernel] | None = None,
) -> list[str]:
    """Write the kernelspecs, with this interpreter in ``argv``; returns the paths.

    Besides the shipped templates (Python, CPU and GPU), one kernelspec per kernel image the
    local Docker engine has (``image_kernels`` overrides that list), made from its labels.
    """
    ksm = KernelSpecManager()
    done = []
    covered = _template_images()
    kernels = local_image_kernels() if image_kernels is None else image_kernels
    for name, k in sorted(one_per_repository(kernels).items()):
        if (names and name not in names) or name in templates() or repository_of(k.image) in covered:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            dst = Path(tmp) / name
            _write_image_spec(dst, name, k)
            done.append(ksm.install_kernel_spec(str(dst), name, user=user, prefix=prefix))
    for name, src in sorted(templates().items()):
        if names and name not in names:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            dst = Path(tmp) / name
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
            spec = json.loads((dst / "kernel.json").read_text())
            spec["argv"] = [
                a.replace("{python}", sys.executable).replace("{kernel_name}", name) for a in spec["argv"]
            ]
            (dst / "kernel.json").write_text(json.dumps(spec, indent=2))
            done.append(ksm.install_kernel_spec(str(dst), name, user=user, prefix=prefix))
    return done
