"""What the neural meta-learning rows share (MeLU, MAMO, the prototype recommender, MetaHIN, sequence_meta).

- ``FieldEncoder``: an entity (user or item) as the concatenation of its
  feature fields' embeddings (each field the mean of its values' embeddings,
  so genres and age look alike), plus an optional id embedding. Ids the model
  has not trained as a positive (users without history, items that were only
  ever negatives, ids beyond the table) get the mean row of the known ones
  (docs/method.md §7's rule, without the noise, so scores are deterministic; the
  baselines score such rows the same way); their feature fields stay theirs.
- ``Episodes`` and ``split_episodes``: the papers' tasks. Each epoch every
  user with two or more interactions gives ``neural.episodes_per_user``
  episodes, each a fresh seeded random split of all its interactions: a
  support of s items, s uniform in 1..tasks.k (so one-item supports, the
  n = 1 question, occur), and the next ``neural.query_items`` as queries, each
  positive with a sampled negative the user never had. ``neural.early_share``
  of them are "first s, then the next ones" in time instead (the new-user
  test's question; 0 for the papers' rows). Supports keep the user's time
  order. The stream's online episodes are ``Episodes.from_tasks`` of
  ``meta_tasks.stream_tasks`` (the user's last k, then the new item).
- ``pair_loss``: implicit feedback over the same sampled negatives, BPR or BCE.
- ``EpisodicRecommender``: the ``StreamingRecommender`` shell. ``fit`` runs
  epochs of global updates (Adam on the mean query loss of a batch of
  episodes, ``episode_loss``), calling ``on_epoch(epoch, model)`` after each
  when given; serving builds each user's support from its shown items (all a
  new user has shown, as the papers adapt on the whole support set, or the
  last ``neural.serve_k``; an existing user's last ``neural.serve_k`` or 50 in
  the index), runs the model's ``adapt`` for many users at once and scores with
  ``score_adapted``; the model never changes while serving. ``observe``
  (online rule, the papers have none): grow the id tables, index the batch —
  so later scores adapt from each user's latest interactions — and take one
  global update per ``batch_tasks`` stream episodes (one per new interaction of
  a user with a past, ``meta_tasks.stream_tasks``), as our §7 does; an id
  seen for the first time starts from the known mean + noise.

Pure: no files; side features arrive through ``set_features`` and are kept
in the saved state (``state_arrays``), so load → score needs nothing else.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, fields
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from metarec.config import NeuralConfig, TaskConfig
from metarec.features import NO_FEATURES, Features, FeatureTable
from metarec.interface import Interactions, OnEpoch, RecentItems, StreamingRecommender, fitted_copy
from metarec.maml import DivergedError
from metarec.meta_tasks import TaskArrays, stream_tasks
from metarec.models.common import check_ids
from metarec.neighbours import InteractionIndex

logger = logging.getLogger(__name__)

EXISTING_SUPPORT = 50  # an existing user's support when neural.serve_k is None: its last 50 interactions (a long history adds memory, not signal)
SCORE_BUDGET = 1 << 16  # (user, candidate) pairs scored at once: bounds the (B, C, D) input of an MLP scorer


def departures(neural: NeuralConfig, faithful_first_order: bool = False, pooling: bool = False, faithful_early_share: float = 0.0) -> str | None:
    """Table 1's variant label for a neural row run away from its paper's setting (None: the row as documented)."""
    parts = []
    if neural.early_share is not None and neural.early_share != faithful_early_share:
        parts.append(f"{neural.early_share:.2g} early episodes")
    if neural.serve_k is not None:
        parts.append(f"serves on the last {neural.serve_k} shown")
    if neural.first_order != faithful_first_order:
        parts.append("first order" if neural.first_order else "second order")
    if neural.local_steps == 0 and not pooling:
        parts.append("no local update")
    if not neural.use_features:
        parts.append("ids only")
    if pooling and neural.pooling != "mean":
        parts.append(f"{neural.pooling} pooling")
    return ", ".join(parts) or None


# ---------------------------------------------------------------- inputs
class FieldEncoder(nn.Module):
    """Entities -> (..., out_dim): F feature-field vectors (mean of each field's value embeddings), then an id vector.

    ``table`` None = no features (ids only). Ids beyond the feature table have every field missing
    (zeros); ids beyond the id table, and ids not ``known`` (never seen in training or the stream),
    get the mean id row of the known ones.
    """

    def __init__(self, table: FeatureTable | None, n_ids: int, dim: int, with_ids: bool, std: float, generator: torch.Generator) -> None:
        super().__init__()
        self.dim = dim
        self.n_fields = table.n_fields if table is not None else 0
        codes = table.codes if table is not None else np.zeros((0, 1), np.int64)
        slot_field = table.slot_fields() if table is not None else np.zeros((0, 1), np.int64)
        self.register_buffer("codes", torch.as_tensor(codes, dtype=torch.int64))
        self.register_buffer("slot_field", torch.as_tensor(slot_field, dtype=torch.int64))
        n_codes = table.n_codes if table is not None else 0
        self.code_emb = nn.Parameter(torch.randn(n_codes, dim, generator=generator) * std)
        self.with_ids = with_ids
        self.id_emb = nn.Parameter(torch.randn(n_ids if with_ids else 0, dim, generator=generator) * std)
        self.register_buffer("known", torch.ones(n_ids if with_ids else 0, dtype=torch.bool))

    @property
    def out_dim(self) -> int:
        return (self.n_fields + int(self.with_ids)) * self.dim

    @property
    def n_ids(self) -> int:
        return int(self.id_emb.shape[0])

    def fields_of(self, ids: torch.Tensor) -> torch.Tensor:
        """(..., F·d): each field the mean of its values' embeddings; a missing field is zeros."""
        inside = ids < self.codes.shape[0]
        rows = torch.where(inside, ids, torch.zeros_like(ids))
        codes, slot_field = self.codes[rows], self.slot_field[rows]  # (..., S)
        slot_field = torch.where(inside[..., None], slot_field, torch.full_like(slot_field, self.n_fields))
        emb = self.code_emb[codes.clamp(min=0)]  # (..., S, d)
        which = F.one_hot(slot_field, self.n_fields + 1)[..., : self.n_fields].to(emb.dtype)  # (..., S, F)
        summed = torch.einsum("...sf,...sd->...fd", which, emb)
        count = which.sum(-2).clamp(min=1.0)[..., None]
        return (summed / count).flatten(-2)

    def ids_of(self, ids: torch.Tensor, all_unknown: bool = False) -> torch.Tensor:
        """(..., d) id rows; unknown ids (beyond the table, not ``known``, or all when ``all_unknown``) get the known mean."""
        known_rows = self.id_emb[self.known] if bool(self.known.any()) else self.id_emb
        mean = known_rows.mean(0) if len(known_rows) else self.id_emb.new_zeros(self.dim)
        inside = ids < self.n_ids
        rows = torch.where(inside, ids, torch.zeros_like(ids))
        use = inside & self.known[rows] if self.n_ids else torch.zeros_like(ids, dtype=torch.bool)
        if all_unknown:
            use = torch.zeros_like(use)
        picked = self.id_emb[rows] if self.n_ids else mean.expand(*ids.shape, self.dim)
        return torch.where(use[..., None], picked, mean)

    def forward(self, ids: torch.Tensor, all_unknown: bool = False) -> torch.Tensor:
        parts = []
        if self.n_fields:
            parts.append(self.fields_of(ids))
        if self.with_ids:
            parts.append(self.ids_of(ids, all_unknown))
        return torch.cat(parts, -1)


def reset_linears(module: nn.Module, generator: torch.Generator) -> nn.Module:
    """Every nn.Linear inside drawn again from ``generator``: U(±1/√fan_in), the bound of torch's default init,
    so a model's initial weights depend on its seed only, not on the global generator."""
    with torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, nn.Linear):
                bound = 1.0 / math.sqrt(max(layer.in_features, 1))
                layer.weight.uniform_(-bound, bound, generator=generator)
                if layer.bias is not None:
                    layer.bias.uniform_(-bound, bound, generator=generator)
    return module


