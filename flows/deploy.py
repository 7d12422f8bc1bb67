"""Run the nightly retraining as a served deployment on a local Prefect server.

`metarec deploy` starts `prefect server start` on 127.0.0.1 (unless an API URL
is given), waits until it answers, then serves the `nightly-retrain` flow as
the deployment `nightly` with its cron schedule in this process. Trigger a run
by hand with:

    PREFECT_API_URL=http://127.0.0.1:4200/api prefect deployment run 'nightly-retrain/nightly'
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

logger = logging.getLogger(__name__)

DEPLOYMENT_NAME = "nightly"
DEFAULT_CRON = "0 2 * * *"


def api_url(port: int) -> str:
    return f"http://127.0.0.1:{port}/api"


def wait_until_healthy(url: str, timeout: float = 120.0, process: subprocess.Popen | None = None) -> None:
    """Poll <url>/health until it answers true; fail early if the server process died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the Prefect server exited with code {process.returncode} before it answered at {url}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise TimeoutError(f"the Prefect server did not answer at {url} within {timeout:.0f} s")


def server_env(port: int, prefect_home: Path | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PREFECT_API_URL=api_url(port),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DO_NOT_TRACK="1",
    )
    if prefect_home is not None:
        env["PREFECT_HOME"] = str(prefect_home)
    return env


@contextmanager
def local_server(port: int, prefect_home: Path | None = None, log_path: Path | None = None, ui: bool = True) -> Iterator[subprocess.Popen]:
    """A `prefect server start` child on 127.0.0.1:port (with its web UI unless ``ui`` is False),
    stopped (by its own process group) on exit."""
    log = open(log_path, "ab") if log_path else subprocess.DEVNULL
    process = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port), *([] if ui else ["--no-ui"])],
        env=server_env(port, prefect_home),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_until_healthy(api_url(port), process=process)
        yield process
    finally:
        stop_process_group(process)
        if log_path:
            log.close()


def stop_process_group(process: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM the group the process leads, then SIGKILL what is left after ``grace`` seconds."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(grace)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(grace)
    except ProcessLookupError:
        pass


def serve_nightly(cron: str = DEFAULT_CRON, parameters: dict | None = None) -> None:
    """Serve the nightly retraining deployment in this process (blocks until interrupted)."""
    from flows.nightly import nightly_retrain

    nightly_retrain.serve(
        name=DEPLOYMENT_NAME,
        cron=cron,
        parameters=parameters or {},
        description="Retrain the responsive MF on the latest data, evaluate it against the baselines, promote the champion.",
        tags=["metarec", "nightly"],
    )
