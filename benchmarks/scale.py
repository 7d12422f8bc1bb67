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
stage's alone (``os.wait4``'s rusage of the child):

- ``prepare``: the whole file through ``tasks.data.prepare.prepare_data`` (DuckDB with
  ``runtime.duckdb_memory_limit`` and a spill folder, ``--memory-limit``), streaming
  every line; at 100M it must stay under 8 GB;
- ``tasks``: the task shards (docs/method.md §4) of the prepared history of a seeded
  sample of ``--sample-users`` users (all users when there are fewer);
- ``meta``: one meta-training epoch on at most ``--max-tasks`` of those tasks, with
  Θ sized for every user and item of the data set (Adam updates all of it);
- ``fit:<row>``: one fit of each baseline on the same sampled history, with
  ``baselines.epochs = --baseline-epochs`` (their tuned epochs would take hours at 100M).

The growth exponent b between consecutive sizes is log(t2/t1) / log(n2/n1) for
a stage that took t seconds on n rows: ratings for prepare, history rows for
tasks and the fits, rows of Θ for the meta-epoch (its tasks are capped, so what
grows is the table Adam updates at every step). b = 1 is linear.

    .venv/bin/python benchmarks/scale.py [--sizes 1m,10m,100m] [--workdir /work/scratch/scale] [--sample-users 20000]
        [--max-tasks 100000] [--baseline-epochs 1] [--memory-limit 4GB] [--torch-threads 2]
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
BASELINE_ROWS = ("pop", "mf_ft", "rkmf", "srec", "spmf")


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
    history = Interactions.from_arrays(*(table.column(c).to_numpy() for c in ("user_id", "item_id", "ts")))
    return history, pq.read_metadata(root / "items.parquet").num_rows


def stage_prepare(config, args) -> dict:
    from tasks.runtime.paths import prepared_dir
    from tasks.data.prepare import prepare_data

    shutil.rmtree(prepared_dir(config), ignore_errors=True)
    started = time.perf_counter()
    out = prepare_data(config)
    seconds = time.perf_counter() - started
    stats = json.loads((out / "stats.json").read_text())
    return {"seconds": seconds, "rows": stats["ratings_read"], "rows_are": "ratings", "detail": f"{stats['ratings_read']:,} ratings -> {stats['parts']['history']['rows']:,} history rows"}


def stage_tasks(config, args) -> dict:
    from metarec.meta_tasks import iter_tasks
    from tasks.train.task_shards import write_task_shards

    history, n_items = _sampled_history(config, args.sample_users)
    out = args.workdir / "artifacts" / "tasks" / SHAPES[args.size].name
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    t = config.tasks
    write_task_shards(iter_tasks(history, t.k, t.K, t.seed, n_items=n_items), out, t.shard_size, {"K": t.K})
    seconds = time.perf_counter() - started
    n_tasks = json.loads((out / "manifest.json").read_text())["n_tasks"]
    users = len(np.unique(history.users))
    return {"seconds": seconds, "rows": len(history), "rows_are": "history rows", "detail": f"{users:,} users, {len(history):,} history rows -> {n_tasks:,} tasks"}


def stage_meta(config, args) -> dict:
    import pyarrow.parquet as pq
    import torch

    from metarec.models.responsive import ResponsiveMF
    from tasks.runtime.paths import prepared_dir
    from tasks.train.task_shards import iter_task_shards

    torch.set_num_threads(args.torch_threads)
    root = prepared_dir(config)
    n_users, n_items = pq.read_metadata(root / "users.parquet").num_rows, pq.read_metadata(root / "items.parquet").num_rows
    parts, held = [], 0
    for part in iter_task_shards(args.workdir / "artifacts" / "tasks" / SHAPES[args.size].name):
        parts.append(part.take(slice(0, args.max_tasks - held)))
        held += len(parts[-1])
        if held >= args.max_tasks:
            break
    model = ResponsiveMF(config.meta, config.tasks, "cpu")
    model.init_params(n_users, n_items)
    stats = model.meta_train_epoch(parts, 0)
    # the tasks are capped, so what grows with the data set is Θ (Adam updates every row each step)
    return {"seconds": stats.seconds, "rows": n_users + n_items, "rows_are": "rows of Θ",
            "detail": f"{stats.tasks:,} tasks, Θ {n_users:,} users + {n_items:,} items: {stats.tasks_per_s:,.0f} tasks/s"}


