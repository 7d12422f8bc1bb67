"""MAMO: Memory-Augmented Meta-Optimization (Dong, Yuan, Yao, Xu, Zhu; KDD 2020), for implicit feedback.

MeLU's setting plus two memories that personalise where each user's local
update starts. What we follow (the paper's §4, "memory-augmented
meta-optimization", and the authors' code, dongmanqing/Code-for-MAMO:
``modules/memories.py``, ``modules/rec_model.py``, ``models.py``, ``mamoRec.py``):

- Profiles and embeddings: p_u, p_i are the concatenated field embeddings of
  the user's and the item's side features (the code's "input loading");
  e_u = f_{θ_u}(p_u) and e_i = f_{θ_i}(p_i) are two-layer networks
  (in -> in/2 -> d, leaky ReLU, as the code's UserEmbedding/ItemEmbedding).
- Recommendation model θ_r: the "memory layer" x -> M_{u,I} x + b on
  x = [e_u; e_i] (its weight is the user's preference memory, below), then
  Linear(2d, d) + leaky ReLU, then the output layer.
- Feature-specific memory (the user profile memory M_P, K x |p_u|, and the
  user embedding memory M_U, K x |θ_u|): attention
  a_u = softmax_k(cos(p_u, M_P[k])), the personalised bias term
  b_u = a_uᵀ M_U, and the personalised initialisation θ_u = φ_u - τ b_u
  (θ_i = φ_i, θ_r = φ_r).
- Task-specific memory (the preference memory cube M_{U,I}, K x 2d x 2d):
  M_{u,I} = Σ_k a_uk M_{U,I}[k], the fast weight of the memory layer.
- Local update: θ_u, θ_i, θ_r and M_{u,I} by ``neural.local_steps`` gradient
  steps of rate ρ = ``neural.local_lr`` on the support loss.
- Global update: φ by the query-loss gradient at the adapted parameters,
  first order as in the paper's algorithm (the row fixes ``neural.first_order``).
- Memory writes after each global update, with the paper's rates:
  M_P ← α a_u p_uᵀ + (1 - α) M_P; M_U ← β a_u ⊗ ∇_{θ_u}L + (1 - β) M_U
  (∇_{θ_u}L: the user's query-loss gradient at its adapted θ_u);
  M_{U,I} ← γ a_u ⊗ M_{u,I} + (1 - γ) M_{U,I} (the adapted M_{u,I}).

What we adapted, and why:

- Implicit feedback: the paper classifies ratings (softmax over the rating
  values); we score (positive, negative) pairs with ``neural.loss`` over the
  same sampled negatives as our model (default BPR), one output logit.
- Batching: the paper writes the memories after every user, one at a time;
  we adapt B users at once and write the batch mean of the per-user write
  terms (α·mean_b a_b p_bᵀ, ...) after each global update. No Python loop
  per user: per-user parameter copies (B, ...) run through
  ``torch.func.functional_call`` under ``vmap``.
- Attention is the softmax of the cosine similarities, as the paper writes;
  the code passes them through a linear layer created afresh (untrained) at
  every read, which we do not copy. M_{U,I}'s slots start at the default
  scale of a linear layer (U(±1/√2d)) rather than N(0, 1), which saturates.
- The field embeddings are trained by the global update (the code never
  resets them and lets the local optimiser drift them).
- Local steps are plain gradient descent (the paper's rule; the code uses
  Adam within a user). Episodes are MAMO's (and MeLU's) random split of each
  user's interactions into support and query sets, with supports down to one
  item (``metarec.models.neural.split_episodes``); serving adapts on every
  shown item. Features, id fallback (items without a training positive are
  new items: the mean id row) and the online rule are those of
  ``metarec.models.neural``; a new user's profile (its features, or the
  mean id row without features) reads the memories, which are never written
  while serving.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from metarec.config import Config
from metarec.models.neural import departures, EpisodicRecommender, Episodes, FieldEncoder, expand_params, masked_mean, pair_loss, query_loss, reset_linears, sgd_steps

MEMORY = "memory_weight"  # the key of M_{u,I} among a user's local parameters


def _tower(in_dim: int, out_dim: int) -> nn.Sequential:
    """MAMO's embedding network with n_layer = 2: in -> in/2 -> out, leaky ReLU after each."""
    hidden = max(in_dim // 2, 1)
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.LeakyReLU(), nn.Linear(hidden, out_dim), nn.LeakyReLU())


