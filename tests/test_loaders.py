"""Each loader on a small file in its real on-disk format, written here."""

from __future__ import annotations

import calendar
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from metarec.config import Config, DataConfig, RuntimeConfig
from tasks.data.datasets import EXPECTED, Source, detect_folder, load_raw, resolve_source, search_dirs
from tasks.data.prepare import duckdb_connection, ingest
from tasks.runtime.sqlfiles import run_sql

# (user, item, rating, unix seconds); user 7 rates item 3 twice.
RATINGS = [(1, 10, 5.0, 978300760), (1, 20, 3.0, 978300761), (2, 10, 1.0, 978300762), (7, 3, 4.0, 978300800), (7, 3, 2.0, 978400000)]


def read(source: Source) -> list[tuple]:
    with duckdb_connection() as con:
        load_raw(con, source)
        run_sql(con, "ratings", {"ts_format": EXPECTED[source.layout][2]})
        rows = con.execute("SELECT raw_user, raw_item, rating, ts FROM ratings ORDER BY ALL").fetchall()
        titles = dict(con.execute("SELECT raw_item, title FROM titles").fetchall())
    return rows, titles


def test_ml100k_u_data_and_u_item(tmp_path: Path):
    (tmp_path / "u.data").write_text("".join(f"{u}\t{i}\t{int(r)}\t{t}\n" for u, i, r, t in RATINGS))
    (tmp_path / "u.item").write_bytes("10|Caf\xe9 Society (1995)|01-Jan-1995||http://x|0|1\n3|Heat (1995)|01-Jan-1995||http://y|1|0\n".encode("latin-1"))
    source = detect_folder(tmp_path)
    assert source.layout == "ml-100k"
    rows, titles = read(source)
    assert rows == sorted(RATINGS)
    assert titles == {10: "Café Society (1995)", 3: "Heat (1995)"}


def test_ml1m_ratings_dat(tmp_path: Path):
    (tmp_path / "ratings.dat").write_text("".join(f"{u}::{i}::{int(r)}::{t}\n" for u, i, r, t in RATINGS))
    (tmp_path / "movies.dat").write_bytes("10::Star Wars: Episode IV (1977)::Action|Sci-Fi\n".encode("latin-1"))
    source = detect_folder(tmp_path)
    assert source.layout == "ml-1m"
    rows, titles = read(source)
    assert rows == sorted(RATINGS)
    assert titles == {10: "Star Wars: Episode IV (1977)"}


def test_movielens_latest_ratings_csv(tmp_path: Path):
    half = [(u, i, r - 0.5, t) for u, i, r, t in RATINGS]  # latest releases have half stars
    (tmp_path / "ratings.csv").write_text("userId,movieId,rating,timestamp\r\n" + "".join(f"{u},{i},{r},{t}\r\n" for u, i, r, t in half))
    (tmp_path / "movies.csv").write_text('movieId,title,genres\n10,"American President, The (1995)",Comedy\n')
    source = detect_folder(tmp_path)
    assert source.layout == "ml-csv"
    rows, titles = read(source)
    assert rows == sorted(half)
    assert titles == {10: "American President, The (1995)"}


def _day(date: str) -> int:
    return calendar.timegm(tuple(map(int, date.split("-"))) + (0, 0, 0))


def test_netflix_training_set_files(tmp_path: Path):
    folder = tmp_path / "netflix" / "training_set"
    folder.mkdir(parents=True)
    (folder / "mv_0000001.txt").write_text("1:\n1488844,3,2005-09-06\n822109,5,2005-05-13\n")
    (folder / "mv_0000002.txt").write_text("2:\n1488844,4,2004-01-01\n")
    (tmp_path / "netflix" / "movie_titles.txt").write_bytes("1,2003,Dinosaur Planet\n2,2004,Isle of Man TT 2004 Review, The\n".encode("latin-1"))
    source = detect_folder(tmp_path / "netflix")
    assert source.layout == "netflix" and len(source.ratings) == 2
    rows, titles = read(source)
    assert rows == sorted([(1488844, 1, 3.0, _day("2005-09-06")), (822109, 1, 5.0, _day("2005-05-13")), (1488844, 2, 4.0, _day("2004-01-01"))])
    assert titles[2] == "Isle of Man TT 2004 Review, The"


