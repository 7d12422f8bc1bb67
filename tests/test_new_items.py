"""Item cold start (Table 2): the split is leak-free, every row is shown the same interactions, ours' item
adaptation learns a planted taste, and Table 2's files hold the expected rows. Small planted data only."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

import metarec.new_items as new_items
from metarec.config import BaselineConfig, Config, DataConfig, EvalConfig, MetaConfig, RuntimeConfig
from metarec.features import Features, FeatureTable
from metarec.metrics import case_metrics
from metarec.models.metaemb import MetaEmb
from metarec.models.mf_ft import MFFineTune
from metarec.models.pop import PopRecommender
from metarec.models.responsive import ResponsiveMF
from tasks.data.new_items import load_new_items, prepare_new_items
from tasks.data.prepare import prepare_data
from tasks.data.prepared import load_prepared
from tasks.evaluate.new_items import new_items_report
from tasks.train.models import load_model, save_model

N_USERS, N_ITEMS = 160, 60
NS = (1, 5, 10)


def write_planted(path: Path, seed: int = 0) -> None:
    """Two tastes: user u likes the items of its parity (rating 5) and dislikes a few of the other (rating 1)."""
    rng = np.random.default_rng(seed)
    lines = ["user_id,item_id,rating,timestamp"]
    for u in range(N_USERS):
        own = [i for i in range(N_ITEMS) if i % 2 == u % 2]
        other = [i for i in range(N_ITEMS) if i % 2 != u % 2]
        for i in rng.choice(own, size=20, replace=False):
            lines.append(f"{u},{i},5,{int(rng.integers(0, 10_000)) * 60}")
        for i in rng.choice(other, size=3, replace=False):
            lines.append(f"{u},{i},1,{int(rng.integers(0, 10_000)) * 60}")
    path.write_text("\n".join(lines) + "\n")


def small_config(csv: Path, root: Path) -> Config:
    return Config(data=DataConfig(dataset=str(csv), n_negatives=20, new_user_folds=1, new_item_fraction=0.2, history_fraction=0.95, stream_batches=2),
                  meta=MetaConfig(dim=8, epochs=8, batch_tasks=64, outer_lr=0.02),
                  baselines=BaselineConfig(epochs=10),
                  eval=EvalConfig(models=("responsive", "mf_ft", "pop"), bootstrap=50, new_items=True),
                  runtime=RuntimeConfig(artifacts_dir=root, max_workers=1), tuned={})


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("new_items")
    write_planted(root / "ratings.csv")
    config = small_config(root / "ratings.csv", root / "artifacts")
    prepared = load_prepared(prepare_data(config))
    return config, prepared, load_new_items(prepare_new_items(config))


def test_split_is_leak_free(planted):
    config, prepared, data = planted
    new = np.unique(data.rows.items)
    assert len(new) >= 3
    assert not np.isin(data.train.items, new).any(), "a new item's interaction reached training"
    # the history is split in two without loss: train + new items' rows
    history = sorted(zip(prepared.history.users.tolist(), prepared.history.items.tolist()))
    assert sorted(zip(data.train.users.tolist(), data.train.items.tolist())) == sorted(
        p for p in history if p[1] not in set(new.tolist()))
    assert len(data.train) + len(data.rows) == len(prepared.history)
    # every case is a new item's interaction beyond the largest n shown; its negatives are distinct non-positives
    positives = {(u, i) for part in (prepared.history, prepared.stream, prepared.new_users) for u, i in zip(part.users.tolist(), part.items.tolist())}
    assert np.isin(data.cases.items, new).all()
    at = {(u, i): p for u, i, p in zip(data.rows.users.tolist(), data.rows.items.tolist(), data.item_pos.tolist())}
    assert min(at[(u, i)] for u, i in zip(data.cases.users.tolist(), data.cases.items.tolist())) >= max(NS)
    for u, negs in zip(data.cases.users.tolist(), data.cases.negatives.tolist()):
        assert len(set(negs)) == len(negs) and not any((u, k) in positives for k in negs)


def test_item_positions_follow_time(planted):
    _, _, data = planted
    for item in np.unique(data.rows.items):
        mine = data.rows.items == item
        ts = data.rows.ts[mine][np.argsort(data.item_pos[mine])]
        assert (np.diff(ts) >= 0).all()
        assert sorted(data.item_pos[mine].tolist()) == list(range(mine.sum()))


def test_every_row_is_shown_the_same_first_n_interactions(planted, monkeypatch):
    config, _, data = planted
    seen: dict[str, dict[int, list]] = {}
    real = new_items.reveal_new_items

    def spy(model, shown):
        seen.setdefault(type(model).__name__, {})[len(seen.get(type(model).__name__, {}))] = sorted(zip(shown.users.tolist(), shown.items.tolist()))
        return real(model, shown)

    monkeypatch.setattr(new_items, "reveal_new_items", spy)
    models = [PopRecommender().fit(data.train), MFFineTune(BaselineConfig(epochs=1), MetaConfig(dim=4)).fit(data.train),
              ResponsiveMF(MetaConfig(dim=4, epochs=1, batch_tasks=256)).fit(data.train)]
    for model in models:
        new_items.evaluate_new_items(model, data.rows, data.item_pos, data.cases, NS)
    assert set(seen) == {"PopRecommender", "MFFineTune", "ResponsiveMF"}
    rows = {name: [calls[k] for k in sorted(calls)] for name, calls in seen.items()}
    assert rows["PopRecommender"] == rows["MFFineTune"] == rows["ResponsiveMF"]
    for n, shown in zip(NS, rows["PopRecommender"]):
        expected = sorted((u, i) for u, i, p in zip(data.rows.users.tolist(), data.rows.items.tolist(), data.item_pos.tolist()) if p < n)
        assert shown == expected  # each new item's first n, no more


def test_reveal_leaves_the_fitted_model_unchanged(planted):
    _, _, data = planted
    model = ResponsiveMF(MetaConfig(dim=4, epochs=1, batch_tasks=256)).fit(data.train)
    before = model.Q_.detach().clone()
    revealed = new_items.reveal_new_items(model, new_items.shown_rows(data.rows, data.item_pos, 5))
    assert torch_equal(model.Q_, before)
    assert not torch_equal(revealed.Q_, before)


def torch_equal(a, b) -> bool:
    return bool((a.detach() == b.detach()).all())


def test_ours_item_adaptation_ranks_the_planted_new_item_better(planted):
    """The new item's row adapted on its first n interactions (of users of its taste) ranks it above the negatives
    (half of the other taste) better than §7's new row (the mean of Θ's trained rows) does."""
    config, _, data = planted
    model = ResponsiveMF(config.meta, config.tasks).fit(data.train)
    unadapted = case_metrics(model.score(data.cases.users, data.cases.candidates))["auc"].mean()
    adapted = new_items.evaluate_new_items(model, data.rows, data.item_pos, data.cases, (5, 10))
    for n in (5, 10):
        assert adapted[n].metrics["auc"].mean() > unadapted + 0.1, (n, adapted[n].metrics["auc"].mean(), unadapted)


def test_table2_files_hold_every_row_at_every_n(planted, tmp_path):
    config, _, _ = planted
    files = new_items_report(config, [config], tmp_path)
    assert {"table2.md", "table2.csv", "table2_verdicts.csv", "forest_table2.png"} <= set(files)
    lines = files["table2.csv"].read_text().strip().splitlines()
    rows = {(line.split(",")[0], line.split(",")[1]) for line in lines[1:]}
    assert rows == {(str(n), m) for n in NS for m in ("responsive", "mf_ft", "pop")}
    markdown = files["table2.md"].read_text()
    assert "Table 2 — new items" in markdown and "20 stored negatives" in markdown
    assert all(f"| {n} | {label} |" in markdown for n in NS for label in ("Ours (paper)", "MF-FT", "Pop"))
    verdicts = files["table2_verdicts.csv"].read_text().strip().splitlines()[1:]
    assert {(v.split(",")[1], v.split(",")[2]) for v in verdicts} == {(o, f"n={n}") for o in ("mf_ft", "pop") for n in NS}
    assert files["forest_table2.png"].stat().st_size > 0


def parity_features(prepared) -> Features:
    """One item field: the planted taste (the parity of the raw item id), as MetaEmb's generator would read genres."""
    raw = pq.read_table(prepared.root / "items.parquet").to_pydict()
    taste = {dense: int(r) % 2 for dense, r in zip(raw["item_id"], raw["raw_item"])}
    items = np.arange(prepared.n_items)
    return Features(items=FeatureTable.from_long(items, np.array([taste[i] for i in items]), np.array([0, 0]), ("taste",), prepared.n_items))


