"""The planted-drift data set: the signal is there (recency matters), the files are deterministic, and the pipeline
reads it as the named data set ``synthetic-drift`` in ML-1M's format."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from metarec.synthetic import ML1M_END, ML1M_START, DriftParams, drift_ratings
from tasks.data import generated
from tasks.data.datasets import EXPECTED, load_raw, resolve_source
from tasks.data.prepare import duckdb_connection
from tasks.runtime.sqlfiles import run_sql

SMALL = DriftParams(n_users=800, n_items=540, n_groups=9, mean_ratings=60.0, seed=5)


def _hr_ndcg(scores: np.ndarray) -> tuple[float, float]:
    """HR@10 and NDCG@10 of (B, 1 + negatives) scores with the true item in column 0 (ties count half a place)."""
    rank = (scores[:, 1:] > scores[:, :1]).sum(1) + 0.5 * (scores[:, 1:] == scores[:, :1]).sum(1)
    return float((rank < 10).mean()), float(np.where(rank < 10, 1 / np.log2(rank + 2), 0).mean())


@pytest.fixture(scope="module")
def small() -> dict:
    """Positives, and cases: each positive after a user's first, against 100 items the user never rated."""
    d = drift_ratings(SMALL)
    pos = d.ratings >= 3
    users, items, interest = d.users[pos] - 1, d.items[pos] - 1, d.interest[pos]
    rng = np.random.default_rng(0)
    cases = rng.choice(np.flatnonzero(np.r_[False, users[1:] == users[:-1]]), 3000, replace=False)
    rated = np.zeros((SMALL.n_users, SMALL.n_items), dtype=bool)
    rated[d.users - 1, d.items - 1] = True
    negatives = np.stack([rng.choice(np.flatnonzero(~rated[users[c]]), 100, replace=False) for c in cases])
    return {"d": d, "users": users, "items": items, "interest": interest, "cases": cases,
            "candidates": np.concatenate([items[cases][:, None], negatives], axis=1)}


def test_an_oracle_of_the_current_interest_beats_popularity_by_far(small):
    d, cand, cases = small["d"], small["candidates"], small["cases"]
    popularity = np.bincount(small["items"], minlength=SMALL.n_items)[cand].astype(float)
    popularity /= popularity.max()
    oracle = popularity + (d.item_group[cand] == small["interest"][cases][:, None])
    pop_hr, pop_ndcg = _hr_ndcg(popularity)
    oracle_hr, oracle_ndcg = _hr_ndcg(oracle)
    assert oracle_hr > pop_hr + 0.4 and oracle_ndcg > pop_ndcg + 0.35, (oracle_hr, pop_hr, oracle_ndcg, pop_ndcg)


def test_recency_matters_the_last_items_group_beats_the_whole_pasts(small):
    """Observable by any model: the group of the user's last positive predicts the next item far better than the
    group most frequent in its whole past (the interest switched since)."""
    d, cand, cases, users, items = small["d"], small["candidates"], small["cases"], small["users"], small["items"]
    group = d.item_group
    popularity = np.bincount(items, minlength=SMALL.n_items)[cand] / len(items)
    last = popularity + (group[cand] == group[items[cases - 1]][:, None])
    first_of_user = np.searchsorted(users, users[cases])  # positives are sorted by (user, time)
    majority = np.array([np.bincount(group[items[f:c]], minlength=SMALL.n_groups).argmax() for f, c in zip(first_of_user, cases)])
    whole = popularity + (group[cand] == majority[:, None])
    assert _hr_ndcg(last)[1] > _hr_ndcg(whole)[1] + 0.15, (_hr_ndcg(last), _hr_ndcg(whole))


