"""Table 2's item rows (issue 23, deliverables 4-6): MWUF, RKMF's and SPMF's item updates, ours' item-side α and L.

The planted data of tests/test_new_items.py (two tastes by item parity). Each claim fails on the code before: no
MWUF row, RKMF took new items through observe (UserUpdate moved W), ours had no item-side rule.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import metarec.models.mwuf as mwuf_module
import metarec.new_items as new_items
from metarec.config import BaselineConfig, Config, MetaConfig, hashed_dump
from metarec.features import Features
from metarec.metrics import case_metrics
from metarec.models.metaemb import MetaEmb
from metarec.models.mf_ft import MFFineTune
from metarec.models.mwuf import MWUF
from metarec.models.registry import DEFAULT_MODELS, ROWS
from metarec.models.responsive import ResponsiveMF
from metarec.models.rkmf import RKMF
from metarec.models.spmf import SPMF
from tasks.train.models import load_model, save_model
from test_new_items import parity_features, planted  # noqa: F401 (planted: the shared new-item split)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny tensors, one torch thread


@pytest.fixture(scope="module")
def fitted_mwuf(planted):
    config, prepared, data = planted
    model = MWUF(config.baselines, config.meta)
    model.set_features(parity_features(prepared))
    return model.fit(data.train)


def auc_at(model, data, ns) -> dict[int, float]:
    results = new_items.evaluate_new_items(model, data.rows, data.item_pos, data.cases, ns)
    return {n: float(results[n].metrics["auc"].mean()) for n in ns}


def unadapted_auc(model, data) -> float:
    """The model as fitted: a new item is scored with its no-adaptation row (the mean of the trained rows)."""
    return float(case_metrics(model.score(data.cases.users, data.cases.candidates))["auc"].mean())


def round_trip_scores_alike(model, name, config, data, path) -> None:
    loaded = load_model(save_model(model, name, config, path))
    shown = new_items.shown_rows(data.rows, data.item_pos, 5)
    expected = new_items.reveal_new_items(model, shown).score(data.cases.users, data.cases.candidates)
    assert np.array_equal(new_items.reveal_new_items(loaded, shown).score(data.cases.users, data.cases.candidates), expected)


# ------------------------------------------------------------------ MWUF
def test_mwuf_warms_a_new_item_far_better_than_its_cold_row(planted, fitted_mwuf):
    """The scaled and shifted row ranks a new item shown 1 or 5 times far better than the same fine-tuned row unwarmed
    (MF-FT: MWUF without its meta networks, the same fit and fine-tuning)."""
    config, _, data = planted
    mf_ft = MFFineTune(config.baselines, config.meta).fit(data.train)
    cold, warm = auc_at(mf_ft, data, (1, 5)), auc_at(fitted_mwuf, data, (1, 5))
    for n in (1, 5):
        assert warm[n] > cold[n] + 0.1, (n, warm, cold)


def test_mwuf_is_its_base_mf_in_table_1(planted, fitted_mwuf):
    """New users and existing users are scored exactly as MF-FT scores them: only a new item's row is warmed."""
    config, _, data = planted
    mf_ft = MFFineTune(config.baselines, config.meta).fit(data.train)
    users, cands = data.cases.users[:40], data.cases.candidates[:40]
    assert np.array_equal(fitted_mwuf.score(users, cands), mf_ft.score(users, cands))
    row = ROWS["mwuf"]
    assert row.label == "MWUF" and not row.in_default and "mwuf" not in DEFAULT_MODELS and row.space == ROWS["metaemb"].space


def test_mwuf_save_load_round_trip_scores_alike(planted, fitted_mwuf, tmp_path):
    config, _, data = planted
    round_trip_scores_alike(fitted_mwuf, "mwuf", config, data, tmp_path / "mwuf")
    assert load_model(save_model(fitted_mwuf, "mwuf", config, tmp_path / "again")).feature_report()["item_fields"] == ["taste"]


