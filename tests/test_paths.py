"""Cache keys: each stage is keyed on its config sections, its input files and the code it runs, and nothing else."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import tasks.runtime.paths as paths
from metarec.config import Config
from metarec.models.registry import ROWS
from tasks.runtime import stages

# the default rows other than ours: all import models/common.py
BASELINES = sorted(f"fit:{name}" for name in Config().eval.models if not ROWS[name].is_ours)


@pytest.fixture()
def edited(monkeypatch: pytest.MonkeyPatch):
    """edit(relative path): from now on that file's hashed text has one more line (the file itself is untouched)."""
    monkeypatch.setattr(paths, "source_fingerprint", lambda config: "the same input files")
    changed: set[Path] = set()
    real = paths._source

    def source(path: Path) -> bytes:
        return real(path) + (b"\n# an edit\n" if path in changed else b"")

    monkeypatch.setattr(paths, "_source", source)
    paths.clear_code_cache()

    def edit(relative: str) -> None:
        changed.add(paths.PROJECT_ROOT / relative)
        paths.clear_code_cache()

    yield edit
    paths.clear_code_cache()


def _changed(before: dict[str, str], after: dict[str, str]) -> list[str]:
    assert before.keys() == after.keys()
    return sorted(stage for stage in before if before[stage] != after[stage])


def test_stage_code_is_the_listed_modules_and_the_metarec_modules_they_import():
    assert paths.code_closure(paths.STAGE_CODE["evaluate"]) == ["metarec.features", "metarec.interface", "metarec.metrics", "metarec.protocol", "tasks.evaluate.evaluation"]
    train = paths.code_closure(paths.STAGE_CODE["train"])
    assert {"metarec.maml", "metarec.meta_tasks", "metarec.neighbours", "metarec.models.mf", "metarec.models.responsive"} <= set(train)
    # relative imports (``from .common import``) are followed; config code is keyed through the config's values
    rkmf = paths.code_closure(("tasks.train.models", "metarec.models.rkmf"))
    assert "metarec.models.common" in rkmf and "metarec.config" not in rkmf and "metarec.models.registry" not in rkmf
    assert not any(m.startswith(("tasks.track.tracking", "tasks.runtime.paths", "flows.pipeline")) for m in train)


def test_keys_are_stable(edited):
    config = Config()
    assert paths.stage_keys(config) == paths.stage_keys(Config())
    assert set(paths.stage_keys(config)) == {"prepare", "tasks", "train", "evaluate", *(f"fit:{m}" for m in config.eval.models)}


@pytest.mark.parametrize("source, stages_rekeyed", [
    ("metarec/protocol.py", ["evaluate"]),
    ("metarec/metrics.py", ["evaluate"]),
    ("tasks/evaluate/evaluation.py", ["evaluate"]),
    ("metarec/models/rkmf.py", ["fit:rkmf"]),
    ("metarec/models/srec.py", ["fit:srec"]),
    ("metarec/models/common.py", BASELINES),
    ("metarec/maml.py", ["fit:responsive", "fit:responsive_plus", "train"]),
    ("metarec/meta_tasks.py", ["fit:responsive", "fit:responsive_plus", "tasks", "train"]),
    ("metarec/neighbours.py", [*BASELINES, "fit:responsive", "fit:responsive_plus", "tasks", "train"]),
    ("tasks/train/models.py", [*BASELINES, "fit:responsive", "fit:responsive_plus", "train"]),
    ("sql/split_new_users.sql", ["prepare"]),
    ("tasks/data/datasets.py", ["prepare"]),
    ("metarec/config.py", []),
    ("tasks/track/tracking.py", []),
    ("flows/pipeline.py", []),
])
def test_a_code_change_rekeys_only_the_stages_that_run_that_code(edited, source, stages_rekeyed):
    config = Config()
    assert (paths.PROJECT_ROOT / source).is_file()
    before = paths.stage_keys(config)
    edited(source)
    assert _changed(before, paths.stage_keys(config)) == sorted(stages_rekeyed)


