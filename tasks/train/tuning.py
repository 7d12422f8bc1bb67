"""Tuning with Optuna: the same seeded TPE search and the same budget for every row, on the history only.

Each row (``metarec.models.registry.ROWS``) declares its search space as data;
nobody's space is redesigned after looking at its scores. For each row:

- an Optuna study (TPE sampler seeded by ``baselines.seed`` and the row's
  position in ROWS) is stored in ``<prepared>/tuning/optuna.db`` (sqlite), so an
  interrupted tuning resumes where it stopped; its first trial is the row's
  current values, so a search never reports worse than where it started;
- ``baselines.tune_budget`` trials in three equal rounds; after each of the
  first two, every range whose best value so far sits on an edge is widened
  (``registry.widen``) up to its hard limits, so the search can go past a bound
  that was set too tight; the report flags any value still on an edge;
- each trial fits the row on the validation split of ``tasks/train/validation.py``
  and scores it (objective: mean of new-user and held-out-tail NDCG@10);
  trials are Prefect tasks when a runner is given (threads or Dask), fed in
  batches of ``runtime.max_workers`` through Optuna's ask/tell interface, and
  every trial is logged to MLflow under one tuning parent run.

Output: ``tuning_path(config)`` (JSON, written atomically) holds, per row, the
chosen values (ready for ``Config.tuned``), the widened spaces, every trial,
the flags, the trial count and the wall time. Rows tuned later are merged into
the same record, so one record holds a data set's tuned values.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import optuna
import torch
from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from prefect import task
from prefect.cache_policies import NO_CACHE

from metarec.config import SECTION_TYPES, Config
from metarec.interface import Interactions
from metarec.models.registry import ROWS, Choice, Float, Int, Range, on_edge, widen
from tasks.runtime.atomic import write_json
from tasks.runtime.locks import first_time_lock
from tasks.runtime.logs import log_info
from tasks.runtime.paths import prepared_dir
from tasks.data.prepared import load_prepared
from tasks.track.tracking import parent_run, run_tags, setup_mlflow
from tasks.train.validation import evaluate_trial, validation_split

logger = logging.getLogger(__name__)
optuna.logging.set_verbosity(optuna.logging.WARNING)

ROUNDS = 3  # the budget is spent in this many rounds; ranges are widened between them
TUNABLE = tuple(name for name, row in ROWS.items() if row.space)

# (row name, values) -> trial metrics; runs a batch of trials (in parallel when a task runner is behind it)
RunTrials = Callable[[list[tuple[str, dict]]], list[dict]]
# (config, validation split) -> RunTrials
TrialRunner = Callable[[Config, dict], RunTrials]


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
    return {key: getattr(getattr(row_config, key.split(".")[0]), key.split(".")[1]) for key in ROWS[name].space}


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
    """Today's values as a first trial: a value outside its range is moved to the nearest bound (and reported)."""
    out = {}
    for key, value in values.items():
        dist = space[key]
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


