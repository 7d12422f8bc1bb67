"""The validation search: history-only split, same budget for every model, seeded, chosen values usable."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from metarec.config import BaselineConfig, Config, MetaConfig
from metarec.synthetic import planted_interactions
from tasks.tuning import SEARCH_SPACES, apply_tuned, draw_configs, tune_baselines, tune_model, validation_split, with_values


def tiny_config() -> Config:
    return Config(
        data={"n_negatives": 30, "new_user_ns": (1, 3)},
        baselines=BaselineConfig(dim=8, epochs=3, tune_budget=2, srec_passes=1, spmf_reservoir=200, spmf_samples=50),
        meta=MetaConfig(dim=8),
        tuned={},
    )


@pytest.fixture(scope="module")
def history():
    return planted_interactions(n_users=80, n_items=60, per_user=12, seed=5).interactions


def test_validation_split_uses_the_history_only_and_cuts_by_time(history) -> None:
    config = tiny_config()
    split = validation_split(history, config)
    train = split["train"]
    tail_batches = [batch for batch, _, _ in split["tail"]]
    assert train.ts.max() <= min(b.ts.min() for b in tail_batches)
    new_users = split["new"][1][0].users
    assert not np.isin(new_users, train.users).any()
    assert not np.isin(new_users, np.concatenate([b.users for b in tail_batches])).any()
    # candidates: the true item first, then negatives the user never had anywhere in the history
    positives = set(zip(history.users.tolist(), history.items.tolist()))
    for _, users, cands in split["tail"]:
        assert cands.shape[1] == 1 + config.data.n_negatives
        assert all((u, c) not in positives for u, row in zip(users.tolist(), cands[:, 1:].tolist()) for c in row)
    recent, cands = split["new"][3]
    assert recent.items.shape == (len(recent.users), 3)
    again = validation_split(history, config)
    np.testing.assert_array_equal(again["new"][3][1], cands)


def test_every_model_gets_the_same_budget_defaults_first() -> None:
    for name in ("rkmf", "srec", "spmf", "mf_ft"):
        draws = draw_configs(name, 6, seed=1)
        assert len(draws) == 6 and draws[0] == {}
        assert len({json.dumps(d, sort_keys=True) for d in draws}) == 6
        assert all(set(d) == set(SEARCH_SPACES[name]) for d in draws[1:])
        assert draws == draw_configs(name, 6, seed=1)
        assert draws != draw_configs(name, 6, seed=2)
    assert draw_configs("pop", 6, seed=1) == [{}]  # nothing to tune


def test_with_values_validates_and_applies_per_model() -> None:
    config = with_values(tiny_config(), "rkmf", {"baselines.lr": 0.02, "baselines.rkmf_kernel": "linear"})
    assert config.for_row("rkmf").baselines.lr == 0.02
    assert config.for_row("spmf").baselines.lr == tiny_config().baselines.lr
    with pytest.raises(ValueError, match="lr"):
        with_values(tiny_config(), "rkmf", {"baselines.lr": -1.0})


def test_tune_model_picks_the_best_trial(history) -> None:
    config = tiny_config()
    result = tune_model("spmf", config, validation_split(history, config))
    objectives = [t["metrics"]["objective"] for t in result["trials"]]
    assert len(objectives) == config.baselines.tune_budget
    assert objectives[result["best_trial"]] == max(objectives)
    assert result["chosen"].items() >= result["trials"][result["best_trial"]]["values"].items()
    assert set(result["chosen"]) == set(SEARCH_SPACES["spmf"])


def test_tune_baselines_writes_a_record_that_configures_the_models(history, artifacts) -> None:
    config = tiny_config()
    path = tune_baselines(config, ("rkmf", "pop"), history=history)
    record = json.loads(path.read_text())
    assert record["budget"] == 2 and set(record["models"]) == {"rkmf", "pop"}
    assert record["search_spaces"]["rkmf"] == SEARCH_SPACES["rkmf"]
    tuned = apply_tuned(config, path)
    assert tuned.tuned["rkmf"] == record["models"]["rkmf"]["chosen"]
    assert not list(path.parent.glob(".*.tmp"))  # written atomically
    with pytest.raises(ValueError, match="nope"):
        tune_baselines(config, ("nope",), history=history)


def test_responsive_gets_the_same_budget_and_protocol_its_values_go_to_meta_and_tasks(history, artifacts) -> None:
    draws = draw_configs("responsive", 8, seed=1)
    assert len(draws) == 8 and draws[0] == {}
    assert all(set(d) == set(SEARCH_SPACES["responsive"]) for d in draws[1:])
    assert draws[:3] != draw_configs("rkmf", 8, seed=1)[:3]
    assert draw_configs("rkmf", 8, seed=1) == draw_configs("rkmf", 8, seed=1)  # baselines' draws unchanged by its addition
    config = with_values(tiny_config(), "responsive", {"meta.lambda_ml": 2.0, "tasks.k": 3}).for_row("responsive")
    assert config.meta.lambda_ml == 2.0 and config.tasks.k == 3 and config.meta.dim == 8
    assert config.baselines == tiny_config().baselines
    with pytest.raises(ValueError, match="lambda_ml"):
        with_values(tiny_config(), "responsive", {"meta.lambda_ml": -1.0})
    with pytest.raises(ValueError, match="meta.nope"):
        with_values(tiny_config(), "responsive", {"meta.nope": 1})
    # a real (small) search: every trial scored on the same split, the record configures meta/tasks
    config = tiny_config().model_copy(update={"meta": MetaConfig(dim=8, epochs=1, batch_tasks=256)})
    path = tune_baselines(config, ("responsive",), history=history)
    record = json.loads(path.read_text())
    result = record["models"]["responsive"]
    objectives = [t["metrics"]["objective"] for t in result["trials"]]
    assert len(objectives) == 2 and all(0.0 < o <= 1.0 for o in objectives)
    assert objectives[result["best_trial"]] == max(objectives)
    tuned = apply_tuned(config, path).for_row("responsive")
    for key, value in result["chosen"].items():
        section, field = key.split(".")
        assert getattr(getattr(tuned, section), field) == value
    assert path != tune_baselines(config, ("pop",), history=history)  # its own record, keyed on meta/tasks too


def test_cli_fit_saves_models_through_prefect_and_reuses_them(prefect_harness, artifacts, ml100k_dir) -> None:
    """`metarec fit` on ml-100k: the flow prepares, fits through the fit-model task, saves, and reloads the same model."""
    from typer.testing import CliRunner

    from flows.cli import app
    from tasks.models import load_model

    args = ["fit", "--data-dir", str(ml100k_dir), "--model", "pop", "--model", "spmf",
            "--set", "baselines.epochs=1", "--set", "baselines.dim=4", "--set", "baselines.spmf_reservoir=100"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    paths = dict(line.split(": ", 1) for line in result.output.strip().splitlines() if ": " in line)
    assert set(paths) == {"pop", "spmf"}
    model = load_model(paths["spmf"])
    assert model.name == "spmf" and len(model.res_users_) == 100
    stamp = (Path(paths["spmf"]) / "state.npz").stat().st_mtime_ns
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0, again.output
    assert (Path(paths["spmf"]) / "state.npz").stat().st_mtime_ns == stamp  # reused, not refitted
    bad = CliRunner().invoke(app, ["fit", "--data-dir", str(ml100k_dir), "--model", "nope"])
    assert bad.exit_code != 0 and "nope" in bad.output


def test_tuned_values_fill_defaults_but_never_replace_an_explicit_setting() -> None:
    tuned = Config(tuned={"spmf": {"baselines.lr": 0.01, "baselines.spmf_reservoir": 1000}})
    assert tuned.for_row("spmf").baselines.lr == 0.01 and tuned.for_row("spmf").baselines.spmf_reservoir == 1000
    assert tuned.for_row("rkmf").baselines.lr == BaselineConfig.model_fields["lr"].default
    explicit = Config(baselines=BaselineConfig(lr=0.03), tuned={"spmf": {"baselines.lr": 0.01}})
    assert explicit.for_row("spmf").baselines.lr == 0.03
    # tuning takes effect even where the base config set the field explicitly
    assert with_values(explicit, "spmf", {"baselines.lr": 0.2}).for_row("spmf").baselines.lr == 0.2
    # resolved once: applying it again changes nothing, and a later change sticks
    row = tuned.for_row("spmf")
    assert row.for_row("spmf") == row and row.baselines.lr == 0.01