NETFLIX_SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "netflix-sample"


def test_netflix_loader_on_an_original_prize_file():
    """The one original training_set file we have (movie 2043): every line as a plain Python parse reads it."""
    path = NETFLIX_SAMPLE / "training_set" / "mv_0002043.txt"
    if not path.is_file():
        pytest.fail(f"{path} not found; the test reads the shared original Netflix Prize file")
    source = detect_folder(NETFLIX_SAMPLE)
    assert source.layout == "netflix" and source.ratings == (path,)
    rows, _ = read(source)
    lines = path.read_text().splitlines()
    assert lines[0] == "2043:"
    expected = sorted((int(u), 2043, float(r), _day(d)) for u, r, d in (line.split(",") for line in lines[1:]))
    assert rows == expected
    # the figures SOURCE.md documents for this file
    assert len(rows) == 7871 and len({r[0] for r in rows}) == 7871
    assert {k: sum(r[2] == k for r in rows) for k in (1, 2, 3, 4, 5)} == {1: 208, 2: 507, 3: 2079, 4: 3110, 5: 1967}
    assert (min(r[3] for r in rows), max(r[3] for r in rows)) == (_day("2000-08-03"), _day("2005-12-31"))
    assert (716091, 2043, 2.0, _day("2003-10-02")) in rows and (1272199, 2043, 5.0, _day("2005-12-07")) in rows


def test_netflix_combined_data_blocks(tmp_path: Path):
    (tmp_path / "combined_data_1.txt").write_text("1:\n5,3,2005-09-06\n6,4,2005-09-07\n3:\n5,1,2005-01-01\n")
    (tmp_path / "combined_data_2.txt").write_text("4:\n9,2,2001-02-03\n")
    source = detect_folder(tmp_path)
    assert source.layout == "netflix" and len(source.ratings) == 2
    rows, _ = read(source)
    assert rows == sorted([(5, 1, 3.0, _day("2005-09-06")), (6, 1, 4.0, _day("2005-09-07")), (5, 3, 1.0, _day("2005-01-01")), (9, 4, 2.0, _day("2001-02-03"))])


COLUMNS = {"user_col": "uid", "item_col": "movie", "rating_col": "stars", "ts_col": "when"}


def test_generic_csv_with_configured_columns(tmp_path: Path):
    path = tmp_path / "mine.csv"
    path.write_text("when,extra,uid,movie,stars\n" + "".join(f"{t},x,{u},{i},{r}\n" for u, i, r, t in RATINGS))
    source = resolve_source(str(path), columns=COLUMNS)
    assert source.layout == "csv"
    assert read(source)[0] == sorted(RATINGS)


def test_generic_parquet_with_configured_columns(tmp_path: Path):
    path = tmp_path / "mine.parquet"
    u, i, r, t = zip(*RATINGS)
    pq.write_table(pa.table({"uid": list(u), "movie": list(i), "stars": list(r), "when": list(t)}), path)
    source = resolve_source(str(path), columns=COLUMNS)
    assert source.layout == "parquet"
    assert read(source)[0] == sorted(RATINGS)


def test_ingest_gives_dense_ids_titles_and_every_rating(tmp_path: Path):
    (tmp_path / "u.data").write_text("".join(f"{u}\t{i}\t{int(r)}\t{t}\n" for u, i, r, t in RATINGS))
    (tmp_path / "u.item").write_text("10|Ten (1995)|x\n")
    config = Config(data=DataConfig(dataset=str(tmp_path)), runtime=RuntimeConfig(artifacts_dir=tmp_path / "a"))
    out = tmp_path / "out"
    out.mkdir()
    info = ingest(config, out)
    assert (info["interactions"], info["users"], info["items"]) == (5, 3, 3)
    users = pq.read_table(out / "users.parquet").to_pydict()
    items = pq.read_table(out / "items.parquet").to_pydict()
    assert users == {"user_id": [0, 1, 2], "raw_user": [1, 2, 7]}
    assert items == {"item_id": [0, 1, 2], "raw_item": [3, 10, 20], "title": [None, "Ten (1995)", None]}
    inter = pq.read_table(out / "interactions.parquet").to_pydict()
    assert inter["ts"] == sorted(inter["ts"]) and len(inter["ts"]) == 5


