"""Raw data sets: where they live, how to fetch them, and one loader per on-disk format.

A data set is named either by a known name (``KNOWN``: the GroupLens MovieLens
releases, the Netflix Prize, and ``synthetic-drift``, generated on first use by
``tasks.data.generated``) or by a path (a data set folder, a MovieLens
ratings file, or a generic CSV/Parquet file with configurable column names).

Folders are searched in order: ``--data-dir``, ``$METAREC_DATA_DIR``,
``./data``, then ``../shared/datasets`` beside the project. A known data set
that is absent is downloaded from its official URL into the first of those,
verified (MD5 and/or size) and unpacked; offline, the error names every folder
searched and the URL to fetch by hand.

Every loader runs in DuckDB (the rows never pass through pandas) and fills two
tables on the connection it is given:

- ``raw_text(src, line_no, text, nfields, u, i, r, t)``: one row per rating line,
  fields still text, so that ``check_raw_text`` can name the first bad file/line;
- ``titles(raw_item, title)``: item titles where the data set has them (may be empty).

Paths reach DuckDB through ``literal_path``, so exactly the named files are read, never
whatever a ``[``, ``*`` or ``?`` in their names would match as a glob. Error messages
name the file, the line and what was expected, never the line's content: a data set
path can come from a deployment's parameters, and the content of an arbitrary file
must not end up in logs or MLflow tags.

After the lines are checked, ``inspect_input`` rejects ratings outside the format's
scale (MovieLens and Netflix: 1-5 stars; MovieLens latest: 0.5-5 in half stars) and
reports what is legal but odd (fractional, negative or future timestamps, a last line
with no line end, i.e. a possibly truncated file) in the log and ``stats.json``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import stat
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import duckdb

from tasks.runtime.logs import log_warning
from tasks.runtime.sqlfiles import UnreadablePathError, literal_path, run_sql

logger = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[2]
SHARED_DATASETS = PROJECT_ROOT.parent / "shared" / "datasets"
GROUPLENS = "https://files.grouplens.org/datasets/movielens"


class DataError(ValueError):
    """Bad or missing input data, named with the file, line or column and what was expected."""


@dataclass(frozen=True)
class KnownDataset:
    """A public data set: its folder name(s), on-disk format and official download."""

    name: str
    folders: tuple[str, ...]
    layout: str
    url: str | None
    md5: str | None = None
    size: int | None = None
    manual: str = ""
    generated: bool = False  # made by tasks.data.generated on first use, not downloaded


KNOWN: dict[str, KnownDataset] = {
    "ml-100k": KnownDataset("ml-100k", ("ml-100k",), "ml-100k", f"{GROUPLENS}/ml-100k.zip", md5="0e33842e24a9c977be4e0107933c0723", size=4_924_029),
    "ml-1m": KnownDataset("ml-1m", ("ml-1m",), "ml-1m", f"{GROUPLENS}/ml-1m.zip", md5="c4d9eecfca2ab87c1945afe126590906"),
    # The "latest" releases change over time: verified against the .md5 GroupLens publishes beside them.
    "ml-latest-small": KnownDataset("ml-latest-small", ("ml-latest-small",), "ml-csv", f"{GROUPLENS}/ml-latest-small.zip"),
    "ml-latest": KnownDataset("ml-latest", ("ml-latest",), "ml-csv", f"{GROUPLENS}/ml-latest.zip"),
    "netflix": KnownDataset(
        "netflix",
        ("netflix", "netflix-prize-data", "nf_prize_dataset", "download"),
        "netflix",
        None,
        manual="The Netflix Prize data has no official download any more; get it from "
        "https://www.kaggle.com/datasets/netflix-inc/netflix-prize-data (or archive.org) and unpack it as "
        "netflix/training_set/mv_*.txt or netflix/combined_data_*.txt",
    ),
    # planted interest drift at ML-1M's size, in ML-1M's format (tasks/data/generated.py, metarec.synthetic.drift_ratings)
    "synthetic-drift": KnownDataset("synthetic-drift", ("synthetic-drift",), "ml-1m", None, generated=True),
}


@dataclass(frozen=True)
class Source:
    """Files of one data set, resolved on disk, and the format they are in."""

    name: str
    layout: str
    ratings: tuple[Path, ...]
    titles: Path | None = None
    options: dict = field(default_factory=dict)

    def describe(self) -> dict:
        return {"name": self.name, "layout": self.layout, "ratings": [str(p) for p in self.ratings[:5]],
                "n_rating_files": len(self.ratings), "titles": str(self.titles) if self.titles else None}


# ---------------------------------------------------------------------------- where


def search_dirs(data_dir: Path | None = None) -> list[Path]:
    """The folders searched for raw data sets, in order, without duplicates."""
    env = os.environ.get("METAREC_DATA_DIR")
    candidates = [data_dir, Path(env) if env else None, Path.cwd() / "data", SHARED_DATASETS]
    seen: list[Path] = []
    for path in candidates:
        if path is not None and Path(path).resolve() not in [p.resolve() for p in seen]:
            seen.append(Path(path))
    return seen


def detect_folder(folder: Path, name: str | None = None) -> Source | None:
    """Recognise a data set folder by its files (MovieLens 100K/1M/latest, Netflix)."""
    name = name or folder.name
    if (folder / "u.data").is_file():
        return Source(name, "ml-100k", (folder / "u.data",), _maybe(folder / "u.item"))
    if (folder / "ratings.dat").is_file():
        return Source(name, "ml-1m", (folder / "ratings.dat",), _maybe(folder / "movies.dat"))
    if (folder / "ratings.csv").is_file():
        return Source(name, "ml-csv", (folder / "ratings.csv",), _maybe(folder / "movies.csv"))
    netflix = sorted((folder / "training_set").glob("mv_*.txt")) or sorted(folder.glob("combined_data_*.txt"))
    if netflix:
        titles = _maybe(folder / "movie_titles.txt") or _maybe(folder / "movie_titles.csv")
        return Source(name, "netflix", tuple(netflix), titles)
    return None


def _maybe(path: Path) -> Path | None:
    return path if path.is_file() else None


def resolve_source(dataset: str, data_dir: Path | None = None, download: bool = True, columns: dict | None = None) -> Source:
    """Find (or fetch) the data set named by ``dataset``; raise DataError naming every place looked."""
    if dataset in KNOWN:
        return _resolve_known(KNOWN[dataset], data_dir, download)
    return _resolve_path(dataset, data_dir, columns or {})


def _resolve_known(spec: KnownDataset, data_dir: Path | None, download: bool) -> Source:
    dirs = search_dirs(data_dir)
    if spec.generated:
        return _resolve_generated(spec, dirs)
    for root in dirs:
        for folder in spec.folders:
            found = detect_folder(root / folder, spec.name) if (root / folder).is_dir() else None
            if found is not None and found.layout == spec.layout:
                return found
    looked = ", ".join(str(d / spec.folders[0]) for d in dirs)
    if spec.url is None:
        raise DataError(f"data set {spec.name!r} not found (looked in {looked}). {spec.manual}")
    if not download:
        raise DataError(f"data set {spec.name!r} not found (looked in {looked}) and data.download is off; "
                        f"fetch {spec.url} by hand and unzip it into one of those folders")
    target = dirs[0]
    try:
        folder = download_dataset(spec, target)
    except (urllib.error.URLError, OSError) as exc:
        raise DataError(f"data set {spec.name!r} not found (looked in {looked}) and downloading {spec.url} failed "
                        f"({exc}); fetch it by hand and unzip it into one of those folders") from exc
    found = detect_folder(folder, spec.name)
    if found is None or found.layout != spec.layout:
        raise DataError(f"the archive {spec.url} unpacked into {folder} but holds no {spec.layout} ratings file")
    return found


def _resolve_generated(spec: KnownDataset, dirs: list[Path]) -> Source:
    """A generated data set: a current copy where one is found, else generated into the first folder searched that
    can be written (a read-only shared folder is skipped)."""
    from tasks.data.generated import GENERATED, ensure_generated, is_current

    for root in dirs:
        folder = root / spec.folders[0]
        if folder.is_dir() and is_current(folder, GENERATED[spec.name]):
            return detect_folder(folder, spec.name)
    failures = []
    for root in dirs:
        if root.is_dir() and not root.stat().st_mode & stat.S_IWUSR:
            # marked read-only (the shared data sets): skipped even by root, whom the permission bits do not stop
            failures.append(f"{root}: marked read-only")
            continue
        try:
            folder = ensure_generated(spec.name, root)
        except OSError as exc:
            failures.append(f"{root}: {exc}")
            continue
        found = detect_folder(folder, spec.name)
        if found is None:
            raise DataError(f"generating {spec.name!r} into {folder} left no ratings.dat")
        return found
    raise DataError(f"data set {spec.name!r} is generated on first use, but no folder searched could be written "
                    f"({'; '.join(failures)}); pass --data-dir (or set METAREC_DATA_DIR) to a writable folder")


def _resolve_path(dataset: str, data_dir: Path | None, columns: dict) -> Source:
    path = Path(dataset).expanduser()
    tried = [path] if path.is_absolute() else [path, *(d / path for d in search_dirs(data_dir))]
    for candidate in tried:
        if candidate.is_dir():
            found = detect_folder(candidate)
            if found is None:
                raise DataError(f"{candidate}: no ratings file recognised; expected u.data, ratings.dat, ratings.csv, "
                                "training_set/mv_*.txt or combined_data_*.txt")
            return found
        if candidate.is_file():
            return _file_source(candidate, columns)
    known = ", ".join(KNOWN)
    raise DataError(f"data set {dataset!r} is neither a known name ({known}) nor an existing file or folder "
                    f"(looked at {', '.join(str(p) for p in tried)})")


def _file_source(path: Path, columns: dict) -> Source:
    by_name = {"u.data": ("ml-100k", "u.item"), "ratings.dat": ("ml-1m", "movies.dat")}
    if path.name in by_name:
        layout, titles = by_name[path.name]
        return Source(path.stem, layout, (path,), _maybe(path.parent / titles))
    if re.match(r"(mv_\d+|combined_data_\d+)\.txt$", path.name):
        return Source(path.stem, "netflix", (path,), None)
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".pq"):
        return Source(path.stem, "parquet", (path,), None, dict(columns))
    if suffix in (".csv", ".tsv", ".txt"):
        return Source(path.stem, "csv", (path,), None, dict(columns))
    raise DataError(f"{path}: unknown file type {suffix!r}; expected .csv, .tsv, .txt or .parquet "
                    "(or a MovieLens u.data / ratings.dat)")


# ---------------------------------------------------------------------------- download


def download_dataset(spec: KnownDataset, target_root: Path, timeout: float = 60.0) -> Path:
    """Fetch ``spec.url``, verify it, unzip it; the folder appears only when all of that succeeded."""
    assert spec.url is not None
    target_root = Path(target_root)
    target_root.mkdir(parents=True, exist_ok=True)
    logger.info("downloading %s from %s into %s", spec.name, spec.url, target_root)
    with tempfile.TemporaryDirectory(prefix=f".{spec.name}.", dir=target_root) as tmp:
        archive = Path(tmp) / "archive.zip"
        md5, size = _fetch(spec.url, archive, timeout)
        _verify(spec, md5, size, timeout)
        unpacked = _unzip(archive, Path(tmp) / "unpacked", spec.url)
        source_folder = _find_folder(unpacked, spec)
        final = target_root / spec.folders[0]
        if final.exists():
            raise DataError(f"{final} already exists but holds no {spec.layout} ratings file; move it away and retry")
        os.replace(source_folder, final)
    return final


def _fetch(url: str, dest: Path, timeout: float) -> tuple[str, int]:
    digest, size = hashlib.md5(), 0
    with urllib.request.urlopen(url, timeout=timeout) as response, dest.open("wb") as out:
        while chunk := response.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
            out.write(chunk)
    return digest.hexdigest(), size


def _published_md5(url: str, timeout: float) -> str | None:
    """GroupLens publishes ``<archive>.md5`` beside each archive; None when it cannot be read."""
    try:
        with urllib.request.urlopen(url + ".md5", timeout=timeout) as response:
            text = response.read(4096).decode("ascii", "replace")
    except (urllib.error.URLError, OSError):
        return None
    match = re.search(r"\b[0-9a-fA-F]{32}\b", text)
    return match.group(0).lower() if match else None


def _verify(spec: KnownDataset, md5: str, size: int, timeout: float) -> None:
    if spec.size is not None and size != spec.size:
        raise DataError(f"download of {spec.url}: {size} bytes, expected {spec.size}; the file is truncated or changed")
    expected = spec.md5 or _published_md5(spec.url or "", timeout)
    if expected is None:
        logger.warning("no checksum known or published for %s; only the zip structure is checked", spec.url)
    elif md5 != expected:
        raise DataError(f"download of {spec.url}: md5 {md5}, expected {expected}; the file is corrupt or changed")


def _unzip(archive: Path, dest: Path, url: str) -> Path:
    try:
        with zipfile.ZipFile(archive) as zf:
            bad = zf.testzip()
            if bad is not None:
                raise DataError(f"download of {url}: member {bad} of the zip is corrupt")
            root = dest.resolve()
            for member in zf.namelist():
                if not (dest / member).resolve().is_relative_to(root):
                    raise DataError(f"download of {url}: zip member {member!r} points outside the archive folder")
            zf.extractall(dest)
    except zipfile.BadZipFile as exc:
        raise DataError(f"download of {url}: not a zip archive ({exc})") from exc
    return dest


def _find_folder(unpacked: Path, spec: KnownDataset) -> Path:
    for candidate in [*(unpacked / f for f in spec.folders), *sorted(p for p in unpacked.iterdir() if p.is_dir()), unpacked]:
        if candidate.is_dir():
            found = detect_folder(candidate, spec.name)
            if found is not None and found.layout == spec.layout:
                return candidate
    raise DataError(f"download of {spec.url}: the archive holds no {spec.layout} ratings file")


# ---------------------------------------------------------------------------- loaders

# What each format's rating lines look like, for error messages and field checks.
EXPECTED = {
    "ml-100k": ("4 tab-separated fields: user id, item id, rating, unix timestamp", 4, "seconds"),
    "ml-1m": ("4 '::'-separated fields: UserID::MovieID::Rating::Timestamp", 4, "seconds"),
    "ml-csv": ("4 comma-separated fields: userId,movieId,rating,timestamp", 4, "seconds"),
    "netflix": ("'MovieID:' lines, then CustomerID,Rating,YYYY-MM-DD lines", 3, "date"),
    "csv": ("a user, item, rating and integer-seconds timestamp column", 4, "seconds"),
    "parquet": ("a user, item, rating and integer-seconds timestamp column", 4, "seconds"),
}


# The scale each known format allows: (lowest, highest, step).
RATING_SCALES = {
    "ml-100k": (1.0, 5.0, 1.0),
    "ml-1m": (1.0, 5.0, 1.0),
    "netflix": (1.0, 5.0, 1.0),
    "ml-csv": (0.5, 5.0, 0.5),
}


def _paths(source: Source) -> list[str]:
    return [str(p) for p in source.ratings]


def _literal(path: Path | str) -> str:
    try:
        return literal_path(Path(path).resolve())
    except UnreadablePathError as exc:
        raise DataError(str(exc)) from None


def _read_lines(con: duckdb.DuckDBPyConnection, source: Source) -> None:
    missing = [str(p) for p in source.ratings if not p.is_file()]
    if missing:
        raise DataError(f"ratings file(s) not found: {', '.join(missing)}")
    run_sql(con, "read_lines", {"paths": [_literal(p) for p in source.ratings]})


def load_ml100k(con: duckdb.DuckDBPyConnection, source: Source) -> None:
    """MovieLens 100K ``u.data``: user \\t item \\t rating \\t timestamp; titles from ``u.item``."""
    _read_lines(con, source)
    run_sql(con, "parse_delimited", {"delim": "\t", "header_lines": 0})
    _load_titles(con, source, "titles_lines", {"delim": "|", "encoding": "latin-1"})


def load_ml1m(con: duckdb.DuckDBPyConnection, source: Source) -> None:
    """MovieLens 1M ``ratings.dat``: UserID::MovieID::Rating::Timestamp; titles from ``movies.dat``."""
    _read_lines(con, source)
    run_sql(con, "parse_delimited", {"delim": "::", "header_lines": 0})
    _load_titles(con, source, "titles_lines", {"delim": "::", "encoding": "latin-1"})


def load_ml_csv(con: duckdb.DuckDBPyConnection, source: Source) -> None:
    """MovieLens latest ``ratings.csv`` (header userId,movieId,rating,timestamp); titles from ``movies.csv``."""
    _read_lines(con, source)
    for path in source.ratings:  # the header line is skipped below, so make sure it is one
        with path.open(encoding="utf-8", errors="replace") as fh:
            header = fh.readline().strip().lstrip("\ufeff")
        if header and header.replace(" ", "").lower() != "userid,movieid,rating,timestamp":
            raise DataError(f"{path}, line 1: not the header 'userId,movieId,rating,timestamp' this format starts with "
                            "(for other columns pass the file itself with data.user_col, ... set)")
    run_sql(con, "parse_delimited", {"delim": ",", "header_lines": 1})
    _load_titles(con, source, "titles_csv", {})


def load_netflix(con: duckdb.DuckDBPyConnection, source: Source) -> None:
    """Netflix Prize ``training_set/mv_*.txt`` or ``combined_data_*.txt``: 'MovieID:' lines, then
    CustomerID,Rating,YYYY-MM-DD lines; all files in one DuckDB scan."""
    _read_lines(con, source)
    run_sql(con, "parse_netflix")
    _load_titles(con, source, "titles_netflix", {})


def load_generic_csv(con: duckdb.DuckDBPyConnection, source: Source) -> None:
    """A CSV with a header row; column names from the config (data.user_col, ...)."""
    _load_generic(con, source, "peek_csv", "stage_generic_csv", first_line=2)


def load_generic_parquet(con: duckdb.DuckDBPyConnection, source: Source) -> None:
    """A Parquet file; column names from the config (data.user_col, ...)."""
    _load_generic(con, source, "peek_parquet", "stage_generic_parquet", first_line=1)


def _load_generic(con: duckdb.DuckDBPyConnection, source: Source, peek: str, stage: str, first_line: int) -> None:
    path = source.ratings[0]
    if not path.is_file():
        raise DataError(f"ratings file not found: {path}")
    if path.stat().st_size == 0:
        raise DataError(f"{path} is empty; expected {EXPECTED[source.layout][0]}")
    cols = {key: source.options.get(key, default) for key, default in
            (("user_col", "user_id"), ("item_col", "item_id"), ("rating_col", "rating"), ("ts_col", "timestamp"))}
    found = [d[0] for d in run_sql(con, peek, {"path": _literal(path)}).description]
    missing = [f"{key}={name!r}" for key, name in cols.items() if name not in found]
    if missing:
        # the header is the file's own text: say how many columns it has, not what they are called
        raise DataError(f"{path}: column(s) {', '.join(missing)} not found among the file's {len(found)} columns "
                        "(set data.user_col, data.item_col, data.rating_col, data.ts_col to its column names)")
    run_sql(con, stage, {"path": _literal(path), "src": str(path), **cols})
    run_sql(con, "number_staged", {"first_line": first_line})
    run_sql(con, "titles_table")


def _load_titles(con: duckdb.DuckDBPyConnection, source: Source, query: str, params: dict) -> None:
    """Titles are a convenience: an unreadable titles file leaves them null rather than failing the run."""
    run_sql(con, "titles_table")
    if source.titles is None:
        return
    try:
        run_sql(con, query, {"path": _literal(source.titles), **params})
    except duckdb.Error as exc:
        logger.warning("titles in %s not read (%s); items.title stays null", source.titles, _duckdb_problem(exc))
        run_sql(con, "titles_clear")


LOADERS: dict[str, Callable[[duckdb.DuckDBPyConnection, Source], None]] = {
    "ml-100k": load_ml100k,
    "ml-1m": load_ml1m,
    "ml-csv": load_ml_csv,
    "netflix": load_netflix,
    "csv": load_generic_csv,
    "parquet": load_generic_parquet,
}


def _duckdb_problem(exc: duckdb.Error) -> str:
    """DuckDB's description of a read error, without the 'Original Line' it quotes from the file."""
    lines = [line.strip() for line in str(exc).strip().split("\n\n")[0].splitlines()]
    return " ".join(line for line in lines if line and not line.lower().startswith("original line"))[:300]


