"""The validation search: history-only split, same budget for every model, seeded, chosen values usable."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from metarec.config import SECTION_TYPES, BaselineConfig, Config, MetaConfig, NeuralConfig, TaskConfig
from metarec.synthetic import planted_interactions
from metarec.interface import StreamingRecommender
from metarec.models.registry import ROWS, Choice, Float, Int, on_edge, widen
from tasks.train.tuning import (
    RECORDS_DIR, apply_tuned, current_values, data_fingerprint, record_in_use, space_from_json, study_name, tune, tune_row,
    tuned_source, with_values,
)
from tasks.train.validation import OBJECTIVE, evaluate_trial, score_split, validation_split


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


def planted(objective):
    """A trial function with a known answer: ``objective(values)`` after every one of 9 passes, reported as the fit would."""
    def run(name, values, report):
        value = float(objective(values))
        for passes in range(1, 10):
            report(passes, {"objective": value}, final=passes == 9)
        return {"objective": value, "seconds": 0.0}
    return run


def test_the_first_trial_is_the_rows_current_values_and_the_budget_is_the_same(tmp_path) -> None:
    config = tiny_config().model_copy(update={"baselines": BaselineConfig(dim=8, tune_budget=5, lr=0.03)})
    seen = []

    def record(name, values, report):
        seen.append(values)
        return {"objective": 0.5, "seconds": 0.0}

    result = tune_row("rkmf", config, record, f"sqlite:///{tmp_path / 'o.db'}")
    assert result["n_trials"] == 5 == len(seen) == result["n_complete"]
    assert seen[0] == current_values(config, "rkmf") and seen[0]["baselines.lr"] == 0.03
    assert all(set(v) == set(ROWS["rkmf"].space) for v in seen)


def test_a_field_that_inherits_another_is_drawn_in_the_first_trial(tmp_path) -> None:
    """Ours+'s serving options default to None (= training's k, α, L): the first trial keeps today's other values."""
    seen = []
    result = tune_row("responsive_plus", tiny_config().model_copy(update={"baselines": BaselineConfig(tune_budget=2)}),
                      lambda name, values, report: seen.append(values) or {"objective": 0.5, "seconds": 0.0}, f"sqlite:///{tmp_path / 'o.db'}")
    assert result["n_trials"] == 2 and seen[0]["tasks.k"] == tiny_config().tasks.k and seen[0]["tasks.serve_k"] is not None
    assert None not in result["chosen"].values()


def test_tuning_is_reproducible_with_the_seed(tmp_path) -> None:
    config = tiny_config().model_copy(update={"baselines": BaselineConfig(dim=8, tune_budget=6)})
    objective = planted(lambda v: -abs(np.log(v["baselines.lr"] / 0.03)) - v["baselines.reg"])
    first = tune_row("spmf", config, objective, f"sqlite:///{tmp_path / 'a.db'}")
    second = tune_row("spmf", config, objective, f"sqlite:///{tmp_path / 'b.db'}")
    assert first["best_trial"] == second["best_trial"] and first["chosen"] == second["chosen"]
    assert [t["values"] for t in first["trials"]] == [t["values"] for t in second["trials"]]
    assert [t["state"] for t in first["trials"]] == [t["state"] for t in second["trials"]]  # the same pruning too
    other_seed = config.model_copy(update={"baselines": BaselineConfig(dim=8, tune_budget=6, seed=9)})
    third = tune_row("spmf", other_seed, objective, f"sqlite:///{tmp_path / 'c.db'}")
    assert [t["values"] for t in third["trials"]][1:] != [t["values"] for t in first["trials"]][1:]


def test_the_pruner_stops_planted_bad_trials_after_their_first_passes(tmp_path) -> None:
    """Trials with the linear kernel are planted bad: the pruner must stop some before their last pass, and never the best."""
    config = tiny_config().model_copy(update={"baselines": BaselineConfig(dim=8, tune_budget=16)})
    objective = planted(lambda v: v["baselines.lr"] - (1.0 if v["baselines.rkmf_kernel"] == "linear" else 0.0))
    result = tune_row("rkmf", config, objective, f"sqlite:///{tmp_path / 'o.db'}")
    pruned = [t for t in result["trials"] if t["state"] == "pruned"]
    assert result["n_trials"] == 16 and result["n_pruned"] == len(pruned) > 0
    assert result["n_complete"] + result["n_pruned"] + result["n_failed"] == 16
    assert all(max(int(step) for step in t["intermediate"]) < 9 for t in pruned)  # stopped early
    assert any(t["values"]["baselines.rkmf_kernel"] == "linear" for t in pruned)
    assert result["best_trial"] not in {t["number"] for t in pruned}


