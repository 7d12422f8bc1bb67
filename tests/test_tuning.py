"""The validation search: history-only split, same budget for every model, seeded, chosen values usable."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from metarec.config import SECTION_TYPES, BaselineConfig, Config, MetaConfig
from metarec.synthetic import planted_interactions
from metarec.models.registry import ROWS, Choice, Float, Int, on_edge, widen
from tasks.train.tuning import apply_tuned, current_values, space_from_json, tune, tune_row, with_values
from tasks.train.validation import validation_split


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


def lr_objective(config, split):
    """A known answer: the objective grows with baselines.lr, so the best value is the range's top."""
    return lambda batch: [{"objective": float(values["baselines.lr"]), "seconds": 0.0} for _, values in batch]


def test_the_first_trial_is_the_rows_current_values_and_the_budget_is_the_same(tmp_path) -> None:
    config = tiny_config().model_copy(update={"baselines": BaselineConfig(dim=8, tune_budget=5, lr=0.03)})
    storage = f"sqlite:///{tmp_path / 'o.db'}"
    seen = []

    def record(batch):
        seen.extend(values for _, values in batch)
        return [{"objective": 0.5, "seconds": 0.0} for _ in batch]

    result = tune_row("rkmf", config, record, storage)
    assert result["n_trials"] == 5 == len(seen)
    assert seen[0] == current_values(config, "rkmf") and seen[0]["baselines.lr"] == 0.03
    assert all(set(v) == set(ROWS["rkmf"].space) for v in seen)


def test_tuning_is_reproducible_with_the_seed(tmp_path) -> None:
    config = tiny_config().model_copy(update={"baselines": BaselineConfig(dim=8, tune_budget=6)})
    objective = lambda c, s: lambda batch: [{"objective": -abs(np.log(v["baselines.lr"] / 0.03)) - v["baselines.reg"], "seconds": 0.0} for _, v in batch]  # noqa: E731
    first = tune_row("spmf", config, objective(None, None), f"sqlite:///{tmp_path / 'a.db'}")
    second = tune_row("spmf", config, objective(None, None), f"sqlite:///{tmp_path / 'b.db'}")
    assert first["best_trial"] == second["best_trial"] and first["chosen"] == second["chosen"]
    assert [t["values"] for t in first["trials"]] == [t["values"] for t in second["trials"]]
    other_seed = config.model_copy(update={"baselines": BaselineConfig(dim=8, tune_budget=6, seed=9)})
    third = tune_row("spmf", other_seed, objective(None, None), f"sqlite:///{tmp_path / 'c.db'}")
    assert [t["values"] for t in third["trials"]][1:] != [t["values"] for t in first["trials"]][1:]


def test_a_choice_on_an_edge_widens_its_range_up_to_the_hard_limit_and_is_flagged(tmp_path) -> None:
    config = tiny_config().model_copy(update={"baselines": BaselineConfig(dim=8, tune_budget=9)})
    result = tune_row("rkmf", config, lr_objective(None, None), f"sqlite:///{tmp_path / 'o.db'}")
    initial = ROWS["rkmf"].space["baselines.lr"]
    final = space_from_json(result["space"])["baselines.lr"]
    assert "baselines.lr" in result["widened"] and final.high > initial.high
    assert result["chosen"]["baselines.lr"] > initial.high  # the search went past the first bound
    flag = result["on_edge"].get("baselines.lr")
    assert flag is not None and flag["side"] == "high"
    assert flag["at_hard_limit"] == (final.high == initial.limits[1])


def test_edges_and_widening_of_ranges() -> None:
    log_range = Float(0.01, 1.0, log=True, limits=(1e-3, 2.0))
    assert on_edge(1.0, log_range) == "high" and on_edge(0.0105, log_range) == "low" and on_edge(0.1, log_range) is None
    wider = widen(log_range, "high")
    assert wider.high == 2.0 and widen(wider, "high") is None  # clipped to its hard limit, then no further
    assert widen(Int(1, 5, limits=(1, 10)), "low") is None and widen(Int(1, 5, limits=(1, 10)), "high").high == 7
    assert on_edge("linear", Choice(("linear", "logistic"))) is None