def test_mwuf_without_item_features_scales_by_a_learned_constant_and_says_so(planted, monkeypatch):
    config, _, data = planted
    monkeypatch.setattr(mwuf_module, "META_STEPS", 40)
    model = MWUF(config.baselines, config.meta)
    model.set_features(Features())
    model.fit(data.train)
    report = model.feature_report()
    assert report["fallback"] and not report["uses_features"] and "learned per-dimension constant" in report["note"]
    scale = model._scale(np.arange(5), model.nets_)
    assert torch.allclose(scale, scale[:1].expand_as(scale))  # every item alike: no features to tell them apart
    assert not torch.allclose(scale, torch.ones_like(scale))  # but learned, not the identity it started at


# ------------------------------------------------------------------ RKMF's and SPMF's item updates
def test_rkmf_takes_new_items_by_its_item_update_only(planted, monkeypatch):
    """ItemUpdate retrains the new items' rows alone: W and the old items' rows stay, as the new-user mirror keeps H
    (through observe, UserUpdate retrained every shown user's row too). The retrained rows rank the planted new items
    better than the unadapted mean row."""
    config, _, data = planted
    model = RKMF(config.baselines).fit(data.train)
    monkeypatch.setattr(RKMF, "observe", lambda self, batch: pytest.fail("RKMF's new items went through observe"))
    shown = new_items.shown_rows(data.rows, data.item_pos, 5)
    revealed = new_items.reveal_new_items(model, shown)
    new = np.unique(shown.items)
    old = np.setdiff1d(np.arange(len(model.H_)), new)
    assert torch.equal(revealed.W_[: len(model.W_)], model.W_)
    assert torch.equal(revealed.H_[old], model.H_[old])
    assert not torch.equal(revealed.H_[new], model.H_[new])
    base = unadapted_auc(model, data)
    adapted = auc_at(model, data, (5, 10))
    assert min(adapted.values()) > base + 0.03, (adapted, base)


def test_spmf_item_update_learns_the_planted_taste(planted):
    """SPMF's update (the shown interactions pooled with its reservoir) ranks new items better than its unadapted rows."""
    config, _, data = planted
    model = SPMF(config.baselines).fit(data.train)
    base = unadapted_auc(model, data)
    adapted = auc_at(model, data, (5, 10))
    assert min(adapted.values()) > base + 0.02, (adapted, base)


@pytest.mark.parametrize("cls", [RKMF, SPMF])
def test_rkmf_and_spmf_round_trips_score_alike_after_their_item_updates(planted, cls, tmp_path):
    config, _, data = planted
    model = cls(config.baselines).fit(data.train)
    round_trip_scores_alike(model, cls.name, config, data, tmp_path / cls.name)


def test_every_item_row_is_shown_the_same_first_n_interactions(planted, monkeypatch):
    """The rows' own rules (fine-tuning, warm-up, ItemUpdate, SPMF's update, ours' adaptation) receive the same rows."""
    _, _, data = planted
    seen: dict[str, list] = {}
    calls = {"finetune_item_rows": new_items.finetune_item_rows, "retrain_item_rows": new_items.retrain_item_rows,
             "adapt_item_rows": new_items.adapt_item_rows}
    for name, real in calls.items():
        monkeypatch.setattr(new_items, name, lambda model, shown, real=real: (
            seen.setdefault(type(model).__name__, []).append(sorted(zip(shown.users.tolist(), shown.items.tolist()))), real(model, shown))[1])
    real_observe = SPMF.observe
    monkeypatch.setattr(SPMF, "observe", lambda self, batch: (
        seen.setdefault("SPMF", []).append(sorted(zip(batch.users.tolist(), batch.items.tolist()))), real_observe(self, batch))[1])
    small = BaselineConfig(epochs=1, dim=4)
    models = [MFFineTune(small, MetaConfig(dim=4)), MetaEmb(small, MetaConfig(dim=4)), RKMF(small), SPMF(small),
              ResponsiveMF(MetaConfig(dim=4, epochs=1, batch_tasks=256))]
    monkeypatch.setattr(mwuf_module, "META_STEPS", 2)
    monkeypatch.setattr("metarec.models.metaemb.GEN_STEPS", 2)
    models.append(MWUF(small, MetaConfig(dim=4)))
    for model in models:
        new_items.evaluate_new_items(model.fit(data.train), data.rows, data.item_pos, data.cases, (1, 5))
    assert set(seen) == {"MFFineTune", "MetaEmb", "MWUF", "RKMF", "SPMF", "ResponsiveMF"}
    expected = [sorted((u, i) for u, i, p in zip(data.rows.users.tolist(), data.rows.items.tolist(), data.item_pos.tolist()) if p < n)
                for n in (1, 5)]
    assert all(shown == expected for shown in seen.values())