def test_a_choice_on_an_edge_widens_its_range_up_to_the_hard_limit_and_is_flagged(tmp_path) -> None:
    config = tiny_config().model_copy(update={"baselines": BaselineConfig(dim=8, tune_budget=9)})
    result = tune_row("rkmf", config, planted(lambda v: v["baselines.lr"]), f"sqlite:///{tmp_path / 'o.db'}")
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


def test_a_diverging_trial_fails_and_counts_without_stopping_the_search(tmp_path) -> None:
    config = tiny_config().model_copy(update={"baselines": BaselineConfig(dim=8, tune_budget=4)})
    calls = []

    def diverging_second(name, values, report):
        calls.append(values)
        if len(calls) == 2:
            score_split(NaNScores(), {"new": {}, "tail": [(None, np.zeros(1, dtype=np.int64), np.zeros((1, 3), dtype=np.int64))]})
        return {"objective": 0.5, "seconds": 0.0}

    result = tune_row("rkmf", config, diverging_second, f"sqlite:///{tmp_path / 'o.db'}")
    assert result["n_trials"] == 4 == len(calls) and result["n_failed"] == 1
    assert "diverged" in result["trials"][1]["metrics"]["error"]


def test_an_interrupted_tuning_resumes_its_study(tmp_path) -> None:
    config = tiny_config().model_copy(update={"baselines": BaselineConfig(dim=8, tune_budget=4)})
    storage = f"sqlite:///{tmp_path / 'o.db'}"
    calls = []

    def flaky(name, values, report):
        report(1, {"objective": 0.0})
        if len(calls) == 2:
            raise KeyboardInterrupt  # the process dies mid-trial: the trial stays "running" in the study
        calls.append(values)
        return {"objective": 0.1 * len(calls), "seconds": 0.0}

    with pytest.raises(KeyboardInterrupt):
        tune_row("mf_ft", config, flaky, storage)
    calls.append(None)  # let the rest through
    result = tune_row("mf_ft", config, flaky, storage)
    assert result["n_trials"] == 4 and len(calls) == 5  # 2 before the stop, 1 marker, 2 after: none repeated
    # the cut-off trial is not counted, and the same study was resumed (its first two trials kept)
    assert [t["number"] for t in result["trials"]] == [0, 1, 3, 4]


def test_with_values_validates_and_applies_per_row() -> None:
    config = with_values(tiny_config(), "rkmf", {"baselines.lr": 0.02, "baselines.rkmf_kernel": "linear"})
    assert config.for_row("rkmf").baselines.lr == 0.02
    assert config.for_row("spmf").baselines.lr == tiny_config().baselines.lr
    with pytest.raises(ValueError, match="lr"):
        with_values(tiny_config(), "rkmf", {"baselines.lr": -1.0})
    with pytest.raises(ValueError, match="meta.nope"):
        with_values(tiny_config(), "responsive", {"meta.nope": 1})


# ------------------------------------------------------------------ validation consistent with the test
class Constant(StreamingRecommender):
    """Scores every candidate alike: every case is one big tie."""

    name = "constant"

    def fit(self, history, on_epoch=None):
        return self

    def score(self, users, candidates):
        return np.zeros(np.shape(candidates))

    def score_new_users(self, recent, candidates):
        return np.zeros(np.shape(candidates))

    def observe(self, batch):
        pass


class NaNScores(Constant):
    def score(self, users, candidates):
        return np.full(np.shape(candidates), np.nan)


def test_validation_counts_ties_at_their_expected_rank_as_the_test_does(history) -> None:
    split = validation_split(history, tiny_config())
    metrics = score_split(Constant(), split)
    candidates = 1 + tiny_config().data.n_negatives
    expected = sum(1.0 / np.log2(r + 2.0) for r in range(10)) / candidates  # the rank is uniform over all candidates
    assert metrics["tail_ndcg@10"] == pytest.approx(expected) and metrics["new_ndcg@10"] == pytest.approx(expected)
    assert metrics["objective"] == pytest.approx(expected)
    assert metrics["tail_hr@10"] == pytest.approx(10 / candidates)


def test_validation_negatives_are_distinct_as_the_tests_are(history) -> None:
    config = tiny_config().model_copy(update={"data": tiny_config().data.model_copy(update={"n_negatives": 40})})
    split = validation_split(history, config)  # 40 of the ~48 items each user never had: repeats would be common
    rows = [cands for _, _, cands in split["tail"]] + [cands for _, cands in split["new"].values()]
    for cands in rows:
        assert all(len(set(row)) == len(row) for row in cands.tolist())