def grow_parameter(owner: nn.Module, name: str, extra: torch.Tensor, optimizer: torch.optim.Optimizer | None) -> None:
    """Append rows ``extra`` to parameter ``owner.name``; its Adam moments get zero rows (the optimizer keeps it)."""
    old = getattr(owner, name)
    new = nn.Parameter(torch.cat([old.detach(), extra.to(old.dtype)]))
    if optimizer is not None:
        state = optimizer.state.pop(old, None)
        for group in optimizer.param_groups:
            group["params"] = [new if p is old else p for p in group["params"]]
        if state:
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key] = torch.cat([state[key], state[key].new_zeros(len(extra), *state[key].shape[1:])])
            optimizer.state[new] = state
    setattr(owner, name, new)


def grow_encoder(encoder: FieldEncoder, n_ids: int, std: float, generator: torch.Generator, optimizer) -> None:
    """Id table up to ``n_ids`` rows: new rows are the known mean + N(0, std²) (§7), not yet known."""
    extra = n_ids - encoder.n_ids
    if not encoder.with_ids or extra <= 0:
        return
    with torch.no_grad():
        base = encoder.id_emb[encoder.known] if bool(encoder.known.any()) else encoder.id_emb
        mean = base.mean(0, keepdim=True) if len(base) else encoder.id_emb.new_zeros(1, encoder.dim)
        rows = mean + torch.randn(extra, encoder.dim, generator=generator) * std
    grow_parameter(encoder, "id_emb", rows, optimizer)
    encoder.known = torch.cat([encoder.known, torch.zeros(extra, dtype=torch.bool)])


