"""Seconds per meta-training epoch: FOMAML (row responsive_fo) against second-order MAML (ours), on a real history.

Both rows train on the same tasks (the data set's history, the default [tasks] and [meta] sections, the
row's fixed options) in the same process; rounds alternate, so whatever else the machine runs slows both
alike. Prints each row's wall and CPU seconds per epoch (medians over rounds; on a shared machine the CPU
seconds of one torch thread are the steadier measure), their ratios, and the mean query loss over the
epoch, since the texts claim first order is faster and slightly worse.

    .venv/bin/python benchmarks/first_order.py [--dataset ml-100k] [--rounds 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from metarec.meta_tasks import build_tasks
from metarec.models.factory import make_model
from tasks.data.prepare import prepare_data
from tasks.data.prepared import load_prepared
from tasks.runtime.settings import load_config

ROWS = ("responsive", "responsive_fo")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = load_config(overrides=[f"data.dataset={args.dataset}"])
    history = load_prepared(prepare_data(config)).history
    t = config.for_row("responsive").tasks
    tasks = build_tasks(history, t.k, t.K, t.seed, t.max_tasks_per_user)
    print(f"{args.dataset}: {len(history)} history interactions, {len(tasks)} tasks per epoch, {args.threads} torch thread(s)")
    wall: dict[str, list[float]] = {row: [] for row in ROWS}
    cpu: dict[str, list[float]] = {row: [] for row in ROWS}
    losses: dict[str, float] = {}
    for _ in range(args.rounds):
        for row in ROWS:
            model = make_model(row, config)
            model.set_index(history)
            model.init_params(history.n_users, history.n_items)
            started = time.process_time()
            stats = model.meta_train_epoch([tasks], 0)
            cpu[row].append(time.process_time() - started)
            wall[row].append(stats.seconds)
            losses[row] = stats.query_loss
    for row in ROWS:
        print(f"{row:14s} wall {statistics.median(wall[row]):7.1f} s/epoch, CPU {statistics.median(cpu[row]):7.1f} s/epoch "
              f"(rounds, CPU: {', '.join(f'{s:.1f}' for s in cpu[row])}); mean query loss over the epoch {losses[row]:.4f}")
    for label, table in (("wall", wall), ("CPU", cpu)):
        ratio = statistics.median(table["responsive"]) / statistics.median(table["responsive_fo"])
        print(f"second order / first order, {label} time per epoch: {ratio:.2f}x")


if __name__ == "__main__":
    main()
