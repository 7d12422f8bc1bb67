"""Tuning with Optuna: one objective, one pruner, the same seeded TPE search and budget for every row, on the history only.

Each row (``metarec.models.registry.ROWS``) declares its search space as data;
adding a row's space there is all a new row needs. For each row:

- an Optuna study (TPE seeded by ``baselines.seed``, the row's position in ROWS
  and the worker) lives in ``<artifacts>/tuning/<dataset>/optuna.db`` (sqlite), so
  an interrupted tuning resumes where it stopped (trials cut off mid-way are marked
  failed and not counted). The study's name hashes everything its trials depend on
  (``study_name``): the config sections the row reads (``Row.sections``, besides
  the validation settings), the content of fold 0's history (``data_fingerprint``),
  the search space, the objective and the pruner. The budget is not in it: raising
  ``--budget`` continues a study. Its first trial is the row's current values;
- ``baselines.tune_budget`` trials (complete, pruned or failed) in three rounds;
  after each of the first two, every range whose best value so far sits on an edge
  is widened (``registry.widen``) up to its hard limits; the record flags any
  value still on an edge;
- multi-fidelity: a row's fit calls back after each pass (``StreamingRecommender.fit``'s
  ``on_epoch``); after passes 1, 3, 9, 27, ... (the pruner's rungs) the fit's copy is
  scored on the validation split by the same function as the final model
  (``tasks/train/validation.py``, objective ``OBJECTIVE``) and reported, and the
  Hyperband pruner (``PRUNER``, the same for every row) stops poor trials. Rows
  without passes (Pop) are scored once and not searched;
- trials run in ``runtime.max_workers`` processes (one torch thread each) against
  the same study, each process's share a Prefect task run (``tuning_worker``) (on 2 cores two 1-thread trials beat one 2-thread trial: README,
  Tuning); one process reproduces a study exactly from its seed.

Output: one record per data set, ``tuned/<dataset>.json`` in the repository
(``runtime.tuned_dir`` elsewhere), written atomically after every row: per row the
chosen values, trial/pruned/failed counts, wall time, values on an edge, the data
fingerprint, settings and space hashes it was tuned under, and the code version.
A run reads its data set's record (``tuned_source``), or borrows ml-100k's, and
names stale rows. Plots of each row's search (history, importances) go to the
study's folder and to MLflow under the tuning parent run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import subprocess
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np
import optuna
import torch
from filelock import FileLock
from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from prefect import task
from prefect.task_runners import ProcessPoolTaskRunner

from metarec.config import SECTION_TYPES, Config, hashed_dump
from metarec.features import NO_FEATURES, Features
from metarec.interface import Interactions
from metarec.maml import DivergedError
from metarec.models.registry import NONE_MEANS, ROWS, Choice, Float, Int, Range, on_edge, widen
from tasks.runtime.atomic import write_json
from tasks.runtime.tuned_records import BORROWED_FROM, RECORDS_DIR, record_in_use, record_path, records_dir
from tasks.runtime.locks import first_time_lock
from tasks.runtime.logs import log_info
from tasks.runtime.paths import dataset_slug, prepared_dir
from tasks.data.prepared import load_prepared, prepared_problems
from tasks.track.tracking import parent_run, run_tags, setup_mlflow
from tasks.train.validation import OBJECTIVE, evaluate_trial, validation_split

logger = logging.getLogger(__name__)
optuna.logging.set_verbosity(optuna.logging.WARNING)
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # constant_liar, the matplotlib plots

ROUNDS = 3  # the budget is spent in this many rounds; ranges are widened between them
TUNABLE = tuple(name for name, row in ROWS.items() if row.space)
PRUNER = {"kind": "hyperband", "min_resource": 1, "max_resource": "auto", "reduction_factor": 3}
FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)

# (row name, values, report) -> metrics with "objective"; report(passes, metrics, final=False) may raise optuna.TrialPruned
TrialFn = Callable[[str, dict, Callable[[int, dict], None]], dict]


# ------------------------------------------------------------------ values and spaces
def with_values(config: Config, name: str, values: dict) -> Config:
    """The config with ``values`` (section.field -> value) in ``tuned[name]`` and those fields reset to their class
    defaults, so the row's values take effect (``Config.for_row``); validated like any config."""
    tuned = {**config.tuned, name: {**config.tuned.get(name, {}), **values}}
    update: dict[str, dict] = {}
    for key in values:
        section, _, field = key.partition(".")
        if section not in SECTION_TYPES or field not in SECTION_TYPES[section].model_fields:
            raise ValueError(f"tuning value {key!r} for {name}: expected section.field with section in {list(SECTION_TYPES)}")
        update.setdefault(section, {})[field] = SECTION_TYPES[section].model_fields[field].default
    data = config.model_dump()
    for section, fields in update.items():
        data[section] = {**data[section], **fields}
    return Config.model_validate({**data, "tuned": tuned})


