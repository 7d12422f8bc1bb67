"""Meta-training throughput of the batched MAML against a plain per-task loop, and serving latency.

Both implementations run the same objective (second-order MAML over BPR-MF,
K = 20, L = 2, d = 64) on the same tasks in the same process, each followed
by the same Adam step; the printed ratio is what matters (absolute figures
depend on the machine and on what else runs on it). The batch is the
pipeline's (meta.batch_tasks) unless --batch says otherwise.

The FLOP bound: the matrix-product FLOPs of one task's forward and backward
pass (counted by torch.utils.flop_counter on a real step), against this
machine's dense matmul rate measured in the same run with the same threads;
the bound is the tasks/s those products alone would allow, and the fraction
is how much of it the batched step achieves. The element-wise work is not
counted, so the bound is optimistic: most of a step is memory traffic over
the tasks' slot tensors, not arithmetic.

When the ratio is below 100x or the fraction below 30% (the targets of issue
24), the benchmark says what bounds the step: the rate of its typical batched
product (a chunk of tasks' item-slot by user-slot products) against the dense
rate, and the shares of self CPU time by operator group and the top operators
over two profiled steps.

Serving: adapt + score of 101 candidates for one user (p50, p99) and users/s
when 1,024 users are adapted and scored at once.

Scale: the cost of one outer step when Θ is Netflix-sized (--scale-users
480,000 users × --scale-items 17,770 items, d = 64), with the same tasks (their
ids spread over the tables), under meta.optimizer "adam" (dense: every step
reads and writes all of P, Q and both moment tables, and the gradient is a
dense table) and "lazy_adam" (row-sparse gradient and step: the batch's rows
only), in interleaved rounds of the same run; printed: ms per step and the
ratio. --scale-users 0 skips it.

    .venv/bin/python benchmarks/meta_train.py [--tasks 4096] [--reference-tasks 128] [--rounds 5] [--batch 1024]
                                              [--scale-users 480000] [--scale-items 17770] [--scale-steps 4]
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import torch

from metarec.config import MetaConfig, TaskConfig
from metarec.interface import Interactions, RecentItems
from metarec.maml import TaskBatch, chunk_size, localise, meta_objective, meta_step, reference_meta_objective
from metarec.meta_tasks import build_tasks
from metarec.models.responsive import ResponsiveMF


def synthetic_history(n_users: int, n_items: int, per_user: int, seed: int) -> Interactions:
    """Zipf-popular items, each user a random set of distinct items at increasing times (vectorised)."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, n_items + 1) ** 0.8
    keys = rng.random((n_users, n_items)) ** (1.0 / weights)  # weighted sampling without replacement
    items = np.argsort(-keys, axis=1)[:, :per_user]
    users = np.repeat(np.arange(n_users), per_user)
    ts = rng.integers(0, 10**6, (n_users, per_user)).cumsum(1)
    return Interactions.from_arrays(users, items.reshape(-1), ts.reshape(-1))


def time_batched(model: ResponsiveMF, tasks, start: int, n: int, batch: int) -> float:
    """Tasks/s of meta_step (objective, backward, clip, Adam) over tasks [start, start + n)."""
    started = time.perf_counter()
    for s in range(start, start + n, batch):
        meta_step(model.P_, model.Q_, model.optimizer_, TaskBatch.from_arrays(tasks, slice(s, min(s + batch, start + n))), model.meta)
    return n / (time.perf_counter() - started)


def time_reference(model: ResponsiveMF, tasks, start: int, n: int, batch: int) -> float:
    """Tasks/s of the per-task autograd loop with the same Adam step per batch, over tasks [start, start + n)."""
    P, Q, opt, hp = model.P_, model.Q_, model.optimizer_, model.meta
    started = time.perf_counter()
    for s in range(start, start + n, batch):
        opt.zero_grad(set_to_none=True)
        support, query = reference_meta_objective(P, Q, TaskBatch.from_arrays(tasks, slice(s, min(s + batch, start + n))), hp)
        (support + hp.lambda_ml * query).backward()
        torch.nn.utils.clip_grad_norm_([P, Q], hp.grad_clip)
        opt.step()
    return n / (time.perf_counter() - started)


