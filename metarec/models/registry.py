"""Every Table 1 row in one table: its name, constructor, label, the options that define it, and its search space.

A row is a model class plus fixed options: "Ours (paper)" and a first-order
variant are the same class with different ``fixed`` values. ``Config.for_row``
applies, in order: the config's values, the row's tuned values
(``Config.tuned[row]``, filling fields left at their class default), and the
row's ``fixed`` options. ``factory.make_model`` builds a row from that config.

Search spaces are data, not code: ``Float``/``Int`` ranges and ``Choice`` lists
keyed by ``section.field``. The tuner (``tasks/train/tuning.py``) maps them to its
sampler, and widens a range whose chosen value lands on an edge, up to the
range's hard ``limits``. This module imports no other project module: ``metarec.config``
reads the table, and ``metarec.models.factory`` builds a row's model from a config.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Union


@dataclass(frozen=True)
class Float:
    """A real range; ``limits`` bounds how far the tuner may widen it (its hard physical range)."""

    low: float
    high: float
    log: bool = False
    limits: tuple[float, float] = (0.0, float("inf"))


@dataclass(frozen=True)
class Int:
    low: int
    high: int
    log: bool = False
    limits: tuple[int, int] = (1, 10**6)


@dataclass(frozen=True)
class Choice:
    """Unordered options: never widened."""

    options: tuple


Range = Union[Float, Int, Choice]

EDGE_SHARE = 0.05  # a real value within 5% of its range's span (log span for log ranges) from a bound is on that edge


def _position(value: float, low: float, high: float, log: bool) -> float:
    """Where ``value`` sits in [low, high], 0 .. 1 (log scale for log ranges)."""
    if high == low:
        return 0.5
    if log:
        return (math.log(value) - math.log(low)) / (math.log(high) - math.log(low))
    return (value - low) / (high - low)


def on_edge(value: object, space: Range) -> str | None:
    """"low" / "high" when a chosen value sits on that edge of its range, else None (choices have no edges)."""
    if isinstance(space, Choice):
        return None
    if isinstance(space, Int):
        return "low" if value <= space.low else "high" if value >= space.high else None
    where = _position(float(value), space.low, space.high, space.log)
    return "low" if where <= EDGE_SHARE else "high" if where >= 1.0 - EDGE_SHARE else None


def widen(space: Range, side: str) -> Range | None:
    """The range stretched past ``side`` (x/÷ sqrt of its ratio on log ranges, half its span on linear ones),
    clipped to its hard limits; None when it is already at the limit on that side."""
    if isinstance(space, Choice):
        return None
    lo_limit, hi_limit = space.limits
    if isinstance(space, Float) and space.log:
        factor = max(math.sqrt(space.high / space.low), 2.0)
        low, high = (space.low / factor, space.high) if side == "low" else (space.low, space.high * factor)
    else:
        step = (space.high - space.low) / 2 or 1
        if isinstance(space, Int):
            step = max(1, int(math.ceil(step)))
            if space.log:
                step = max(step, space.high if side == "high" else space.low // 2)
        low, high = (space.low - step, space.high) if side == "low" else (space.low, space.high + step)
    low, high = max(low, lo_limit), min(high, hi_limit)
    if isinstance(space, Int):
        low, high = int(low), int(high)
    if (low, high) == (space.low, space.high):
        return None
    return type(space)(low, high, space.log, space.limits)


@dataclass(frozen=True)
class Row:
    name: str
    factory: str  # "module:function", taking the row's Config
    label: str  # as Table 1 prints it
    space: dict[str, Range] = field(default_factory=dict)  # "section.field" -> range
    fixed: dict[str, object] = field(default_factory=dict)  # "section.field" -> value that defines the row
    sections: tuple[str, ...] = ("baselines",)  # config sections (besides data) its fitted state depends on
    family: str = "baseline"  # "ours" for the meta-learned MF and its variants
    passes: tuple[str, ...] = ()  # "section.field"s counting full training passes over the history (scaled by eval.training_fraction)
    in_default: bool = True  # in the default eval.models (False: opt-in, e.g. --set eval.models=[...])
    # "section.field" globs of the fields the row's model reads, where it reads only part of its sections (its MLflow
    # run shows just these, so comparing two rows lists what differs); empty: every field of its sections
    reads: tuple[str, ...] = ()

    @property
    def is_ours(self) -> bool:
        return self.family == "ours"


# Shared SGD ranges of the factor baselines. Hard limits: rates stay below 1 (SGD on unit-scale rows
# diverges past it), epochs at most 200 (wall time).
_SGD: dict[str, Range] = {
    "baselines.lr": Float(0.005, 0.2, log=True, limits=(1e-4, 1.0)),
    "baselines.reg": Float(1e-6, 1e-1, log=True, limits=(1e-8, 1.0)),
    "baselines.epochs": Int(5, 80, log=True, limits=(1, 200)),
}

# Ours (paper): second-order MAML (the method) throughout, searching only what the paper leaves open (docs/method.md §4-7):
# k and K ("k = 5 (also 1 and 10), K = 20 ... tune and report"), d (32 or 64), L (1-3), α, λ_ML, the outer rate and
# epochs, and the online update's rate and passes (§7 says Θ is updated with the §5 objective, not how far).
# α is on the mean loss over K triples (docs/method.md §11): α = 10 here is α = 0.5 on the paper's sum with K = 20.
# Hard limits: rates where Adam and the inner steps stay stable on unit-scale rows, counts bounded by wall time;
# K >= 20 so that any k the tuner may widen to (<= 20) still fits in a support.
_OURS: dict[str, Range] = {
    "meta.lambda_ml": Float(0.1, 10.0, log=True, limits=(1e-3, 1e3)),
    "meta.inner_lr": Float(0.5, 50.0, log=True, limits=(1e-2, 1e3)),
    "meta.inner_steps": Int(1, 5, limits=(1, 10)),
    "meta.outer_lr": Float(1e-3, 3e-2, log=True, limits=(1e-5, 0.3)),
    "meta.epochs": Int(3, 20, log=True, limits=(1, 200)),
    "meta.dim": Choice((32, 64)),
    "meta.online_lr": Float(1e-3, 5e-2, log=True, limits=(1e-5, 0.3)),
    "meta.online_steps": Int(1, 10, log=True, limits=(1, 50)),
    "tasks.k": Int(1, 10, limits=(1, 20)),
    "tasks.K": Int(20, 40, limits=(20, 100)),
}

# Ours+: the paper's open choices (less K: Ours+ fixes tasks.support_neighbours = False, so K is unused) and the options
# with a sign on validation (docs/findings.md §5, §9): serving's own k and L (all shown items gave +0.05 to +0.09),
# tasks that look like the test (share of early tasks, up to 0.9 so that some paper tasks stay) and item biases.
# The other options stay named config fields, off, and out of the search (OURS_PLUS_LEFT_OUT says why): with all 19
# dimensions, 24 trials kept the first trial (docs/findings.md §10).
_OURS_PLUS: dict[str, Range] = {
    **{key: value for key, value in _OURS.items() if key != "tasks.K"},
    "tasks.serve_k": Int(1, 10, limits=(1, 50)),
    "meta.serve_inner_steps": Int(1, 6, limits=(0, 20)),
    "tasks.early_share": Float(0.0, 0.5, limits=(0.0, 0.9)),
    "meta.item_bias": Choice((False, True)),
}

# Ours+'s options searched on ml-100k in 19 dimensions (tuned/ml-100k.json before the narrowing) and left out since:
OURS_PLUS_LEFT_OUT: dict[str, str] = {
    "meta.pretrain_epochs": "pre-training passes count as passes, so Hyperband prunes these trials on their untrained early scores",
    "meta.serve_inner_lr": "serving's α = the trained α (None); a second rate doubled a log-range dimension without a sign on validation",
    "meta.learned_inner_lr": "Meta-SGD rates: -0.035 at n = 5 on validation (docs/findings.md §9) and 1.5-2x slower epochs",
    "meta.learned_prior": "no significant gain on validation (docs/findings.md §9); autograd path, 1.5-2x slower epochs",
    "meta.learned_start": "no significant gain on validation (docs/findings.md §9); autograd path, 1.5-2x slower epochs",
    "meta.online_adapt_steps": "the kept online update showed nothing on the validation tail (docs/findings.md §9)",
}

# MeLU, MAMO, the prototype recommender, MetaHIN, sequence_meta (the [neural] section). Hard limits: Adam rates below
# 0.3, local rates below 100 on the mean support loss, epochs at most 100 (wall time). The episode options
# (episodes_per_user, query_items, early_share) and serving's serve_k (n <= 10 at test, so 10 = all shown) are
# searched like every row's own knobs.
_NEURAL: dict[str, Range] = {
    "neural.local_lr": Float(0.05, 5.0, log=True, limits=(1e-4, 100.0)),
    "neural.episodes_per_user": Int(4, 32, log=True, limits=(1, 256)),
    "neural.query_items": Int(2, 20, log=True, limits=(1, 100)),
    "neural.early_share": Float(0.0, 1.0, limits=(0.0, 1.0)),
    "neural.serve_k": Int(1, 10, limits=(1, 50)),
    "neural.local_steps": Int(1, 3, limits=(1, 10)),
    "neural.outer_lr": Float(3e-4, 1e-2, log=True, limits=(1e-5, 0.3)),
    "neural.epochs": Int(1, 10, log=True, limits=(1, 100)),
    "neural.dim": Choice((16, 32, 64)),
    "tasks.k": Int(1, 10, limits=(1, 20)),
}

# Fields whose None means "the value of another field" (serving's α, L and k, the online rate): a tuner's first trial,
# "today's values", reads that other field for them, since a range has no None.
NONE_MEANS: dict[str, str] = {
    "meta.online_lr": "meta.outer_lr",
    "meta.serve_inner_lr": "meta.inner_lr",
    "meta.serve_inner_steps": "meta.inner_steps",
    "tasks.serve_k": "tasks.k",
}

ROWS: dict[str, Row] = {
    row.name: row
    for row in (
        Row("responsive", "metarec.models.responsive:from_config", "Ours (paper)", dict(_OURS), sections=("tasks", "meta"), family="ours",
            passes=("meta.epochs", "meta.pretrain_epochs")),
        # Ours+: the same method and Θ, with the options docs/findings.md points to (chosen on the validation split
        # of the history, never on test cases): supports of the user's own interactions only (no neighbours), and
        # every option of _OURS_PLUS searched by the same study, budget and objective as every row.
        Row(
            "responsive_plus", "metarec.models.responsive:from_config", "Ours+", dict(_OURS_PLUS),
            fixed={"tasks.support_neighbours": False}, sections=("tasks", "meta"), family="ours",
            passes=("meta.epochs", "meta.pretrain_epochs"),
        ),
        Row(
            "mf_ft", "metarec.models.mf_ft:from_config", "MF-FT",
            {**_SGD, "baselines.ft_lr": Float(0.005, 0.5, log=True, limits=(1e-4, 2.0)), "baselines.ft_epochs": Int(1, 20, log=True, limits=(1, 100))},
            sections=("baselines", "meta"), passes=("baselines.epochs",),
            # our MF's f (meta's d, λs, init and new-row std), fitted by the baselines' SGD
            reads=("baselines.epochs", "baselines.lr", "baselines.batch_size", "baselines.seed", "baselines.ft_*", "meta.dim",
                   "meta.lambda_p", "meta.lambda_q_*", "meta.init_std", "meta.new_row_std"),
        ),
        Row(  # item cold start (Table 2): MF-FT whose new items start from a generator of item features; in Table 1 it is MF-FT
            "metaemb", "metarec.models.metaemb:from_config", "MetaEmb",
            {**_SGD, "baselines.ft_lr": Float(0.005, 0.5, log=True, limits=(1e-4, 2.0)), "baselines.ft_epochs": Int(1, 20, log=True, limits=(1, 100))},
            sections=("baselines", "meta"), passes=("baselines.epochs",), in_default=False,
        ),
        Row(  # item cold start (Table 2): MF-FT whose new items' fine-tuned rows are scaled and shifted by meta networks
            "mwuf", "metarec.models.mwuf:from_config", "MWUF",
            {**_SGD, "baselines.ft_lr": Float(0.005, 0.5, log=True, limits=(1e-4, 2.0)), "baselines.ft_epochs": Int(1, 20, log=True, limits=(1, 100))},
            sections=("baselines", "meta"), passes=("baselines.epochs",), in_default=False,
        ),
        Row(
            "rkmf", "metarec.models.rkmf:from_config", "RKMF",
            {**_SGD, "baselines.rkmf_kernel": Choice(("linear", "logistic")), "baselines.rkmf_update_epochs": Int(1, 20, log=True, limits=(1, 100))},
            passes=("baselines.epochs",),
            reads=("baselines.dim", "baselines.epochs", "baselines.lr", "baselines.reg", "baselines.batch_size", "baselines.init_std", "baselines.new_row_std", "baselines.seed", "baselines.rkmf_*"),
        ),
        Row(
            "srec", "metarec.models.srec:from_config", "sRec",
            {
                "baselines.srec_obs_var": Float(0.03, 10.0, log=True, limits=(1e-4, 1e3)),
                "baselines.srec_prior_var": Float(0.003, 1.0, log=True, limits=(1e-5, 1e2)),
                "baselines.srec_drift_var": Float(1e-10, 1e-5, log=True, limits=(1e-14, 1e-1)),
                "baselines.srec_negatives": Int(1, 8, limits=(0, 64)),
            },
            passes=("baselines.srec_passes",),
            reads=("baselines.dim", "baselines.init_std", "baselines.seed", "baselines.srec_*"),
        ),
        # spmf_samples sizes the batch_plus_reservoir variant's draws only; the exact strategy (the row) draws |W|
        Row(
            "spmf", "metarec.models.spmf:from_config", "SPMF",
            {
                **_SGD,
                "baselines.spmf_reservoir": Int(200, 20000, log=True, limits=(10, 10**6)),
                "baselines.spmf_temperature": Float(0.1, 10.0, log=True, limits=(1e-3, 1e3)),
                "baselines.spmf_update_epochs": Int(1, 10, limits=(1, 100)),
                "baselines.spmf_negatives": Int(1, 8, limits=(1, 64)),
            },
            passes=("baselines.epochs",),
            reads=("baselines.dim", "baselines.epochs", "baselines.lr", "baselines.reg", "baselines.batch_size", "baselines.init_std", "baselines.new_row_std", "baselines.seed", "baselines.spmf_*"),
        ),
        Row("pop", "metarec.models.pop:from_config", "Pop", {}, sections=()),
        # popularity over users' first tasks.early_max interactions: what a new user's next item looks like (issue 22)
        Row("pop_early", "metarec.models.pop:early_from_config", "Pop (early)", {}, sections=("tasks",)),
        Row(
            "responsive_fo", "metarec.models.responsive:from_config", "Ours (FOMAML)", dict(_OURS),
            fixed={"meta.first_order": True}, sections=("tasks", "meta"), family="ours", passes=("meta.epochs", "meta.pretrain_epochs"),
            in_default=False,
        ),
        Row("melu", "metarec.models.melu:from_config", "MeLU", dict(_NEURAL), sections=("tasks", "neural"), passes=("neural.epochs",), in_default=False),
        Row(
            "mamo", "metarec.models.mamo:from_config", "MAMO",
            {**_NEURAL, "neural.memory_tau": Float(1e-3, 1.0, log=True, limits=(1e-5, 10.0)), "neural.memory_slots": Int(2, 8, limits=(1, 64))},
            # MAMO's global update sums the query gradients at the adapted parameters (first order)
            fixed={"neural.first_order": True}, sections=("tasks", "neural"), passes=("neural.epochs",), in_default=False,
        ),
        Row(
            "prototype", "metarec.models.prototype:from_config", "Prototype",
            {key: value for key, value in _NEURAL.items() if key not in ("neural.local_lr", "neural.local_steps")}
            | {"neural.pooling": Choice(("mean", "attention"))},
            sections=("tasks", "neural"), passes=("neural.epochs",), in_default=False,
        ),
        Row(
            "metahin", "metarec.models.metahin:from_config", "MetaHIN",
            {**_NEURAL, "neural.semantic_lr": Float(0.05, 5.0, log=True, limits=(1e-4, 100.0))},
            sections=("tasks", "neural"), passes=("neural.epochs",), in_default=False,
        ),
        Row(
            "sequence_meta", "metarec.models.sequence_meta:from_config", "Sequence meta-learner",
            dict(_NEURAL), sections=("tasks", "neural"), passes=("neural.epochs",), in_default=False,
        ),
    )
}
KNOWN_MODELS: tuple[str, ...] = tuple(ROWS)
DEFAULT_MODELS: tuple[str, ...] = tuple(name for name, r in ROWS.items() if r.in_default)


def row(name: str) -> Row:
    if name not in ROWS:
        raise ValueError(f"unknown model {name!r}; expected one of {list(ROWS)}")
    return ROWS[name]


def label(name: str) -> str:
    return ROWS[name].label if name in ROWS else name
