"""Bad input: one clear error naming the file, line or column and what was expected; no output left behind."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli import app
from metarec.config import Config, DataConfig, RuntimeConfig
from tasks.datasets import DataError
from tasks.prepare import prepare_data
from tasks.settings import ConfigError, load_config

HEADER = "user_id,item_id,rating,timestamp\n"


def fails(tmp_path: Path, dataset: Path | str, message: str, **data) -> DataError:
    """prepare_data raises one DataError matching ``message`` and writes no file at all."""
    root = tmp_path / "artifacts"
    config = Config(data=DataConfig(dataset=str(dataset), download=False, **data), runtime=RuntimeConfig(artifacts_dir=root))
    with pytest.raises(DataError, match=message) as info:
        prepare_data(config)
    assert [p for p in root.rglob("*") if p.is_file()] == []  # no prepared folder, no partial file
    assert not [p for p in root.rglob(".*.tmp")], "a temporary folder was left behind"
    return info.value


def many_users(n_users: int, rating: int = 4) -> str:
    return HEADER + "".join(f"{u},{i},{rating},{100 * u + i}\n" for u in range(n_users) for i in range(12))


def test_missing_file(tmp_path: Path):
    err = fails(tmp_path, tmp_path / "nope.csv", "neither a known name")
    assert str(tmp_path / "nope.csv") in str(err)


def test_missing_known_dataset_offline_names_every_dir_and_the_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("METAREC_DATA_DIR", str(tmp_path / "env"))
    err = fails(tmp_path, "ml-1m", "not found", data_dir=tmp_path / "flag")
    for part in (tmp_path / "flag", tmp_path / "env", tmp_path / "data", "https://files.grouplens.org/datasets/movielens/ml-1m.zip"):
        assert str(part) in str(err)


def test_wrong_delimiter(tmp_path: Path):
    (tmp_path / "u.data").write_text("1,2,3,881250949\n")
    fails(tmp_path, tmp_path / "u.data", re.escape("u.data, line 1: 1 field(s), expected 4 tab-separated fields"))


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("ratings.dat", "1::2::3::978300760\n1::2::3::4::5\n", r"ratings.dat, line 2: 5 field\(s\), expected 4 '::'-separated"),
        ("combined_data_1.txt", "1,3,2005-09-06\n", r"combined_data_1.txt, line 1: a rating line before any 'MovieID:' line"),
        ("ratings.parquet", "this is not parquet", r"ratings.parquet: could not be read as parquet"),
    ],
)
def test_wrong_format(tmp_path: Path, name: str, text: str, message: str):
    (tmp_path / name).write_text(text)
    fails(tmp_path, tmp_path / name, message)


def test_wrong_format_movielens_latest_header(tmp_path: Path):
    (tmp_path / "ratings.csv").write_text("1,2,4.5,100\n1,3,4,101\n")  # no header: its first rating would be lost
    fails(tmp_path, tmp_path, re.escape("ratings.csv, line 1: header '1,2,4.5,100', expected 'userId,movieId,rating,timestamp'"))


@pytest.mark.parametrize(
    "row, message",
    [("abc,2,4,100", "user id 'abc' is not an integer"), ("1,x2,4,100", "item id 'x2' is not an integer")],
)
def test_non_numeric_ids(tmp_path: Path, row: str, message: str):
    (tmp_path / "r.csv").write_text(HEADER + "1,2,4,100\n" + row + "\n")
    fails(tmp_path, tmp_path / "r.csv", re.escape(f"r.csv, line 3: {message}"))


def test_non_numeric_rating(tmp_path: Path):
    (tmp_path / "u.data").write_text("1\t2\t4\t881250949\n1\t3\tgood\t881250950\n")
    fails(tmp_path, tmp_path / "u.data", re.escape("u.data, line 2: rating 'good' is not a finite number"))


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("u.data", "1\t2\t4\tyesterday\n", "line 1: timestamp 'yesterday' is not an integer number of seconds"),
        ("combined_data_1.txt", "1:\n5,3,2005-13-45\n", "line 2: timestamp '2005-13-45' is not a date YYYY-MM-DD"),
    ],
)
def test_non_numeric_timestamp(tmp_path: Path, name: str, text: str, message: str):
    (tmp_path / name).write_text(text)
    fails(tmp_path, tmp_path / name, re.escape(f"{name}, {message}"))


def test_nan_rating(tmp_path: Path):
    (tmp_path / "r.csv").write_text(HEADER + "1,2,4,100\n1,3,4,101\n2,3,NaN,102\n")
    fails(tmp_path, tmp_path / "r.csv", re.escape("r.csv, line 4: rating 'NaN' is not a finite number"))


def test_missing_value(tmp_path: Path):
    (tmp_path / "r.csv").write_text(HEADER + "1,2,4,100\n1,3,,101\n")
    fails(tmp_path, tmp_path / "r.csv", re.escape("r.csv, line 3: rating None is not a finite number"))


@pytest.mark.parametrize("name, text", [("u.data", ""), ("u.data", "\n\n"), ("r.csv", HEADER)])
def test_empty_file(tmp_path: Path, name: str, text: str):
    (tmp_path / name).write_text(text)
    fails(tmp_path, tmp_path / name, "no rating lines|is empty")


def test_missing_column(tmp_path: Path):
    (tmp_path / "r.csv").write_text(many_users(3))
    err = fails(tmp_path, tmp_path / "r.csv", re.escape("column(s) user_col='uid' not found"), user_col="uid")
    assert "['user_id', 'item_id', 'rating', 'timestamp']" in str(err)


def test_no_positives_after_filtering(tmp_path: Path):
    (tmp_path / "r.csv").write_text(many_users(30, rating=2))
    fails(tmp_path, tmp_path / "r.csv", re.escape("no positive interactions") + ".*" + re.escape("data.rating_threshold=3.0"))


def test_too_few_users_for_the_split(tmp_path: Path):
    (tmp_path / "r.csv").write_text(many_users(4))  # 4 users dealt into 10 groups: group 7 is empty
    fails(tmp_path, tmp_path / "r.csv", re.escape("too few users for the split") + ".*" + re.escape("0 new and 4 remaining"), fold=7)


def test_too_few_interactions_for_the_stream(tmp_path: Path):
    (tmp_path / "r.csv").write_text(many_users(10))  # 108 remaining positives: 11 stream rows
    fails(tmp_path, tmp_path / "r.csv", re.escape("data.stream_batches=20"), stream_batches=20)


@pytest.mark.parametrize("override", ["data.new_user_fraction=0", "data.new_user_fraction=1.5", "data.history_fraction=1.0"])
def test_fraction_outside_zero_one(override: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    field = override.split("=")[0]
    with pytest.raises(ConfigError, match=re.escape(field)):
        load_config(overrides=[override])
    monkeypatch.setenv("METAREC_RUNTIME__ARTIFACTS_DIR", str(tmp_path / "artifacts"))
    result = CliRunner().invoke(app, ["prepare", "--set", override])
    assert result.exit_code == 2 and field in result.output
    assert not (tmp_path / "artifacts").exists()
