"""Write-then-rename, so a crash never leaves a half-written output behind.

Temporaries carry the pid of the process that made them (``.<name>.pid<N>.<random>.tmp``),
so that one left behind by a killed process (``kill -9``, a power cut) can be recognised
and swept the next time anything is written into the same folder: it is stale when no
process with that pid is running, or when the process now holding the pid started after
the temporary was last touched (the pid was reused).

Files and folders made here get the modes the user's umask gives (0644 / 0755 with the
usual 022), like every other file the user creates: ``tempfile`` would leave them
0600 / 0700.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

logger = logging.getLogger(__name__)

TEMP_PATTERN = re.compile(r"^\..+\.pid(?P<pid>\d+)\.[^./]+\.tmp$")
# /proc gives the boot time in whole seconds: allow that much slack before calling a pid reused
PID_REUSE_SLACK_S = 2.0


def _read_umask() -> int:
    """The process umask, read without changing it where /proc allows (os.umask sets it, briefly racing threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def user_mode(directory: bool) -> int:
    """0o777 (folders) or 0o666 (files) less the umask: what ``mkdir`` / ``open`` would create."""
    return (0o777 if directory else 0o666) & ~_read_umask()


def temp_prefix(final: Path) -> str:
    return f".{final.name}.pid{os.getpid()}."


# ---------------------------------------------------------------------------- stale temporaries


def _boot_time() -> float | None:
    try:
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith("btime "):
                return float(line.split()[1])
    except OSError:
        pass
    return None


def process_start_time(pid: int) -> float | None:
    """Unix time the process ``pid`` started (Linux /proc), or None if unknown."""
    boot = _boot_time()
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    if boot is None:
        return None
    # field 22 (starttime, clock ticks since boot) counts from after the ')' closing the command name
    fields = stat[stat.rindex(")") + 2:].split()
    return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive
    return True


def made_by_dead_process(pid: int, last_touched: float) -> bool:
    """True when the process that made a temporary (last modified at ``last_touched``) is gone."""
    if pid == os.getpid():
        return False
    if not process_alive(pid):
        return True
    started = process_start_time(pid)
    return started is not None and started > last_touched + PID_REUSE_SLACK_S


def _pid_of(name: str, pattern: re.Pattern) -> int | None:
    match = pattern.match(name)
    return int(match.group("pid")) if match else None


def sweep_stale_temporaries(folder: Path, pattern: re.Pattern = TEMP_PATTERN) -> list[Path]:
    """Remove the temporaries in ``folder`` whose maker is gone; returns what was removed."""
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return removed
    for entry in entries:
        pid = _pid_of(entry.name, pattern)
        if pid is None:
            continue
        try:
            touched = entry.stat(follow_symlinks=False).st_mtime
        except FileNotFoundError:
            continue
        if not made_by_dead_process(pid, touched):
            continue
        path = Path(entry.path)
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
        logger.warning("removed %s, left behind by process %d which is gone", path, pid)
    return removed


# ---------------------------------------------------------------------------- atomic writes


@contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling path; rename it onto ``final`` only if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_temporaries(final.parent)
    fd, tmp_name = tempfile.mkstemp(prefix=temp_prefix(final), suffix=".tmp", dir=final.parent)
    os.fchmod(fd, user_mode(directory=False))
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def temp_sibling_dir(final: Path) -> Iterator[Path]:
    """A fresh folder beside ``final`` (same file system, so renames out of it are atomic), always removed after."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_temporaries(final.parent)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(final), suffix=".tmp", dir=final.parent))
    os.chmod(tmp, user_mode(directory=True))
    try:
        yield tmp
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; it replaces ``final`` only if the block succeeds."""
    final = Path(final)
    with temp_sibling_dir(final) as tmp:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)


def write_parquet(table: pa.Table, path: Path) -> None:
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def write_json(obj: object, path: Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_text(text: str, path: Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
