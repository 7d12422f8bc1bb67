"""Latency of one warm recommendation from the champion (issue 6): p50 and p99.

Needs a champion in the registry (run `metarec run` or the nightly deployment
first; METAREC_RUNTIME__ARTIFACTS_DIR points at another artifacts folder).
Loading the champion is measured once; each request is then one user's
adaptation (§6) and a full ranking of all items, as `metarec recommend` does.

    .venv/bin/python benchmarks/recommend_latency.py [--requests 200]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from tasks.serve.serving import load_served, recommend
from tasks.runtime.settings import load_config


def percentiles(samples: list[float]) -> str:
    ms = np.asarray(samples) * 1000
    return f"p50 {np.percentile(ms, 50):.2f} ms, p99 {np.percentile(ms, 99):.2f} ms (n={len(ms)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = load_config()

    start = time.perf_counter()
    served = load_served(config)
    print(f"load champion v{served.version} and its data: {time.perf_counter() - start:.2f} s")

    rng = np.random.default_rng(0)
    history_users = np.unique(served.prepared.history.users)
    known = [str(served.raw_users[u]) for u in rng.choice(history_users, size=args.requests)]
    items = served.raw_items
    recent_lists = [[str(items[i]) for i in rng.choice(len(items), size=5, replace=False)] for _ in range(args.requests)]
    recommend(served, known[0], None, 10)  # warm-up

    for label, calls in (
        ("known user, stored recent items", [(u, None) for u in known]),
        ("new user, 5 recent items", [(f"new-{i}", r) for i, r in enumerate(recent_lists)]),
    ):
        samples = []
        for user, recent in calls:
            t = time.perf_counter()
            recommend(served, user, recent, 10)
            samples.append(time.perf_counter() - t)
        print(f"{label}: {percentiles(samples)}")


if __name__ == "__main__":
    main()