def current_values(config: Config, name: str) -> dict:
    """The values row ``name`` runs with today, for every key of its space."""
    row_config = config.for_row(name)
    read = lambda key: getattr(getattr(row_config, key.split(".")[0]), key.split(".")[1])  # noqa: E731
    # a None field stands for another (serving's α, L, k; the online rate): a range has no None, so read that one
    return {key: read(NONE_MEANS[key]) if read(key) is None and key in NONE_MEANS else read(key) for key in ROWS[name].space}


def suggest(trial: optuna.Trial, space: dict[str, Range]) -> dict:
    values = {}
    for key, dist in space.items():
        if isinstance(dist, Float):
            values[key] = trial.suggest_float(key, dist.low, dist.high, log=dist.log)
        elif isinstance(dist, Int):
            values[key] = trial.suggest_int(key, dist.low, dist.high, log=dist.log)
        else:
            values[key] = trial.suggest_categorical(key, list(dist.options))
    return values


def _clamp_into(values: dict, space: dict[str, Range]) -> dict:
    """Today's values as a first trial: a value outside its range is moved to the nearest bound (and reported); a field
    left at None (it inherits another, e.g. tasks.serve_k = tasks.k) is left to the sampler."""
    out = {}
    for key, value in values.items():
        dist = space[key]
        if value is None:
            continue
        if isinstance(dist, Choice):
            out[key] = value if value in dist.options else dist.options[0]
        else:
            out[key] = type(dist.low)(min(max(value, dist.low), dist.high))
    return out


def space_to_json(space: dict[str, Range]) -> dict:
    return {key: {"kind": type(dist).__name__, **asdict(dist)} for key, dist in space.items()}


def space_from_json(data: dict) -> dict[str, Range]:
    kinds = {"Float": Float, "Int": Int, "Choice": Choice}
    out: dict[str, Range] = {}
    for key, spec in data.items():
        spec = dict(spec)
        kind = kinds[spec.pop("kind")]
        out[key] = kind(tuple(spec["options"])) if kind is Choice else kind(spec["low"], spec["high"], spec["log"], tuple(spec["limits"]))
    return out


def edges(values: dict, space: dict[str, Range]) -> dict[str, str]:
    """key -> "low"/"high" for each chosen value on an edge of its range."""
    return {key: side for key, value in values.items() if key in space and (side := on_edge(value, space[key]))}


def widened(space: dict[str, Range], values: dict) -> tuple[dict[str, Range], list[str]]:
    """The space with every range whose value is on an edge stretched past it; and the keys stretched."""
    out, stretched = dict(space), []
    for key, side in edges(values, space).items():
        if (new := widen(space[key], side)) is not None:
            out[key] = new
            stretched.append(key)
    return out, stretched


# ------------------------------------------------------------------ what a study depends on
def _digest(payload: object, length: int = 12) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()[:length]


