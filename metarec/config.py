"""One configuration object for every path and hyperparameter.

Sections are plain pydantic models, validated once; `Config` composes them and
reads overrides from the environment (``METAREC_<SECTION>__<FIELD>``, e.g.
``METAREC_META__LAMBDA_ML=0.5``). A TOML file and ``--set section.field=value``
on the CLI override in turn (see ``tasks/runtime/settings.py``).

Each stage's output folder is named by the hash of the sections it depends
on (``Config.hash_of``), so changing a learning rate does not re-prepare data,
and the full config hash names a pipeline run.
"""

from __future__ import annotations

import hashlib
import json
import os
import math
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_serializer, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from metarec.models.registry import DEFAULT_MODELS, KNOWN_MODELS, ROWS
from metarec.redaction import redact, redact_value

# Where the data is read from does not change what it is, and how many folds a run pools does not change
# any one fold's split: these stay out of the hashes (a pooled run's folder names its fold count itself).
NOT_HASHED: dict[str, set[str]] = {"data": {"data_dir", "download", "new_user_folds"}}
# Options added after tuning studies and caches were keyed, whose None leaves every result as it was: they enter a
# hash only once set, so adding them keeps today's keys, study names and tuning records valid.
HASHED_WHEN_SET: dict[str, set[str]] = {"meta": {"item_inner_lr", "item_inner_steps"}}


def hashed_dump(name: str, section: "Section") -> dict:
    """A section's fields as they enter hashes: NOT_HASHED left out, HASHED_WHEN_SET fields only when not None."""
    dump = section.model_dump(mode="json", exclude=NOT_HASHED.get(name))
    return {k: v for k, v in dump.items() if not (v is None and k in HASHED_WHEN_SET.get(name, ()))}


