"""The new-user protocol's chunks at Netflix's user count: one chunk of sRec and MF-FT, with the user population remembered
between chunks against gathering it afresh for every chunk (the reference, as before the memo), in the same run.

The full-ranking part of the new-user evaluation scores 256 new users at a time against every item, and each chunk
starts the users from the population of trained user rows (sRec: its prior's mean and variance; MF-FT: the mean).
The model here is fitted on a small log that touches every one of --users users (two interactions each), so W_ and
the index have Netflix's size while the fit stays quick. Printed per model: ms per chunk both ways (median of
interleaved rounds) and the ratio.

    .venv/bin/python benchmarks/new_user_chunks.py [--users 480000] [--items 17770] [--chunks 8] [--rounds 5]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from metarec.config import BaselineConfig, Config
from metarec.interface import Interactions, RecentItems
from metarec.models.factory import make_model
from metarec.protocol import FULL_RANKING_CHUNK


def every_user_twice(n_users: int, n_items: int, seed: int) -> Interactions:
    rng = np.random.default_rng(seed)
    users = np.repeat(np.arange(n_users), 2)
    items = rng.zipf(1.3, size=2 * n_users) % n_items
    ts = np.tile([0, 1], n_users) + 2 * np.arange(n_users).repeat(2)
    return Interactions.from_arrays(users, items, ts)


def chunk_seconds(model, chunks: list[RecentItems], everything: np.ndarray, remember: bool) -> float:
    started = time.perf_counter()
    for recent in chunks:
        if not remember:
            model.__dict__.pop("_user_population", None)
        model.score_new_users(recent, np.broadcast_to(everything, (len(recent.users), len(everything))))
    return (time.perf_counter() - started) / len(chunks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=480_000)
    parser.add_argument("--items", type=int, default=17_770)
    parser.add_argument("--chunks", type=int, default=8, help="chunks of 256 new users per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    history = every_user_twice(args.users, args.items, seed=0)
    rng = np.random.default_rng(1)
    new_users = np.arange(args.users, args.users + args.chunks * FULL_RANKING_CHUNK)
    items = rng.integers(0, args.items, size=(len(new_users), 5))
    ts = np.broadcast_to(np.arange(5) + 2 * args.users, items.shape)
    chunks = [RecentItems(new_users[a:a + FULL_RANKING_CHUNK], items[a:a + FULL_RANKING_CHUNK], ts[a:a + FULL_RANKING_CHUNK])
              for a in range(0, len(new_users), FULL_RANKING_CHUNK)]
    everything = np.arange(args.items, dtype=np.int64)
    config = Config(baselines=BaselineConfig(epochs=1), tuned={})
    print(f"{args.users:,} users x {args.items:,} items, chunks of {FULL_RANKING_CHUNK} new users x n = 5 scored against every item, "
          f"{args.chunks} chunks per round, {args.rounds} interleaved rounds, {args.threads} thread(s)")
    for name in ("srec", "mf_ft"):
        started = time.perf_counter()
        model = make_model(name, config).fit(history)
        fitted = time.perf_counter() - started
        remembered, afresh = [], []
        for _ in range(args.rounds):
            afresh.append(chunk_seconds(model, chunks, everything, remember=False))
            remembered.append(chunk_seconds(model, chunks, everything, remember=True))
        a, r = float(np.median(afresh)), float(np.median(remembered))
        print(f"  {name:<6} fit {fitted:5.1f} s; per chunk: population gathered afresh {a * 1000:7.1f} ms, remembered {r * 1000:7.1f} ms "
              f"-> {a / r:.2f}x (median of rounds)")


if __name__ == "__main__":
    main()
