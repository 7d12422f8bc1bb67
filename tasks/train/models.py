"""Fit a model on the prepared history, and save/load it without pickle.

On disk, one folder per fitted model (``model_dir``):

- ``state.npz``: the model's ``state_arrays()`` (numeric arrays only, loaded with
  ``allow_pickle=False``);
- ``model.json``: the model name, the config sections it was built from, the
  fit time and the sizes, so ``load_model`` rebuilds the same model; ``features``:
  the model's ``feature_report()`` (None for a model that uses no side features).

Every model behind ``StreamingRecommender`` that offers ``state_arrays`` /
``load_state_arrays`` can be saved (all baselines do).

A saved model is a cache: one that cannot be read back (a truncated ``state.npz``,
an overwritten ``model.json``) is moved aside as ``<folder>.corrupt-<time>`` with a
warning and fitted again; ``load_model`` names the damaged file.
"""

from __future__ import annotations

import json
import logging
import time
import zipfile
from pathlib import Path

import numpy as np
from prefect import task

from metarec.config import Config
from metarec.interface import StreamingRecommender
from metarec.models.factory import make_model
from metarec.models.registry import ROWS
from tasks.runtime.atomic import atomic_dir
from tasks.runtime.integrity import CorruptFileError, quarantine
from tasks.runtime.logs import log_info, log_warning
from tasks.runtime.slots import compute_slot
from tasks.runtime.paths import model_key, prepared_dir
from tasks.data.prepared import PreparedData, load_prepared

logger = logging.getLogger(__name__)

STATE_FILE, META_FILE = "state.npz", "model.json"
BASELINE_NAMES = tuple(name for name, r in ROWS.items() if not r.is_ours)


def baseline_threads(config: Config) -> int:
    """One torch thread: the baselines' SGD steps are tiny tensors, where a second thread costs more than it gives
    (measured on 2 cores: 0.16 ms per 128-triple step with one thread, 0.37 ms with two)."""
    return 1


def model_sections(name: str) -> tuple[str, ...]:
    """The config sections row ``name``'s fitted state depends on (data, then the row's own)."""
    return ("data", *ROWS[name].sections)


def model_hash(config: Config, name: str) -> str:
    """The key of row ``name``'s fitted state: its sections after its tuned and fixed values (``Config.for_row``)
    and the code that fits it (``tasks.runtime.paths.model_key``)."""
    return model_key(config, name)


def model_dir(config: Config, name: str) -> Path:
    """prepared_dir/models/<name>-<key of the row's own config and code>."""
    return prepared_dir(config) / "models" / f"{name}-{model_hash(config, name)}"


def build_model(name: str, config: Config, prepared: PreparedData) -> StreamingRecommender:
    """The unfitted model of row ``name``, given the prepared data's side features (models read no files)."""
    model = make_model(name, config)
    model.set_features(prepared.features)
    return model


def fit_model(name: str, config: Config, prepared: PreparedData) -> StreamingRecommender:
    """An unfitted model from the config, fitted on the prepared history."""
    return build_model(name, config, prepared).fit(prepared.history)


def save_model(model: StreamingRecommender, name: str, config: Config, out: Path, extra: dict | None = None) -> Path:
    """Write ``out``/state.npz and ``out``/model.json atomically (the folder appears complete or not at all)."""
    if not hasattr(model, "state_arrays"):
        raise TypeError(f"model {name!r} ({type(model).__name__}) has no state_arrays(); it cannot be saved by tasks.train.models")
    arrays = model.state_arrays()
    bad = [key for key, value in arrays.items() if np.asarray(value).dtype == object]
    if bad:
        raise TypeError(f"model {name!r}: state arrays {bad} are not numeric; refusing to pickle them")
    row_config = config.for_row(name)
    meta = {
        "name": name,
        "class": type(model).__name__,
        "config": {section: getattr(row_config, section).model_dump(mode="json") for section in ("data", "tasks", "meta", "baselines", "neural")},
        "config_hash": model_hash(config, name),
        "arrays": {key: list(np.shape(value)) for key, value in arrays.items()},
        "features": model.feature_report(),  # None, or which side features it uses and whether it fell back to ids
        **(extra or {}),
    }
    with atomic_dir(Path(out)) as tmp:
        with open(tmp / STATE_FILE, "wb") as handle:
            np.savez(handle, **{key: np.asarray(value) for key, value in arrays.items()})
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return Path(out)