def data_fingerprint(history: Interactions, features: Features | None = None) -> str:
    """SHA-256 (16 hex) of the content the tuning sees: fold 0's history and the side features (not folder names)."""
    digest = hashlib.sha256()
    for column in (history.users, history.items, history.ts):
        digest.update(np.ascontiguousarray(column, dtype=np.int64).tobytes())
    for key, array in sorted((features or NO_FEATURES).to_arrays().items()):
        digest.update(key.encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()[:16]


# what the validation split reads besides the history's content (the data fingerprint): the same on every data set
VALIDATION_FIELDS = ("data.new_user_fraction", "data.n_negatives", "data.new_user_ns", "baselines.seed", "baselines.tune_holdout",
                     "eval.training_fraction")


def row_settings(name: str, config: Config) -> dict:
    """Every setting a row's trials read besides its searched values and the data: the sections it depends on
    (``Row.sections``), the validation split's settings and the training-pass fraction. Not the budget, and not which
    data set (its content is the data fingerprint), so a borrowed record's rows are compared on what they share."""
    row = ROWS[name]
    row_config = config.model_copy(update={"tuned": {}, "data": config.data.with_fold(0)}).for_row(name)
    out: dict[str, dict] = {}
    for section in sorted(set(row.sections) - {"data"}):
        dump = hashed_dump(section, getattr(row_config, section))
        out[section] = {k: v for k, v in dump.items() if f"{section}.{k}" not in row.space and f"{section}.{k}" != "baselines.tune_budget"}
    out["validation"] = {key: getattr(getattr(row_config, key.split(".")[0]), key.split(".")[1]) for key in VALIDATION_FIELDS}
    return json.loads(json.dumps(out, default=str))


def settings_hash(name: str, config: Config) -> str:
    return _digest(row_settings(name, config))


def space_hash(name: str) -> str:
    return _digest(space_to_json(ROWS[name].space))


def study_name(name: str, config: Config, fingerprint: str) -> str:
    key = {"settings": row_settings(name, config), "space": space_to_json(ROWS[name].space), "data": fingerprint,
           "objective": OBJECTIVE, "pruner": PRUNER}
    return f"{name}-{_digest(key)}"


def code_version() -> str | None:
    """The repository's git commit (+ "-dirty" with uncommitted changes), None outside a git checkout."""
    root = RECORDS_DIR.parent
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("-dirty" if dirty.strip() else "")


# ------------------------------------------------------------------ the search
def _pruner() -> optuna.pruners.BasePruner:
    return optuna.pruners.HyperbandPruner(min_resource=PRUNER["min_resource"], max_resource=PRUNER["max_resource"],
                                          reduction_factor=PRUNER["reduction_factor"])


def scored_pass(passes: int) -> bool:
    """The passes the pruner decides at (min_resource · reduction_factor^k in every Hyperband bracket): 1, 3, 9, 27, ..."""
    ratio = passes / PRUNER["min_resource"]
    k = round(math.log(ratio, PRUNER["reduction_factor"])) if ratio >= 1 else -1
    return k >= 0 and PRUNER["min_resource"] * PRUNER["reduction_factor"] ** k == passes


def open_study(name: str, config: Config, storage: str, fingerprint: str, worker: int = 0) -> optuna.Study:
    # each worker its own stream of draws (the same seed would propose the same values twice)
    seed = config.baselines.seed * 1000 + list(ROWS).index(name) + 100 * worker
    # TPE draws at random for its first trials: one round of them, then two rounds it guides
    startup = max(1, -(-config.baselines.tune_budget // ROUNDS))
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup, constant_liar=True)
    # the first create_study on a new file makes its schema: one process at a time (tasks/runtime/locks.py)
    with first_time_lock(Path(storage.removeprefix("sqlite:///")), "setting up the Optuna study store"):
        # two workers write to one sqlite file: wait for its lock rather than fail after sqlite's default 5 s
        rdb = optuna.storages.RDBStorage(storage, engine_kwargs={"connect_args": {"timeout": 120}})
        return optuna.create_study(study_name=study_name(name, config, fingerprint), storage=rdb, sampler=sampler,
                                   pruner=_pruner(), direction="maximize", load_if_exists=True)


def _counted(trial: optuna.trial.FrozenTrial) -> bool:
    """Trials the budget counts: all but those cut off by an interruption (they are run again)."""
    return not trial.user_attrs.get("interrupted", False)


def _finished(trials: list[optuna.trial.FrozenTrial]) -> list[optuna.trial.FrozenTrial]:
    return [t for t in trials if t.state in FINISHED and _counted(t)]


def _next_space(study: optuna.Study, name: str, budget: int) -> dict[str, Range]:
    """The space the next trial draws from: widened past edges once per finished round."""
    space = space_from_json(study.user_attrs["space"]) if "space" in study.user_attrs else dict(ROWS[name].space)
    rounds_done = len(_finished(study.get_trials(deepcopy=False))) // -(-budget // ROUNDS)
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if rounds_done > study.user_attrs.get("widened_round", 0) and complete:
        space, stretched = widened(space, study.best_params)
        study.set_user_attr("widened_round", rounds_done)
        study.set_user_attr("widened", [*study.user_attrs.get("widened", []), *stretched])
    study.set_user_attr("space", space_to_json(space))
    return space


def _ask(study: optuna.Study, name: str, budget: int, lock: FileLock) -> tuple[optuna.Trial, dict] | None:
    """The next trial and its values, or None when the budget is spent; one worker at a time decides."""
    with lock:
        trials = study.get_trials(deepcopy=False)
        if sum(1 for t in trials if _counted(t)) >= budget:
            return None
        space = _next_space(study, name, budget)
        trial = study.ask()
    return trial, suggest(trial, space)


def _done(study: optuna.Study) -> int:
    """Trials the budget has counted so far: the "k" of "trial k/budget" (a trial's number also counts the ones an
    interruption cut off, which would read "11/10")."""
    return len(_finished(study.get_trials(deepcopy=False)))


def run_trials(name: str, config: Config, storage: str, fingerprint: str, trial_fn: TrialFn, worker: int = 0) -> None:
    """One worker's share of a row's search: ask, run (reporting each scored pass), tell, until the budget is spent."""
    study = open_study(name, config, storage, fingerprint, worker)
    lock = FileLock(str(Path(storage.removeprefix("sqlite:///")).with_suffix(f".{name}.lock")))
    budget = config.baselines.tune_budget
    while (asked := _ask(study, name, budget, lock)) is not None:
        trial, values = asked
        started = time.perf_counter()

        def report(passes: int, metrics: dict, final: bool = False) -> None:
            trial.report(metrics["objective"], passes)
            if not final and trial.should_prune():
                raise optuna.TrialPruned(f"pruned after {passes} passes")

        try:
            metrics = trial_fn(name, values, report)
        except optuna.TrialPruned as pruned:
            trial.set_user_attr("seconds", time.perf_counter() - started)
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            log_info(logger, "tuning %s trial %d/%d: %s (%.0f s) %s", name, _done(study), budget, pruned, time.perf_counter() - started, values)
            continue
        except DivergedError as exc:  # a diverging setting is a bad trial, not a broken tuning
            trial.set_user_attr("error", str(exc))
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            log_info(logger, "tuning %s trial %d/%d: diverged (%s) %s", name, _done(study), budget, exc, values)
            continue
        for key, value in metrics.items():
            trial.set_user_attr(key, value)
        study.tell(trial, metrics["objective"])
        log_info(logger, "tuning %s trial %d/%d: objective %.4f (%.0f s) %s", name, _done(study), budget, metrics["objective"], metrics["seconds"], values)


def _mark_interrupted(study: optuna.Study) -> None:
    """Trials left running by a process that died: failed, flagged, not counted, so the budget runs them again."""
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study._storage.set_trial_user_attr(trial._trial_id, "interrupted", True)
        study._storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)


def tune_row(name: str, config: Config, trial_fn: TrialFn, storage: str, fingerprint: str = "", pool: "WorkerPool | None" = None) -> dict:
    """The whole search of one row (resuming its study), then its summary for the record.

    Must not run while another process tunes the same row: trials it left running are taken as interrupted."""
    started = time.perf_counter()
    study = open_study(name, config, storage, fingerprint)
    _mark_interrupted(study)
    if not study.trials:
        study.enqueue_trial(_clamp_into(current_values(config, name), dict(ROWS[name].space)))
    if pool is None:
        run_trials(name, config, storage, fingerprint, trial_fn)
    else:
        pool.run(name, config, storage, fingerprint)
    study.set_user_attr("wall_seconds", study.user_attrs.get("wall_seconds", 0.0) + time.perf_counter() - started)
    return summarise(study, name, config, fingerprint)


def summarise(study: optuna.Study, name: str, config: Config, fingerprint: str) -> dict:
    """A row's entry in the record: chosen values, counts, edges, and what it was tuned under."""
    trials = _finished(study.get_trials(deepcopy=False))
    states = [t.state for t in trials]
    space = space_from_json(study.user_attrs["space"]) if "space" in study.user_attrs else dict(ROWS[name].space)
    best = study.best_trial if optuna.trial.TrialState.COMPLETE in states else None
    chosen = {**current_values(config, name), **(best.params if best else {})}
    still = edges(best.params, space) if best else {}
    return {
        "label": ROWS[name].label,
        "chosen": chosen,
        "best_trial": best.number if best else None,
        "best_objective": best.value if best else None,
        "best_metrics": {k: v for k, v in (best.user_attrs if best else {}).items()},
        "budget": config.baselines.tune_budget,
        "code_version": code_version(),
        "n_trials": len(trials),
        "n_complete": states.count(optuna.trial.TrialState.COMPLETE),
        "n_pruned": states.count(optuna.trial.TrialState.PRUNED),
        "n_failed": states.count(optuna.trial.TrialState.FAIL),
        "trials": [_trial_record(t) for t in trials],
        "space": space_to_json(space),
        "widened": list(study.user_attrs.get("widened", [])),
        "on_edge": {key: {"side": side, "at_hard_limit": widen(space[key], side) is None} for key, side in still.items()},
        "seconds": study.user_attrs.get("wall_seconds", 0.0),
        "trial_seconds": sum(t.user_attrs.get("seconds", 0.0) for t in trials),
        "study": study.study_name,
        "data_fingerprint": fingerprint,
        "settings_hash": settings_hash(name, config),
        "space_hash": space_hash(name),
    }


def _trial_record(trial: optuna.trial.FrozenTrial) -> dict:
    return {"number": trial.number, "state": trial.state.name.lower(), "values": trial.params, "objective": trial.value,
            "intermediate": {str(k): v for k, v in sorted(trial.intermediate_values.items())},
            "metrics": {k: v for k, v in trial.user_attrs.items() if k != "interrupted"}}


# ------------------------------------------------------------------ worker processes
_WORKER_SPLIT: dict | None = None


def _start_worker(split: dict) -> None:
    global _WORKER_SPLIT
    _WORKER_SPLIT = split
    torch.set_num_threads(1)  # two trials on two cores: one thread each
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    # outside a Prefect task run (the lines of a run go to its log): the trial lines go to the inherited stderr
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s | INFO    | tuning worker %(process)d - %(message)s", datefmt="%H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


@task(task_run_name="tune {name} · worker {worker}")
def tuning_worker(name: str, config: Config, storage: str, fingerprint: str, worker: int) -> None:
    """One worker's share of a row's trials, as a Prefect task run in a worker process of the tuning's runner (its
    trial lines go to that task run's log)."""
    _worker_trials(name, config, storage, fingerprint, worker)


def _worker_trials(name: str, config: Config, storage: str, fingerprint: str, worker: int) -> None:
    # a module function, not the task's body: the task is pickled by value with a copy of the globals it names, and
    # the split lives in this module's global, set by the worker's initializer
    run_trials(name, config, storage, fingerprint, validation_trials(config, _WORKER_SPLIT), worker)


class WorkerPool:
    """``workers`` processes (spawned: no forked torch state), each holding the validation split, for every row: a
    Prefect process-pool task runner, so each worker's trials are a task run of the tuning flow. Threads would share
    one interpreter's lock, and a trial's small torch operations spend much of their time in Python."""

    def __init__(self, split: dict, workers: int) -> None:
        self.workers = workers
        self.runner = ProcessPoolTaskRunner(max_workers=workers, initializer=_start_worker, initargs=(split,))
        self.runner.__enter__()

    def run(self, name: str, config: Config, storage: str, fingerprint: str) -> None:
        futures = [self.runner.submit(tuning_worker, {"name": name, "config": config, "storage": storage, "fingerprint": fingerprint, "worker": worker})
                   for worker in range(self.workers)]
        for future in futures:
            future.result()

    def close(self) -> None:
        self.runner.__exit__(None, None, None)


def validation_trials(config: Config, split: dict) -> TrialFn:
    """Real trials: fit the row with the values on the split, score after the pruner's passes (``scored_pass``)."""
    return lambda name, values, report: evaluate_trial(name, with_values(config, name, values), split, report, scored_pass)


# ------------------------------------------------------------------ records
def tuning_dir(config: Config) -> Path:
    """The data set's Optuna store and plots: ``<artifacts>/tuning/<dataset>/`` (outside any code-hashed folder, so a
    study survives code changes that do not touch what it depends on)."""
    return Path(config.runtime.artifacts_dir) / "tuning" / dataset_slug(config.data.dataset)


def load_record(config: Config, dataset: str | None = None) -> dict | None:
    path = record_path(config, dataset)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"tuning record {path} is not valid JSON ({exc}); restore it from git or re-run `metarec tune`") from exc


