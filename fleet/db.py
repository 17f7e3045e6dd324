"""Database engine and sessions (SQLAlchemy 2): SQLite in WAL mode by default, PostgreSQL by URL.

SQLite is opened with ``journal_mode=WAL`` (readers never block the ingest writer),
``synchronous=NORMAL`` (durable at checkpoints; a power cut can lose the last
~100 ms batch, never corrupt the file) and a ``busy_timeout`` so a CLI reading while
the fleet writes waits instead of failing with "database is locked".

PostgreSQL: ``postgresql+psycopg://user@host/db``; a ``search_path`` can be chosen
with ``?options=-csearch_path%3Dmyschema`` (the tests use a schema per session).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from edge_agent.errors import ConfigError, FleetError

__all__ = ["make_engine", "make_sessionmaker", "create_schema", "is_sqlite"]


def is_sqlite(engine: Engine) -> bool:
    return engine.dialect.name == "sqlite"


def _sqlite_pragmas(busy_timeout_ms: int) -> Any:
    def on_connect(dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    return on_connect


def make_engine(url: str, *, busy_timeout_ms: int = 10_000, echo: bool = False) -> Engine:
    """An engine for ``url`` (``sqlite:///PATH`` or ``postgresql+psycopg://...``)."""
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise ConfigError(f"invalid database url {url!r}: {exc}", hint="e.g. sqlite:///fleet-data/fleet.db",
                          key="database.url") from exc
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        # One connection per thread; the check is off because sessions never cross threads here.
        engine = create_engine(parsed, echo=echo, connect_args={"check_same_thread": False,
                                                                "timeout": busy_timeout_ms / 1000})
        event.listen(engine, "connect", _sqlite_pragmas(busy_timeout_ms))
        return engine
    if parsed.get_backend_name() == "postgresql":
        if parsed.drivername == "postgresql":  # psycopg 3 is what we ship, not psycopg2
            parsed = parsed.set(drivername="postgresql+psycopg")
        try:
            return create_engine(parsed, echo=echo, pool_pre_ping=True, pool_size=5, max_overflow=5)
        except ModuleNotFoundError as exc:
            raise ConfigError("PostgreSQL needs the psycopg driver", hint="pip install 'edgeloop[postgres]'",
                              key="database.url") from exc
    raise ConfigError(f"unsupported database {parsed.get_backend_name()!r}",
                      hint="use sqlite:///PATH or postgresql+psycopg://...", key="database.url")


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    # expire_on_commit=False: records are copied out into frozen dataclasses anyway.
    return sessionmaker(engine, expire_on_commit=False)


def create_schema(engine: Engine) -> None:
    """Create every table that does not exist yet (idempotent)."""
    from .models import Base

    try:
        Base.metadata.create_all(engine)
    except OperationalError as exc:
        raise FleetError(f"cannot open the fleet database: {exc.orig}",
                         hint="check [database].url and that the server is reachable") from exc