class Section(BaseModel):
    # NaN and inf are never a meaningful setting, and NaN passes every bound check (NaN >= 0 is False, so is NaN < 0)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class DataConfig(Section):
    """Ingestion and the temporal split (docs/method.md §1-2, §9)."""

    dataset: str = Field("ml-100k", description="A known name (ml-100k, ml-1m, ml-latest, ml-latest-small, netflix, synthetic-drift: "
                         "generated on first use, see tasks/data/generated.py) or a path to a CSV/Parquet file.")
    data_dir: Path | None = Field(None, description="Where raw datasets live; None = METAREC_DATA_DIR, ./data, ../shared/datasets in that order.")
    download: bool = Field(True, description="Download a known public dataset that is absent (verified by checksum/size).")
    user_col: str = Field("user_id", description="Generic CSV/Parquet: user column.")
    item_col: str = Field("item_id", description="Generic CSV/Parquet: item column.")
    rating_col: str = Field("rating", description="Generic CSV/Parquet: rating column.")
    ts_col: str = Field("timestamp", description="Generic CSV/Parquet: timestamp column (integer seconds).")
    user_features: Path | None = Field(
        None, description="A CSV (header) or Parquet file of user side features: one row per user, the data.user_col column "
        "holding the raw user id of the ratings, every other column one categorical field; a cell may hold several values "
        "separated by '|'; empty = missing. Replaces the data set's own (ml-100k u.user, ML-1M users.dat). None = those.",
    )
    item_features: Path | None = Field(
        None, description="Item side features, as data.user_features with the data.item_col column (replaces u.item, "
        "movies.dat, movies.csv). None = the data set's own, if any.",
    )
    sample_users: int | None = Field(None, ge=1, description="Keep a seeded sample of this many users (large data sets, experiments).")
    rating_threshold: float = Field(3.0, description="A rating >= this is a positive interaction.")
    new_user_fraction: float = Field(0.1, gt=0.0, le=0.5, description="Fraction of users held out as new users: users are dealt into round(1 / fraction) groups by a seeded hash, one group per split.")
    new_user_folds: int = Field(10, ge=1, description="New-user folds F: the pipeline runs F splits, fold f's new users being group f of the deal (see new_user_fraction), and pools the results. F = round(1 / new_user_fraction) makes every user a new user exactly once; the default, 10, is that F at the paper's 10%, and left unset it becomes F for any other fraction.")
    fold: int = Field(0, ge=0, description="Which group of the deal is this split's new users (set per fold by the pipeline).")
    new_item_fraction: float = Field(0.1, gt=0.0, le=0.5, description="Item cold start (Table 2, eval.new_items): fraction of the "
                                     "history's items held out as new items, dealt like new users into round(1 / fraction) groups "
                                     "by a seeded hash of the item id; data.fold picks the group (tasks/data/new_items.py).")
    history_fraction: float = Field(0.9, gt=0.0, lt=1.0, description="Time quantile that cuts history from stream.")
    stream_batches: int = Field(10, ge=1, description="Number of time-ordered stream batches.")
    n_negatives: int = Field(100, ge=1, description="Sampled negatives per evaluation case.")
    new_user_ns: tuple[int, ...] = Field((1, 5, 10), description="n = interactions a new user has shown before the one to predict.")
    tie_break: Literal["random", "item_id"] = Field(
        "random", description="How a user's positives of the same second are ordered, wherever the order of interactions is "
        "decided (history positions and tasks, new users' shown items and targets, the history/stream cut, the stream, the "
        "candidate cases). 'random' (default): by a hash of data.seed and the row's position in the input file, which does "
        "not depend on the item's id. 'item_id': ascending dense item id, the old order; it favours popular items, because "
        "dense ids follow raw ids and raw ids correlate with popularity (Spearman 0.78 on ml-100k, where about half of the "
        "new users' n = 1 targets share a second with the shown item), so a same-second target is more often popular "
        "than the user's true next choice would be.")
    seed: int = Field(42, ge=0, description="Seed of the new-user sample, user sampling, negatives and the same-second tie-break.")

    @property
    def deals(self) -> int:
        """Groups the users are dealt into: each split holds out one group (about new_user_fraction of the users)."""
        return max(2, round(1.0 / self.new_user_fraction))

    @property
    def item_deals(self) -> int:
        """Groups the items are dealt into for item cold start; a split's new items are group fold % item_deals."""
        return max(2, round(1.0 / self.new_item_fraction))

    @model_validator(mode="after")
    def _one_column_one_role(self) -> "DataConfig":
        roles = {"user_col": self.user_col, "item_col": self.item_col, "rating_col": self.rating_col, "ts_col": self.ts_col}
        for role, column in roles.items():
            others = [other for other, name in roles.items() if other != role and name == column]
            if others:
                raise ValueError(f"data.{role} and data.{others[0]} both name the column {column!r}: each column plays one role "
                                 "(user, item, rating, timestamp); name the file's own column for each")
        return self

    @model_validator(mode="after")
    def _folds_fit_the_deal(self) -> "DataConfig":
        if self.new_user_folds > self.deals and "new_user_folds" not in self.model_fields_set:
            # the default means "every user new once": with a larger new-user share there are fewer groups
            object.__setattr__(self, "new_user_folds", self.deals)
        if self.new_user_folds > self.deals:
            raise ValueError(f"data.new_user_folds ({self.new_user_folds}) must be <= round(1 / data.new_user_fraction) = {self.deals}: "
                             "there are only that many disjoint groups of new users")
        if self.fold >= self.deals:
            raise ValueError(f"data.fold ({self.fold}) must be < round(1 / data.new_user_fraction) = {self.deals}")
        return self

    def with_fold(self, fold: int) -> "DataConfig":
        return self.model_copy(update={"fold": fold})

    @field_validator("new_user_ns")
    @classmethod
    def _positive_ns(cls, ns: tuple[int, ...]) -> tuple[int, ...]:
        if not ns or any(n < 1 for n in ns):
            raise ValueError(f"every n in new_user_ns must be >= 1, got {list(ns)}")
        return tuple(sorted(set(ns)))