def test_an_interrupted_tuning_resumes_its_study(tmp_path) -> None:
    config = tiny_config().model_copy(update={"baselines": BaselineConfig(dim=8, tune_budget=4)})
    storage = f"sqlite:///{tmp_path / 'o.db'}"
    calls = []

    def flaky(batch):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(batch)
        return [{"objective": 0.1 * len(calls), "seconds": 0.0} for _ in batch]

    with pytest.raises(KeyboardInterrupt):
        tune_row("mf_ft", config, flaky, storage)
    calls.append(None)  # let the rest through
    result = tune_row("mf_ft", config, flaky, storage)
    assert result["n_trials"] == 4 and len(calls) == 5  # 2 before the stop, 1 marker, 2 after: none repeated


def test_with_values_validates_and_applies_per_row() -> None:
    config = with_values(tiny_config(), "rkmf", {"baselines.lr": 0.02, "baselines.rkmf_kernel": "linear"})
    assert config.for_row("rkmf").baselines.lr == 0.02
    assert config.for_row("spmf").baselines.lr == tiny_config().baselines.lr
    with pytest.raises(ValueError, match="lr"):
        with_values(tiny_config(), "rkmf", {"baselines.lr": -1.0})
    with pytest.raises(ValueError, match="meta.nope"):
        with_values(tiny_config(), "responsive", {"meta.nope": 1})


def test_tune_writes_a_record_that_configures_the_rows(history, artifacts) -> None:
    """Real trials (a tiny SPMF and our model), the record merged row by row, its values usable by for_row."""
    config = tiny_config().model_copy(update={"baselines": BaselineConfig(dim=8, epochs=2, tune_budget=2, spmf_reservoir=200, spmf_samples=50),
                                              "meta": MetaConfig(dim=8, epochs=1, batch_tasks=256)})
    path = tune(config, ("spmf", "pop"), history=history)
    record = json.loads(path.read_text())
    assert record["budget"] == 2 and set(record["models"]) == {"spmf", "pop"}
    spmf = record["models"]["spmf"]
    objectives = [t["metrics"]["objective"] for t in spmf["trials"]]
    assert len(objectives) == 2 and all(0.0 < o <= 1.0 for o in objectives)
    assert spmf["best_objective"] == max(objectives) and spmf["seconds"] > 0
    assert tune(config, ("responsive",), history=history) == path  # merged into the same record
    record = json.loads(path.read_text())
    assert set(record["models"]) == {"spmf", "pop", "responsive"}
    tuned = apply_tuned(config, path)
    for name in ("spmf", "responsive"):
        row = tuned.for_row(name)
        for key, value in record["models"][name]["chosen"].items():
            section, field = key.split(".")
            base = getattr(getattr(config, section), field)
            explicit = base != SECTION_TYPES[section].model_fields[field].default  # set by this test: it wins
            assert getattr(getattr(row, section), field) == (base if explicit else value), key
    explicit = apply_tuned(config.model_copy(update={"baselines": config.baselines.model_copy(update={"lr": 0.0123})}), path)
    assert explicit.for_row("spmf").baselines.lr == 0.0123  # an explicit setting is never replaced
    assert not list(path.parent.glob(".*.tmp"))  # written atomically
    with pytest.raises(ValueError, match="nope"):
        tune(config, ("nope",), history=history)


def test_cli_fit_saves_models_through_prefect_and_reuses_them(prefect_harness, artifacts, ml100k_dir) -> None:
    """`metarec fit` on ml-100k: the flow prepares, fits through the fit-model task, saves, and reloads the same model."""
    from typer.testing import CliRunner

    from flows.cli import app
    from tasks.train.models import load_model

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