def load_model(path: Path) -> StreamingRecommender:
    """The model saved in ``path``, rebuilt from its own recorded config and state."""
    path = Path(path)
    meta_path, state_path = path / META_FILE, path / STATE_FILE
    if not meta_path.is_file() or not state_path.is_file():
        raise FileNotFoundError(f"no saved model in {path} (expected {META_FILE} and {STATE_FILE})")
    meta = _read_meta(meta_path)
    config = Config(**meta["config"], tuned={})  # the recorded sections are the row's own values already
    model = make_model(meta["name"], config)
    model.load_state_arrays(_read_arrays(state_path))
    return model


def _read_meta(path: Path) -> dict:
    try:
        meta = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise CorruptFileError(path, f"saved model description is not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or any(key not in meta for key in ("name", "config", "config_hash")):
        raise CorruptFileError(path, "saved model description lacks name, config or config_hash")
    return meta


def _read_arrays(path: Path) -> dict[str, np.ndarray]:
    """Every array of a state.npz, read in full (so the zip's CRCs are checked)."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {key: npz[key] for key in npz.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as exc:
        raise CorruptFileError(path, f"saved model state cannot be read ({type(exc).__name__}: {exc})") from None


def saved_model_ok(path: Path, config_hash: str) -> bool:
    """True when ``path`` holds a readable model of this config; False when absent or of another config.

    Raises CorruptFileError when it is there but cannot be read (both files are read in full).
    """
    meta_path, state_path = Path(path) / META_FILE, Path(path) / STATE_FILE
    if not meta_path.is_file() or not state_path.is_file():
        return False
    if _read_meta(meta_path).get("config_hash") != config_hash:
        return False
    _read_arrays(state_path)
    return True


def fit_and_save(name: str, config: Config, prepared: PreparedData | None = None, force: bool = False) -> Path:
    """Fit ``name`` on the prepared history and save it in ``model_dir``; reuse a complete save unless ``force``."""
    out = model_dir(config, name)
    if not force and _reusable(out, model_hash(config, name)):
        logger.info("model %s already fitted in %s", name, out)
        return out
    prepared = prepared or load_prepared(prepared_dir(config))
    # no torch.set_num_threads here: it is process-wide, and fits run beside meta-training in the pipeline
    started = time.perf_counter()
    model = fit_model(name, config, prepared)
    seconds = time.perf_counter() - started
    save_model(model, name, config, out, {"fit_seconds": round(seconds, 3), "history_interactions": len(prepared.history)})
    logger.info("fitted %s in %.1fs into %s", name, seconds, out)
    return out


def _reusable(out: Path, config_hash: str) -> bool:
    """A saved model to reuse; a damaged one is moved aside (with a warning) to be fitted again."""
    try:
        return saved_model_ok(out, config_hash)
    except CorruptFileError as exc:
        aside = quarantine(out)
        log_warning(logger, "%s; the saved model was moved aside to %s and is fitted again", exc, aside)
        return False


@task(name="fit-model")
def fit_model_task(name: str, config: Config, force: bool = False) -> Path:
    """Prefect wrapper around ``fit_and_save`` (in a compute slot, ``tasks.runtime.slots``)."""
    with compute_slot(config.runtime.max_workers):
        out = fit_and_save(name, config, force=force)
    log_info(logger, "model %s in %s", name, out)
    return out