class TaskConfig(Section):
    """Offline task construction (docs/method.md §4)."""

    k: int = Field(5, ge=1, description="The user's own consecutive interactions in a support set.")
    K: int = Field(20, ge=1, description="Support set size: k own + K-k neighbour interactions.")
    shard_size: int = Field(65536, ge=1, description="Tasks per Parquet shard.")
    max_tasks_per_user: int | None = Field(None, ge=1, description="Cap on tasks per user (None = every position i > k); a seeded uniform sample of positions.")
    shuffle: bool = Field(True, description="Store tasks in a seeded random order, so each shard is a uniform sample (False = user, position order).")
    negatives: Literal["past", "history"] = Field(
        "past", description="What a task's sampled negatives avoid: 'past' = the positives its user had by the task's time (no task "
        "sees its future, as serving cannot); 'history' = every positive of the whole history (docs/method.md §3 read literally).")
    online_neighbours: bool = Field(
        False, description="Online tasks (§7) add K - k neighbour interactions to the user's own k (a variant; docs/method.md §11: "
        "R^K is the user's own k previous interactions only).")
    support_neighbours: bool = Field(
        True, description="Support sets hold K - k neighbour interactions beside the user's own k (the paper). False (an Ours+ "
        "option, docs/findings.md): the user's own interactions only, in training and serving alike, so a support has k triples.")
    serve_k: int | None = Field(
        None, ge=1, description="Own interactions in a served user's support (None = k, the paper). An Ours+ option: a new user's "
        "shown items up to this many (all n shown when n <= serve_k), not only the last k.")
    early_max: int = Field(10, ge=1, description="How many first interactions count as early: a user's first early_max "
                           "interactions (history positions < early_max), where a new user is tested (n = 1, 5, 10); pop_early counts "
                           "popularity over them, the early tasks are drawn from them.")
    early_share: float = Field(
        0.0, ge=0.0, lt=1.0, description="Share of each epoch's tasks that look like the test (an Ours+ option; 0 = the paper): "
        "'first n -> the (n+1)-th' of a training user for n in 1..early_max, the user's row starting where a new user's "
        "starts (meta.learned_start), in place of that share of the paper's tasks (an epoch keeps its size). Why: the paper's tasks only ask for targets at history "
        "positions >= k, while a new user is asked for its 2nd..11th item, a different population (docs/findings.md).")
    seed: int = Field(7, ge=0, description="Seed of the task order and of the per-user position sample.")

    @model_validator(mode="after")
    def _k_le_K(self) -> "TaskConfig":
        if self.support_neighbours and self.k > self.K:
            raise ValueError(f"tasks.k ({self.k}) must be <= tasks.K ({self.K})")
        return self

    @property
    def support_size(self) -> int:
        """Triples in a training task's support: K, or k without neighbours."""
        return self.K if self.support_neighbours else self.k

    def serving_support(self) -> tuple[int, int]:
        """(own, total) slots of a served user's support: serve_k (else k) own, then neighbours up to K if enabled."""
        own = self.serve_k or self.k
        return own, (max(self.K, own) if self.support_neighbours else own)


