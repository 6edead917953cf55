"""Jupyter contents on a vfolder against jupyter_server's FileContentsManager on the same disk.

Starts its own gateway as a separate process (``backendai-jupyter gateway``, data directory and
vfolder volume under ``--dir``), makes a user and a vfolder, and times, interleaved with the
same work done by jupyter_server's ``AsyncLargeFileManager`` on a directory beside it:

- ``get`` and ``save`` of a 1 MB notebook, and ``get`` of a directory of 1,000 files, through
  :class:`VFolderContentsManager` (``root_vfolder`` set) and through the file manager;
- upload and download of a 200 MB file through the vfolder API (resumable chunks up, one
  streamed response down), against ``shutil.copyfile`` of the same file;
- the gateway's resident memory while those transfers run, above its idle size.

Prints one JSON object on stdout (progress on stderr).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from measure import (  # benchmarks/ is on sys.path when run as a script
    BenchmarkError,
    log,
    percentile,
    start_gateway,
)

TARGET_RATIO = 1.5  # get, save, list: at most this many times the file manager's time
TARGET_TRANSFER = 0.5  # upload, download: at least this fraction of a local copy's speed
TARGET_RSS_MB = 64  # the gateway's memory above idle during a transfer
MB = 2**20


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class GatewayProcess:
    """``backendai-jupyter gateway`` in a process of its own."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = data_dir.parent / "gateway.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60) -> None:
        cmd = [
            sys.executable,
            "-m",
            "backendai_jupyter.cli",
            "gateway",
            "--port",
            str(self.port),
            "--data-dir",
            str(self.data_dir),
        ]
        self.proc = start_gateway(cmd, self.log_path, timeout)

    def admin(self) -> dict[str, str]:
        data: dict[str, str] = json.loads((self.data_dir / "admin-keypair.json").read_text())
        return data

    def status(self, key: str) -> int:
        """A /proc/<pid>/status figure in bytes (VmRSS, VmHWM)."""
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        raise BenchmarkError(f"no {key} in /proc/{self.proc.pid}/status")

    def reset_peak(self) -> bool:
        """Reset VmHWM to the current RSS (Linux: write 5 to clear_refs); whether it could."""
        assert self.proc is not None
        try:
            Path(f"/proc/{self.proc.pid}/clear_refs").write_text("5")
            return True
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class PeakSampler:
    """Samples a process's RSS on a thread while a transfer runs."""

    def __init__(self, gw: GatewayProcess, interval: float = 0.005) -> None:
        self.gw, self.interval = gw, interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.gw.status("VmRSS"))
            time.sleep(self.interval)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def big_notebook(size: int) -> dict[str, Any]:
    """A notebook of about ``size`` bytes on disk: code cells with text and image outputs."""
    import base64
    import random

    import nbformat
    from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

    rng = random.Random(7)
    nb = new_notebook()
    i = 0
    while len(nbformat.writes(nb)) < size:
        src = "\n".join(
            f"values_{i}_{j} = [{', '.join(str(rng.random()) for _ in range(6))}]" for j in range(8)
        )
        outputs = [
            new_output("stream", name="stdout", text="".join(f"{rng.random():.12f}\n" for _ in range(40)))
        ]
        if i % 5 == 0:
            png = base64.b64encode(rng.randbytes(24_000)).decode()
            outputs.append(new_output("display_data", data={"image/png": png, "text/plain": "<Figure>"}))
        nb.cells.append(new_markdown_cell(f"## Step {i}\nSome explanation of step {i}."))
        nb.cells.append(new_code_cell(src, execution_count=i + 1, outputs=outputs))
        i += 1
    return dict(nb)


def write_random(path: Path, mb: int) -> None:
    block = os.urandom(MB)
    with open(path, "wb") as f:
        for i in range(mb):
            f.write(block[i % 7 :] + block[: i % 7])


async def timed(fn: Callable[[], Awaitable[Any]]) -> float:
    t0 = time.perf_counter()
    await fn()
    return (time.perf_counter() - t0) * 1000


async def interleaved(
    ours: Callable[[], Awaitable[Any]], local: Callable[[], Awaitable[Any]], runs: int, warmup: int
) -> tuple[float, float]:
    """Median milliseconds of each, run alternately (the first one switching every round)."""
    for _ in range(warmup):
        await ours()
        await local()
    a: list[float] = []
    b: list[float] = []
    for i in range(runs):
        if i % 2:
            a.append(await timed(ours))
            b.append(await timed(local))
        else:
            b.append(await timed(local))
            a.append(await timed(ours))
    return percentile(a, 0.5), percentile(b, 0.5)


