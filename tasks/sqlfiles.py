"""Read a query from ``sql/`` by name; values are always bound, never formatted in."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import duckdb

SQL_DIR = Path(__file__).resolve().parent.parent / "sql"


@lru_cache(maxsize=None)
def sql(name: str) -> str:
    path = SQL_DIR / f"{name}.sql"
    if not path.is_file():
        raise FileNotFoundError(f"no SQL file {path}; expected one of {sorted(p.stem for p in SQL_DIR.glob('*.sql'))}")
    return path.read_text()


def run_sql(con: duckdb.DuckDBPyConnection, name: str, params: dict | None = None) -> duckdb.DuckDBPyConnection:
    """Execute ``sql/<name>.sql`` with named parameters ($name in the file)."""
    return con.execute(sql(name), params or {})
