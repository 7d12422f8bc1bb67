"""Table 2's (fold, row) units fan out on the pipeline's task runner: one Prefect task run each, two at once on two
slots, the same bytes as one after another, and a failing unit names its row and fold and leaves no table.

The planted data of tests/test_new_items.py, with two new-user folds (two item cold-start splits)."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest
import torch
from prefect import flow

import tasks.evaluate.new_items as new_items_tasks
from flows.pipeline import new_items_stage
from flows.runners import with_runner
from metarec.config import Config
from metarec.features import Features
from metarec.models.metaemb import MetaEmb
from metarec.models.registry import ROWS
from tasks.data.prepare import prepare_data
from tasks.evaluate.evaluation import CASES_FILE, METRICS_FILE
from tasks.evaluate.new_items import NewItemUnitError, new_items_report, new_items_run
from tasks.runtime.paths import fold_configs
from test_new_items import planted, small_config, write_planted  # noqa: F401 (planted: the shared new-item split)

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny tensors, one torch thread

MODELS = ("responsive", "mf_ft", "pop", "metaemb")  # metaemb: the row that drew from torch's global generator
TABLE_FILES = ("table2.md", "table2.csv", "table2_verdicts.csv")


def with_runtime(config: Config, root: Path, max_workers: int) -> Config:
    runtime = config.runtime.model_copy(update={"artifacts_dir": root, "max_workers": max_workers, "torch_threads": 1})
    return config.model_copy(update={"runtime": runtime})


@pytest.fixture(scope="module")
def prepared_two_folds(tmp_path_factory: pytest.TempPathFactory) -> tuple[Config, Path]:
    """Two folds prepared once in ``<root>/artifacts``; each run below starts from a copy of it (no Table 2 there yet)."""
    root = tmp_path_factory.mktemp("table2_fanout")
    write_planted(root / "ratings.csv")
    config = small_config(root / "ratings.csv", root / "artifacts")
    config = config.model_copy(update={"data": config.data.model_copy(update={"new_user_folds": 2}),
                                       "eval": config.eval.model_copy(update={"models": MODELS})})
    for fold_config in fold_configs(config):
        prepare_data(fold_config)
    return config, root / "artifacts"


def fresh_store(prepared_two_folds, tmp_path: Path, name: str, max_workers: int) -> Config:
    config, prepared = prepared_two_folds
    shutil.copytree(prepared, tmp_path / name)
    return with_runtime(config, tmp_path / name, max_workers)


@flow(name="table2-fan-out", validate_parameters=False)
def table2_fan_out(config: Config, out: Path) -> tuple[dict[str, Path], str]:
    """The pipeline's Table 2 stage alone, in a flow on the pipeline's task runner; its files and this flow run's id."""
    from prefect.runtime import flow_run

    return new_items_stage(config, fold_configs(config), out), flow_run.id


def task_runs_of(flow_run_id: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        return client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))


def test_units_fan_out_as_task_runs_two_at_once_and_write_what_the_serial_path_writes(prepared_two_folds, prefect_harness, tmp_path,
                                                                                       monkeypatch):
    serial = fresh_store(prepared_two_folds, tmp_path, "serial", max_workers=1)
    serial_files = new_items_report(serial, fold_configs(serial), tmp_path / "serial-out")

    # two units inside their fits at once, or the barrier breaks: one after another, the first would wait alone
    both_fitting, first_two, guard = threading.Barrier(2), [], threading.Lock()
    real_fit = new_items_tasks.fit_new_item_model

    def fit_beside_another(name, config, data):
        with guard:
            waits = len(first_two) < 2
            first_two.append(name)
        if waits:
            both_fitting.wait(timeout=120)
        return real_fit(name, config, data)

    monkeypatch.setattr(new_items_tasks, "fit_new_item_model", fit_beside_another)
    fanned = fresh_store(prepared_two_folds, tmp_path, "fanned", max_workers=2)
    files, flow_run_id = with_runner(table2_fan_out, fanned)(fanned, tmp_path / "fanned-out")
    assert not both_fitting.broken

    runs = task_runs_of(flow_run_id)
    units = sorted(run.name for run in runs if run.name.startswith("new items"))
    assert units == sorted(f"new items · {ROWS[m].label} · fold {f}" for m in MODELS for f in (0, 1))
    assert sorted(run.name for run in runs if run.name.startswith("split")) == ["split new items · fold 0", "split new items · fold 1"]
    assert all(run.state.is_completed() for run in runs)

    for fold_serial, fold_fanned in zip(fold_configs(serial), fold_configs(fanned)):
        for model in MODELS:
            a = new_items_run(fold_serial) / "eval" / model / CASES_FILE
            b = new_items_run(fold_fanned) / "eval" / model / CASES_FILE
            assert a.read_bytes() == b.read_bytes(), (model, fold_serial.data.fold)
    for name in TABLE_FILES:
        assert files[name].read_bytes() == serial_files[name].read_bytes(), name
    assert "forest_table2.png" in files


def test_a_failing_unit_names_its_row_and_fold_and_no_table_is_written(prepared_two_folds, prefect_harness, tmp_path, monkeypatch):
    real_fit = new_items_tasks.fit_new_item_model

    def pop_fails_on_fold_1(name, config, data):
        if name == "pop" and config.data.fold == 1:
            raise ValueError("planted failure")
        return real_fit(name, config, data)

    monkeypatch.setattr(new_items_tasks, "fit_new_item_model", pop_fails_on_fold_1)
    config = fresh_store(prepared_two_folds, tmp_path, "failing", max_workers=2)
    out = tmp_path / "failing-out"
    with pytest.raises(NewItemUnitError, match=r"row Pop \(pop\), fold 1 failed: ValueError: planted failure"):
        with_runner(table2_fan_out, config)(config, out)

    assert not any((out / name).exists() for name in TABLE_FILES)
    failed = new_items_run(fold_configs(config)[1]) / "eval" / "pop"
    assert not (failed / CASES_FILE).exists() and not (failed / METRICS_FILE).exists()
    # the other units ran to the end (the stage waits for them), and no temporary file is left anywhere
    done = [new_items_run(c) / "eval" / m / METRICS_FILE for c in fold_configs(config) for m in MODELS if (m, c.data.fold) != ("pop", 1)]
    assert all(path.is_file() for path in done)
    assert not [p for p in Path(config.runtime.artifacts_dir).rglob("*") if p.name.endswith(".tmp")]


def test_metaemb_draws_from_its_own_generator_not_torch_s_global_one(planted, monkeypatch):
    """Units side by side in threads share torch's global generator: a draw by another thread between MetaEmb's seeding
    and its own draws changed its generator's start; now it is the same whatever other threads draw."""
    config, _, data = planted
    monkeypatch.setattr("metarec.models.metaemb.GEN_STEPS", 2)

    def fitted() -> MetaEmb:
        model = MetaEmb(config.baselines, config.meta)
        model.set_features(Features())
        return model.fit(data.train)

    alone = fitted()
    real_randn = torch.randn

    def another_thread_draws_first(*args, **kwargs):
        torch.rand(7)  # from the global generator, as a thread building a neural row's layers would
        return real_randn(*args, **kwargs)

    monkeypatch.setattr(torch, "randn", another_thread_draws_first)
    disturbed = fitted()
    assert set(alone.gen_) == set(disturbed.gen_)
    for key in alone.gen_:
        assert torch.equal(alone.gen_[key], disturbed.gen_[key]), key
