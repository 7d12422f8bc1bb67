"""Logging calls for code that runs both inside Prefect runs and outside them (tests, the pure API)."""

from __future__ import annotations

import logging

from prefect import get_run_logger
from prefect.exceptions import MissingContextError


def log_info(logger: logging.Logger, message: str, *args) -> None:
    """To the Prefect run's logger (shown in the UI and the terminal) when inside a run, else to ``logger``."""
    try:
        get_run_logger().info(message, *args)
    except MissingContextError:
        logger.info(message, *args)


def log_warning(logger: logging.Logger, message: str, *args) -> None:
    """A warning, to the Prefect run's logger when inside a run, else to ``logger``."""
    try:
        get_run_logger().warning(message, *args)
    except MissingContextError:
        logger.warning(message, *args)
