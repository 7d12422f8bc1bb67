"""Build a Table 1 row's model, or name its variant, from a config: the registry's rows applied to a ``Config``.

Apart from ``metarec.models.registry`` (the table of rows, which ``metarec.config`` reads) so that the
two import one way: config -> registry, and factory -> config and registry. Imports are lazy: a
model's module loads only when it is asked for.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Callable

from metarec.models.registry import row

if TYPE_CHECKING:
    from metarec.config import Config
    from metarec.interface import StreamingRecommender


def row_variant(name: str, config: "Config") -> str | None:
    """The variant row ``name`` runs under ``config`` (e.g. "batch + reservoir draws"), None for its faithful default.

    A model module may define ``variant_of(config) -> str | None``; Table 1 appends "variant: <name>" to the label.
    """
    module_name, _ = row(name).factory.split(":")
    variant_of: Callable[["Config"], str | None] | None = getattr(import_module(module_name), "variant_of", None)
    return variant_of(config.for_row(name)) if variant_of is not None else None


def make_model(name: str, config: "Config") -> "StreamingRecommender":
    """The unfitted model of row ``name``, built from ``config.for_row(name)``."""
    module_name, factory_name = row(name).factory.split(":")
    factory: Callable[["Config"], "StreamingRecommender"] = getattr(import_module(module_name), factory_name)
    return factory(config.for_row(name))
