"""A sequence meta-learner (the Mecos family: Zheng, Liu, Li, Wu, Yu; "Cold-start Sequential Recommendation via
Meta Learner", AAAI 2021), for new users with implicit feedback.

Mecos meta-learns on few-shot tasks whose examples are interaction sequences:
a self-attention encoder turns a sequence of item embeddings (with their
order) into a representation, and a meta-learner matches it against
candidate items, trained episodically on tasks shaped like the cold-start
test. Here the cold entity is the user (Mecos's is the item): the user *is*
the encoding of the sequence it has shown, and MAML adapts that encoding to
the sequence.

The model (``SequenceNet``):

- f(i): the item's feature fields and id embedding (``FieldEncoder``, the
  same as MeLU's items), projected to d;
- order: each shown item gets a learned position embedding by its recency
  (the last shown is position 0; positions k - 1 and older share one, as
  training's supports hold at most k items), added to f(i); one self-attention layer
  (masked to the shown items, residual, layer norm) mixes the sequence;
- pooling: attention with a learned query over the mixed sequence gives h;
  a user who has shown nothing gets a learned start vector instead;
- the user's local parameters: its vector u = W h and a head H (d x d, one
  copy per user, starting at the shared H_0); score(u, i) = (H u) · f(i).

Meta-training (MAML, ``neural.local_steps`` steps of rate ``neural.local_lr``
on u and H with the mean support loss, second order unless
``neural.first_order``; the global update is Adam on the query loss through
the steps into the encoder and the embeddings) runs on the episodes of
``metarec.models.neural.split_episodes``: random splits of each user's
interactions with supports of 1..k items kept in time order, and by default
half of them "first s, then the next" episodes (``neural.early_share``), the
test's own question, because a sequence model should learn what follows a
beginning. Serving encodes and adapts on every shown item (or the last
``neural.serve_k``); items without a training positive are new items (mean id
row, own features).

Deviations from Mecos: the cold entity is a user, not an item; implicit
feedback with BPR over sampled negatives instead of its cross-entropy over
candidate items; position (order) embeddings, not time gaps, carry the
sequence's time; MAML gradient steps on the user's vector and head instead of
Mecos's matching network. Batched: one (B, ...) tensor per local parameter,
no Python loop per user.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from metarec.config import Config
from metarec.models.neural import EpisodicRecommender, Episodes, FieldEncoder, departures, masked_mean, pair_loss, query_loss, reset_linears, sgd_steps



class SequenceNet(nn.Module):
    """items: FieldEncoder; project: fields -> d; position, attention, pooling and the user map W; head H_0."""

    def __init__(self, items: FieldEncoder, dim: int, positions: int, generator: torch.Generator) -> None:
        super().__init__()
        self.items = items
        self.project = nn.Linear(items.out_dim, dim)
        # one embedding per recency position training's supports reach (1..k items); older shown items share the last
        self.position = nn.Parameter(torch.randn(positions, dim, generator=generator) * 0.02)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.norm = nn.LayerNorm(dim)
        self.pool_query = nn.Parameter(torch.zeros(dim))
        self.start = nn.Parameter(torch.zeros(dim))  # the user who has shown nothing
        self.user_map = nn.Linear(dim, dim)
        self.head = nn.Parameter(torch.eye(dim))

    def embed(self, items: torch.Tensor) -> torch.Tensor:
        """f(i): (...,) -> (..., d)."""
        return self.project(self.items(items))

    def encode(self, sequence: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, S) items left-aligned in time order under mask (B, S) -> h (B, d)."""
        real = mask > 0
        count = real.sum(1, keepdim=True)
        recency = (count - 1 - torch.arange(sequence.shape[1])[None, :]).clamp(0, self.position.shape[0] - 1)
        x = self.embed(sequence) + self.position[recency]
        q, k, v = self.qkv(x).chunk(3, -1)
        logits = q @ k.transpose(1, 2) / q.shape[-1] ** 0.5
        attend = torch.softmax(logits.masked_fill(~real[:, None, :], -torch.inf), -1).nan_to_num(0.0)
        x = self.norm(x + attend @ v)
        weights = torch.softmax((x @ self.pool_query).masked_fill(~real, -torch.inf), -1).nan_to_num(0.0)
        pooled = (weights[..., None] * x).sum(1)
        return torch.where(count > 0, pooled, self.start.expand_as(pooled))


class SequenceMeta(EpisodicRecommender):
    name = "sequence_meta"
    feature_sides = ("items",)
    default_early_share = 0.5

    def build_net(self, n_users: int, n_items: int) -> SequenceNet:
        n = self.neural
        items = FieldEncoder(self.side_table("items"), n_items, n.dim, with_ids=True, std=n.init_std, generator=self.generator_)
        return reset_linears(SequenceNet(items, n.dim, self.tasks.k, self.generator_), self.generator_)

    def start_params(self, episodes: Episodes) -> dict[str, torch.Tensor]:
        """Each user's local parameters before adaptation: u = W h(support sequence), H = H_0."""
        net = self.net_
        u = net.user_map(net.encode(episodes.support_pos, episodes.support_mask))
        return {"user": u, "head": net.head.unsqueeze(0).expand(len(u), -1, -1)}

    @staticmethod
    def scores(fast: dict[str, torch.Tensor], item_vecs: torch.Tensor) -> torch.Tensor:
        """(H u) · f(i): fast user (B, d), head (B, d, d); item_vecs (B, C, d) -> (B, C)."""
        return torch.einsum("bcd,bd->bc", item_vecs, torch.bmm(fast["head"], fast["user"][..., None])[..., 0])

    def support_vecs(self, episodes: Episodes) -> torch.Tensor:
        """f of the support positives then their negatives: (B, 2S, d)."""
        return self.net_.embed(torch.cat([episodes.support_pos, episodes.support_neg], 1))

    def local_update(self, fast, both: torch.Tensor, episodes: Episodes, create_graph: bool):
        k = episodes.support_pos.shape[1]

        def support_loss(params):
            s = self.scores(params, both)
            return masked_mean(pair_loss(s[:, :k], s[:, k:], self.neural.loss), episodes.support_mask)

        return sgd_steps(fast, support_loss, self.neural.local_steps, self.neural.local_lr, create_graph)

    def episode_loss(self, episodes: Episodes) -> torch.Tensor:
        fast = self.local_update(self.start_params(episodes), self.support_vecs(episodes), episodes, create_graph=not self.neural.first_order)
        s = self.scores(fast, self.net_.embed(torch.cat([episodes.query_pos, episodes.query_neg], 1)))
        return query_loss(s, episodes.query_mask, self.neural.loss).mean()

    def adapt(self, episodes: Episodes, new_users: bool):
        with torch.no_grad():
            start, both = self.start_params(episodes), self.support_vecs(episodes)
        fast = {name: value.clone().requires_grad_(True) for name, value in start.items()}
        with torch.enable_grad():
            fast = self.local_update(fast, both, episodes, create_graph=False)
        return {name: value.detach() for name, value in fast.items()}

    def score_adapted(self, adapted, candidates: torch.Tensor) -> torch.Tensor:
        return self.scores(adapted, self.net_.embed(candidates))


def from_config(config: Config) -> SequenceMeta:
    return SequenceMeta(config.neural, config.tasks)


def variant_of(config: Config) -> str | None:
    """The variant this config runs, as Table 1 labels it; None for the row as its docstring describes it."""
    return departures(config.neural, faithful_early_share=SequenceMeta.default_early_share)
