"""Bad input: one clear error naming the file, line or column and what was expected; no output left behind."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli import app
from metarec.config import Config, DataConfig, RuntimeConfig
from tasks.data.datasets import DataError
from tasks.data.prepare import prepare_data
from tasks.runtime.settings import ConfigError, load_config

HEADER = "user_id,item_id,rating,timestamp\n"


def fails(tmp_path: Path, dataset: Path | str, message: str, **data) -> DataError:
    """prepare_data raises one DataError matching ``message`` and writes no file at all."""
    root = tmp_path / "artifacts"
    config = Config(data=DataConfig(dataset=str(dataset), download=False, **data), runtime=RuntimeConfig(artifacts_dir=root))
    with pytest.raises(DataError, match=message) as info:
        prepare_data(config)
    # no prepared folder, no partial file (the input-hash cache and lock files are not outputs)
    assert [p for p in root.rglob("*") if p.is_file() and ".cache" not in p.parts and p.suffix != ".lock"] == []
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
    err = fails(tmp_path, tmp_path, re.escape("ratings.csv, line 1: not the header 'userId,movieId,rating,timestamp'"))
    assert "4.5" not in str(err).split("line 1:")[1]  # the file's content is never quoted


@pytest.mark.parametrize(
    "row, message, content",
    [("abc,2,4,100", "the user id is not an integer", "abc"), ("1,x2,4,100", "the item id is not an integer", "x2")],
)
def test_non_numeric_ids(tmp_path: Path, row: str, message: str, content: str):
    (tmp_path / "r.csv").write_text(HEADER + "1,2,4,100\n" + row + "\n")
    err = fails(tmp_path, tmp_path / "r.csv", re.escape(f"r.csv, line 3: {message}"))
    assert content not in str(err).split("line 3:")[1]  # the file's content is never quoted


def test_non_numeric_rating(tmp_path: Path):
    (tmp_path / "u.data").write_text("1\t2\t4\t881250949\n1\t3\tgood\t881250950\n")
    err = fails(tmp_path, tmp_path / "u.data", re.escape("u.data, line 2: the rating is missing or not a finite number"))
    assert "good" not in str(err).split("line 2:")[1]


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("u.data", "1\t2\t4\tyesterday\n", "line 1: the timestamp is not a number of seconds"),
        ("combined_data_1.txt", "1:\n5,3,2005-13-45\n", "line 2: the timestamp is not a date YYYY-MM-DD"),
    ],
)
def test_non_numeric_timestamp(tmp_path: Path, name: str, text: str, message: str):
    (tmp_path / name).write_text(text)
    fails(tmp_path, tmp_path / name, re.escape(f"{name}, {message}"))


def test_nan_rating(tmp_path: Path):
    (tmp_path / "r.csv").write_text(HEADER + "1,2,4,100\n1,3,4,101\n2,3,NaN,102\n")
    fails(tmp_path, tmp_path / "r.csv", re.escape("r.csv, line 4: the rating is missing or not a finite number"))


def test_missing_value(tmp_path: Path):
    (tmp_path / "r.csv").write_text(HEADER + "1,2,4,100\n1,3,,101\n")
    fails(tmp_path, tmp_path / "r.csv", re.escape("r.csv, line 3: the rating is missing or not a finite number"))


@pytest.mark.parametrize("name, text", [("u.data", ""), ("u.data", "\n\n"), ("r.csv", HEADER)])
def test_empty_file(tmp_path: Path, name: str, text: str):
    (tmp_path / name).write_text(text)
    fails(tmp_path, tmp_path / name, "no rating lines|is empty")


def test_missing_column(tmp_path: Path):
    (tmp_path / "r.csv").write_text(many_users(3))
    err = fails(tmp_path, tmp_path / "r.csv", re.escape("column(s) user_col='uid' not found among the file's 4 columns"), user_col="uid")
    assert "item_id" not in str(err)  # the header is the file's content: counted, not quoted


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


# ---------------------------------------------------------------------------- issue 14


def own_items(n_users: int, per_user: int, rating: int = 4, sep: str = ",") -> list[str]:
    """Each user rates ``per_user`` items of their own."""
    return [sep.join(map(str, (u, per_user * u + i, rating, 100 * u + i))) for u in range(n_users) for i in range(per_user)]


def test_no_new_user_with_enough_positives_fails_at_prepare(tmp_path: Path):
    """Item 4: such a data set prepared, trained and registered a model, then crashed in evaluation."""
    (tmp_path / "r.csv").write_text(HEADER + "\n".join(own_items(30, 8)) + "\n")
    fails(tmp_path, tmp_path / "r.csv", re.escape("no new user in") + ".*" + re.escape(">= 11 positives (max(data.new_user_ns)=10")
          + ".*" + re.escape("the 3 new users have at most 8"))


@pytest.mark.parametrize("name, first, bad, expected", [
    ("u.data", "", "1\t2\t40\t881250949", "1 to 5 in steps of 1"),  # ratings x10: every one would be a positive
    ("u.data", "", "1\t2\t3.5\t881250949", "1 to 5 in steps of 1"),
    ("ratings.dat", "", "1::2::0::978300760", "1 to 5 in steps of 1"),
    ("ratings.csv", "userId,movieId,rating,timestamp\n", "1,2,4.25,100", "0.5 to 5 in steps of 0.5"),
    ("combined_data_1.txt", "1:\n", "6,9,2005-09-06", "1 to 5 in steps of 1"),
])
def test_rating_off_the_format_scale_is_rejected(tmp_path: Path, name: str, first: str, bad: str, expected: str):
    """Item 11: out-of-range ratings were taken as they came."""
    good = {"u.data": "1\t3\t4\t881250950", "ratings.dat": "1::3::4::978300761", "ratings.csv": "1,3,4.5,101", "combined_data_1.txt": "5,4,2005-09-07"}[name]
    (tmp_path / name).write_text(first + good + "\n" + bad + "\n")
    line = first.count("\n") + 2
    dataset = tmp_path if name == "ratings.csv" else tmp_path / name  # MovieLens latest is recognised by its folder
    fails(tmp_path, dataset, re.escape(f"{name}, line {line}: the rating is off the") + ".*" + re.escape(f"expected {expected}"))


SECRET = "hunter2-SECRET-LINE"


@pytest.mark.parametrize("name, content", [
    ("u.data", f"{SECRET}\n".encode()),  # one field instead of four
    ("r.csv", f"{SECRET},b,c,d\n1,2,3,4\n".encode()),  # the header is the file's first line
    ("r.csv", (HEADER + f"{SECRET},2,4,100\n").encode()),  # a user id that is no integer
    ("u.data", b"1\t2\t4\t5\n\xff\xfe" + SECRET.encode() + b"\t2\t3\t4\n"),  # not UTF-8: DuckDB quotes the line
])
def test_errors_name_the_file_and_line_never_the_content(tmp_path: Path, name: str, content: bytes):
    """Item 13: an error printed the first line of an arbitrary file into Prefect logs and MLflow tags."""
    (tmp_path / name).write_bytes(content)
    err = fails(tmp_path, tmp_path / name, re.escape(name))
    assert SECRET not in str(err)
