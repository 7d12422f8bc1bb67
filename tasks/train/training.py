"""Meta-train the responsive MF from the task shards, with checkpoints, divergence detection and MLflow.

``meta_train(config)``:

1. loads the prepared history (the model's interaction index) and the task
   manifest; resumes from ``checkpoint_dir(config)`` when a checkpoint of the
   same configuration exists (same MLflow run, next epoch), else initialises Θ
   and runs the optional BPR pre-training;
2. each epoch streams the shards (one in memory at a time), takes one Adam
   step per ``meta.batch_tasks`` tasks, logs support_loss, query_loss,
   tasks_per_s and the meta-gradient's norm before clipping (grad_norm_max,
   grad_norm_mean, and clipped_steps: how many steps ``meta.grad_clip``
   clipped, 0 without clipping) to MLflow and the checkpoint record, and writes
   a checkpoint (Θ, trained-row masks, Adam moments, generator state as
   safetensors + a JSON record, atomically). An epoch's result depends only on
   the state at its start and the seed, so a resumed run ends with the same Θ
   as an uninterrupted one;
   A checkpoint that cannot be read (truncated, overwritten) is moved aside
   (``checkpoint.corrupt-<time>``) with a warning, and training starts afresh;
3. NaN/Inf in the objective, gradient or Θ stops the run with status
   ``diverged`` (MLflow tag, run ended FAILED, and ``status.json``, with the
   gradient norms of the diverging epoch's steps before it), and no weights are
   written (the checkpoint is removed);
4. at the end the rows no training step touched (users absent from the tasks,
   items never a positive) are reset to the mean of the trained rows + noise
   (docs/method.md §11); Θ (with the trained-row masks) is logged on the run as an
   MLflow pyfunc model (``tasks.track.model_registry``: safetensors + JSON,
   ``load_theta`` reads it back without unpickling), and the whole model (Θ,
   the masks, what it has seen) is saved with ``tasks.train.models.save_model``
   where the evaluation looks for it. Nothing is registered here: a serving
   candidate is registered after its evaluation;
5. a finished training of the same configuration is returned as it is, its
   MLflow run left closed.

The MLflow run nests under the open parent run (``tasks.track.tracking.child_run``).

``runtime.workers = N`` > 1 runs the epochs in N data-parallel processes
(``tasks/train/parallel.py``, ``metarec/distributed.py``); this process still
checkpoints and logs each epoch, so resuming and the results are as above.

Progress: a tqdm bar over tasks when stderr is a terminal (and
``runtime.progress``), else one log line per epoch (Prefect's logger in a flow).
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import mlflow
import torch
from mlflow import MlflowClient
from prefect import task
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from metarec.config import Config
from metarec.distributed import backend_for
from metarec.maml import DivergedError
from metarec.models.registry import ROWS
from metarec.models.responsive import EpochStats, ResponsiveMF, from_config
from tasks.runtime.atomic import atomic_dir, write_json
from tasks.runtime.integrity import CorruptFileError, quarantine
from tasks.runtime.logs import log_info, log_warning
from tasks.runtime.slots import compute_slot
from tasks.train.models import model_dir, model_hash, save_model, saved_model_ok
from tasks.train.parallel import ParallelTrainer, WorkerPlan
from tasks.runtime.paths import prepared_dir, task_shards_dir, train_key
from tasks.data.prepared import PreparedData, load_prepared
from tasks.train.task_shards import iter_task_shards, read_manifest
from tasks.track.model_registry import log_theta_model
from tasks.track.tracking import child_run, model_params, paper_lambda, run_tags, setup_mlflow

logger = logging.getLogger(__name__)

# metric names are an interface: the same in every training run
SUPPORT_LOSS, QUERY_LOSS, TASKS_PER_S, EPOCH_SECONDS = "support_loss", "query_loss", "tasks_per_s", "epoch_seconds"
GRAD_NORM_MAX, GRAD_NORM_MEAN, CLIPPED_STEPS = "grad_norm_max", "grad_norm_mean", "clipped_steps"  # norms before clipping
STATE_FILE, STATE_META, STATUS_FILE = "state.safetensors", "state.json", "status.json"
TRAIN_SECTIONS = ("data", "tasks", "meta")


@dataclass
class TrainResult:
    status: str  # "finished", "diverged" or "stopped" (max_epochs reached before meta.epochs)
    epochs_done: int
    run_id: str
    history: list[dict] = field(default_factory=list)
    model_version: str | None = None  # set by whoever registers the model (tasks.track.model_registry), never by training
    model_path: str | None = None
    message: str = ""
    model_uri: str | None = None  # Θ as an MLflow pyfunc model (models:/m-...), logged on the training run


def training_dir(config: Config) -> Path:
    """prepared_dir/training/responsive-<key of data, tasks, meta and the code (``tasks.runtime.paths.train_key``)>."""
    return prepared_dir(config) / "training" / f"responsive-{train_key(config)}"


def training_run_name(row: str, fold: int) -> str:
    """``Ours+ · fold 0 · train``: row and fold first, what the UI's narrow name column must show."""
    return f"{ROWS[row].label} · fold {fold} · train"