def test_sample_users_is_seeded(tmp_path: Path):
    path = tmp_path / "many.csv"
    path.write_text("user_id,item_id,rating,timestamp\n" + "".join(f"{u},{u % 7},4,{u}\n" for u in range(200)))

    def sampled(seed: int) -> list[int]:
        config = Config(data=DataConfig(dataset=str(path), sample_users=30, seed=seed), runtime=RuntimeConfig(artifacts_dir=tmp_path))
        out = tmp_path / f"s{seed}-{len(list(tmp_path.iterdir()))}"
        out.mkdir()
        ingest(config, out)
        return pq.read_table(out / "users.parquet").column("raw_user").to_pylist()

    first = sampled(1)
    assert len(first) == 30 and sampled(1) == first and sampled(2) != first


def test_search_dirs_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("METAREC_DATA_DIR", str(tmp_path / "env"))
    monkeypatch.chdir(tmp_path)
    dirs = search_dirs(tmp_path / "flag")
    assert dirs[:3] == [tmp_path / "flag", tmp_path / "env", tmp_path / "data"]
    assert dirs[3].name == "datasets" and dirs[3].parent.name == "shared"


def test_known_name_found_in_the_first_dir_that_holds_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    (tmp_path / "mine" / "ml-1m").mkdir(parents=True)
    (tmp_path / "mine" / "ml-1m" / "ratings.dat").write_text("1::2::3::4\n")
    monkeypatch.setenv("METAREC_DATA_DIR", str(tmp_path / "mine"))
    source = resolve_source("ml-1m", data_dir=tmp_path / "empty", download=False)
    assert source.ratings == (tmp_path / "mine" / "ml-1m" / "ratings.dat",)


def test_datasets_command_lists_where_each_known_set_is(ml100k_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from typer.testing import CliRunner

    from flows.cli import app

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("METAREC_DATA_DIR", raising=False)
    result = CliRunner().invoke(app, ["datasets", "--data-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    lines = {line.split()[0]: line for line in result.output.splitlines()[1:]}
    assert Path(lines["ml-100k"].split()[-1]).resolve() == (ml100k_dir / "ml-100k").resolve()  # symlinks alike
    assert "absent (https://files.grouplens.org/datasets/movielens/ml-1m.zip)" in lines["ml-1m"]
    assert "absent (generated on first use)" in lines["synthetic-drift"]


def test_unreadable_titles_leave_titles_null_but_load_the_ratings(tmp_path: Path):
    (tmp_path / "ratings.csv").write_text("userId,movieId,rating,timestamp\n1,10,4.0,100\n")
    (tmp_path / "movies.csv").write_bytes(b"movieId,title,genres\n10,Bad \xff\xfe title,Drama\n")  # not UTF-8
    rows, titles = read(detect_folder(tmp_path))
    assert rows == [(1, 10, 4.0, 100)] and titles == {}


def test_duckdb_memory_limit_and_spill_folder_come_from_the_runtime_config(tmp_path: Path):
    runtime = RuntimeConfig(duckdb_memory_limit="300MB", duckdb_temp_dir=tmp_path / "spill", max_workers=1)
    with duckdb_connection(runtime) as con:
        limit, spill, threads = con.execute(
            "SELECT current_setting('memory_limit'), current_setting('temp_directory'), current_setting('threads')").fetchone()
        assert limit == "286.1 MiB" and threads == 1  # 300 MB in DuckDB's binary units
        assert Path(spill).parent == tmp_path / "spill" and Path(spill).is_dir()
    assert list((tmp_path / "spill").iterdir()) == []  # the private folder (work database, spills) is gone
