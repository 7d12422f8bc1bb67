"""The pipeline's stages at ML-1M, ML-10M and Netflix scale: time and peak memory per stage, and how they grow.

Synthetic logs with each data set's shape, written in its native format into a
scratch folder (never the repository), generated once and reused:

- ``1m``: ML-1M, ``ratings.dat`` (UserID::MovieID::Rating::Timestamp), 1,000,209 ratings, 6,040 users, 3,706 movies;
- ``10m``: ML-10M, ``ratings.dat``, 10,000,054 ratings, 69,878 users, 10,677 movies;
- ``100m``: Netflix, ``training_set/mv_*.txt`` ('MovieID:' lines, then CustomerID,Rating,YYYY-MM-DD lines),
  100,480,507 ratings, 480,189 customers (ids up to 2,649,429 as in the Prize data), 17,770 movies.

Users' activity is log-normal (at least 20 ratings each for MovieLens), movie
popularity Zipf-like, ratings 1-5 with MovieLens' proportions.

Stages, each run in its own child process, so the peak RSS printed is that
stage's alone (``os.wait4``'s rusage of the child); every training stage uses every
user of the data set unless ``--sample-users N`` asks for a seeded sample (quick looks):

- ``prepare``: the whole file through ``tasks.data.prepare.prepare_data`` (DuckDB with
  ``runtime.duckdb_memory_limit`` and a spill folder, ``--memory-limit``), streaming
  every line; at 100M it must stay under 8 GB;
- ``tasks``: the task shards (docs/method.md §4) of fold 0's prepared history, as the
  pipeline builds them (``tasks.train.task_shards.build_task_shards``: ``tasks.max_tasks_per_user``,
  shuffle and negatives as configured);
- ``meta``: one meta-training epoch of Ours (paper) over every task (``--max-tasks N`` caps
  it), as ``tasks.train.training.meta_train`` runs one: Θ sized for the history, its index
  set, ``meta.optimizer = --optimizer`` (default: the pipeline's own setting); Θ is saved
  into the workdir for ``eval``. ``--meta-shards N`` runs the epoch N task shards per child
  process, Θ, Adam's moments and the trained-row masks carried between them in a checkpoint
  (bit-identical to one pass, tests/test_distributed.py), so an epoch of hours can be
  interrupted and resumed (the next call with the same settings goes on from the last piece;
  ``--meta-after FILE`` goes on from an unfinished epoch recorded in another run's scale.json, whose
  checkpoint is gone, with a freshly drawn Θ: the times add up to one epoch's, the saved Θ is not one epoch's);
  its seconds are the sum of the pieces' epoch time, its peak RSS the largest piece's; while an epoch is
  unfinished the report extrapolates it from the pieces so far (seconds x all tasks / trained tasks) and says so;
- ``fit:<row>``: one fit of each default row besides ours on the same history, with
  ``baselines.epochs = --baseline-epochs`` (the estimate multiplies it up to the run's
  epochs), saved into the workdir for ``eval``;
- ``eval:<row>``: fold 0's new-user evaluation of the saved model, as the pipeline does it
  (``tasks.evaluate.evaluation.evaluate_model`` without the stream part): n = 1, 5, 10, the
  stored 100 negatives, full ranking and bootstrap CIs as configured.

The growth exponent b between two sizes is log(t2/t1) / log(n2/n1) for a
stage that took t seconds on n: ratings for prepare, history rows for the
fits, tasks for tasks and meta, new-user cases for eval. b = 1 is linear.
The table gives b against every smaller size measured (100M against 1M and 10M).

Records go to ``<workdir>/scale.json`` as each stage ends, with the settings the stage
depends on (sample, cap, optimizer, baseline epochs, memory limit, threads); the report covers
every record whose settings are the current ones, so a size or a stage can be run on its own
(100m after 1m,10m; only meta and eval:responsive again with another --optimizer) and the
table and estimate still cover all of them. Other settings' records stay in the file.
The table, the goals and the estimate go to ``<workdir>/scale.md``.

Then a full-run estimate per size (``full_run_estimate``): what one ``metarec run``
(``data.new_user_folds`` folds, every default row) would take serially here, built
from the measured stages times the run's counts (epochs, folds, rows), and with
``runtime.max_workers`` slots and ``runtime.workers`` data-parallel meta-training
processes as ideal divisions. Each term says whether it is measured, multiplied
or assumed (a stage not measured taken as a measured one).

    .venv/bin/python benchmarks/scale.py [--sizes 1m,10m,100m] [--workdir /work/scratch/scale] [--sample-users 0]
        [--max-tasks 0] [--optimizer adam|lazy_adam] [--baseline-epochs 1] [--memory-limit 4GB] [--torch-threads 2]
        [--meta-shards 0] [--stages prepare,tasks,meta,fit:<row>,eval:<row>] [--tuned tuned/<dataset>.json] [--no-sweep] [--report]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DEFAULT_WORKDIR = Path("/work/scratch/scale")
GIB = 1 << 30


@dataclass(frozen=True)
class Shape:
    name: str
    layout: str  # "ml" (ratings.dat) or "netflix" (training_set/mv_*.txt)
    ratings: int
    users: int
    items: int
    min_per_user: int
    ts_range: tuple[int, int]  # seconds (ML) or days since 1999-11-11 (Netflix)
    max_user_id: int = 0  # Netflix customer ids are sparse up to this


SHAPES = {
    "1m": Shape("ml-1m-synthetic", "ml", 1_000_209, 6_040, 3_706, 20, (956_703_932, 1_046_454_590)),
    "10m": Shape("ml-10m-synthetic", "ml", 10_000_054, 69_878, 10_677, 20, (789_652_009, 1_231_131_736)),
    "100m": Shape("netflix-synthetic", "netflix", 100_480_507, 480_189, 17_770, 1, (0, 2_242), max_user_id=2_649_429),
}
RATING_SHARES = np.array([0.056, 0.108, 0.261, 0.349, 0.226])  # ML-1M's 1..5 stars
NETFLIX_DAY0 = dt.date(1999, 11, 11)


# ---------------------------------------------------------------- generating the logs
def sorted_unique(values: np.ndarray) -> np.ndarray:
    """np.unique by sorting (numpy 2's hash-based unique is ~80x slower on many distinct values)."""
    ordered = np.sort(values)
    return ordered[np.concatenate(([True], ordered[1:] != ordered[:-1]))] if len(ordered) else ordered


def user_counts(shape: Shape, rng: np.random.Generator) -> np.ndarray:
    """Ratings per user: log-normal activity, at least min_per_user, at most half the catalogue, summing to the target."""
    cap = shape.items // 2
    weights = rng.lognormal(0.0, 1.1, shape.users)
    counts = shape.min_per_user + np.floor((shape.ratings - shape.users * shape.min_per_user) * weights / weights.sum()).astype(np.int64)
    counts = np.minimum(counts, cap)
    while (short := shape.ratings - int(counts.sum())) > 0:  # hand the rounding and the capped surplus to users below the cap
        room = np.flatnonzero(counts < cap)
        counts[rng.choice(room, size=min(short, len(room)), replace=False)] += 1
    return counts


def rating_pairs(shape: Shape, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(user, item) with each user's items distinct, sorted by user.

    Items are drawn by a Zipf-like popularity with replacement (a little more than needed), repeats dropped and
    surplus trimmed at random; the few users left short are topped up with uniform draws, which rarely collide.
    """
    counts = user_counts(shape, rng)
    popularity = 1.0 / np.arange(1, shape.items + 1) ** 0.9
    cdf = np.cumsum(popularity[rng.permutation(shape.items)])
    cdf /= cdf[-1]
    users = np.repeat(np.arange(shape.users, dtype=np.int64), (counts * 1.2).astype(np.int64) + 2)
    keys = sorted_unique(users * shape.items + np.minimum(np.searchsorted(cdf, rng.random(len(users))), shape.items - 1))
    del users
    while True:
        owner = keys // shape.items
        have = np.bincount(owner, minlength=shape.users)
        if (have >= counts).all():
            break
        short = np.flatnonzero(have < counts)
        extra = np.repeat(short, 2 * (counts[short] - have[short]) + 2)
        keys = sorted_unique(np.concatenate([keys, extra * shape.items + rng.integers(0, shape.items, len(extra))]))
    # keep a random counts[u] of each user's distinct items
    order = np.lexsort((rng.random(len(keys)), owner))
    first = np.concatenate([[0], np.cumsum(have)[:-1]])
    rank = np.empty(len(keys), dtype=np.int64)
    rank[order] = np.arange(len(keys)) - first[owner[order]]
    keys = keys[rank < counts[owner]]
    return keys // shape.items, keys % shape.items


def digits(values: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """ASCII digits (n, width) of non-negative integers, right-aligned, and the mask keeping all but leading zeros."""
    powers = 10 ** np.arange(width - 1, -1, -1, dtype=np.int64)
    values = np.asarray(values, dtype=np.int64)[:, None]
    n_digits = np.maximum((values >= powers).sum(1, keepdims=True), 1)
    return ((values // powers) % 10 + 48).astype(np.uint8), np.arange(width) >= width - n_digits


def text_lines(*fields) -> tuple[bytes, np.ndarray]:
    """Concatenate per-line fields into text; a field is (digits, mask), a bytes constant, or an (n, w) uint8 block.

    Returns the bytes and each line's end offset."""
    n = next(len(f[0]) if isinstance(f, tuple) else len(f) for f in fields if not isinstance(f, bytes))
    blocks, masks = [], []
    for field in fields:
        if isinstance(field, bytes):
            block = np.broadcast_to(np.frombuffer(field, dtype=np.uint8), (n, len(field)))
            mask = np.ones((n, len(field)), dtype=bool)
        elif isinstance(field, tuple):
            block, mask = field
        else:
            block, mask = field, np.ones(field.shape, dtype=bool)
        blocks.append(block)
        masks.append(mask)
    block, mask = np.hstack(blocks), np.hstack(masks)
    return block[mask].tobytes(), np.cumsum(mask.sum(1))


def write_movielens(shape: Shape, folder: Path, rng: np.random.Generator) -> None:
    """ratings.dat, sorted by user as GroupLens ships it; ids from 1."""
    users, items = rating_pairs(shape, rng)
    stars = rng.choice(5, size=len(users), p=RATING_SHARES) + 1
    lo, hi = shape.ts_range
    start = rng.integers(lo, hi, shape.users)  # each user active from some moment on
    ts = lo + (start[users] - lo + rng.exponential(3e7, len(users)).astype(np.int64)) % (hi - lo)
    with open(folder / "ratings.dat", "wb") as out:
        for begin in range(0, len(users), 2_000_000):
            rows = slice(begin, begin + 2_000_000)
            text, _ = text_lines(digits(users[rows] + 1, 6), b"::", digits(items[rows] + 1, 6), b"::",
                                 (stars[rows] + 48).astype(np.uint8)[:, None], b"::", digits(ts[rows], 10), b"\n")
            out.write(text)


def write_netflix(shape: Shape, folder: Path, rng: np.random.Generator) -> None:
    """training_set/mv_0000001.txt ...: per movie, 'MovieID:' then one CustomerID,Rating,YYYY-MM-DD line per rating."""
    users, items = rating_pairs(shape, rng)
    customer = np.sort(rng.choice(shape.max_user_id, size=shape.users, replace=False) + 1)
    order = np.argsort(items, kind="stable")
    users, items = customer[users[order]], items[order]
    del order
    days = np.minimum((shape.ts_range[1] * rng.beta(2.0, 1.0, len(users))).astype(np.int64), shape.ts_range[1])
    dates = np.frombuffer("".join((NETFLIX_DAY0 + dt.timedelta(days=int(d))).isoformat() for d in range(shape.ts_range[1] + 1)).encode(),
                          dtype=np.uint8).reshape(-1, 10)
    stars = (rng.choice(5, size=len(users), p=RATING_SHARES) + 49).astype(np.uint8)[:, None]
    bounds = np.searchsorted(items, np.arange(shape.items + 1))
    (folder / "training_set").mkdir(parents=True, exist_ok=True)
    movie = 0
    while movie < shape.items:  # groups of movies of about 4M lines, formatted at once
        last = int(np.searchsorted(bounds, bounds[movie] + 4_000_000, side="right")) - 1
        last = min(max(last, movie + 1), shape.items)
        rows = slice(bounds[movie], bounds[last])
        text, ends = text_lines(digits(users[rows], 7), b",", stars[rows], b",", dates[days[rows]], b"\n")
        ends = np.concatenate([[0], ends])
        for m in range(movie, last):
            a, b = ends[bounds[m] - bounds[movie]], ends[bounds[m + 1] - bounds[movie]]
            (folder / "training_set" / f"mv_{m + 1:07d}.txt").write_bytes(f"{m + 1}:\n".encode() + text[a:b])
        movie = last


def generate(size: str, workdir: Path) -> Path:
    """The synthetic data set of ``size`` in its native format (generated once; a marker says it is complete)."""
    shape = SHAPES[size]
    folder = workdir / "data" / shape.name
    marker = folder / ".complete"
    if marker.is_file() and json.loads(marker.read_text()) == shape.__dict__ | {"ts_range": list(shape.ts_range)}:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    started = time.perf_counter()
    rng = np.random.default_rng(list(map(ord, size)))
    (write_movielens if shape.layout == "ml" else write_netflix)(shape, folder, rng)
    marker.write_text(json.dumps(shape.__dict__ | {"ts_range": list(shape.ts_range)}))
    print(f"generated {shape.name} ({shape.ratings:,} ratings) in {time.perf_counter() - started:.0f} s into {folder}", flush=True)
    return folder


# ---------------------------------------------------------------- stages (run in a child process)
def _config(args: argparse.Namespace, size: str):
    from metarec.config import Config

    folder = args.workdir / "data" / SHAPES[size].name
    return Config(
        data={"dataset": str(folder), "download": False},
        tasks={"shard_size": 65536},
        meta={"optimizer": args.optimizer},
        baselines={"epochs": args.baseline_epochs},
        runtime={"artifacts_dir": str(args.workdir / "artifacts" / size), "duckdb_memory_limit": args.memory_limit,
                 "duckdb_temp_dir": str(args.workdir / "spill"), "torch_threads": args.torch_threads,
                 "progress": False},
    )


def _sampled_history(config, n_users: int):
    """The prepared history of a seeded sample of users (all when fewer), read with a filter (bounded memory)."""
    import pyarrow.parquet as pq

    from metarec.interface import Interactions
    from tasks.runtime.paths import prepared_dir

    root = prepared_dir(config)
    users = pq.read_table(root / "users.parquet", columns=["user_id"]).column("user_id").to_numpy()
    if len(users) > n_users:
        users = np.sort(np.random.default_rng(0).choice(users, size=n_users, replace=False))
        table = pq.read_table(root / "history.parquet", columns=["user_id", "item_id", "ts"], filters=[("user_id", "in", users.tolist())])
    else:
        table = pq.read_table(root / "history.parquet", columns=["user_id", "item_id", "ts"])
    return Interactions.from_arrays(*(table.column(c).to_numpy() for c in ("user_id", "item_id", "ts")))


def _training_data(config, args):
    """(history, side features) a training stage uses: the whole prepared data as the pipeline loads it, or (with
    --sample-users) a sample's history without features."""
    from metarec.features import Features
    from tasks.data.prepared import load_prepared
    from tasks.runtime.paths import prepared_dir

    if args.sample_users:
        return _sampled_history(config, args.sample_users), Features()
    prepared = load_prepared(prepared_dir(config))
    return prepared.history, prepared.features


def _task_dir(config, args) -> Path:
    """The pipeline's own task folder (all users), or a sample's beside it."""
    from tasks.runtime.paths import task_shards_dir

    if args.sample_users:
        return args.workdir / "artifacts" / "tasks" / f"{SHAPES[args.size].name}-sample{args.sample_users}"
    return task_shards_dir(config)


def _model_dir(args, row: str) -> Path:
    """Where the meta and fit stages save a model for the eval stage (the workdir, not the pipeline's cache), named by
    the settings it was trained with, so an evaluation never picks up a model of other settings."""
    made_with = {k: v for k, v in settings(args, f"eval:{row}").items() if k != "torch_threads"}
    return args.workdir / "models" / args.size / f"{row}-{'-'.join(f'{k}={v}' for k, v in sorted(made_with.items()))}"


def stage_prepare(config, args) -> dict:
    from tasks.runtime.paths import prepared_dir
    from tasks.data.prepare import prepare_data

    shutil.rmtree(prepared_dir(config), ignore_errors=True)
    started = time.perf_counter()
    out = prepare_data(config)
    seconds = time.perf_counter() - started
    stats = json.loads((out / "stats.json").read_text())
    rows = stats["ratings_read"]
    return {"seconds": seconds, "rows": rows, "rows_are": "ratings", "rate": rows / seconds, "rate_unit": "ratings/s",
            "detail": f"{rows:,} ratings -> {stats['parts']['history']['rows']:,} history rows"}


def stage_tasks(config, args) -> dict:
    from metarec.meta_tasks import iter_tasks
    from tasks.train.task_shards import build_task_shards, read_manifest, write_task_shards

    out = _task_dir(config, args)
    shutil.rmtree(out, ignore_errors=True)
    t = config.tasks
    if args.sample_users:
        history = _sampled_history(config, args.sample_users)
        started = time.perf_counter()  # the same arguments as build_task_shards, on the sample
        write_task_shards(iter_tasks(history, t.k, t.support_size, t.seed, max_tasks_per_user=t.max_tasks_per_user, shuffle=t.shuffle,
                                     negatives=t.negatives), out, t.shard_size, {"K": t.support_size})
        seconds = time.perf_counter() - started
        users, interactions = len(np.unique(history.users)), len(history)
    else:
        started = time.perf_counter()
        build_task_shards(config)  # the pipeline's own step: loads the prepared data, builds, checks the count
        seconds = time.perf_counter() - started
    manifest = read_manifest(out)
    if not args.sample_users:
        users, interactions = manifest["history_users"], manifest["history_interactions"]
    n_tasks = manifest["n_tasks"]
    cap = "all positions" if t.max_tasks_per_user is None else f"at most {t.max_tasks_per_user} per user"
    return {"seconds": seconds, "rows": n_tasks, "rows_are": "tasks", "rate": n_tasks / seconds, "rate_unit": "tasks/s",
            "detail": f"{users:,} users, {interactions:,} history rows -> {n_tasks:,} tasks ({cap})"}


def _checkpoint_dir(args) -> Path:
    """Where a meta-epoch run in pieces keeps Θ between them (beside the model it will save)."""
    final = _model_dir(args, "responsive")
    return final.with_name(final.name + ".partial")


def stage_meta(config, args) -> dict:
    """One meta-epoch (or, with --shard-stop, the shards --shard-start .. --shard-stop - 1 of it, going on from the
    checkpoint the previous piece left); the last piece saves Θ for ``eval:responsive``."""
    import torch

    from metarec.models.responsive import from_config
    from tasks.runtime.atomic import atomic_path
    from tasks.train.models import save_model
    from tasks.train.task_shards import iter_task_shards, read_manifest

    torch.set_num_threads(args.torch_threads)
    config = config.for_row("responsive")
    history, _ = _training_data(config, args)
    model = from_config(config)
    model.set_index(history)
    model.init_params(history.n_users, history.n_items)  # as meta_train sizes Θ
    task_dir = _task_dir(config, args)
    n_shards = len(read_manifest(task_dir)["shards"])
    start, stop = args.shard_start, (args.shard_stop if args.shard_stop is not None else n_shards)
    checkpoint = _checkpoint_dir(args) / "state.pt"
    if start > 0 and not args.fresh_theta:
        model.load_training_state(torch.load(checkpoint, weights_only=True))

    def shards():
        held = 0
        for part in iter_task_shards(task_dir, start, stop):
            if args.max_tasks and held + len(part) > args.max_tasks:
                part = part.take(slice(0, args.max_tasks - held))
            held += len(part)
            yield part
            if args.max_tasks and held >= args.max_tasks:
                return

    stats = model.meta_train_epoch(shards(), 0, first_part=start)
    if stop < n_shards:
        with atomic_path(checkpoint) as tmp:
            torch.save(model.training_state(), tmp)
    else:
        model.reset_untrained_rows()
        save_model(model, "responsive", config, _model_dir(args, "responsive"))
    theta = f"Θ {history.n_users:,} users + {history.n_items:,} items, meta.optimizer = {config.meta.optimizer}"
    return {"seconds": stats.seconds, "rows": stats.tasks, "rows_are": "tasks", "rate": stats.tasks_per_s, "rate_unit": "tasks/s",
            "shards": [start, min(stop, n_shards), n_shards], "theta": theta, "detail": f"{stats.tasks:,} tasks, {theta}"}


def stage_fit(config, args, row: str) -> dict:
    import torch

    from metarec.models.factory import make_model
    from metarec.models.registry import ROWS
    from tasks.train.models import save_model

    torch.set_num_threads(1)  # as the pipeline fits baselines (tasks/train/models.py)
    history, features = _training_data(config, args)
    model = make_model(row, config)
    model.set_features(features)
    started = time.perf_counter()
    model.fit(history)
    seconds = time.perf_counter() - started
    save_model(model, row, config, _model_dir(args, row))
    passes = _passes(config, row)
    return {"seconds": seconds, "rows": len(history), "rows_are": "history rows", "rate": len(history) / seconds, "rate_unit": "rows/s",
            "detail": f"{len(history):,} history rows, " + (f"{passes} pass{'es' if passes > 1 else ''} over them" if ROWS[row].passes else "no epochs")}


def stage_eval(config, args, row: str) -> dict:
    """Fold 0's new-user evaluation of the saved model, through the pipeline's evaluate_model (stream part left out)."""
    import torch

    from tasks.evaluate.evaluation import eval_dir, evaluate_model, new_user_metric

    torch.set_num_threads(args.torch_threads)
    model = _model_dir(args, row)
    if not model.is_dir():
        raise FileNotFoundError(f"no saved model {model}: run the stage that saves it first ({'meta' if row == 'responsive' else 'fit:' + row})")
    shutil.rmtree(eval_dir(config, row), ignore_errors=True)  # evaluate_model reuses a finished evaluation
    started = time.perf_counter()
    record = evaluate_model(row, model, config, stream=False)
    seconds = time.perf_counter() - started
    per_n = {n: record["metrics"][new_user_metric(n, "hr")]["cases"] for n in config.data.new_user_ns if new_user_metric(n, "hr") in record["metrics"]}
    cases = sum(per_n.values())
    users = max(per_n.values(), default=0)
    return {"seconds": seconds, "rows": cases, "rows_are": "new-user cases", "rate": cases / seconds, "rate_unit": "cases/s",
            "detail": f"{users:,} new users x n = {','.join(map(str, per_n))}, {config.data.n_negatives} negatives"
                      f"{', full ranking' if config.eval.full_ranking else ''}; protocol {record['seconds']['new_users']:.1f} s"}


def run_stage(args: argparse.Namespace) -> None:
    """Child process: run one stage, print its JSON record as the last line."""
    config = _config(args, args.size)
    kind, _, row = args.stage.partition(":")
    if kind == "fit":
        record = stage_fit(config, args, row)
    elif kind == "eval":
        record = stage_eval(config, args, row)
    else:
        record = {"prepare": stage_prepare, "tasks": stage_tasks, "meta": stage_meta}[args.stage](config, args)
    print(json.dumps(record), flush=True)


# ---------------------------------------------------------------- the parent: children, table, exponents
def measure(args: argparse.Namespace, size: str, stage: str, shards: tuple[int, int] | None = None, fresh_theta: bool = False) -> dict:
    """Run a stage in a child process; its record plus the child's peak RSS (and wall time incl. start-up).
    ``shards``: (start, stop) of a meta-epoch run in pieces (``measure_meta_in_pieces``); ``fresh_theta``: the piece
    draws Θ instead of loading the checkpoint (``--meta-after``)."""
    if stage == "meta" and args.meta_shards and shards is None:
        return measure_meta_in_pieces(args, size)
    command = [sys.executable, __file__, "--stage", stage, "--size", size, "--workdir", str(args.workdir), "--sample-users", str(args.sample_users),
               "--max-tasks", str(args.max_tasks), "--optimizer", args.optimizer, "--baseline-epochs", str(args.baseline_epochs),
               "--memory-limit", args.memory_limit, "--torch-threads", str(args.torch_threads)]
    if shards is not None:
        command += ["--shard-start", str(shards[0]), "--shard-stop", str(shards[1])] + (["--fresh-theta"] if fresh_theta else [])
    started = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    output = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise RuntimeError(f"stage {stage} at {size} failed (exit {child.returncode}); its output:\n{output[-4000:]}")
    record = json.loads(output.strip().splitlines()[-1])
    record.update(size=size, stage=stage, peak_rss_gb=usage.ru_maxrss * 1024 / GIB, wall=time.perf_counter() - started)
    return record


def measure_meta_in_pieces(args: argparse.Namespace, size: str) -> dict:
    """The meta-epoch, ``--meta-shards`` task shards per child process, resumable: each piece's record goes to
    ``pieces.json`` beside the checkpoint as it ends, and a later call with the same settings and the same task
    shards goes on after the last piece recorded. One record: the pieces' epoch seconds and tasks summed, the
    largest peak RSS."""
    from tasks.train.task_shards import read_manifest

    args = argparse.Namespace(**{**vars(args), "size": size})  # what _task_dir and _model_dir read, as in the children
    task_manifest = read_manifest(_task_dir(_config(args, size), args))
    n_shards = len(task_manifest["shards"])
    folder = _checkpoint_dir(args)
    log = folder / "pieces.json"
    made_for = {"n_tasks": task_manifest["n_tasks"], "shards": n_shards, "config_hash": task_manifest.get("config_hash"),
                "meta_shards": args.meta_shards}
    done = json.loads(log.read_text()) if log.is_file() else None
    if done is None or done["made_for"] != made_for or not _can_go_on(done, folder):
        shutil.rmtree(folder, ignore_errors=True)
        done = {"made_for": made_for, "pieces": []}
        if args.meta_after:
            done |= earlier_pieces(args, size, made_for)
    folder.mkdir(parents=True, exist_ok=True)
    start = done["pieces"][-1]["shards"][1] if done["pieces"] else 0
    if start:
        print(f"{size:>5} meta: going on from shard {start} of {n_shards} ({len(done['pieces'])} pieces recorded in {log})", flush=True)
    while start < n_shards:
        stop = min(start + args.meta_shards, n_shards)
        piece = measure(args, size, "meta", (start, stop), fresh_theta=start == done.get("fresh_theta_at"))
        done["pieces"].append(piece)
        log.write_text(json.dumps(done, indent=2))
        print(f"{size:>5} meta shards {start}-{stop - 1} of {n_shards}: {piece['seconds']:8.1f} s  peak RSS {piece['peak_rss_gb']:5.2f} GB  "
              f"{piece['rows']:,} tasks", flush=True)
        start = stop
    pieces = done["pieces"]
    seconds, tasks = sum(p["seconds"] for p in pieces), sum(p["rows"] for p in pieces)
    shutil.rmtree(folder, ignore_errors=True)  # the last piece saved the model; nothing to go on from
    return pieces[-1] | {"seconds": seconds, "rows": tasks, "rate": tasks / seconds, "shards": [0, n_shards, n_shards],
                         "peak_rss_gb": max(p["peak_rss_gb"] for p in pieces), "wall": sum(p["wall"] for p in pieces),
                         "detail": f"{tasks:,} tasks, {pieces[-1]['theta']}, in {len(pieces)} processes of <= {args.meta_shards} shards "
                                   "(checkpoints between them)" + _restart_note(done)}


def _can_go_on(done: dict, folder: Path) -> bool:
    """A recorded run goes on from its checkpoint, or from a fresh Θ when it has only an earlier run's pieces."""
    stop = done["pieces"][-1]["shards"][1] if done["pieces"] else 0
    return (folder / "state.pt").is_file() or stop == done.get("fresh_theta_at", 0)


def earlier_pieces(args: argparse.Namespace, size: str, made_for: dict) -> dict:
    """``--meta-after FILE``: the unfinished meta-epoch recorded in FILE (a scale.json, same size and settings, the same
    task count and shards) as this run's first piece. Its checkpoint went with its machine, so the next shard starts
    from a freshly drawn Θ: a step's time does not depend on Θ's values, but the Θ saved at the end is not one epoch's."""
    wanted = settings(args, "meta")
    found = [r for r in read_records(args.meta_after) if r.get("size") == size and r.get("stage") == "meta" and "partial" in r
             and r.get("settings") == wanted]
    if not found:
        raise ValueError(f"--meta-after {args.meta_after}: no unfinished meta record of size {size} with settings {wanted}")
    record = found[-1]
    part = record["partial"]
    if record["rows"] != made_for["n_tasks"] or part["shards"][2] != made_for["shards"] or part["shards"][0] != 0:
        raise ValueError(f"--meta-after {args.meta_after}: its {size} epoch had {record['rows']:,} tasks in {part['shards'][2]} shards "
                         f"(from shard {part['shards'][0]}); these task shards have {made_for['n_tasks']:,} in {made_for['shards']}")
    piece = {k: record[k] for k in ("size", "stage", "theta", "peak_rss_gb")} | {
        "seconds": part["seconds"], "rows": part["tasks"], "rate": part["tasks"] / part["seconds"], "shards": part["shards"],
        "wall": part["seconds"],  # the earlier run kept its pieces' wall only in a log: its epoch seconds stand in
        "earlier_run": str(args.meta_after)}
    return {"pieces": [piece], "fresh_theta_at": part["shards"][1]}


def _restart_note(done: dict) -> str:
    if "fresh_theta_at" not in done:
        return ""
    at = done["fresh_theta_at"]
    return (f"; shards 0-{at - 1} measured in an earlier run ({done['pieces'][0]['earlier_run']}), Θ drawn afresh at shard {at} "
            "(step times do not depend on Θ's values; the saved Θ is not one epoch's)")


def partial_meta_record(args: argparse.Namespace, size: str) -> dict | None:
    """An unfinished meta-epoch run in pieces (``--meta-shards``), as a ``meta`` record extrapolated to the whole epoch:
    seconds = the pieces' seconds x (all tasks / the tasks they trained), so the table, the goals and the estimate can
    use it; ``partial`` says how much was measured. None when no piece of these settings was recorded."""
    log = _checkpoint_dir(argparse.Namespace(**{**vars(args), "size": size})) / "pieces.json"
    if not log.is_file():
        return None
    done = json.loads(log.read_text())
    pieces, total = done["pieces"], done["made_for"]["n_tasks"]
    seconds, tasks = sum(p["seconds"] for p in pieces), sum(p["rows"] for p in pieces)
    if tasks <= 0 or seconds <= 0:  # no piece yet
        return None
    shards = [pieces[0]["shards"][0], pieces[-1]["shards"][1], done["made_for"]["shards"]]
    return pieces[-1] | {
        "size": size, "stage": "meta", "seconds": seconds * total / tasks, "rows": total, "rate": tasks / seconds,
        "peak_rss_gb": max(p["peak_rss_gb"] for p in pieces), "settings": settings(args, "meta"),
        "partial": {"tasks": tasks, "seconds": seconds, "shards": shards},
        "detail": f"EXTRAPOLATED from {tasks:,} of {total:,} tasks (shards {shards[0]}-{shards[1] - 1} of {shards[2]}, "
                  f"{seconds:,.0f} s in {len(pieces)} pieces; the epoch is not finished), {pieces[-1]['theta']}" + _restart_note(done),
    }


def with_partial_meta(records: list[dict], args: argparse.Namespace) -> list[dict]:
    """The records plus, for each size whose meta-epoch is unfinished, its extrapolated record."""
    finished = {r["size"] for r in records if r["stage"] == "meta"}
    partial = [partial_meta_record(args, size) for size in SHAPES if size not in finished]
    return records + [r for r in partial if r is not None]


def settings(args: argparse.Namespace, stage: str) -> dict:
    """What a stage's numbers depend on besides size and stage: records of other settings are never compared."""
    ours = stage in ("meta", "eval:responsive")
    kind = stage.partition(":")[0]
    used = {"prepare": ("memory_limit",), "tasks": ("sample_users",)}.get(stage) or (
        ("sample_users", "max_tasks", "optimizer", "torch_threads") if ours else
        ("sample_users", "baseline_epochs") + (("torch_threads",) if kind == "eval" else ()))
    return {name: getattr(args, name) for name in used}


def merged(earlier: list[dict], new: list[dict]) -> list[dict]:
    """Every record kept in scale.json: the new ones, and the earlier ones not measured again with the same settings."""
    fresh = {(r["size"], r["stage"], json.dumps(r.get("settings"), sort_keys=True)) for r in new}
    return [r for r in earlier if (r["size"], r["stage"], json.dumps(r.get("settings"), sort_keys=True)) not in fresh] + new


def read_records(path: Path) -> list[dict]:
    return json.loads(path.read_text()) if path.is_file() else []


def save_records(path: Path, records: list[dict]) -> None:
    """This run's records merged into the file as it is now (not as it was when the run began: another size may be
    measured beside this one in the same workdir), written to a temporary file and renamed."""
    from tasks.runtime.atomic import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(merged(read_records(path), records), indent=2))


def of_settings(records: list[dict], args: argparse.Namespace) -> list[dict]:
    """The records a report may compare: each stage's measured with the current settings of what it depends on."""
    return [r for r in records if r.get("settings") == settings(args, r["stage"])]


def exponent(a: dict, b: dict) -> float | None:
    """b in t ~ n^b between two records of a stage (None when n did not grow)."""
    if a["rows"] <= 0 or b["rows"] <= a["rows"] or a["seconds"] <= 0 or b["seconds"] <= 0:
        return None
    return math.log(b["seconds"] / a["seconds"]) / math.log(b["rows"] / a["rows"])


def table(records: list[dict], sizes: list[str]) -> str:
    stages = list(dict.fromkeys(r["stage"] for r in records))
    by = {(r["size"], r["stage"]): r for r in records}
    lines = ["| stage | size | seconds | peak RSS (GB) | n | rate | b vs smaller sizes | what |", "|---|---|---:|---:|---:|---:|---|---|"]
    for stage in stages:
        earlier: list[dict] = []
        for size in sizes:
            r = by.get((size, stage))
            if r is None:
                continue
            bs = ", ".join(f"{e['size']}: {b:.2f}" for e in earlier if (b := exponent(e, r)) is not None)
            rate = f"{r['rate']:,.0f} {r['rate_unit']}" if r.get("rate") and r["seconds"] >= 0.1 else ""  # not a rate of a timer's noise
            lines.append(f"| {stage} | {size} | {r['seconds']:.1f} | {r['peak_rss_gb']:.2f} | {r['rows']:,} {r['rows_are']} | {rate} | {bs} | {r['detail']} |")
            earlier.append(r)
    return "\n".join(lines)


# ---------------------------------------------------------------- the full-run estimate
@dataclass(frozen=True)
class RunPlan:
    """The counts one ``metarec run`` multiplies the measured stages by, read from the config the run would use."""

    folds: int  # data.new_user_folds: prepare, tasks, trainings, fits and evaluations run once per fold
    ours: dict[str, int]  # each of our rows in eval.models -> its meta.epochs (after tuned values)
    fits: dict[str, float]  # each other row -> its fit's passes in the run / passes in the measured fit
    sweep_points: int  # λ_ML sweep points (fold 0 only; metarec run's default --sweep), 0 = --no-sweep
    max_workers: int  # runtime.max_workers: stages computing side by side
    workers: int  # data-parallel meta-training processes


def _passes(config, row: str) -> int:
    """A row's full passes over the history in a fit (its registry ``passes`` fields; 1 for a row without)."""
    from metarec.models.registry import ROWS

    row_config = config.for_row(row)
    fields = [getattr(getattr(row_config, s), f) for s, _, f in (key.partition(".") for key in ROWS[row].passes)]
    return max(1, sum(fields)) if fields else 1


def run_plan(run_config, measured_config, workers: int | None = None, sweep: bool = True) -> RunPlan:
    """What a run of ``run_config`` repeats, against the fits measured with ``measured_config`` (--baseline-epochs)."""
    from metarec.models.registry import ROWS

    models = run_config.eval.models
    return RunPlan(
        folds=run_config.data.new_user_folds,
        ours={row: run_config.for_row(row).meta.epochs for row in models if ROWS[row].is_ours},
        fits={row: _passes(run_config, row) / _passes(measured_config, row) for row in models if not ROWS[row].is_ours},
        sweep_points=len(run_config.eval.lambda_sweep) if sweep else 0,
        max_workers=run_config.runtime.max_workers,
        workers=workers or run_config.runtime.workers,
    )


@dataclass(frozen=True)
class Term:
    what: str
    count: float  # how many times the stage's measured seconds enter
    stage: str  # the measured stage it multiplies
    how: str  # "measured" (count 1), "multiplied" (a measured stage times a count), "assumed" (another stage stands in)
    meta: bool = False  # a meta-training term (divided by data-parallel workers)


def run_terms(plan: RunPlan) -> list[Term]:
    """Every term of one run: per fold prepare, per our row its tasks, epochs and evaluation, per other row its fit
    and evaluation; then the λ_ML sweep on fold 0. Our rows other than Ours (paper) are not measured: its stages
    stand in for theirs."""
    F = plan.folds
    terms = [Term(f"prepare x {F} folds", F, "prepare", "multiplied")]
    for row, epochs in plan.ours.items():
        how = "multiplied" if row == "responsive" else "assumed"
        terms += [Term(f"{row}: tasks x {F} folds", F, "tasks", how),
                  Term(f"{row}: meta-epoch x {epochs} epochs x {F} folds", epochs * F, "meta", how, meta=True),
                  Term(f"{row}: new-user evaluation x {F} folds", F, "eval:responsive", how)]
    for row, factor in plan.fits.items():
        terms += [Term(f"{row}: fit x {factor:g} (its passes / measured) x {F} folds", factor * F, f"fit:{row}", "multiplied"),
                  Term(f"{row}: new-user evaluation x {F} folds", F, f"eval:{row}", "multiplied")]
    if plan.sweep_points and "responsive" in plan.ours:
        epochs = plan.ours["responsive"]
        terms += [Term(f"λ_ML sweep: {plan.sweep_points} points x {epochs} meta-epochs (fold 0)", plan.sweep_points * epochs, "meta", "multiplied", meta=True),
                  Term(f"λ_ML sweep: {plan.sweep_points} new-user evaluations (fold 0)", plan.sweep_points, "eval:responsive", "multiplied")]
    return terms


@dataclass(frozen=True)
class Estimate:
    serial: float  # seconds, one process after another
    slots: float  # serial / max_workers: stages side by side in ideal packing
    data_parallel: float  # meta terms / workers, the rest serial
    meta: float  # the meta-training part of serial
    missing: tuple[str, ...]  # stages a term needs that were not measured (the totals leave those terms out)


def full_run_estimate(seconds: dict[str, float], plan: RunPlan) -> Estimate:
    """Seconds of one run from the measured stage seconds (``seconds[stage]``) and the plan's counts."""
    serial = meta = 0.0
    missing: list[str] = []
    for term in run_terms(plan):
        if term.stage not in seconds:
            missing.append(term.stage)
            continue
        part = term.count * seconds[term.stage]
        serial += part
        meta += part if term.meta else 0.0
    return Estimate(serial, serial / plan.max_workers, serial - meta + meta / plan.workers, meta, tuple(dict.fromkeys(missing)))


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def estimate_report(records: list[dict], sizes: list[str], plan: RunPlan, optimizer: str, baseline_epochs: int, sample_users: int) -> str:
    """The estimate per size with its formula, and which terms are measured, multiplied or assumed."""
    lines = ["## Full-run estimate", "",
             f"One `metarec run` = {plan.folds} folds x (prepare + per row of ours: tasks + meta.epochs meta-epochs + new-user "
             f"evaluation; per other row: fit x (its passes / the {baseline_epochs} measured) + new-user evaluation) + the λ_ML sweep "
             f"({plan.sweep_points} points x meta.epochs meta-epochs + a new-user evaluation each, fold 0). meta.optimizer = {optimizer}.",
             "Terms:"]
    for term in run_terms(plan):
        lines.append(f"- {term.what}: {term.count:g} x `{term.stage}` ({term.how})")
    lines += ["", "Left out (not measured): each evaluation's stream part (10 batches scored, then observed: online meta-updates, "
              "RKMF/SPMF updates, sRec filtering), pooling and the report, MLflow and Prefect overhead, the champion decision. "
              "A fit's set-up is multiplied with its epochs (an upper bound); Ours+ (responsive_plus) is taken as Ours (paper), "
              "though its supports hold k own triples, not K, so its epochs are cheaper; the sweep's evaluations have no full ranking "
              "(taken as ours' with it, an upper bound).", ""]
    if sample_users:
        lines.append(f"Measured on a {sample_users:,}-user sample: the training terms are NOT a full run's.")
    lines += ["| size | serial | of it meta-training | ideal with runtime.max_workers = "
              f"{plan.max_workers} slots | meta data-parallel over runtime.workers = {plan.workers} | not measured |", "|---|---:|---:|---:|---:|---|"]
    for size in sizes:
        seconds = {r["stage"]: r["seconds"] for r in records if r["size"] == size}
        if not seconds:
            continue
        e = full_run_estimate(seconds, plan)
        lines.append(f"| {size} | {_hours(e.serial)} | {_hours(e.meta)} | {_hours(e.slots)} | {_hours(e.data_parallel)} | {', '.join(e.missing)} |")
    lines += ["", f"The parallel columns are ideal divisions, not measured; slots and data-parallel workers share the same "
              f"{os.cpu_count()} cores here, so no combination beats serial / {os.cpu_count()} on this machine."]
    return "\n".join(lines)


def verdicts(records: list[dict]) -> list[str]:
    """The issue's goals: 100M's meta throughput within 1.5x of 10M's; every stage under 16 GB; 100M prepare under 8 GB."""
    by = {(r["size"], r["stage"]): r for r in records}
    out = []
    if ("10m", "meta") in by and ("100m", "meta") in by:
        ratio = by[("10m", "meta")]["rate"] / by[("100m", "meta")]["rate"]
        measured = by[("100m", "meta")].get("partial")
        on = f" (on {measured['tasks']:,} of {by[('100m', 'meta')]['rows']:,} tasks: the epoch is not finished)" if measured else ""
        out.append(f"meta-epoch throughput: 10M {by[('10m', 'meta')]['rate']:,.0f} tasks/s, 100M {by[('100m', 'meta')]['rate']:,.0f} tasks/s{on}, "
                   f"10M/100M = {ratio:.2f}: {'within' if ratio <= 1.5 else 'NOT within'} 1.5x")
    over = [f"{r['stage']} at {r['size']} ({r['peak_rss_gb']:.1f} GB)" for r in records if r["peak_rss_gb"] >= 16]
    out.append("every stage under 16 GB peak RSS" if not over else "OVER 16 GB: " + ", ".join(over))
    if ("100m", "prepare") in by:
        gb = by[("100m", "prepare")]["peak_rss_gb"]
        out.append(f"100M prepare: peak RSS {gb:.2f} GB, {'under' if gb < 8 else 'OVER'} the 8 GB bound")
    return out


def default_stages() -> str:
    from metarec.models.registry import DEFAULT_MODELS, ROWS

    others = [row for row in DEFAULT_MODELS if not ROWS[row].is_ours]
    return ",".join(["prepare", "tasks", "meta", *(f"fit:{r}" for r in others), "eval:responsive", *(f"eval:{r}" for r in others)])


def _plan_for(args: argparse.Namespace) -> RunPlan:
    """The plan of a run on this data set: the default config (with --tuned's values), against the measured fits."""
    from metarec.config import Config

    measured = _config(args, "1m")
    tuned = {}
    if args.tuned:
        record = json.loads(args.tuned.read_text())
        tuned = {row: {k: v for k, v in values["chosen"].items()} for row, values in record.get("models", {}).items()}
    run = Config(meta={"optimizer": args.optimizer}, tuned=tuned)
    return run_plan(run, measured, workers=run.runtime.max_workers, sweep=not args.no_sweep)


def main() -> None:
    from metarec.config import Config

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1m,10m,100m")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help="scratch folder for the logs and outputs (outside the repository)")
    parser.add_argument("--sample-users", type=int, default=0, help="a seeded sample of this many users for the training stages (0 = all)")
    parser.add_argument("--max-tasks", type=int, default=0, help="cap on the tasks of the meta-epoch (0 = all)")
    parser.add_argument("--optimizer", choices=("adam", "lazy_adam"), default=Config().meta.optimizer,
                        help="meta.optimizer of the meta stage (default: the pipeline's own setting; README recommends lazy_adam at Netflix scale)")
    parser.add_argument("--baseline-epochs", type=int, default=1, help="baselines.epochs of each fit stage (the estimate multiplies it up)")
    parser.add_argument("--memory-limit", default="4GB", help="runtime.duckdb_memory_limit for prepare")
    parser.add_argument("--torch-threads", type=int, default=2, help="torch threads of the meta-epoch and evaluations (DuckDB uses runtime.max_workers)")
    parser.add_argument("--stages", default=None, help="comma-separated (default: prepare, tasks, meta, a fit and an eval of every default row)")
    parser.add_argument("--tuned", type=Path, help="a tuning record (tuned/<dataset>.json) whose epochs the estimate uses (default: the config's)")
    parser.add_argument("--no-sweep", action="store_true", help="estimate `metarec run --no-sweep` (no λ_ML sweep)")
    parser.add_argument("--report", action="store_true", help="measure nothing: the report of <workdir>/scale.json's records of these settings")
    parser.add_argument("--meta-shards", type=int, default=0,
                        help="run the meta-epoch this many task shards per child process, resumable through a checkpoint (0 = one process)")
    parser.add_argument("--meta-after", type=Path,
                        help="with --meta-shards: a scale.json whose unfinished meta-epoch of the same size and settings counts as the "
                             "epoch's first pieces; the rest runs from a freshly drawn Θ (its checkpoint is gone)")
    parser.add_argument("--stage", help=argparse.SUPPRESS)
    parser.add_argument("--fresh-theta", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--shard-start", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--shard-stop", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--size", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.sample_users < 0 or args.max_tasks < 0 or args.meta_shards < 0:
        parser.error("--sample-users, --max-tasks and --meta-shards must be >= 0 (0 = all, one process)")
    if args.meta_after and not args.meta_shards:
        parser.error("--meta-after goes on from an earlier run's pieces; give --meta-shards too")
    if args.meta_shards and args.max_tasks:
        parser.error("--meta-shards runs every task of the epoch in pieces; it does not combine with --max-tasks")
    if args.stage:
        run_stage(args)
        return
    root = Path(__file__).resolve().parents[1]
    if args.workdir.resolve().is_relative_to(root):
        parser.error(f"--workdir {args.workdir} is inside the repository; generated data never goes there")
    stages = (args.stages or default_stages()).split(",")
    saved = args.workdir / "scale.json"
    records: list[dict] = []
    for size in [] if args.report else args.sizes.split(","):
        generate(size, args.workdir)
        for stage in stages:
            record = measure(args, size, stage) | {"settings": settings(args, stage)}
            records.append(record)
            print(f"{size:>5} {stage:<16} {record['seconds']:8.1f} s  peak RSS {record['peak_rss_gb']:5.2f} GB  {record['detail']}", flush=True)
            save_records(saved, records)  # a long run keeps what it measured so far
    records = of_settings(read_records(saved), args)  # this run's records were saved into it as they came
    records = with_partial_meta(records, args)
    sizes = [size for size in SHAPES if any(r["size"] == size for r in records)]
    report = "\n\n".join([table(records, sizes), "\n".join(verdicts(records)),
                          estimate_report(records, sizes, _plan_for(args), args.optimizer, args.baseline_epochs, args.sample_users)])
    print()
    print(report)
    (args.workdir / "scale.md").write_text(report + "\n")


if __name__ == "__main__":
    main()
