"""MetaEmb (Pan, Li, Ao, Tang, He: "Warm Up Cold-start Advertisements: Improving CTR Predictions via Learning to
Learn ID Embeddings", SIGIR 2019) over MF-FT: an item-cold-start row of Table 2.

The paper: an embedding generator maps a new item's features to an initial ID embedding. It is trained on old
items with the base model frozen, on two minibatches D_a and D_b of each item's data: the cold-start loss l_a is
the base model's loss on D_a with the generated embedding φ; the warm-up loss l_b is the loss on D_b with
φ' = φ - a ∇_φ l_a (one gradient step, the warm-up the item will get); the generator minimises α l_a + (1 - α) l_b.
A new item then starts from φ and is warmed up by ordinary updates on its first interactions.

Here, and where we deviate:
- implicit feedback: both losses are the base model's BPR loss (``metarec.models.mf.bpr_triple_loss`` with the
  meta section's λs) on (user, item, uniform negative) triples, not CTR log loss; the base model is MF-FT (its
  fit, new-user and stream rules unchanged, so in Table 1 this row equals MF-FT);
- the generator: the mean of the embeddings of the item's feature codes (genres, year, ... as prepared), then a
  linear map to d; with no item features it is a learned constant (a learned mean row), and
  ``feature_report`` says so;
- fixed choices (not searched): α = 0.1 (the paper's), |D_a| = |D_b| = 5 interactions drawn per item with
  replacement, the warm-up step a = ``baselines.ft_lr``, 300 Adam steps (rate 0.01) on the generator, each on 256
  old items (≥ 2 positives) drawn without replacement;
- a new item's warm-up on its n shown interactions is MF-FT's item fine-tuning (``metarec.new_items``), started
  from φ instead of the mean of the trained rows + noise.
"""

from __future__ import annotations

import numpy as np
import torch

from metarec.config import Config
from metarec.features import Features, FeatureTable
from metarec.interface import Interactions, OnEpoch
from metarec.models.mf import bpr_triple_loss
from metarec.models.mf_ft import MFFineTune

ALPHA, SHOTS, GEN_LR, GEN_STEPS, ITEM_BATCH, FEATURE_DIM = 0.1, 5, 0.01, 300, 256, 16


class MetaEmb(MFFineTune):
    name = "metaemb"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.item_features_: FeatureTable | None = None
        self.gen_: dict[str, torch.Tensor] = {}

    def set_features(self, features: Features) -> None:
        self.item_features_ = features.items

    def feature_report(self) -> dict:
        table = self.item_features_
        has = table is not None and table.n_codes > 0
        return {"uses_features": has, "fallback": not has, "user_fields": [], "item_fields": list(table.fields) if has else [],
                "note": "generator from item features" if has else "no item features: the generator is a learned constant row"}

    # ---------------------------------------------------------------- generator
    def _codes(self, items: np.ndarray) -> torch.Tensor:
        """(B, S) feature codes of ``items`` (-1 = none; items beyond the table have none)."""
        table = self.item_features_
        if table is None or table.n_codes == 0:
            return torch.full((len(items), 1), -1, dtype=torch.int64)
        inside = items < table.n_entities
        codes = np.full((len(items), table.codes.shape[1]), -1, dtype=np.int64)
        codes[inside] = table.codes[items[inside]]
        return torch.as_tensor(codes)

    def _generate(self, items: np.ndarray, params: dict[str, torch.Tensor]) -> torch.Tensor:
        codes = self._codes(np.asarray(items, dtype=np.int64))
        mask = (codes >= 0).to(torch.float32)
        pooled = (params["codes"][codes.clamp(min=0)] * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1.0)
        return pooled @ params["out"] + params["bias"]

    def generated_item_rows(self, items: np.ndarray) -> torch.Tensor:
        """φ: the generator's initial rows (B, d) for ``items``, no gradient."""
        with torch.no_grad():
            return self._generate(items, self.gen_)

    def fit(self, history: Interactions, on_epoch: OnEpoch | None = None) -> "MetaEmb":
        super().fit(history, on_epoch)
        self.train_generator(history)
        return self

    def train_generator(self, history: Interactions) -> None:
        """The generator by MetaEmb's cold-start and warm-up losses on the old items, W and H frozen (module doc)."""
        rng = np.random.default_rng([self.seed, 41])
        # its own generator, not torch's global one: fits run side by side in threads (Table 2's fan-out), and
        # another thread's draws between a global seed and these would change them (same values as a global seed)
        generator = torch.Generator().manual_seed(int(rng.integers(2**31)))
        n_codes = self.item_features_.n_codes if self.item_features_ is not None else 0
        self.gen_ = {"codes": (torch.randn(max(n_codes, 1), FEATURE_DIM, generator=generator) * 0.1).requires_grad_(),
                     "out": (torch.randn(FEATURE_DIM, self.dim, generator=generator) * 0.1).requires_grad_(),
                     "bias": self.trained_item_rows().mean(0).detach().clone().requires_grad_()}
        optimiser = torch.optim.Adam(list(self.gen_.values()), lr=GEN_LR)
        order = np.argsort(history.items, kind="stable")
        by_item = history.users[order]
        ptr = np.searchsorted(history.items[order], np.arange(len(self.H_) + 1))
        counts = np.diff(ptr)
        old = np.flatnonzero(counts >= 2)
        W, H, m = self.W_.detach(), self.H_.detach(), self.meta
        for _ in range(GEN_STEPS):
            items = rng.choice(old, size=min(ITEM_BATCH, len(old)), replace=False)
            draw = lambda: by_item[ptr[items][:, None] + (rng.random((len(items), SHOTS)) * counts[items][:, None]).astype(np.int64)]  # noqa: E731
            users_a, users_b = draw(), draw()
            neg_a = self.index_.sample_negatives(users_a, rng, n_items=len(H))
            neg_b = self.index_.sample_negatives(users_b, rng, n_items=len(H))
            loss_of = lambda phi, u, k: bpr_triple_loss(W[u], phi[:, None, :], H[k], m.lambda_p, m.lambda_q_pos, m.lambda_q_neg).mean(-1)  # noqa: E731
            phi = self._generate(items, self.gen_)
            cold = loss_of(phi, torch.as_tensor(users_a), torch.as_tensor(neg_a))
            (grad,) = torch.autograd.grad(cold.sum(), phi, create_graph=True)
            warm = loss_of(phi - self.config.ft_lr * grad, torch.as_tensor(users_b), torch.as_tensor(neg_b))
            optimiser.zero_grad()
            (ALPHA * cold + (1.0 - ALPHA) * warm).mean().backward()
            optimiser.step()
        self.gen_ = {key: value.detach() for key, value in self.gen_.items()}

    # ---------------------------------------------------------------- state
    def state_arrays(self) -> dict[str, np.ndarray]:
        out = super().state_arrays()
        out.update({f"gen.{key}": value.detach().numpy().copy() for key, value in self.gen_.items()})
        if self.item_features_ is not None:
            out.update(Features(items=self.item_features_).to_arrays())
        return out

    def load_state_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        super().load_state_arrays(arrays)
        self.gen_ = {key[4:]: torch.as_tensor(np.array(value)) for key, value in arrays.items() if key.startswith("gen.")}
        self.item_features_ = Features.from_arrays({k: v for k, v in arrays.items() if not k.startswith("gen.")}).items


def from_config(config: Config) -> MetaEmb:
    return MetaEmb(config.baselines, config.meta)
