"""The baselines on planted data: they rank, they update as their papers say, they are deterministic."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from metarec.models import rkmf as rkmf_module
from metarec.models import spmf as spmf_module
from metarec.models.common import PURPOSE_OBSERVE, gaussian, kernel_bpr_grads, negatives, rng_for, rounds, sampled_metrics, sgd_epoch, sgd_item_rounds
from metarec.models.spmf import descending_ranks, reservoir_insert, weighted_sample_without_replacement
from metarec.models.srec import SRec, kalman_round
from metarec.config import BaselineConfig, Config, MetaConfig, NeuralConfig, TaskConfig
from metarec.interface import Interactions, RecentItems
from metarec.models.factory import make_model
from metarec.synthetic import planted_interactions

NEURAL_MODELS = ("melu", "mamo", "prototype", "metahin", "sequence_meta")  # the meta-learning rows of issues 11 and 23 (more in test_zoo.py, test_meta_rows.py)
MODELS = ("rkmf", "srec", "spmf", "mf_ft", "pop", "pop_early", *NEURAL_MODELS)
FACTOR_MODELS = ("rkmf", "srec", "spmf", "mf_ft")
N_NEG = 50


def small_config(seed: int = 1, **baselines) -> Config:
    # sRec's single streaming pass needs a noise variance small against the prior's on so little data
    fields = dict(dim=16, epochs=10, seed=seed, spmf_reservoir=500, spmf_samples=200, srec_obs_var=0.3, srec_prior_var=0.3)
    return Config(
        baselines=BaselineConfig(**{**fields, **baselines}),
        meta=MetaConfig(dim=16),
        # small and quick: the conformance tests check the protocol, not the neural models' quality
        neural=NeuralConfig(dim=8, hidden=16, epochs=1, batch_tasks=128, seed=seed),
        tasks=TaskConfig(k=3, K=6, max_tasks_per_user=6),
        tuned={},
    )


class Split:
    """Planted data: 10% of users held out as new users, the rest cut by time into history and stream."""

    def __init__(self) -> None:
        data = planted_interactions(n_users=160, n_items=100, per_user=24, seed=3).interactions
        self.data = data
        is_new = np.arange(data.n_users) % 10 == 0
        old = data.take(~is_new[data.users])
        cut = np.quantile(old.ts, 0.8)
        self.history, self.stream = old.take(old.ts <= cut), old.take(old.ts > cut)
        self.new = data.take(is_new[data.users])
        rng = np.random.default_rng(0)
        positives = np.zeros((data.n_users, data.n_items), dtype=bool)
        positives[data.users, data.items] = True
        self.positives = positives
        self.rng = rng

    def candidates(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """The true item first, then N_NEG items the user never had (as the stored candidates are built)."""
        out = np.empty((len(users), 1 + N_NEG), dtype=np.int64)
        for row, (u, i) in enumerate(zip(users, items)):
            allowed = np.flatnonzero(~self.positives[u])
            out[row] = np.r_[i, self.rng.choice(allowed, N_NEG, replace=False)]
        return out

    def new_user_case(self, n: int) -> tuple[RecentItems, np.ndarray]:
        users = np.unique(self.new.users)
        items = np.stack([self.new.items[self.new.users == u] for u in users])
        ts = np.stack([self.new.ts[self.new.users == u] for u in users])
        return RecentItems(users, items[:, :n], ts[:, :n]), self.candidates(users, items[:, n])


@pytest.fixture(scope="module")
def split() -> Split:
    return Split()


@pytest.fixture(scope="module")
def fitted(split: Split) -> dict:
    torch.set_num_threads(1)
    return {name: make_model(name, small_config()).fit(split.history) for name in MODELS}


def state(model) -> dict[str, np.ndarray]:
    return model.state_arrays()


def fresh(name: str, split: Split, seed: int = 1):
    return make_model(name, small_config(seed)).fit(split.history)


# ------------------------------------------------------------------ ranking quality
@pytest.mark.parametrize("name", FACTOR_MODELS)
def test_beats_random_on_next_items_and_new_users(name: str, split: Split, fitted: dict) -> None:
    model = fitted[name]
    known = np.isin(split.stream.users, split.history.users)
    users, items = split.stream.users[known], split.stream.items[known]
    stream = sampled_metrics(model.score(users, split.candidates(users, items)))
    random_hr = 10 / (1 + N_NEG)
    assert stream["auc"] > 0.7, stream
    assert stream["hr@10"] > 2.5 * random_hr, stream
    recent, cands = split.new_user_case(5)
    new = sampled_metrics(model.score_new_users(recent, cands))
    assert new["hr@10"] > 2.5 * random_hr, new


def test_pop_beats_random_where_popularity_is_the_signal() -> None:
    """Planted genres carry little popularity signal, so Pop gets data whose items follow a Zipf law."""
    rng = np.random.default_rng(0)
    weights = 1.0 / np.arange(1, 101) ** 1.1
    users = np.repeat(np.arange(200), 20)
    items = np.concatenate([rng.choice(100, 20, replace=False, p=weights / weights.sum()) for _ in range(200)])
    data = Interactions.from_arrays(users, items, np.tile(np.arange(20), 200) + users * 0)
    history, test = data.take(data.ts < 15), data.take(data.ts >= 15)
    model = make_model("pop", small_config()).fit(history)
    positives = np.zeros((200, 100), dtype=bool)
    positives[users, items] = True
    cands = np.stack([np.r_[i, rng.choice(np.flatnonzero(~positives[u]), N_NEG, replace=False)] for u, i in zip(test.users, test.items)])
    metrics = sampled_metrics(model.score(test.users, cands))
    assert metrics["auc"] > 0.7 and metrics["hr@10"] > 2 * 10 / (1 + N_NEG), metrics
    model.observe(Interactions.from_arrays([0, 1], [99, 99], [30, 31]))
    assert model.counts_[99] == np.bincount(history.items, minlength=100)[99] + 2


# ------------------------------------------------------------------ protocol properties
@pytest.mark.parametrize("name", MODELS)
def test_score_new_users_leaves_model_unchanged_and_repeats(name: str, split: Split, fitted: dict) -> None:
    model = fitted[name]
    before = state(model)
    recent, cands = split.new_user_case(5)
    first = model.score_new_users(recent, cands)
    second = model.score_new_users(recent, cands)
    after = state(model)
    assert before.keys() == after.keys()
    for key in before:
        np.testing.assert_array_equal(before[key], after[key], err_msg=key)
    np.testing.assert_array_equal(first, second)
    assert first.shape == cands.shape and np.isfinite(first).all()


@pytest.mark.parametrize("name", MODELS)
def test_same_seed_same_scores_through_the_stream(name: str, split: Split) -> None:
    a, b = fresh(name, split), fresh(name, split)
    users = split.stream.users[:40]
    cands = split.candidates(users, split.stream.items[:40])
    np.testing.assert_array_equal(a.score(users, cands), b.score(users, cands))
    half = split.stream.take(slice(0, len(split.stream) // 2))
    a.observe(half)
    b.observe(half)
    np.testing.assert_array_equal(a.score(users, cands), b.score(users, cands))
    recent, new_cands = split.new_user_case(1)
    np.testing.assert_array_equal(a.score_new_users(recent, new_cands), b.score_new_users(recent, new_cands))


@pytest.mark.parametrize("name", (*FACTOR_MODELS, *NEURAL_MODELS))
def test_other_seed_other_scores(name: str, split: Split, fitted: dict) -> None:
    users = split.stream.users[:20]
    cands = split.candidates(users, split.stream.items[:20])
    assert not np.array_equal(fitted[name].score(users, cands), fresh(name, split, seed=2).score(users, cands))


@pytest.mark.parametrize("name", MODELS)
def test_unseen_ids_are_scored_and_grown_never_an_error(name: str, split: Split) -> None:
    model = fresh(name, split)
    n_users, n_items = split.data.n_users, split.data.n_items
    batch = Interactions.from_arrays([n_users + 5, n_users + 5, 0], [n_items + 3, 1, n_items + 7], [10**9, 10**9 + 1, 10**9 + 2])
    far = np.array([n_users + 50, 2], dtype=np.int64)
    cands = np.array([[n_items + 90, 0, 1], [n_items + 3, 2, 3]], dtype=np.int64)
    assert np.isfinite(model.score(far, cands)).all()
    model.observe(batch)
    assert model.n_items_ >= n_items + 8
    assert np.isfinite(model.score(np.array([n_users + 5, n_users + 60]), cands)).all()
    recent = RecentItems(np.array([n_users + 70]), np.array([[n_items + 3, n_items + 99]]), np.array([[1, 2]]))
    assert np.isfinite(model.score_new_users(recent, cands[:1])).all()


@pytest.mark.parametrize("name", (*FACTOR_MODELS, *NEURAL_MODELS))
def test_state_round_trip_gives_the_same_model(name: str, split: Split) -> None:
    model = fresh(name, split)
    clone = make_model(name, small_config())
    clone.load_state_arrays(model.state_arrays())
    users = split.stream.users[:30]
    cands = split.candidates(users, split.stream.items[:30])
    np.testing.assert_array_equal(model.score(users, cands), clone.score(users, cands))
    batch = split.stream.take(slice(0, 60))
    model.observe(batch)
    clone.observe(batch)
    np.testing.assert_array_equal(model.score(users, cands), clone.score(users, cands))


# ------------------------------------------------------------------ what each observe changes
def test_rkmf_observe_retrains_only_the_batch_users_and_items(split: Split) -> None:
    model = fresh("rkmf", split)
    W, H = model.W_.clone(), model.H_.clone()
    batch = split.stream.take(slice(0, 50))
    model.observe(batch)
    touched_u = np.zeros(len(W), dtype=bool)
    touched_u[batch.users[batch.users < len(W)]] = True
    touched_i = np.zeros(len(H), dtype=bool)
    touched_i[batch.items[batch.items < len(H)]] = True
    assert torch.equal(model.W_[: len(W)][~touched_u], W[~touched_u])
    assert torch.equal(model.H_[: len(H)][~touched_i], H[~touched_i])
    assert not torch.isclose(model.W_[: len(W)][touched_u], W[touched_u]).all(dim=1).any()
    assert not torch.isclose(model.H_[: len(H)][touched_i], H[touched_i]).all(dim=1).any()


def test_mf_ft_observe_changes_only_rows_in_the_batch_triples(split: Split) -> None:
    model = fresh("mf_ft", split)
    W = model.W_.clone()
    batch = split.stream.take(slice(0, 50))
    model.observe(batch)
    untouched = np.setdiff1d(np.arange(len(W)), batch.users)
    assert torch.equal(model.W_[untouched], W[untouched])
    assert not torch.equal(model.W_[np.unique(batch.users)], W[np.unique(batch.users)])


def test_spmf_reservoir_keeps_its_size_and_is_seeded(split: Split) -> None:
    a, b, c = fresh("spmf", split), fresh("spmf", split), fresh("spmf", split, seed=2)
    size = small_config().baselines.spmf_reservoir
    assert len(a.res_users_) == size == len(a.res_items_)
    assert a.res_seen_ == len(split.history)
    for model in (a, b, c):
        model.observe(split.stream.take(slice(0, 80)))
        model.observe(split.stream.take(slice(80, 200)))
    assert len(a.res_users_) == size and a.res_seen_ == len(split.history) + 200
    np.testing.assert_array_equal(a.res_users_, b.res_users_)
    np.testing.assert_array_equal(a.res_items_, b.res_items_)
    assert not (np.array_equal(a.res_users_, c.res_users_) and np.array_equal(a.res_items_, c.res_items_))
    # every reservoir entry is an interaction that was seen
    seen = set(zip(a.seen_.users.tolist(), a.seen_.items.tolist()))
    assert all(pair in seen for pair in zip(a.res_users_.tolist(), a.res_items_.tolist()))


def test_reservoir_insert_equals_algorithm_r_one_by_one() -> None:
    size, seen = 7, 0
    stream = np.arange(40, dtype=np.int64)
    empty = np.zeros(0, dtype=np.int64)
    res, _, total = reservoir_insert(empty, empty, seen, stream[:25], stream[:25], size, np.random.default_rng(5))
    res, _, total = reservoir_insert(res, res, total, stream[25:], stream[25:], size, np.random.default_rng(6))
    # the reference: Vitter's Algorithm R item by item, with the same uniforms
    ref = []
    for block, rng in ((stream[:25], np.random.default_rng(5)), (stream[25:], np.random.default_rng(6))):
        u = rng.random(max(0, len(block) - max(size - len(ref), 0)))
        k = 0
        for x in block:
            t = len(ref) if len(ref) < size else None
            if t is not None:
                ref.append(int(x))
                continue
            slot = int(np.floor(u[k] * (int(x) + 1)))
            k += 1
            if slot < size:
                ref[slot] = int(x)
    assert total == 40
    assert res.tolist() == ref


def test_reservoir_is_a_uniform_sample() -> None:
    hits = np.zeros(200)
    empty = np.zeros(0, dtype=np.int64)
    stream = np.arange(200, dtype=np.int64)
    for seed in range(300):
        res, _, _ = reservoir_insert(empty, empty, 0, stream, stream, 20, np.random.default_rng(seed))
        hits[res] += 1
    # each item is kept with probability 20/200 = 0.1: 30 expected of 300 runs, early and late alike
    assert abs(hits[:100].mean() - 30) < 3 and abs(hits[100:].mean() - 30) < 3


def test_spmf_variant_samples_favour_poorly_ranked_interactions(split: Split) -> None:
    model = fresh("spmf", split)
    ranks = model.reservoir_ranks()
    model.config = model.config.model_copy(update={"spmf_samples": 4000, "spmf_temperature": 0.1})
    users, items = model.sample_reservoir(np.random.default_rng(0))
    key = lambda u, i: u * 10_000 + i  # noqa: E731
    order = {k: r for k, r in zip(key(model.res_users_, model.res_items_).tolist(), ranks.tolist())}
    drawn = np.array([order[k] for k in key(users, items).tolist()])
    assert drawn.mean() > ranks.mean() + 0.05


@pytest.mark.parametrize("name", FACTOR_MODELS)
def test_a_user_with_nothing_seen_is_scored_with_the_default_row(name: str, split: Split, fitted: dict) -> None:
    """Ids are dense, so new users have rows inside W_ that no update touched: they must not be scored with them."""
    model = fitted[name]
    unseen = np.unique(split.new.users)[:2]
    assert (unseen < len(model.W_)).all() and not model.index_.has_user(unseen).any()
    candidates = np.tile(np.arange(model.n_items_), (2, 1))
    scores = model.score(unseen, candidates)
    default = model.score_rows(model._default_user()[None], candidates[:1])[0]
    np.testing.assert_allclose(scores, np.stack([default, default]), rtol=1e-6, atol=1e-6)  # scores near 0: float rounding of two product paths


@pytest.mark.parametrize("name", FACTOR_MODELS)
def test_an_item_with_no_positive_is_new_for_every_model(name: str, split: Split) -> None:
    """docs/method.md §11, for every model alike: ids are dense, so an item with no positive in the history has a row inside
    H_ (its random start, pushed down as a negative). It is scored with the mean of the trained item rows (as an id
    beyond H_ is), its row is reset to that mean + noise, and its first positive starts it from there."""
    held = np.array([7, 23, 41])
    history = split.history.take(~np.isin(split.history.items, held))
    model = make_model(name, small_config()).fit(history)
    assert (held < len(model.H_)).all() and not model.index_.has_item(held).any()
    trained = model.H_[torch.from_numpy(model.index_.has_item(np.arange(len(model.H_))))]
    assert torch.allclose(model._default_item(), trained.mean(0), atol=1e-6)
    users = np.unique(history.users)[:5]
    scores = model.score(users, np.tile(np.r_[held, len(model.H_) + 2], (5, 1)))
    np.testing.assert_allclose(scores[:, :3], np.repeat(scores[:, 3:], 3, axis=1), rtol=1e-6)  # all the default row
    bound = 4 * 0.01 * np.sqrt(model.dim)  # a random N(0, 0.1²I) row lies far outside it
    assert (model.H_[torch.from_numpy(held)] - trained.mean(0)).norm(dim=1).max() < bound
    with torch.no_grad():
        model.H_[7] = 50.0  # as if pushed far away as a negative: its first positive must not start from there
    t = int(history.ts.max()) + 1
    model.observe(Interactions.from_arrays(users[:2], [7, 7], [t, t + 1]))
    assert (model.H_[7] - trained.mean(0)).norm() < 2.0


# ------------------------------------------------------------------ sRec
def test_srec_new_rows_come_from_the_population_prior(split: Split) -> None:
    model = fresh("srec", split)
    trained = model.W_[torch.from_numpy(model.index_.has_user(np.arange(len(model.W_))))]
    mean, spread = trained.mean(0), trained.var(0)
    assert len(model.unseen_users()) > 0
    for unseen in model.unseen_users().tolist():  # users absent from the history enter with the prior too
        assert torch.allclose(model.W_[unseen], mean) and torch.allclose(model.var_W_[unseen], spread)
    rows = len(model.W_)
    model._grow_from_prior(rows + 3, len(model.H_))
    assert torch.allclose(model.W_[rows:], mean.expand(3, -1))
    assert torch.allclose(model.var_W_[rows:], spread.expand(3, -1))
    assert (model.tau_W_[rows:] == -1).all()


def test_srec_variance_grows_with_elapsed_time() -> None:
    def after(elapsed: int) -> torch.Tensor:
        mean, var = torch.zeros(1, 2), torch.full((1, 2), 0.1)
        tau = torch.tensor([100])
        kalman_round(mean, var, tau, torch.tensor([0]), torch.tensor([[1.0, 0.5]]), torch.tensor([1.0]), torch.tensor([100 + elapsed]), 1.0, 1e-3)
        return var[0], mean[0]

    var_soon, mean_soon = after(1)
    var_late, mean_late = after(1000)
    assert (var_late > var_soon).all()
    # more prior uncertainty, a larger step toward the observation
    assert (mean_late > mean_soon).all() and (mean_soon > 0).all()


def test_srec_update_matches_the_exact_kalman_step_in_one_dimension() -> None:
    mean, var, tau = torch.tensor([[0.2]]), torch.tensor([[0.5]]), torch.tensor([-1])
    x, y, noise = 0.8, 1.0, 0.3
    kalman_round(mean, var, tau, torch.tensor([0]), torch.tensor([[x]]), torch.tensor([y]), torch.tensor([7]), noise, 0.0)
    post_var = 1.0 / (1.0 / 0.5 + x * x / noise)
    post_mean = post_var * (0.2 / 0.5 + x * y / noise)
    assert mean.item() == pytest.approx(post_mean, rel=1e-5)
    assert var.item() == pytest.approx(post_var, rel=1e-5)
    assert tau.item() == 7


def test_srec_unseen_user_scores_as_the_prior_mean(split: Split, fitted: dict) -> None:
    model: SRec = fitted["srec"]
    cands = np.array([[0, 1, 2, 3]])
    expected = (model.H_[torch.tensor(cands[0])] @ model.W_.mean(0)).numpy()
    np.testing.assert_allclose(model.score(np.array([10_000]), cands)[0], expected, rtol=1e-5)


# ------------------------------------------------------------------ helpers
def test_rounds_hold_each_row_once_and_cover_everything() -> None:
    rows = np.array([3, 1, 3, 3, 2, 1, 0])
    parts = rounds(rows, np.random.default_rng(0))
    assert sorted(np.concatenate(parts).tolist()) == list(range(len(rows)))
    assert all(len(set(rows[p].tolist())) == len(p) for p in parts)
    ordered = rounds(rows, None)
    assert [p.tolist() for p in ordered][0] == [6, 1, 4, 0]  # first occurrences, by row
    assert ordered[1].tolist() == [5, 2] and ordered[2].tolist() == [3]


def test_sampled_metrics_by_hand() -> None:
    scores = np.array([[5.0, 1.0, 2.0, 6.0], [0.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0]])
    m = sampled_metrics(scores)
    assert m["hr@10"] == 1.0
    assert m["ndcg@10"] == pytest.approx((1 / np.log2(3) + 1 / np.log2(5) + 1 / np.log2(3)) / 3)
    assert m["auc"] == pytest.approx((2 / 3 + 0 + 2.5 / 3) / 3)


@pytest.mark.parametrize("name", MODELS)
def test_save_and_load_without_pickle(name: str, split: Split, fitted: dict, tmp_path) -> None:
    from tasks.train.models import load_model, save_model

    model = fitted[name]
    out = save_model(model, name, small_config(), tmp_path / name)
    loaded = load_model(out)
    users = split.stream.users[:25]
    cands = split.candidates(users, split.stream.items[:25])
    np.testing.assert_array_equal(model.score(users, cands), loaded.score(users, cands))
    with np.load(out / "state.npz", allow_pickle=False) as npz:
        assert set(npz.files) == set(model.state_arrays())


@pytest.mark.parametrize("name", ("rkmf", "srec"))
def test_full_ranking_scores_equal_candidate_scores(name: str, split: Split, fitted: dict) -> None:
    """The matmul path (many candidates) and the gather path (few) agree, unseen ids included."""
    model = fitted[name]
    users = np.array([1, 2, 10_000])
    everything = np.tile(np.arange(model.n_items_ + 2), (3, 1))  # two ids beyond the table
    full = model.score(users, everything)
    few = model.score(users, everything[:, [0, 5, model.n_items_ + 1]])
    np.testing.assert_allclose(full[:, [0, 5, model.n_items_ + 1]], few, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", MODELS)
def test_empty_inputs_work_and_bad_ids_are_refused(name: str, fitted: dict) -> None:
    model = fitted[name]
    none = np.zeros(0, dtype=np.int64)
    assert model.score(none, np.zeros((0, 5), dtype=np.int64)).shape == (0, 5)
    empty_recent = RecentItems(none, np.zeros((0, 3), dtype=np.int64), np.zeros((0, 3), dtype=np.int64))
    assert model.score_new_users(empty_recent, np.zeros((0, 5), dtype=np.int64)).shape == (0, 5)
    padded = RecentItems(np.array([9_999]), np.array([[1, -1, -1]]), np.array([[5, -1, -1]]))
    assert np.isfinite(model.score_new_users(padded, np.array([[1, 2, 3]]))).all()
    with pytest.raises(ValueError, match="candidates"):
        model.score(np.array([1]), np.array([[2, -3]]))


def test_mf_ft_new_rows_are_the_mean_plus_small_noise(split: Split) -> None:
    model = fresh("mf_ft", split)
    rows = model._population_plus_noise(np.random.default_rng(0))(500)
    trained = model.trained_user_rows().mean(0)
    assert torch.allclose(rows.mean(0), trained, atol=4 * model.meta.new_row_std / np.sqrt(500) + 1e-6)
    assert rows.std(0).mean().item() == pytest.approx(model.meta.new_row_std, rel=0.15)


def test_new_users_learn_from_their_first_interactions(split: Split, fitted: dict) -> None:
    """Showing a new user items of one genre moves its scores toward that genre (every factor model)."""
    data = planted_interactions(n_users=160, n_items=100, per_user=24, seed=3)
    genre = data.item_group
    shown = np.flatnonzero(genre == 0)[:5]
    recent = RecentItems(np.array([9_999]), shown[None, :], np.arange(5)[None, :] + 10**6)
    cands = np.r_[np.flatnonzero(genre == 0)[5:25], np.flatnonzero(genre == 1)[:20]][None, :]
    for name in FACTOR_MODELS:
        scores = fitted[name].score_new_users(recent, cands)[0]
        assert scores[:20].mean() > scores[20:].mean(), name


# ------------------------------------------------------------------ faithful defaults (issue 9) and the variants they replace
def test_spmf_exact_draws_are_without_replacement_and_follow_the_weights() -> None:
    """Known answer: sequential weighted draws without replacement, P(a then b) = w_a / W · w_b / (W − w_a)."""
    scores = np.array([0.9, -0.3, 0.5, 0.1])
    ranks = descending_ranks(scores)
    assert ranks.tolist() == [0, 3, 1, 2]  # rank 0 = best scored, as the source sorts
    log_w = ranks / len(scores)  # weight exp(rank / |R ∪ W|)
    w = np.exp(log_w)
    runs = 20_000
    counts = np.zeros((4, 4))
    for seed in range(runs):
        first, second = weighted_sample_without_replacement(log_w, 2, np.random.default_rng(seed))
        counts[first, second] += 1
    expected = runs * (w[:, None] / w.sum()) * (w[None, :] / (w.sum() - w[:, None]))
    np.fill_diagonal(expected, 0.0)
    assert np.trace(counts) == 0  # never the same position twice
    se = np.sqrt(expected * (1 - expected / runs))
    assert (np.abs(counts - expected) <= 5 * se).all(), (counts, expected.round())
    # the uniform answer (runs / 12 per ordered pair) is far outside those bounds for the worst-scored pair
    assert counts[1, 3] > runs / 12 + 10 * se[1, 3]
    everything = weighted_sample_without_replacement(log_w, 9, np.random.default_rng(0))
    assert sorted(everything.tolist()) == [0, 1, 2, 3]


def test_spmf_exact_trains_on_batch_size_draws_from_reservoir_and_batch(split: Split) -> None:
    model = fresh("spmf", split)
    assert model.config.spmf_strategy == "exact"
    batch = split.stream.take((split.stream.users < model.n_users_) & (split.stream.items < model.n_items_)).take(slice(0, 60))
    pool_u, pool_i = np.r_[model.res_users_, batch.users], np.r_[model.res_items_, batch.items]
    pool_rank = descending_ranks((model.W_[pool_u] * model.H_[pool_i]).sum(1).numpy()) / len(pool_u)
    rank_of = {}
    for key, rank in zip((pool_u * 10_000 + pool_i).tolist(), pool_rank.tolist()):
        rank_of.setdefault(key, []).append(rank)
    drawn_ranks = []
    for seed in range(40):
        users, items = model.exact_sample(batch, np.random.default_rng(seed))
        assert len(users) == len(batch)
        keys = (users * 10_000 + items).tolist()
        for key in set(keys):  # a sub-multiset of R ∪ W: no position drawn twice
            assert keys.count(key) <= len(rank_of[key])
        drawn_ranks += [np.mean(rank_of[k]) for k in keys]
    # weights exp(r) on normalised ranks r ~ U[0, 1]: a draw's mean rank is about 1 / (e − 1) = 0.582, uniform gives 0.5
    assert abs(np.mean(drawn_ranks) - 1 / (np.e - 1)) < 0.02


def test_spmf_batch_plus_reservoir_reproduces_the_earlier_update(split: Split) -> None:
    """The variant is the earlier default: all of W plus reservoir draws with replacement, same random stream."""
    variant = make_model("spmf", small_config(spmf_strategy="batch_plus_reservoir")).fit(split.history)
    reference = make_model("spmf", small_config(spmf_strategy="batch_plus_reservoir")).fit(split.history)
    batch = split.stream.take(slice(0, 80))
    variant.observe(batch)
    # the earlier observe, step by step
    cfg, ref = reference.config, reference
    rng = rng_for(ref.seed, PURPOSE_OBSERVE, ref.batches_)
    fill = lambda k: gaussian(rng, k, ref.dim, cfg.init_std)  # noqa: E731
    ref._grow(max(len(ref.W_), batch.n_users), max(len(ref.H_), batch.n_items), fill, fill)
    old_u, old_i = ref.sample_reservoir(rng)
    ref._remember(batch)
    users, items = np.concatenate([batch.users, old_u]), np.concatenate([batch.items, old_i])
    for _ in range(cfg.spmf_update_epochs):
        neg = negatives(ref.index_, users, rng, len(ref.H_))
        sgd_epoch(ref.W_, ref.H_, users, items, neg, ref.grad_fn, cfg.lr, cfg.batch_size, rng)
    ref.res_users_, ref.res_items_, ref.res_seen_ = reservoir_insert(ref.res_users_, ref.res_items_, ref.res_seen_, batch.users, batch.items, cfg.spmf_reservoir, rng)
    for key, value in ref.state_arrays().items():
        if key != "batches_":
            np.testing.assert_array_equal(variant.state_arrays()[key], value, err_msg=key)


def test_rkmf_item_step_moves_an_item_down_for_a_user_without_it() -> None:
    rng = np.random.default_rng(0)
    W, H = torch.randn(3, 4, generator=torch.Generator().manual_seed(0)), torch.randn(5, 4, generator=torch.Generator().manual_seed(1))
    grad_fn, before = kernel_bpr_grads("logistic", 4.0, 0.0), H.clone()
    # user 0 lacks item 2: the triple (0, k=1, j=2) retrains item 2 as the sampled negative
    sgd_item_rounds(W, H, np.array([0]), np.array([1]), np.array([2]), np.array([2]), grad_fn, 0.5, rng)
    assert (W[0] @ H[2]).item() < (W[0] @ before[2]).item()
    # user 1 has item 3: the triple (1, 3, j=4) retrains item 3 as the positive
    sgd_item_rounds(W, H, np.array([1]), np.array([3]), np.array([4]), np.array([3]), grad_fn, 0.5, rng)
    assert (W[1] @ H[3]).item() > (W[1] @ before[3]).item()
    assert torch.equal(H[[0, 1, 4]], before[[0, 1, 4]])  # only the retrained rows move


@pytest.mark.parametrize("option", ("two_sided", "mymedialite"))
def test_rkmf_item_update_puts_the_item_on_the_side_the_user_is(option: str, split: Split, monkeypatch) -> None:
    """Two-sided ItemUpdate: a user who has i trains it as the positive, any other user as the sampled negative."""
    model = make_model("rkmf", small_config(rkmf_item_update=option)).fit(split.history)
    items = np.unique(split.stream.items[:40])
    items = items[items < model.n_items_]
    triples = []
    monkeypatch.setattr(rkmf_module, "sgd_item_rounds", lambda W, H, u, i, j, item, *rest: triples.append((u, i, j, item)))
    model.item_update(items, np.random.default_rng(0))
    assert len(triples) == model.config.rkmf_update_epochs
    u, i, j, item = (np.concatenate(parts) for parts in zip(*triples))
    has = model.index_.has_pair(u, item)
    assert (i[has] == item[has]).all() and not model.index_.has_pair(u[has], j[has]).any()
    assert (j[~has] == item[~has]).all() and model.index_.has_pair(u[~has], i[~has]).all()
    assert has.any() and (~has).any()
    if option == "mymedialite":  # ⌊positives / items⌋ uniform users per item and epoch
        assert len(item) == len(items) * (len(model.index_.pair_key_) // model.n_items_) * model.config.rkmf_update_epochs
        return
    # each epoch: every user of i once as the positive, and i the negative as often as a fit epoch makes it one
    owner_item, owner_user = rkmf_module.item_positives(model.index_, items)
    for eu, ei, ej, eitem in triples:
        positive = ei == eitem
        assert sorted(zip(eu[positive].tolist(), ei[positive].tolist())) == sorted(zip(owner_user.tolist(), owner_item.tolist()))
    counts = model.index_.positive_counts(np.arange(model.n_users_))
    weight = counts / (model.n_items_ - counts)
    expected = sum(weight.sum() - weight[owner_user[owner_item == x]].sum() for x in items) * model.config.rkmf_update_epochs
    assert abs((~has).sum() - expected) < 5 * np.sqrt(expected)  # a Poisson count


def test_rkmf_negative_users_are_drawn_by_weight_among_those_without_the_item() -> None:
    from metarec.neighbours import InteractionIndex

    index = InteractionIndex.build(Interactions.from_arrays([0, 1, 2, 2], [0, 1, 2, 5], [1, 2, 3, 4]))
    drawn = rkmf_module.draw_users_without(index, np.array([1.0, 2.0, 3.0]), np.full(30_000, 5), np.random.default_rng(0))
    share = np.bincount(drawn, minlength=3) / len(drawn)  # user 2 has item 5: the others in proportion 1 : 2
    np.testing.assert_allclose(share, [1 / 3, 2 / 3, 0.0], atol=0.015)


def test_rkmf_positives_only_reproduces_the_earlier_item_update(split: Split) -> None:
    variant = make_model("rkmf", small_config(rkmf_item_update="positives_only")).fit(split.history)
    reference = make_model("rkmf", small_config(rkmf_item_update="positives_only")).fit(split.history)
    items, rng_a, rng_b = np.unique(split.stream.items[:40]), np.random.default_rng(3), np.random.default_rng(3)
    variant.item_update(items, rng_a)
    # the earlier ItemUpdate: fresh h_i, then h_i as the positive of each of its users, a uniform negative each
    cfg = reference.config
    reference.H_[torch.from_numpy(items)] = gaussian(rng_b, len(items), reference.dim, cfg.init_std)
    item, users = rkmf_module.item_positives(reference.index_, items)
    for _ in range(cfg.rkmf_update_epochs):
        neg = negatives(reference.index_, users, rng_b, len(reference.H_))
        rkmf_module.sgd_rounds(reference.W_, reference.H_, users, item, neg, reference.grad_fn, cfg.lr, rng_b, side="pos")
    assert torch.equal(variant.H_, reference.H_) and torch.equal(variant.W_, reference.W_)


def test_srec_update_uses_the_other_sides_variance() -> None:
    """Against the full-matrix mean-field step: Σ⁻¹ = P⁻¹ + (m_h m_hᵀ + Σ_h)/σ², m = Σ (P⁻¹ m_u + m_h y / σ²)."""
    P, m, x = np.array([0.5, 0.2, 0.8]), np.array([0.1, -0.2, 0.3]), np.array([0.7, 0.4, -0.5])
    x_var, y, noise = np.array([0.3, 0.6, 0.2]), 1.0, 0.4
    precision = np.diag(1 / P) + (np.outer(x, x) + np.diag(x_var)) / noise
    cov = np.linalg.inv(precision)
    expected_mean = cov @ (m / P + x * y / noise)

    def step(variance):
        mean, var, tau = torch.from_numpy(m[None].copy()), torch.from_numpy(P[None].copy()), torch.tensor([-1])
        kalman_round(mean, var, tau, torch.tensor([0]), torch.from_numpy(x[None]), torch.tensor([y], dtype=torch.float64), torch.tensor([5]), noise, 0.0, variance)
        return mean[0].numpy(), var[0].numpy()

    mean, var = step(torch.from_numpy(x_var[None]))
    np.testing.assert_allclose(mean, expected_mean, rtol=1e-10)
    np.testing.assert_allclose(var, np.diag(cov), rtol=1e-10)
    means_only, _ = step(None)  # ignoring Σ_h misses the answer by far more than rounding
    assert np.abs(means_only - expected_mean).max() > 0.05
    zero_var, _ = step(torch.zeros(1, 3, dtype=torch.float64))  # with Σ_h = 0 the two updates agree
    np.testing.assert_allclose(zero_var, means_only, rtol=1e-10)


@pytest.mark.parametrize("option", ("mean_field", "means_only"))
def test_srec_item_variance_reaches_the_user_update_only_in_mean_field(option: str, split: Split) -> None:
    a, b = (make_model("srec", small_config(srec_update=option)).fit(split.history) for _ in range(2))
    b.var_H_ = b.var_H_ * 10
    batch = split.stream.take(slice(0, 60))
    a.observe(batch)
    b.observe(batch)
    users = torch.from_numpy(np.unique(batch.users))
    same = torch.equal(a.W_[users], b.W_[users])
    assert same == (option == "means_only")


def test_srec_passes_and_update_options(split: Split, monkeypatch) -> None:
    """One pass by default; srec_passes repeats it; means_only never hands the update a variance."""
    seen: list = []
    original = SRec.filter
    monkeypatch.setattr(SRec, "filter", lambda self, *args: (seen.append(len(args[0])), original(self, *args))[1])
    calls = []
    monkeypatch.setattr("metarec.models.srec.kalman_round", lambda *args: calls.append(args[-1] is None) or kalman_round(*args))
    make_model("srec", small_config()).fit(split.history)
    one_pass, seen[:] = len(seen), []
    assert sum(calls) == 0 and calls  # mean_field: every step gets the other side's variance
    calls[:] = []
    make_model("srec", small_config(srec_passes=3, srec_update="means_only")).fit(split.history)
    assert len(seen) == 3 * one_pass and all(calls)


def test_variants_are_named_for_table_1() -> None:
    from metarec.models.factory import row_variant

    default = small_config()
    assert all(row_variant(name, default) is None for name in MODELS)
    earlier = small_config(spmf_strategy="batch_plus_reservoir", rkmf_item_update="positives_only", srec_update="means_only", srec_passes=3)
    assert row_variant("spmf", earlier) == "batch + reservoir draws"
    assert row_variant("rkmf", earlier) == "positives-only item update"
    assert row_variant("srec", earlier) == "means-only update, 3 passes"
    assert row_variant("srec", small_config(srec_passes=2)) == "2 passes"


@pytest.mark.parametrize("name", ("srec", "mf_ft"))
def test_new_users_reuse_the_population_until_the_user_table_changes(name: str, split: Split, monkeypatch) -> None:
    """The trained user rows' mean (and variance) is gathered once across chunks of new users, and again after an
    observe or an in-place change of W_: the scores equal those of a model that gathers it on every call."""
    model, uncached = fresh(name, split), fresh(name, split)
    gathers = []
    original = type(model).trained_user_rows
    monkeypatch.setattr(type(model), "trained_user_rows", lambda self: gathers.append(self) or original(self))
    recent, cands = split.new_user_case(5)

    def both() -> int:
        """Scores both ways; how many times the model gathered its trained user rows."""
        uncached.__dict__.pop("_user_population", None)  # forget: gather afresh
        before = sum(g is model for g in gathers)
        np.testing.assert_array_equal(model.score_new_users(recent, cands), uncached.score_new_users(recent, cands))
        return sum(g is model for g in gathers) - before

    assert [both() for _ in range(3)] == [1, 0, 0]
    for m in (model, uncached):
        m.observe(split.stream.take(slice(0, 40)))  # W_ grows (replaced) or steps in place, and the index is extended
    assert [both(), both()] == [1, 0]
    with torch.no_grad():
        for m in (model, uncached):
            m.W_[split.history.users[:5]] += 1.0  # in place: the same tensor, a new version
    assert [both(), both()] == [1, 0]
