"""Issue 23's meta-learning rows: the papers' episodes, serving on all shown items, new items, MetaHIN, sequence_meta.

Small planted data (taste is a genre, the genre an item feature), few epochs; every claim fails on the code
before issue 23 (history-task episodes, the last k shown, every item "known", no metahin/sequence_meta rows).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from metarec.config import Config, NeuralConfig, TaskConfig
from metarec.features import Features, FeatureTable
from metarec.interface import Interactions, RecentItems
from metarec.models.common import sampled_metrics
from metarec.models.metahin import MetaPaths
from metarec.models.neural import pack_recent, split_episodes
from metarec.models.registry import DEFAULT_MODELS, ROWS
from metarec.models.factory import make_model
from metarec.neighbours import InteractionIndex
from metarec.synthetic import planted_feature_interactions

ROWS_23 = ("melu", "mamo", "prototype", "metahin", "sequence_meta")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny tensors, one torch thread


@pytest.fixture(scope="module")
def planted():
    return planted_feature_interactions(n_users=200, n_items=96, n_groups=4, per_user=16, seed=5)


def _config(**neural) -> Config:
    fields = {"dim": 8, "hidden": 16, "batch_tasks": 32, "outer_lr": 0.01, "epochs": 3, "local_lr": 1.0, **neural}
    return Config(neural=NeuralConfig(**fields), tasks=TaskConfig(k=4, K=6), tuned={})


def _history(data, drop_items=()):
    inter = data.interactions
    keep = (inter.users % 5 != 0) & ~np.isin(inter.items, np.asarray(drop_items, dtype=np.int64))
    return inter.take(keep)


def _fitted(name, data, features=None, drop_items=(), **neural):
    model = make_model(name, _config(**neural))
    model.set_features(data.features if features is None else features)
    return model.fit(_history(data, drop_items))


def _new_user_case(data, n: int, negatives: int = 30, seed: int = 0):
    inter = data.interactions
    users = np.unique(inter.users[inter.users % 5 == 0])
    items = np.stack([inter.items[inter.users == u] for u in users])
    ts = np.stack([inter.ts[inter.users == u] for u in users])
    owned = np.zeros((inter.n_users, inter.n_items), dtype=bool)
    owned[inter.users, inter.items] = True
    rng = np.random.default_rng(seed)
    cands = np.stack([np.r_[items[r, n], rng.choice(np.flatnonzero(~owned[u]), negatives, replace=False)] for r, u in enumerate(users)])
    return RecentItems(users, items[:, :n], ts[:, :n]), cands


# ------------------------------------------------------------------ the papers' episodes
def test_split_episodes_draw_every_support_size_from_one_and_keep_support_and_query_apart():
    rng = np.random.default_rng(0)
    users = np.repeat(np.arange(30), 12)
    items = np.concatenate([rng.permutation(40)[:12] for _ in range(30)])
    ts = np.tile(np.arange(12), 30)
    index = InteractionIndex.build(Interactions(users, items, ts))
    ep = split_episodes(index, k=5, queries=4, per_user=6, early_share=0.0, rng=np.random.default_rng(1), n_items=40)
    sizes = ep.support_mask.sum(1).numpy().astype(int)
    assert set(sizes) == {1, 2, 3, 4, 5} and len(ep) == 180
    assert (ep.query_mask.sum(1) == 4).all()
    owned = {(u, i) for u, i in zip(users, items)}
    for b in range(len(ep)):
        u = int(ep.users[b])
        support = ep.support_pos[b][ep.support_mask[b] > 0].tolist()
        query = ep.query_pos[b][ep.query_mask[b] > 0].tolist()
        assert not set(support) & set(query) and all((u, i) in owned for i in support + query)
        assert all((u, int(j)) not in owned for j in ep.query_neg[b][ep.query_mask[b] > 0])
        order = [int(ts[(users == u) & (items == i)][0]) for i in support]
        assert order == sorted(order), "supports keep the user's time order"
    # the random split is not the history tasks' "k before, then the next": query items come from anywhere
    again = split_episodes(index, k=5, queries=4, per_user=6, early_share=0.0, rng=np.random.default_rng(1), n_items=40)
    assert torch.equal(ep.query_pos, again.query_pos) and torch.equal(ep.support_neg, again.support_neg)


def test_early_episodes_ask_for_what_follows_the_first_items():
    users, items, ts = np.zeros(10, np.int64), np.arange(10) + 5, np.arange(10)
    index = InteractionIndex.build(Interactions(users, items, ts))
    ep = split_episodes(index, k=3, queries=2, per_user=20, early_share=1.0, rng=np.random.default_rng(2), n_items=20)
    for b in range(len(ep)):
        s = int(ep.support_mask[b].sum())
        assert ep.support_pos[b, :s].tolist() == list(range(5, 5 + s))
        assert ep.query_pos[b].tolist() == [5 + s, 6 + s]


def test_serving_adapts_on_every_shown_item_or_the_last_serve_k(planted):
    recent = np.array([[3, 4, 5, 6, 7, 8, 9, 10], [11, 12, -1, -1, -1, -1, -1, -1]])
    assert pack_recent(recent, None).tolist() == recent.tolist()
    assert pack_recent(recent, 3).tolist() == [[8, 9, 10], [11, 12, -1]]
    model = _fitted("melu", planted, epochs=0)  # tasks.k = 4 < 8 shown
    episodes = model.support(np.array([1000, 1001]), recent, np.random.default_rng(0))
    assert episodes.support_mask.sum(1).tolist() == [8.0, 2.0]
    model.neural = model.neural.model_copy(update={"serve_k": 3})
    assert model.support(np.array([1000, 1001]), recent, np.random.default_rng(0)).support_mask.sum(1).tolist() == [3.0, 2.0]


def test_fit_calls_on_epoch_after_every_epoch(planted):
    seen = []
    make_model("prototype", _config(epochs=3)).fit(_history(planted), on_epoch=lambda passes, model: seen.append((passes, model().name)))
    assert seen == [(1, "prototype"), (2, "prototype"), (3, "prototype")]  # passes done, and the model as fit returns it


# ------------------------------------------------------------------ every row adapts to a planted taste
@pytest.mark.parametrize("name", ROWS_23)
def test_each_row_learns_a_planted_taste_better_than_without_adaptation(planted, name):
    """A new user's genre shows only through its shown items: scored from them, the next item ranks far above the
    same model's ranking without them (its population start, no adaptation)."""
    model = _fitted(name, planted, epochs=4)
    recent, cands = _new_user_case(planted, n=4)
    unadapted = RecentItems(recent.users, np.full_like(recent.items, -1), recent.ts)
    adapted_auc = sampled_metrics(model.score_new_users(recent, cands))["auc"]
    frozen_auc = sampled_metrics(model.score_new_users(unadapted, cands))["auc"]
    assert adapted_auc > 0.75 and adapted_auc > frozen_auc + 0.15, (adapted_auc, frozen_auc)


