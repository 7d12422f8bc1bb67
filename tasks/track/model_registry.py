"""Θ in MLflow: logged as a pyfunc model on its training run, registered only when it is a serving candidate.

``log_theta_model`` logs the model on the active (training) run: the code is
``tasks/track/theta_model.py`` (models from code, nothing pickled), the weights
safetensors, the rest JSON, with a signature, and the pure ``metarec`` package
as its code path.

``register_candidate`` registers a run's model as a version of its data set's
``responsive-mf-<data set>``: called by the pipeline (``metarec run``) and the nightly
run after evaluation, never by the λ_ML sweep or ``metarec train``. A run is
registered at most once; the version carries a description and tags (data set,
score, kind of run, preset).
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version as installed
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from metarec.config import Config
from metarec.models.responsive import ResponsiveMF
from tasks.runtime.atomic import write_json
from metarec.models.registry import ROWS
from metarec.redaction import redact
from tasks.track.champion import DATA_TAG, SCORE_TAG, CaseScores, champion_uri, log_case_scores, registered_model_name
from tasks.runtime.integrity import CorruptFileError, file_sha256
from tasks.data.prepared import PreparedData
from tasks.track.tracking import PROJECT_ROOT, run_tags

logger = logging.getLogger(__name__)

MODEL_CODE = Path(__file__).with_name("theta_model.py")
THETA_FILE, THETA_META, SEEN_FILE, IDS_FILE = "theta.safetensors", "theta.json", "seen.safetensors", "ids.json"
THETA_HASH = "theta_sha256"  # in theta.json: Θ's bytes as written, so damage that keeps the file's size is caught on load
SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("string", "user"), ColSpec("string", "item"), ColSpec("string", "recent", required=False)]),
    outputs=Schema([ColSpec("double", "score")]),
)
# What the model's code imports; pinned to the versions it was logged with (local labels such as +cpu dropped).
REQUIREMENTS = ("mlflow", "torch", "numpy", "pandas", "safetensors", "pydantic", "pydantic-settings")


def _requirements() -> list[str]:
    pins = []
    for name in REQUIREMENTS:
        try:
            pins.append(f"{name}=={installed(name).split('+')[0]}")
        except PackageNotFoundError:
            pins.append(name)
    return pins


def save_theta(model: ResponsiveMF, out: Path, config: Config) -> Path:
    """out/theta.safetensors (P, Q and the trained-row masks) and out/theta.json (shapes, meta and task config, hash)."""
    out.mkdir(parents=True, exist_ok=True)
    users, items = model._trained_masks()
    tensors = {"P": model.P_.detach().cpu().contiguous(), "Q": model.Q_.detach().cpu().contiguous(),
               "trained_users": torch.as_tensor(users), "trained_items": torch.as_tensor(items),
               **{f"extra.{name}": param.detach().cpu().contiguous() for name, param in model.extra_.items()}}  # Ours+'s b, rates, prior, p0
    save_file(tensors, str(out / THETA_FILE))
    write_json(
        {"n_users": model.n_users_, "n_items": model.n_items_, "dim": model.meta.dim, "meta": config.meta.model_dump(mode="json"),
         "tasks": config.tasks.model_dump(mode="json"), "config_hash": config.hash_of(), THETA_HASH: file_sha256(out / THETA_FILE)},
        out / THETA_META,
    )
    return out


def load_theta(path: Path) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(P, Q, description) from a folder written by ``save_theta``, or from a logged pyfunc model (its
    ``artifacts/``): safetensors and JSON, no pickle. The description's ``masks`` holds the trained-row masks
    when the file has them and ``extras`` Θ's optional parameters (``ResponsiveMF.load_training_state`` takes both).

    Raises CorruptFileError, naming the file, when either file cannot be read, Θ differs from the hash its
    description recorded, holds a NaN or infinite entry (it would be served as "recommends nothing"), or the
    description's settings are not valid.
    """
    path = Path(path)
    folder = next((p for p in (path, path / "artifacts") if (p / THETA_FILE).is_file()), None)
    if folder is None:
        raise FileNotFoundError(f"no {THETA_FILE} in {path} or {path / 'artifacts'}")
    try:
        tensors = load_file(str(folder / THETA_FILE))
    except (SafetensorError, OSError) as exc:
        raise CorruptFileError(folder / THETA_FILE, f"Θ cannot be read ({exc})") from None
    try:
        described = json.loads((folder / THETA_META).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"no {THETA_META} in {folder}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise CorruptFileError(folder / THETA_META, f"Θ's description is not valid JSON ({exc})") from None
    if not isinstance(described, dict):
        raise CorruptFileError(folder / THETA_META, "Θ's description is not a JSON object")
    missing = [key for key in ("P", "Q") if key not in tensors] + [key for key in ("meta", "tasks") if key not in described]
    if missing:
        raise CorruptFileError(folder, f"Θ lacks {missing}")
    _check_settings(folder / THETA_META, described)
    recorded = described.get(THETA_HASH)
    if recorded is not None and file_sha256(folder / THETA_FILE) != recorded:
        raise CorruptFileError(folder / THETA_FILE, f"Θ differs from the SHA-256 recorded in {THETA_META} (overwritten or damaged)")
    for key in ("P", "Q"):
        if not torch.isfinite(tensors[key]).all():
            raise CorruptFileError(folder / THETA_FILE, f"Θ's {key} holds NaN or infinite entries: it cannot rank items")
    described["masks"] = {key: tensors[key] for key in ("trained_users", "trained_items") if key in tensors}
    described["extras"] = {key: value for key, value in tensors.items() if key.startswith("extra.")}  # as load_training_state names them
    return tensors["P"], tensors["Q"], described


def _check_settings(path: Path, described: dict) -> None:
    """The meta and task settings Θ was trained with must still validate; a damaged file is named, not a pydantic model."""
    from pydantic import ValidationError

    from metarec.config import MetaConfig, TaskConfig

    for key, section in (("meta", MetaConfig), ("tasks", TaskConfig)):
        try:
            section(**described[key])
        except (ValidationError, TypeError) as exc:
            problems = "; ".join(f"{key}.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()) if isinstance(exc, ValidationError) else str(exc)
            raise CorruptFileError(path, f"Θ's description holds invalid settings ({problems})") from None


def theta_files(model: ResponsiveMF, config: Config, prepared: PreparedData, out: Path) -> dict[str, str]:
    """The model's artifacts in ``out`` (see ``tasks/track/theta_model.py``), by artifact name."""
    save_theta(model, out, config)
    seen = {key: torch.as_tensor(np.concatenate([getattr(prepared.history, key), getattr(prepared.stream, key)]).astype(np.int64))
            for key in ("users", "items", "ts")}
    save_file(seen, str(out / SEEN_FILE))
    raw = lambda name, column: [str(v) for v in pq.read_table(prepared.root / name, columns=[column]).column(column).to_pylist()]  # noqa: E731
    write_json({"users": raw("users.parquet", "raw_user"), "items": raw("items.parquet", "raw_item")}, out / IDS_FILE)
    return {"theta": str(out / THETA_FILE), "description": str(out / THETA_META), "seen": str(out / SEEN_FILE), "ids": str(out / IDS_FILE)}


def input_example(prepared: PreparedData) -> pd.DataFrame:
    """Two candidates for the first user of the history, and one for a new user who just showed the first item."""
    users = pq.read_table(prepared.root / "users.parquet", columns=["raw_user"]).column("raw_user").to_pylist()
    items = pq.read_table(prepared.root / "items.parquet", columns=["raw_item"]).column("raw_item").to_pylist()
    user = str(users[int(prepared.history.users[0])])
    return pd.DataFrame({"user": [user, user, "a-new-user"], "item": [str(items[1]), str(items[2]), str(items[1])],
                         "recent": [None, None, str(items[0])]})


def logged_model_name(row: str, fold: int) -> str:
    """The logged model's name in its run: row and fold (``responsive_plus-fold0``), so a run's models tell apart."""
    return f"{row}-fold{fold}"


def log_theta_model(model: ResponsiveMF, config: Config, prepared: PreparedData, row: str = "responsive") -> str:
    """Log Θ as a pyfunc model named ``<row>-fold<fold>`` on the active run; returns its model URI (``models:/m-...``).
    Its metrics, the fold's evaluation, are linked once it is evaluated (``log_model_metrics``)."""
    with tempfile.TemporaryDirectory() as tmp:
        info = mlflow.pyfunc.log_model(
            name=logged_model_name(row, config.data.fold),
            python_model=str(MODEL_CODE),
            artifacts=theta_files(model, config, prepared, Path(tmp)),
            code_paths=[str(PROJECT_ROOT / "metarec")],
            signature=SIGNATURE,
            input_example=input_example(prepared),
            pip_requirements=_requirements(),
            tags={"row": row, "fold": str(config.data.fold)},
        )
    return info.model_uri


def log_model_metrics(run_id: str, model_uri: str | None, metrics: dict[str, float]) -> None:
    """Link evaluation metrics to a logged model (``models:/m-...``) of run ``run_id``, as its final metrics (the run
    shows them too: a model's metrics are logged on its run)."""
    if not model_uri or not model_uri.startswith("models:/m-"):
        return
    finite = {key: float(value) for key, value in metrics.items() if np.isfinite(value)}
    if finite:
        mlflow.log_metrics(finite, run_id=run_id, model_id=model_uri.removeprefix("models:/"))


def run_model_uri(run_id: str) -> str:
    """The model URI of the pyfunc model logged on run ``run_id`` (a training run logs one)."""
    client = MlflowClient()
    run = client.get_run(run_id)
    found = client.search_logged_models([run.info.experiment_id], filter_string=f"source_run_id = '{run_id}'")
    if not found:
        raise LookupError(f"run {run_id} has no logged model to register")
    return found[0].model_uri


@dataclass(frozen=True)
class Candidate:
    """What a registered version is: the row, the fold whose model it is and what it was scored on."""

    row: str
    fold: int
    folds: int
    cases: CaseScores | None  # its new-user NDCG@10 at n = 5 per case (None: not evaluated)


def description(config: Config, kind: str, candidate: Candidate, name: str, version: str) -> str:
    """What a version is and how to use it (markdown, as the registry page renders it)."""
    label = ROWS[candidate.row].label if candidate.row in ROWS else candidate.row
    cases = candidate.cases
    scored = (f"new-user NDCG@10 at n = 5: **{cases.score:.3f}** on fold {candidate.fold}'s {len(cases.users)} new users "
              "(the model trained on that fold's history)") if cases is not None else "not evaluated"
    never = " A quick run's version is never promoted to champion." if config.runtime.preset != "full" else ""
    return (
        f"**{label}** (row `{candidate.row}`), fold {candidate.fold} of {candidate.folds} new-user fold(s), meta-trained on "
        f"`{redact(config.data.dataset)}` ({config.runtime.preset} preset) by a {kind} run; {scored}.{never}\n\n"
        f"Load it with `mlflow.pyfunc.load_model('models:/{name}/{version}')` (or `'{champion_uri(config.data.dataset)}'` "
        "for the one served) and predict a DataFrame with string columns `user`, `item` (raw ids, one row per candidate) "
        "and optional `recent` (the user's latest raw item ids, comma-separated, oldest first): it returns a `score` per "
        "row, higher is better."
    )


def registered_version(client: MlflowClient, name: str, run_id: str):
    """The version of ``name`` already registered from run ``run_id``, or None."""
    try:
        found = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    except MlflowException:
        return None
    return min(found, key=lambda v: int(v.version)) if found else None


def register_candidate(config: Config, run_id: str, kind: str, candidate: Candidate) -> str:
    """Register run ``run_id``'s model as a version of this data set's ``responsive-mf-<data set>`` (once per run: a
    re-run returns the same version); tags: data set, preset, kind of run, row, fold, score; a description saying
    what it is and how to load it. The candidate's per-case scores are logged on the run for later comparisons."""
    client = MlflowClient()
    name = registered_model_name(config.data.dataset)
    existing = registered_version(client, name, run_id)
    if existing is not None:
        logger.info("run %s is already registered as %s v%s", run_id, name, existing.version)
        return str(existing.version)
    try:
        client.create_registered_model(name, tags={"dataset": redact(config.data.dataset)}, description=(
            f"Θ of the responsive MF on `{redact(config.data.dataset)}`: one version per serving candidate (pipeline and "
            "nightly runs); the alias `champion` marks the one served, moved only by a full-preset run that beats it."))
    except MlflowException:
        pass  # exists already
    tags = {**run_tags(config), "kind": kind, "row": candidate.row, "fold": str(candidate.fold), "folds": str(candidate.folds)}
    if candidate.cases is not None:
        tags[SCORE_TAG] = f"{candidate.cases.score:.3f}"
        tags[DATA_TAG] = candidate.cases.data_hash
        tags["users"] = str(len(candidate.cases.users))
        log_case_scores(client, run_id, candidate.cases)
    created = mlflow.register_model(run_model_uri(run_id), name, tags=tags)
    client.update_model_version(name, created.version, description=description(config, kind, candidate, name, str(created.version)))
    logger.info("registered run %s as %s v%s", run_id, name, created.version)
    return str(created.version)