def test_a_prepare_change_moves_every_later_stage_with_the_prepared_folder(edited):
    config = Config()
    first = paths.prepared_dir(config)
    edited("sql/positives.sql")
    moved = paths.prepared_dir(config)
    assert moved != first and moved.parent == first.parent
    for folder in (paths.task_shards_dir(config), paths.run_dir(config)):
        assert folder.is_relative_to(moved)


@pytest.mark.parametrize("override, stages_rekeyed", [
    ({"eval": {"bootstrap": 10}}, ["evaluate"]),
    ({"eval": {"full_ranking": False}}, ["evaluate"]),
    ({"meta": {"inner_lr": 3.0}}, ["evaluate", "fit:mf_ft", "fit:responsive", "fit:responsive_plus", "train"]),  # MF-FT shares meta (dim, λs)
    # Pop (early) reads the tasks section (tasks.early_max): keyed on the whole section, as every row is (a refit costs ms)
    ({"tasks": {"K": 10}}, ["evaluate", "fit:pop_early", "fit:responsive", "fit:responsive_plus", "tasks", "train"]),
    ({"baselines": {"srec_obs_var": 0.5}}, ["evaluate", "fit:mf_ft", "fit:rkmf", "fit:spmf", "fit:srec"]),
    ({"runtime": {"torch_threads": 1}}, []),
])
def test_a_config_change_rekeys_only_the_stages_that_read_it(edited, override, stages_rekeyed):
    before = paths.stage_keys(Config())
    assert _changed(before, paths.stage_keys(Config(**override))) == stages_rekeyed


def test_a_data_change_rekeys_every_stage(edited):
    before = paths.stage_keys(Config())
    assert _changed(before, paths.stage_keys(Config(data={"seed": 5}))) == sorted(before)
    assert paths.data_version(Config()) != paths.data_version(Config(data={"seed": 5}))
    assert paths.data_version(Config()) == paths.data_version(Config(data={"data_dir": "/elsewhere"}))  # where, not what


def _recorded(config: Config, tmp_path: Path, sweep: bool = False) -> Path:
    table = tmp_path / "table1.md"
    table.write_text("| model |\n")
    path = stages.record_path(config, sweep)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(stages.stage_record(config, sweep, {"table1.md": str(table)})))
    return table


def test_a_warm_run_is_recognised_until_config_tuning_or_code_change(edited, tmp_path: Path):
    config = Config(runtime={"artifacts_dir": str(tmp_path)})
    _recorded(config, tmp_path)
    keys = stages.cached_run(config, sweep=False)["keys"]
    assert len(keys) == config.data.new_user_folds and keys["0"] == paths.stage_keys(paths.fold_configs(config)[0])
    assert stages.cached_run(config, sweep=True) is None  # a run with the sweep was never recorded
    assert stages.cached_run(config.model_copy(update={"eval": config.eval.model_copy(update={"seed": 9})}), sweep=False) is None
    config = config.model_copy(update={"runtime": config.runtime.model_copy(update={"tuned_dir": tmp_path / "tuned"})})
    _recorded(config, tmp_path)
    (tmp_path / "tuned").mkdir()
    (tmp_path / "tuned" / "ml-100k.json").write_text("{}")  # `metarec tune` chose values: the pipeline would run with them
    assert stages.cached_run(config, sweep=False) is None
    _recorded(config, tmp_path)
    assert stages.cached_run(config, sweep=False) is not None
    edited("flows/pipeline.py")  # the flow's own code: no stage is re-keyed, but its outputs would be rendered anew
    assert stages.cached_run(config, sweep=False) is None


def test_a_warm_run_needs_its_outputs(edited, tmp_path: Path):
    config = Config(runtime={"artifacts_dir": str(tmp_path)})
    _recorded(config, tmp_path).unlink()
    assert stages.cached_run(config, sweep=False) is None