def _notary() -> Any:
    from nbformat import sign

    return sign.NotebookNotary(db_file=":memory:", secret=b"benchmark")


async def run(args: argparse.Namespace, base: Path) -> dict[str, Any]:
    from jupyter_server.services.contents.largefilemanager import AsyncLargeFileManager
    from tornado import httpclient

    from backendai_jupyter.common import signing
    from backendai_jupyter.provisioner.contents import VFolderContentsManager

    gw = GatewayProcess(base / "gateway")
    gw.data_dir.mkdir()
    log(f"starting the gateway ({gw.url}, data under {gw.data_dir}) ...")
    gw.start()
    try:
        admin = gw.admin()
        http = httpclient.AsyncHTTPClient()

        async def call(creds: dict[str, str], method: str, path: str, body: Any = None) -> Any:
            data = json.dumps(body).encode() if body is not None else b""
            headers = signing.sign(creds["access_key"], creds["secret_key"], method, path, data)
            headers["Content-Type"] = "application/json"
            resp = await http.fetch(
                gw.url + path, method=method, headers=headers, body=data if method == "POST" else None
            )
            return json.loads(resp.body)

        user = await call(admin, "POST", "/v1/admin/users", {"name": "bench"})
        await call(user, "POST", "/v1/vfolders", {"name": "bench", "quota": "2g"})
        ours = VFolderContentsManager(
            gateway_url=gw.url,
            access_key=user["access_key"],
            secret_key=user["secret_key"],
            root_vfolder="bench",
        )
        local_root = base / "local"
        local_root.mkdir()
        local = AsyncLargeFileManager(root_dir=str(local_root), delete_to_trash=False)
        ours.notary, local.notary = _notary(), _notary()
        out: dict[str, Any] = {"gateway": "separate process", "dir": str(base)}

        # -- a 1 MB notebook --------------------------------------------------------------------
        nb = big_notebook(args.notebook_kb * 1024)
        model = {"type": "notebook", "content": nb}
        for cm in (ours, local):
            await cm.save(dict(model), "big.ipynb")
        out["notebook_bytes"] = (await ours.get("big.ipynb", content=False))["size"]
        log(f"notebook of {out['notebook_bytes']} bytes: get ...")
        g_ours, g_local = await interleaved(
            lambda: ours.get("big.ipynb"), lambda: local.get("big.ipynb"), args.runs, 2
        )
        log("save ...")
        s_ours, s_local = await interleaved(
            lambda: ours.save(dict(model), "big.ipynb"),
            lambda: local.save(dict(model), "big.ipynb"),
            args.runs,
            2,
        )

        # -- a directory of 1,000 files --------------------------------------------------------
        log(f"a directory of {args.files} files ...")
        for cm in (ours, local):
            await cm.save({"type": "directory"}, "many")
        (local_root / "many").mkdir(exist_ok=True)
        for i in range(args.files):
            (local_root / "many" / f"file-{i:04d}.txt").write_text(f"file {i}\n")
        sem = asyncio.Semaphore(8)

        async def put(i: int) -> None:
            async with sem:
                body = {"type": "file", "format": "text", "content": f"file {i}\n"}
                await ours.save(body, f"many/file-{i:04d}.txt")

        await asyncio.gather(*(put(i) for i in range(args.files)))
        l_ours, l_local = await interleaved(lambda: ours.get("many"), lambda: local.get("many"), args.runs, 2)
        listed = len((await ours.get("many"))["content"])
        if listed != args.files:
            raise BenchmarkError(f"the vfolder listing has {listed} entries, not {args.files}")

        # -- a 200 MB file up and down ------------------------------------------------------------
        size = args.transfer_mb * MB
        src = base / "transfer.bin"
        log(f"a {args.transfer_mb} MB file: upload, download, local copy ...")
        write_random(src, args.transfer_mb)
        dst = base / "copy.bin"
        idle = gw.status("VmRSS")
        peak_resets = gw.reset_peak()
        up: list[float] = []
        down: list[float] = []
        copy: list[float] = []
        write: list[float] = []  # the same bytes written from user space: a transfer's floor here
        with PeakSampler(gw) as sampler:
            for _ in range(args.transfer_runs):
                up.append(await timed(lambda: ours.upload_file(str(src), "transfer.bin")))
                dst.unlink(missing_ok=True)
                down.append(await timed(lambda: ours.download_file("transfer.bin", str(dst))))
                if dst.stat().st_size != size:
                    raise BenchmarkError(f"the download has {dst.stat().st_size} bytes, not {size}")
                dst.unlink()
                t0 = time.perf_counter()
                shutil.copyfile(src, dst)
                copy.append((time.perf_counter() - t0) * 1000)
                dst.unlink()
                write.append(await asyncio.to_thread(timed_write, src, dst))
                dst.unlink()
        peak = max(sampler.peak, gw.status("VmHWM") if peak_resets else 0)

        def mb_s(ms: float) -> float:
            return round(args.transfer_mb / (ms / 1000), 1)

        upload, download, local_copy, local_write = (
            mb_s(percentile(up, 0.5)),
            mb_s(percentile(down, 0.5)),
            mb_s(percentile(copy, 0.5)),
            mb_s(percentile(write, 0.5)),
        )
        out.update(
            {
                "get_nb_ms": round(g_ours, 2),
                "local_get_nb_ms": round(g_local, 2),
                "get_nb_ratio": round(g_ours / g_local, 3),
                "save_nb_ms": round(s_ours, 2),
                "local_save_nb_ms": round(s_local, 2),
                "save_nb_ratio": round(s_ours / s_local, 3),
                "list_1000_ms": round(l_ours, 2),
                "local_list_1000_ms": round(l_local, 2),
                "list_1000_ratio": round(l_ours / l_local, 3),
                "upload_mb_s": upload,
                "download_mb_s": download,
                "local_copy_mb_s": local_copy,
                "upload_ratio": round(upload / local_copy, 3),
                "download_ratio": round(download / local_copy, 3),
                # shutil.copyfile copies inside the kernel (copy_file_range); bytes that cross a
                # socket must be written from user space, which this is the speed of.
                "local_write_mb_s": local_write,
                "upload_vs_write": round(upload / local_write, 3),
                "download_vs_write": round(download / local_write, 3),
                "gateway_idle_rss_mb": round(idle / MB, 1),
                "gateway_rss_delta_mb": round(max(0, peak - idle) / MB, 1),
                "transfer_mb": args.transfer_mb,
                "files": args.files,
                "runs": args.runs,
                "transfer_runs": args.transfer_runs,
                "upload_chunk_mb": round(ours.upload_chunk_size / MB, 1),
                "target_ratio": TARGET_RATIO,
                "target_transfer_ratio": TARGET_TRANSFER,
                "target_rss_mb": TARGET_RSS_MB,
            }
        )
        out["targets_met"] = {
            "get_nb": out["get_nb_ratio"] <= TARGET_RATIO,
            "save_nb": out["save_nb_ratio"] <= TARGET_RATIO,
            "list_1000": out["list_1000_ratio"] <= TARGET_RATIO,
            "upload": out["upload_ratio"] >= TARGET_TRANSFER,
            "download": out["download_ratio"] >= TARGET_TRANSFER,
            "gateway_rss": out["gateway_rss_delta_mb"] <= TARGET_RSS_MB,
        }
        return out
    finally:
        gw.stop()


def timed_write(src: Path, dst: Path) -> float:
    """Milliseconds to write ``src``'s bytes to ``dst`` from user space, 4 MiB at a time."""
    buf = memoryview(bytearray(4 * MB))
    with open(src, "rb") as f, open(dst, "wb") as out:
        t0 = time.perf_counter()
        while n := f.readinto(buf):
            out.write(buf[:n])
        return (time.perf_counter() - t0) * 1000


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--dir", help="where the gateway's data, the vfolder and the local side live (a temp dir)"
    )
    ap.add_argument("--runs", type=int, default=15, help="timed get/save/list runs of each side")
    ap.add_argument("--notebook-kb", type=int, default=1024)
    ap.add_argument("--files", type=int, default=1000)
    ap.add_argument("--transfer-mb", type=int, default=200)
    ap.add_argument("--transfer-runs", type=int, default=3)
    args = ap.parse_args(argv)
    base = Path(tempfile.mkdtemp(prefix="bench-contents-", dir=args.dir))
    try:
        out = asyncio.run(run(args, base))
    except BenchmarkError as e:
        log(f"error: {e}")
        return 1
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
