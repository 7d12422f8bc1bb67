"""The champion per data set: which registered version is served, and the guarded rule that moves it.

One registered model per data set, ``responsive-mf-<data set>`` (``registered_model_name``), each with its own
``champion`` alias (``champion_uri``): a run on one data set never competes with a model trained on another.

Who may take the alias (``promote_if_better``):

- only a full-preset run: a quick run's version is registered (tagged ``preset=quick``, servable with
  ``--version``) but never promoted;
- the first full version of a data set becomes its champion;
- a later one must beat the champion by the paired 95% bootstrap CI of the per-case differences in new-user
  NDCG@10 at n = 5, on the same evaluation cases: the champion's stored cases when it was scored on the same data
  version, else the champion re-scored on the candidate's cases. A tie (a CI that holds 0) keeps the champion.

Each version's own cases are logged on its training run (``CASES_ARTIFACT``), so a later candidate pairs with them.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import mlflow
import numpy as np
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from metarec.metrics import bootstrap_ci
from tasks.runtime.paths import dataset_slug

logger = logging.getLogger(__name__)

MODEL_PREFIX = "responsive-mf"
CHAMPION = "champion"
SCORE_TAG = "new_n5_ndcg10"
DATA_TAG = "eval_data_hash"
CASES_ARTIFACT = "champion/new_n5_cases.json"  # on the version's training run: the per-case scores it was judged on
SCORE_N = 5


def registered_model_name(dataset: str) -> str:
    """``responsive-mf-<data set>``: one registered model (versions and champion) per data set."""
    return f"{MODEL_PREFIX}-{dataset_slug(str(dataset))}"


def champion_uri(dataset: str) -> str:
    """The MLflow model URI of a data set's champion, ``models:/responsive-mf-<data set>@champion``."""
    return f"models:/{registered_model_name(dataset)}@{CHAMPION}"


@dataclass(frozen=True)
class CaseScores:
    """Per-case new-user NDCG@10 at n = 5 of one model on one data version's cases, keyed by user."""

    users: np.ndarray
    ndcg: np.ndarray
    data_hash: str

    @property
    def score(self) -> float:
        return float(np.mean(self.ndcg)) if len(self.ndcg) else float("nan")

    def to_json(self) -> dict:
        return {"data_hash": self.data_hash, "n": SCORE_N, "users": self.users.astype(int).tolist(), "ndcg": self.ndcg.astype(float).tolist()}

    @classmethod
    def from_json(cls, record: dict) -> "CaseScores":
        return cls(np.asarray(record["users"], dtype=np.int64), np.asarray(record["ndcg"], dtype=np.float64), str(record["data_hash"]))


@dataclass(frozen=True)
class Promotion:
    promoted: bool
    version: str
    champion_before: str | None
    score: float
    champion_score: float | None
    reason: str
    registered_model: str = ""
    gain: float | None = None  # mean per-case difference candidate - champion, with its 95% CI
    gain_low: float | None = None
    gain_high: float | None = None
    cases: int | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def current_champion(client: MlflowClient, name: str):
    """The champion's ModelVersion of registered model ``name``, or None when there is none yet."""
    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def log_case_scores(client: MlflowClient, run_id: str, cases: CaseScores) -> None:
    """Store a candidate's per-case scores on its training run, where a later candidate pairs with them."""
    client.log_dict(run_id, cases.to_json(), CASES_ARTIFACT)


def stored_case_scores(version) -> CaseScores | None:
    """The per-case scores a version was judged on (its run's ``CASES_ARTIFACT``), or None if it has none."""
    if not version.run_id:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = mlflow.artifacts.download_artifacts(run_id=version.run_id, artifact_path=CASES_ARTIFACT, dst_path=tmp)
            return CaseScores.from_json(json.loads(Path(path).read_text()))
        except (MlflowException, OSError, ValueError, KeyError):
            return None


def paired_gain(candidate: CaseScores, champion: CaseScores, resamples: int, seed: int) -> tuple[float, float, float, int]:
    """(mean, CI low, CI high, cases) of candidate - champion over the users both scored, as pairs."""
    common, i, j = np.intersect1d(candidate.users, champion.users, return_indices=True)
    diff = candidate.ndcg[i] - champion.ndcg[j]
    mean, low, high = bootstrap_ci(diff, resamples, seed)
    return mean, low, high, int(len(common))


def _covers(stored: CaseScores | None, candidate: CaseScores) -> bool:
    return stored is not None and stored.data_hash == candidate.data_hash and bool(np.isin(candidate.users, stored.users).all())


def promote_if_better(
    client: MlflowClient,
    name: str,
    version: str,
    candidate: CaseScores,
    rescore_champion: Callable[[object, CaseScores], CaseScores],
    preset: str = "full",
    resamples: int = 1000,
    seed: int = 0,
) -> Promotion:
    """Move ``champion`` of registered model ``name`` to ``version`` if it is a full-preset run that beats the
    champion by the paired CI on the same cases (module docstring); ``rescore_champion(champion_version, candidate)``
    scores the champion on the candidate's cases when its stored ones are of other data."""
    score = candidate.score
    base = dict(registered_model=name, score=score)
    champion = current_champion(client, name)
    before = None if champion is None else str(champion.version)
    if before == str(version):
        return Promotion(True, version, before, champion_score=score, **base, reason=f"v{version} is already the champion")
    if preset != "full":
        return Promotion(False, version, before, champion_score=None, **base,
                         reason=f"v{version} not promoted: a {preset} run is never a champion candidate (only full-preset runs are)")
    if champion is None:
        client.set_registered_model_alias(name, CHAMPION, version)
        return Promotion(True, version, None, champion_score=None, **base, reason=f"v{version} promoted: the first full-preset version of {name}")
    stored = stored_case_scores(champion)
    if _covers(stored, candidate):
        theirs, source = stored, "its stored cases (same data version)"
    else:
        try:
            theirs, source = rescore_champion(champion, candidate), "re-scored on the candidate's cases"
        except Exception as exc:  # an unloadable champion must not block every later version
            client.set_registered_model_alias(name, CHAMPION, version)
            reason = f"v{version} promoted: champion v{before} could not be re-scored on the candidate's cases ({type(exc).__name__}: {exc})"
            return Promotion(True, version, before, champion_score=None, **base, reason=reason[:2000])
        logger.info("re-scored champion v%s on the candidate's %d cases: %.3f", before, len(theirs.ndcg), theirs.score)
    gain, low, high, cases = paired_gain(candidate, theirs, resamples, seed)
    facts = dict(champion_score=theirs.score, gain=gain, gain_low=low, gain_high=high, cases=cases, **base)
    measured = (f"new-user NDCG@10 (n=5) {score:.3f} vs champion v{before}'s {theirs.score:.3f} ({source}); "
                f"paired difference {gain:+.3f}, 95% CI [{low:+.3f}, {high:+.3f}] over {cases} cases")
    if cases and low > 0:
        client.set_registered_model_alias(name, CHAMPION, version)
        return Promotion(True, version, before, reason=f"v{version} promoted: {measured}", **facts)
    verdict = "tie (the CI holds 0)" if cases and high >= 0 else "worse" if cases else "no common cases"
    return Promotion(False, version, before, reason=f"champion v{before} kept, {verdict}: {measured}", **facts)