def spread_ids(tasks, n_users: int, n_items: int, seed: int):
    """The tasks with user and item ids mapped one-to-one onto random rows of (n_users, n_items) tables."""
    rng = np.random.default_rng(seed)
    users = rng.permutation(n_users)[: int(max(tasks.support_users.max(), tasks.query_user.max())) + 1]
    items = rng.permutation(n_items)[: int(max(tasks.support_pos.max(), tasks.support_neg.max(), tasks.query_pos.max(), tasks.query_neg.max())) + 1]
    mapped = {name: (users if "user" in name else items)[getattr(tasks, name)]
              for name in ("support_users", "support_pos", "support_neg", "query_user", "query_pos", "query_neg")}
    return type(tasks)(**mapped, query_ts=tasks.query_ts)


def scale_models(meta: MetaConfig, task_config: TaskConfig, n_users: int, n_items: int) -> dict[str, ResponsiveMF]:
    """One model per outer optimiser, each with a fresh Θ of n_users × n_items rows."""
    models = {}
    for name in ("adam", "lazy_adam"):
        model = ResponsiveMF(meta.model_copy(update={"optimizer": name}), task_config)
        model.init_params(n_users, n_items)
        models[name] = model
    return models


def ms_per_step(model: ResponsiveMF, tasks, start: int, steps: int, batch: int) -> tuple[float, float]:
    """(wall ms, process CPU ms) of one meta_step (objective, backward, clip, optimiser step), mean over ``steps``
    batches from ``start``. The CPU time is what other processes' load does not inflate (summed over threads)."""
    started, cpu = time.perf_counter(), time.process_time()
    for s in range(start, start + steps * batch, batch):
        meta_step(model.P_, model.Q_, model.optimizer_, TaskBatch.from_arrays(tasks, slice(s, s + batch)), model.meta)
    return (time.perf_counter() - started) * 1000 / steps, (time.process_time() - cpu) * 1000 / steps


def scale_case(tasks, meta: MetaConfig, task_config: TaskConfig, args) -> None:
    """Dense against lazy Adam at a Netflix-sized Θ, interleaved rounds on fresh batches."""
    spread = spread_ids(tasks, args.scale_users, args.scale_items, seed=2)
    models = scale_models(meta, task_config, args.scale_users, args.scale_items)
    for model in models.values():
        ms_per_step(model, spread, 0, 1, args.batch)  # warm-up: allocates the moments
    wall: dict[str, list[float]] = {name: [] for name in models}
    cpu: dict[str, list[float]] = {name: [] for name in models}
    cursor = args.batch
    for _ in range(args.rounds):
        if cursor + args.scale_steps * args.batch > len(spread):
            cursor = args.batch
        for name, model in models.items():
            w, c = ms_per_step(model, spread, cursor, args.scale_steps, args.batch)
            wall[name].append(w)
            cpu[name].append(c)
        cursor += args.scale_steps * args.batch
    ratios = np.array(wall["adam"]) / np.array(wall["lazy_adam"])
    print(f"scale: Θ {args.scale_users:,} users x {args.scale_items:,} items, d={meta.dim}, {args.batch} tasks per step, "
          f"{args.rounds} interleaved rounds of {args.scale_steps} steps each:")
    for name in models:
        ms = np.median(wall[name])
        print(f"  {name:<10}  median {ms:8.1f} ms per step wall ({args.batch / ms * 1000:6.0f} tasks/s), {np.median(cpu[name]):8.1f} ms CPU")
    print(f"  adam/lazy   wall: median of rounds {np.median(ratios):.2f}x (rounds: {', '.join(f'{r:.2f}' for r in ratios)}); "
          f"CPU: {np.median(cpu['adam']) / np.median(cpu['lazy_adam']):.2f}x")


def flops_per_task(model: ResponsiveMF, tasks, batch: int) -> float:
    """Matrix-product FLOPs of one task's forward and backward pass (FlopCounterMode over one batch)."""
    from torch.utils import flop_counter

    if torch.ops.aten.baddbmm_ not in flop_counter.flop_registry:  # the hand-written backward accumulates in place
        flop_counter.register_flop_formula(torch.ops.aten.baddbmm_, get_raw=True)(flop_counter.baddbmm_flop)
    FlopCounterMode = flop_counter.FlopCounterMode
    P, Q = (t.detach().clone().requires_grad_() for t in (model.P_, model.Q_))
    with FlopCounterMode(display=False) as counter:
        support, query = meta_objective(P, Q, TaskBatch.from_arrays(tasks, slice(0, batch)), model.meta)
        (support + model.meta.lambda_ml * query).backward()
    return counter.get_total_flops() / batch