def cached_training(config: Config, row: str = "responsive") -> TrainResult | None:
    """The result of an earlier training of this key: finished (with its model saved) or diverged, which the same
    key and seed would do again; None when there is none (``config`` is the row's own, ``Config.for_row``)."""
    try:
        status = json.loads((training_dir(config) / STATUS_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if status.get("status") == "diverged":
        return TrainResult("diverged", status["epoch"], status["run_id"], status["history"], message=status["message"])
    out = model_dir(config, row)
    if status.get("status") != "finished" or not saved_model_ok(out, model_hash(config, row)):
        return None
    return TrainResult("finished", status["epochs"], status["run_id"], status["history"], model_path=str(out), model_uri=status.get("model_uri"))


def _log(message: str, *args) -> None:
    log_info(logger, message, *args)


# ------------------------------------------------------------------ checkpoints
def save_checkpoint(model: ResponsiveMF, out: Path, record: dict) -> None:
    """Θ, Adam moments and generator state (safetensors) and the run record (JSON), replaced atomically."""
    with atomic_dir(out) as tmp:
        save_file({k: v.contiguous() for k, v in model.training_state().items()}, str(tmp / STATE_FILE))
        (tmp / STATE_META).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


CHECKPOINT_FIELDS = ("epoch", "history", "run_id", "config_hash")


def load_checkpoint(path: Path, config_hash: str) -> tuple[dict[str, torch.Tensor], dict] | None:
    """(state, record) of a complete checkpoint for this configuration, else None.

    Raises CorruptFileError, naming the file, when either file cannot be read.
    """
    meta, state = Path(path) / STATE_META, Path(path) / STATE_FILE
    if not meta.is_file() or not state.is_file():
        return None
    record = _read_record(meta)
    if record.get("config_hash") != config_hash:
        logger.warning("ignoring checkpoint %s of another configuration (%s)", path, record.get("config_hash"))
        return None
    try:
        tensors = load_file(str(state))
    except (SafetensorError, OSError) as exc:
        raise CorruptFileError(state, f"checkpoint weights cannot be read ({exc})") from None
    missing = [key for key in ("P", "Q") if key not in tensors]
    if missing:
        raise CorruptFileError(state, f"checkpoint weights lack {missing}")
    return tensors, record


def _read_record(meta: Path) -> dict:
    try:
        record = json.loads(meta.read_text())
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise CorruptFileError(meta, f"checkpoint record is not valid JSON ({exc})") from None
    if not isinstance(record, dict) or any(key not in record for key in CHECKPOINT_FIELDS):
        raise CorruptFileError(meta, f"checkpoint record lacks some of {list(CHECKPOINT_FIELDS)}")
    return record


# --------------------------------------------------------------------- training
def _progress(config: Config, total: int, epoch: int):
    if config.runtime.progress and sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(total=total, desc=f"epoch {epoch}", unit="task", leave=False)
    return None


def _epoch(model: ResponsiveMF, task_dir: Path, epoch: int, config: Config, n_tasks: int) -> EpochStats:
    bar = _progress(config, n_tasks, epoch)
    try:
        return model.meta_train_epoch(iter_task_shards(task_dir), epoch, progress=bar.update if bar else None)
    finally:
        if bar is not None:
            bar.close()


@contextmanager
def _epoch_runner(config: Config, model: ResponsiveMF, task_dir: Path, first: int, last: int, n_tasks: int) -> Iterator[Callable[[int], EpochStats]]:
    """``run_epoch(epoch)``: in this process, or (``runtime.workers`` > 1) in data-parallel worker processes that
    start from the model's state and hand it back after every epoch (``tasks/train/parallel.py``)."""
    workers = config.runtime.workers
    if workers == 1 or first >= last:
        yield lambda epoch: _epoch(model, task_dir, epoch, config, n_tasks)
        return
    plan = WorkerPlan(config.meta, config.tasks, Path(task_dir), first, last, max(1, config.runtime.torch_threads // workers),
                      str(model.device), model.training_state())
    _log("meta-training in %d data-parallel processes (%s)", workers, backend_for(model.device))
    with ParallelTrainer(workers, plan) as trainer:

        def run_epoch(epoch: int) -> EpochStats:
            stats, state = trainer.next_epoch()
            model.load_training_state(state)
            return stats

        yield run_epoch


def _start(config: Config, model: ResponsiveMF, ckpt: Path, history) -> tuple[int, list[dict], str | None]:
    """Resume (next epoch, metric history, run id) from a checkpoint, or initialise and pre-train."""
    found = _readable_checkpoint(ckpt, config.hash_of(*TRAIN_SECTIONS))
    if found is not None:
        state, record = found
        model.load_training_state(state)
        _log("resuming from %s after epoch %d", ckpt, record["epoch"])
        return record["epoch"] + 1, record["history"], record["run_id"]
    model.init_params(history.n_users, history.n_items)
    for epoch in range(config.meta.pretrain_epochs):
        loss = model.pretrain_epoch(history, epoch)
        _log("BPR pre-training epoch %d: loss %.4f", epoch, loss)
    return 0, [], None


# Θ's bytes are held ~4 times while training: P and Q, their gradients, Adam's two moments. A batch's adapted
# copies (second order, L inner steps) hold batch_tasks x K rows of d for every step, a few times over.
THETA_COPIES, BATCH_COPIES = 4, 8


def memory_needed(config: Config, n_users: int, n_items: int) -> int:
    """A lower estimate of meta-training's memory in bytes (float32)."""
    meta = config.meta
    theta = (n_users + n_items) * meta.dim * 4 * THETA_COPIES
    batch = meta.batch_tasks * config.tasks.K * meta.dim * 4 * BATCH_COPIES * (meta.inner_steps + 1)
    return theta + batch


def _available_memory() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (Linux), else None (then nothing is checked up front)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def check_memory(config: Config, n_users: int, n_items: int) -> None:
    """Refuse, naming the fields, a configuration whose Θ cannot fit: else the kernel kills the run or torch fails
    deep inside an allocation."""
    needed, available = memory_needed(config, n_users, n_items), _available_memory()
    if available is not None and needed > available:
        raise ValueError(f"meta.dim = {config.meta.dim} (with meta.batch_tasks = {config.meta.batch_tasks}) needs at least "
                         f"{needed / 2**30:.1f} GiB to meta-train on {n_users} users and {n_items} items, more than the "
                         f"{available / 2**30:.1f} GiB available: lower meta.dim or meta.batch_tasks")


def _out_of_memory(config: Config, exc: BaseException) -> BaseException:
    """An allocation failure as a clear error naming the fields that size it; any other error as it is."""
    text = str(exc)
    if isinstance(exc, MemoryError) or "can't allocate memory" in text or "out of memory" in text.lower():
        return ValueError(f"meta-training ran out of memory with meta.dim = {config.meta.dim} and meta.batch_tasks = "
                          f"{config.meta.batch_tasks} ({text.splitlines()[0][:200] if text else type(exc).__name__}): lower them")
    return exc


def _readable_checkpoint(ckpt: Path, config_hash: str) -> tuple[dict[str, torch.Tensor], dict] | None:
    """The checkpoint, or None; an unreadable one is moved aside (its MLflow run marked FAILED) so training starts afresh."""
    try:
        return load_checkpoint(ckpt, config_hash)
    except CorruptFileError as exc:
        aside = quarantine(ckpt)
        log_warning(logger, "%s; the checkpoint was moved aside to %s and meta-training starts afresh", exc, aside)
        _fail_abandoned_run(aside / STATE_META)
        return None


def _fail_abandoned_run(meta: Path) -> None:
    """Best effort: the run a quarantined checkpoint belonged to will never resume; end it FAILED, not RUNNING."""
    try:
        run_id = json.loads(meta.read_text())["run_id"]
        MlflowClient().set_terminated(run_id, "FAILED")
    except Exception:  # noqa: BLE001 - the record itself may be what is corrupt
        pass


def meta_train(
    config: Config,
    task_dir: Path | None = None,
    max_epochs: int | None = None,
    row: str = "responsive",
    parent_run_id: str | None = None,
    run_name: str | None = None,
) -> TrainResult:
    """Meta-train (or resume) row ``row`` (ours or a variant of it) on the task shards; ``max_epochs`` stops early
    (as an interruption would). A finished training of the same configuration is returned as it is: its MLflow run
    is not reopened and nothing is logged again. A new MLflow run nests under this thread's active run, else
    ``parent_run_id``, else the open parent run (``tasks.track.tracking.child_run``). Nothing is registered: a serving
    candidate is registered after its evaluation (``tasks.track.model_registry.register_candidate``)."""
    config = config.for_row(row)
    cached = cached_training(config, row) if max_epochs is None else None
    if cached is not None:
        _log("meta-training already %s in %s (MLflow run %s)", cached.status, training_dir(config), cached.run_id)
        return cached
    torch.set_num_threads(config.runtime.torch_threads)
    task_dir = Path(task_dir) if task_dir else task_shards_dir(config)
    n_tasks = int(read_manifest(task_dir)["n_tasks"])
    prepared = load_prepared(prepared_dir(config))
    history = prepared.history
    model = from_config(config)
    model.set_index(history)
    work = training_dir(config)
    ckpt = work / "checkpoint"
    setup_mlflow(config)
    check_memory(config, history.n_users, history.n_items)
    try:
        first_epoch, records, run_id = _start(config, model, ckpt, history)
    except (MemoryError, RuntimeError) as exc:
        raise _out_of_memory(config, exc) from None
    last = config.meta.epochs if max_epochs is None else min(config.meta.epochs, max_epochs)
    tags = run_tags(config, kind="training", model=row, status="running", fold=str(config.data.fold))
    name = run_name or training_run_name(row, config.data.fold)
    with _epoch_runner(config, model, task_dir, first_epoch, last, n_tasks) as run_epoch, \
            child_run(name, tags, run_id=run_id, parent_run_id=parent_run_id) as run_id:
        if first_epoch == 0 and not records:
            mlflow.log_params({**model_params(config, row), "tasks.n_tasks": n_tasks, "history.interactions": len(history)})
        for epoch in range(first_epoch, last):
            try:
                stats = run_epoch(epoch)
            except DivergedError as exc:
                return _diverged(config, work, run_id, epoch, records, str(exc), getattr(exc, "epoch_stats", None))
            except (MemoryError, RuntimeError) as exc:
                raise _out_of_memory(config, exc) from None
            epoch_record = {"epoch": epoch, **_epoch_metrics(stats)}
            records.append(epoch_record)
            mlflow.log_metrics({k: v for k, v in epoch_record.items() if k != "epoch"}, step=epoch)
            save_checkpoint(model, ckpt, {"epoch": epoch, "history": records, "run_id": run_id, "config_hash": config.hash_of(*TRAIN_SECTIONS)})
            _log("epoch %d/%d: support %.4f, query %.4f, %d tasks in %.1fs (%.0f tasks/s), gradient norm before clipping max %.3g mean %.3g%s",
                 epoch + 1, config.meta.epochs, stats.support_loss, stats.query_loss, stats.tasks, stats.seconds, stats.tasks_per_s,
                 stats.grad_norm_max, stats.grad_norm_mean, f", clipped at {config.meta.grad_clip} in {stats.clipped_steps} of {stats.steps} steps" if config.meta.grad_clip else "")
        if last < config.meta.epochs:
            mlflow.set_tag("status", "stopped")
            return TrainResult("stopped", last, run_id, records)
        return _finish(config, model, work, run_id, records, prepared, row)


def _epoch_metrics(stats: EpochStats) -> dict[str, float]:
    """An epoch's metrics under their MLflow names (the gradient norms are before clipping)."""
    return {SUPPORT_LOSS: stats.support_loss, QUERY_LOSS: stats.query_loss, TASKS_PER_S: stats.tasks_per_s, EPOCH_SECONDS: stats.seconds,
            GRAD_NORM_MAX: stats.grad_norm_max, GRAD_NORM_MEAN: stats.grad_norm_mean, CLIPPED_STEPS: stats.clipped_steps}


def _diverged(config: Config, work: Path, run_id: str, epoch: int, records: list[dict], message: str, partial: EpochStats | None = None) -> TrainResult:
    """Record the divergence (with the diverging epoch's steps before it); remove the checkpoint so no weights of this run remain."""
    mlflow.set_tag("status", "diverged")
    mlflow.set_tag("diverged_epoch", str(epoch))
    mlflow.log_text(message, "diverged.txt")
    if partial is not None and partial.steps:
        records = [*records, {"epoch": epoch, "diverged": True, "steps_before_divergence": partial.steps, **_epoch_metrics(partial)}]
        mlflow.log_metrics({GRAD_NORM_MAX: partial.grad_norm_max, GRAD_NORM_MEAN: partial.grad_norm_mean}, step=epoch)
    mlflow.end_run(status="FAILED")  # the `with start_run` around us then leaves it as it is
    shutil.rmtree(work / "checkpoint", ignore_errors=True)
    write_json({"status": "diverged", "epoch": epoch, "run_id": run_id, "message": message, "history": records}, work / STATUS_FILE)
    _log("meta-training diverged in epoch %d (λ_paper=%g, λ_ML=%g): %s", epoch, paper_lambda(config.meta.lambda_ml, config.tasks.K),
         config.meta.lambda_ml, message)
    return TrainResult("diverged", epoch, run_id, records, message=message)


def _finish(config: Config, model: ResponsiveMF, work: Path, run_id: str, records: list[dict], prepared: PreparedData, row: str) -> TrainResult:
    """Untrained rows reset (§11), Θ as an MLflow model on the run (safetensors + JSON, no pickle), the evaluable model, status finished.

    Nothing is registered here: only serving candidates are, after their evaluation (``tasks.track.model_registry``)."""
    model.reset_untrained_rows()
    model_uri = log_theta_model(model, config, prepared, row)  # its metrics: the fold's evaluation, linked when it is done
    out = save_model(model, row, config, model_dir(config, row), {"run_id": run_id, "history_interactions": len(prepared.history)})
    mlflow.set_tag("status", "finished")
    write_json({"status": "finished", "epochs": len(records), "run_id": run_id, "model_uri": model_uri, "history": records}, work / STATUS_FILE)
    return TrainResult("finished", len(records), run_id, records, model_path=str(out), model_uri=model_uri)


@task(name="meta-train")
def meta_train_task(config: Config, task_dir: Path | None = None, row: str = "responsive", parent_run_id: str | None = None) -> TrainResult:
    """Prefect wrapper around ``meta_train`` (in a compute slot, ``tasks.runtime.slots``); a divergence is a result
    (status diverged), not a crash."""
    with compute_slot(config.runtime.max_workers):
        return meta_train(config, task_dir, row=row, parent_run_id=parent_run_id)