def renew_rows(encoder: FieldEncoder, ids: np.ndarray, std: float, generator: torch.Generator, optimizer) -> None:
    """Ids seen for the first time (not yet ``known``) start from the known mean + N(0, std²) (§7) with fresh Adam
    moments, not from a row left at its random start or pushed down as a negative; then they are known."""
    ids = torch.as_tensor(np.asarray(ids, dtype=np.int64))
    ids = ids[(ids >= 0) & (ids < encoder.n_ids)]
    fresh = ids[~encoder.known[ids]]
    if len(fresh):
        with torch.no_grad():
            base = encoder.id_emb[encoder.known] if bool(encoder.known.any()) else encoder.id_emb
            encoder.id_emb[fresh] = base.mean(0, keepdim=True) + torch.randn(len(fresh), encoder.dim, generator=generator) * std
        for moment in (optimizer.state.get(encoder.id_emb, {}) if optimizer is not None else {}).values():
            if torch.is_tensor(moment) and moment.dim() == 2:
                moment[fresh] = 0.0
    encoder.known[ids] = True


# ---------------------------------------------------------------- episodes and loss
@dataclass(frozen=True)
class Episodes:
    """B episodes. users (B,); support_pos, support_neg (B, S) the user's own items (chronological, left-aligned) and
    their negatives, support_mask (B, S) 1 for a real triple; query_pos, query_neg (B, Q), query_mask (B, Q)."""

    users: torch.Tensor
    support_pos: torch.Tensor
    support_neg: torch.Tensor
    support_mask: torch.Tensor
    query_pos: torch.Tensor
    query_neg: torch.Tensor
    query_mask: torch.Tensor

    @classmethod
    def from_tasks(cls, tasks: TaskArrays, k: int) -> "Episodes":
        """The task user's own k support columns (columns < k are its own, docs/method.md §4) and its one query triple."""
        as_t = lambda a: torch.as_tensor(np.ascontiguousarray(a), dtype=torch.int64)  # noqa: E731
        return cls(as_t(tasks.query_user), as_t(tasks.support_pos[:, :k]), as_t(tasks.support_neg[:, :k]),
                   torch.ones(len(tasks), k), as_t(tasks.query_pos[:, None]), as_t(tasks.query_neg[:, None]), torch.ones(len(tasks), 1))

    def __len__(self) -> int:
        return int(self.users.shape[0])

    def take(self, index) -> "Episodes":
        return Episodes(*(getattr(self, f.name)[index] for f in fields(self)))


