"""The meta-learning rows of issue 11 (MeLU, MAMO, the prototype recommender, FOMAML): gradients, planted data, state.

The protocol conformance of the three neural models (new users leave the model unchanged, same seed same
scores, unseen ids, save without pickle, empty input, round trip through observe) runs in
test_baselines.py with the other models; here are the claims that are theirs alone.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from metarec.config import Config, NeuralConfig, TaskConfig
from metarec.features import Features
from metarec.interface import RecentItems
from metarec.meta_tasks import build_tasks
from metarec.models.common import sampled_metrics
from metarec.models.neural import Episodes
from metarec.models.factory import make_model
from metarec.models.registry import ROWS
from metarec.synthetic import planted_feature_interactions

NEURAL = ("melu", "mamo", "prototype", "metahin", "sequence_meta")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny tensors, one torch thread


@pytest.fixture(scope="module")
def planted():
    return planted_feature_interactions(n_users=240, n_items=96, n_groups=4, per_user=16, seed=5)


def _config(**neural) -> Config:
    return Config(neural=NeuralConfig(**{"dim": 8, "hidden": 16, "batch_tasks": 64, **neural}), tasks=TaskConfig(k=4, K=6), tuned={})


def _fitted(name: str, data, features: Features | None, **neural):
    model = make_model(name, _config(**neural))
    if features is not None:
        model.set_features(features)
    history = data.interactions.take(data.interactions.users % 5 != 0)
    return model.fit(history)


def _new_user_case(data, n: int, negatives: int = 30, seed: int = 0) -> tuple[RecentItems, np.ndarray]:
    """Held-out users (id % 5 == 0) shown their first n items; the (n+1)-th against items they never had."""
    inter = data.interactions
    users = np.unique(inter.users[inter.users % 5 == 0])
    items = np.stack([inter.items[inter.users == u] for u in users])
    ts = np.stack([inter.ts[inter.users == u] for u in users])
    rng = np.random.default_rng(seed)
    owned = np.zeros((inter.n_users, inter.n_items), dtype=bool)
    owned[inter.users, inter.items] = True
    cands = np.stack([np.r_[items[r, n], rng.choice(np.flatnonzero(~owned[u]), negatives, replace=False)] for r, u in enumerate(users)])
    return RecentItems(users, items[:, :n], ts[:, :n]), cands


# ------------------------------------------------------------------ MeLU's meta-gradient
def test_melu_meta_gradient_reaches_the_embeddings_and_equals_finite_differences(planted):
    """The query loss differentiates through the local update into the feature embeddings (second order): the
    autograd gradient is non-zero, matches central differences, and differs from the first-order one."""
    model = _fitted("melu", planted, planted.features, epochs=0, local_steps=2, local_lr=0.5)
    model.net_.double()
    history = planted.interactions.take(planted.interactions.users % 5 != 0)
    episodes = Episodes.from_tasks(build_tasks(history, 4, 6, seed=1), 4).take(slice(0, 12))
    episodes = Episodes(*(t.double() if t.is_floating_point() else t for t in vars(episodes).values()))
    embeddings = [model.net_.users.code_emb, model.net_.items.code_emb]
    exact = torch.autograd.grad(model.episode_loss(episodes), embeddings)
    assert all(float(g.abs().max()) > 1e-6 for g in exact), "no meta-gradient reaches an embedding"

    def loss_at() -> float:
        return float(model.episode_loss(episodes).detach())

    eps = 1e-6
    for table, grad in zip(embeddings, exact):
        for flat in torch.topk(grad.abs().flatten(), 3).indices.tolist():
            row, col = divmod(flat, table.shape[1])
            with torch.no_grad():
                table[row, col] += eps
            up = loss_at()
            with torch.no_grad():
                table[row, col] -= 2 * eps
            down = loss_at()
            with torch.no_grad():
                table[row, col] += eps
            assert (up - down) / (2 * eps) == pytest.approx(float(grad[row, col]), rel=1e-5, abs=1e-9)

    model.neural = model.neural.model_copy(update={"first_order": True})
    first = torch.autograd.grad(model.episode_loss(episodes), embeddings)
    assert not torch.allclose(first[1], exact[1], rtol=1e-4, atol=1e-9), "second-order terms are missing"


# ------------------------------------------------------------------ planted data: features determine taste
def test_melu_beats_its_no_adaptation_version_where_features_determine_taste(planted):
    """Taste is a genre, the genre an item feature, and the user profile says nothing: only adapting to the few
    shown items can find a new user's genre (a model without the local update ranks for the population)."""
    recent, cands = _new_user_case(planted, n=4)
    adapted = _fitted("melu", planted, planted.features, epochs=4, local_steps=1, local_lr=1.0)
    frozen = _fitted("melu", planted, planted.features, epochs=4, local_steps=0)
    auc_adapted = sampled_metrics(adapted.score_new_users(recent, cands))["auc"]
    auc_frozen = sampled_metrics(frozen.score_new_users(recent, cands))["auc"]
    assert auc_adapted > 0.8 and auc_adapted > auc_frozen + 0.15, (auc_adapted, auc_frozen)


