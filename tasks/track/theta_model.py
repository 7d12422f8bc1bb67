"""Θ as an MLflow pyfunc model: ``mlflow.pyfunc.load_model(uri).predict(frame)`` scores candidate items for users.

MLflow logs this file as the model's code ("models from code"): nothing is
pickled. The model's artifacts are plain files written by
``tasks.track.model_registry.log_theta_model``:

- ``theta``: ``theta.safetensors`` with P (users x d) and Q (items x d);
- ``description``: ``theta.json`` with the meta and task settings Θ was trained with;
- ``seen``: ``seen.safetensors`` with every interaction known at training time (user, item, ts as dense ids),
  the memory a user is adapted from (their last k interactions, their neighbours');
- ``ids``: ``ids.json`` with the raw user and item ids in dense order.

Input: a DataFrame with ``user`` and ``item`` (raw ids as strings, one row per candidate) and optionally
``recent`` (the user's latest items, comma-separated raw ids, oldest first). Output: ``score`` per row; higher is
better, comparable among one user's candidates. A user with ``recent`` items is adapted to them (docs/method.md §6),
a known user without them to their stored interactions, and an unknown user without them starts from the mean
row (§7). The model imports only the pure ``metarec`` package, which is logged with it as code.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel
from safetensors.torch import load_file

from metarec.config import MetaConfig, TaskConfig
from metarec.interface import Interactions, RecentItems
from metarec.models.responsive import ResponsiveMF


class ThetaModel(PythonModel):
    """The meta-learned MF behind the pyfunc interface; loads only safetensors and JSON."""

    def load_context(self, context) -> None:
        described = json.loads(Path(context.artifacts["description"]).read_text())
        theta = load_file(context.artifacts["theta"])
        for key in ("P", "Q"):
            if not torch.isfinite(theta[key]).all():  # would score every item NaN and recommend nothing, silently
                raise ValueError(f"{context.artifacts['theta']}: Θ's {key} holds NaN or infinite entries")
        seen = load_file(context.artifacts["seen"])
        ids = json.loads(Path(context.artifacts["ids"]).read_text())
        self.model = ResponsiveMF(MetaConfig(**described["meta"]), TaskConfig(**described["tasks"]))
        masks = {key: theta[key] for key in theta if key in ("trained_users", "trained_items")  # untrained rows are new (§11)
                 or key.startswith("extra.")}  # and Ours+'s optional parameters (item biases, learned rates, prior, start)
        self.model.load_training_state({"P": theta["P"], "Q": theta["Q"], **masks})
        self.model.set_index(Interactions(*(seen[key].numpy().astype(np.int64) for key in ("users", "items", "ts"))))
        self.users = {str(raw): i for i, raw in enumerate(ids["users"])}
        self.items = {str(raw): i for i, raw in enumerate(ids["items"])}

    def _item_ids(self, raw: list[str]) -> np.ndarray:
        missing = [value for value in raw if value not in self.items]
        if missing:
            raise ValueError(f"unknown item id(s) {missing[:5]}: not among the model's {len(self.items)} items")
        return np.array([self.items[value] for value in raw], dtype=np.int64)

    def _score(self, user: str, recent: list[str], candidates: np.ndarray) -> np.ndarray:
        model = self.model
        known = user in self.users
        if known and not recent:
            return model.score(np.array([self.users[user]]), candidates[None, :])[0]
        items = self._item_ids(recent) if recent else np.array([-1], dtype=np.int64)
        if known:
            adapted = model.adapt(np.array([self.users[user]]), items[None, :])
            # candidates are known items, so the generator (used for rows beyond the table) draws nothing
            return model.score_adapted(adapted, candidates[None, :], torch.Generator().manual_seed(0))[0]
        ts = np.full((1, len(items)), np.iinfo(np.int64).max // 2, dtype=np.int64)
        new_user = np.array([len(self.users)], dtype=np.int64)  # beyond every known id
        return model.score_new_users(RecentItems(new_user, items[None, :], ts), candidates[None, :])[0]

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        frame = pd.DataFrame(model_input).reset_index(drop=True)
        recent = frame["recent"].fillna("").astype(str) if "recent" in frame else pd.Series("", index=frame.index)
        scores = np.empty(len(frame), dtype=np.float64)
        for (user, shown), positions in frame.groupby([frame["user"].astype(str), recent], sort=False).indices.items():
            candidates = self._item_ids(frame["item"].iloc[positions].astype(str).tolist())
            scores[positions] = self._score(user, [part.strip() for part in shown.split(",") if part.strip()], candidates)
        return pd.DataFrame({"score": scores})

set_model(ThetaModel())