def test_metaemb_generator_starts_a_new_item_where_its_features_point(planted):
    """MetaEmb's generated start (from the planted taste feature) ranks a new item shown once far better than MF-FT's
    mean start with the same fine-tuning: the row without the generator is its no-adaptation version."""
    config, prepared, data = planted
    scores = {}
    for cls in (MFFineTune, MetaEmb):
        model = cls(config.baselines, config.meta)
        model.set_features(parity_features(prepared))
        model.fit(data.train)
        scores[cls.name] = new_items.evaluate_new_items(model, data.rows, data.item_pos, data.cases, (1,))[1].metrics["auc"].mean()
    assert scores["metaemb"] > scores["mf_ft"] + 0.1, scores


def test_metaemb_save_load_round_trip_scores_alike(planted, tmp_path):
    config, prepared, data = planted
    model = MetaEmb(config.baselines, config.meta)
    model.set_features(parity_features(prepared))
    model.fit(data.train)
    path = save_model(model, "metaemb", config, tmp_path / "metaemb")
    loaded = load_model(path)
    shown = new_items.shown_rows(data.rows, data.item_pos, 5)
    expected = new_items.reveal_new_items(model, shown).score(data.cases.users, data.cases.candidates)
    assert np.array_equal(new_items.reveal_new_items(loaded, shown).score(data.cases.users, data.cases.candidates), expected)
    assert loaded.feature_report()["item_fields"] == ["taste"]