def _fold0(config: Config) -> Config:
    return config.model_copy(update={"data": config.data.with_fold(0)})


def tune(config: Config, models: tuple[str, ...], history: Interactions | None = None, features: Features | None = None,
         workers: int | None = None, trial_fn: TrialFn | None = None) -> Path:
    """Tune each row on fold 0's history (default: the prepared one); merge the results into the data set's record.

    ``workers`` processes run each row's trials (default ``runtime.max_workers``); ``trial_fn`` replaces the real
    trials (tests; in-process only)."""
    unknown = [m for m in models if m not in ROWS]
    if unknown:
        raise ValueError(f"cannot tune {unknown}: known rows are {list(ROWS)}")
    workers = 1 if trial_fn is not None else (workers or config.runtime.max_workers)
    if history is None:
        prepared = load_prepared(prepared_dir(_fold0(config)))
        history, features = prepared.history, prepared.features
    split = validation_split(history, config, features)
    fingerprint = data_fingerprint(history, features)
    folder = tuning_dir(config)
    folder.mkdir(parents=True, exist_ok=True)
    storage = f"sqlite:///{folder / 'optuna.db'}"
    out = record_path(config)
    record = _fresh_record(load_record(config), config, split, fingerprint, workers)
    torch.set_num_threads(config.runtime.torch_threads)
    trial_fn = trial_fn or validation_trials(config, split)
    pool = WorkerPool(split, workers) if workers > 1 and any(ROWS[m].space for m in models) else None
    setup_mlflow(config)
    try:
        with parent_run(config, f"tuning {config.data.dataset}", "tuning") as tuning_run:
            for name in models:
                if not ROWS[name].space:  # nothing to search: scored once, for reference
                    record["models"][name] = _scored_once(name, config, split, fingerprint)
                else:
                    record["models"][name] = entry = tune_row(name, config, trial_fn, storage, fingerprint, pool)
                    report_row(open_study(name, config, storage, fingerprint), name, config, folder, tuning_run)
                    log_info(logger, "tuned %s: %d trials (%d pruned, %d failed), best objective %s, %.0f s wall; on an edge: %s",
                             name, entry["n_trials"], entry["n_pruned"], entry["n_failed"], entry["best_objective"], entry["seconds"],
                             entry["on_edge"] or "none")
                write_json(record, out)  # after every row: a later failure keeps the rows already tuned
    finally:
        if pool is not None:
            pool.close()
    return out