def matmul_flops_per_s(n: int = 1024, repeats: int = 20) -> float:
    """Dense float32 matmul rate of this process (the threads set), best of a few timings."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - started)
    return 2 * n**3 / best


def slot_bmm_flops_per_s(model: ResponsiveMF, tasks, batch: int, repeats: int = 20) -> tuple[float, tuple[int, int, int]]:
    """The rate of the step's typical matrix product: one chunk's (T, Si, d)·(T, d, Su), best of a few timings;
    and (T, Si, Su), the chunk's tasks and slots on the benchmark's first batch."""
    loc = localise(TaskBatch.from_arrays(tasks, slice(0, batch)))
    n_items, n_users, d = loc.item_rows.shape[1], loc.user_rows.shape[1], model.meta.dim
    T = min(batch, chunk_size(n_items, d, 4))
    a, b = torch.randn(T, n_items, d), torch.randn(T, d, n_users)
    torch.bmm(a, b)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        torch.bmm(a, b)
        best = min(best, time.perf_counter() - started)
    return 2 * T * n_items * n_users * d / best, (T, n_items, n_users)


# operator -> what it is in the step (self CPU time is summed per group)
OPERATOR_GROUPS = {
    "batched matmuls": ("aten::bmm", "aten::baddbmm_", "aten::baddbmm"),
    "zero fills": ("aten::fill_", "aten::zero_", "aten::zeros", "aten::new_zeros", "aten::zeros_like"),
    "scatter/gather/index": ("aten::scatter_add_", "aten::scatter_", "aten::scatter_add", "aten::gather", "aten::index_select", "aten::index_add_", "aten::index_copy_", "aten::embedding_dense_backward"),
    "copies": ("aten::copy_", "aten::_to_copy", "aten::clone", "aten::cat", "aten::stack"),
}


def step_profile(model: ResponsiveMF, tasks, start: int, steps: int, batch: int, top: int) -> tuple[dict[str, float], list[tuple[str, float]]]:
    """Shares of the meta-step's self CPU time: per group of OPERATOR_GROUPS (the rest: element-wise and other), and the
    ``top`` operators, over ``steps`` profiled steps (torch.profiler, as benchmarks/profile_meta_step.py)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        time_batched(model, tasks, start, steps * batch, batch)
    ops = {e.key: e.self_cpu_time_total for e in prof.key_averages() if e.key.startswith("aten::")}
    total = sum(ops.values()) or 1.0
    groups = {name: sum(t for op, t in ops.items() if op in members) / total for name, members in OPERATOR_GROUPS.items()}
    groups["element-wise and other"] = 1.0 - sum(groups.values())
    ranked = sorted(ops.items(), key=lambda kv: -kv[1])[:top]
    return groups, [(op, t / total) for op, t in ranked]


