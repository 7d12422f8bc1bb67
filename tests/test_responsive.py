"""The responsive MF behind the StreamingRecommender interface: serving, unseen ids, online updates, planted data."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from metarec.config import Config, MetaConfig, TaskConfig
from metarec.interface import Interactions, RecentItems
from metarec.models.factory import make_model
from metarec.models.responsive import ResponsiveMF
from metarec.synthetic import planted_interactions

SMALL = MetaConfig(dim=8, epochs=1, batch_tasks=64, inner_lr=1.0, seed=0)


@pytest.fixture(scope="module")
def planted():
    return planted_interactions(n_users=60, n_items=50, per_user=12, seed=1)


@pytest.fixture(scope="module")
def fitted(planted) -> ResponsiveMF:
    return ResponsiveMF(SMALL, TaskConfig(k=3, K=6)).fit(planted.interactions)


def test_registry_builds_the_model_from_config():
    model = make_model("responsive", Config(meta={"dim": 7}, tasks={"k": 2, "K": 4}))
    assert isinstance(model, ResponsiveMF) and model.meta.dim == 7 and model.tasks.K == 4


def test_serving_adapts_without_changing_theta_and_is_repeatable(fitted, planted):
    P, Q = fitted.P_.detach().clone(), fitted.Q_.detach().clone()
    users = np.array([0, 1, 2])
    cands = np.tile(np.arange(10), (3, 1))
    first = fitted.score(users, cands)
    assert torch.equal(fitted.P_.detach(), P) and torch.equal(fitted.Q_.detach(), Q)
    assert np.array_equal(first, fitted.score(users, cands))
    plain = (P[users][:, None, :] * Q[cands]).sum(-1).numpy()
    assert not np.allclose(first, plain)  # the adapted rows differ from Θ's


def test_adapt_many_users_at_once_equals_one_at_a_time(fitted):
    users = np.array([3, 4, 5])
    recent, ts = fitted.index_.recent_items(users, 3)
    together = fitted.adapt_supports(*fitted.supports(users, recent, ts, np.random.default_rng(0))[0], torch.Generator().manual_seed(0))
    s = fitted.supports(users, recent, ts, np.random.default_rng(0))[0]
    for b in range(3):
        alone = fitted.adapt_supports(s[0][b : b + 1], s[1][b : b + 1], s[2][b : b + 1], torch.Generator().manual_seed(0))
        assert torch.allclose(alone.user_rows[0], together.user_rows[b], atol=1e-6)


NOISE_BOUND = 4 * SMALL.new_row_std * np.sqrt(SMALL.dim)  # |N(0, σ²I_d)| stays below this; a random N(0, 0.1²I) row does not


def _trained_means(model: ResponsiveMF) -> tuple[torch.Tensor, torch.Tensor]:
    users, items = model._trained_masks()
    return model.P_.detach()[torch.as_tensor(users)].mean(0), model.Q_.detach()[torch.as_tensor(items)].mean(0)


@pytest.fixture(scope="module")
def without_items(planted):
    """Fitted on a history where items 3, 11 and 17 have no positive: inside Q (ids are dense), never trained as positives."""
    history = planted.interactions
    model = ResponsiveMF(SMALL, TaskConfig(k=3, K=6)).fit(history.take(~np.isin(history.items, [3, 11, 17])))
    return model


def test_unseen_user_and_unseen_item_get_the_mean_of_trained_rows_plus_noise(without_items):
    model = without_items
    n_users, n_items = model.n_users_, model.n_items_
    user_mean, item_mean = _trained_means(model)
    trained_users, trained_items = model._trained_masks()
    assert not trained_items[[3, 11, 17]].any() and trained_items.sum() == n_items - 3 and trained_users.all()
    gen = torch.Generator().manual_seed(0)
    kept = model.Q_.detach()[[3, 11, 17]].clone()
    with torch.no_grad():
        model.Q_[[3, 11, 17]] = 50.0  # whatever Θ holds for an untrained row (fit resets it; see below), serving must not use it
    try:
        user_rows = model._user_rows(np.array([n_users + 5, n_users + 9]), gen)
        item_rows = model._item_rows(torch.tensor([3, 11, 17, n_items + 3]), gen)
        cands = np.array([[0, 1, 3, n_items + 3]])
        scores = model.score(np.array([n_users + 5]), cands)[0]
    finally:
        with torch.no_grad():
            model.Q_[[3, 11, 17]] = kept
    assert ((user_rows - user_mean).norm(dim=1) < NOISE_BOUND).all()
    assert ((item_rows - item_mean).norm(dim=1) < NOISE_BOUND).all()
    assert (item_rows[0] - item_rows[1]).norm() > 0  # noise, not one shared row
    # in the scores too: an unseen user (nothing to adapt from) scores with that row, an unseen item likewise
    Q = model.Q_.detach()
    expected = np.array([user_mean @ Q[0], user_mean @ Q[1], user_mean @ item_mean, user_mean @ item_mean])
    assert np.abs(scores - expected).max() < NOISE_BOUND * max(Q.norm(dim=1).max(), item_mean.norm()) + NOISE_BOUND * user_mean.norm()
    assert model.n_users_ == n_users and model.n_items_ == n_items  # serving never grows Θ


def test_fit_resets_untrained_rows_in_theta_itself(without_items):
    """Θ as saved (and registered) holds §7's rows for untrained ids, not their random start or a pushed-down row."""
    user_mean, item_mean = _trained_means(without_items)
    Q = without_items.Q_.detach()
    assert ((Q[[3, 11, 17]] - item_mean).norm(dim=1) < NOISE_BOUND).all()
    assert (Q[[0, 1, 2]] - item_mean).norm(dim=1).min() > NOISE_BOUND  # trained rows differ


