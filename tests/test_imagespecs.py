"""Kernelspecs come from what images say about themselves: one card per language and size."""

from __future__ import annotations

import base64
import struct
import zlib
from pathlib import Path

import pytest

from backendai_jupyter.common.imagespecs import best_tag, decode_logo, image_kernel, one_per_repository
from backendai_jupyter.images import ImageBuildError, discover, logo_label

from .inproc import IMAGE, KERNEL_LABEL, FakeAgent, running_gateway


def png() -> bytes:
    """A plain 64x64 PNG, written by hand (no imaging library needed)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\0" + bytes((20, 120, 200)) * 64 for _ in range(64))
    header = struct.pack(">IIBBBBB", 64, 64, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


R_LABEL = {
    "language": "R",
    "display_name": "R",
    "argv": ["/usr/bin/R", "--slave", "-e", "IRkernel::main()", "--args", "{connection_file}"],
    "interrupt_mode": "signal",
    "resources": {"mem": "2g"},
}
DENO_LABEL = {
    "language": "typescript",
    "display_name": "Deno",
    "argv": ["/opt/deno", "jupyter", "--kernel", "--conn", "{connection_file}"],
    "interrupt_mode": "message",
}


def test_the_tag_a_card_names_is_latest_never_a_content_hash():
    assert (
        best_tag(["backendai-jupyter/r:3f2a9c1b7d4e", "backendai-jupyter/r:latest"])
        == "backendai-jupyter/r:latest"
    )
    assert (
        best_tag(["backendai-jupyter/r:3f2a9c1b7d4e", "backendai-jupyter/r:4.2"]) == "backendai-jupyter/r:4.2"
    )
    kernels = [
        image_kernel(["backendai-jupyter/r:3f2a9c1b7d4e"], R_LABEL),
        image_kernel(["backendai-jupyter/r:latest", "backendai-jupyter/r:aaaaaaaaaaaa"], R_LABEL),
    ]
    found = one_per_repository([k for k in kernels if k is not None])
    assert list(found) == ["backendai-r"] and found["backendai-r"].image == "backendai-jupyter/r:latest"


@pytest.mark.parametrize(
    "label",
    [{}, {"argv": []}, {"argv": "R"}, {"argv": [1, 2]}, "not a dict"],
)
def test_a_label_that_describes_no_kernel_makes_no_card(label):
    assert image_kernel(["backendai-jupyter/x:latest"], label) is None  # type: ignore[arg-type]


def test_only_a_small_png_is_taken_as_a_logo():
    good = png()
    assert decode_logo(base64.b64encode(good).decode()) == good
    assert decode_logo(base64.b64encode(b"<svg/>").decode()) == b""
    assert decode_logo("not base64 !") == b""
    assert decode_logo(base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"0" * 70_000).decode()) == b""


def test_images_are_found_from_their_folders_parents_first(tmp_path: Path):
    for name, base in [
        ("base", "debian:bookworm-slim"),
        ("zeta", "backendai-jupyter/mid:latest"),
        ("mid", "backendai-jupyter/base:latest"),
    ]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "Dockerfile").write_text(f"ARG BASE_IMAGE={base}\nFROM ${{BASE_IMAGE}}\n")
    (tmp_path / "not-an-image").mkdir()
    found = discover(tmp_path)
    assert list(found) == ["base", "mid", "zeta"]
    assert (found["base"].parent, found["mid"].parent, found["zeta"].parent) == (None, "base", "mid")
    (tmp_path / "zeta" / "logo-64x64.png").write_bytes(png())
    assert base64.b64decode(logo_label(tmp_path / "zeta")["io.backendai-jupyter.logo"]) == png()
    assert logo_label(tmp_path / "mid") == {}
    (tmp_path / "orphan").mkdir()
    (tmp_path / "orphan" / "Dockerfile").write_text("ARG BASE_IMAGE=backendai-jupyter/missing:latest\n")
    with pytest.raises(ImageBuildError, match="missing"):
        discover(tmp_path)


async def test_the_gateway_offers_one_card_per_image_repository_with_its_logo_and_interrupt_mode(
    tmp_path: Path,
):
    # Repository names no installed kernelspec uses, so that what this machine has installed
    # (kernelspecs of its own images) does not get in the way.
    async with running_gateway(tmp_path) as g:
        ann = await g.user("ann")
        agent = FakeAgent(g.url, "host-a", join_token=g.join_token)
        logo = base64.b64encode(png()).decode()
        agent.images = [
            (IMAGE, KERNEL_LABEL),
            ("backendai-jupyter/python:0123456789ab", KERNEL_LABEL),
            ("backendai-jupyter/zz-r:latest", R_LABEL),
            ("backendai-jupyter/zz-r:abcdefabcdef", R_LABEL),
            ("backendai-jupyter/zz-deno:latest", DENO_LABEL),
            ("backendai-jupyter/zz-broken:latest", {"display_name": "no argv"}),
        ]
        agent.logos = {"backendai-jupyter/zz-r:latest": logo}
        await agent.connect()
        specs = (await ann("GET", "/api/kernelspecs", auth="token"))["kernelspecs"]
        assert {n for n in specs if n.startswith("backendai-zz")} == {"backendai-zz-r", "backendai-zz-deno"}
        # Python is the installed presets' (one card per size): its image makes no card of its own.
        assert not [n for n in specs if "python" in n and not n.startswith("backendai-python3")]
        assert not any(c.isdigit() for n in specs for c in n.replace("python3", ""))
        r = specs["backendai-zz-r"]["spec"]
        assert r["display_name"] == "R" and r["language"] == "R" and r["interrupt_mode"] == "signal"
        config = r["metadata"]["kernel_provisioner"]["config"]
        assert config == {"image": "backendai-jupyter/zz-r:latest", "resources": {"cpu": "1", "mem": "2g"}}
        assert specs["backendai-zz-deno"]["spec"]["interrupt_mode"] == "message"
        logo_url = "/kernelspecs/backendai-zz-r/logo-64x64.png"
        assert specs["backendai-zz-r"]["resources"] == {"logo-64x64": logo_url}
        served = await ann.fetch("GET", logo_url, auth="token")
        assert served.code == 200 and served.body == png()
        assert specs["backendai-zz-deno"]["resources"] == {}
        agent.close()


def test_kernelspecs_install_writes_one_spec_per_image_beside_the_python_presets(tmp_path: Path):
    import json
    import sys

    from backendai_jupyter.kernelspec_install import install

    kernels = [
        image_kernel(["backendai-jupyter/r:latest"], R_LABEL, base64.b64encode(png()).decode()),
        image_kernel(["backendai-jupyter/r:abcdefabcdef"], R_LABEL),
        image_kernel([IMAGE], KERNEL_LABEL),  # the shipped presets start Python already
    ]
    paths = install(prefix=str(tmp_path), image_kernels=[k for k in kernels if k is not None])
    names = sorted(Path(p).name for p in paths)
    assert names == ["backendai-python3", "backendai-python3-gpu", "backendai-r"]
    r = tmp_path / "share" / "jupyter" / "kernels" / "backendai-r"
    spec = json.loads((r / "kernel.json").read_text())
    assert spec["display_name"] == "R" and spec["interrupt_mode"] == "signal"
    assert spec["argv"][0] == sys.executable and spec["argv"][-2:] == ["--kernel", "backendai-r"]
    config = spec["metadata"]["kernel_provisioner"]["config"]
    assert config == {"image": "backendai-jupyter/r:latest", "resources": {"cpu": "1", "mem": "2g"}}
    assert (r / "logo-64x64.png").read_bytes() == png()


class _Images:
    def __init__(self, present: set[str]) -> None:
        self.present = present

    def get(self, ref: str) -> object:
        import docker.errors

        if ref not in self.present:
            raise docker.errors.ImageNotFound(ref)
        return f"image:{ref}"


class _Api:
    timeout = 60

    def __init__(self, images: _Images, registry: bool) -> None:
        self.images, self.registry, self.pulls = images, registry, []

    def pull(self, ref: str) -> None:
        import docker.errors

        self.pulls.append((ref, self.timeout))
        if not self.registry:
            raise docker.errors.APIError("Get https://registry-1.docker.io/v2/: dial tcp: no route to host")
        self.images.present.add(ref)


class _Client:
    def __init__(self, present: set[str], registry: bool) -> None:
        self.images = _Images(present)
        self.api = _Api(self.images, registry)


@pytest.mark.parametrize("registry", [True, False])
def test_the_base_is_the_official_image_when_a_registry_answers_else_a_local_bootstrap(
    registry: bool, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    from backendai_jupyter import images

    client = _Client(set(), registry)
    bootstrapped = []

    def bootstrap(kernels_dir: Path, progress: object) -> None:
        bootstrapped.append(kernels_dir)
        client.images.present.add(images.BOOTSTRAP_IMAGE)

    monkeypatch.setattr(images, "_run_bootstrap", bootstrap)
    ref, image = images._external_base(client, None, tmp_path, lambda line: None)  # type: ignore[arg-type]
    assert client.api.pulls == [(images.REGISTRY_BASE, images.PULL_TIMEOUT)]  # asked once, briefly
    assert client.api.timeout == 60  # and the client's own timeout is back
    if registry:
        assert (ref, image, bootstrapped) == (images.REGISTRY_BASE, f"image:{images.REGISTRY_BASE}", [])
    else:
        assert (ref, image, bootstrapped) == (
            images.BOOTSTRAP_IMAGE,
            f"image:{images.BOOTSTRAP_IMAGE}",
            [tmp_path],
        )
    # A bootstrapped image made before is used as it is: no registry is tried again.
    again = _Client({images.BOOTSTRAP_IMAGE}, registry)
    assert images._external_base(again, None, tmp_path, lambda line: None)[0] == images.BOOTSTRAP_IMAGE  # type: ignore[arg-type]
    assert again.api.pulls == []
