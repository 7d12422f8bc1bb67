"""Pop (early): popularity over users' first tasks.early_max interactions, a default row, following the stream."""

from __future__ import annotations

import numpy as np

from metarec.config import Config, TaskConfig
from metarec.interface import Interactions, RecentItems
from metarec.models.registry import DEFAULT_MODELS, ROWS
from metarec.models.factory import make_model

N_USERS, PER_USER, N_ITEMS = 100, 20, 30
EARLY, LATE = 3, 4  # the item most users take first, the item most users take later


def planted_history() -> Interactions:
    """60% of users take item 3 second (early-popular); every user takes item 4 eleventh (position 10), so item 4 is
    the most popular overall and item 3 the most popular among positions < 5."""
    rng = np.random.default_rng(0)
    users, items = [], []
    for u in range(N_USERS):
        sequence = rng.permutation(np.arange(5, N_ITEMS))[:PER_USER]
        if rng.random() < 0.6:
            sequence[1] = EARLY
        sequence[10] = LATE
        users += [u] * PER_USER
        items += sequence.tolist()
    users = np.asarray(users)
    ts = np.concatenate([np.arange(np.sum(users == u)) for u in range(N_USERS)]) * 60
    return Interactions.from_arrays(users, np.asarray(items), ts)


def config(early_max: int = 5) -> Config:
    return Config(tasks=TaskConfig(early_max=early_max), tuned={})


def top_item(model, n_items: int = N_ITEMS) -> int:
    recent = RecentItems(np.array([N_USERS]), np.array([[5]]), np.array([[0]]))
    return int(np.argmax(model.score_new_users(recent, np.arange(n_items)[None, :])[0]))


def test_pop_early_is_a_default_row():
    assert "pop_early" in DEFAULT_MODELS and ROWS["pop_early"].label == "Pop (early)"


def test_pop_early_ranks_the_early_popular_item_first_and_pop_does_not():
    history = planted_history()
    counts = np.bincount(history.items, minlength=N_ITEMS)
    assert counts.argmax() == LATE and counts[LATE] > counts[EARLY]  # the planted premise
    pop, early = make_model("pop", config()).fit(history), make_model("pop_early", config()).fit(history)
    assert top_item(pop) == LATE
    assert top_item(early) == EARLY
    assert early.counts_[LATE] == 0 and early.counts_[EARLY] == counts[EARLY]  # item 4 sits at position 10 >= early_max


def test_early_max_bounds_which_positions_count():
    history = planted_history()
    wide = make_model("pop_early", config(early_max=PER_USER)).fit(history)
    assert np.array_equal(wide.counts_, np.bincount(history.items, minlength=N_ITEMS))  # every position is early
    narrow = make_model("pop_early", config(early_max=1)).fit(history)
    assert narrow.counts_.sum() == N_USERS and narrow.counts_[EARLY] == 0  # only each user's first item


def test_same_second_rows_count_in_their_row_order():
    """Two items in one second: which of them is 'first' is the prepared tie-break's order, the row order here."""
    rows = Interactions(np.array([0, 0]), np.array([7, 2]), np.array([5, 5]))
    model = make_model("pop_early", config(early_max=1)).fit(rows)
    assert model.counts_[7] == 1 and model.counts_[2] == 0


def test_the_stream_counts_only_what_is_still_early():
    history = planted_history()
    model = make_model("pop_early", config()).fit(history)
    before = model.counts_.copy()
    # user 0 is past early_max already: adds nothing; user 500 is new: its first 5 count, the 6th does not
    batch = Interactions(np.array([0, 0, 500, 500, 500, 500, 500, 500]), np.array([1, 2, 1, 2, 3, 4, 31, 32]),
                         np.arange(8) + 10_000)
    model.observe(batch)
    grown = model.counts_
    assert len(grown) == 33 and grown[31] == 1 and grown[32] == 0
    assert grown[1] - before[1] == 1 and grown[2] - before[2] == 1 and grown[3] - before[3] == 1 and grown[4] - before[4] == 1
    model.observe(Interactions(np.array([500]), np.array([5]), np.array([20_000])))
    assert model.counts_[5] == grown[5]  # user 500 has had 6 interactions now: no longer early


def test_pop_early_saves_and_loads_its_state():
    model = make_model("pop_early", config(early_max=4)).fit(planted_history())
    other = make_model("pop_early", config())
    other.load_state_arrays(model.state_arrays())
    assert other.early_max == 4 and np.array_equal(other.counts_, model.counts_) and np.array_equal(other.seen_, model.seen_)