def test_new_user_support_negatives_avoid_every_item_it_has_shown(fitted):
    """n = 10 shown, k = 3 in the support: none of the 10 may be a support negative (not only the last 3)."""
    shown = np.arange(10)[None, :].repeat(40, axis=0)  # 40 new users, each showed items 0..9, in 50 items
    users = np.arange(1000, 1040)
    s, has = fitted.supports(users, shown, np.tile(np.arange(10), (40, 1)), np.random.default_rng(0))
    assert has.all()
    own_neg = s[2][:, : fitted.tasks.k]
    assert not np.isin(own_neg, np.arange(10)).any()


@pytest.mark.parametrize("model_name", ["fitted", "without_items"])
def test_scoring_every_item_by_one_product_equals_gathering_their_rows(model_name, request):
    """Full ranking's path (user rows · all item rows) gives the gathered path's scores, adapted items and
    ids beyond the table and untrained items (mean of the trained rows + noise, the same draws) included."""
    fitted = request.getfixturevalue(model_name)
    n_items = fitted.n_items_
    users = np.array([0, 1, 2, 3])
    recent = np.array([[4, 9, n_items + 2], [1, -1, -1], [-1, -1, -1], [7, 7, 8]])  # beyond the table, padding, nothing
    adapted = fitted.adapt(users, recent, np.tile([10, 20, 30], (4, 1)), new_users=True)
    cand = torch.as_tensor(np.tile(np.arange(n_items + 4), (4, 1)))
    gathered = fitted._score_gathered(adapted, cand, torch.Generator().manual_seed(5))
    product = fitted._score_by_product(adapted, cand, torch.Generator().manual_seed(5))
    assert torch.allclose(product, gathered, rtol=1e-5, atol=1e-6)
    plain = adapted.user_rows @ fitted.Q_.detach().T
    assert not torch.allclose(product[0, 4], plain[0, 4])  # an adapted item scores with its adapted row
    assert fitted.score_adapted(adapted, cand.numpy(), torch.Generator().manual_seed(5)).shape == (4, n_items + 4)


def test_user_ids_absent_from_the_history_get_mean_plus_noise_rows_after_fit(planted):
    """Ids are dense over the data set: a held-out user inside the table must not keep its random initial row."""
    history = planted.interactions
    absent = np.array([2, 7])
    model = ResponsiveMF(SMALL, TaskConfig(k=3, K=6)).fit(history.take(~np.isin(history.users, absent)))
    assert model.n_users_ == history.n_users  # their ids are inside the table
    P = model.P_.detach()
    seen = np.setdiff1d(np.arange(model.n_users_), absent)
    mean = P[seen].mean(0)
    spread = (P[absent] - mean).norm(dim=1)
    assert (spread < 5 * SMALL.new_row_std * np.sqrt(SMALL.dim)).all()  # mean + small noise
    assert (P[seen] - mean).norm(dim=1).median() > 5 * SMALL.new_row_std * np.sqrt(SMALL.dim)  # trained rows differ


