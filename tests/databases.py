"""A fresh PostgreSQL database for each test, when the suite runs on PostgreSQL.

``BAI_TEST_POSTGRES`` names a server and a role that may create databases, as an async
SQLAlchemy URL without a database (``postgresql+asyncpg://bai:bai@127.0.0.1``). Each test then
gets its own database through ``BACKENDAI_DB_URL``, which every gateway the test starts (in
process or as a process) reads. A database still in use when its test ends (by a gateway a
module or the whole session shares) is dropped at the end of the session instead.
"""

from __future__ import annotations

import os
import uuid

SERVER_ENV = "BAI_TEST_POSTGRES"


def server_url() -> str:
    return os.environ.get(SERVER_ENV, "").rstrip("/")


def check_server_url() -> str | None:
    """Why ``BAI_TEST_POSTGRES`` is not a usable server URL; None when it is (or is unset)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    url = server_url()
    if not url:
        return None
    try:
        parsed = make_url(url)
    except ArgumentError:
        return f"{SERVER_ENV}={url!r} is not a database URL"
    if parsed.drivername != "postgresql+asyncpg" or parsed.database:
        return f"{SERVER_ENV} must be postgresql+asyncpg://ROLE:PASSWORD@HOST:PORT, not {url!r}"
    return None


def _admin():  # type: ignore[no-untyped-def]
    import psycopg

    url = server_url().replace("postgresql+asyncpg://", "postgresql://", 1)
    return psycopg.connect(f"{url}/postgres", autocommit=True)


def create() -> str:
    """A new, empty database; its async URL."""
    name = f"bai_test_{uuid.uuid4().hex[:16]}"
    with _admin() as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"{server_url()}/{name}"


def drop(url: str, *, force: bool = False) -> bool:
    """Drop the database of ``url``; False when it is still in use (and ``force`` is not given)."""
    import psycopg

    name = url.rsplit("/", 1)[1]
    try:
        with _admin() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}"' + (" WITH (FORCE)" if force else ""))
    except psycopg.errors.ObjectInUse:
        return False
    return True