def test_the_study_depends_on_every_section_its_row_reads_and_on_nothing_else() -> None:
    base = tiny_config()
    fp = "f" * 16
    neural = base.model_copy(update={"neural": base.neural.model_copy(update={"hidden": 17})})
    assert study_name("melu", neural, fp) != study_name("melu", base, fp)  # MeLU reads [neural]
    assert study_name("rkmf", neural, fp) == study_name("rkmf", base, fp)  # RKMF does not
    meta = base.model_copy(update={"meta": base.meta.model_copy(update={"init_std": 0.2})})
    assert study_name("responsive", meta, fp) != study_name("responsive", base, fp)
    assert study_name("mf_ft", meta, fp) != study_name("mf_ft", base, fp)  # MF-FT's row declares [meta] too
    assert study_name("rkmf", meta, fp) == study_name("rkmf", base, fp)
    searched = base.model_copy(update={"baselines": base.baselines.model_copy(update={"lr": 0.07, "tune_budget": 50})})
    assert study_name("rkmf", searched, fp) == study_name("rkmf", base, fp)  # a searched field or a larger budget: the same study
    holdout = base.model_copy(update={"baselines": base.baselines.model_copy(update={"tune_holdout": 0.2})})
    assert study_name("responsive", holdout, fp) != study_name("responsive", base, fp)  # the validation split changed
    assert study_name("rkmf", base, "0" * 16) != study_name("rkmf", base, fp)  # other data content
    negatives = base.model_copy(update={"data": base.data.model_copy(update={"n_negatives": 50})})
    assert study_name("rkmf", negatives, fp) != study_name("rkmf", base, fp)  # other validation cases


def passes_config(passes: int) -> Config:
    """Every family's pass counts at ``passes`` (ours: one pre-training epoch, then meta-training epochs)."""
    return tiny_config().model_copy(update={
        "baselines": BaselineConfig(dim=8, epochs=passes, srec_passes=passes, spmf_reservoir=200),
        "meta": MetaConfig(dim=8, pretrain_epochs=1, epochs=passes - 1, batch_tasks=64),
        "neural": NeuralConfig(dim=8, hidden=8, epochs=passes, batch_tasks=64),
        "tasks": TaskConfig(k=3, K=6),
    })


@pytest.mark.parametrize("name", ["mf_ft", "spmf", "srec", "responsive", "melu"])
def test_a_partial_fit_is_scored_as_the_shorter_fit_would_be(history, name) -> None:
    """The copy scored after pass 2 of a 3-pass fit is the model a 2-pass fit makes: the same score (one per family)."""
    split = validation_split(history, passes_config(3))
    reported = {}
    final = evaluate_trial(name, passes_config(3), split, report=lambda passes, metrics, final=False: reported.setdefault(passes, (metrics, final)))
    assert sorted(reported) == [1, 2, 3] and final["passes"] == 3 and [reported[p][1] for p in (1, 2, 3)] == [False, False, True]
    assert reported[3][0]["objective"] == final["objective"]
    assert reported[2][0]["objective"] == evaluate_trial(name, passes_config(2), split)["objective"]


# ------------------------------------------------------------------ records
def record_config(tmp_path, budget: int = 3, **runtime) -> Config:
    return tiny_config().model_copy(update={
        "baselines": BaselineConfig(dim=8, epochs=2, tune_budget=budget, spmf_reservoir=200, spmf_samples=50),
        "meta": MetaConfig(dim=8, epochs=1, batch_tasks=256),
        "runtime": tiny_config().runtime.model_copy(update={"tuned_dir": tmp_path / "tuned", **runtime}),
    })


def test_tune_writes_the_data_sets_record_with_counts_and_what_it_was_tuned_on(history, artifacts, tmp_path) -> None:
    config = record_config(tmp_path, budget=6)
    objective = planted(lambda v: v["baselines.lr"] - (1.0 if v["baselines.rkmf_kernel"] == "linear" else 0.0))
    path = tune(config, ("rkmf",), history=history, trial_fn=objective)
    assert path == tmp_path / "tuned" / "ml-100k.json" and not list(path.parent.glob(".*.tmp"))  # written atomically
    record = json.loads(path.read_text())
    rkmf = record["models"]["rkmf"]
    assert record["budget"] == 6 and record["objective"] == OBJECTIVE and record["pruner"]["kind"] == "hyperband"
    assert rkmf["n_trials"] == 6 == rkmf["n_complete"] + rkmf["n_pruned"] + rkmf["n_failed"] == len(rkmf["trials"])
    assert rkmf["data_fingerprint"] == record["data_fingerprint"] == data_fingerprint(history)
    assert rkmf["space_hash"] and rkmf["settings_hash"] and "code_version" in record and rkmf["seconds"] > 0
    assert (artifacts / "tuning" / "ml-100k" / "rkmf-history.png").is_file()
    assert (artifacts / "tuning" / "ml-100k" / "rkmf-importances.png").is_file()
    note = tuned_source(config, data_fingerprint(history))[1]
    assert str(path) in note and "stale" not in note
    assert tuned_source(config, data_fingerprint(history))[0].for_row("rkmf").baselines.lr == pytest.approx(rkmf["chosen"]["baselines.lr"])


