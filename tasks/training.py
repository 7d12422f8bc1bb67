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
3. NaN/Inf in the objective, gradient or Θ stops the run with status
   ``diverged`` (MLflow tag and ``status.json``, with the gradient norms of the
   diverging epoch's steps before it), and no weights are written (the
   checkpoint is removed);
4. at the end the rows no training step touched (users absent from the tasks,
   items never a positive) are reset to the mean of the trained rows + noise
   (METHOD.md §11), Θ is saved as safetensors in the run's ``model/``
   artifacts with a JSON description (``load_theta`` reads it back without
   unpickling), registered as ``responsive-mf``, and the whole model (Θ, the
   trained-row masks, what it has seen) is saved with
   ``tasks.models.save_model`` where the evaluation looks for it.

Progress: a tqdm bar over tasks when stderr is a terminal (and
``runtime.progress``), else one log line per epoch (Prefect's logger in a flow).
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from prefect import task
from safetensors.torch import load_file, save_file

from metarec.config import Config
from metarec.maml import DivergedError
from metarec.models.responsive import EpochStats, ResponsiveMF, from_config
from tasks.atomic import atomic_dir, write_json
from tasks.logs import log_info
from tasks.models import model_dir, save_model
from tasks.paths import prepared_dir, task_shards_dir
from tasks.prepared import load_prepared
from tasks.task_shards import iter_task_shards, read_manifest
from tasks.tracking import REGISTERED_MODEL, run_tags, setup_mlflow

logger = logging.getLogger(__name__)

# metric names are an interface: the same in every training run
SUPPORT_LOSS, QUERY_LOSS, TASKS_PER_S, EPOCH_SECONDS = "support_loss", "query_loss", "tasks_per_s", "epoch_seconds"
GRAD_NORM_MAX, GRAD_NORM_MEAN, CLIPPED_STEPS = "grad_norm_max", "grad_norm_mean", "clipped_steps"  # norms before clipping
THETA_FILE, THETA_META = "theta.safetensors", "theta.json"
STATE_FILE, STATE_META, STATUS_FILE = "state.safetensors", "state.json", "status.json"
TRAIN_SECTIONS = ("data", "tasks", "meta")


@dataclass
class TrainResult:
    status: str  # "finished", "diverged" or "stopped" (max_epochs reached before meta.epochs)
    epochs_done: int
    run_id: str
    history: list[dict] = field(default_factory=list)
    model_version: str | None = None
    model_path: str | None = None
    message: str = ""


def training_dir(config: Config) -> Path:
    """prepared_dir/training/responsive-<hash of data, tasks, meta>: checkpoint and status."""
    return prepared_dir(config) / "training" / f"responsive-{config.hash_of(*TRAIN_SECTIONS)}"


def _log(message: str, *args) -> None:
    log_info(logger, message, *args)


# ------------------------------------------------------------------ checkpoints
def save_checkpoint(model: ResponsiveMF, out: Path, record: dict) -> None:
    """Θ, Adam moments and generator state (safetensors) and the run record (JSON), replaced atomically."""
    with atomic_dir(out) as tmp:
        save_file({k: v.contiguous() for k, v in model.training_state().items()}, str(tmp / STATE_FILE))
        (tmp / STATE_META).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


def load_checkpoint(path: Path, config_hash: str) -> tuple[dict[str, torch.Tensor], dict] | None:
    """(state, record) of a complete checkpoint for this configuration, else None."""
    meta, state = Path(path) / STATE_META, Path(path) / STATE_FILE
    if not meta.is_file() or not state.is_file():
        return None
    record = json.loads(meta.read_text())
    if record.get("config_hash") != config_hash:
        logger.warning("ignoring checkpoint %s of another configuration (%s)", path, record.get("config_hash"))
        return None
    return load_file(str(state)), record


# ------------------------------------------------------------------- Θ on disk
def save_theta(model: ResponsiveMF, out: Path, config: Config) -> Path:
    """out/theta.safetensors (P, Q and the trained-row masks) and out/theta.json (shapes, meta config, hash)."""
    out.mkdir(parents=True, exist_ok=True)
    users, items = model._trained_masks()
    tensors = {"P": model.P_.detach().contiguous(), "Q": model.Q_.detach().contiguous(),
               "trained_users": torch.as_tensor(users), "trained_items": torch.as_tensor(items)}
    save_file(tensors, str(out / THETA_FILE))
    write_json(
        {"n_users": model.n_users_, "n_items": model.n_items_, "dim": model.meta.dim, "meta": config.meta.model_dump(mode="json"),
         "tasks": config.tasks.model_dump(mode="json"), "config_hash": config.hash_of()},
        out / THETA_META,
    )
    return out


def load_theta(path: Path) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(P, Q, description) from a folder written by ``save_theta`` (safetensors: no pickle); the description's
    ``masks`` holds the trained-row masks when the file has them (``ResponsiveMF.load_training_state`` takes them)."""
    path = Path(path)
    if not (path / THETA_FILE).is_file():
        raise FileNotFoundError(f"no {THETA_FILE} in {path}")
    tensors = load_file(str(path / THETA_FILE))
    described = json.loads((path / THETA_META).read_text())
    described["masks"] = {key: tensors[key] for key in ("trained_users", "trained_items") if key in tensors}
    return tensors["P"], tensors["Q"], described


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


def _start(config: Config, model: ResponsiveMF, ckpt: Path, history) -> tuple[int, list[dict], str | None]:
    """Resume (next epoch, metric history, run id) from a checkpoint, or initialise and pre-train."""
    found = load_checkpoint(ckpt, config.hash_of(*TRAIN_SECTIONS))
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


def meta_train(
    config: Config,
    task_dir: Path | None = None,
    max_epochs: int | None = None,
    row: str = "responsive",
    parent_run_id: str | None = None,
    register: bool = True,
) -> TrainResult:
    """Meta-train (or resume) row ``row`` (ours or a variant of it) on the task shards; ``max_epochs`` stops early
    (as an interruption would). ``parent_run_id`` nests a new MLflow run under a pipeline's; ``register`` makes the
    result a version of the registered model (serving candidates only: not folds > 0, not sweep points)."""
    config = config.for_row(row)
    torch.set_num_threads(config.runtime.torch_threads)
    task_dir = Path(task_dir) if task_dir else task_shards_dir(config)
    n_tasks = int(read_manifest(task_dir)["n_tasks"])
    history = load_prepared(prepared_dir(config)).history
    model = from_config(config)
    model.set_index(history)
    work = training_dir(config)
    ckpt = work / "checkpoint"
    setup_mlflow(config)
    first_epoch, records, run_id = _start(config, model, ckpt, history)
    last = config.meta.epochs if max_epochs is None else min(config.meta.epochs, max_epochs)
    tags = run_tags(config, kind="training", model=row, status="running", fold=str(config.data.fold))
    name = None if run_id else f"train {row} fold {config.data.fold}"
    nested = mlflow.active_run() is not None  # e.g. the train command inside a nightly run in the same thread
    with mlflow.start_run(run_id=run_id, run_name=name, tags=None if run_id else tags, parent_run_id=None if run_id else parent_run_id, nested=nested) as run:
        run_id = run.info.run_id
        if first_epoch == 0 and not records:
            mlflow.log_params({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in config.to_flat_dict().items()})
            mlflow.log_params({"tasks.n_tasks": n_tasks, "history.interactions": len(history)})
        for epoch in range(first_epoch, last):
            try:
                stats = _epoch(model, task_dir, epoch, config, n_tasks)
            except DivergedError as exc:
                return _diverged(config, work, run_id, epoch, records, str(exc), exc.epoch_stats)
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
        return _finish(config, model, work, run_id, records, len(history), row, register)


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
    shutil.rmtree(work / "checkpoint", ignore_errors=True)
    write_json({"status": "diverged", "epoch": epoch, "run_id": run_id, "message": message, "history": records}, work / STATUS_FILE)
    _log("meta-training diverged in epoch %d (lambda_ml=%s): %s", epoch, config.meta.lambda_ml, message)
    return TrainResult("diverged", epoch, run_id, records, message=message)


def _finish(config: Config, model: ResponsiveMF, work: Path, run_id: str, records: list[dict], n_history: int, row: str, register: bool) -> TrainResult:
    """Untrained rows reset (§11), Θ to the run's artifacts (safetensors), a registered version, the evaluable model, status finished."""
    model.reset_untrained_rows()
    with tempfile.TemporaryDirectory() as tmp:
        mlflow.log_artifacts(str(save_theta(model, Path(tmp) / "model", config)), artifact_path="model")
    version = _register(config, run_id) if register else None
    out = save_model(model, row, config, model_dir(config, row), {"run_id": run_id, "history_interactions": n_history})
    mlflow.set_tag("status", "finished")
    write_json({"status": "finished", "epochs": len(records), "run_id": run_id, "model_version": version, "history": records}, work / STATUS_FILE)
    return TrainResult("finished", len(records), run_id, records, version, str(out))


def _register(config: Config, run_id: str) -> str:
    client = MlflowClient()
    try:
        client.create_registered_model(REGISTERED_MODEL)
    except MlflowException:
        pass  # exists already
    source = f"{mlflow.get_run(run_id).info.artifact_uri}/model"
    return client.create_model_version(REGISTERED_MODEL, source, run_id, tags=run_tags(config)).version


@task(name="meta-train")
def meta_train_task(config: Config, task_dir: Path | None = None, row: str = "responsive", parent_run_id: str | None = None, register: bool = True) -> TrainResult:
    """Prefect wrapper around ``meta_train``; a divergence is a result (status diverged), not a crash."""
    return meta_train(config, task_dir, row=row, parent_run_id=parent_run_id, register=register)
