"""Whether a `metarec run` has anything left to do, decided without starting Prefect.

Every stage skips work whose output exists under its cache key (``tasks.runtime.paths``),
but finding that out inside the flow costs a Prefect server start and the
imports of Prefect and MLflow (15-30 s on 2 cores) for nothing. So the pipeline,
when it finishes, writes a record of the run it was asked for: its inputs'
fingerprint (``run_fingerprint``: the requested config, every fold's prepared
data key, the data set's tuning records, the hash of every stage's code and of
the flows' own) and the files it produced. A later run whose fingerprint is the
same would compute nothing new: the CLI prints the recorded results
(``cached_run``) instead. Light imports only.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from metarec.config import Config
from metarec.models.registry import ROWS
from tasks.runtime.tuned_records import record_in_use
from tasks.runtime.paths import STAGE_CODE, code_hash, data_version, dataset_slug, fold_configs, model_code, prepared_dir, stage_keys

logger = logging.getLogger(__name__)

# How the flows compose the stages and render the results (the λ_ML sweep runs inside the pipeline).
FLOW_CODE = ("flows.pipeline", "flows.lambda_sweep", "tasks.evaluate.aggregate", "tasks.evaluate.pooling")


def _tuning_records(config: Config) -> str:
    """Hash of the tuning record the run uses, its own or a borrowed one (it sets the tuned values the pipeline runs with)."""
    digest = hashlib.sha256()
    path, _ = record_in_use(config)
    if path is not None:
        digest.update(path.name.encode() + b":" + path.read_bytes())
    return digest.hexdigest()[:12]


def run_fingerprint(config: Config, sweep: bool) -> dict:
    """What a run's outputs depend on: the requested config, each fold's prepared-data key, the tuning records,
    and the code of every stage (each baseline's own) and of the flows. Equal fingerprints, equal stage keys."""
    code = {stage: code_hash(modules) for stage, modules in STAGE_CODE.items()}
    code.update({f"fit:{name}": model_code(name) for name in ROWS if not ROWS[name].is_ours})
    code["flows"] = code_hash(FLOW_CODE)
    return {"config": config.hash_of(), "sweep": sweep, "data": [data_version(c) for c in fold_configs(config)],
            "tuning": _tuning_records(config), "code": code}


def record_path(config: Config, sweep: bool) -> Path:
    """artifacts/<dataset>/pooled/requested-<config hash>-F<folds>[-sweep].json: keyed by what was asked for."""
    name = f"requested-{config.hash_of()}-F{config.data.new_user_folds}{'-sweep' if sweep else ''}.json"
    return Path(config.runtime.artifacts_dir) / dataset_slug(config.data.dataset) / "pooled" / name


def stage_record(config: Config, sweep: bool, files: dict[str, str]) -> dict:
    """The record a finished run writes: its fingerprint, every fold's stage keys and its output files."""
    return {"fingerprint": run_fingerprint(config, sweep), "keys": {str(c.data.fold): stage_keys(c) for c in fold_configs(config)},
            "files": dict(files)}


def cached_run(config: Config, sweep: bool) -> dict | None:
    """The record of an earlier run with the same fingerprint whose files all still exist, else None."""
    path = record_path(config, sweep)
    try:
        record = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if record.get("fingerprint") != run_fingerprint(config, sweep):
        return None
    missing = [name for name, file in record.get("files", {}).items() if not Path(file).exists()]
    if missing:
        logger.info("%s: %s no longer exist; running the flow", path, ", ".join(missing))
        return None
    return record
