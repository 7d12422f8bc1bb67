"""A prototype recommender, after prototypical networks (Snell, Swersky, Zemel; NeurIPS 2017).

A prototypical network embeds the few labelled examples of an episode and
classifies a query by its similarity to each class's prototype, the mean
embedding of that class's examples; the embedding is learned episodically,
on episodes shaped like the test-time ones. Applied to recommendation, the one
"class" of an episode is the user: its prototype is the pooled embedding of
the items it has shown, and every item is scored by similarity to it.

What we follow: a user's vector is c_u = c_0 + Σ_j w_j f(i_j) over its support
items (w_j = 1/k, the mean, by default; ``neural.pooling = "attention"`` learns
w = softmax_j vᵀ tanh(A f(i_j)), a permutation-invariant attention pool); items
are scored by the inner product c_u · f(i) (the paper's squared Euclidean
distance is an inner product plus a norm term, which for ranking items against
one prototype would only favour short vectors); f is learned episodically, as
prototypical networks are, on episodes shaped like the test: a seeded random
split of a user's interactions into a support of 1..k items and up to
``neural.query_items`` queries (``metarec.models.neural.split_episodes``), the
loss ``neural.loss`` (default BPR) of each query positive against its sampled
negative.

f(i) is an item id embedding, plus a linear map of the item's feature fields
when the data set has item features. c_0 is one learned vector shared by all
users (our addition: the population's taste, which is what a user who has
shown nothing yet — a stream user's first interaction — is scored by; without
it such a user's prototype is zero and every item ties). There is no local update: adapting to a
user is computing its prototype, so serving is one pooling per user. A new
user's prototype is the pool of every item it has shown (or of the last
``neural.serve_k``); an existing user's, the pool of its last ``neural.serve_k``
(else 50) interactions. Items without a positive in training are new items (the
mean id row, their own features). Deviations: implicit feedback with BPR over
sampled negatives instead of a softmax over classes; the inner product instead
of the squared distance; c_0. Online rule: ``EpisodicRecommender.observe``
(index the batch, so prototypes follow the latest items; global updates of f on
the batch's stream episodes).
"""

from __future__ import annotations

import torch
from torch import nn

from metarec.config import Config
from metarec.models.neural import departures, EpisodicRecommender, Episodes, FieldEncoder, query_loss, reset_linears


class PrototypeNet(nn.Module):
    """items: FieldEncoder (features + ids); project: fields -> d; attend, attend_v: the attention pool."""

    def __init__(self, items: FieldEncoder, dim: int) -> None:
        super().__init__()
        self.items = items
        self.project = nn.Linear(items.out_dim, dim, bias=False) if items.n_fields else nn.Identity()
        self.attend = nn.Linear(dim, dim)
        self.attend_v = nn.Parameter(torch.zeros(dim))
        self.prior = nn.Parameter(torch.zeros(dim))  # c_0, the population's direction: a user who showed nothing gets it

    def embed(self, items: torch.Tensor) -> torch.Tensor:
        """f(i): (...,) -> (..., d)."""
        return self.project(self.items(items))


class PrototypeRecommender(EpisodicRecommender):
    name = "prototype"
    feature_sides = ("items",)

    def build_net(self, n_users: int, n_items: int) -> PrototypeNet:
        n = self.neural
        items = FieldEncoder(self.side_table("items"), n_items, n.dim, with_ids=True, std=n.init_std, generator=self.generator_)
        return reset_linears(PrototypeNet(items, n.dim), self.generator_)

    def prototypes(self, support: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """c_u (B, d) = c_0 + the pool of the support items' vectors (B, k, d) under mask (B, k); no item: c_0 alone."""
        if self.neural.pooling == "attention":
            logits = torch.tanh(self.net_.attend(support)) @ self.net_.attend_v
            weights = torch.softmax(logits.masked_fill(mask == 0, -torch.inf), -1).nan_to_num(0.0)
        else:
            weights = mask / mask.sum(-1, keepdim=True).clamp(min=1.0)
        return self.net_.prior + (weights[..., None] * support).sum(1)

    def episode_loss(self, episodes: Episodes) -> torch.Tensor:
        c = self.prototypes(self.net_.embed(episodes.support_pos), episodes.support_mask)
        query = self.net_.embed(torch.cat([episodes.query_pos, episodes.query_neg], 1))
        s = (c[:, None, :] * query).sum(-1)
        return query_loss(s, episodes.query_mask, self.neural.loss).mean()

    @torch.no_grad()
    def adapt(self, episodes: Episodes, new_users: bool) -> torch.Tensor:
        return self.prototypes(self.net_.embed(episodes.support_pos), episodes.support_mask)

    def score_adapted(self, adapted: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        return (adapted[:, None, :] * self.net_.embed(candidates)).sum(-1)


def from_config(config: Config) -> PrototypeRecommender:
    return PrototypeRecommender(config.neural, config.tasks)


def variant_of(config: Config) -> str | None:
    """The variant this config runs, as Table 1 labels it; None for the row as its docstring describes it."""
    return departures(config.neural, faithful_first_order=config.neural.first_order, pooling=True)
