"""Database access: the async engine, sessions, and migrating to the newest schema."""

from __future__ import annotations

import asyncio
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine

MIGRATIONS = Path(__file__).parent / "migrations"


def sync_url(url: str) -> str:
    """The blocking-driver form of an async URL, for Alembic."""
    return url.replace("+aiosqlite", "").replace("+asyncpg", "+psycopg")


def _migrate(url: str) -> None:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", sync_url(url))
    command.upgrade(cfg, "head")


async def migrate(url: str) -> None:
    """Bring the schema to the newest revision (off the event loop)."""
    await asyncio.to_thread(_migrate, url)


def make_engine(url: str) -> AsyncEngine:
    """An engine for ``url``; SQLite gets WAL and foreign keys on."""
    sqlite = url.startswith("sqlite")
    # A writer waits for another's transaction up to this long (pysqlite's default, 5 s, is short
    # for a busy gateway on a loaded host: its write would fail instead).
    engine = create_async_engine(url, connect_args={"timeout": 30} if sqlite else {})
    if engine.dialect.name == "sqlite":

        @event.listens_for(engine.sync_engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # type: ignore[no-untyped-def]
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

    return engine


def make_sessionmaker(engine: AsyncEngine) -> async_sessionmaker:
    return async_sessionmaker(engine, expire_on_commit=False)