class MAMOScorer(nn.Module):
    """θ_u (user_emb), θ_i (item_emb), θ_r (memory-layer bias, hidden, out): one user's scores of C items."""

    def __init__(self, user_dim: int, item_dim: int, dim: int) -> None:
        super().__init__()
        self.user_emb = _tower(user_dim, dim)
        self.item_emb = _tower(item_dim, dim)
        self.memory_bias = nn.Parameter(torch.zeros(2 * dim))
        self.hidden = nn.Linear(2 * dim, dim)
        self.out = nn.Linear(dim, 1)

    def forward(self, profile: torch.Tensor, item_profiles: torch.Tensor, memory_weight: torch.Tensor) -> torch.Tensor:
        """profile (Du,), item_profiles (C, Di), memory_weight (2d, 2d) -> (C,)."""
        e_u = self.user_emb(profile)
        e_i = self.item_emb(item_profiles)
        x = torch.cat([e_u.expand(e_i.shape[0], -1), e_i], -1)
        h = x @ memory_weight.T + self.memory_bias
        return self.out(F.leaky_relu(self.hidden(h)))[..., 0]


class MAMONet(nn.Module):
    def __init__(self, users: FieldEncoder, items: FieldEncoder, dim: int, slots: int, generator: torch.Generator) -> None:
        super().__init__()
        self.users = users
        self.items = items
        self.scorer = reset_linears(MAMOScorer(users.out_dim, items.out_dim, dim), generator)
        n_theta_u = sum(p.numel() for p in self.scorer.user_emb.parameters())
        bound = 1.0 / (2 * dim) ** 0.5
        self.register_buffer("profile_memory", torch.randn(slots, users.out_dim, generator=generator))  # M_P
        self.register_buffer("user_memory", torch.randn(slots, n_theta_u, generator=generator) * 0.05)  # M_U
        self.register_buffer("preference_memory", (torch.rand(slots, 2 * dim, 2 * dim, generator=generator) * 2 - 1) * bound)  # M_UI


