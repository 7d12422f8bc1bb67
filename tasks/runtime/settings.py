"""Build the Config: defaults < environment (METAREC_*) < TOML file < --set overrides."""

from __future__ import annotations

import difflib
import logging
import os
import tomllib
from pathlib import Path
from typing import Any, Iterable, Mapping

from pydantic import ValidationError

from metarec.config import Config

logger = logging.getLogger(__name__)

ENV_PREFIX = "METAREC_"
# METAREC_* variables read elsewhere than the Config (the raw data folder; the deployment's allow-list)
OTHER_ENV_VARS = ("METAREC_DATA_DIR", "METAREC_DEPLOYMENT_ALLOWED")


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


def known_env_vars() -> list[str]:
    """Every METAREC_* name something reads: METAREC_<SECTION>, METAREC_<SECTION>__<FIELD>, and OTHER_ENV_VARS."""
    names = [*OTHER_ENV_VARS]
    for section, field in Config.model_fields.items():
        names.append(f"{ENV_PREFIX}{section.upper()}")
        annotation = field.annotation
        if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
            names += [f"{ENV_PREFIX}{section.upper()}__{name.upper()}" for name in annotation.model_fields]
    return names


def unknown_env_vars(environ: Mapping[str, str] | None = None) -> list[str]:
    """A warning for each METAREC_* variable nothing reads (a typo is otherwise silently ignored), naming the close match."""
    known = known_env_vars()
    warnings = []
    for name in sorted(environ if environ is not None else os.environ):
        upper = name.upper()
        if not upper.startswith(ENV_PREFIX) or upper in known or upper.startswith(f"{ENV_PREFIX}TUNED__"):
            continue
        close = difflib.get_close_matches(upper, known, n=1, cutoff=0.75)
        hint = f"; did you mean {close[0]}?" if close else f" (config fields are {ENV_PREFIX}<SECTION>__<FIELD>, with two underscores)"
        warnings.append(f"environment variable {name} is not a metarec setting and is ignored{hint}")
    return warnings


def load_config(path: Path | None = None, overrides: Iterable[str] = (), **sections: dict) -> Config:
    """Validate everything before any work starts; errors name the file and the field. Warns about unknown METAREC_* variables."""
    for warning in unknown_env_vars():
        logger.warning(warning)
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


NAME_MAX, PATH_MAX = 255, 4096  # Linux's limits on one name and a whole path, in bytes


def check_artifacts_dir(path: Path) -> None:
    """runtime.artifacts_dir must be a folder (or not exist yet) with room below it for the stages' folders; only
    reads, so a read-only artifacts folder still serves."""
    path = Path(path)
    absolute = path.absolute()
    too_long = [part for part in absolute.parts if len(os.fsencode(part)) > NAME_MAX]
    if too_long:
        raise ConfigError(f"runtime.artifacts_dir {path}: the name {too_long[0][:40]!r}... is {len(os.fsencode(too_long[0]))} bytes, "
                          f"longer than the {NAME_MAX} a file system allows")
    if len(os.fsencode(str(absolute))) > PATH_MAX - 512:  # the stages add ~200 bytes of folders and file names below it
        raise ConfigError(f"runtime.artifacts_dir {str(path)[:60]}...: {len(os.fsencode(str(absolute)))} bytes long, leaving no room "
                          f"below the {PATH_MAX}-byte path limit for the stages' folders; choose a shorter path")
    for parent in (absolute, *absolute.parents):
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"runtime.artifacts_dir {path}: {parent} is a file, not a folder")
            break


# `--quick`: the same pipeline as a smoke run (minutes on 2 cores). One rule for every model: each trains for
# half of its full passes over the history (eval.training_fraction, Row.passes); one new-user fold; fewer
# resamples and λ points. Reports are labelled and draw no verdicts (runtime.preset). Half, not a quarter: at a
# quarter the SGD-trained baselines (MF-FT, SPMF) lost 0.24-0.28 NDCG@10 against their full runs on ml-100k while
# ours (Adam on the meta-objective) lost 0.03; at half every row stays within 0.08 of its full run.
QUICK_OVERRIDES = (
    "runtime.preset=quick",
    "eval.training_fraction=0.5",
    "data.new_user_folds=1",
    "baselines.tune_budget=2",
    "eval.bootstrap=200",
    "eval.lambda_sweep=[0.0, 1.0, 1000.0]",
)