def split_episodes(index: InteractionIndex, k: int, queries: int, per_user: int, early_share: float,
                   rng: np.random.Generator, n_items: int) -> Episodes:
    """``per_user`` episodes of every user with >= 2 interactions, each a seeded split of all its interactions.

    As MeLU and MAMO build a user's task: the user's items in a random order, the first s the support
    (s uniform in 1..min(k, m - 1), so one-item supports, a new user at n = 1, occur) and the next
    min(queries, m - s) the query. An ``early_share`` of the episodes ask the test's question instead:
    the support is the user's first s interactions and the query the ones that follow in time. The
    support keeps the user's chronological order (sequence models read it). One negative per positive,
    uniform over the items the user never had in the index (a random split has no "by then").
    """
    counts = np.diff(index.user_ptr_)
    owners = np.repeat(np.flatnonzero(counts >= 2), per_user)
    E, m = len(owners), counts[owners]
    width = max(1, min(k, int(m.max()) - 1 if E else 1))
    s = 1 + np.floor(rng.random(E) * np.minimum(k, m - 1)).astype(np.int64)
    q = np.minimum(queries, m - s)
    early = rng.random(E) < early_share
    element_episode = np.repeat(np.arange(E), m)
    first = np.cumsum(m) - m
    position = np.arange(len(element_episode)) - first[element_episode]  # chronological position in the user's timeline
    key = np.where(early[element_episode], position / m[element_episode], rng.random(len(element_episode)))
    order = np.lexsort((key, element_episode))
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order)) - first[element_episode[order]]
    item = index.user_items_[index.user_ptr_[owners][element_episode] + position]

    def gather(chosen: np.ndarray, sizes: np.ndarray, cols: int, by: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        at = np.flatnonzero(chosen)
        at = at[np.lexsort((by[at], element_episode[at]))]
        episode = element_episode[at]
        col = np.arange(len(at)) - (np.cumsum(sizes) - sizes)[episode]
        out = np.zeros((E, cols), dtype=np.int64)
        mask = np.zeros((E, cols), dtype=np.float32)
        out[episode, col], mask[episode, col] = item[at], 1.0
        return out, mask

    s_pos, s_mask = gather(rank < s[element_episode], s, width, position)
    q_pos, q_mask = gather((rank >= s[element_episode]) & (rank < (s + q)[element_episode]), q, max(1, queries), rank)
    s_neg = index.sample_negatives(np.repeat(owners[:, None], width, 1), rng, n_items)
    q_neg = index.sample_negatives(np.repeat(owners[:, None], q_pos.shape[1], 1), rng, n_items)
    as_t = lambda a: torch.as_tensor(a)  # noqa: E731
    return Episodes(as_t(owners), as_t(s_pos), as_t(s_neg), as_t(s_mask), as_t(q_pos), as_t(q_neg), as_t(q_mask))


def pack_recent(recent: np.ndarray, width: int | None) -> np.ndarray:
    """(B, j) items (-1 = padding) -> (B, w): each row's valid items in order, left-aligned, its last ``width`` of
    them (None: all); w = the most any row keeps (at least 1)."""
    recent = np.asarray(recent, dtype=np.int64)
    packed = np.take_along_axis(recent, np.argsort(recent < 0, axis=1, kind="stable"), axis=1)
    n_valid = (recent >= 0).sum(1)
    keep = n_valid if width is None else np.minimum(n_valid, width)
    w = max(1, int(keep.max()) if len(keep) else 1)
    cols = (n_valid - keep)[:, None] + np.arange(w)[None, :]
    out = np.take_along_axis(np.pad(packed, ((0, 0), (0, w))), np.minimum(cols, packed.shape[1] + w - 1), axis=1)
    return np.where(np.arange(w)[None, :] < keep[:, None], out, -1)


def pair_loss(s_pos: torch.Tensor, s_neg: torch.Tensor, kind: str) -> torch.Tensor:
    """Per (positive, negative) pair: bpr = -log σ(s⁺ - s⁻); bce = -log σ(s⁺) - log(1 - σ(s⁻)). Unreduced."""
    if kind == "bpr":
        return F.softplus(s_neg - s_pos)
    return F.softplus(-s_pos) + F.softplus(s_neg)


def masked_mean(loss: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, k) -> (B,): the mean over each row's real triples (0 for a row without any)."""
    return (loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)


def query_loss(scores: torch.Tensor, mask: torch.Tensor, kind: str) -> torch.Tensor:
    """(B, 2Q) scores of the query positives then their negatives -> (B,) each episode's mean pair loss."""
    q = mask.shape[1]
    return masked_mean(pair_loss(scores[:, :q], scores[:, q:], kind), mask)


def expand_params(params: dict[str, torch.Tensor], batch: int) -> dict[str, torch.Tensor]:
    """One view of each global parameter per user, (B, ...): the local update's starting point, still tied to Θ."""
    return {name: p.unsqueeze(0).expand(batch, *p.shape) for name, p in params.items()}


def sgd_steps(fast: dict[str, torch.Tensor], support_loss, steps: int, lr: float, create_graph: bool) -> dict[str, torch.Tensor]:
    """``steps`` local steps θ ← θ - lr ∇ Σ_b L_b(θ_b) on per-user parameters (B, ...): user b's gradient is its own.

    ``create_graph`` keeps the steps differentiable (second-order meta-gradient); else each step's
    gradient is a constant (first order, or serving).
    """
    for _ in range(steps):
        names = list(fast)
        loss = support_loss(fast).sum()
        grads = torch.autograd.grad(loss, [fast[n] for n in names], create_graph=create_graph, retain_graph=True, allow_unused=True)
        fast = {n: fast[n] if g is None else fast[n] - lr * g for n, g in zip(names, grads)}
    return fast


# ---------------------------------------------------------------- the shell
class EpisodicRecommender(StreamingRecommender):
    """Fit = global updates on episodes; serve = adapt many users at once from their recent items, then score.

    Subclasses implement ``build_net``, ``episode_loss``, ``adapt`` and ``score_adapted`` (and may
    implement ``after_step``); ``feature_sides`` names the sides whose features the model reads.
    """

    name = "episodic"
    feature_sides: tuple[str, ...] = ("users", "items")
    default_early_share = 0.0  # the papers' random split; a row that reads order (sequence_meta) asks for early episodes

    def __init__(self, neural: NeuralConfig | None = None, tasks: TaskConfig | None = None) -> None:
        self.neural = neural or NeuralConfig()
        self.tasks = tasks or TaskConfig()
        self.features_: Features = NO_FEATURES
        self.net_: nn.Module | None = None
        self.optimizer_: torch.optim.Adam | None = None
        self.index_: InteractionIndex | None = None
        self.generator_ = torch.Generator().manual_seed(self.neural.seed)
        self.online_steps_ = 0
        self.sizes_ = (0, 0)

    # ---- subclass hooks
    def build_net(self, n_users: int, n_items: int) -> nn.Module:  # pragma: no cover - abstract
        raise NotImplementedError

    def episode_loss(self, episodes: Episodes) -> torch.Tensor:  # pragma: no cover - abstract
        """The mean query loss after each user's local update, differentiable in the global parameters."""
        raise NotImplementedError

    def after_step(self) -> None:
        """Called after every global update (MAMO writes its memories here)."""

    def adapt(self, episodes: Episodes, new_users: bool) -> Any:  # pragma: no cover - abstract
        """Per-user adapted state from the support in ``episodes`` (the query fields are unused). Θ unchanged."""
        raise NotImplementedError

    def score_adapted(self, adapted: Any, candidates: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def encoders(self) -> dict[str, FieldEncoder]:
        """The id-bearing encoders by side ("users", "items"), for growth and bookkeeping."""
        return {side: getattr(self.net_, side) for side in ("users", "items") if isinstance(getattr(self.net_, side, None), FieldEncoder)}

    # ---- features
    def set_features(self, features: Features) -> None:
        self.features_ = features if self.neural.use_features else NO_FEATURES

    def side_table(self, side: str) -> FeatureTable | None:
        return getattr(self.features_, side) if side in self.feature_sides else None

    def feature_report(self) -> dict:
        missing = [side for side in self.feature_sides if getattr(self.features_, side) is None]
        used = [side for side in self.feature_sides if side not in missing]
        described = self.features_.describe()
        note = "uses " + ", ".join(f"{side[:-1]} features ({', '.join(described[side[:-1] + '_fields'])})" for side in used) if used else "uses no side features"
        if missing:
            why = "turned off (neural.use_features = false)" if not self.neural.use_features else "the data set has none"
            note += f"; falls back to id embeddings for {' and '.join(missing)} ({why})"
        return {"uses_features": bool(used), "fallback": bool(missing), **described, "note": note}

    # ---- sizes
    @property
    def n_items_(self) -> int:  # type: ignore[override]
        return self.sizes_[1]

    @property
    def n_users_(self) -> int:
        return self.sizes_[0]

    def _fresh(self, n_users: int, n_items: int) -> None:
        self.sizes_ = (n_users, n_items)
        self.net_ = self.build_net(n_users, n_items)
        self.optimizer_ = torch.optim.Adam(self.net_.parameters(), lr=self.neural.outer_lr)

    # ---- training
    def early_share(self) -> float:
        """The share of first-s-then-next episodes: ``neural.early_share``, else the row's own default."""
        return self.neural.early_share if self.neural.early_share is not None else self.default_early_share

    def training_episodes(self, epoch: int) -> Episodes:
        """The epoch's episodes: a fresh seeded split of every user's interactions (``split_episodes``)."""
        n, rng = self.neural, np.random.default_rng([self.neural.seed, epoch, 4])
        return split_episodes(self.index_, self.tasks.k, n.query_items, n.episodes_per_user, self.early_share(), rng, self.n_items_)

    def fit(self, history: Interactions, on_epoch: OnEpoch | None = None) -> "EpisodicRecommender":
        """``neural.epochs`` passes of global updates, each over a fresh split into episodes (DivergedError on NaN/Inf).

        ``on_epoch(passes, model)`` runs after each epoch with a lazy copy of the model as fit would return it then
        (a tuner's pruning hook; it may raise to stop). Items without a positive in the history are new items
        afterwards (``mark_known``).
        """
        self.index_ = InteractionIndex.build(history)
        user_table, item_table = self.features_.users, self.features_.items
        n_users = max(history.n_users, user_table.n_entities if user_table is not None else 0)
        n_items = max(history.n_items, item_table.n_entities if item_table is not None else 0)
        self._fresh(n_users, n_items)
        users = self.encoders().get("users")
        if users is not None and users.with_ids:  # a user id row is trained only when the user has history
            users.known = torch.zeros(users.n_ids, dtype=torch.bool)
            users.known[torch.as_tensor(np.unique(history.users))] = True
        for epoch in range(self.neural.epochs):
            episodes = self.training_episodes(epoch)
            loss = self.train_episodes(episodes, np.random.default_rng([self.neural.seed, epoch, 2]))
            logger.info("%s epoch %d: query loss %.4f over %d episodes", self.name, epoch, loss, len(episodes))
            if on_epoch is not None:
                on_epoch(epoch + 1, fitted_copy(self, lambda model: model.mark_known(history)))
        self.mark_known(history)
        return self

    def mark_known(self, history: Interactions) -> None:
        """Id rows trained as a positive (users: any interaction; items: a positive) are known; the others are
        scored as the known rows' mean, as ours and the baselines score new ids (docs/method.md §7, §11)."""
        for side, ids in (("users", history.users), ("items", history.items)):
            encoder = self.encoders().get(side)
            if encoder is not None and encoder.with_ids:
                encoder.known = torch.zeros(encoder.n_ids, dtype=torch.bool)
                encoder.known[torch.as_tensor(np.unique(ids))] = True

    def train_episodes(self, episodes: Episodes, rng: np.random.Generator | None) -> float:
        """One pass of global updates over ``episodes`` (shuffled by ``rng``); the mean query loss."""
        order = rng.permutation(len(episodes)) if rng is not None else np.arange(len(episodes))
        total = 0.0
        for start in range(0, len(order), self.neural.batch_tasks):
            part = episodes.take(torch.as_tensor(order[start : start + self.neural.batch_tasks]))
            total += self.global_update(part) * len(part)
        return total / max(len(order), 1)

    def global_update(self, episodes: Episodes) -> float:
        """One Adam step on the mean query loss of ``episodes``; Θ untouched and DivergedError on NaN/Inf."""
        self.optimizer_.zero_grad(set_to_none=True)
        self.net_.train()
        loss = self.episode_loss(episodes)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise DivergedError(f"{self.name}: query loss is {value}")
        loss.backward()
        clip = self.neural.grad_clip if self.neural.grad_clip is not None else math.inf
        norm = float(torch.nn.utils.clip_grad_norm_(self.net_.parameters(), clip))
        if not math.isfinite(norm):
            raise DivergedError(f"{self.name}: gradient norm is {norm} (query loss {value})")
        self.optimizer_.step()
        self.after_step()
        return value

    # ---- serving
    def _require_fitted(self) -> None:
        if self.net_ is None or self.index_ is None:
            raise RuntimeError(f"{self.name}: call fit(history) before scoring or observing")

    def _serving_rng(self, tag: int, users: np.ndarray) -> np.random.Generator:
        """Per-call generator: the same call gives the same scores; the model's own state is untouched."""
        return np.random.default_rng([self.neural.seed, tag, len(users), int(np.asarray(users, dtype=np.int64).sum()) & 0x7FFFFFFF])

    def support(self, users: np.ndarray, recent: np.ndarray, rng: np.random.Generator) -> Episodes:
        """Episodes whose support is each user's recent items (B, n) (-1 = padding), all of them or the last
        ``neural.serve_k``, in order and masked, each with a negative the user never had nor was shown.
        Items the model never trained on stay: they are new items (mean id row) with their features."""
        pos = pack_recent(recent, self.neural.serve_k)
        mask = (pos >= 0).astype(np.float32)
        owners = np.repeat(np.asarray(users, dtype=np.int64)[:, None], pos.shape[1], axis=1)
        neg = self.index_.sample_negatives(owners, rng, max(self.n_items_, 1), exclude=np.repeat(recent[:, None, :], pos.shape[1], axis=1))
        zeros = torch.zeros(len(users), 1, dtype=torch.int64)
        return Episodes(torch.as_tensor(users, dtype=torch.int64), torch.as_tensor(np.maximum(pos, 0)), torch.as_tensor(neg),
                        torch.as_tensor(mask), zeros, zeros, torch.zeros(len(users), 1))

    def _score_users(self, users: np.ndarray, recent: np.ndarray, candidates: np.ndarray, tag: int, new_users: bool) -> np.ndarray:
        self._require_fitted()
        users = check_ids(self, "users", users)
        candidates = check_ids(self, "candidates", candidates)
        recent = check_ids(self, "recent items", recent, allow_padding=True)
        if candidates.ndim != 2 or len(candidates) != len(users):
            raise ValueError(f"{self.name}: candidates {candidates.shape} must have one row per user ({users.shape})")
        recent = recent.reshape(len(users), recent.shape[-1] if recent.ndim == 2 else -1)
        out = np.empty(candidates.shape, dtype=np.float32)
        chunk = max(1, SCORE_BUDGET // max(candidates.shape[1], 1))
        self.net_.eval()
        for start in range(0, len(users), chunk):
            rows = slice(start, start + chunk)
            episodes = self.support(users[rows], recent[rows], self._serving_rng(tag, users[rows]))
            adapted = self.adapt(episodes, new_users)
            with torch.no_grad():
                out[rows] = self.score_adapted(adapted, torch.tensor(candidates[rows])).numpy()
        return out

    def score(self, users: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        """Each user adapted from its last ``neural.serve_k`` interactions in the index (None: the last
        ``EXISTING_SUPPORT``), none: the population start; then scored."""
        self._require_fitted()
        users = check_ids(self, "users", users)
        recent, _ = self.index_.recent_items(users, self.neural.serve_k or EXISTING_SUPPORT)
        return self._score_users(users, recent, candidates, 2, new_users=False)

    def score_new_users(self, recent: RecentItems, candidates: np.ndarray) -> np.ndarray:
        """New users adapted from the items they have shown; their id rows (if any) are the population mean."""
        return self._score_users(np.asarray(recent.users), np.asarray(recent.items), candidates, 3, new_users=True)

    # ---- streaming
    def observe(self, batch: Interactions) -> None:
        """Grow the id tables, index the batch, one global update per ``batch_tasks`` of its stream episodes."""
        self._require_fitted()
        if not len(batch):
            return
        self._grow(max(self.n_users_, batch.n_users), max(self.n_items_, batch.n_items))
        self.index_ = self.index_.extend(batch)
        for side, ids in (("users", batch.users), ("items", batch.items)):
            encoder = self.encoders().get(side)
            if encoder is not None and encoder.with_ids:
                renew_rows(encoder, np.unique(ids), self.neural.init_std * 0.1, self.generator_, self.optimizer_)
        rng = np.random.default_rng([self.neural.seed, 3, self.online_steps_])
        tasks, _ = stream_tasks(self.index_, batch, self.tasks.k, self.tasks.K, rng, self.n_items_)
        if len(tasks):
            self.train_episodes(Episodes.from_tasks(tasks, self.tasks.k), None)
        self.online_steps_ += 1

    def _grow(self, n_users: int, n_items: int) -> None:
        for side, n in (("users", n_users), ("items", n_items)):
            encoder = self.encoders().get(side)
            if encoder is not None:
                grow_encoder(encoder, n, self.neural.init_std * 0.1, self.generator_, self.optimizer_)
        self.sizes_ = (n_users, n_items)

    # ---- state without pickle
    def state_arrays(self) -> dict[str, np.ndarray]:
        """Parameters, buffers, Adam moments, features, sizes and every interaction seen, as numeric arrays."""
        self._require_fitted()
        out = {f"net.{name}": value.detach().cpu().numpy().copy() for name, value in self.net_.state_dict().items()}
        names = {id(p): name for name, p in self.net_.named_parameters()}
        for param, state in self.optimizer_.state.items():
            for key, value in state.items():
                out[f"adam.{names[id(param)]}.{key}"] = torch.as_tensor(value).detach().cpu().numpy().copy()
        out.update(self.features_.to_arrays())
        out["sizes"] = np.asarray(self.sizes_, dtype=np.int64)
        out["online_steps"] = np.asarray(self.online_steps_, dtype=np.int64)
        out["generator"] = self.generator_.get_state().numpy().copy()
        seen = self.index_.interactions
        out.update(seen_users=seen.users, seen_items=seen.items, seen_ts=seen.ts)
        return out

    def load_state_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        self.features_ = Features.from_arrays(arrays)
        n_users, n_items = (int(v) for v in np.asarray(arrays["sizes"]))
        self._fresh(n_users, n_items)
        # id tables may have grown past what build_net makes from the sizes: take the saved shapes
        state = {key[len("net."):]: torch.from_numpy(np.array(value)) for key, value in arrays.items() if key.startswith("net.")}
        for name, value in state.items():
            owner_name, _, attr = name.rpartition(".")
            owner = self.net_.get_submodule(owner_name) if owner_name else self.net_
            current = getattr(owner, attr)
            if current.shape != value.shape:
                setattr(owner, attr, nn.Parameter(value.clone()) if isinstance(current, nn.Parameter) else value.clone())
        self.net_.load_state_dict(state)
        self.optimizer_ = torch.optim.Adam(self.net_.parameters(), lr=self.neural.outer_lr)
        for name, param in self.net_.named_parameters():
            moments = {key.rsplit(".", 1)[1]: torch.from_numpy(np.array(value)) for key, value in arrays.items()
                       if key.startswith(f"adam.{name}.") and key.count(".") == name.count(".") + 2}
            if moments:
                self.optimizer_.state[param] = moments
        self.online_steps_ = int(arrays["online_steps"])
        self.generator_.set_state(torch.from_numpy(np.array(arrays["generator"], dtype=np.uint8)))
        self.index_ = InteractionIndex.build(Interactions(*(np.asarray(arrays[k], dtype=np.int64) for k in ("seen_users", "seen_items", "seen_ts"))))
