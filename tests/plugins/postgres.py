"""The fleet registry on SQLite and, when a local server is reachable, PostgreSQL.

``registry`` (a fixture with the params ``sqlite`` and ``postgresql``, the latter marked
``postgres``) opens a fresh registry on each; PostgreSQL gets a throw-away schema on
127.0.0.1:5432 (database ``test``, user ``postgres``) and skips with the reason when there is
no server or no psycopg.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleet.registry import Registry

PG_DSN = "host=127.0.0.1 port=5432 dbname=test user=postgres connect_timeout=2"


def postgres_schema(prefix: str = "edgeloop_test") -> Iterator[str]:
    """Yield the URL of a new schema on the local PostgreSQL and drop it afterwards (or skip)."""
    psycopg = pytest.importorskip("psycopg", reason="psycopg is not installed (pip install 'edgeloop[postgres]')")
    try:
        conn = psycopg.connect(PG_DSN, autocommit=True)
    except psycopg.OperationalError as exc:
        pytest.skip(f"no PostgreSQL at 127.0.0.1:5432 (database test, user postgres): {exc}".splitlines()[0])
    schema = f"{prefix}_{uuid.uuid4().hex[:10]}"
    conn.execute(f'CREATE SCHEMA "{schema}"')
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/test?options=-csearch_path%3D{schema}"
    finally:
        conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
        conn.close()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def registry(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Registry]:
    urls = iter([f"sqlite:///{tmp_path / 'fleet.db'}"]) if request.param == "sqlite" else postgres_schema()
    reg = Registry.open(next(urls))
    try:
        yield reg
    finally:
        reg.close()
        close = getattr(urls, "close", None)
        if close is not None:
            close()
