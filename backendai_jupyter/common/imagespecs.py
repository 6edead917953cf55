"""Kernelspecs made from what kernel images say about themselves.

Each kernel image carries a JSON label, ``io.backendai-jupyter.kernel``::

    {"language": "r", "display_name": "R", "argv": ["R", "--slave", "-f", "{connection_file}"],
     "interrupt_mode": "signal", "resources": {"cpu": "1", "mem": "1g"},
     "accelerators": ["cuda"], "name": "r"}

and, when its folder under ``kernels/`` has a ``logo-64x64.png``, that logo base64-encoded in
``io.backendai-jupyter.logo`` (``images build`` adds it). The agent reports both with its
images; from them the gateway offers its Kernel Gateway kernelspecs and ``kernelspecs install``
writes local ones. A new language is a new folder under ``kernels/`` and nothing else.

One kernelspec per image *repository* (``backendai-jupyter/r``), whatever its tags: the
content-hash tags ``images build`` adds name the same image and never become cards of their own.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass, field
from typing import Any

KERNEL_LABEL = "io.backendai-jupyter.kernel"
LOGO_LABEL = "io.backendai-jupyter.logo"
SPEC_PREFIX = "backendai-"
_HASH_TAG = re.compile(r"^[0-9a-f]{12,64}$")
_NAME_RE = re.compile(r"[^a-z0-9]+")
INTERRUPT_MODES = ("signal", "message")
MAX_LOGO_BYTES = 64 * 1024


@dataclass
class ImageKernel:
    """What one image says about its kernel, checked."""

    image: str  # the reference to start it by: the repository's :latest, else its newest tag
    name: str  # kernelspec name without the prefix, e.g. "r", "python3"
    display_name: str
    language: str
    interrupt_mode: str = "signal"
    resources: dict[str, str] = field(default_factory=dict)
    accelerators: list[str] = field(default_factory=list)
    logo: bytes = b""  # a 64x64 PNG, or nothing

    @property
    def spec_name(self) -> str:
        return SPEC_PREFIX + self.name


def repository_of(tag: str) -> str:
    """``backendai-jupyter/r:abc`` → ``backendai-jupyter/r`` (a registry's port stays)."""
    last = tag.rsplit("/", 1)[-1]
    return tag[: len(tag) - len(last)] + last.split(":", 1)[0]


def best_tag(tags: list[str]) -> str | None:
    """The tag a kernelspec should name: ``:latest``, else a tag that is not a content hash."""
    for t in tags:
        if t.endswith(":latest"):
            return t
    named = [t for t in tags if not _HASH_TAG.match(t.rsplit(":", 1)[-1])]
    choices = named or tags
    return choices[0] if choices else None


def decode_logo(raw: str | None) -> bytes:
    """A logo label's PNG bytes; nothing when it is missing, malformed, too big or not a PNG."""
    if not raw:
        return b""
    try:
        data = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        return b""
    if len(data) > MAX_LOGO_BYTES or not data.startswith(b"\x89PNG\r\n\x1a\n"):
        return b""
    return data


def image_kernel(tags: list[str], label: dict[str, Any], logo: str | None = None) -> ImageKernel | None:
    """The kernel an image offers, or None when its label does not describe a usable one."""
    tag = best_tag(tags)
    if tag is None or not isinstance(label, dict):
        return None
    argv = label.get("argv")
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
        return None
    repo = repository_of(tag)
    name = label.get("name") if isinstance(label.get("name"), str) else repo.rsplit("/", 1)[-1]
    name = _NAME_RE.sub("-", str(name).lower()).strip("-")
    if not name:
        return None
    mode = label.get("interrupt_mode", "signal")
    resources = label.get("resources")
    resources = resources if isinstance(resources, dict) else {}
    accelerators = label.get("accelerators")
    accelerators = accelerators if isinstance(accelerators, list) else []
    return ImageKernel(
        image=tag,
        name=name,
        display_name=str(label.get("display_name") or name),
        language=str(label.get("language") or ""),
        interrupt_mode=mode if mode in INTERRUPT_MODES else "signal",
        resources={str(k): str(v) for k, v in resources.items()},
        accelerators=[str(a) for a in accelerators],
        logo=decode_logo(logo),
    )


def one_per_repository(kernels: list[ImageKernel]) -> dict[str, ImageKernel]:
    """Kernelspec name → kernel, one per image repository (its ``:latest`` where there is one)."""
    out: dict[str, ImageKernel] = {}
    for k in sorted(kernels, key=lambda k: (not k.image.endswith(":latest"), k.image)):
        out.setdefault(k.spec_name, k)
    return out


def kernelspec_json(k: ImageKernel, argv: list[str], resources: dict[str, str]) -> dict[str, Any]:
    """The kernel.json of a kernelspec that starts ``k`` through our provisioner."""
    return {
        "display_name": k.display_name,
        "language": k.language,
        "argv": argv,
        "interrupt_mode": k.interrupt_mode,
        "metadata": {
            "debugger": False,
            "kernel_provisioner": {
                "provisioner_name": "backendai-provisioner",
                "config": {"image": k.image, "resources": resources},
            },
        },
    }