def load_raw(con: duckdb.DuckDBPyConnection, source: Source) -> None:
    """Run the source's loader, then check every line; DuckDB read errors become DataError."""
    problem = None
    try:
        LOADERS[source.layout](con, source)
    except duckdb.Error as exc:
        problem = _duckdb_problem(exc)
    if problem is not None:  # raised outside the handler: DuckDB's exception (and its C++ state) is not kept alive
        raise DataError(f"{', '.join(_paths(source)[:3])}: could not be read as {source.layout} "
                        f"({problem}); expected {EXPECTED[source.layout][0]}")
    check_raw_text(con, source)


# What is wrong with a line, without quoting it (see the module docstring).
PROBLEMS = {
    "fields": "{nfields} field(s), expected {expected}",
    "movie": "a rating line before any 'MovieID:' line",
    "user": "the user id is not an integer",
    "item": "the item id is not an integer",
    "rating": "the rating is missing or not a finite number",
    "timestamp": "the timestamp is not {ts_kind}",
}


def check_raw_text(con: duckdb.DuckDBPyConnection, source: Source) -> None:
    """Raise DataError on an empty input or on the first bad line (file, line, column, expected)."""
    expected, nfields, ts_format = EXPECTED[source.layout]
    n_rows = run_sql(con, "count_rows", {"table": "raw_text"}).fetchall()[0][0]
    if n_rows == 0:
        raise DataError(f"{', '.join(_paths(source)[:3])}: no rating lines (empty file?); expected {expected}")
    rows = run_sql(con, "first_bad_line", {"nfields": nfields, "ts_format": ts_format}).fetchall()
    if not rows:
        return
    src, line_no, _text, got_fields, _u, _i, _r, _t, problem = rows[0]
    ts_kind = "a date YYYY-MM-DD" if ts_format == "date" else "a number of seconds"
    what = PROBLEMS[problem].format(nfields=got_fields, expected=expected, ts_kind=ts_kind)
    raise DataError(f"{src}, {_where(source)} {line_no}: {what}")