def serving(model: ResponsiveMF, history: Interactions, n_items: int, repeats: int, seed: int) -> tuple[float, float, float]:
    """(p50 ms, p99 ms) of adapt + score for one new user, users/s for 1,024 at once; 101 candidates, 5 items shown."""
    rng = np.random.default_rng(seed)
    shown = rng.integers(0, n_items, (1024, 5))
    recent = RecentItems(np.arange(10**6, 10**6 + 1024), shown, np.full((1024, 5), int(history.ts.max())))
    candidates = rng.integers(0, n_items, (1024, 101))
    one = lambda i: RecentItems(recent.users[i : i + 1], recent.items[i : i + 1], recent.ts[i : i + 1])
    model.score_new_users(one(0), candidates[:1])
    latencies = []
    for i in range(repeats):
        started = time.perf_counter()
        model.score_new_users(one(i % 1024), candidates[i % 1024 : i % 1024 + 1])
        latencies.append(time.perf_counter() - started)
    started = time.perf_counter()
    model.score_new_users(recent, candidates)
    users_per_s = 1024 / (time.perf_counter() - started)
    ms = np.array(latencies) * 1000
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99)), users_per_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=4096, help="tasks per round for the batched implementation")
    parser.add_argument("--reference-tasks", type=int, default=128, help="tasks per round for the per-task loop (slow)")
    parser.add_argument("--batch", type=int, default=MetaConfig().batch_tasks, help="tasks per outer step (default: meta.batch_tasks, as the pipeline runs)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    parser.add_argument("--users", type=int, default=2000)
    parser.add_argument("--items", type=int, default=1700)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--top-operators", type=int, default=8, help="operators printed when the targets are not reached")
    parser.add_argument("--scale-users", type=int, default=480_000, help="users of the scale case's Θ (Netflix: 480k; 0 = skip)")
    parser.add_argument("--scale-items", type=int, default=17_770, help="items of the scale case's Θ (Netflix: 17,770)")
    parser.add_argument("--scale-steps", type=int, default=4, help="outer steps per optimiser and round in the scale case")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    history = synthetic_history(args.users, args.items, 60, seed=0)
    meta = MetaConfig(dim=64, inner_steps=2, first_order=False, batch_tasks=args.batch)
    task_config = TaskConfig(k=5, K=20)
    started = time.perf_counter()
    tasks = build_tasks(history, task_config.k, task_config.K, seed=0)
    print(f"history: {len(history)} interactions, {args.users} users, {args.items} items; {len(tasks)} tasks built in {time.perf_counter() - started:.1f} s")

    model = ResponsiveMF(meta, task_config)
    model.set_index(history)
    model.init_params(history.n_users, history.n_items)
    # interleaved rounds on fresh tasks, so a burst of load from other processes hits both alike
    n_ref = min(args.reference_tasks, args.batch)
    n_bat = max(args.batch, (min(args.tasks, len(tasks) // (args.rounds + 1)) // args.batch) * args.batch)
    time_batched(model, tasks, 0, args.batch, args.batch)  # warm-up
    batched, reference, cursor = [], [], args.batch
    for _ in range(args.rounds):
        reference.append(time_reference(model, tasks, cursor, n_ref, n_ref))
        batched.append(time_batched(model, tasks, cursor + n_ref, n_bat, args.batch))
        cursor += n_ref + n_bat
    ratios = np.array(batched) / np.array(reference)
    print(f"meta-training, K=20 L=2 d=64 second order, {args.threads} threads, {args.batch} tasks per step, {args.rounds} interleaved rounds:")
    print(f"  batched     median {np.median(batched):8.0f} tasks/s, best {max(batched):8.0f}  ({n_bat} tasks per round)")
    print(f"  per-task    median {np.median(reference):8.0f} tasks/s, best {max(reference):8.0f}  ({n_ref} tasks per round)")
    print(f"  ratio       median of rounds {np.median(ratios):.1f}x, of bests {max(batched) / max(reference):.1f}x (rounds: {', '.join(f'{r:.0f}' for r in ratios)})")
    flops, peak = flops_per_task(model, tasks, args.batch), matmul_flops_per_s()
    bound = peak / flops
    print(f"  FLOP bound  {flops / 1e6:.2f} MFLOP per task in matrix products (forward + backward); dense matmul here "
          f"{peak / 1e9:.1f} GFLOP/s -> at most {bound:,.0f} tasks/s; the batched median reaches {np.median(batched) / bound:.1%} of it")
    ratio, fraction = float(np.median(ratios)), float(np.median(batched) / bound)
    if ratio < 100 or fraction < 0.3:  # say what bounds the step instead
        small, (T, Si, Su) = slot_bmm_flops_per_s(model, tasks, args.batch)
        groups, top = step_profile(model, tasks, cursor, 2, args.batch, args.top_operators)
        print(f"  bound       below the targets (>= 100x, >= 30% of the FLOP bound): the step's products are {T} tasks' "
              f"({Si} x {meta.dim} item slots)·({meta.dim} x {Su} user slots) at a time, which run at {small / 1e9:.1f} GFLOP/s here, "
              f"{small / peak:.0%} of the dense 1024² rate (at that rate the bound is {small / flops:,.0f} tasks/s); "
              "the rest is memory traffic over the slot tensors")
        print("  profile     self CPU time of 2 steps: " + ", ".join(f"{name} {share:.0%}" for name, share in groups.items()))
        print("  top ops     " + ", ".join(f"{op.removeprefix('aten::')} {share:.1%}" for op, share in top))

    p50, p99, users_per_s = serving(model, history, args.items, repeats=300, seed=1)
    print(f"serving (adapt L=2 + score 101 candidates): one user p50 {p50:.2f} ms, p99 {p99:.2f} ms; 1,024 users at once {users_per_s:.0f} users/s")
    if args.scale_users:
        scale_case(tasks, meta, task_config, args)
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