# ------------------------------------------------------------------ ours: the item-side α and L
@pytest.fixture(scope="module")
def ours(planted):
    _, _, data = planted
    return ResponsiveMF(MetaConfig(dim=8, epochs=2, batch_tasks=256)).fit(data.train)


def _item_rows_after(model: ResponsiveMF, shown, **item) -> torch.Tensor:
    copy = ResponsiveMF.__new__(ResponsiveMF)
    copy.__dict__.update(model.__dict__)
    copy.meta = model.meta.model_copy(update=item)
    return new_items.reveal_new_items(copy, shown).Q_.detach()[torch.as_tensor(np.unique(shown.items))]


def test_larger_item_steps_and_rates_move_the_new_items_row_further(planted, ours):
    _, _, data = planted
    shown = new_items.shown_rows(data.rows, data.item_pos, 5)
    start = _item_rows_after(ours, shown, item_inner_steps=0)  # §7's new row, unadapted
    moved = lambda **item: float((_item_rows_after(ours, shown, **item) - start).norm(dim=1).mean())  # noqa: E731
    by_steps = [moved(item_inner_steps=s) for s in (1, ours.meta.inner_steps, 4 * ours.meta.inner_steps)]
    assert 0.0 < by_steps[0] < by_steps[1] < by_steps[2], by_steps
    assert moved(item_inner_lr=4 * ours.meta.inner_lr) > by_steps[1]


def test_item_rule_left_unset_is_serving_exactly(planted, ours):
    """None = serving's α and L: the rows equal those adapted with serving's values set explicitly, and an Ours+
    serving rule carries over to items; the unset fields stay out of every hash (today's keys and studies hold)."""
    _, _, data = planted
    shown = new_items.shown_rows(data.rows, data.item_pos, 5)
    explicit = _item_rows_after(ours, shown, item_inner_lr=ours.meta.inner_lr, item_inner_steps=ours.meta.inner_steps)
    assert torch.equal(_item_rows_after(ours, shown), explicit)
    plus = MetaConfig(serve_inner_lr=3.0, serve_inner_steps=4)
    assert (plus.item_serving().inner_lr, plus.item_serving().inner_steps) == (3.0, 4)
    assert (MetaConfig(serve_inner_steps=4, item_inner_steps=7).item_serving().inner_steps) == 7
    assert not {"item_inner_lr", "item_inner_steps"} & set(hashed_dump("meta", MetaConfig()))
    assert Config(tuned={}, meta=MetaConfig(item_inner_steps=7)).hash_of("meta") != Config(tuned={}).hash_of("meta")


def test_a_diverging_item_rule_is_named_not_scored(planted, ours):
    """A rate far past stability makes the adapted rows non-finite: the error names the two options, no NaN row is kept."""
    _, _, data = planted
    shown = new_items.shown_rows(data.rows, data.item_pos, 5)
    with pytest.raises(FloatingPointError, match=r"meta\.item_inner_steps / meta\.item_inner_lr"):
        _item_rows_after(ours, shown, item_inner_lr=1e30, item_inner_steps=20)
    assert torch.isfinite(ours.Q_.detach()).all()  # the served model is a copy; it is untouched
