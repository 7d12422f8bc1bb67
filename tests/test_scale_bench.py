"""benchmarks/scale.py's arithmetic: growth exponents, the run plan read from a config, the full-run estimate."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

from metarec.config import Config

SCALE = Path(__file__).resolve().parents[1] / "benchmarks" / "scale.py"


@pytest.fixture(scope="module")
def scale():
    spec = importlib.util.spec_from_file_location("scale_bench", SCALE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def test_exponent_is_the_slope_in_log_log(scale):
    small = {"rows": 1_000, "seconds": 2.0}
    assert scale.exponent(small, {"rows": 10_000, "seconds": 20.0}) == pytest.approx(1.0)
    assert scale.exponent(small, {"rows": 100_000, "seconds": 2.0 * 100**1.5}) == pytest.approx(1.5)
    assert scale.exponent(small, {"rows": 10_000, "seconds": 4.0}) == pytest.approx(math.log10(2))
    assert scale.exponent(small, {"rows": 1_000, "seconds": 9.0}) is None  # n did not grow


def test_the_table_gives_exponents_against_every_smaller_size(scale):
    records = [{"size": size, "stage": "meta", "rows": rows, "seconds": seconds, "peak_rss_gb": 1.0, "rows_are": "tasks",
                "rate": rows / seconds, "rate_unit": "tasks/s", "detail": ""}
               for size, rows, seconds in (("1m", 1_000, 1.0), ("10m", 10_000, 10.0), ("100m", 100_000, 1000.0))]
    line_100m = next(line for line in scale.table(records, ["1m", "10m", "100m"]).splitlines() if "| 100m |" in line)
    assert "1m: 1.50" in line_100m and "10m: 2.00" in line_100m


def test_the_plan_reads_folds_epochs_and_fit_multipliers_from_the_config(scale):
    run = Config(data={"new_user_folds": 3}, meta={"epochs": 4}, baselines={"epochs": 12, "srec_passes": 2},
                 eval={"models": ["responsive", "rkmf", "srec", "pop"], "lambda_sweep": [0.0, 1.0]})
    measured = Config(baselines={"epochs": 3})
    plan = scale.run_plan(run, measured, workers=2)
    assert plan.folds == 3 and plan.ours == {"responsive": 4} and plan.sweep_points == 2 and plan.workers == 2
    assert plan.fits == {"rkmf": 4.0, "srec": 2.0, "pop": 1.0}  # 12 / 3 epochs, 2 / 1 passes, no passes
    assert scale.run_plan(run, measured, sweep=False).sweep_points == 0


def test_the_plan_takes_tuned_epochs_per_row(scale):
    run = Config(eval={"models": ["responsive", "rkmf"]}, tuned={"responsive": {"meta.epochs": 9}, "rkmf": {"baselines.epochs": 30}})
    plan = scale.run_plan(run, Config(baselines={"epochs": 1}))
    assert plan.ours == {"responsive": 9} and plan.fits == {"rkmf": 30.0}


def test_the_estimate_sums_each_term_times_its_count(scale):
    plan = scale.RunPlan(folds=2, ours={"responsive": 5, "responsive_plus": 3}, fits={"pop": 1.0, "rkmf": 20.0}, sweep_points=4,
                         max_workers=2, workers=4)
    seconds = {"prepare": 10.0, "tasks": 5.0, "meta": 100.0, "eval:responsive": 3.0, "fit:pop": 1.0, "eval:pop": 1.0,
               "fit:rkmf": 2.0, "eval:rkmf": 1.0}
    fold = 10 + (5 + 5 * 100 + 3) + (5 + 3 * 100 + 3) + (1 + 1) + (20 * 2 + 1)  # Ours+ takes ours' tasks, epoch and evaluation
    sweep_meta, sweep_eval = 4 * 5 * 100, 4 * 3
    meta = 2 * (5 + 3) * 100 + sweep_meta
    e = scale.full_run_estimate(seconds, plan)
    assert e.serial == pytest.approx(2 * fold + sweep_meta + sweep_eval)
    assert e.meta == pytest.approx(meta)
    assert e.slots == pytest.approx(e.serial / 2)
    assert e.data_parallel == pytest.approx(e.serial - meta + meta / 4)
    assert e.missing == ()


def test_the_estimate_names_unmeasured_stages_and_leaves_them_out(scale):
    plan = scale.RunPlan(folds=1, ours={"responsive": 2}, fits={"srec": 1.0}, sweep_points=0, max_workers=1, workers=1)
    e = scale.full_run_estimate({"prepare": 1.0, "tasks": 1.0, "meta": 10.0, "fit:srec": 3.0}, plan)
    assert e.missing == ("eval:responsive", "eval:srec")
    assert e.serial == pytest.approx(1 + 1 + 2 * 10 + 3)


def test_records_of_other_settings_are_kept_but_never_reported_together(scale):
    args = scale.argparse.Namespace(sample_users=0, max_tasks=0, optimizer="lazy_adam", baseline_epochs=1, memory_limit="4GB", torch_threads=1)
    adam = scale.argparse.Namespace(**{**vars(args), "optimizer": "adam"})
    record = lambda stage, seconds, made_with: {"size": "1m", "stage": stage, "seconds": seconds, "settings": scale.settings(made_with, stage)}  # noqa: E731
    earlier = [record("meta", 1.0, args), record("meta", 3.0, adam), record("tasks", 2.0, adam), record("fit:rkmf", 5.0, adam)]
    new = [record("meta", 4.0, args)]
    kept = scale.merged(earlier, new)
    assert sorted((r["stage"], r["seconds"]) for r in kept) == [("fit:rkmf", 5.0), ("meta", 3.0), ("meta", 4.0), ("tasks", 2.0)]
    # tasks and fits do not depend on the optimizer, so a lazy_adam report reuses them; adam's meta-epoch it does not
    assert sorted((r["stage"], r["seconds"]) for r in scale.of_settings(kept, args)) == [("fit:rkmf", 5.0), ("meta", 4.0), ("tasks", 2.0)]


def test_two_runs_in_one_workdir_keep_each_others_records(scale, tmp_path):
    """10M and 100M measured side by side: each save merges into the file as it is now, not as the run found it."""
    saved = tmp_path / "scale.json"

    def record(size, stage, seconds):
        return {"size": size, "stage": stage, "seconds": seconds, "settings": {"torch_threads": 1}}

    scale.save_records(saved, [record("1m", "meta", 1.0)])
    ten = [record("10m", "prepare", 5.0)]  # the 10M run began when the file held 1M's record only
    scale.save_records(saved, [record("100m", "prepare", 50.0)])
    ten.append(record("10m", "tasks", 6.0))
    scale.save_records(saved, ten)
    kept = {(r["size"], r["stage"]): r["seconds"] for r in scale.read_records(saved)}
    assert kept == {("1m", "meta"): 1.0, ("10m", "prepare"): 5.0, ("100m", "prepare"): 50.0, ("10m", "tasks"): 6.0}
    scale.save_records(saved, [record("1m", "meta", 2.0)])  # measured again with the same settings: replaced
    assert [r["seconds"] for r in scale.read_records(saved) if r["size"] == "1m"] == [2.0]
    assert [p.name for p in tmp_path.iterdir()] == ["scale.json"]  # no temporary left behind


def test_an_unfinished_meta_epoch_is_reported_extrapolated_and_marked(scale, tmp_path):
    args = scale.argparse.Namespace(workdir=tmp_path, sample_users=0, max_tasks=0, optimizer="lazy_adam", baseline_epochs=1,
                                    memory_limit="4GB", torch_threads=1)
    log = scale._checkpoint_dir(scale.argparse.Namespace(**{**vars(args), "size": "100m"})) / "pieces.json"
    log.parent.mkdir(parents=True)
    piece = lambda a, b, seconds: {"shards": [a, b, 10], "seconds": seconds, "rows": 100 * (b - a), "peak_rss_gb": 3.0 + a,  # noqa: E731
                                   "theta": "Θ", "size": "100m", "stage": "meta"}
    log.write_text(scale.json.dumps({"made_for": {"n_tasks": 1000, "shards": 10}, "pieces": [piece(0, 2, 20.0), piece(2, 4, 20.0)]}))
    ten = {"size": "10m", "stage": "meta", "rows": 100, "seconds": 1.0, "rate": 100.0, "peak_rss_gb": 1.0, "settings": {}}
    records = scale.with_partial_meta([ten], args)
    partial = next(r for r in records if r["size"] == "100m")
    assert partial["seconds"] == pytest.approx(40.0 * 1000 / 400) and partial["rate"] == pytest.approx(10.0)
    assert partial["partial"] == {"tasks": 400, "seconds": 40.0, "shards": [0, 4, 10]} and partial["peak_rss_gb"] == 5.0
    assert "EXTRAPOLATED" in partial["detail"]
    verdict = next(v for v in scale.verdicts(records) if v.startswith("meta-epoch"))
    assert "on 400 of 1,000 tasks" in verdict and "NOT within" in verdict
    finished = {**ten, "size": "100m"}
    assert scale.with_partial_meta([ten, finished], args) == [ten, finished]  # a finished epoch's record wins


def test_an_epoch_goes_on_after_an_earlier_runs_unfinished_record(scale, tmp_path):
    """--meta-after: the recorded part is the first piece, the next piece draws Θ afresh, and a record that does not
    fit these task shards is refused with what differs."""
    args = scale.argparse.Namespace(workdir=tmp_path, sample_users=0, max_tasks=0, optimizer="lazy_adam", baseline_epochs=1,
                                    memory_limit="4GB", torch_threads=1, meta_after=tmp_path / "earlier.json")
    earlier = {"size": "100m", "stage": "meta", "rows": 1000, "theta": "Θ", "peak_rss_gb": 11.0, "settings": scale.settings(args, "meta"),
               "partial": {"tasks": 390, "seconds": 39.0, "shards": [0, 4, 10]}}
    scale.save_records(args.meta_after, [earlier, {**earlier, "size": "10m"}])
    made_for = {"n_tasks": 1000, "shards": 10}
    done = scale.earlier_pieces(args, "100m", made_for)
    assert done["fresh_theta_at"] == 4 and done["pieces"][0]["shards"] == [0, 4, 10] and done["pieces"][0]["rows"] == 390
    assert scale._can_go_on(done, tmp_path)  # no checkpoint, yet the next piece may start: it draws Θ
    assert not scale._can_go_on({**done, "pieces": done["pieces"] + [{"shards": [4, 6, 10]}]}, tmp_path)  # its checkpoint is gone
    assert "Θ drawn afresh at shard 4" in scale._restart_note(done)
    with pytest.raises(ValueError, match="1,000 tasks in 10 shards.*999 in 10"):
        scale.earlier_pieces(args, "100m", {"n_tasks": 999, "shards": 10})
    with pytest.raises(ValueError, match="no unfinished meta record of size 1m"):
        scale.earlier_pieces(args, "1m", made_for)