class MetaConfig(Section):
    """The MF model, BPR loss and MAML meta-training (docs/method.md §3, §5-7)."""

    dim: int = Field(64, ge=1, description="Latent dimension d.")
    lambda_p: float = Field(1e-4, ge=0.0, description="L2 weight on user vectors.")
    lambda_q_pos: float = Field(1e-4, ge=0.0, description="L2 weight on positive item vectors.")
    lambda_q_neg: float = Field(1e-4, ge=0.0, description="L2 weight on negative item vectors.")
    lambda_ml: float = Field(1.0, ge=0.0, description="Weight of the meta-learning loss.")
    inner_steps: int = Field(2, ge=1, description="L, inner gradient steps.")
    inner_lr: float = Field(10.0, gt=0.0, description="alpha, inner learning rate on the mean loss over K triples (10 here = 0.5 on the paper's sum with K = 20).")
    first_order: bool = Field(False, description="First-order MAML (an option; second order is the method).")
    epochs: int = Field(5, ge=0, description="Meta-training epochs over all tasks.")
    batch_tasks: int = Field(1024, ge=1, description="Tasks per outer step.")
    outer_lr: float = Field(0.005, gt=0.0, description="Adam learning rate.")
    optimizer: Literal["adam", "lazy_adam"] = Field(
        "adam",
        description="Outer (meta and online) optimiser of Θ. 'adam' (default, the paper row): torch.optim.Adam over the whole P "
        "and Q, as a framework's Adam steps an embedding table; a row no task of the batch touched still moves by its "
        "decaying first moment, and every step costs the whole tables. 'lazy_adam' (a variant, for scale): "
        "metarec.sparse_adam.RowSparseAdam, torch.optim.SparseAdam's semantics: the gradient is row-sparse and only the "
        "batch's rows and their moments change (global step count for the bias correction), so a step costs the batch, "
        "not the table; a row touched at every step follows 'adam' exactly.",
    )
    grad_clip: float | None = Field(10.0, gt=0.0, description="Gradient-norm clipping (None = off).")
    pretrain_epochs: int = Field(0, ge=0, description="Plain BPR epochs over the history before meta-training.")
    init_std: float = Field(0.1, gt=0.0, description="Std of the initial P and Q entries.")
    new_row_std: float = Field(0.01, ge=0.0, description="sigma of the noise added to the mean for new users/items (§7).")
    online_lr: float | None = Field(None, gt=0.0, description="Adam rate for online meta-updates (None = outer_lr).")
    online_steps: int = Field(1, ge=1, description="Passes of online meta-steps over each stream batch's tasks (one Adam step "
                              "per batch_tasks tasks per pass); 1 = §7 as the paper states it. Searched like the baselines' update epochs.")
    online_adapt_steps: int = Field(
        0, ge=0, description="An Ours+ option (0 = the paper): on every stream batch, each of its users' rows in P takes this many "
        "steps of the adaptation rule (serving's α, on the support serving would build after the batch) from its current "
        "row, and KEEPS the result, so a seen user's row follows its drift between batches as RKMF's retrained row does. "
        "Why: §7's one outer step per batch barely moves a user's row (docs/findings.md, the drift stream).")
    item_bias: bool = Field(
        False, description="An Ours+ option (False = the paper's p·q): score b_i + p·q with the item biases b in Θ (learned in "
        "the outer loop, not adapted in the inner one), so Θ alone can rank like popularity and adaptation learns the "
        "residual. Trained by the autograd path of metarec.maml (flex_meta_step).")
    learned_inner_lr: bool = Field(
        False, description="An Ours+ option (Meta-SGD / MAML++; False = the paper's one α): per-step, per-dimension inner rates "
        "for user and item rows, learned in the outer loop (started at inner_lr; steps beyond inner_steps at serving reuse the "
        "last step's rates, scaled by serve_inner_lr / inner_lr when that is set). Autograd path.")
    learned_prior: bool = Field(
        False, description="An Ours+ option (False = the paper's inner loss): the adapted user's inner objective adds "
        "½ (p − μ)ᵀ diag(λ) (p − μ) with μ and λ >= 0 learned in the outer loop, so adaptation from few items is pulled "
        "toward a learned typical user. Autograd path.")
    learned_start: bool = Field(
        False, description="An Ours+ option (False = §7's mean of the trained rows + noise): a new user's row, and the row an "
        "early task (tasks.early_share) starts from, is a start vector p0 (+ the same noise) learned in the outer loop.")
    serve_inner_lr: float | None = Field(None, gt=0.0, description="alpha when adapting a served user (None = inner_lr, the paper). An Ours+ option.")
    serve_inner_steps: int | None = Field(None, ge=0, description="L when adapting a served user (None = inner_steps, the paper; 0 = Θ alone). An Ours+ option.")
    item_inner_lr: float | None = Field(
        None, gt=0.0, description="alpha when adapting a new item's row from Θ on its n shown interactions (Table 2, "
        "metarec/new_items.py; None = serving's alpha, as the paper row). Serving's alpha and L move the row about as far "
        "at n = 1 as at n = 10; an item-side rate lets the item's n triples move it further. Not searched: Table 2 is not tuned.")
    item_inner_steps: int | None = Field(
        None, ge=0, description="L when adapting a new item's row (None = serving's L, as the paper row; 0 = §7's new row "
        "unadapted). Only Table 2 reads it.")
    seed: int = Field(0, ge=0, description="Seed of the initialisation and of the negatives drawn in training.")

    @property
    def flexible(self) -> bool:
        """Options the hand-written backward pass of metarec.maml does not cover: they train by its autograd path."""
        return self.item_bias or self.learned_inner_lr or self.learned_prior or self.learned_start

    def serving(self) -> "MetaConfig":
        """These settings with the serving α and L in place of the training ones."""
        update = {k: v for k, v in (("inner_lr", self.serve_inner_lr), ("inner_steps", self.serve_inner_steps)) if v is not None}
        return self.model_copy(update=update) if update else self

    def item_serving(self) -> "MetaConfig":
        """Serving's settings with the item-side α and L (item_inner_lr, item_inner_steps) where set: a new item's rule."""
        serving = self.serving()
        update = {k: v for k, v in (("inner_lr", self.item_inner_lr), ("inner_steps", self.item_inner_steps)) if v is not None}
        return serving.model_copy(update=update) if update else serving