def stage_fit(config, args, row: str) -> dict:
    import torch

    from metarec.models.factory import make_model

    torch.set_num_threads(1)  # as the pipeline fits baselines (tasks/train/models.py)
    history, _ = _sampled_history(config, args.sample_users)
    started = time.perf_counter()
    make_model(row, config).fit(history)
    return {"seconds": time.perf_counter() - started, "rows": len(history), "rows_are": "history rows", "detail": f"{len(history):,} history rows, {args.baseline_epochs} epoch(s)"}


def run_stage(args: argparse.Namespace) -> None:
    """Child process: run one stage, print its JSON record as the last line."""
    config = _config(args, args.size)
    if args.stage.startswith("fit:"):
        record = stage_fit(config, args, args.stage.split(":", 1)[1])
    else:
        record = {"prepare": stage_prepare, "tasks": stage_tasks, "meta": stage_meta}[args.stage](config, args)
    print(json.dumps(record), flush=True)


# ---------------------------------------------------------------- the parent: children, table, exponents
def measure(args: argparse.Namespace, size: str, stage: str) -> dict:
    """Run a stage in a child process; its record plus the child's peak RSS (and wall time incl. start-up)."""
    command = [sys.executable, __file__, "--stage", stage, "--size", size, "--workdir", str(args.workdir), "--sample-users", str(args.sample_users),
               "--max-tasks", str(args.max_tasks), "--baseline-epochs", str(args.baseline_epochs), "--memory-limit", args.memory_limit,
               "--torch-threads", str(args.torch_threads)]
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


def exponent(a: dict, b: dict) -> float | None:
    if a["rows"] <= 0 or b["rows"] <= a["rows"] or a["seconds"] <= 0:
        return None
    return math.log(b["seconds"] / a["seconds"]) / math.log(b["rows"] / a["rows"])


def table(records: list[dict], sizes: list[str]) -> str:
    stages = list(dict.fromkeys(r["stage"] for r in records))
    by = {(r["size"], r["stage"]): r for r in records}
    lines = ["| stage | size | seconds | peak RSS (GB) | n | b vs previous size | what |", "|---|---|---:|---:|---:|---:|---|"]
    for stage in stages:
        previous = None
        for size in sizes:
            r = by.get((size, stage))
            if r is None:
                continue
            b = exponent(previous, r) if previous else None
            lines.append(f"| {stage} | {size} | {r['seconds']:.1f} | {r['peak_rss_gb']:.2f} | {r['rows']:,} {r['rows_are']} | {'' if b is None else f'{b:.2f}'} | {r['detail']} |")
            previous = r
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1m,10m,100m")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help="scratch folder for the logs and outputs (outside the repository)")
    parser.add_argument("--sample-users", type=int, default=20_000, help="users whose history the training stages use")
    parser.add_argument("--max-tasks", type=int, default=100_000, help="tasks in the meta-training epoch")
    parser.add_argument("--baseline-epochs", type=int, default=1)
    parser.add_argument("--memory-limit", default="4GB", help="runtime.duckdb_memory_limit for prepare")
    parser.add_argument("--torch-threads", type=int, default=2, help="torch threads of the meta-epoch (DuckDB uses runtime.max_workers)")
    parser.add_argument("--stages", default="prepare,tasks,meta," + ",".join(f"fit:{r}" for r in BASELINE_ROWS))
    parser.add_argument("--stage", help=argparse.SUPPRESS)
    parser.add_argument("--size", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stage:
        run_stage(args)
        return
    root = Path(__file__).resolve().parents[1]
    if args.workdir.resolve().is_relative_to(root):
        parser.error(f"--workdir {args.workdir} is inside the repository; generated data never goes there")
    sizes = args.sizes.split(",")
    records: list[dict] = []
    for size in sizes:
        generate(size, args.workdir)
        for stage in args.stages.split(","):
            record = measure(args, size, stage)
            records.append(record)
            print(f"{size:>5} {stage:<10} {record['seconds']:8.1f} s  peak RSS {record['peak_rss_gb']:5.2f} GB  {record['detail']}", flush=True)
    print()
    print(table(records, sizes))
    prepare_100m = next((r for r in records if r["size"] == "100m" and r["stage"] == "prepare"), None)
    if prepare_100m is not None:
        verdict = "under" if prepare_100m["peak_rss_gb"] < 8 else "OVER"
        print(f"\n100M prepare: peak RSS {prepare_100m['peak_rss_gb']:.2f} GB, {verdict} the 8 GB bound")
    (args.workdir / "scale.json").write_text(json.dumps(records, indent=2))
    (args.workdir / "scale.md").write_text(table(records, sizes) + "\n")


if __name__ == "__main__":
    main()
