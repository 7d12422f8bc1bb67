"""New-user folds: a partition of the users, each fold a full split, pooled case by case across models."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from metarec.config import Config, DataConfig, RuntimeConfig
from tasks.data.prepare import run_steps
from test_split import write_ratings


def fold_config(csv_path: Path, root: Path, fold: int, **data) -> Config:
    return Config(data=DataConfig(dataset=str(csv_path), fold=fold, n_negatives=20, **data), runtime=RuntimeConfig(artifacts_dir=root))


def users_of(out: Path, name: str) -> set[int]:
    return set(pq.read_table(out / f"{name}.parquet").column("user_id").to_pylist())


@pytest.fixture(scope="module")
def all_folds(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("folds")
    write_ratings(root / "ratings.csv")
    outs = []
    for fold in range(10):  # new_user_fraction 0.1: ten groups
        out = root / f"fold{fold}"
        out.mkdir()
        run_steps(fold_config(root / "ratings.csv", root, fold), out)
        outs.append(out)
    return outs


def test_folds_partition_the_users_and_each_user_is_new_exactly_once(all_folds):
    new = [users_of(out, "new_users") for out in all_folds]
    everyone = users_of(all_folds[0], "new_users") | users_of(all_folds[0], "history") | users_of(all_folds[0], "stream")
    assert sum(len(s) for s in new) == len(set().union(*new)) == len(everyone)  # disjoint, and cover every user
    assert max(len(s) for s in new) - min(len(s) for s in new) <= 1  # dealt evenly
    for out, users in zip(all_folds, new):
        assert not users & users_of(out, "history") and not users & users_of(out, "stream")  # never in its own fold's training data


def test_fold_zero_of_one_fold_is_fold_zero_of_many(all_folds, tmp_path):
    """A quick run (F = 1) evaluates exactly fold 0 of a full run: the fold count is not part of any split."""
    root = Path(all_folds[0]).parent
    alone = fold_config(root / "ratings.csv", root, 0, new_user_folds=1)
    pooled = fold_config(root / "ratings.csv", root, 0, new_user_folds=10)
    assert alone.hash_of("data") == pooled.hash_of("data")
    assert alone.hash_of("data") != fold_config(root / "ratings.csv", root, 1).hash_of("data")


def test_fold_count_is_bounded_by_the_deal():
    with pytest.raises(ValueError, match="new_user_folds"):
        DataConfig(new_user_fraction=0.25, new_user_folds=5)  # only 4 disjoint groups
    assert DataConfig().new_user_folds == 10  # the paper's 10%: every user new once
    assert DataConfig(new_user_fraction=0.25).new_user_folds == 4  # unset, it follows the deal instead of failing
    with pytest.raises(ValueError, match="fold"):
        DataConfig(fold=10)


@pytest.mark.slow
def test_pipeline_pools_two_folds_on_the_same_stored_cases(prefect_harness, tmp_path, monkeypatch):
    """Two folds, two models: the pooled cases hold both folds, pair up row for row across models, and feed
    Table 1, the per-fold CSV, the verdicts and the forest plot."""
    write_ratings(tmp_path / "ratings.csv")
    monkeypatch.setenv("METAREC_RUNTIME__ARTIFACTS_DIR", str(tmp_path / "artifacts"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    from flows.pipeline import fold_configs, pipeline
    from tasks.evaluate.pooling import pool_cases
    from tasks.runtime.paths import run_dir
    from tasks.runtime.settings import load_config
    from tasks.train.tuning import tuned_source

    config = load_config(overrides=[
        "data.new_user_folds=2", "data.new_user_ns=[1, 3]", "data.n_negatives=20", "eval.models=['responsive', 'pop']",
        "meta.epochs=1", "meta.dim=8", "tasks.K=10", "eval.bootstrap=100", "eval.full_ranking=false",
    ], data={"dataset": str(tmp_path / "ratings.csv")})
    result = pipeline(config)
    run = Path(result["run_dir"])
    ran = tuned_source(config)[0]  # a CSV without a record of its own borrows ml-100k's values: the run's stage keys
    cases = pool_cases({c.data.fold: run_dir(c) for c in fold_configs(ran)}, ["responsive", "pop"])
    assert set(cases) == {"responsive", "pop"}
    ours, pop = cases["responsive"], cases["pop"]
    assert sorted(set(ours["fold"].to_pylist())) == [0, 1]
    for column in ("fold", "case", "part", "n", "batch", "user_id"):
        assert ours[column].to_pylist() == pop[column].to_pylist()  # the same stored cases for every model
    new_cases = sum(1 for p in ours["part"].to_pylist() if p == "new")
    assert result["results"]["pop"]["metrics"]["new_n1_hr10"]["cases"] * 2 == new_cases  # n = 1 and 3, pooled over folds
    per_fold = list(csv.DictReader(io.StringIO((run / "table1_folds.csv").read_text())))
    assert {row["fold"] for row in per_fold} == {"0", "1"}
    verdicts = list(csv.DictReader(io.StringIO((run / "verdicts.csv").read_text())))
    assert {(v["ours"], v["other"]) for v in verdicts} == {("responsive", "pop")}
    assert all(v["verdict"] in ("wins", "loses", "tie") for v in verdicts)
    assert (run / "forest.png").read_bytes()[:4] == b"\x89PNG"
    assert "minus each other model" in (run / "summary.md").read_text()
    assert "pooled over 2 new-user folds" in (run / "table1.md").read_text()
    assert np.isfinite(result["results"]["responsive"]["metrics"]["stream_auc_mean"]["mean"])
