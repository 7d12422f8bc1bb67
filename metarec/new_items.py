"""Item cold start (Table 2): a fitted model is shown each new item's first n interactions, then ranks it.

The mirror of the new-user protocol (``metarec.protocol``, docs/method.md §9). A new item's rows never
reached training (``tasks/data/new_items.py``); for each n, ``reveal_new_items`` gives a *copy* of the
fitted model the first n interactions of every new item (all of them for an item with fewer), the same
ones for every row, and each later interaction of a new item (item_pos >= max(n), the same cases for
every n) is a case: its user ranks the new item against the stored negatives, with the metrics of
``metarec.metrics``. Every n starts from the same fitted model.

How a row takes in a new item's n interactions (``reveal_new_items``):

- ours (``ResponsiveMF``): the item's row starts at §7's new row (the mean of Θ's trained item rows +
  N(0, σ²I)) and takes L steps of the inner rule (rate α) on the item's support, its n triples (u_j, i,
  k_j), k_j a uniform item u_j never had; the users' and negatives' rows are local to the steps, as in
  serving, and only the item's adapted row is kept: the mirror of a new user adapted from Θ. α and L are
  serving's (``meta.serving()``) unless ``meta.item_inner_lr`` / ``meta.item_inner_steps`` set the item's
  own (``meta.item_serving()``; None, the paper row, keeps serving's). Our deviation from the user side:
  no neighbour interactions fill the support (for n < K it holds the n triples, cycled to a rectangle when
  items differ in n);
- MF-FT (``MFFineTune``): the item's row starts at the mean of the trained item rows + noise and takes
  ``baselines.ft_epochs`` SGD passes (rate ``baselines.ft_lr``) over its n triples, every other row
  fixed: plain fine-tuning of the item row; MetaEmb (``metarec.models.metaemb``) the same, started from its
  generator's embedding of the item's features; MWUF (``metarec.models.mwuf``) the same, then its row is
  warmed: scaled by its meta scaling network and shifted by its meta shifting network;
- RKMF (``RKMF``): its ItemUpdate (``RKMF.item_update``, ``baselines.rkmf_item_update``) for each new item,
  the mirror of the UserUpdate a new user gets: the item's row redrawn from N(0, σ²) and retrained alone,
  W and every other row fixed, for ``baselines.rkmf_update_epochs`` epochs at ``baselines.lr``, on the item's
  n positives (and, two-sided, as other users' sampled negative). A stream batch would also retrain its
  users (UserUpdate); here only the items are new, so only they are retrained;
- SPMF (``SPMF``): its online update is its item update: the n interactions are the batch W, pooled with
  its reservoir R, |W| positives of R ∪ W drawn by rank and trained on (``baselines.spmf_update_epochs``
  passes), then R takes W (``SPMF.observe``; the paper has no item-specific rule);
- any other row: its own online update on the n interactions as one batch (``observe``); for Pop that is
  counting them.
"""

from __future__ import annotations

import copy
import logging
import time

import numpy as np
import torch

from metarec.interface import Interactions, StreamingRecommender
from metarec.metrics import case_metrics
from metarec.protocol import CaseResults, Cases

logger = logging.getLogger(__name__)

SEED_TAG = 23  # the new-item support negatives' stream, apart from every other draw of a model


def shown_rows(rows: Interactions, item_pos: np.ndarray, n: int) -> Interactions:
    """The first n interactions of every new item (item_pos < n), as a batch in time order."""
    keep = np.asarray(item_pos) < n
    return Interactions.from_arrays(rows.users[keep], rows.items[keep], rows.ts[keep])


def reveal_new_items(model: StreamingRecommender, shown: Interactions) -> StreamingRecommender:
    """A copy of ``model`` that has taken in ``shown`` by its row's rule (module doc); ``model`` is unchanged."""
    from metarec.models.mf_ft import MFFineTune
    from metarec.models.responsive import ResponsiveMF
    from metarec.models.rkmf import RKMF

    clone = copy.deepcopy(model)
    if not len(shown):
        return clone
    if isinstance(clone, ResponsiveMF):
        adapt_item_rows(clone, shown)
    elif isinstance(clone, MFFineTune):
        finetune_item_rows(clone, shown)
    elif isinstance(clone, RKMF):
        retrain_item_rows(clone, shown)
    else:  # SPMF (its online update on W ∪ R is its item update), Pop, sRec, the neural rows
        clone.observe(shown)
    return clone


