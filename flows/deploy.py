"""Run the nightly retraining as a served deployment on a local Prefect server.

`metarec deploy` starts `prefect server start` on 127.0.0.1 (unless an API URL
is given), waits until it answers, then serves the `nightly-retrain` flow as
the deployment `nightly` with its cron schedule in this process. Trigger a run
by hand with:

    PREFECT_API_URL=http://127.0.0.1:4200/api prefect deployment run 'nightly-retrain/nightly'

A server we start dies with the process that started it, even one killed with
``kill -9``: it runs in its own process group (stopped as a whole on a normal exit)
and, on Linux, asks the kernel for SIGTERM when its parent dies (PR_SET_PDEATHSIG).
The CLI's other commands run their flows against such a throw-away server too
(``temporary_server``) rather than Prefect's own ephemeral one, which a killed
parent leaves running on its port.

The deployment's parameters come from whoever can reach the server's API (it has no
authentication), so the flow accepts only the data set and overrides `metarec
deploy` itself was started with (``flows.nightly.DEPLOYMENT_ALLOWED_ENV``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import logging
import os
import signal
import socket
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
PR_SET_PDEATHSIG = 1  # linux/prctl.h


class PortInUseError(RuntimeError):
    """The port asked for is taken by another process."""


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    """True when ``host:port`` cannot be bound (another server holds it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _libc_prctl():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _libc_prctl()  # looked up here: the child between fork and exec should only make the call


def die_with_parent_preexec():
    """A ``preexec_fn`` making the child receive SIGTERM when the process starting it dies (Linux), or None elsewhere.

    The kernel signals on the death of the *thread* that forked: start servers from the main thread.
    """
    if _PRCTL is None:
        return None
    parent = os.getpid()

    def preexec() -> None:
        _PRCTL(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before the request was in place
            os._exit(1)

    return preexec


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
def local_server(port: int, prefect_home: Path | None = None, log_path: Path | None = None, ui: bool = True,
                 services: bool = True) -> Iterator[subprocess.Popen]:
    """A `prefect server start` child on 127.0.0.1:port (with its web UI unless ``ui`` is False, its background
    services unless ``services`` is False), stopped (by its own process group) on exit, and dying with us if we are killed.

    Raises PortInUseError before starting anything when the port is taken: the server would fail, or, worse, the
    health check would find whatever else answers there.
    """
    if port_in_use(port):
        raise PortInUseError(f"port {port} on 127.0.0.1 is already in use by another process; choose another with --port")
    log = open(log_path, "ab") if log_path else subprocess.DEVNULL
    process = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port),
         *([] if ui else ["--no-ui"]), *([] if services else ["--no-services"])],
        env=server_env(port, prefect_home),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=die_with_parent_preexec(),
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


@contextmanager
def temporary_server() -> Iterator[str]:
    """A Prefect API for the CLI's flows: the configured one if any, else a throw-away local server (no UI, no
    services) that stops when the block ends and dies with this process if it is killed."""
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

    configured = PREFECT_API_URL.value()
    if configured:
        yield configured
        return
    home = Path(PREFECT_HOME.value())
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    with local_server(port, log_path=home / "metarec-temporary-server.log", ui=False, services=False):
        url = api_url(port)
        before = os.environ.get("PREFECT_API_URL")
        os.environ["PREFECT_API_URL"] = url
        try:
            with temporary_settings({PREFECT_API_URL: url}):
                try:
                    yield url
                finally:
                    flush_to_api()
        finally:
            if before is None:
                os.environ.pop("PREFECT_API_URL", None)
            else:
                os.environ["PREFECT_API_URL"] = before


def flush_to_api(timeout: float = 10.0) -> None:
    """Send the logs and events still queued to the server before it stops; else Prefect's exit hook finds it gone and
    prints "Error logging to API - All connection attempts failed" after every command."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        try:
            worker.drain_all(timeout=timeout)
        except Exception as exc:  # noqa: BLE001 - a log that cannot be sent must not fail the command
            logger.debug("could not flush %s: %s", worker.__name__, exc)


def allow_parameters(parameters: dict) -> None:
    """Record, in this process's environment, what the served deployment's runs may ask for (flows/nightly.py checks)."""
    from flows.nightly import DEPLOYMENT_ALLOWED_ENV

    allowed = {"datasets": [parameters["dataset"]], "quick": bool(parameters.get("quick")), "overrides": list(parameters.get("overrides") or [])}
    os.environ[DEPLOYMENT_ALLOWED_ENV] = json.dumps(allowed)


def serve_nightly(cron: str = DEFAULT_CRON, parameters: dict | None = None, paused: bool = False) -> None:
    """Serve the nightly retraining deployment in this process (blocks until interrupted); its runs accept only
    ``parameters`` (or a subset of their overrides). ``paused`` registers the schedule without letting the
    scheduler create runs from it (a deployment triggered only by hand, as the deployment test needs)."""
    from flows.nightly import nightly_retrain

    allow_parameters(parameters or {"dataset": "ml-100k"})
    nightly_retrain.serve(
        name=DEPLOYMENT_NAME,
        cron=cron,
        paused=paused,
        parameters=parameters or {},
        description="Retrain the responsive MF on the latest data, evaluate it against the baselines, promote the champion.",
        tags=["metarec", "nightly"],
    )