def _where(source: Source) -> str:
    return "row" if source.layout == "parquet" else "line"


# ---------------------------------------------------------------------------- legal but odd input


def inspect_input(con: duckdb.DuckDBPyConnection, source: Source, rating_threshold: float, now: int) -> dict:
    """Reject ratings off the format's scale; count what is legal but odd, warn about it, return it for stats.json.

    Runs on ``raw_text`` after ``check_raw_text`` (every field parses).
    """
    expected, _, ts_format = EXPECTED[source.layout]
    scale = RATING_SCALES.get(source.layout)
    if scale is not None:
        low, high, step = scale
        bad = run_sql(con, "first_off_scale_rating", {"low": low, "high": high, "step": step}).fetchall()
        if bad:
            src, line_no = bad[0]
            raise DataError(f"{src}, {_where(source)} {line_no}: the rating is off the {source.layout} scale; "
                            f"expected {_describe_scale(scale)}")
    checks: dict = {"rating_scale": _describe_scale(scale) if scale else None}
    n, low, high, positives = run_sql(con, "rating_summary", {"threshold": rating_threshold}).fetchall()[0]
    checks.update(rating_min=low, rating_max=high)
    if scale is None and n and positives == n:
        log_warning(logger, "every one of the %d ratings in %s (range %s..%s) is >= data.rating_threshold=%s, so every "
                    "interaction counts as a positive; check the file's rating scale", n, source.name, low, high, rating_threshold)
    checks["all_ratings_positive"] = bool(n and positives == n)
    for kind, count, src, line_no in run_sql(con, "timestamp_oddities", {"ts_format": ts_format, "now": now}).fetchall():
        checks[kind] = {"count": count, "first": f"{src}, {_where(source)} {line_no}" if count else None}
        if count:
            log_warning(logger, "%d rating(s) with %s timestamps in %s, the first at %s, %s", count, kind.split("_")[0], source.name,
                        checks[kind]["first"], TIMESTAMP_ODDITIES[kind])
    checks["unterminated_last_line"] = _unterminated_last_lines(con, source)
    for where in checks["unterminated_last_line"]:
        log_warning(logger, "%s is the last line and has no line end: the file may be truncated (a cut-off line still "
                    "parses, e.g. a timestamp cut to a few digits); kept as it is", where)
    return checks


TIMESTAMP_ODDITIES = {
    "fractional_timestamps": "rounded to whole seconds",
    "negative_timestamps": "before 1970; kept as they are",
    "future_timestamps": "after the time of this ingestion; kept as they are",
}


def _describe_scale(scale: tuple[float, float, float]) -> str:
    low, high, step = scale
    return f"{low:g} to {high:g} in steps of {step:g}"


def _unterminated_last_lines(con: duckdb.DuckDBPyConnection, source: Source) -> list[str]:
    """'file, line N' for each text rating file whose last byte is not a line end."""
    if source.layout == "parquet":
        return []
    out = []
    last_lines = dict(run_sql(con, "last_lines").fetchall())
    for path in source.ratings:
        with open(path, "rb") as handle:
            handle.seek(0, 2)
            if handle.tell() == 0:
                continue
            handle.seek(-1, 2)
            if handle.read(1) not in (b"\n", b"\r"):
                line = last_lines.get(str(path.resolve()), last_lines.get(str(path)))
                out.append(f"{path}, line {line}")
    return out