def test_serving_never_uses_the_row_of_a_user_it_has_not_seen(planted):
    """Whatever P holds for an unseen id inside the table (training code paths that skip the reset), serving
    starts new users, and users the index has no interaction of, from mean + noise, as for an id beyond P."""
    history = planted.interactions
    model = ResponsiveMF(SMALL, TaskConfig(k=3, K=6)).fit(history.take(history.users != 4))
    with torch.no_grad():
        model.P_[4] = 50.0  # an untrained row must not leak into scores
    beyond = model.n_users_ + 3
    shown = RecentItems(np.array([4, beyond]), np.array([[1, 2], [1, 2]]), np.array([[5, 6], [5, 6]]))
    rows = model.adapt(shown.users, shown.items, shown.ts, new_users=True).user_rows
    assert torch.allclose(rows[0], rows[1], atol=0.2) and rows.abs().max() < 5
    cands = np.tile(np.arange(10), (2, 1))
    new_scores = model.score_new_users(shown, cands)
    assert np.abs(new_scores[0] - new_scores[1]).max() < 0.2
    stream = model.score(np.array([4, beyond]), cands)  # no interaction of either in the index
    assert np.abs(stream[0] - stream[1]).max() < 0.2


def test_new_user_with_fewer_than_k_interactions_is_adapted(fitted):
    one = RecentItems(np.array([1000]), np.array([[4]]), np.array([[5]]))  # k = 3, only one item shown
    adapted = fitted.adapt(one.users, one.items, one.ts)
    assert 4 in adapted.item_ids[0].tolist()
    base = fitted.P_.detach().mean(0)
    assert (adapted.user_rows[0] - base).norm() > 10 * SMALL.new_row_std * np.sqrt(SMALL.dim)  # moved by the inner steps
    padded = fitted.adapt(np.array([1000]), np.array([[4, -1, -1]]), np.array([[5, 0, 0]]))
    assert torch.allclose(padded.user_rows, adapted.user_rows)


def test_recommend_skips_seen_items_and_ranks_by_score(fitted, planted):
    top = fitted.recommend(0, n=5)
    seen = planted.interactions.items[planted.interactions.users == 0]
    assert len(top) == 5 and not set(top) & set(seen.tolist())
    rec = fitted.recommend(10_000, n=3, recent=np.array([1, 2]))
    assert len(rec) == 3 and not {1, 2} & set(rec.tolist())


def test_observe_grows_tables_and_takes_meta_steps(planted):
    model = ResponsiveMF(SMALL, TaskConfig(k=3, K=6)).fit(planted.interactions)
    P0 = model.P_.detach().clone()
    user_mean, item_mean = _trained_means(model)
    t = int(planted.interactions.ts.max()) + 1
    new_user, new_item = model.n_users_ + 2, model.n_items_ + 1
    batch = Interactions.from_arrays([0, 1, new_user], [5, new_item, 3], [t, t + 1, t + 2])
    model.observe(batch)
    assert model.n_users_ == P0.shape[0] + 3 and model.n_items_ == planted.interactions.n_items + 2
    assert not torch.allclose(model.P_.detach()[: len(P0)], P0)  # Θ moved
    assert torch.isfinite(model.P_).all() and torch.isfinite(model.Q_).all()
    # the grown user has no past, so no task: its row is still the mean of the trained rows + noise
    assert (model.P_.detach()[new_user] - user_mean).norm() < NOISE_BOUND
    # the grown item started there too, then took one online Adam step (each coordinate moves at most ~outer_lr)
    steps = SMALL.outer_lr * np.sqrt(SMALL.dim) * 1.5
    assert (model.Q_.detach()[new_item] - item_mean).norm() < NOISE_BOUND + steps
    assert model._trained_masks()[1][new_item] and not model._trained_masks()[0][new_user]
    assert model.index_.has_pair(np.array([1]), np.array([new_item]))[0]
    model.score(np.array([model.n_users_ - 1]), np.array([[0, 1]]))  # the grown user is served


def test_online_tasks_use_the_users_own_items_unless_the_option_adds_neighbours(planted, monkeypatch):
    from metarec.models import responsive

    seen = []
    real = responsive.stream_tasks

    def recording(*args, **kwargs):
        tasks, kept = real(*args, **kwargs)
        seen.append(tasks)
        return tasks, kept

    monkeypatch.setattr(responsive, "stream_tasks", recording)
    t = int(planted.interactions.ts.max()) + 1
    batch = Interactions.from_arrays([0, 1, 2], [5, 6, 7], [t, t + 1, t + 2])
    model = ResponsiveMF(SMALL, TaskConfig(k=3, K=6)).fit(planted.interactions)
    for option, width in ((False, 3), (True, 6)):
        model.tasks = TaskConfig(k=3, K=6, online_neighbours=option)
        model.observe(batch)
        assert seen[-1].K == width and len(seen[-1]) == 3
    assert (seen[0].support_users == seen[0].query_user[:, None]).all()
    assert (seen[1].support_users[:, 3:] != seen[1].query_user[:, None]).any()


