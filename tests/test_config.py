from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from metarec.models.pop import PopRecommender
from metarec.interface import Interactions, RecentItems
from tasks.runtime.settings import ConfigError, load_config


def test_defaults_and_hash_stable():
    a, b = load_config(), load_config()
    assert a.hash_of() == b.hash_of()
    assert a.hash_of("data") != a.hash_of("data", "tasks")


def test_set_override_changes_hash_of_its_section_only():
    base = load_config()
    changed = load_config(overrides=["meta.lambda_ml=0.5"])
    assert changed.meta.lambda_ml == 0.5
    assert changed.hash_of("data") == base.hash_of("data")
    assert changed.hash_of() != base.hash_of()


def test_env_and_toml_layers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("METAREC_META__DIM", "16")
    toml = tmp_path / "c.toml"
    toml.write_text("[meta]\ninner_steps = 3\n")
    cfg = load_config(toml, ["meta.inner_lr=0.1"])
    assert (cfg.meta.dim, cfg.meta.inner_steps, cfg.meta.inner_lr) == (16, 3, 0.1)


@pytest.mark.parametrize(
    "override, words",
    [
        ("eval.models=['pop','nope']", "unknown model"),
        ("data.new_user_ns=[0,5]", "new_user_ns"),
        ("eval.lambda_sweep=[-1.0]", "lambda_ML"),
        ("meta.lambda_ml=-1", "meta.lambda_ml"),
        ("data.new_user_fraction=1.5", "data.new_user_fraction"),
        ("tasks.k=30", "tasks.k"),
    ],
)
def test_bad_values_rejected_with_a_clear_message(override: str, words: str):
    with pytest.raises(ConfigError, match=words.replace(".", r"\.")):
        load_config(overrides=[override])


def test_bad_set_syntax_and_missing_file(tmp_path: Path):
    with pytest.raises(ConfigError, match="section.field=value"):
        load_config(overrides=["lambda_ml"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")


def test_pop_counts_follow_the_stream_and_unseen_items_score_zero():
    model = PopRecommender().fit(Interactions.from_arrays([0, 1, 2], [5, 5, 3]))
    cands = np.array([[5, 3, 9]])
    assert model.score(np.array([0]), cands).tolist() == [[2, 1, 0]]
    model.observe(Interactions.from_arrays([7, 7, 8], [9, 9, 9]))
    assert model.score(np.array([0]), cands).tolist() == [[2, 1, 3]]
    recent = RecentItems(np.array([99]), np.array([[5]]), np.array([[0]]))
    assert model.score_new_users(recent, cands).tolist() == [[2, 1, 3]]
    assert model.recommend(0, n=2, exclude=np.array([9])).tolist() == [5, 3]
