"""Ours+ (row responsive_plus): the options docs/findings.md points to, each a named config field that the paper's
row leaves at the paper's value."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from metarec.config import Config, MetaConfig, TaskConfig
from metarec.interface import RecentItems
from metarec.models.registry import DEFAULT_MODELS, ROWS
from metarec.models.responsive import ResponsiveMF
from metarec.synthetic import planted_interactions

SMALL = MetaConfig(dim=8, epochs=1, batch_tasks=64, inner_lr=1.0, seed=0)


@pytest.fixture(scope="module")
def planted():
    return planted_interactions(n_users=60, n_items=50, per_user=14, seed=2)


@pytest.fixture(scope="module")
def own_only(planted) -> ResponsiveMF:
    return ResponsiveMF(SMALL, TaskConfig(k=3, K=12, support_neighbours=False)).fit(planted.interactions)


def test_the_paper_row_keeps_the_papers_values_and_ours_plus_sits_beside_it():
    config = Config()
    paper, plus = config.for_row("responsive"), config.for_row("responsive_plus")
    assert paper.tasks.support_neighbours and paper.tasks.serve_k is None and paper.meta.serve_inner_lr is None
    assert paper.tasks.support_size == paper.tasks.K and paper.meta.serving() == paper.meta
    assert not plus.tasks.support_neighbours and plus.tasks.support_size == plus.tasks.k
    assert ROWS["responsive_plus"].label == "Ours+" and ROWS["responsive_plus"].is_ours
    assert DEFAULT_MODELS[:2] == ("responsive", "responsive_plus")  # Table 1 shows both, paper first


def test_without_neighbours_every_support_triple_is_the_users_own(own_only):
    users = np.array([0, 1, 2, 3])
    recent, ts = own_only.index_.recent_items(users, 3)
    (s_users, _, _), has = own_only.supports(users, recent, ts, np.random.default_rng(0))
    assert s_users.shape == (4, 3) and (s_users == users[:, None]).all()  # K = k: no neighbour's interaction


def test_a_paper_support_does_hold_neighbours(planted):
    model = ResponsiveMF(SMALL, TaskConfig(k=3, K=12)).fit(planted.interactions)
    users = np.array([0, 1, 2, 3])
    recent, ts = model.index_.recent_items(users, 3)
    (s_users, _, _), _ = model.supports(users, recent, ts, np.random.default_rng(0))
    assert s_users.shape == (4, 12) and (s_users[:, 3:] != users[:, None]).any()


def test_serve_k_puts_all_shown_items_of_a_new_user_in_the_support(own_only):
    shown = np.arange(10)[None, :].repeat(5, axis=0)
    users = np.arange(1000, 1005)
    ts = np.tile(np.arange(10), (5, 1))
    paper_own = own_only.supports(users, shown, ts, np.random.default_rng(0))[0][1]
    assert set(np.unique(paper_own)) == {7, 8, 9}  # the last k = 3 only
    served = copy.copy(own_only)
    served.tasks = own_only.tasks.model_copy(update={"serve_k": 10})
    own = served.supports(users, shown, ts, np.random.default_rng(0))[0][1]
    assert own.shape == (5, 10) and all(set(row) == set(range(10)) for row in own)


def test_serving_alpha_and_L_change_adaptation_only_when_set(own_only):
    recent = RecentItems(np.arange(2000, 2004), np.tile([[1, 2, 3, 4]], (4, 1)), np.tile([[1, 2, 3, 4]], (4, 1)))
    cands = np.tile(np.arange(20), (4, 1))
    base = own_only.score_new_users(recent, cands)

    def served(**meta) -> np.ndarray:
        model = copy.copy(own_only)
        model.meta = own_only.meta.model_copy(update=meta)
        return model.score_new_users(recent, cands)

    assert np.array_equal(served(serve_inner_lr=None, serve_inner_steps=None), base)
    assert not np.allclose(served(serve_inner_lr=5.0), base)
    assert not np.allclose(served(serve_inner_steps=4), base)
    # L = 0: Θ alone, every new user at the mean of the trained rows + noise, so its scores barely depend on what it showed
    unadapted = served(serve_inner_steps=0)
    other = RecentItems(recent.users, np.tile([[30, 31, 32, 33]], (4, 1)), recent.ts)
    model = copy.copy(own_only)
    model.meta = own_only.meta.model_copy(update={"serve_inner_steps": 0})
    assert np.allclose(model.score_new_users(other, cands), unadapted, atol=1e-5)


def test_fit_without_neighbours_trains_on_k_triple_tasks_of_the_users_own(planted, monkeypatch):
    """fit() must pass K = k to task construction when support_neighbours is off, not the configured K."""
    import metarec.models.responsive as responsive

    built = []
    real = responsive.build_tasks

    def recording(*args, **kwargs):
        tasks = real(*args, **kwargs)
        built.append(tasks)
        return tasks

    monkeypatch.setattr(responsive, "build_tasks", recording)
    ResponsiveMF(SMALL, TaskConfig(k=4, K=20, support_neighbours=False)).fit(planted.interactions)
    (tasks,) = built
    assert tasks.K == 4 and (tasks.support_users == tasks.query_user[:, None]).all()


def test_summary_lists_ours_plus_options_against_the_paper_row():
    from tasks.evaluate.aggregate import RunFacts, ours_options, summary_markdown

    config = Config(tuned={"responsive_plus": {"tasks.serve_k": 9}})
    lines = ours_options(config, ("responsive", "responsive_plus", "pop"))
    assert len(lines) == 1 and lines[0].startswith("- Ours+:")
    assert "tasks.serve_k = 9" in lines[0] and "tasks.support_neighbours = False" in lines[0] and "lambda_ml" not in lines[0]
    summary = summary_markdown(RunFacts("d", 1, [], {}, {}, quick=True, row_options=lines), [], {}, [])
    assert "## Our rows beside the paper's" in summary and lines[0] in summary