def _new_user_auc(model: ResponsiveMF, data, new_users: np.ndarray, n: int) -> float:
    """Mean AUC of each new user's (n+1)-th item against 100 items it never had, after seeing its first n."""
    it = data.interactions
    rng = np.random.default_rng(5)
    shown, shown_ts, candidates = [], [], []
    for u in new_users:  # test set-up only
        mask = it.users == u
        items, ts = it.items[mask], it.ts[mask]
        shown.append(items[:n])
        shown_ts.append(ts[:n])
        never = np.setdiff1d(np.arange(len(data.item_group)), items)
        candidates.append(np.concatenate([[items[n]], rng.choice(never, 100, replace=False)]))
    scores = model.score_new_users(RecentItems(new_users, np.array(shown), np.array(shown_ts)), np.array(candidates))
    return float(((scores[:, 1:] < scores[:, :1]).sum(1) / 100).mean())


def _cut_at_switch(data, test_users: np.ndarray) -> tuple[Interactions, np.ndarray]:
    """History without the test users' interactions from their taste switch on; each row's position in its user's timeline."""
    it = data.interactions
    order = np.lexsort((it.ts, it.users))
    first = np.searchsorted(it.users[order], np.arange(it.n_users))
    pos = np.empty(len(it), np.int64)
    pos[order] = np.arange(len(it)) - first[it.users[order]]
    keep = ~np.isin(it.users, test_users) | (pos < data.switch_at[it.users])
    return it.take(keep), pos


def _auc_after_switch(model: ResponsiveMF, data, pos: np.ndarray, test_users: np.ndarray, n: int) -> float:
    """Existing users adapted from their first n interactions after the switch, ranking the next one."""
    it = data.interactions
    rng = np.random.default_rng(5)
    shown, shown_ts, candidates = [], [], []
    for u in test_users:  # test set-up only
        mask = it.users == u
        order = np.argsort(pos[mask])
        items, ts, s = it.items[mask][order], it.ts[mask][order], data.switch_at[u]
        shown.append(items[s : s + n])
        shown_ts.append(ts[s : s + n])
        never = np.setdiff1d(np.arange(len(data.item_group)), items)
        candidates.append(np.concatenate([[items[s + n]], rng.choice(never, 100, replace=False)]))
    adapted = model.adapt(test_users, np.array(shown), np.array(shown_ts))
    scores = model.score_adapted(adapted, np.array(candidates), torch.Generator().manual_seed(0))
    return float(((scores[:, 1:] < scores[:, :1]).sum(1) / 100).mean())




def test_meta_learning_beats_lambda_zero_on_planted_taste_switches(one_thread):
    """Same MF, same adaptation; only lambda_ML differs. Margins measured (AUC, n = 1/5): new users
    +0.039/+0.015, after the switch +0.085/+0.049; asserted with room for platform noise."""
    data = planted_interactions(n_users=400, n_items=200, per_user=40, seed=0)
    test_users = np.arange(300, 400)
    without_test_users = data.interactions.take(~np.isin(data.interactions.users, test_users))
    cut_history, pos = _cut_at_switch(data, test_users)
    new_auc, switch_auc = {}, {}
    for lam in (5.0, 0.0):
        meta = MetaConfig(lambda_ml=lam, dim=16, epochs=6, batch_tasks=256, outer_lr=0.05, inner_lr=2.0, seed=0)
        model = ResponsiveMF(meta, TaskConfig(k=5, K=10)).fit(without_test_users)
        new_auc[lam] = [_new_user_auc(model, data, test_users, n) for n in (1, 5)]
        model = ResponsiveMF(meta, TaskConfig(k=5, K=10)).fit(cut_history)
        switch_auc[lam] = [_auc_after_switch(model, data, pos, test_users, n) for n in (1, 5)]
    for i, n in enumerate((1, 5)):
        assert new_auc[5.0][i] > new_auc[0.0][i] + 0.005, f"new users, n={n}: meta {new_auc[5.0][i]:.3f} vs lambda_ML=0 {new_auc[0.0][i]:.3f}"
        assert switch_auc[5.0][i] > switch_auc[0.0][i] + 0.02, f"after switch, n={n}: meta {switch_auc[5.0][i]:.3f} vs {switch_auc[0.0][i]:.3f}"
