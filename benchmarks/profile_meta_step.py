"""Where a meta-step spends its time: torch.profiler over a few outer steps, top operators printed.

The same synthetic history and settings as ``benchmarks/meta_train.py`` (K = 20, L = 2,
d = 64, second order). Sorted by self CPU time, so an operator's own cost is not hidden in
its callers; ``--sort cpu_time_total`` shows the callers instead.

--optimizer lazy_adam profiles the row-sparse step (meta.optimizer), --users N a Θ of N user rows (the tasks' user
ids spread over them, as the scale case of meta_train.py): where a dense step's time goes at Netflix scale.

    .venv/bin/python benchmarks/profile_meta_step.py [--batch 1024] [--steps 20] [--rows 25] [--optimizer adam] [--users 480000]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parent))
from meta_train import spread_ids, synthetic_history  # noqa: E402

from metarec.config import MetaConfig, TaskConfig  # noqa: E402
from metarec.maml import TaskBatch, meta_step  # noqa: E402
from metarec.meta_tasks import build_tasks  # noqa: E402
from metarec.models.responsive import ResponsiveMF  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1024, help="tasks per outer step")
    parser.add_argument("--steps", type=int, default=20, help="profiled outer steps (after 3 warm-up steps)")
    parser.add_argument("--rows", type=int, default=25, help="operators printed")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sort", default="self_cpu_time_total")
    parser.add_argument("--first-order", action="store_true")
    parser.add_argument("--optimizer", choices=("adam", "lazy_adam"), default="adam", help="meta.optimizer")
    parser.add_argument("--users", type=int, default=0, help="user rows of Θ (0: the history's 2,000)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    history = synthetic_history(2000, 1700, 60, seed=0)
    meta = MetaConfig(dim=64, inner_steps=2, first_order=args.first_order, batch_tasks=args.batch, optimizer=args.optimizer)
    tasks = build_tasks(history, 5, 20, seed=0)
    n_users = max(args.users, history.n_users)
    if args.users:
        tasks = spread_ids(tasks, n_users, history.n_items, seed=2)
    model = ResponsiveMF(meta, TaskConfig(k=5, K=20))
    model.init_params(n_users, history.n_items)
    batches = [TaskBatch.from_arrays(tasks, slice(s * args.batch, (s + 1) * args.batch)) for s in range(args.steps + 3)]
    for batch in batches[:3]:
        meta_step(model.P_, model.Q_, model.optimizer_, batch, meta)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
        for batch in batches[3:]:
            with record_function("meta_step"):
                meta_step(model.P_, model.Q_, model.optimizer_, batch, meta)
    total_us = sum(e.self_cpu_time_total for e in prof.key_averages())
    print(f"{args.steps} meta-steps of {args.batch} tasks, {args.threads} threads: {total_us / 1e3:.0f} ms of operator time "
          f"({args.steps * args.batch / (total_us / 1e6):.0f} tasks/s as profiled)")
    print(prof.key_averages().table(sort_by=args.sort, row_limit=args.rows))


if __name__ == "__main__":
    main()
