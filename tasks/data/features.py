"""Side features of users and items: which files hold them, and reading them in DuckDB (SQL in ``sql/``).

Where they come from (detected beside the ratings, or named by ``data.user_features`` /
``data.item_features``, which replace the detected ones):

- ml-100k: ``u.user`` (age group, gender, occupation, zip prefix) and ``u.item`` (genres, release year);
- ML-1M: ``users.dat`` (gender, age group, occupation, zip prefix) and ``movies.dat`` (genres, year from
  the title), ISO-8859-1;
- MovieLens latest: ``movies.csv`` (genres, year from the title);
- any data set: a CSV (with a header) or Parquet file, one row per user (item), the id column named as
  the ratings' (``data.user_col`` / ``data.item_col``), every other column one categorical field, several
  values in a cell separated by '|', an empty cell missing.

A file in the wrong format fails the prepare stage with a ``DataError`` naming the file, the line and
what was expected, never the line's content (see ``tasks/data/datasets.py``); paths reach DuckDB literally
(``literal_path``), never as glob patterns. The stage writes ``user_features.parquet`` and ``item_features.parquet`` (see
``sql/out_features.sql``; empty when the data set has none) and reports the fields in ``stats.json``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import duckdb
import pyarrow.parquet as pq

from metarec.config import DataConfig
from tasks.data.datasets import DataError, Source, _duckdb_problem
from tasks.runtime.sqlfiles import UnreadablePathError, literal_path, run_sql

ZIP_DIGITS = 2  # a zip code's first two characters: a region (ml-100k has 795 distinct codes for 943 users)
KINDS = ("user", "item")


@dataclass(frozen=True)
class FeatureFile:
    kind: str  # "user" or "item"
    path: Path
    format: str  # a key of DELIMITED, "ml-csv-items", "csv" or "parquet"


@dataclass(frozen=True)
class Delimited:
    """A line-per-entity profile file: its SQL, separator, field count, integer fields, flag fields, encoding."""

    query: str
    delim: str
    nfields: int
    int_fields: tuple[int, ...]
    flag_from: int
    encoding: str
    expected: str


DELIMITED = {
    "ml-100k-users": Delimited("features_ml100k_users", "|", 5, (1, 2), 0, "latin-1",
                               "5 '|'-separated fields: user id|age|gender|occupation|zip code, with integer id and age"),
    "ml-100k-items": Delimited("features_ml100k_items", "|", 24, (1,), 6, "latin-1",
                               "24 '|'-separated fields: movie id|title|release date|video release date|IMDb URL|19 genre flags (0 or 1)"),
    "ml-1m-users": Delimited("features_ml1m_users", "::", 5, (1, 3, 4), 0, "latin-1",
                             "5 '::'-separated fields: UserID::Gender::Age::Occupation::Zip-code, with integer id, age and occupation"),
    "ml-1m-items": Delimited("features_ml1m_items", "::", 3, (1,), 0, "latin-1", "3 '::'-separated fields: MovieID::Title::Genres"),
}
# the feature files each MovieLens layout has beside its ratings: (users, items)
LAYOUT_FILES = {
    "ml-100k": (("u.user", "ml-100k-users"), ("u.item", "ml-100k-items")),
    "ml-1m": (("users.dat", "ml-1m-users"), ("movies.dat", "ml-1m-items")),
    "ml-csv": (None, ("movies.csv", "ml-csv-items")),
}


def feature_files(source: Source, data: DataConfig) -> list[FeatureFile]:
    """The feature files of this data set: the configured ones, else those found beside its ratings."""
    found: list[FeatureFile] = []
    folder = source.ratings[0].parent if source.ratings else None
    for kind, configured, detected in zip(KINDS, (data.user_features, data.item_features), LAYOUT_FILES.get(source.layout, (None, None))):
        if configured is not None:
            path = Path(configured).expanduser()
            if not path.is_file():
                raise DataError(f"data.{kind}_features: {path} does not exist; expected a CSV or Parquet file of {kind} features")
            found.append(FeatureFile(kind, path, "parquet" if path.suffix.lower() in (".parquet", ".pq") else "csv"))
        elif detected is not None and folder is not None and (folder / detected[0]).is_file():
            found.append(FeatureFile(kind, folder / detected[0], detected[1]))
    return found


def load_feature_file(con: duckdb.DuckDBPyConnection, file: FeatureFile, data: DataConfig) -> None:
    """Check one file (DataError on the first bad line) and add its rows to ``raw_features``."""
    if file.format in DELIMITED:
        spec = DELIMITED[file.format]
        _read(con, file, "feature_lines", {"path": _literal(file.path), "encoding": spec.encoding})
        bad = run_sql(con, "feature_bad_line", {"delim": spec.delim, "nfields": spec.nfields, "int_fields": list(spec.int_fields),
                                                "flag_from": spec.flag_from}).fetchall()
        if bad:
            line_no, _text, nfields, problem, field_no = bad[0]
            what = {"fields": f"{nfields} field(s)", "integer": f"field {field_no} is not an integer",
                    "flag": f"field {field_no} is not a 0/1 genre flag"}[problem]
            raise DataError(f"{file.path}, line {line_no}: {what}; expected {spec.expected}")
        run_sql(con, spec.query, {"zip_digits": ZIP_DIGITS} if file.kind == "user" else {})
        return
    id_col = "movieId" if file.format == "ml-csv-items" else (data.user_col if file.kind == "user" else data.item_col)
    _stage_rows(con, file, id_col)
    if file.format == "ml-csv-items":
        run_sql(con, "features_mlcsv_items")
    else:
        run_sql(con, "features_generic", {"kind": file.kind})


def _literal(path: Path) -> str:
    try:
        return literal_path(Path(path).resolve())
    except UnreadablePathError as exc:
        raise DataError(str(exc)) from None


def _read(con: duckdb.DuckDBPyConnection, file: FeatureFile, query: str, params: dict) -> None:
    problem = None
    try:
        run_sql(con, query, params)
    except duckdb.Error as exc:
        problem = _duckdb_problem(exc)
    if problem is not None:  # raised outside the handler: DuckDB's exception is not kept alive
        raise DataError(f"{file.path}: could not be read as {file.kind} features ({problem})")


def _stage_rows(con: duckdb.DuckDBPyConnection, file: FeatureFile, id_col: str) -> None:
    """A header CSV or Parquet into ``feature_rows`` (raw_id + one text column per field), checked."""
    peek = "peek_parquet" if file.format == "parquet" else "peek_csv"
    columns: list[str] = []
    problem = None
    try:
        columns = [d[0] for d in run_sql(con, peek, {"path": _literal(file.path)}).description]
    except duckdb.Error as exc:
        problem = _duckdb_problem(exc)
    if problem is not None:
        raise DataError(f"{file.path}: could not be read as {file.kind} features ({problem})")
    needed = ("movieId", "title", "genres") if file.format == "ml-csv-items" else (id_col,)
    missing = [c for c in needed if c not in columns]
    if missing:
        raise DataError(f"{file.path}, line 1: column(s) {missing} not found among the header's {len(columns)} columns; expected "
                        + ("'movieId,title,genres'" if file.format == "ml-csv-items" else
                           f"the {file.kind} id column {id_col!r} (data.{file.kind}_col) and at least one feature column"))
    if len(columns) < 2:
        raise DataError(f"{file.path}, line 1: only the id column {id_col!r}; expected at least one feature column beside it")
    _read(con, file, "feature_rows_parquet" if file.format == "parquet" else "feature_rows_csv", {"path": _literal(file.path), "id_col": id_col})
    first_line = 1 if file.format == "parquet" else 2
    bad = run_sql(con, "feature_rows_bad", {"first_line": first_line}).fetchall()
    if bad:
        line_no, _raw_id, problem, first = bad[0]
        where = "row" if file.format == "parquet" else "line"
        what = "the id is not an integer" if problem == "integer" else f"the id repeats {where} {first}"
        raise DataError(f"{file.path}, {where} {line_no}: {what}; expected one row per {file.kind}, "
                        f"the {id_col!r} column holding the integer ids of the ratings")


def describe_output(path: Path, file: FeatureFile | None) -> dict | None:
    """What a written features Parquet holds, for stats.json (None: the data set has none of this kind)."""
    table = pq.read_table(path, columns=["entity_id", "field"])
    if table.num_rows == 0:
        return None
    return {
        "file": str(file.path) if file else None,
        "rows": table.num_rows,
        "entities": len(set(table.column("entity_id").to_pylist())),
        "fields": sorted(set(table.column("field").to_pylist())),
    }
