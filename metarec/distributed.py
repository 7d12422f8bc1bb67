"""Data-parallel meta-training over torch.distributed: each worker takes a share of every batch.

The outer objective is the mean over a batch's T tasks, so with worker r holding
n_r of them, mean = Σ_r (n_r / T) · mean over its own n_r. Each worker
backpropagates its weighted share; summing the gradients over the workers
(``all_reduce``) gives every worker the gradient of the whole batch, so all take
the same Adam step from the same Θ and stay identical: the result is one
process's, up to the order of float additions. The loss *values* are summed
too, so every worker sees the batch's loss, and a divergence (NaN/Inf) stops
all of them at the same step rather than leaving the others waiting.

Workers read the batches in the same seeded order; shares are contiguous slices
of near-equal size, so a batch smaller than the number of workers leaves some
with none, which then contribute zero. Setting up the process group is the
caller's (``tasks/train/parallel.py``); this module only uses it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from metarec.maml import InnerParams, TaskBatch, gather_rows, meta_objective


def backend_for(device: torch.device) -> str:
    """NCCL between GPUs, gloo on CPU."""
    return "nccl" if device.type == "cuda" else "gloo"


@dataclass(frozen=True)
class DataParallel:
    """This worker's place among ``world_size`` (the default process group must be initialised)."""

    rank: int
    world_size: int

    def share(self, batch: TaskBatch) -> TaskBatch:
        """This worker's contiguous slice of the batch."""
        lo, hi = (self.rank * len(batch)) // self.world_size, ((self.rank + 1) * len(batch)) // self.world_size
        return TaskBatch(*(getattr(batch, name)[lo:hi] for name in TaskBatch.__dataclass_fields__))

    def objective(self, P: torch.Tensor, Q: torch.Tensor, batch: TaskBatch, hp: InnerParams, sparse_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(support, query) means over the whole batch as values, with this worker's share as gradient.

        Same signature as ``meta_objective``, so ``meta_step`` takes either.
        """
        mine = self.share(batch)
        if len(mine):
            support, query = meta_objective(P, Q, mine, hp, sparse_grad=sparse_grad)
            weight = len(mine) / len(batch)
            support, query = support * weight, query * weight
        elif sparse_grad:  # a row-sparse gradient with no rows, so that every worker's gradient has one layout
            none = torch.zeros(0, 1, dtype=torch.int64, device=P.device)
            support = query = (gather_rows(P, none, True).sum() + gather_rows(Q, none, True).sum()) * 0.0
        else:  # nothing to do here, but the gradient must exist for the sum over workers
            support = query = (P.sum() + Q.sum()) * 0.0
        totals = torch.stack([support.detach(), query.detach()])
        dist.all_reduce(totals)
        # value of the whole batch, gradient of this worker's share
        return support + (totals[0] - support.detach()), query + (totals[1] - query.detach())

    def reduce_gradients(self, params: tuple[torch.Tensor, ...]) -> None:
        """Sum each parameter's gradient over the workers, in place (one all_reduce per parameter; gloo sums a
        row-sparse gradient as one, over the union of the workers' rows)."""
        for param in params:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            dist.all_reduce(param.grad)