def _fresh_record(old: dict | None, config: Config, split: dict, fingerprint: str, workers: int) -> dict:
    """The record's header for this tuning; rows of an earlier one are kept unless it was the legacy record."""
    models = {} if old is None or old.get("legacy") else dict(old.get("models", {}))
    return {
        "dataset": config.data.dataset, "legacy": False,
        "objective": OBJECTIVE, "pruner": PRUNER, "rounds": ROUNDS,
        "budget": config.baselines.tune_budget, "holdout": config.baselines.tune_holdout, "seed": config.baselines.seed,
        "workers": workers, "threads_per_worker": 1 if workers > 1 else config.runtime.torch_threads,
        "data_fingerprint": fingerprint, "code_version": code_version(),
        "train_interactions": len(split["train"]), "pseudo_new_users": split["pseudo_new_users"],
        "new_user_cases": {str(n): int(len(c[0].users)) for n, c in split["new"].items()},
        "tail_cases": int(sum(len(u) for _, u, _ in split["tail"])),
        "models": models,
    }


def _scored_once(name: str, config: Config, split: dict, fingerprint: str) -> dict:
    metrics = evaluate_trial(name, config, split)
    return {"label": ROWS[name].label, "chosen": {}, "n_trials": 0, "n_complete": 0, "n_pruned": 0, "n_failed": 0, "trials": [],
            "best_objective": metrics["objective"], "best_metrics": metrics, "seconds": metrics["seconds"], "space": {}, "widened": [],
            "on_edge": {}, "data_fingerprint": fingerprint, "settings_hash": settings_hash(name, config), "space_hash": space_hash(name)}


