"""Installing our kernelspecs into Jupyter's kernelspec path."""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from importlib import resources
from pathlib import Path

from jupyter_client.kernelspec import KernelSpecManager


def templates() -> dict[str, Path]:
    """Kernelspec name → template directory."""
    root = resources.files("backendai_jupyter.kernelspecs")
    return {p.name: Path(str(p)) for p in root.iterdir() if p.is_dir() and (p / "kernel.json").is_file()}


def install(*, user: bool = False, prefix: str | None = None, names: list[str] | None = None) -> list[str]:
    """Write the kernelspecs, with this interpreter in ``argv``; returns the paths."""
    ksm = KernelSpecManager()
    done = []
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