class MAMO(EpisodicRecommender):
    name = "mamo"
    _written: tuple | None = None  # what the last episode_loss leaves for after_step's memory writes

    def build_net(self, n_users: int, n_items: int) -> MAMONet:
        n, users, items = self.neural, self.side_table("users"), self.side_table("items")
        user_enc = FieldEncoder(users, n_users, n.dim, with_ids=users is None, std=n.init_std, generator=self.generator_)
        item_enc = FieldEncoder(items, n_items, n.dim, with_ids=items is None or n.item_ids, std=n.init_std, generator=self.generator_)
        return MAMONet(user_enc, item_enc, n.dim, n.memory_slots, self.generator_)

    # ---- the memories (reads)
    def attention(self, profiles: torch.Tensor) -> torch.Tensor:
        """a_u = softmax_k cos(p_u, M_P[k]): (B, Du) -> (B, K)."""
        return torch.softmax(F.cosine_similarity(profiles[:, None, :], self.net_.profile_memory[None], dim=-1, eps=1e-5), -1)

    def initial_params(self, attention: torch.Tensor, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each user's starting point: θ_u = φ_u - τ b_u with b_u = a_uᵀ M_U; M_{u,I} = Σ_k a_uk M_{U,I}[k]; the rest φ."""
        fast = expand_params(params, len(attention))
        bias = attention @ self.net_.user_memory  # (B, |θ_u|)
        offset = 0
        for name in self._user_param_names():
            size = params[name].numel()
            fast[name] = fast[name] - self.neural.memory_tau * bias[:, offset : offset + size].view(-1, *params[name].shape)
            offset += size
        fast[MEMORY] = torch.einsum("bk,kij->bij", attention, self.net_.preference_memory)
        return fast

    def _user_param_names(self) -> list[str]:
        return [f"user_emb.{name}" for name, _ in self.net_.scorer.user_emb.named_parameters()]

    # ---- scoring one batch of users with their own parameters
    # shapes: fast (B, ...); profiles (B, Du); item_profiles (B, C, Di) -> (B, C)
    def scores(self, fast: dict[str, torch.Tensor], profiles: torch.Tensor, item_profiles: torch.Tensor) -> torch.Tensor:
        params = {name: value for name, value in fast.items() if name != MEMORY}
        one_user = lambda p, profile, items, memory: functional_call(self.net_.scorer, p, (profile, items, memory))  # noqa: E731
        return vmap(one_user)(params, profiles, item_profiles, fast[MEMORY])

    def local_update(self, fast, profiles, pos, neg, mask, create_graph: bool):
        k = pos.shape[1]
        both = torch.cat([pos, neg], 1)

        def support_loss(params):
            s = self.scores(params, profiles, both)
            return masked_mean(pair_loss(s[:, :k], s[:, k:], self.neural.loss), mask)

        return sgd_steps(fast, support_loss, self.neural.local_steps, self.neural.local_lr, create_graph)

    # ---- training
    def episode_loss(self, episodes: Episodes) -> torch.Tensor:
        net = self.net_
        profiles = net.users(episodes.users)
        attention = self.attention(profiles)
        fast = self.initial_params(attention, dict(net.scorer.named_parameters()))
        fast = self.local_update(fast, profiles, net.items(episodes.support_pos), net.items(episodes.support_neg),
                                 episodes.support_mask, create_graph=not self.neural.first_order)
        s = self.scores(fast, profiles, net.items(torch.cat([episodes.query_pos, episodes.query_neg], 1)))
        query = query_loss(s, episodes.query_mask, self.neural.loss)
        names = self._user_param_names()
        grads = torch.autograd.grad(query.sum(), [fast[n] for n in names], retain_graph=True)
        self._written = (attention.detach(), profiles.detach(), torch.cat([g.flatten(1) for g in grads], 1).detach(), fast[MEMORY].detach())
        return query.mean()

    @torch.no_grad()
    def after_step(self) -> None:
        """The memory writes, batch means of the paper's per-user terms (module docstring)."""
        if self._written is None:
            return
        attention, profiles, user_grads, preference = self._written
        n, net, B = self.neural, self.net_, len(attention)
        net.profile_memory.mul_(1 - n.memory_alpha).add_(attention.T @ profiles / B, alpha=n.memory_alpha)
        net.user_memory.mul_(1 - n.memory_beta).add_(attention.T @ user_grads / B, alpha=n.memory_beta)
        net.preference_memory.mul_(1 - n.memory_gamma).add_(torch.einsum("bk,bij->kij", attention, preference) / B, alpha=n.memory_gamma)
        self._written = None

    # ---- serving (the memories are read, never written)
    def adapt(self, episodes: Episodes, new_users: bool):
        net = self.net_
        with torch.no_grad():
            profiles = net.users(episodes.users, all_unknown=new_users)
            pos, neg = net.items(episodes.support_pos), net.items(episodes.support_neg)
            start = self.initial_params(self.attention(profiles), {name: p.detach() for name, p in net.scorer.named_parameters()})
        fast = {name: value.clone().requires_grad_(True) for name, value in start.items()}
        with torch.enable_grad():
            fast = self.local_update(fast, profiles, pos, neg, episodes.support_mask, create_graph=False)
        return profiles, {name: value.detach() for name, value in fast.items()}

    def score_adapted(self, adapted, candidates: torch.Tensor) -> torch.Tensor:
        profiles, fast = adapted
        return self.scores(fast, profiles, self.net_.items(candidates))


def from_config(config: Config) -> MAMO:
    return MAMO(config.neural, config.tasks)


def variant_of(config: Config) -> str | None:
    """The variant this config runs, as Table 1 labels it; None for the row as its docstring describes it."""
    return departures(config.neural, faithful_first_order=True)