# ------------------------------------------------------------------ report: plots and MLflow
def report_row(study: optuna.Study, name: str, config: Config, folder: Path, parent_id: str) -> list[Path]:
    """The row's optimisation history and parameter importances as PNGs beside the study, and every trial as an MLflow
    child run of the tuning run (values as params, final metrics, objective per scored pass); returns the PNGs."""
    plots = save_plots(study, name, folder)
    client = MlflowClient()
    for path in plots:
        client.log_artifact(parent_id, str(path), artifact_path=f"tuning/{name}")
    experiment_id = client.get_run(parent_id).info.experiment_id
    now = int(time.time() * 1000)
    for trial in _finished(study.get_trials(deepcopy=False)):
        child = client.create_run(experiment_id, run_name=f"trial {name} {trial.number}",
                                  tags={**run_tags(config, kind="trial", model=name), "mlflow.parentRunId": parent_id, "state": trial.state.name.lower()})
        metrics = [Metric(k.replace("@", "_at_"), float(v), now, 0) for k, v in trial.user_attrs.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
        metrics += [Metric("objective_at_pass", float(v), now, int(step)) for step, v in trial.intermediate_values.items()]
        client.log_batch(child.info.run_id, metrics=metrics, params=[Param(k, str(v)) for k, v in trial.params.items()])
        client.set_terminated(child.info.run_id, status="FINISHED" if trial.state != optuna.trial.TrialState.FAIL else "FAILED")
    return plots


def save_plots(study: optuna.Study, name: str, folder: Path) -> list[Path]:
    """Optuna's matplotlib optimisation history and (with two complete trials or more) fANOVA parameter importances."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as optuna_plots

    out = []
    plots = {"history": lambda: optuna_plots.plot_optimization_history(study)}
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    # importances need values that differ: fANOVA has nothing to split otherwise
    if len({json.dumps(t.params, sort_keys=True) for t in complete}) >= 2 and len({t.value for t in complete}) >= 2:
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
        plots["importances"] = lambda: optuna_plots.plot_param_importances(study, evaluator=evaluator)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        for kind, draw in plots.items():
            try:
                axes = draw()
            except (RuntimeError, ValueError) as exc:  # e.g. zero variance in every fANOVA tree
                log_info(logger, "tuning %s: no %s plot (%s)", name, kind, exc)
                continue
            title = axes.get_title(loc="left") or axes.get_title()  # Optuna titles on the left
            axes.set_title("")
            axes.set_title(f"{ROWS[name].label}: {title}", loc="left")
            path = folder / f"{name}-{kind}.png"
            axes.figure.savefig(path, dpi=80, bbox_inches="tight")
            plt.close(axes.figure)
            out.append(path)
    return out


# ------------------------------------------------------------------ using a record
def apply_tuned(config: Config, path: Path | None = None) -> Config:
    """The config with a tuning record's chosen values as ``Config.tuned`` (row by row; rows it lacks keep theirs).

    Unlike ``with_values`` nothing is reset: a field set explicitly (``--set baselines.lr=0.03``) still wins."""
    source = Path(path) if path else record_path(config)
    record = json.loads(source.read_text())
    tuned = {**config.tuned, **{name: result["chosen"] for name, result in record["models"].items()
                                if name in ROWS and result.get("chosen")}}
    return Config.model_validate({**config.model_dump(), "tuned": tuned})


def stale_rows(record: dict, config: Config, fingerprint: str | None, borrowed: bool = False) -> dict[str, str]:
    """Row -> why its values no longer match (legacy, another data content, changed search space or settings).

    A borrowed record was tuned on other data by definition: only its spaces and settings are checked."""
    out = {}
    for name, entry in record.get("models", {}).items():
        if name not in ROWS:
            out[name] = "no such row any more"
        elif entry.get("legacy") or record.get("legacy"):
            out[name] = "legacy values (the former TUNED_ML100K, an old 8-draw search for earlier variants)"
        elif entry.get("space_hash") != space_hash(name):
            out[name] = f"search space changed (tuned over {entry.get('space_hash')}, now {space_hash(name)})"
        elif entry.get("settings_hash") != settings_hash(name, config):
            out[name] = f"settings the row reads changed (tuned under {entry.get('settings_hash')}, now {settings_hash(name, config)})"
        elif not borrowed and fingerprint is not None and entry.get("data_fingerprint") != fingerprint:
            out[name] = f"tuned on other data (fingerprint {entry.get('data_fingerprint')}, now {fingerprint})"
    return out


def current_fingerprint(config: Config) -> str | None:
    """The data fingerprint of fold 0's prepared history, None when it is not prepared (then not checked)."""
    folder = prepared_dir(_fold0(config))
    if prepared_problems(folder):
        return None
    prepared = load_prepared(folder)
    return data_fingerprint(prepared.history, prepared.features)


def tuned_source(config: Config, fingerprint: str | None = None) -> tuple[Config, str]:
    """The config with the record's values, and a note for the log and summary.md: which record, which rows are stale
    (their values are still used), which rows have none."""
    path, borrowed = record_in_use(config)
    if path is None:
        return config, f"no tuning record for {config.data.dataset} (nor {BORROWED_FROM}'s) in {records_dir(config)}: every row runs its class defaults"
    record = json.loads(path.read_text())
    tuned = apply_tuned(config, path)
    head = (f"tuned values: borrowed from {record.get('dataset', BORROWED_FROM)}'s record {path} (no record for {config.data.dataset}; "
            f"`metarec tune --dataset {config.data.dataset}` makes one)" if borrowed else f"tuned values: {path}")
    head += f" (code {record.get('code_version') or 'unknown'}, budget {record.get('budget')}, data fingerprint {record.get('data_fingerprint')})"
    notes = [head]
    if fingerprint is None and not borrowed:
        notes.append("the data fingerprint was not checked (fold 0 not prepared)")
    stale = {name: why for name, why in stale_rows(record, config, fingerprint, borrowed).items() if name in config.eval.models}
    if stale:
        by_reason: dict[str, list[str]] = {}
        for name, why in stale.items():
            by_reason.setdefault(why, []).append(name)
        notes.append("stale rows, whose values are still used: " + "; ".join(f"{', '.join(names)}: {why}" for why, names in by_reason.items()))
        for name, why in stale.items():
            logger.warning("tuning record %s: row %s is stale (%s); its values are still used", path, name, why)
    budgets = {entry.get("n_trials") for name, entry in record.get("models", {}).items() if name in config.eval.models and name in TUNABLE}
    if len(budgets) > 1:
        notes.append(f"rows were tuned with unequal trial counts {sorted(budgets, key=str)}")
    untuned = [m for m in config.eval.models if m in TUNABLE and m not in record.get("models", {})]
    if untuned:
        notes.append(f"rows without tuned values (class defaults): {', '.join(untuned)}")
    return tuned, "; ".join(notes)
