"""Build the Config: defaults < environment (METAREC_*) < TOML file < --set overrides."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Iterable

from pydantic import ValidationError

from metarec.config import Config


class ConfigError(ValueError):
    """A bad configuration value, named with what was expected."""


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # a bare string


def _merge(base: dict, overrides: dict) -> dict:
    out = dict(base)
    for key, value in overrides.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_config(path: Path | None = None, overrides: Iterable[str] = (), **sections: dict) -> Config:
    """Validate everything before any work starts; errors name the file and the field."""
    layered: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            layered = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path}: not valid TOML ({exc})") from exc
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or "." not in key:
            raise ConfigError(f"--set {item!r}: expected section.field=value, e.g. meta.lambda_ml=0.5")
        section, field = key.strip().split(".", 1)
        layered = _merge(layered, {section: {field: _parse_value(text.strip())}})
    layered = _merge(layered, {k: v for k, v in sections.items() if v})
    try:
        env_config = Config()
        return Config.model_validate(_merge(env_config.model_dump(), layered))
    except ValidationError as exc:
        where = f" (from {path})" if path else ""
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"invalid configuration{where}: {problems}") from exc


# `--quick`: the same pipeline as a smoke run (minutes on 2 cores). One rule for every model: each trains for
# a quarter of its full passes over the history (eval.training_fraction, Row.passes); one new-user fold; fewer
# resamples and λ points. Reports are labelled and draw no verdicts (runtime.preset).
QUICK_OVERRIDES = (
    "runtime.preset=quick",
    "eval.training_fraction=0.25",
    "data.new_user_folds=1",
    "baselines.tune_budget=2",
    "eval.bootstrap=200",
    "eval.lambda_sweep=[0.0, 1.0, 1000.0]",
)
