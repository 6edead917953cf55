"""Build the kernel images from ``kernels/<name>/`` with content-hash caching.

Each image is tagged ``backendai-jupyter/<name>:<hash[:12]>`` and
``backendai-jupyter/<name>:latest``, where the hash covers every file of the
build context, the build arguments and the ID of the parent image. A build
is skipped when an image with that tag already exists, so running this again
after an unrelated change costs about a second.

Run as ``python -m backendai_jupyter.images [--base-image REF] [--force] [NAME ...]``.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import docker
import docker.errors
from docker.models.images import Image

REPOSITORY_PREFIX = "backendai-jupyter"
BOOTSTRAP_IMAGE = "backendai-jupyter/bootstrap:bookworm"
REGISTRY_BASE = "debian:bookworm-slim"
PULL_TIMEOUT = 20.0  # seconds a registry has to answer before Debian is bootstrapped locally
BASE_IMAGE_ENV = "BACKENDAI_BASE_IMAGE"
CONTEXT_HASH_LABEL = "io.backendai-jupyter.context-hash"
KERNEL_LABEL = "io.backendai-jupyter.kernel"
LOGO_LABEL = "io.backendai-jupyter.logo"

# Bump when the way the cache key is computed changes, so that old images are
# not mistaken for up to date.
_CACHE_KEY_VERSION = "2"  # 2: images carry their logo label
# How many log lines an ImageBuildError carries.
_ERROR_TAIL_LINES = 30

Progress = Callable[[str], None]


class ImageBuildError(RuntimeError):
    """A kernel image could not be built."""


class DockerUnavailableError(RuntimeError):
    """The Docker engine does not answer."""


@dataclass(frozen=True)
class ImageSpec:
    """One buildable image: its name, context directory and parent image."""

    name: str
    # Directory under kernels/ holding the Dockerfile.
    context: str
    # Name of the image in IMAGES this one builds FROM (passed as the
    # BASE_IMAGE build arg); None means an external base image.
    parent: str | None


_PARENT_RE = re.compile(
    rf"^\s*ARG\s+BASE_IMAGE\s*=\s*{re.escape(REPOSITORY_PREFIX)}/([a-z0-9][a-z0-9_.-]*)(?::\S+)?\s*$",
    re.MULTILINE,
)


def default_kernels_dir() -> Path:
    """Return the ``kernels/`` directory next to the package in the source tree."""
    return Path(__file__).resolve().parent.parent / "kernels"


def discover(kernels_dir: Path) -> dict[str, ImageSpec]:
    """Every folder of ``kernels_dir`` with a Dockerfile is an image, in dependency order.

    An image's parent is the one its ``ARG BASE_IMAGE=backendai-jupyter/<parent>:latest`` names;
    any other default (``debian:bookworm-slim``) makes it a root, built from the external base.
    """
    found: dict[str, ImageSpec] = {}
    if not kernels_dir.is_dir():
        return found
    for d in sorted(kernels_dir.iterdir()):
        dockerfile = d / "Dockerfile"
        if not dockerfile.is_file():
            continue
        m = _PARENT_RE.search(dockerfile.read_text())
        found[d.name] = ImageSpec(d.name, d.name, m.group(1) if m else None)
    ordered: dict[str, ImageSpec] = {}

    def visit(name: str, path: tuple[str, ...]) -> None:
        if name in ordered:
            return
        if name in path:
            raise ImageBuildError(f"kernel images build from each other in a loop: {' -> '.join(path)}")
        spec = found[name]
        if spec.parent is not None:
            if spec.parent not in found:
                raise ImageBuildError(f"{name}: its BASE_IMAGE {spec.parent} has no folder in {kernels_dir}")
            visit(spec.parent, (*path, name))
        ordered[name] = spec

    for name in found:
        visit(name, ())
    return ordered


# Dependency order: a parent comes before its children.
IMAGES: dict[str, ImageSpec] = discover(default_kernels_dir())


def image_repository(name: str) -> str:
    """Return the repository name of image *name*, e.g. ``backendai-jupyter/python``."""
    return f"{REPOSITORY_PREFIX}/{name}"


def get_client() -> docker.DockerClient:
    """Return a Docker client, or raise DockerUnavailableError with what to do."""
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    try:
        # from_env() already talks to the engine to negotiate the API
        # version; ping() covers clients configured with a fixed version.
        client = docker.from_env()
        client.ping()
    # requests' connection errors (raised through the SDK) are OSErrors.
    except (docker.errors.DockerException, OSError) as exc:
        raise DockerUnavailableError(
            f"Docker engine not reachable at {host} — start it "
            "(scripts/ensure-docker.sh as root, or `sudo systemctl start docker`)"
            f"\n  cause: {exc}"
        ) from exc
    return client


def context_hash(context: Path, build_args: dict[str, str]) -> str:
    """Return the sha256 cache key over the context's files and the build args."""
    digest = hashlib.sha256()
    digest.update(f"backendai-jupyter-image-cache/{_CACHE_KEY_VERSION}\0".encode())
    files = sorted(path.relative_to(context).as_posix() for path in context.rglob("*") if path.is_file())
    for rel in files:
        data = (context / rel).read_bytes()
        # Lengths and separators keep (name, content) pairs unambiguous.
        digest.update(rel.encode() + b"\0")
        digest.update(len(data).to_bytes(8, "big"))
        digest.update(data)
    digest.update(json.dumps(build_args, sort_keys=True).encode())
    return digest.hexdigest()