class BaselineConfig(Section):
    """Hyperparameters of the baselines (docs/baselines.md); chosen by the validation search."""

    dim: int = Field(64, ge=1)
    epochs: int = Field(20, ge=1)
    lr: float = Field(0.05, gt=0.0)
    reg: float = Field(1e-4, ge=0.0)
    batch_size: int = Field(128, ge=1, description="Triples per SGD minibatch (small, so a row rarely repeats in one).")
    init_std: float = Field(0.1, gt=0.0, description="Std of initial (and new, where the paper draws them) factor entries.")
    new_row_std: float = Field(0.01, ge=0.0, description="sigma of the noise on a new item's row, the mean of the trained rows + noise (docs/method.md §7, §11; MF-FT uses meta.new_row_std).")
    # RKMF
    rkmf_kernel: Literal["linear", "logistic"] = Field("logistic", description="RKMF kernel on <w, h> (the paper's polynomial and RBF kernels are not offered).")
    rkmf_scale: float = Field(4.0, gt=0.0, description="Logistic kernel c = r_max - r_min (the 1-5 rating range).")
    rkmf_update_epochs: int = Field(5, ge=1, description="Epochs of each UserUpdate/ItemUpdate.")
    rkmf_item_update: Literal["two_sided", "mymedialite", "positives_only"] = Field(
        "two_sided",
        description="ItemUpdate: 'two_sided' (faithful default) retrains h_i on its terms of one offline BPR epoch, as the "
        "positive of each of its users and as the sampled negative of other users' positives as often as a fit epoch "
        "makes it one; 'mymedialite' (a variant) uses MyMediaLite BPRMF.RetrainItem's sampling (floor(P/I) uniform users "
        "per epoch, far more negative than positive steps); 'positives_only' (a variant) trains h_i only as the positive "
        "of each of its users, which only ever pulls it up.",
    )
    # sRec
    srec_obs_var: float = Field(1.0, gt=0.0, description="Observation noise variance sigma^2.")
    srec_drift_var: float = Field(1e-7, ge=0.0, description="Drift variance per second of every coordinate.")
    srec_negatives: int = Field(1, ge=0, description="Sampled non-positive items observed as y = 0 per positive.")
    srec_prior_var: float = Field(0.1, gt=0.0, description="Initial posterior variance of every coordinate before any data.")
    srec_passes: int = Field(1, ge=1, description="Filtering passes over the history at fit time: 1 = the paper's single streaming pass; more is a variant.")
    srec_update: Literal["mean_field", "means_only"] = Field(
        "mean_field",
        description="'mean_field' (faithful): a vector's update uses E[v v^T] = m m^T + Sigma of the other side, so its "
        "variance counts; 'means_only' (a variant): the other side enters by its mean alone.",
    )
    # SPMF
    spmf_strategy: Literal["exact", "batch_plus_reservoir"] = Field(
        "exact",
        description="'exact' (faithful): rank the positives of reservoir + batch, draw |batch| of them without "
        "replacement with weight exp(rank / (temperature |R + W|)), train on those; 'batch_plus_reservoir' (a variant, "
        "ASMG's strategy 2): all of the batch plus spmf_samples reservoir draws with replacement by per-user rank.",
    )
    spmf_reservoir: int = Field(5000, ge=1, description="Reservoir size |R|.")
    spmf_samples: int = Field(1000, ge=0, description="Reservoir draws per batch (spmf_strategy = 'batch_plus_reservoir' only).")
    spmf_temperature: float = Field(1.0, gt=0.0, description="tau of the positive-sampling weight; 1 = the source's exact form.")
    spmf_update_epochs: int = Field(3, ge=1, description="SGD passes over each batch's training positives.")
    spmf_negatives: int = Field(1, ge=1, description="Uniform negatives (BPR triples) per training positive per update epoch.")
    # MF-FT
    ft_epochs: int = Field(5, ge=1)
    ft_lr: float = Field(0.05, gt=0.0)
    seed: int = Field(1, ge=0, description="Seed of the baselines' initialisation, sampling and search.")
    # validation search (tasks/train/tuning.py): the same budget for every model
    tune_budget: int = Field(24, ge=1, description="Optuna trials per row, the same for every row (the row's current values first, then seeded TPE).")
    tune_holdout: float = Field(0.1, gt=0.0, lt=1.0, description="Last fraction of the history (by time) held out for validation.")


