"""Read a query from ``sql/`` by name; values are always bound, never formatted in.

File paths bound into DuckDB's readers go through ``literal_path``: ``read_csv`` and
``read_parquet`` treat ``*``, ``?`` and ``[`` as glob characters, so a folder named
``dd[1]`` would silently be read as ``dd1``.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import duckdb

SQL_DIR = Path(__file__).resolve().parents[2] / "sql"
GLOB_CHARACTERS = "*?["


class UnreadablePathError(ValueError):
    """A path DuckDB cannot be made to read literally."""


def literal_path(path: Path | str) -> str:
    """``path`` as a DuckDB file pattern matching exactly that one file.

    Each glob character is put in brackets (``[*]``, ``[?]``, ``[[]``), which DuckDB's
    globbing matches literally; ``]`` alone is literal already. DuckDB also reads a
    backslash as an escape, so a path holding both cannot be made literal: refused.
    """
    text = str(path)
    if not any(c in text for c in GLOB_CHARACTERS):
        return text
    if "\\" in text:
        raise UnreadablePathError(f"{text}: a path holding both a backslash and one of {GLOB_CHARACTERS!r} cannot be read "
                                  "literally by DuckDB; rename the file or folder")
    return "".join(f"[{c}]" if c in GLOB_CHARACTERS else c for c in text)


@lru_cache(maxsize=None)
def sql(name: str) -> str:
    path = SQL_DIR / f"{name}.sql"
    if not path.is_file():
        raise FileNotFoundError(f"no SQL file {path}; expected one of {sorted(p.stem for p in SQL_DIR.glob('*.sql'))}")
    return path.read_text()


def run_sql(con: duckdb.DuckDBPyConnection, name: str, params: dict | None = None) -> duckdb.DuckDBPyConnection:
    """Execute ``sql/<name>.sql`` with named parameters ($name in the file)."""
    return con.execute(sql(name), params or {})
