"""Task construction speed (docs/method.md §4): tasks built per second, and peak memory.

Two histories: ml-100k (ratings >= 3, read straight from u.data) and a synthetic
one of 1M interactions with ML-1M's shape (6k users, 3.7k items, skewed
popularity, long-tailed user activity). The vectorised ``build_tasks`` is
compared with a plain per-task Python reference (the same sampling rules, one
task at a time) on a sample of tasks in the same run, and the ratio printed.

    .venv/bin/python benchmarks/build_tasks.py [--n 1000000] [--reference-tasks 3000]
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import sys
import tempfile
import time
from bisect import bisect_right
from collections import defaultdict
from pathlib import Path

import numpy as np

from metarec.interface import Interactions
from metarec.meta_tasks import build_tasks, iter_tasks

ML100K = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "ml-100k" / "u.data"


def ml100k() -> Interactions:
    raw = np.loadtxt(ML100K, dtype=np.int64)
    raw = raw[raw[:, 2] >= 3]
    return Interactions.from_arrays(raw[:, 0] - 1, raw[:, 1] - 1, raw[:, 3])


def synthetic(n: int, n_users: int = 6040, n_items: int = 3700, seed: int = 0) -> Interactions:
    """ML-1M-shaped history: lognormal activity per user, Zipf-like item popularity, distinct pairs."""
    rng = np.random.default_rng(seed)
    activity = rng.lognormal(0.0, 1.0, n_users)
    users = rng.choice(n_users, size=int(n * 1.6), p=activity / activity.sum())
    popularity = 1.0 / np.arange(1, n_items + 1) ** 0.9
    items = rng.choice(n_items, size=len(users), p=popularity / popularity.sum())
    pairs = np.unique(users * n_items + items)
    pairs = pairs[rng.permutation(len(pairs))[:n]]
    ts = np.sort(rng.integers(9 * 10**8, 10**9, len(pairs)))
    return Interactions.from_arrays(pairs // n_items, pairs % n_items, ts)


def reference_index(history: Interactions) -> tuple:
    """Python dicts for the plain reference: timelines, item -> [(first ts, user)], (user, item) -> first ts."""
    timeline = defaultdict(list)  # user -> [(ts, item)]
    item_users = defaultdict(list)  # item -> [(first ts, user)]
    first = {}
    for u, v, t in sorted(zip(history.users.tolist(), history.items.tolist(), history.ts.tolist()), key=lambda r: (r[0], r[2], r[1])):
        timeline[u].append((t, v))
        first.setdefault((u, v), t)
    for (u, v), t in first.items():
        item_users[v].append((t, u))
    for v in item_users:
        item_users[v].sort()
    return timeline, item_users, first


def reference_tasks(history: Interactions, index: tuple, k: int, K: int, count: int, seed: int) -> int:
    """The same tasks written plainly, one at a time over the dicts; returns tasks built."""
    rng = np.random.default_rng(seed)
    timeline, item_users, first = index
    n_items = history.n_items
    positions = [(u, i) for u, line in timeline.items() for i in range(k, len(line))]
    built = 0
    for pick in rng.choice(len(positions), size=min(count, len(positions)), replace=False):
        u, i = positions[pick]
        line = timeline[u]
        own = [v for _, v in line[i - k : i]]
        cutoff = line[i - 1][0]
        triples = [(u, v) for v in own]
        usable = [v for v in own if any(w != u for t, w in item_users[v][: bisect_right(item_users[v], (cutoff, 1 << 62))])]
        for _ in range(K - k):
            if not usable:
                triples.append((u, own[rng.integers(len(own))]))
                continue
            v = usable[rng.integers(len(usable))]
            others = [w for t, w in item_users[v] if t <= cutoff and w != u]
            w = others[rng.integers(len(others))]
            past = [x for t, x in timeline[w] if t <= cutoff]
            triples.append((w, past[rng.integers(len(past))]))
        triples.append((u, line[i][1]))
        for n, (w, _) in enumerate(triples):  # a negative avoids what w had by then: the support's cutoff, the query's ts
            by = cutoff if n < K else line[i][0]
            while True:
                neg = int(rng.integers(n_items))
                if first.get((w, neg), by + 1) > by:
                    break
        built += 1
    return built


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(name: str, history: Interactions, k: int, K: int, reference_count: int) -> None:
    started = time.perf_counter()
    tasks = build_tasks(history, k, K, seed=0)
    seconds = time.perf_counter() - started
    fast = len(tasks) / seconds
    rss = peak_rss_mb()  # before the reference's dicts inflate it
    fallback = float((tasks.support_users[:, k:] == tasks.query_user[:, None]).all(axis=1).mean()) if len(tasks) else 0.0
    started = time.perf_counter()
    index = reference_index(history)
    ref_index_seconds = time.perf_counter() - started
    started = time.perf_counter()
    done = reference_tasks(history, index, k, K, reference_count, seed=0)
    ref_seconds = time.perf_counter() - started
    slow = done / ref_seconds
    print(
        f"{name}: {len(history):,} interactions, {len(np.unique(history.users)):,} users -> {len(tasks):,} tasks (k={k}, K={K})\n"
        f"  build_tasks: {seconds:.2f}s (index included) = {fast:,.0f} tasks/s, peak RSS so far {rss:,.0f} MB\n"
        f"  tasks without any neighbour (own items repeated instead): {fallback:.2%}\n"
        f"  per-task reference: {slow:,.0f} tasks/s ({done:,} tasks in {ref_seconds:.1f}s, after {ref_index_seconds:.1f}s building its dicts)\n"
        f"  ratio {fast / slow:,.0f}x",
        flush=True,
    )


def measure_shards(name: str, history: Interactions, k: int, K: int, shard_size: int = 65536) -> None:
    """Tasks streamed chunk by chunk into Parquet shards, as ``tasks.train.task_shards.build_task_shards`` does."""
    from tasks.train.task_shards import read_manifest, write_task_shards

    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        out = write_task_shards(iter_tasks(history, k, K, seed=0), Path(tmp) / "tasks", shard_size, {"K": K})
        seconds = time.perf_counter() - started
        manifest = read_manifest(out)
        size = sum(f.stat().st_size for f in out.iterdir()) / 2**20
    print(
        f"{name} streamed to shards: {manifest['n_tasks']:,} tasks in {manifest['n_shards']} shards ({size:,.0f} MB) "
        f"in {seconds:.2f}s = {manifest['n_tasks'] / seconds:,.0f} tasks/s, peak RSS {peak_rss_mb():,.0f} MB",
        flush=True,
    )


def _in_fresh_process(target, *args) -> None:
    """Run one measurement in a spawned interpreter, so its peak RSS is its own."""
    process = multiprocessing.get_context("spawn").Process(target=target, args=args)
    process.start()
    process.join()
    if process.exitcode:
        raise SystemExit(f"{target.__name__}{args[:1]} failed with exit code {process.exitcode}")


def _run(kind: str, n: int, k: int, K: int, reference_count: int) -> None:
    history = ml100k() if kind == "ml-100k" else synthetic(n)
    name = kind if kind == "ml-100k" else f"synthetic-{n // 1000}k"
    if kind == "shards":
        measure_shards(name, history, k, K)
    else:
        measure(name, history, k, K, reference_count)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="synthetic interactions")
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--K", type=int, default=20)
    parser.add_argument("--reference-tasks", type=int, default=3000)
    args = parser.parse_args(argv)
    print(f"python {sys.version.split()[0]}, numpy {np.__version__}", flush=True)
    for kind in ("ml-100k", "synthetic", "shards"):
        _in_fresh_process(_run, kind, args.n, args.k, args.K, args.reference_tasks)


if __name__ == "__main__":
    main()