class NeuralConfig(Section):
    """The neural meta-learning rows (MeLU, MAMO, the prototype recommender, MetaHIN, sequence_meta), field by field.

    All learn episodically on seeded random splits of each user's own interactions (supports of 1..tasks.k
    items, as their papers' tasks; ``metarec.models.neural.split_episodes``), the same kind of sampled
    negatives as ours, and Adam on the query loss; serving adapts on every item a new user has shown.
    """

    dim: int = Field(32, ge=1, description="Embedding size of each feature field and id embedding (MeLU: 32).")
    hidden: int = Field(64, ge=1, description="Width of MeLU's two decision layers (MeLU: 64 and 64).")
    loss: Literal["bpr", "bce"] = Field(
        "bpr", description="Implicit-feedback loss over the sampled negatives: bpr = -log σ(s⁺ - s⁻) per (positive, negative) pair; "
        "bce = -log σ(s⁺) - log(1 - σ(s⁻)). The papers regress explicit ratings (MSE, MeLU; cross-entropy over rating classes, MAMO).",
    )
    local_lr: float = Field(0.5, gt=0.0, description="Local (inner) learning rate on the mean support loss (MeLU's α, MAMO's ρ).")
    local_steps: int = Field(1, ge=0, description="Local update steps on the support set (MeLU: 1; MAMO's code: 3). 0 = no adaptation.")
    first_order: bool = Field(False, description="Drop the second-order terms of the local update from the meta-gradient (MAMO's row fixes True, as its paper's global update).")
    outer_lr: float = Field(1e-3, gt=0.0, description="Adam learning rate of the global update (and of online updates).")
    epochs: int = Field(3, ge=0, description="Passes over all tasks.")
    batch_tasks: int = Field(64, ge=1, description="Episodes per global update (each with up to query_items queries).")
    grad_clip: float | None = Field(10.0, gt=0.0, description="Gradient-norm clipping of the global update (None = off).")
    init_std: float = Field(0.1, gt=0.0, description="Std of the initial embedding entries.")
    item_ids: bool = Field(
        True, description="Add a learned item-id embedding beside the item's feature fields (a deviation: MeLU and MAMO embed "
        "content only; with ml-100k's 19 genres and a year, many items would be indistinguishable). Items always get an id "
        "embedding when the data set has no item features.",
    )
    use_features: bool = Field(True, description="Use the data set's side features; False = id embeddings only (the fallback, on purpose).")
    pooling: Literal["mean", "attention"] = Field("mean", description="Prototype recommender: how the shown items' embeddings pool into the user's vector.")
    memory_slots: int = Field(3, ge=1, description="MAMO: K, the number of memory slots (its code: n_k = 3).")
    memory_tau: float = Field(0.01, ge=0.0, description="MAMO: τ, the weight of the personalised bias term b_u in θ_u = φ_u - τ b_u.")
    memory_alpha: float = Field(0.5, ge=0.0, le=1.0, description="MAMO: α, the write rate of the profile memory M_P.")
    memory_beta: float = Field(0.05, ge=0.0, le=1.0, description="MAMO: β, the write rate of the user-embedding memory M_U.")
    memory_gamma: float = Field(0.1, ge=0.0, le=1.0, description="MAMO: γ, the write rate of the preference memory M_UI.")
    episodes_per_user: int = Field(
        8, ge=1, description="Training episodes per user and epoch, each a fresh seeded random split of all the user's interactions "
        "into a support of 1..tasks.k items and a query of the next query_items (MeLU's and MAMO's tasks; one per user in the papers, "
        "more here so an epoch takes enough global steps).")
    query_items: int = Field(10, ge=1, description="Query items per episode (MeLU's and MAMO's data: 10); fewer when the user has fewer left.")
    early_share: float | None = Field(
        None, ge=0.0, le=1.0, description="Share of episodes whose support is the user's first s interactions and whose query is the "
        "ones that follow (the new-user test's question) instead of a random split. None = the row's own default: 0 for MeLU, MAMO, "
        "the prototype recommender and MetaHIN (their papers split at random), 0.5 for sequence_meta (a sequence has an order).")
    serve_k: int | None = Field(
        None, ge=1, description="Shown items a served user adapts on: None = all a new user has shown (the papers adapt on the whole "
        "support set) and an existing user's last 50; else the last serve_k (searchable, like Ours+'s tasks.serve_k).")
    semantic_lr: float = Field(0.5, gt=0.0, description="MetaHIN: the semantic-wise adaptation rate (its α) of the context aggregation; "
                               "local_lr is the task-wise rate (its β).")
    seed: int = Field(0, ge=0, description="Seed of the neural rows' initialisation and sampling.")


