"""Side features: read with DuckDB from the real MovieLens files, keyed by dense id; bad files refused clearly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from metarec.config import Config, DataConfig, RuntimeConfig
from tasks.data.datasets import DataError
from tasks.data.features import FeatureFile, load_feature_file
from tasks.data.prepare import duckdb_connection, features, ingest, prepare_data
from tasks.data.prepared import load_feature_table, load_prepared
from tasks.runtime.sqlfiles import run_sql

ML1M_HALF = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "ml-1m-first2999"
HEADER = "user_id,item_id,rating,timestamp\n"


def _values(path: Path, entity: int) -> dict[str, set[str]]:
    table = pq.read_table(path).to_pylist()
    out: dict[str, set[str]] = {}
    for row in table:
        if row["entity_id"] == entity:
            out.setdefault(row["field"], set()).add(row["value"])
    return out


def _config(dataset: Path | str, root: Path, **data) -> Config:
    return Config(data=DataConfig(dataset=str(dataset), download=False, n_negatives=5, stream_batches=2, **data), runtime=RuntimeConfig(artifacts_dir=root))


def test_ml100k_u_user_and_u_item_by_dense_id(ml100k_dir: Path, tmp_path: Path):
    config = _config(ml100k_dir / "ml-100k", tmp_path / "a")
    out = tmp_path / "out"
    out.mkdir()
    ingest(config, out)
    info = features(config, out)
    assert info["users"]["fields"] == ["age", "gender", "occupation", "zip"] and info["users"]["entities"] == 943
    assert info["items"]["fields"] == ["genre", "year"] and info["items"]["entities"] == 1682
    raw_users = pq.read_table(out / "users.parquet").column("raw_user").to_pylist()
    raw_items = pq.read_table(out / "items.parquet").column("raw_item").to_pylist()
    # u.user line 1: 1|24|M|technician|85711 (age 24 falls in ML-1M's 18-24 group)
    assert _values(out / "user_features.parquet", raw_users.index(1)) == {"age": {"18"}, "gender": {"M"}, "occupation": {"technician"}, "zip": {"85"}}
    # u.item line 1: Toy Story, 01-Jan-1995, Animation|Children's|Comedy
    assert _values(out / "item_features.parquet", raw_items.index(1)) == {"genre": {"Animation", "Children's", "Comedy"}, "year": {"1995"}}
    # item 267 has no date and only the 'unknown' genre: no year, one genre
    assert _values(out / "item_features.parquet", raw_items.index(267)) == {"genre": {"unknown"}}
    table = load_feature_table(out / "item_features.parquet", 1682)
    assert table.fields == ("genre", "year") and table.codes.shape[0] == 1682 and (table.codes[raw_items.index(1)] >= 0).sum() == 4


def test_ml1m_users_dat_and_latin1_movies_dat():
    assert (ML1M_HALF / "users.dat").is_file(), f"{ML1M_HALF} not found; the tests read the shared copy"
    data = DataConfig()
    with duckdb_connection() as con:
        run_sql(con, "feature_table")
        load_feature_file(con, FeatureFile("user", ML1M_HALF / "users.dat", "ml-1m-users"), data)
        load_feature_file(con, FeatureFile("item", ML1M_HALF / "movies.dat", "ml-1m-items"), data)
        rows = con.execute("SELECT kind, raw_id, field, value FROM raw_features WHERE raw_id IN (1, 73) ORDER BY ALL").fetchall()
        counts = dict(con.execute("SELECT kind, count(DISTINCT raw_id) FROM raw_features GROUP BY kind").fetchall())
    by = lambda kind, raw: {(f, v) for k, r, f, v in rows if k == kind and r == raw}  # noqa: E731
    assert by("user", 1) == {("gender", "F"), ("age", "1"), ("occupation", "10"), ("zip", "48")}
    assert by("item", 1) == {("genre", "Animation"), ("genre", "Children's"), ("genre", "Comedy"), ("year", "1995")}
    assert by("item", 73) == {("genre", "Drama"), ("genre", "Musical"), ("year", "1995")}  # "Misérables, Les (1995)", ISO-8859-1
    assert counts == {"user": 6040, "item": 3883}


def _ml100k_folder(tmp_path: Path, u_user: str, u_item: str) -> Path:
    folder = tmp_path / "ml-tiny"
    folder.mkdir()
    (folder / "u.data").write_text("".join(f"{u}\t{i}\t4\t{100 * u + i}\n" for u in range(1, 31) for i in range(1, 13)))
    (folder / "u.user").write_text(u_user)
    (folder / "u.item").write_text(u_item)
    return folder


GOOD_USER = "1|24|M|technician|85711\n"
GOOD_ITEM = "1|Toy Story (1995)|01-Jan-1995||http://x|" + "|".join(["0", "0", "0", "1", "1", "1"] + ["0"] * 13) + "\n"


def _fails(tmp_path: Path, config: Config, message: str) -> None:
    """prepare_data raises one DataError matching ``message`` and writes no file at all."""
    with pytest.raises(DataError, match=message):
        prepare_data(config)
    root = Path(config.runtime.artifacts_dir)
    # no prepared file (the input-hash cache and lock files are not outputs)
    assert [p for p in root.rglob("*") if p.is_file() and ".cache" not in p.parts and p.suffix != ".lock"] == []


@pytest.mark.parametrize(
    "u_user, u_item, message",
    [
        (GOOD_USER + "2|53|F|other\n", GOOD_ITEM, r"u\.user, line 2: 4 field\(s\); expected 5 '\|'-separated fields"),
        (GOOD_USER + "2|fifty|F|other|94043\n", GOOD_ITEM, r"u\.user, line 2: field 2 is not an integer; expected 5"),
        (GOOD_USER, GOOD_ITEM.replace("|1|1|1|", "|1|2|1|"), r"u\.item, line 1: field 10 is not a 0/1 genre flag; expected 24 '\|'-separated"),
        (GOOD_USER, "1|Toy Story (1995)|01-Jan-1995\n", r"u\.item, line 1: 3 field\(s\)"),
    ],
)
def test_wrong_format_movielens_profile_files_are_refused(tmp_path: Path, u_user: str, u_item: str, message: str):
    _fails(tmp_path, _config(_ml100k_folder(tmp_path, u_user, u_item), tmp_path / "artifacts"), message)


def _generic(tmp_path: Path) -> Path:
    path = tmp_path / "ratings.csv"
    path.write_text(HEADER + "".join(f"{u},{(u + i) % 40},4,{100 * u + i}\n" for u in range(30) for i in range(12)))
    return path


@pytest.mark.parametrize(
    "text, message",
    [
        ("user_id,country\n1,fr\nx7,de\n", r"users\.csv, line 3: the id is not an integer; expected one row per user"),
        ("user_id,country\n1,fr\n2,de\n1,it\n", r"users\.csv, line 4: the id repeats line 2"),
        ("uid,country\n1,fr\n", r"users\.csv, line 1: column\(s\) \['user_id'\] not found among the header's 2 columns"),
        ("user_id\n1\n", r"users\.csv, line 1: only the id column 'user_id'"),
    ],
)
def test_wrong_format_generic_feature_file_is_refused(tmp_path: Path, text: str, message: str):
    (tmp_path / "users.csv").write_text(text)
    _fails(tmp_path, _config(_generic(tmp_path), tmp_path / "artifacts", user_features=tmp_path / "users.csv"), message)


def test_generic_feature_files_csv_and_parquet_multi_valued(tmp_path: Path):
    (tmp_path / "users.csv").write_text("user_id,country,langs\n0,fr,fr|en\n1,de,\n2,,en\n")
    pq.write_table(pa.table({"item_id": [0, 1, 2], "colour": ["red", "blue", "red|blue"]}), tmp_path / "items.parquet")
    config = _config(_generic(tmp_path), tmp_path / "artifacts", user_features=tmp_path / "users.csv", item_features=tmp_path / "items.parquet")
    data = load_prepared(prepare_data(config))
    users, items = data.features.users, data.features.items
    assert users.fields == ("country", "langs") and users.codes.shape[0] == data.n_users == 30
    assert sorted(users.code_field[users.codes[0][users.codes[0] >= 0]].tolist()) == [0, 1, 1]  # fr; fr, en
    assert (users.codes[3] < 0).all()  # a user without a row: every field missing
    assert items.fields == ("colour",) and items.codes.shape[0] == data.n_items == 40 and (items.codes[2] >= 0).sum() == 2
    assert data.stats["features"]["users"]["fields"] == ["country", "langs"]


def test_movielens_latest_movies_csv(tmp_path: Path):
    (tmp_path / "ratings.csv").write_text("userId,movieId,rating,timestamp\n" + "".join(f"{u},{i},4.0,{100 * u + i}\n" for u in range(1, 31) for i in range(1, 13)))
    (tmp_path / "movies.csv").write_text('movieId,title,genres\n1,"American President, The (1995)",Comedy|Drama\n2,Untitled,(no genres listed)\n')
    config = _config(tmp_path, tmp_path / "artifacts")
    out = tmp_path / "out"
    out.mkdir()
    ingest(config, out)
    info = features(config, out)
    assert info["users"] is None and info["items"]["fields"] == ["genre", "year"]
    assert _values(out / "item_features.parquet", 0) == {"genre": {"Comedy", "Drama"}, "year": {"1995"}}
    assert _values(out / "item_features.parquet", 1) == {}


def test_a_data_set_without_feature_files_has_none(tmp_path: Path):
    data = load_prepared(prepare_data(_config(_generic(tmp_path), tmp_path / "artifacts")))
    assert data.features.users is None and data.features.items is None
    assert data.stats["features"] == {"users": None, "items": None}
