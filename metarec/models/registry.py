"""Model name -> constructor, so flows and the CLI name models as the config does.

Imports are lazy: a model's module loads only when it is asked for.
"""

from __future__ import annotations

from importlib import import_module
from typing import Callable

from metarec.config import Config
from metarec.interface import StreamingRecommender

# name -> "module:factory"; each factory takes the whole Config and returns an unfitted model.
MODEL_FACTORIES: dict[str, str] = {
    "responsive": "metarec.models.responsive:from_config",
    "mf_ft": "metarec.models.mf_ft:from_config",
    "rkmf": "metarec.models.rkmf:from_config",
    "srec": "metarec.models.srec:from_config",
    "spmf": "metarec.models.spmf:from_config",
    "pop": "metarec.models.pop:from_config",
}


def make_model(name: str, config: Config) -> StreamingRecommender:
    if name not in MODEL_FACTORIES:
        raise ValueError(f"unknown model {name!r}; expected one of {sorted(MODEL_FACTORIES)}")
    module_name, factory_name = MODEL_FACTORIES[name].split(":")
    factory: Callable[[Config], StreamingRecommender] = getattr(import_module(module_name), factory_name)
    return factory(config)