def test_interests_switch_at_random_times_new_users_first_ten_included(small):
    d = small["d"]
    position = np.arange(len(d.users)) - np.searchsorted(d.users, d.users)
    early = np.unique(d.users[d.switch & (position < 10)])
    assert 0.2 < len(early) / SMALL.n_users < 0.6  # P(a switch among the first 10) = 1 - (1 - 1/20)^9 ≈ 0.37
    run_lengths = np.diff(np.flatnonzero(np.r_[True, d.switch[1:] | (d.users[1:] != d.users[:-1]), True]))
    assert 12 < run_lengths.mean() < 25
    off = (d.drawn_group != d.interest).mean()  # noise, plus heavy users spilling over once their groups run out
    assert SMALL.noise - 0.02 < off < SMALL.noise + 0.06
    # distinct items per user, strictly increasing times per user
    assert len(np.unique(d.users * (SMALL.n_items + 1) + d.items)) == len(d.users)
    assert (np.diff(d.ts)[np.diff(d.users) == 0] > 0).all()


def test_default_sizes_are_ml1m_like():
    d = drift_ratings()
    assert (d.users.max(), d.items.max()) == (6040, 3706) and len(np.unique(d.users)) == 6040
    assert 0.95e6 < len(d.users) < 1.05e6 and np.bincount(d.users)[1:].min() >= 20
    assert ML1M_START <= d.ts.min() and d.ts.max() <= ML1M_END + 2400
    assert 0.75 < (d.ratings >= 3).mean() < 0.9 and set(np.unique(d.ratings).tolist()) == {1, 2, 3, 4, 5}


def test_same_seed_byte_identical_files_other_seed_other_files(tmp_path: Path):
    first = generated.write_drift_dataset(tmp_path / "a", SMALL)
    again = generated.write_drift_dataset(tmp_path / "b", SMALL)
    other = generated.write_drift_dataset(tmp_path / "c", dataclasses.replace(SMALL, seed=6))
    for name in ("ratings.dat", "movies.dat", "users.dat", "SOURCE.md"):
        assert (first / name).read_bytes() == (again / name).read_bytes(), name
    assert (first / "ratings.dat").read_bytes() != (other / "ratings.dat").read_bytes()
    source = (first / "SOURCE.md").read_text()
    assert "| `seed` | 5 |" in source and f"fingerprint: `{generated.fingerprint(SMALL)}`" in source
    assert generated.recorded_fingerprint(first) == generated.fingerprint(SMALL) != generated.recorded_fingerprint(other)


def test_the_named_data_set_is_generated_on_first_use_and_read_as_ml1m(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(generated.GENERATED, "synthetic-drift", SMALL)
    monkeypatch.delenv("METAREC_DATA_DIR", raising=False)
    source = resolve_source("synthetic-drift", data_dir=tmp_path)
    folder = tmp_path / "synthetic-drift"
    assert source.layout == "ml-1m" and source.ratings == (folder / "ratings.dat",) and source.titles == folder / "movies.dat"
    stamp = (folder / "ratings.dat").stat().st_mtime_ns
    assert resolve_source("synthetic-drift", data_dir=tmp_path).ratings == source.ratings
    assert (folder / "ratings.dat").stat().st_mtime_ns == stamp  # found, not generated again
    with duckdb_connection() as con:  # the ordinary ML-1M loader reads it
        load_raw(con, source)
        run_sql(con, "ratings", {"ts_format": EXPECTED["ml-1m"][2]})
        n_rows, n_users, n_items = con.execute("SELECT count(*), count(DISTINCT raw_user), count(DISTINCT raw_item) FROM ratings").fetchone()
        titles = dict(con.execute("SELECT raw_item, title FROM titles").fetchall())
    d = drift_ratings(SMALL)
    assert (n_rows, n_users, n_items) == (len(d.users), SMALL.n_users, SMALL.n_items) and len(titles) == SMALL.n_items
    genres = [line.split("::")[2].strip() for line in (folder / "movies.dat").read_text(encoding="latin-1").splitlines()]
    assert len(set(genres)) == SMALL.n_groups and (folder / "users.dat").read_text().count("\n") == SMALL.n_users
    monkeypatch.setitem(generated.GENERATED, "synthetic-drift", dataclasses.replace(SMALL, noise=0.2))
    resolve_source("synthetic-drift", data_dir=tmp_path)  # another generator's folder is generated afresh
    assert generated.recorded_fingerprint(folder) == generated.fingerprint(dataclasses.replace(SMALL, noise=0.2))