def logo_label(context: Path) -> dict[str, str]:
    """The image's logo label, from ``logo-64x64.png`` in its folder (none without one)."""
    logo = context / "logo-64x64.png"
    return {LOGO_LABEL: base64.b64encode(logo.read_bytes()).decode()} if logo.is_file() else {}


def _resolve_order(names: Iterable[str] | None, images: dict[str, ImageSpec]) -> list[ImageSpec]:
    """Return the specs for *names* plus their parents, in build order."""
    if names is None:
        return list(images.values())
    wanted: set[str] = set()
    for name in names:
        if name not in images:
            raise ImageBuildError(f"unknown image {name!r}; known images: {', '.join(images)}")
        # Building a child needs its parents' current tags, so pull them in.
        current: str | None = name
        while current is not None and current not in wanted:
            wanted.add(current)
            current = images[current].parent
    return [spec for spec in images.values() if spec.name in wanted]


def _image_or_none(client: docker.DockerClient, ref: str) -> Image | None:
    try:
        return client.images.get(ref)
    except docker.errors.ImageNotFound:
        return None


def _run_bootstrap(kernels_dir: Path, progress: Progress) -> None:
    script = kernels_dir / "base" / "bootstrap.sh"
    progress(f"base: {BOOTSTRAP_IMAGE} missing, creating it with {script}")
    tail: deque[str] = deque(maxlen=_ERROR_TAIL_LINES)
    with subprocess.Popen(
        ["bash", str(script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            progress(line)
    if proc.returncode != 0:
        raise ImageBuildError(
            f"{script} failed (exit {proc.returncode}); pass --base-image or set "
            f"{BASE_IMAGE_ENV} to use an existing Debian-based image instead.\n" + "\n".join(tail)
        )


def _external_base(
    client: docker.DockerClient,
    base_image: str | None,
    kernels_dir: Path,
    progress: Progress,
) -> tuple[str, Image]:
    """Return (ref, image) of the image the base image builds FROM."""
    ref = base_image or os.environ.get(BASE_IMAGE_ENV) or None
    if ref is None:
        # Without an explicit base: a bootstrapped image made before, else the official
        # image when a registry answers quickly, else bootstrap one locally.
        ref = BOOTSTRAP_IMAGE
        image = _image_or_none(client, ref)
        if image is None:
            official = _official_base(client, progress)
            if official is not None:
                return REGISTRY_BASE, official
        if image is None:
            _run_bootstrap(kernels_dir, progress)
            image = _image_or_none(client, ref)
            if image is None:
                raise ImageBuildError(f"bootstrap finished but {ref} does not exist")
        return ref, image
    image = _image_or_none(client, ref)
    if image is None:
        # The cache key needs the parent's image ID, so fetch it up front
        # instead of letting the build pull it.
        progress(f"base: pulling {ref}")
        try:
            image = client.images.pull(ref)
        except docker.errors.APIError as exc:
            raise ImageBuildError(
                f"base image {ref} is not available locally and could not be pulled: {exc.explanation or exc}"
            ) from exc
    return ref, image


def _official_base(client: docker.DockerClient, progress: Progress) -> Image | None:
    """``debian:bookworm-slim``, when it is here or a registry gives it within a short while."""
    image = _image_or_none(client, REGISTRY_BASE)
    if image is not None:
        return image
    progress(f"base: trying to pull {REGISTRY_BASE} (at most {PULL_TIMEOUT:.0f} s)")
    usual = client.api.timeout
    client.api.timeout = PULL_TIMEOUT
    try:
        client.api.pull(REGISTRY_BASE)
        return client.images.get(REGISTRY_BASE)
    except (docker.errors.DockerException, OSError) as exc:
        reason = (str(exc).splitlines() or [type(exc).__name__])[0][:160]
        progress(f"base: no registry ({reason}); bootstrapping Debian locally")
        return None
    finally:
        client.api.timeout = usual


def _stream_build(
    client: docker.DockerClient,
    spec: ImageSpec,
    context: Path,
    tag: str,
    build_args: dict[str, str],
    key: str,
    progress: Progress,
    nocache: bool,
) -> str:
    """Run one build, streaming its log to *progress*; return the image ID."""
    tail: deque[str] = deque(maxlen=_ERROR_TAIL_LINES)
    image_id: str | None = None
    try:
        stream = client.api.build(
            path=str(context),
            tag=tag,
            buildargs=build_args,
            labels={CONTEXT_HASH_LABEL: key, **logo_label(context)},
            rm=True,
            forcerm=True,
            nocache=nocache,
            decode=True,
            # No timeout: a silent step (e.g. compiling a wheel) may take
            # minutes, and the SDK's default would abort the stream at 60 s.
            timeout=None,
        )
        for chunk in stream:
            if "error" in chunk or "errorDetail" in chunk:
                detail = chunk.get("errorDetail") or {}
                message = chunk.get("error") or detail.get("message") or str(chunk)
                raise ImageBuildError(
                    f"{spec.name}: build failed: {message.strip()}\nlast log lines:\n" + "\n".join(tail)
                )
            if "aux" in chunk and isinstance(chunk["aux"], dict):
                image_id = chunk["aux"].get("ID", image_id)
            text = chunk.get("stream") or chunk.get("status")
            if not text:
                continue
            for line in text.splitlines():
                if line.strip():
                    tail.append(line)
                    progress(f"{spec.name} | {line}")
    except (docker.errors.APIError, OSError) as exc:
        raise ImageBuildError(
            f"{spec.name}: build failed: {exc}\nlast log lines:\n" + "\n".join(tail)
        ) from exc
    if image_id is None:
        # Older engines do not send the aux ID message; look the tag up.
        image_id = client.images.get(tag).id
    return image_id


def build_images(
    names: Iterable[str] | None = None,
    *,
    base_image: str | None = None,
    kernels_dir: str | os.PathLike[str] | None = None,
    progress: Progress = print,
    force: bool = False,
) -> dict[str, str]:
    """Build the named images (default: all) and their parents; return name -> tag."""
    kdir = Path(kernels_dir) if kernels_dir is not None else default_kernels_dir()
    if not kdir.is_dir():
        raise ImageBuildError(f"kernels directory not found at {kdir}; pass kernels_dir explicitly")
    specs = _resolve_order(names, discover(kdir))
    client = get_client()

    built: dict[str, str] = {}
    for spec in specs:
        context = kdir / spec.context
        if not (context / "Dockerfile").is_file():
            raise ImageBuildError(f"{spec.name}: no Dockerfile in {context}")

        if spec.parent is None:
            parent_ref, parent = _external_base(client, base_image, kdir, progress)
        else:
            parent_ref = built[spec.parent]
            parent = client.images.get(parent_ref)
        build_args = {"BASE_IMAGE": parent_ref}
        # The parent's ID (not just its name) goes into the key: re-bootstrapping
        # or rebuilding the parent must rebuild the children.
        key = context_hash(context, {**build_args, "parent_id": parent.id})

        repository = image_repository(spec.name)
        tag = f"{repository}:{key[:12]}"
        existing = _image_or_none(client, tag)
        if existing is not None and not force and existing.labels.get(CONTEXT_HASH_LABEL) == key:
            progress(f"{spec.name}: up to date ({tag})")
            image_id = existing.id
        else:
            progress(f"{spec.name}: building {tag} from {context} (FROM {parent_ref})")
            started = time.monotonic()
            image_id = _stream_build(client, spec, context, tag, build_args, key, progress, nocache=force)
            progress(f"{spec.name}: built {tag} in {time.monotonic() - started:.0f} s")
        # Re-point :latest even when up to date: it may have been moved to
        # another build (e.g. one made from a different base image).
        client.api.tag(image_id, repository, "latest")
        built[spec.name] = tag
    return built


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: build the kernel images."""
    parser = argparse.ArgumentParser(
        prog="python -m backendai_jupyter.images",
        description="Build the kernel images (skipping those already up to date).",
    )
    parser.add_argument(
        "names",
        nargs="*",
        metavar="NAME",
        help=f"images to build, parents included (default: all of {', '.join(IMAGES)})",
    )
    parser.add_argument(
        "--base-image",
        help=f"Debian-based image to build the base image FROM (default: ${BASE_IMAGE_ENV}, "
        f"else {BOOTSTRAP_IMAGE}, bootstrapped locally if missing)",
    )
    parser.add_argument(
        "--kernels-dir",
        help="directory holding the image contexts (default: kernels/ beside the package)",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="rebuild even if up to date, without layer cache",
    )
    args = parser.parse_args(argv)
    try:
        tags = build_images(
            args.names or None,
            base_image=args.base_image,
            kernels_dir=args.kernels_dir,
            force=args.force,
        )
    except (ImageBuildError, DockerUnavailableError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for name, tag in tags.items():
        print(f"{name}: {tag}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