@pytest.mark.parametrize("name", NEURAL)
def test_shown_items_move_a_new_users_scores_to_their_genre(planted, name):
    """Every neural row adapts: showing a new user items of one genre ranks that genre above the others."""
    model = _fitted(name, planted, planted.features, epochs=2, local_lr=1.0)
    genre = planted.item_group
    shown = np.flatnonzero(genre == 1)[:4]
    recent = RecentItems(np.array([0]), shown[None, :], np.arange(4)[None, :] + 10**6)
    cands = np.r_[np.flatnonzero(genre == 1)[4:20], np.flatnonzero(genre != 1)[:48]][None, :]
    scores = model.score_new_users(recent, cands)[0]
    assert scores[:16].mean() > scores[16:].mean(), name


# ------------------------------------------------------------------ features in the saved state; the fallback
@pytest.mark.parametrize("name", NEURAL)
def test_save_load_with_features_gives_the_same_scores(planted, name, tmp_path):
    from tasks.train.models import load_model, save_model

    model = _fitted(name, planted, planted.features, epochs=1)
    loaded = load_model(save_model(model, name, _config(), tmp_path / name))
    recent, cands = _new_user_case(planted, n=2)
    np.testing.assert_array_equal(model.score_new_users(recent, cands), loaded.score_new_users(recent, cands))
    assert loaded.features_.items is not None and loaded.features_.items.fields == ("genre", "decade")
    report = loaded.feature_report()
    assert report["uses_features"] and not report["fallback"] and report["item_fields"] == ["genre", "decade"]


@pytest.mark.parametrize("name", NEURAL)
def test_without_features_the_model_falls_back_to_ids_and_says_so(planted, name):
    model = _fitted(name, planted, None, epochs=1)
    report = model.feature_report()
    assert report["fallback"] and not report["uses_features"] and "falls back to id embeddings" in report["note"]
    recent, cands = _new_user_case(planted, n=2)
    assert np.isfinite(model.score_new_users(recent, cands)).all()
    off = make_model(name, _config(use_features=False))
    off.set_features(planted.features)
    assert off.feature_report()["fallback"] and "use_features" in off.feature_report()["note"]


def test_mamo_writes_its_memories_in_training_and_only_reads_them_while_serving(planted):
    model = _fitted("mamo", planted, planted.features, epochs=0)
    before = {k: v.clone() for k, v in model.net_.state_dict().items() if k.endswith("memory")}
    history = planted.interactions.take(planted.interactions.users % 5 != 0)
    model.train_episodes(Episodes.from_tasks(build_tasks(history, 4, 6, seed=1), 4).take(slice(0, 64)), None)
    after = {k: v.clone() for k, v in model.net_.state_dict().items() if k.endswith("memory")}
    assert set(before) == {"profile_memory", "user_memory", "preference_memory"}
    assert all(not torch.equal(before[k], after[k]) for k in before)
    model.score_new_users(*_new_user_case(planted, n=2))
    assert all(torch.equal(after[k], model.net_.state_dict()[k]) for k in after)


def test_mamo_gives_users_with_different_profiles_different_starting_points(planted):
    """θ_u = φ_u - τ a_uᵀM_U and M_uI = Σ a_uk M_UI[k] follow the profile; equal profiles start alike."""
    model = _fitted("mamo", planted, planted.features, epochs=1)
    region = planted.features.users.codes[:, 0]
    same = np.flatnonzero(region == region[0])[:2]
    other = np.flatnonzero(region != region[0])[0]
    users = torch.as_tensor([same[0], same[1], other])
    attention = model.attention(model.net_.users(users))
    start = model.initial_params(attention, {n: p.detach() for n, p in model.net_.scorer.named_parameters()})
    assert torch.allclose(attention.sum(1), torch.ones(3))
    for key in ("user_emb.0.weight", "memory_weight"):
        assert torch.equal(start[key][0], start[key][1]) and not torch.equal(start[key][0], start[key][2]), key


# ------------------------------------------------------------------ FOMAML
def test_fomaml_is_our_model_with_first_order_as_its_own_row():
    row = ROWS["responsive_fo"]
    assert row.is_ours and row.fixed == {"meta.first_order": True} and row.factory == ROWS["responsive"].factory
    config = Config(tuned={})
    assert make_model("responsive_fo", config).meta.first_order and not make_model("responsive", config).meta.first_order
    assert config.for_row("responsive_fo").hash_of("meta") != config.for_row("responsive").hash_of("meta")
