"""Champion promotion in the MLflow registry: the alias moves only to a model at least as good.

A version's score is its new-user NDCG@10 at n = 5, stored as version tags
together with the hash of the data it was evaluated on. Scores are compared
only on the same evaluation data: when the champion was scored on other data,
the caller re-scores it on the current data (``rescore_champion``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from tasks.track.tracking import REGISTERED_MODEL

logger = logging.getLogger(__name__)

CHAMPION = "champion"
SCORE_TAG = "new_n5_ndcg10"
DATA_TAG = "eval_data_hash"


@dataclass(frozen=True)
class Promotion:
    promoted: bool
    version: str
    champion_before: str | None
    score: float
    champion_score: float | None
    reason: str


def current_champion(client: MlflowClient, name: str = REGISTERED_MODEL):
    """The champion's ModelVersion, or None when there is none yet."""
    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def record_score(client: MlflowClient, version: str, score: float, data_hash: str, name: str = REGISTERED_MODEL) -> None:
    # repr round-trips exactly: a rounded tag would make an equal score compare as lower or higher
    client.set_model_version_tag(name, version, SCORE_TAG, repr(float(score)))
    client.set_model_version_tag(name, version, DATA_TAG, data_hash)


def promote_if_better(
    client: MlflowClient,
    version: str,
    score: float,
    data_hash: str,
    rescore_champion: Callable[[str], float],
    name: str = REGISTERED_MODEL,
) -> Promotion:
    """Record the new version's score; move ``champion`` to it if score >= the champion's on this data."""
    record_score(client, version, score, data_hash, name)
    champion = current_champion(client, name)
    if champion is None:
        client.set_registered_model_alias(name, CHAMPION, version)
        return Promotion(True, version, None, score, None, "first version becomes champion")
    if str(champion.version) == str(version):
        return Promotion(True, version, version, score, score, "already champion")
    if champion.tags.get(DATA_TAG) == data_hash and SCORE_TAG in champion.tags:
        champion_score = float(champion.tags[SCORE_TAG])
    else:
        try:
            champion_score = rescore_champion(champion.version)
        except Exception as exc:  # an unloadable champion must not block every later version
            client.set_registered_model_alias(name, CHAMPION, version)
            reason = f"promoted: champion v{champion.version} could not be re-scored on this data ({type(exc).__name__}: {exc})"
            return Promotion(True, version, champion.version, score, None, reason[:2000])
        logger.info("re-scored champion v%s on data %s: %.4f", champion.version, data_hash, champion_score)
    if score >= champion_score:
        client.set_registered_model_alias(name, CHAMPION, version)
        reason = f"promoted: new-user NDCG@10 (n=5) {score:.4f} >= champion v{champion.version}'s {champion_score:.4f}"
        return Promotion(True, version, champion.version, score, champion_score, reason)
    reason = f"champion v{champion.version} kept: new-user NDCG@10 (n=5) {score:.4f} < its {champion_score:.4f} on the same data"
    return Promotion(False, version, champion.version, score, champion_score, reason)