# ------------------------------------------------------------------ the search
def _study(name: str, config: Config, storage: str) -> optuna.Study:
    seed = config.baselines.seed * 1000 + list(ROWS).index(name)
    base = config.model_copy(update={"tuned": {}}).hash_of("data", "tasks", "meta", "baselines")
    study_name = f"{name}-{base}-b{config.baselines.tune_budget}-s{config.baselines.seed}"
    # TPE draws at random for its first trials: one round of them, then two rounds it guides
    startup = max(1, -(-config.baselines.tune_budget // ROUNDS))
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup)
    # the first create_study on a new file makes its schema: one process at a time (tasks/runtime/locks.py)
    with first_time_lock(Path(storage.removeprefix("sqlite:///")), "setting up the Optuna study store"):
        return optuna.create_study(study_name=study_name, storage=storage, sampler=sampler, direction="maximize", load_if_exists=True)


def _fail_abandoned(study: optuna.Study) -> None:
    """Trials left RUNNING by a killed tuning are FAIL: never told, they would stay RUNNING in the study for ever.

    One tuning of a study runs at a time (the CLI's), so a RUNNING trial at the start of one is abandoned."""
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study._storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
        logger.warning("tuning: trial %d was left unfinished by a killed run; marked failed", trial.number + 1)


def tune_row(name: str, config: Config, run_trials: RunTrials, storage: str, batch: int = 1) -> dict:
    """The whole search of one row; resumes a study of the same row, base config, budget and seed."""
    started = time.perf_counter()
    study = _study(name, config, storage)
    budget = config.baselines.tune_budget
    space = space_from_json(study.user_attrs["space"]) if "space" in study.user_attrs else dict(ROWS[name].space)
    stretched_all: list[str] = list(study.user_attrs.get("widened", []))
    if not study.trials:
        study.enqueue_trial(_clamp_into(current_values(config, name), space))
    _fail_abandoned(study)
    per_round = -(-budget // ROUNDS)
    while (done := len([t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE])) < budget:
        if done and done % per_round == 0 and study.user_attrs.get("widened_at") != done:
            space, stretched = widened(space, study.best_params)
            stretched_all += stretched
            study.set_user_attr("widened_at", done)
            study.set_user_attr("widened", stretched_all)
        study.set_user_attr("space", space_to_json(space))
        trials = [study.ask() for _ in range(min(batch, budget - done, per_round - done % per_round))]
        values = [suggest(trial, space) for trial in trials]
        for trial, vals, metrics in zip(trials, values, run_trials([(name, v) for v in values])):
            for key, value in metrics.items():
                trial.set_user_attr(key, value)
            study.tell(trial, metrics["objective"])
            # counted by completed trials: a trial's number also counts those a killed run left unfinished ("11/10")
            done += 1
            log_info(logger, "tuning %s trial %d/%d: objective %.4f (%.0f s) %s", name, done, budget, metrics["objective"], metrics["seconds"], vals)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    best = study.best_trial
    chosen = {**current_values(config, name), **best.params}
    still = edges(best.params, space)
    return {
        "chosen": chosen,
        "best_trial": best.number,
        "best_objective": best.value,
        "trials": [{"number": t.number, "values": t.params, "metrics": t.user_attrs} for t in complete],
        "n_trials": len(complete),
        "space": space_to_json(space),
        "widened": stretched_all,
        "on_edge": {key: {"side": side, "at_hard_limit": widen(space[key], side) is None} for key, side in still.items()},
        "seconds": time.perf_counter() - started,
        "study": study.study_name,
    }


# ------------------------------------------------------------------ I/O
def tuning_dir(config: Config) -> Path:
    """Fold 0's prepared folder holds the tuning: the validation split is cut from its history."""
    return prepared_dir(config.model_copy(update={"data": config.data.with_fold(0)})) / "tuning"


def tuning_path(config: Config) -> Path:
    """The data set's record of tuned values, for this base configuration (its searched fields excluded)."""
    base = config.model_copy(update={"tuned": {}}).hash_of("data", "tasks", "meta", "baselines")
    return tuning_dir(config) / f"tuned-{base}.json"


def load_record(config: Config) -> dict | None:
    path = tuning_path(config)
    return json.loads(path.read_text()) if path.is_file() else None


def sequential_trials(config: Config, split: dict) -> RunTrials:
    return lambda batch: [evaluate_trial(name, with_values(config, name, values), split) for name, values in batch]


def tune(config: Config, models: tuple[str, ...], history: Interactions | None = None, runner: TrialRunner | None = None, batch: int = 1) -> Path:
    """Tune each row on fold 0's history (default: the prepared one); merge the results into the data set's record."""
    unknown = [m for m in models if m not in ROWS]
    if unknown:
        raise ValueError(f"cannot tune {unknown}: known rows are {list(ROWS)}")
    torch.set_num_threads(1 if batch > 1 else config.runtime.torch_threads)
    fold0 = config.model_copy(update={"data": config.data.with_fold(0)})
    prepared = load_prepared(prepared_dir(fold0)) if history is None else None
    history = history if history is not None else prepared.history
    split = validation_split(history, config, prepared.features if prepared is not None else None)
    out = tuning_path(config)
    out.parent.mkdir(parents=True, exist_ok=True)
    storage = f"sqlite:///{out.parent / 'optuna.db'}"
    record = load_record(config) or {"protocol": "tasks/train/tuning.py and tasks/train/validation.py", "models": {}}
    record.update({
        "budget": config.baselines.tune_budget, "holdout": config.baselines.tune_holdout, "seed": config.baselines.seed,
        "dataset": config.data.dataset, "train_interactions": len(split["train"]), "pseudo_new_users": split["pseudo_new_users"],
        "new_user_cases": {str(n): int(len(c[0].users)) for n, c in split["new"].items()},
        "tail_cases": int(sum(len(u) for _, u, _ in split["tail"])),
    })
    run_trials = (runner or sequential_trials)(config, split)
    setup_mlflow(config)
    with parent_run(config, f"tuning {config.data.dataset}", "tuning") as tuning_run:
        for name in models:
            if not ROWS[name].space:
                record["models"][name] = {"chosen": {}, "n_trials": 0, "trials": [], "seconds": 0.0, "space": {}, "widened": [], "on_edge": {}}
                continue
            result = tune_row(name, config, _logged(run_trials, config, tuning_run), storage, batch)
            record["models"][name] = result
            write_json(record, out)  # after every row: a later failure keeps the rows already tuned
    write_json(record, out)
    return out


def _logged(run_trials: RunTrials, config: Config, parent_id: str) -> RunTrials:
    """Every trial becomes an MLflow child run of the tuning run (params = its values, metrics = its scores)."""
    client = MlflowClient()
    experiment_id = client.get_run(parent_id).info.experiment_id

    def run(batch: list[tuple[str, dict]]) -> list[dict]:
        results = run_trials(batch)
        now = int(time.time() * 1000)
        for (name, values), metrics in zip(batch, results):
            child = client.create_run(experiment_id, run_name=f"trial {name}", tags={**run_tags(config, kind="trial", model=name), "mlflow.parentRunId": parent_id})
            client.log_batch(child.info.run_id, metrics=[Metric(k.replace("@", "_at_"), float(v), now, 0) for k, v in metrics.items()],
                             params=[Param(k, str(v)) for k, v in values.items()])
            client.set_terminated(child.info.run_id)
        return results

    return run


def apply_tuned(config: Config, path: Path | None = None) -> Config:
    """The config with a tuning record's chosen values as ``Config.tuned`` (row by row; rows it lacks keep theirs).

    Unlike ``with_values`` nothing is reset: a field set explicitly (``--set baselines.lr=0.03``) still wins."""
    record = json.loads(Path(path or tuning_path(config)).read_text())
    tuned = {**config.tuned, **{name: result["chosen"] for name, result in record["models"].items() if result["chosen"]}}
    return Config.model_validate({**config.model_dump(), "tuned": tuned})


def tuned_source(config: Config) -> tuple[Config, str]:
    """The config with this data set's tuned values when a record exists, and a sentence saying where they came from."""
    path = tuning_path(config)
    if path.is_file():
        return apply_tuned(config, path), f"tuned values: chosen on {config.data.dataset} by `metarec tune` ({path})"
    return config, (f"no tuned values for {config.data.dataset}: every row uses the values tuned on ml-100k (metarec/config.py "
                    "TUNED_ML100K); `metarec run --tune` tunes them on this data set first")


@task(name="tune-trial", cache_policy=NO_CACHE)
def tune_trial_task(name: str, config: Config, split: dict, values: dict) -> dict:
    return evaluate_trial(name, with_values(config, name, values), split)


def prefect_trials(config: Config, split: dict) -> RunTrials:
    """Trials as Prefect tasks on the calling flow's task runner (threads, or Dask when configured)."""

    def run(batch: list[tuple[str, dict]]) -> list[dict]:
        futures = [tune_trial_task.with_options(task_run_name=f"trial-{name}").submit(name, config, split, values) for name, values in batch]
        return [future.result() for future in futures]

    return run
