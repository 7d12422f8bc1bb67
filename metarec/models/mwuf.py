"""MWUF (Zhu, Xie, Zhuang, Ge, Sun, Zhang, Lin, Cao: "Learning to Warm Up Cold Item Embeddings for Cold-start
Recommendation with Meta Scaling and Shifting Networks", SIGIR 2021) over MF-FT: an item-cold-start row of Table 2.

The paper (Meta Warm-Up Framework): a cold item's ID embedding starts at the common initial embedding (the mean of
the existing items' embeddings) and is updated by the base model's ordinary training on the item's first
interactions; what is scored is its *warm* embedding, scale ⊙ e_i + shift:

- the meta scaling network maps the item's features to a per-dimension scale (it "stretches" the cold embedding
  toward where items like it sit);
- the meta shifting network maps the mean embedding of the users who interacted with the item to a shift (it
  moves the embedding toward its audience, damping the noise of a few interactions);
- both are trained on old items with the base model's loss on the warm embedding, while the base model and the
  cold embeddings are trained on the cold ones; at serving, every new interaction also updates e_i.

Here, and where we deviate:
- implicit feedback: the loss is the base model's BPR loss (``metarec.models.mf.bpr_triple_loss`` with the meta
  section's λs) on (user, item, uniform negative) triples, not CTR log loss; the base model is MF-FT (its fit,
  new-user and stream rules unchanged, so in Table 1 this row equals MF-FT, as MetaEmb does);
- the cold embedding is MF-FT's item warm-up (``metarec.new_items.finetune_item_rows``): the mean of the trained
  item rows + §7's noise, then ``baselines.ft_epochs`` SGD passes (rate ``baselines.ft_lr``) over the item's n
  shown triples, W fixed; then the row is replaced by its warm row. W and H stay frozen while the networks are
  trained (the paper alternates them with the base model's training);
- simulated cold items, train like test: each step takes 256 old items (≥ 2 positives), shows each its first
  n_a interactions in time (n_a uniform in 1..10, at most all but one), warms its row up from the mean as above,
  and trains the networks on the BPR loss of the warm row on 5 of the item's later interactions (drawn with
  replacement) — the paper feeds the shifting network all of an old item's users;
- the networks: scaling = 1 + MLP(mean of the item's feature-code embeddings), shifting = MLP(mean user row),
  each one hidden layer of 16 ReLU units, output layers started at zero, so the warm row starts as the cold row
  (the row without warm-up is MF-FT). With no item features the scaling network's input is constant (a learned
  per-dimension scale), and ``feature_report`` says so;
- fixed choices (not searched): 300 Adam steps (rate 0.01), 16-dimensional feature-code embeddings.
"""

from __future__ import annotations

import numpy as np
import torch

from metarec.config import Config
from metarec.features import Features, FeatureTable
from metarec.interface import Interactions, OnEpoch
from metarec.models.mf import bpr_triple_loss
from metarec.models.mf_ft import MFFineTune

MAX_SHOWN, QUERIES, META_LR, META_STEPS, ITEM_BATCH, FEATURE_DIM, HIDDEN = 10, 5, 0.01, 300, 256, 16, 16
SEED_TAG = 43  # the meta networks' draws, apart from every other draw of the model


def _scatter_mean(values: torch.Tensor, owner: np.ndarray, groups: int) -> torch.Tensor:
    """(groups, d): the mean of ``values``' rows per owner (0 for a group without one)."""
    index = torch.as_tensor(owner, dtype=torch.int64)
    total = torch.zeros(groups, values.shape[1], dtype=values.dtype).index_add_(0, index, values)
    count = torch.bincount(index, minlength=groups).clamp(min=1).to(values.dtype)
    return total / count[:, None]


