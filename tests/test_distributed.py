"""Data-parallel meta-training: 2 local processes (gloo) end with the parameters of 1 process, and stop together."""

from __future__ import annotations

import pytest
import torch

from metarec.config import MetaConfig, TaskConfig
from metarec.device import resolve_device
from metarec.distributed import DataParallel
from metarec.maml import DivergedError, TaskBatch
from metarec.meta_tasks import build_tasks
from metarec.models.responsive import ResponsiveMF
from metarec.synthetic import planted_interactions
from tasks.train.parallel import ParallelTrainer, WorkerPlan

TASK_CONFIG = TaskConfig(k=3, K=6)


def _parts():
    """Two shards of tasks; 25 per batch, so shares are uneven (13 + 12) and each shard's last batch is short."""
    history = planted_interactions(n_users=40, n_items=30, per_user=12, seed=4).interactions
    tasks = build_tasks(history, TASK_CONFIG.k, TASK_CONFIG.K, seed=1)
    half = len(tasks) // 2 + 3
    return history, [tasks.take(slice(0, half)), tasks.take(slice(half, None))]


def _model(history, **meta) -> ResponsiveMF:
    model = ResponsiveMF(MetaConfig(dim=8, batch_tasks=25, outer_lr=0.01, **meta), TASK_CONFIG)
    model.init_params(history.n_users, history.n_items)
    return model


def test_shares_cover_a_batch_once_in_order():
    batch = TaskBatch(*(torch.arange(7 * w).view(7, w) if w > 1 else torch.arange(7) for w in (3, 3, 3, 1, 1, 1)))
    shares = [DataParallel(rank, 3).share(batch) for rank in range(3)]
    assert [len(s) for s in shares] == [2, 2, 3]
    assert torch.equal(torch.cat([s.query_user for s in shares]), batch.query_user)
    assert [len(DataParallel(rank, 4).share(TaskBatch(*(t[:2] for t in (batch.support_users,) * 3 + (batch.query_user,) * 3)))) for rank in range(4)] == [0, 1, 0, 1]


@pytest.mark.parametrize("optimizer", ["adam", "lazy_adam"])  # lazy_adam: the workers sum row-sparse gradients
def test_two_processes_end_with_the_parameters_of_one(optimizer):
    history, parts = _parts()
    single = _model(history, optimizer=optimizer)
    start = single.training_state()
    expected = [single.meta_train_epoch(parts, epoch) for epoch in range(2)]
    plan = WorkerPlan(single.meta, TASK_CONFIG, parts, 0, 2, threads=1, device="cpu", state=start)
    with ParallelTrainer(2, plan) as trainer:
        got = [trainer.next_epoch() for _ in range(2)]
    for want, (stats, _) in zip(expected, got):
        assert stats.tasks == want.tasks
        assert stats.support_loss == pytest.approx(want.support_loss, rel=1e-5)
        assert stats.query_loss == pytest.approx(want.query_loss, rel=1e-5)
    state = got[-1][1]
    final = single.training_state()
    assert set(state) == set(final)
    moved = (final["P"] - start["P"]).abs().max()
    assert moved > 1e-3  # training did change Θ, so the comparison below means something
    for key in ("P", "Q", "adam.P.exp_avg", "adam.Q.exp_avg_sq"):
        assert torch.allclose(state[key], final[key], rtol=1e-4, atol=1e-6), (key, (state[key] - final[key]).abs().max())


@pytest.mark.parametrize("optimizer", ["adam", "lazy_adam"])
def test_an_epoch_run_in_pieces_through_checkpoints_ends_as_the_whole_epoch(optimizer):
    """benchmarks/scale.py runs a Netflix-sized meta-epoch a few shards per process: with ``training_state`` carried
    between the pieces and ``first_part`` numbering them, Θ and its moments end bit-identical to one pass (early
    tasks included: their draws are seeded by the part's number too)."""
    history, parts = _parts()

    def model() -> ResponsiveMF:
        fresh = ResponsiveMF(MetaConfig(dim=8, batch_tasks=25, outer_lr=0.01, optimizer=optimizer), TaskConfig(k=3, K=6, early_share=0.3))
        fresh.set_index(history)
        fresh.init_params(history.n_users, history.n_items)
        return fresh

    whole, first = model(), model()
    start = whole.training_state()
    whole.meta_train_epoch(parts, 1)
    first.meta_train_epoch(parts[:1], 1)
    second, renumbered = model(), model()
    for piece in (second, renumbered):
        piece.load_training_state(first.training_state())
    second.meta_train_epoch(parts[1:], 1, first_part=1)
    want, got = whole.training_state(), second.training_state()
    assert not torch.equal(want["P"], start["P"])
    assert set(got) == set(want)
    for key in want:
        assert torch.equal(got[key], want[key]), key
    renumbered.meta_train_epoch(parts[1:], 1)  # numbered from 0, the second piece draws other shuffles
    assert not torch.equal(renumbered.training_state()["P"], want["P"])


def test_a_divergence_stops_every_worker_and_is_raised():
    history, parts = _parts()
    model = _model(history, lambda_ml=1e38)
    plan = WorkerPlan(model.meta, TASK_CONFIG, parts, 0, 1, threads=1, device="cpu", state=model.training_state())
    with ParallelTrainer(2, plan) as trainer:
        with pytest.raises(DivergedError, match=r"not finite|norm is (inf|nan)"):
            trainer.next_epoch()
        processes = trainer._processes
    assert all(p.exitcode == 0 for p in processes)  # they returned on their own


def test_device_setting():
    assert resolve_device("auto") == (torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            resolve_device("cuda")
    model = ResponsiveMF(MetaConfig(dim=4), TASK_CONFIG, device="cpu")
    model.init_params(5, 6)
    assert model.P_.device == model.Q_.device == torch.device("cpu")
