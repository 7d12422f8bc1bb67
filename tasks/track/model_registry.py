"""Θ in MLflow: logged as a pyfunc model on its training run, registered only when it is a serving candidate.

``log_theta_model`` logs the model on the active (training) run: the code is
``tasks/track/theta_model.py`` (models from code, nothing pickled), the weights
safetensors, the rest JSON, with a signature, and the pure ``metarec`` package
as its code path.

``register_candidate`` registers a run's model as a version of
``responsive-mf``: called by the pipeline (``metarec run``) and the nightly
run after evaluation, never by the λ_ML sweep or ``metarec train``. A run is
registered at most once; the version carries a description and tags (data set,
score, kind of run, preset).
"""

from __future__ import annotations

import json
import logging
import tempfile
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
from tasks.track.champion import DATA_TAG, SCORE_TAG
from tasks.runtime.integrity import CorruptFileError, file_sha256
from tasks.data.prepared import PreparedData
from tasks.track.tracking import PROJECT_ROOT, REGISTERED_MODEL, run_tags

logger = logging.getLogger(__name__)

MODEL_NAME = "model"  # the logged model's name in its run
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


def log_theta_model(model: ResponsiveMF, config: Config, prepared: PreparedData) -> str:
    """Log Θ as a pyfunc model named ``model`` on the active run; returns its model URI (``models:/m-...``)."""
    with tempfile.TemporaryDirectory() as tmp:
        info = mlflow.pyfunc.log_model(
            name=MODEL_NAME,
            python_model=str(MODEL_CODE),
            artifacts=theta_files(model, config, prepared, Path(tmp)),
            code_paths=[str(PROJECT_ROOT / "metarec")],
            signature=SIGNATURE,
            input_example=input_example(prepared),
            pip_requirements=_requirements(),
        )
    return info.model_uri


def run_model_uri(run_id: str) -> str:
    """The model URI of the pyfunc model logged on run ``run_id``."""
    client = MlflowClient()
    run = client.get_run(run_id)
    found = client.search_logged_models([run.info.experiment_id], filter_string=f"source_run_id = '{run_id}' AND name = '{MODEL_NAME}'")
    if not found:
        raise LookupError(f"run {run_id} has no logged model {MODEL_NAME!r} to register")
    return found[0].model_uri


def description(config: Config, kind: str, score: float | None, version: str) -> str:
    """What a version is and how to use it (markdown, as the registry page renders it)."""
    scored = f"new-user NDCG@10 at n = 5: **{score:.4f}**" if score is not None else "not evaluated"
    return (
        f"Θ of the responsive MF meta-trained on `{config.data.dataset}` ({config.runtime.preset} preset) by a {kind} run; "
        f"{scored}.\n\nLoad it with `mlflow.pyfunc.load_model('models:/{REGISTERED_MODEL}/{version}')` (or "
        f"`'models:/{REGISTERED_MODEL}@champion'` for the one served) and predict a DataFrame with string columns `user`, "
        "`item` (raw ids, one row per candidate) and optional `recent` (the user's latest raw item ids, comma-separated, "
        "oldest first): it returns a `score` per row, higher is better."
    )


def registered_version(client: MlflowClient, run_id: str):
    """The version of ``responsive-mf`` already registered from run ``run_id``, or None."""
    try:
        found = client.search_model_versions(f"name = '{REGISTERED_MODEL}' and run_id = '{run_id}'")
    except MlflowException:
        return None
    return min(found, key=lambda v: int(v.version)) if found else None


def register_candidate(config: Config, run_id: str, kind: str, score: float | None = None, data_hash: str | None = None) -> str:
    """Register run ``run_id``'s model as a version of ``responsive-mf`` (once per run: a re-run returns the same
    version); tags: data set, preset, kind of run, score; a description saying what it is and how to load it."""
    client = MlflowClient()
    existing = registered_version(client, run_id)
    if existing is not None:
        logger.info("run %s is already registered as %s v%s", run_id, REGISTERED_MODEL, existing.version)
        return str(existing.version)
    try:
        client.create_registered_model(REGISTERED_MODEL, description="Θ of the responsive MF: one version per serving candidate "
                                       "(pipeline and nightly runs); the alias champion marks the one served.")
    except MlflowException:
        pass  # exists already
    tags = {**run_tags(config), "kind": kind}
    if score is not None:
        tags[SCORE_TAG] = repr(float(score))  # exact: the champion comparison reads it back
        tags[DATA_TAG] = data_hash or tags["data_hash"]
    created = mlflow.register_model(run_model_uri(run_id), REGISTERED_MODEL, tags=tags)
    client.update_model_version(REGISTERED_MODEL, created.version, description=description(config, kind, score, str(created.version)))
    logger.info("registered run %s as %s v%s", run_id, REGISTERED_MODEL, created.version)
    return str(created.version)
