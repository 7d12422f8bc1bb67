"""Serve a registered Θ: load a version (the champion by default), adapt to a user, recommend.

A registered version is an MLflow pyfunc model whose artifacts hold Θ as
safetensors plus a JSON description (``tasks.track.model_registry``), so loading
never unpickles anything. The
version's tags name the data set and data hash it was trained on; the model's
memory of who interacted with what (recent items, neighbours) is rebuilt from
that prepared data (history and stream).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pyarrow.parquet as pq
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from metarec.config import Config, MetaConfig, TaskConfig
from metarec.interface import Interactions, RecentItems
from metarec.protocol import Cases, evaluate_new_users
from metarec.models.responsive import ResponsiveMF
from tasks.track.champion import CHAMPION, SCORE_N, CaseScores, current_champion, registered_model_name
from tasks.evaluate.evaluation import load_cases
from tasks.runtime.integrity import CorruptFileError
from tasks.runtime.paths import dataset_slug, prepared_dir
from tasks.data.prepared import PreparedData, load_prepared
from tasks.track.tracking import setup_mlflow
from tasks.track.model_registry import load_theta


class ServingError(LookupError):
    """Nothing to serve, or a user/item the request names does not exist."""


@dataclass
class Served:
    model: ResponsiveMF
    version: str
    name: str  # the registered model: responsive-mf-<data set>
    prepared: PreparedData
    raw_users: np.ndarray  # dense id -> raw id (as text)
    raw_items: np.ndarray
    titles: np.ndarray


def version_to_serve(client: MlflowClient, name: str, version: str | None = None):
    """Version ``version`` of registered model ``name``, or its champion."""
    if version is not None:
        return _registered_version(client, name, str(version).strip())
    champion = current_champion(client, name)
    if champion is None:
        raise ServingError(f"no '{CHAMPION}' version of model '{name}' in the registry yet: run `metarec run` (a full run; a "
                           "--quick run's version is never promoted, serve it with --version N) or the nightly deployment first")
    return champion


def _registered_version(client: MlflowClient, name: str, version: str):
    if not version.isdigit() or int(version) < 1:
        raise ServingError(f"--version {version!r}: expected a version number of '{name}' (1, 2, ...)")
    try:
        return client.get_model_version(name, version)
    except MlflowException:
        try:
            known = sorted(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
        except MlflowException:
            known = []
        listed = ", ".join(map(str, known)) if known else "none yet"
        raise ServingError(f"'{name}' has no version {version}; registered versions: {listed}") from None


def load_theta_model(version) -> ResponsiveMF:
    """ResponsiveMF with the version's Θ (safetensors) and the meta/task settings it was trained with.

    A damaged artifact raises CorruptFileError naming the version and the file.
    """
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=version.source))
    try:
        P, Q, described = load_theta(local)
    except CorruptFileError as exc:
        raise CorruptFileError(exc.path, f"registered version {version.version} of '{version.name}' ({version.source}): "
                               f"{str(exc).removeprefix(f'{exc.path}: ')}", "serve another version with --version N") from None
    model = ResponsiveMF(MetaConfig(**described["meta"]), TaskConfig(**described["tasks"]))
    model.load_training_state({"P": P, "Q": Q, **described.get("masks", {}), **described.get("extras", {})})
    return model


def prepared_for(version, config: Config) -> PreparedData:
    """The prepared data the version was trained on (by its tags)."""
    dataset, data_hash = version.tags.get("dataset"), version.tags.get("data_hash")
    root = Path(config.runtime.artifacts_dir) / dataset_slug(dataset or config.data.dataset) / (data_hash or prepared_dir(config).name)
    return load_prepared(root)


def load_served(config: Config, version: str | None = None, dataset: str | None = None) -> Served:
    """The version (or champion) ready to recommend; ``dataset``: serve that data set's champion, refuse another's."""
    setup_mlflow(config)
    chosen = version_to_serve(MlflowClient(), registered_model_name(dataset or config.data.dataset), version)
    model = load_theta_model(chosen)
    prepared = prepared_for(chosen, config)
    seen = Interactions.from_arrays(
        np.concatenate([prepared.history.users, prepared.stream.users]),
        np.concatenate([prepared.history.items, prepared.stream.items]),
        np.concatenate([prepared.history.ts, prepared.stream.ts]),
    )
    model.set_index(seen)
    users = pq.read_table(prepared.root / "users.parquet")
    items = pq.read_table(prepared.root / "items.parquet")
    return Served(
        model=model,
        version=chosen.version,
        name=chosen.name,
        prepared=prepared,
        raw_users=np.asarray(users.column("raw_user").to_pylist(), dtype=object),
        raw_items=np.asarray(items.column("raw_item").to_pylist(), dtype=object),
        titles=np.asarray(items.column("title").to_pylist(), dtype=object),
    )


def _dense_ids(raw: list[str], table: np.ndarray, what: str) -> np.ndarray:
    lookup = {str(value): i for i, value in enumerate(table.tolist())}
    missing = [value for value in raw if str(value) not in lookup]
    if missing:
        raise ServingError(f"unknown {what} id(s) {missing[:5]}: not in this data set's {what}s ({len(lookup)} known)")
    return np.array([lookup[str(value)] for value in raw], dtype=np.int64)


def recommend(served: Served, raw_user: str, raw_recent: list[str] | None, n: int = 10) -> list[dict]:
    """Top n for a user: adapted to ``raw_recent`` when given, else to its stored most recent interactions.

    An unknown user needs ``raw_recent`` and is served as a new user (§6 from a mean row).
    """
    if n < 1:
        raise ServingError(f"-n must be >= 1, got {n}")
    known = {str(v): i for i, v in enumerate(served.raw_users.tolist())}
    recent = _dense_ids(raw_recent, served.raw_items, "item") if raw_recent else None
    model = served.model
    if str(raw_user) in known and recent is None:
        user = known[str(raw_user)]
        if user >= model.index_.n_users or model.index_.user_ptr_[user + 1] == model.index_.user_ptr_[user]:
            raise ServingError(f"user {raw_user} has no stored interactions; pass --recent ITEM,ITEM,...")
        top = model.recommend(user, n=n)
    elif recent is None:
        raise ServingError(f"user {raw_user} is unknown and no --recent items were given: a new user needs at least one interaction")
    elif str(raw_user) in known:
        top = model.recommend(known[str(raw_user)], n=n, recent=recent)
    else:
        items_all = np.arange(len(served.raw_items), dtype=np.int64)[None, :]
        pseudo_user = np.array([len(served.raw_users)], dtype=np.int64)  # beyond every known id: a new user
        ts = np.full((1, len(recent)), np.iinfo(np.int64).max // 2, dtype=np.int64)
        scores = model.score_new_users(RecentItems(pseudo_user, recent[None, :], ts), items_all)[0].astype(np.float64)
        scores[recent] = -np.inf
        top = np.argsort(-scores, kind="stable")[:n]
    return [{"rank": r + 1, "item": str(served.raw_items[i]), "title": served.titles[i] or "", "item_id": int(i)} for r, i in enumerate(top)]


def rescore_version(version, config: Config, candidate: CaseScores) -> CaseScores:
    """A registered version's per-case new-user NDCG@10 at n = 5 on the candidate's cases (the current prepared data
    of ``config``, the candidate's users): the champion comparison when the champion was scored on other data."""
    setup_mlflow(config)
    torch.set_num_threads(config.runtime.torch_threads)
    model = load_theta_model(version)
    prepared = load_prepared(prepared_dir(config))
    model.set_index(prepared.history)
    cases: Cases = load_cases(prepared, "new")
    cases = cases.take((cases.n == SCORE_N) & np.isin(cases.users, candidate.users))
    results = evaluate_new_users(model, prepared.new_users, prepared.new_users_pos, cases, prepared.n_items, full_ranking=False)
    return CaseScores(np.asarray(results[SCORE_N].users), np.asarray(results[SCORE_N].metrics["ndcg"], dtype=np.float64), prepared_dir(config).name)