# ------------------------------------------------------------------ state and new items
@pytest.mark.parametrize("name", ("metahin", "sequence_meta"))
def test_save_load_round_trip_gives_the_same_scores_and_stream(planted, name, tmp_path):
    from tasks.train.models import load_model, save_model

    model = _fitted(name, planted, epochs=1)
    loaded = load_model(save_model(model, name, _config(), tmp_path / name))
    recent, cands = _new_user_case(planted, n=3)
    np.testing.assert_array_equal(model.score_new_users(recent, cands), loaded.score_new_users(recent, cands))
    batch = planted.interactions.take(planted.interactions.users % 5 == 0)
    for m in (model, loaded):
        m.observe(batch)
    users = np.unique(batch.users)[:5]
    np.testing.assert_array_equal(model.score(users, cands[:5]), loaded.score(users, cands[:5]))


def _twin_items(planted) -> tuple[int, int]:
    """Two items with the same feature values (genre and decade): told apart only by their id rows."""
    codes = planted.features.items.codes
    keys = [tuple(sorted(row[row >= 0])) for row in codes]
    for i in range(len(keys)):
        for j in range(i + 1, len(keys)):
            if keys[i] == keys[j]:
                return i, j
    raise AssertionError("no twin items in the planted data")


@pytest.mark.parametrize("name", ROWS_23)
def test_items_without_a_training_positive_are_new_items(planted, name):
    """Twin items whose positives are all withheld from training score alike (the mean id row and their shared
    features), as ours and the baselines score new items; once the stream brings a positive, the item is known."""
    a, b = _twin_items(planted)
    model = _fitted(name, planted, drop_items=(a, b), epochs=1)
    assert not bool(model.net_.items.known[a]) and bool(model.net_.items.known.any())
    recent, _ = _new_user_case(planted, n=3)
    scores = model.score_new_users(recent, np.tile([a, b], (len(recent.users), 1)))
    np.testing.assert_allclose(scores[:, 0], scores[:, 1], rtol=1e-5, atol=1e-6)
    model.observe(Interactions(np.array([1]), np.array([a]), np.array([10**7])))
    assert bool(model.net_.items.known[a]) and not bool(model.net_.items.known[b])