def _supports(shown: Interactions) -> tuple[np.ndarray, np.ndarray]:
    """(items (T,), rows (T, K)): each new item's shown rows as a rectangle, shorter items' rows cycled."""
    items, owner = np.unique(shown.items, return_inverse=True)
    counts = np.bincount(owner)
    order = np.argsort(owner, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    slots = np.arange(counts.max())[None, :] % counts[:, None]
    return items, order[starts[:, None] + slots]


@torch.no_grad()
def adapt_item_rows(model, shown: Interactions) -> None:
    """Ours: each shown item's row of Q becomes its row adapted from Θ by serving's inner rule (module doc), in place."""
    items, rows = _supports(shown)
    model._grow(max(model.n_users_, shown.n_users), max(model.n_items_, shown.n_items))
    users = shown.users[rows]
    pos = np.broadcast_to(items[:, None], rows.shape).copy()
    rng = np.random.default_rng([model.meta.seed, SEED_TAG, len(shown)])
    neg = model.index_.sample_negatives(users, rng, n_items=model.n_items_, exclude=pos[..., None])
    generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
    adapted = model.adapt_supports(users, pos, neg, generator, rule=model.meta.item_serving())
    wanted = torch.as_tensor(items, device=adapted.item_ids.device)
    slot = (adapted.item_ids == wanted[:, None]).to(torch.uint8).argmax(1)
    new_rows = adapted.item_rows[torch.arange(len(items)), slot]
    if not torch.isfinite(new_rows).all():
        rule = model.meta.item_serving()
        bad = int((~torch.isfinite(new_rows).all(1)).sum())
        raise FloatingPointError(
            f"ours' item-side adaptation diverged: {bad} of {len(items)} new items' rows are not finite after "
            f"{rule.inner_steps} steps at rate {rule.inner_lr:g} (meta.item_inner_steps / meta.item_inner_lr; None = serving's); "
            "take fewer steps or a smaller rate")
    model.Q_.detach()[torch.as_tensor(items, device=model.device)] = new_rows.to(model.Q_.dtype)
    if model.trained_items_ is None:
        model.trained_items_ = torch.as_tensor(model._trained_masks()[1])
    model.trained_items_[torch.as_tensor(items)] = True  # scored with its adapted row from now on, not §7's


def finetune_item_rows(model, shown: Interactions) -> None:
    """MF-FT: each shown item's row from mean + noise, ft_epochs SGD passes over its triples, other rows fixed; in place."""
    from metarec.models.common import negatives, sgd_item_rounds

    rng = np.random.default_rng([model.seed, SEED_TAG, len(shown)])
    fill = model.new_item_rows(rng)
    model._grow(max(len(model.W_), shown.n_users), max(len(model.H_), shown.n_items), lambda k: model._default_user().expand(k, -1).clone(), fill)
    items = np.unique(shown.items)
    start = getattr(model, "generated_item_rows", None)  # MetaEmb: its generator's φ; MF-FT: §7's mean + noise
    model.H_[torch.as_tensor(items)] = start(items) if start is not None else fill(len(items))
    model._remember(shown)  # the items now count as seen: scored with their own rows
    for _ in range(model.config.ft_epochs):
        neg = negatives(model.index_, shown.users, rng, len(model.H_))
        sgd_item_rounds(model.W_, model.H_, shown.users, shown.items, neg, shown.items, model.grad_fn, model.config.ft_lr, rng)
    warm = getattr(model, "warm_item_rows", None)  # MWUF: the fine-tuned row scaled and shifted by its meta networks
    if warm is not None:
        model.H_[torch.as_tensor(items)] = warm(items, model.H_[torch.as_tensor(items)], shown)


def retrain_item_rows(model, shown: Interactions) -> None:
    """RKMF: ItemUpdate for each shown item (module doc), W and every other row fixed; in place."""
    from metarec.models.common import gaussian

    rng = np.random.default_rng([model.seed, SEED_TAG, len(shown)])
    fill = lambda k: gaussian(rng, k, model.dim, model.config.init_std)  # noqa: E731 - ItemUpdate redraws the rows anyway
    model._grow(max(len(model.W_), shown.n_users), max(len(model.H_), shown.n_items), fill, fill)
    model._remember(shown)  # the item's positives ItemUpdate trains on; its users now count as seen, as after a stream batch
    model.item_update(np.unique(shown.items), rng)


def evaluate_new_items(model: StreamingRecommender, rows: Interactions, item_pos: np.ndarray, cases: Cases, ns) -> dict[int, CaseResults]:
    """For each n: reveal every new item's first n interactions to a copy of ``model``, then score every case."""
    results: dict[int, CaseResults] = {}
    for n in sorted(ns):
        start = time.perf_counter()
        revealed = reveal_new_items(model, shown_rows(rows, item_pos, n))
        metrics = case_metrics(revealed.score(cases.users, cases.candidates))
        results[n] = CaseResults(cases.users, metrics, time.perf_counter() - start, {"items": cases.items})
        logger.info("new items n=%d: %d cases, HR@10 %.4f", n, len(cases.users), metrics["hr"].mean())
    return results
