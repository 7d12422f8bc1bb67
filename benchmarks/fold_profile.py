"""Where one new-user fold's time goes (issue 24): CPU and wall seconds per stage and row, with the tuned values.

Runs fold F's stages as the pipeline does, without Prefect (plain function calls, one after another): prepare,
task shards, meta-training of our rows, every other row's fit, every row's evaluation (new users, full ranking,
stream). CPU seconds are this process's (``time.process_time``), so a loaded machine inflates the wall column
only. ``--profile DIR`` also writes one cProfile dump per stage (``python -m pstats``). Use a fresh artifacts
folder, or cached stages are found and report near zero:

    METAREC_RUNTIME__ARTIFACTS_DIR=/tmp/fold-profile .venv/bin/python benchmarks/fold_profile.py \\
        [--dataset ml-100k] [--fold 0] [--torch-threads 1] [--set eval.models='["rkmf","srec"]'] [--profile DIR]

A 10-fold run's CPU estimate: 10 x this total, plus the λ_ML sweep (one Ours (paper) training and a new-user
evaluation per point of eval.lambda_sweep; the last point diverges at once).
"""

from __future__ import annotations

import argparse
import cProfile
import time
from pathlib import Path

from metarec.models.registry import ROWS
from tasks.data.prepare import prepare_data
from tasks.evaluate.evaluation import evaluate_model
from tasks.runtime.settings import load_config
from tasks.train.models import fit_and_save
from tasks.train.task_shards import build_task_shards
from tasks.train.training import meta_train
from tasks.train.tuning import tuned_source


class Stages:
    """Times each stage (CPU and wall seconds), optionally under cProfile."""

    def __init__(self, profile_dir: Path | None) -> None:
        self.profile_dir, self.seconds = profile_dir, {}

    def run(self, name: str, fn, *args, **kwargs):
        profiler = cProfile.Profile() if self.profile_dir else None
        cpu, wall = time.process_time(), time.perf_counter()
        if profiler:
            profiler.enable()
        try:
            return fn(*args, **kwargs)
        finally:
            if profiler:
                profiler.disable()
                profiler.dump_stats(str(self.profile_dir / f"{name.replace(' ', '_')}.prof"))
            self.seconds[name] = (time.process_time() - cpu, time.perf_counter() - wall)
            print(f"{name:32s} {self.seconds[name][0]:8.1f} CPU s {self.seconds[name][1]:8.1f} wall s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--torch-threads", type=int, default=1, help="runtime.torch_threads (1: CPU seconds without a second thread's spinning)")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="a config override, as `metarec run --set`")
    parser.add_argument("--profile", type=Path, default=None, help="folder for one cProfile dump per stage")
    args = parser.parse_args()
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    config = load_config(None, [f"runtime.torch_threads={args.torch_threads}", *args.sets], data={"dataset": args.dataset})
    config, note = tuned_source(config)
    print(note)
    fold = config.model_copy(update={"data": config.data.with_fold(args.fold)})  # as fold_configs makes it
    stages = Stages(args.profile)
    stages.run("prepare", prepare_data, fold)
    models, shards = {}, {}
    for name in fold.eval.models:
        if ROWS[name].is_ours:
            row_config = fold.for_row(name)
            key = row_config.hash_of("data", "tasks")
            if key not in shards:
                shards[key] = stages.run(f"tasks {name}", build_task_shards, row_config)
            models[name] = stages.run(f"train {name}", meta_train, fold, shards[key], row=name).model_path
        else:
            models[name] = stages.run(f"fit {name}", fit_and_save, name, fold)
    for name, path in models.items():
        if path is not None:
            stages.run(f"evaluate {name}", evaluate_model, name, Path(path), fold)
    cpu, wall = (sum(s[i] for s in stages.seconds.values()) for i in (0, 1))
    print(f"{'total':32s} {cpu:8.1f} CPU s {wall:8.1f} wall s")


if __name__ == "__main__":
    main()