class MWUF(MFFineTune):
    name = "mwuf"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.item_features_: FeatureTable | None = None
        self.nets_: dict[str, torch.Tensor] = {}

    def set_features(self, features: Features) -> None:
        self.item_features_ = features.items

    def _has_features(self) -> bool:
        return self.item_features_ is not None and self.item_features_.n_codes > 0

    def feature_report(self) -> dict:
        has = self._has_features()
        return {"uses_features": has, "fallback": not has, "user_fields": [], "item_fields": list(self.item_features_.fields) if has else [],
                "note": "meta scaling network on item features" if has else "no item features: the scale is a learned per-dimension constant"}

    # ---------------------------------------------------------------- the two meta networks
    def _codes(self, items: np.ndarray) -> torch.Tensor:
        """(B, S) feature codes of ``items`` (-1 = none; items beyond the table have none)."""
        if not self._has_features():
            return torch.full((len(items), 1), -1, dtype=torch.int64)
        table = self.item_features_
        inside = items < table.n_entities
        codes = np.full((len(items), table.codes.shape[1]), -1, dtype=np.int64)
        codes[inside] = table.codes[items[inside]]
        return torch.as_tensor(codes)

    def _scale(self, items: np.ndarray, nets: dict[str, torch.Tensor]) -> torch.Tensor:
        codes = self._codes(np.asarray(items, dtype=np.int64))
        mask = (codes >= 0).to(torch.float32)
        pooled = (nets["codes"][codes.clamp(min=0)] * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1.0)
        return 1.0 + torch.relu(pooled @ nets["scale_in"] + nets["scale_in_b"]) @ nets["scale_out"] + nets["scale_out_b"]

    @staticmethod
    def _shift(user_mean: torch.Tensor, nets: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.relu(user_mean @ nets["shift_in"] + nets["shift_in_b"]) @ nets["shift_out"] + nets["shift_out_b"]

    def _warm(self, items: np.ndarray, cold: torch.Tensor, users: np.ndarray, owner: np.ndarray, nets: dict[str, torch.Tensor]) -> torch.Tensor:
        user_mean = _scatter_mean(self.W_.detach()[torch.as_tensor(users)], owner, len(items))
        return self._scale(items, nets) * cold + self._shift(user_mean, nets)

    def warm_item_rows(self, items: np.ndarray, cold: torch.Tensor, shown: Interactions) -> torch.Tensor:
        """The warm rows (B, d) of ``items`` (sorted, distinct): scale(features) ⊙ cold + shift(mean row of their shown users)."""
        with torch.no_grad():
            return self._warm(items, cold, shown.users, np.searchsorted(items, shown.items), self.nets_)

    # ---------------------------------------------------------------- training on old items simulated cold
    def fit(self, history: Interactions, on_epoch: OnEpoch | None = None) -> "MWUF":
        super().fit(history, on_epoch)
        self.train_meta_networks(history)
        return self

    def _fresh_nets(self, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        n_codes = self.item_features_.n_codes if self._has_features() else 0
        d = self.dim
        draw = lambda *shape: torch.from_numpy(rng.normal(0.0, 0.1, size=shape).astype(np.float32))  # noqa: E731
        nets = {"codes": draw(max(n_codes, 1), FEATURE_DIM), "scale_in": draw(FEATURE_DIM, HIDDEN), "scale_in_b": torch.full((HIDDEN,), 0.1),
                "scale_out": torch.zeros(HIDDEN, d), "scale_out_b": torch.zeros(d),
                "shift_in": draw(d, HIDDEN), "shift_in_b": torch.full((HIDDEN,), 0.1), "shift_out": torch.zeros(HIDDEN, d), "shift_out_b": torch.zeros(d)}
        return {key: value.requires_grad_() for key, value in nets.items()}

    def _cold_rows(self, users: np.ndarray, shown: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
        """(B, d): each simulated cold item's row warmed up as a new item's is (MF-FT's item fine-tuning), W and H fixed.

        ``users`` (B, S): each item's shown users, the first ``shown[b]`` of row b valid. The same rule as
        ``metarec.new_items.finetune_item_rows`` (per epoch fresh negatives, the item's triples in a random order, one
        SGD step each), with h_i's BPR gradient in closed form: that rule's autograd costs 90% of this training."""
        W, H, m = self.W_.detach(), self.H_.detach(), self.meta
        rows = self.new_item_rows(rng)(len(users)).to(H.dtype)
        valid = np.arange(users.shape[1])[None, :] < shown[:, None]
        for _ in range(self.config.ft_epochs):
            neg = torch.as_tensor(self.index_.sample_negatives(users, rng, n_items=len(H)))
            order = np.argsort(np.where(valid, rng.random(users.shape), 2.0), axis=1)  # a random order, padding last
            for step in range(int(shown.max())):
                live = torch.as_tensor(valid[np.arange(len(users)), order[:, step]])
                u = torch.as_tensor(users[np.arange(len(users)), order[:, step]])
                j = neg[torch.arange(len(users)), torch.as_tensor(order[:, step])]
                w = W[u]
                x = (w * (rows - H[j])).sum(-1)
                grad = -torch.sigmoid(-x)[:, None] * w + 2.0 * m.lambda_q_pos * rows
                rows = torch.where(live[:, None], rows - self.config.ft_lr * grad, rows)
        return rows

    def train_meta_networks(self, history: Interactions) -> None:
        """The scaling and shifting networks by the BPR loss of warm rows of old items simulated cold (module doc)."""
        rng = np.random.default_rng([self.seed, SEED_TAG])
        self.nets_ = self._fresh_nets(rng)
        optimiser = torch.optim.Adam(list(self.nets_.values()), lr=META_LR)
        order = np.argsort(history.items, kind="stable")  # each item's users in time order (history is sorted by time)
        by_item = history.users[order]
        ptr = np.searchsorted(history.items[order], np.arange(len(self.H_) + 1))
        counts = np.diff(ptr)
        old = np.flatnonzero(counts >= 2)
        if not len(old):
            self.nets_ = {key: value.detach() for key, value in self.nets_.items()}
            return
        W, H, m = self.W_.detach(), self.H_.detach(), self.meta
        for _ in range(META_STEPS):
            items = np.sort(rng.choice(old, size=min(ITEM_BATCH, len(old)), replace=False))
            shown = np.minimum(rng.integers(1, MAX_SHOWN + 1, size=len(items)), counts[items] - 1)
            slots = np.minimum(np.arange(shown.max())[None, :], shown[:, None] - 1)  # padding repeats the last shown user
            users_a = by_item[ptr[items][:, None] + slots]  # each item's first n_a interactions: what a new item shows
            later = counts[items] - shown
            users_b = by_item[(ptr[items] + shown)[:, None] + (rng.random((len(items), QUERIES)) * later[:, None]).astype(np.int64)]
            neg_b = self.index_.sample_negatives(users_b, rng, n_items=len(H))
            cold = self._cold_rows(users_a, shown, rng)
            valid = slots == np.arange(shown.max())[None, :]
            owner = np.broadcast_to(np.arange(len(items))[:, None], slots.shape)[valid]
            warm = self._warm(items, cold, users_a[valid], owner, self.nets_)
            loss = bpr_triple_loss(W[torch.as_tensor(users_b)], warm[:, None, :], H[torch.as_tensor(neg_b)], m.lambda_p, m.lambda_q_pos, m.lambda_q_neg)
            optimiser.zero_grad()
            loss.mean().backward()
            optimiser.step()
        self.nets_ = {key: value.detach() for key, value in self.nets_.items()}

    # ---------------------------------------------------------------- state
    def state_arrays(self) -> dict[str, np.ndarray]:
        out = super().state_arrays()
        out.update({f"mwuf.{key}": value.detach().numpy().copy() for key, value in self.nets_.items()})
        if self.item_features_ is not None:
            out.update(Features(items=self.item_features_).to_arrays())
        return out

    def load_state_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        super().load_state_arrays(arrays)
        self.nets_ = {key[5:]: torch.as_tensor(np.array(value)) for key, value in arrays.items() if key.startswith("mwuf.")}
        self.item_features_ = Features.from_arrays({k: v for k, v in arrays.items() if not k.startswith("mwuf.")}).items


def from_config(config: Config) -> MWUF:
    return MWUF(config.baselines, config.meta)