# ------------------------------------------------------------------ MetaHIN's graph and fallback
def test_metahin_walks_follow_their_meta_paths_and_never_through_the_task_user():
    # users 0, 1 share item 0; user 1 also had item 1; item 2 shares item 0's genre; user 2 shares user 0's occupation
    inter = Interactions(np.array([0, 1, 1, 2, 0]), np.array([0, 0, 1, 3, 4]), np.arange(5))
    items = FeatureTable.from_long(np.array([0, 1, 2, 3, 4]), np.array([0, 1, 0, 1, 1]), np.array([0, 0]), ("genre",), 5)
    users = FeatureTable.from_long(np.array([0, 1, 2]), np.array([0, 1, 0]), np.array([0, 0]), ("occupation",), 3)
    paths = MetaPaths.build(InteractionIndex.build(inter), Features(users, items))
    assert paths.names_for(Features(users, items)) == ("UI", "UIUI", "UIAI", "UAUI")
    ctx = paths.contexts(np.array([0]), np.array([[0]]), np.array([[1.0]]), np.random.default_rng(0))
    assert set(ctx[0, 0]) == {0}  # UI: the support item
    assert set(ctx[0, 1]) <= {0, 1} and 1 in ctx[0, 1]  # UIUI via user 1 (never via user 0 itself)
    assert set(ctx[0, 2]) <= {0, 2} and 2 in ctx[0, 2]  # UIAI: items of item 0's genre
    assert set(ctx[0, 3]) <= {0, 3} and 3 in ctx[0, 3]  # UAUI: user 2 shares user 0's occupation and had item 3 (a walk back to user 0 stays)
    assert MetaPaths.names_for(Features()) == ("UI", "UIUI")


def test_metahin_without_features_runs_on_id_only_paths_and_says_so(planted):
    model = _fitted("metahin", planted, features=Features(), epochs=1)
    report = model.feature_report()
    assert report["fallback"] and report["meta_paths"] == ["UI", "UIUI"] and "id-only paths" in report["note"]
    recent, cands = _new_user_case(planted, n=2)
    assert np.isfinite(model.score_new_users(recent, cands)).all()


# ------------------------------------------------------------------ the registry
def test_the_rows_are_opt_in_named_and_searchable():
    for name, label in (("metahin", "MetaHIN"), ("sequence_meta", "Sequence meta-learner")):
        assert ROWS[name].label == label and not ROWS[name].in_default and name not in DEFAULT_MODELS
    for name in ROWS_23:
        space = ROWS[name].space
        assert {"neural.episodes_per_user", "neural.query_items", "neural.early_share", "neural.serve_k"} <= set(space), name
        assert ("neural.local_lr" in space) == (name != "prototype"), name  # the prototype has no local update
    assert "neural.semantic_lr" in ROWS["metahin"].space
    assert make_model("sequence_meta", Config(tuned={})).early_share() == 0.5
    assert make_model("melu", Config(tuned={})).early_share() == 0.0
