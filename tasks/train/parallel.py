"""Meta-training in ``runtime.workers`` local processes, data-parallel over torch.distributed.

The calling process coordinates: it starts the workers (spawned, so CUDA and
OpenMP start clean in each) with the current training state, and each epoch
waits for rank 0's statistics and state, which it checkpoints and logs exactly
as a single-process run would (``tasks/train/training.py``). The workers form one
process group (gloo on CPU, NCCL on GPUs; rendezvous through a file in a private
temp folder) and split every batch between them (``metarec.distributed``).

Workers read the task shards themselves (``iter_task_shards``; every worker
reads all of them in the same order), or take the tasks in memory (tests,
benchmarks). A divergence stops every worker at the same step and is raised
here as ``DivergedError``; any other failure in a worker is raised here as
``RuntimeError`` with the worker's traceback.
"""

from __future__ import annotations

import queue as queue_module
import tempfile
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.multiprocessing as mp

from metarec.config import MetaConfig, TaskConfig
from metarec.maml import DivergedError
from metarec.meta_tasks import TaskArrays
from metarec.models.responsive import EpochStats

POLL_SECONDS = 1.0


@dataclass(frozen=True)
class WorkerPlan:
    """What every worker needs: the model's settings, where the tasks are, the epochs and the starting state."""

    meta: MetaConfig
    tasks: TaskConfig
    source: Path | Sequence[TaskArrays]
    first_epoch: int
    last_epoch: int  # exclusive
    threads: int
    device: str
    state: dict[str, torch.Tensor]


def _parts(source: Path | Sequence[TaskArrays]):
    if isinstance(source, Path):
        from tasks.train.task_shards import iter_task_shards  # Prefect is imported only by workers that read shards

        return iter_task_shards(source)
    return source


def _worker(rank: int, world_size: int, rendezvous: str, plan: WorkerPlan, results) -> None:
    """One worker: join the group, train the planned epochs on its share, rank 0 reports each epoch."""
    import torch.distributed as dist

    from metarec.distributed import DataParallel, backend_for
    from metarec.models.responsive import ResponsiveMF

    torch.set_num_threads(plan.threads)
    device = torch.device(plan.device)
    if device.type == "cuda":
        device = torch.device("cuda", rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    try:
        dist.init_process_group(backend_for(device), init_method=rendezvous, rank=rank, world_size=world_size)
        model = ResponsiveMF(plan.meta, plan.tasks, device=device)
        model.load_training_state(plan.state)
        parallel = DataParallel(rank, world_size)
        for epoch in range(plan.first_epoch, plan.last_epoch):
            try:
                stats = model.meta_train_epoch(_parts(plan.source), epoch, parallel=parallel)
            except DivergedError as exc:
                if rank == 0:
                    results.put(("diverged", epoch, str(exc)))
                return
            if rank == 0:
                # numpy, pickled through the pipe: a shared-memory tensor would need this process alive until it is read
                results.put(("epoch", epoch, stats, {k: v.numpy() for k, v in model.training_state().items()}))
    except Exception:  # reported to the coordinator, which raises it
        results.put(("error", rank, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


class ParallelTrainer:
    """``workers`` processes meta-training from ``state`` over epochs [first, last); a context manager.

    ``next_epoch()`` returns (stats, state after the epoch) of the next epoch, in order."""

    def __init__(self, workers: int, plan: WorkerPlan) -> None:
        if workers < 2:
            raise ValueError(f"ParallelTrainer needs at least 2 workers, got {workers}; train in this process instead")
        self.workers, self.plan = workers, plan
        self._folder = tempfile.TemporaryDirectory(prefix="metarec-dist-")
        rendezvous = f"file://{Path(self._folder.name) / 'rendezvous'}"
        context = mp.get_context("spawn")
        self._results = context.Queue()
        self._processes = [
            context.Process(target=_worker, args=(rank, workers, rendezvous, plan, self._results), daemon=True, name=f"metarec-worker-{rank}")
            for rank in range(workers)
        ]
        for process in self._processes:
            process.start()

    def next_epoch(self) -> tuple[EpochStats, dict[str, torch.Tensor]]:
        while True:
            try:
                message = self._results.get(timeout=POLL_SECONDS)
                break
            except queue_module.Empty:
                dead = [p for p in self._processes if p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"meta-training worker {dead[0].name} died (exit code {dead[0].exitcode})") from None
                if all(p.exitcode == 0 for p in self._processes):
                    raise RuntimeError("meta-training workers finished without reporting the epoch")
        kind = message[0]
        if kind == "diverged":
            raise DivergedError(message[2])
        if kind == "error":
            raise RuntimeError(f"meta-training worker {message[1]} failed:\n{message[2]}")
        return message[2], {key: torch.from_numpy(value) for key, value in message[3].items()}

    def close(self, wait: float = 30.0) -> None:
        """Join the workers (they end after their last epoch); stop any still running after ``wait`` seconds."""
        for process in self._processes:
            process.join(timeout=wait)
            if process.is_alive():
                process.terminate()
                process.join()
        self._results.close()
        self._folder.cleanup()

    def __enter__(self) -> "ParallelTrainer":
        return self

    def __exit__(self, kind, value, tb) -> None:
        # after a failure, workers may be blocked in a collective waiting for the one that failed
        self.close(wait=30.0 if kind is None else 1.0)
