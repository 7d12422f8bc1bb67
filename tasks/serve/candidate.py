"""A run's serving candidate: which row, its scores, its registration and the champion decision, as Prefect tasks.

The candidate is Ours+ (``responsive_plus``) when the run has it, else Ours (paper) (``responsive``): fold 0's
meta-trained Θ, scored by its per-case new-user NDCG@10 at n = 5 on fold 0's new users. ``register_task`` and
``promote_task`` run inside the pipeline flow, so their logs reach Prefect; the rule is ``tasks.track.champion``'s.
"""

from __future__ import annotations

import logging

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
from mlflow import MlflowClient
from prefect import task

from metarec.config import Config
from metarec.models.registry import ROWS
from tasks.evaluate.evaluation import CASES_FILE, eval_dir
from tasks.runtime.logs import log_info
from tasks.runtime.paths import prepared_dir
from tasks.serve.serving import rescore_version
from tasks.track.champion import SCORE_N, CaseScores, Promotion, promote_if_better, registered_model_name
from tasks.track.model_registry import Candidate, register_candidate
from tasks.track.tracking import setup_mlflow

logger = logging.getLogger(__name__)

CANDIDATE_ROWS = ("responsive_plus", "responsive")  # the first of these a run has is its candidate


def candidate_row(models) -> str | None:
    """Ours+ if the run has it, else Ours (paper); None when it has neither."""
    return next((row for row in CANDIDATE_ROWS if row in models), None)


def candidate_cases(fold_config: Config, row: str) -> CaseScores | None:
    """Row ``row``'s per-case new-user NDCG@10 at n = 5 in this fold (its stored ``cases.parquet``), None if absent."""
    path = eval_dir(fold_config, row) / CASES_FILE
    if not path.is_file():
        return None
    table = pq.read_table(path, columns=["part", "n", "user_id", "ndcg"])
    table = table.filter(pc.and_(pc.equal(table["part"], "new"), pc.equal(table["n"], SCORE_N)))
    if not table.num_rows:
        return None
    return CaseScores(table["user_id"].to_numpy().astype(np.int64), table["ndcg"].to_numpy().astype(np.float64), prepared_dir(fold_config).name)


@task(name="register-candidate")
def register_task(config: Config, run_id: str, kind: str, candidate: Candidate) -> str:
    """Register the candidate's training run's Θ in this data set's registered model (once per run)."""
    setup_mlflow(config)
    version = register_candidate(config, run_id, kind, candidate)
    score = "not scored" if candidate.cases is None else f"new-user NDCG@10 (n=5) {candidate.cases.score:.3f} on {len(candidate.cases.users)} users"
    log_info(logger, "%s (%s) fold %d registered as %s v%s: %s", ROWS[candidate.row].label, candidate.row, candidate.fold,
             registered_model_name(config.data.dataset), version, score)
    return version


@task(name="promote-champion")
def promote_task(config: Config, version: str, cases: CaseScores) -> dict:
    """Move this data set's champion to ``version`` only if it beats the champion (``tasks.track.champion``)."""
    setup_mlflow(config)
    decision: Promotion = promote_if_better(MlflowClient(), registered_model_name(config.data.dataset), version, cases,
                                            lambda champion, candidate: rescore_version(champion, config, candidate),
                                            preset=config.runtime.preset, resamples=config.eval.bootstrap, seed=config.eval.seed)
    log_info(logger, "champion of %s: %s", registered_model_name(config.data.dataset), decision.reason)
    return decision.as_dict()
