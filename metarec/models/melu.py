"""MeLU: Meta-Learned User Preference Estimator (Lee, Im, Jang, Cho, Chung; KDD 2019), for implicit feedback.

What we follow (the paper's §3, "user preference estimator" and "meta-optimization";
the authors' code, hoyeoplee/MeLU: ``embeddings.py``, ``MeLU.py``):

- Input: the user embedding is the concatenation of one embedding per user
  content field, the item embedding likewise (the paper's e_p · c_p per field;
  a multi-valued field such as genres is the mean of its values' embeddings,
  as the code divides the genre/actor/director sums by their counts).
- Decision-making layers: x = [user; item] -> ReLU(W1 x + b1) -> ReLU(W2 · + b2)
  -> output layer w_o · + b_o, widths ``neural.hidden`` (MeLU: 64, 64), field
  embeddings of size ``neural.dim`` (MeLU: 32).
- Local update: only the decision and output layers (θ2) adapt, by
  ``neural.local_steps`` gradient steps of rate α = ``neural.local_lr`` on the
  user's support loss (MeLU: one step), from the same global θ2 for every user.
- Global update: every parameter (embeddings θ1 and layers θ2) by Adam on the
  mean over a batch of users of the query loss at each user's adapted θ2.

What we adapted, and why:

- Implicit feedback: the paper regresses 1-5 ratings with MSE. We score
  (positive, negative) pairs with ``neural.loss`` over the same sampled
  negatives our model uses (default BPR: -log σ(s⁺ - s⁻); BCE as an option);
  the output layer's value is a ranking score.
- Episodes as MeLU samples them (``metarec.models.neural.split_episodes``): a
  seeded random split of all a user's interactions into a support of 1..k
  items and up to 10 query items, redrawn every epoch, several episodes per
  user per epoch (MeLU: one fixed random split per user, 10 query items and
  the rest, 3 to 90, the support; ours reach down to one item because a new
  user at n = 1 has shown one).
  Serving adapts on every item the user has shown (MeLU adapts on the whole
  support set); ``neural.serve_k`` (searched) may keep only the last ones.
- Items that had no positive in training are new items: their id embedding
  is the mean of the trained ones (their content fields are theirs).
- Items get an id embedding beside their content fields (``neural.item_ids``):
  our item features are genres and a year, not MeLU's rate/genre/director/actor.
  Without features on a side, that side is its id embedding (new users: the
  mean of the trained user rows), which ``feature_report`` states.
- The meta-gradient is exact: the local update is written with
  ``torch.func.functional_call`` on per-user copies of θ2 that stay in the
  autograd graph (``create_graph=True``), so the query loss differentiates
  through the local step into the embeddings and θ2 (second order). The
  public code copies fast weights in with ``load_state_dict``, which turns
  them into constants and cuts the gradient to the embeddings (its issue #9).
  ``neural.first_order`` drops the second-order terms.
- Batched: B users' copies of θ2 are one (B, ...) tensor per weight;
  ``torch.func.vmap`` runs the MLP of each user on its own items, and one
  ``autograd.grad`` of the summed support losses gives every user its own
  gradient. No Python loop per user.
- Online (the paper has no stream): see ``EpisodicRecommender.observe``; at
  scoring time an existing user's local update runs on its last k
  interactions (``neural.serve_k``, or 50), so the latest ones always count.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, vmap

from metarec.config import Config
from metarec.models.neural import departures, EpisodicRecommender, Episodes, FieldEncoder, expand_params, masked_mean, pair_loss, query_loss, reset_linears, sgd_steps


class MeLUNet(nn.Module):
    """users, items: FieldEncoders; decision: the decision-making and output layers (θ2)."""

    def __init__(self, users: FieldEncoder, items: FieldEncoder, hidden: int) -> None:
        super().__init__()
        self.users = users
        self.items = items
        self.decision = nn.Sequential(
            nn.Linear(users.out_dim + items.out_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1)
        )


class MeLU(EpisodicRecommender):
    name = "melu"

    def build_net(self, n_users: int, n_items: int) -> MeLUNet:
        n, users, items = self.neural, self.side_table("users"), self.side_table("items")
        user_enc = FieldEncoder(users, n_users, n.dim, with_ids=users is None, std=n.init_std, generator=self.generator_)
        item_enc = FieldEncoder(items, n_items, n.dim, with_ids=items is None or n.item_ids, std=n.init_std, generator=self.generator_)
        return reset_linears(MeLUNet(user_enc, item_enc, n.hidden), self.generator_)

    # shapes: fast θ2 (B, ...) per user; user_vec (B, Du); item_vecs (B, C, Di) -> scores (B, C)
    def decide(self, fast: dict[str, torch.Tensor], user_vec: torch.Tensor, item_vecs: torch.Tensor) -> torch.Tensor:
        x = torch.cat([user_vec[:, None, :].expand(-1, item_vecs.shape[1], -1), item_vecs], -1)
        one_user = lambda params, rows: functional_call(self.net_.decision, params, (rows,))  # noqa: E731
        return vmap(one_user)(fast, x)[..., 0]

    def local_update(self, fast, user_vec, pos_vecs, neg_vecs, mask, create_graph: bool):
        """θ2 of each user after ``local_steps`` steps on its support triples (pos/neg vecs (B, k, Di), mask (B, k))."""
        k = pos_vecs.shape[1]
        both = torch.cat([pos_vecs, neg_vecs], 1)

        def support_loss(params):
            scores = self.decide(params, user_vec, both)
            return masked_mean(pair_loss(scores[:, :k], scores[:, k:], self.neural.loss), mask)

        return sgd_steps(fast, support_loss, self.neural.local_steps, self.neural.local_lr, create_graph)

    def episode_loss(self, episodes: Episodes) -> torch.Tensor:
        net = self.net_
        user_vec = net.users(episodes.users)
        theta2 = expand_params(dict(net.decision.named_parameters()), len(episodes))
        fast = self.local_update(theta2, user_vec, net.items(episodes.support_pos), net.items(episodes.support_neg),
                                 episodes.support_mask, create_graph=not self.neural.first_order)
        query = torch.cat([episodes.query_pos, episodes.query_neg], 1)
        scores = self.decide(fast, user_vec, net.items(query))
        return query_loss(scores, episodes.query_mask, self.neural.loss).mean()

    def adapt(self, episodes: Episodes, new_users: bool):
        net, B = self.net_, len(episodes)
        with torch.no_grad():
            user_vec = net.users(episodes.users, all_unknown=new_users)
            pos, neg = net.items(episodes.support_pos), net.items(episodes.support_neg)
        fast = {name: p.detach().unsqueeze(0).repeat(B, *[1] * p.dim()).requires_grad_(True) for name, p in net.decision.named_parameters()}
        with torch.enable_grad():
            fast = self.local_update(fast, user_vec, pos, neg, episodes.support_mask, create_graph=False)
        return user_vec, {name: value.detach() for name, value in fast.items()}

    def score_adapted(self, adapted, candidates: torch.Tensor) -> torch.Tensor:
        user_vec, fast = adapted
        return self.decide(fast, user_vec, self.net_.items(candidates))


def from_config(config: Config) -> MeLU:
    return MeLU(config.neural, config.tasks)


def variant_of(config: Config) -> str | None:
    """The variant this config runs, as Table 1 labels it; None for the row as its docstring describes it."""
    return departures(config.neural)
