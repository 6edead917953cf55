"""The helper scripts that `make test` and `make test-postgres` run before any test."""

from __future__ import annotations

import os
import subprocess
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def fake_tool(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text("#!/usr/bin/env bash\n" + textwrap.dedent(body))
    path.chmod(0o755)


@pytest.mark.skipif(os.geteuid() != 0, reason="the script starts a server only as root")
def test_ensure_postgres_returns_its_url_when_it_starts_a_server_that_outlives_it(tmp_path):
    """`url=$(bash scripts/ensure-postgres.sh)` must return once the server answers. A server
    started by the script is a daemon that keeps every descriptor it inherited: had it inherited
    the command substitution's pipe, the caller would wait on it for as long as the server runs."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    started = tmp_path / "started"
    (tmp_path / "lib" / "15").mkdir(parents=True)
    fake_tool(bin_dir, "pg_isready", f'test -e "{started}"\n')
    fake_tool(bin_dir, "pg_lsclusters", "echo '15 main 5432 down postgres'\n")
    # The "server": a background process holding whatever stdout/stderr/fds it was given.
    fake_tool(
        bin_dir,
        "pg_ctlcluster",
        f"""\
        echo "Removed stale pid file."
        (trap '' HUP; exec sleep 120) &
        touch "{started}"
        """,
    )
    fake_tool(bin_dir, "su", 'shift 2; bash -c "$*"\n')
    fake_tool(bin_dir, "psql", "echo 1\n")
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", PG_LIBDIR=str(tmp_path / "lib"))
    log = tmp_path / "stderr"
    try:
        # The script's stderr is a file: the server may keep that, as the real one keeps its log.
        with log.open("w") as stderr:
            done = subprocess.run(
                ["bash", "-c", 'url=$(bash scripts/ensure-postgres.sh) && echo "URL=$url"'],
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
                timeout=20,
            )
    finally:
        subprocess.run(["pkill", "-f", "^sleep 120$"], check=False)
    assert done.returncode == 0, log.read_text()
    assert done.stdout.strip() == ("URL=postgresql+asyncpg://backendai_test:backendai_test@127.0.0.1:5432")
    assert "Removed stale pid file." in log.read_text()
