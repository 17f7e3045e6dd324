"""Database engine and sessions (SQLAlchemy 2): SQLite in WAL mode by default, PostgreSQL by URL.

SQLite is opened with ``journal_mode=WAL`` (readers never block the ingest writer),
``synchronous=NORMAL`` (durable at checkpoints; a power cut can lose the last
~100 ms batch, never corrupt the file) and a ``busy_timeout`` so a CLI reading while
the fleet writes waits instead of failing with "database is locked".

PostgreSQL: ``postgresql+psycopg://user@host/db``; a ``search_path`` can be chosen
with ``?options=-csearch_path%3Dmyschema`` (the tests use a schema per session).

Schema changes are additive and applied on open (:func:`create_schema`): new tables,
new nullable columns and new indexes.  A unique index that old duplicate rows prevent
is reported, not fatal: ingestion then inserts into that table without deduplication.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, inspect
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.schema import CreateIndex

from core.errors import ConfigError, FleetError

__all__ = ["make_engine", "make_sessionmaker", "create_schema", "is_sqlite"]

log = logging.getLogger(__name__)


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


def _create_private(path: Path) -> None:
    """Create a new SQLite file 0600 from the start (it holds the fleet's records; SQLite gives
    its -wal and -shm files the database file's mode).  An existing file is left as it is."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        pass


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
            _create_private(Path(parsed.database))
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


def create_schema(engine: Engine) -> frozenset[str]:
    """Create what does not exist yet (idempotent): tables, nullable columns, indexes.

    Returns the names of the tables in :data:`fleet.models.DEDUPE_KEYS` whose unique
    index could not be created because the table already holds duplicates.
    """
    from .models import Base

    try:
        Base.metadata.create_all(engine)
        _add_columns(engine)
        return _add_indexes(engine)
    except OperationalError as exc:
        raise FleetError(f"cannot open the fleet database: {exc.orig}",
                         hint="check [database].url and that the server is reachable") from exc


def _add_columns(engine: Engine) -> None:
    """``ALTER TABLE ... ADD COLUMN`` for nullable columns a database made by an older fleet lacks."""
    from .models import Base

    have = inspect(engine)
    quote = engine.dialect.identifier_preparer.quote
    for table in Base.metadata.sorted_tables:
        present = {c["name"] for c in have.get_columns(table.name)}
        for col in table.columns:
            if col.name in present or not col.nullable or col.primary_key:
                continue
            with engine.begin() as conn:
                conn.exec_driver_sql(f"ALTER TABLE {quote(table.name)} ADD COLUMN {quote(col.name)} "
                                     f"{col.type.compile(dialect=engine.dialect)}")
            log.info("fleet database: added column %s.%s", table.name, col.name)


def _add_indexes(engine: Engine) -> frozenset[str]:
    """``CREATE [UNIQUE] INDEX IF NOT EXISTS`` for declared indexes a database lacks (create_all
    only makes them with new tables).  Each in its own transaction: a failed one aborts nothing
    else; ``IF NOT EXISTS`` because another fleet worker may be doing the same."""
    from .models import DEDUPE_KEYS, Base

    have = inspect(engine)
    without: set[str] = set()
    for table in Base.metadata.sorted_tables:
        present = {ix["name"] for ix in have.get_indexes(table.name)}
        for index in sorted(table.indexes, key=lambda ix: str(ix.name)):
            if index.name in present:
                continue
            try:
                with engine.begin() as conn:
                    conn.execute(CreateIndex(index, if_not_exists=True))
            except IntegrityError as exc:
                # Duplicates from before deduplication: keep working, without it for this table.
                log.warning("fleet database: cannot create unique index %s on %s (%s); re-sent messages "
                            "will be stored twice there until the duplicate rows are deleted",
                            index.name, table.name, str(getattr(exc, "orig", exc)).splitlines()[0])
                if table.name in DEDUPE_KEYS:
                    without.add(table.name)
    return frozenset(without)