class EvalConfig(Section):
    """The protocol (docs/method.md §9) and what the pipeline runs."""

    models: tuple[str, ...] = Field(DEFAULT_MODELS, description="Models (Table 1 rows) to fit and evaluate; every row of "
                                    "metarec.models.registry.ROWS may be named, the opt-in ones only when listed here.")
    full_ranking: bool = Field(True, description="Also report full-ranking HR@10/NDCG@10 (beside, never instead of, sampled).")
    bootstrap: int = Field(1000, ge=0, description="Bootstrap resamples for 95% CIs (0 = off).")
    lambda_sweep: tuple[float, ...] = Field(
        (0.0, 0.05, 0.25, 1.0, 5.0, 25.0, 100.0, 1000.0, 1e22),
        description="lambda_ML values of the sweep, on our scale (meta.lambda_ml; the paper's is K times it), trained without "
        "clipping. With Adam as the outer optimiser the update does not depend on the objective's scale, so once λ·L^1 "
        "dominates (λ >= ~100) larger values train alike and nothing diverges until float32 overflows: on ml-100k the "
        "training finishes at 1e20 and fails (gradient norm inf) at 1e22, the last point, where the sweep shows it.")
    max_new_users: int | None = Field(None, ge=1, description="Cap on evaluated new users.")
    training_fraction: float = Field(1.0, gt=0.0, le=1.0, description="Fraction of every row's full training passes over the history (its Row.passes fields, rounded up, at least 1): one rule for all models. The quick preset uses 0.5.")
    new_items: bool = Field(False, description="Also evaluate item cold start and write Table 2 (new items) beside Table 1. "
                            "Off by default: it refits every row of eval.models (ours meta-trained again) on the history without "
                            "the new items and runs a second evaluation, about doubling a run's cost.")
    seed: int = Field(3, ge=0, description="Seed of the bootstrap and of the quick-mode new-user subset.")

    @field_validator("models")
    @classmethod
    def _known_models(cls, models: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [m for m in models if m not in KNOWN_MODELS]
        if unknown:
            raise ValueError(f"unknown model name(s) {unknown}; expected some of {list(KNOWN_MODELS)}")
        if not models:
            raise ValueError("eval.models must name at least one model")
        return models

    @field_validator("lambda_sweep")
    @classmethod
    def _nonnegative_lambdas(cls, values: tuple[float, ...]) -> tuple[float, ...]:
        if any(v < 0 for v in values):
            raise ValueError(f"every lambda_ML in eval.lambda_sweep must be >= 0, got {list(values)}")
        return values


class RuntimeConfig(Section):
    """Where things go and how they run; not part of any result's hash."""

    artifacts_dir: Path = Field(Path("artifacts"), description="Root of all outputs.")
    mlflow_tracking_uri: str | None = Field(None, description="None = MLFLOW_TRACKING_URI, else sqlite store in artifacts_dir.")
    experiment: str = "metarec"
    mlflow_ui_url: str | None = Field(
        None, description="Base URL of the MLflow UI for run links in logs; None = the tracking server if the store is one, "
        "else http://127.0.0.1:5000 (README's `mlflow ui` command).")
    task_runner: Literal["threads", "dask"] = "threads"
    dask_address: str | None = Field(None, description="An existing Dask scheduler; None = a local cluster.")
    max_workers: int = Field(2, ge=1)
    torch_threads: int | None = Field(
        None, ge=1, description="torch's intra-op threads per process; None = the machine's cores / max_workers (at least 1). "
        "The pipeline computes in max_workers slots side by side, each with its own OpenMP team: teams that ask for more "
        "threads than there are cores spin against each other (beside other jobs on 2 cores an epoch of Ours (paper) took "
        "175-430 s with 2 threads, 27-34 s with 1, in two runs at different loads).")
    workers: int = Field(1, ge=1, description="Processes meta-training data-parallel over torch.distributed (gloo on CPU, NCCL on GPUs); "
                         "each takes a share of every batch and Θ ends as with one process. Threads per worker: torch_threads // workers (at least 1).")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where the models' tensors live: auto = a GPU when torch sees one, else the CPU.")
    duckdb_memory_limit: str = Field("4GB", pattern=r"^\s*\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)\s*$",
                                     description="DuckDB's memory_limit in prepare (e.g. '4GB', '512MiB'); past it, DuckDB spills to duckdb_temp_dir.")
    duckdb_temp_dir: Path | None = Field(None, description="Where DuckDB spills and keeps its work database in prepare; None = a private folder under the system temp dir.")
    progress: bool = True
    tuned_dir: Path | None = Field(
        None, description="Where the tuning records (<dataset>.json) are read and written; None = the repository's tuned/ folder "
        "(shipped with the code, so a run finds the values chosen for its data set).")
    preset: Literal["full", "quick"] = Field("full", description="Which preset made this config (set by --quick); tags runs and labels reports.")

    @field_serializer("mlflow_tracking_uri", "mlflow_ui_url", "dask_address", when_used="json")
    def _without_credentials(self, value: str | None) -> str | None:
        """In every JSON dump (records, Prefect's stored flow parameters), addresses lose their credentials."""
        return None if value is None else redact(value)

    @model_validator(mode="after")
    def _threads_per_slot(self) -> "RuntimeConfig":
        if self.torch_threads is None:
            self.torch_threads = max(1, (os.cpu_count() or 1) // self.max_workers)
        return self


RESULT_SECTIONS = ("data", "tasks", "meta", "baselines", "neural", "eval")
SECTION_TYPES: dict[str, type[Section]] = {
    "data": DataConfig, "tasks": TaskConfig, "meta": MetaConfig, "baselines": BaselineConfig, "neural": NeuralConfig, "eval": EvalConfig,
}


class Config(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="METAREC_", env_nested_delimiter="__", extra="forbid")

    data: DataConfig = DataConfig()
    tasks: TaskConfig = TaskConfig()
    meta: MetaConfig = MetaConfig()
    baselines: BaselineConfig = BaselineConfig()
    neural: NeuralConfig = NeuralConfig()
    eval: EvalConfig = EvalConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    tuned: dict[str, dict[str, float | int | str | bool]] = Field(
        default_factory=dict,
        description="Per Table 1 row, tuned values by section.field, e.g. {'rkmf': {'baselines.lr': 0.02}}: shared fields "
        "like baselines.lr differ per row. They fill fields left at their class default (see for_row), so an explicit "
        "setting is never silently replaced. Empty by default: a run fills it from its data set's tuning record "
        "(tuned/<dataset>.json, see tasks/train/tuning.py), or a borrowed one.",
    )

    @field_validator("tuned")
    @classmethod
    def _known_tuned(cls, tuned: dict[str, dict]) -> dict[str, dict]:
        for name, values in tuned.items():
            if name not in ROWS:
                raise ValueError(f"tuned: unknown model {name!r}; expected some of {list(ROWS)}")
            for key in values:
                section, _, field = key.partition(".")
                if section not in RESULT_SECTIONS or field not in SECTION_TYPES[section].model_fields:
                    raise ValueError(f"tuned[{name!r}]: {key!r} is not section.field with section in {list(RESULT_SECTIONS)}")
        return tuned

    @model_validator(mode="after")
    def _tuned_values_valid(self) -> "Config":
        for name in self.tuned:
            try:
                self.for_row(name)
            except ValueError as exc:
                raise ValueError(f"tuned[{name!r}]: {exc}") from exc
        return self

    def for_row(self, name: str) -> "Config":
        """The config row ``name`` runs with: tuned values fill fields at their class default, then the row's fixed options.

        Sections are rebuilt, so every value is validated against its field. The result no longer carries
        ``tuned[name]``, so applying it twice changes nothing and a value set on the result afterwards (a λ_ML
        sweep point) is not replaced by a tuned one.
        """
        from metarec.models.registry import row

        fixed = row(name).fixed
        update: dict[str, dict] = {}
        for key, value in self.tuned.get(name, {}).items():
            section, _, field = key.partition(".")
            current = getattr(self, section)
            if getattr(current, field) == SECTION_TYPES[section].model_fields[field].default:
                update.setdefault(section, {})[field] = value
        for key, value in fixed.items():
            section, _, field = key.partition(".")
            update.setdefault(section, {})[field] = value
        if self.eval.training_fraction < 1.0:  # the same shortened budget for every row (the quick preset)
            for key in row(name).passes:
                section, _, field = key.partition(".")
                full = update.get(section, {}).get(field, getattr(getattr(self, section), field))
                update.setdefault(section, {})[field] = math.ceil(full * self.eval.training_fraction) if full else full
        sections = {s: SECTION_TYPES[s](**{**getattr(self, s).model_dump(), **fields}) for s, fields in update.items()}
        # the row's values are resolved: dropping them makes for_row idempotent, and a later change sticks
        remaining = {other: values for other, values in self.tuned.items() if other != name}
        return self.model_copy(update={**sections, "tuned": remaining})

    def hash_of(self, *sections: str) -> str:
        """A short stable hash of the named sections (all result sections if none)."""
        names = sections or (*RESULT_SECTIONS, "tuned")
        payload = {name: self._dump(name) for name in names}
        blob = json.dumps(payload, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def _dump(self, name: str) -> object:
        value = getattr(self, name)
        return value if name == "tuned" else hashed_dump(name, value)

    def to_flat_dict(self) -> dict[str, object]:
        """`section.field` -> value, for MLflow params and run records; credentials in URLs are masked."""
        flat: dict[str, object] = {}
        for name, section in self.model_dump(mode="json").items():
            for key, value in section.items():
                flat[f"{name}.{key}"] = redact_value(value)
        return flat

    def to_record(self) -> dict:
        """The whole config as JSON-ready data for records (config.json), credentials in URLs masked."""
        return redact_value(self.model_dump(mode="json"))