def test_a_record_tuned_on_other_data_or_another_space_is_named_stale_and_still_used(history, artifacts, tmp_path, monkeypatch) -> None:
    config = record_config(tmp_path)
    tune(config, ("rkmf", "srec"), history=history, trial_fn=planted(lambda v: 0.5))
    chosen = json.loads((tmp_path / "tuned" / "ml-100k.json").read_text())["models"]["rkmf"]["chosen"]
    used, note = tuned_source(config, "0" * 16)
    assert "stale" in note and "rkmf, srec: tuned on other data" in note
    assert used.for_row("rkmf").baselines.rkmf_kernel == chosen["baselines.rkmf_kernel"]  # still used
    wider = {**ROWS["rkmf"].space, "baselines.lr": Float(0.001, 0.5, log=True, limits=(1e-4, 1.0))}
    monkeypatch.setitem(ROWS, "rkmf", dataclasses.replace(ROWS["rkmf"], space=wider))
    used, note = tuned_source(config, data_fingerprint(history))
    assert "rkmf: search space changed" in note and "srec" not in note
    assert used.for_row("rkmf").baselines.rkmf_kernel == chosen["baselines.rkmf_kernel"]


def test_a_data_set_without_a_record_borrows_ml100ks_and_says_so(history, artifacts, tmp_path) -> None:
    config = record_config(tmp_path)
    tune(config, ("rkmf",), history=history, trial_fn=planted(lambda v: 0.5))
    other = config.model_copy(update={"data": config.data.model_copy(update={"dataset": "synthetic-drift"})})
    used, note = tuned_source(other, "1" * 16)
    assert "borrowed from ml-100k" in note and str(tmp_path / "tuned" / "ml-100k.json") in note
    assert "stale" not in note  # borrowed: other data by definition, not stale for it; its settings are the same
    assert used.tuned["rkmf"] == json.loads((tmp_path / "tuned" / "ml-100k.json").read_text())["models"]["rkmf"]["chosen"]
    empty = other.model_copy(update={"runtime": other.runtime.model_copy(update={"tuned_dir": tmp_path / "none"})})
    assert "no tuning record" in tuned_source(empty)[1] and tuned_source(empty)[0].tuned == {}


def test_the_shipped_legacy_record_applies_and_is_named_stale() -> None:
    config = Config()
    path, borrowed = record_in_use(config)
    assert path == RECORDS_DIR / "ml-100k.json" and not borrowed
    used, note = tuned_source(config, "0" * 16)
    if json.loads(path.read_text()).get("legacy"):
        assert "legacy values" in note and "mf_ft" in note
    assert used.for_row("rkmf").baselines.lr == json.loads(path.read_text())["models"]["rkmf"]["chosen"]["baselines.lr"]


@pytest.mark.slow
def test_tune_runs_real_trials_in_two_processes_and_merges_rows(prefect_harness, history, artifacts, tmp_path) -> None:
    """Real trials (a tiny SPMF in two worker processes, Pop scored once, our model), merged into one record; each
    worker's share of the trials is a Prefect task run of the process-pool runner."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName

    config = record_config(tmp_path, budget=2)
    path = tune(config, ("spmf", "pop"), history=history, workers=2)
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_="tune spmf")))
    assert sorted(run.name for run in runs) == ["tune spmf · worker 0", "tune spmf · worker 1"]
    assert all(run.state.is_completed() for run in runs)
    record = json.loads(path.read_text())
    assert record["workers"] == 2 and set(record["models"]) == {"spmf", "pop"}
    spmf = record["models"]["spmf"]
    objectives = [t["objective"] for t in spmf["trials"] if t["state"] == "complete"]
    assert spmf["n_trials"] == 2 and objectives and all(0.0 < o <= 1.0 for o in objectives)
    assert spmf["best_objective"] == max(objectives)
    assert record["models"]["pop"]["n_trials"] == 0 and 0.0 < record["models"]["pop"]["best_objective"] <= 1.0
    assert tune(config, ("responsive",), history=history, workers=1) == path  # merged into the same record
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
