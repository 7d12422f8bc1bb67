"""Content hashes of the raw input files, cached so an unchanged file is read once.

The prepared data is keyed on what the input files hold, not on their size and
modification time: a file rewritten with new ratings but the same size and mtime
(``cp -p``, ``rsync --times``, a restored backup) must not reuse stale outputs.
Hashing 2 GB of Netflix text takes a few seconds, so each file's SHA-256 is kept
in ``<artifacts>/.cache/input-hashes.json`` keyed by (path, size, mtime, ctime,
inode): any change to one of those re-hashes the file. The ctime is what makes the
cache sound: a file rewritten in place with its size kept and its mtime set back
(``touch -d``, ``os.utime``) keeps path, size, mtime and inode, but every write and
every mtime change sets the ctime to now, and it cannot be set back. The cache is
written atomically under a file lock; losing it only costs one re-read.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tasks.runtime.atomic import write_json
from tasks.runtime.integrity import file_sha256
from tasks.runtime.locks import first_time_lock

CACHE_FILE = Path(".cache") / "input-hashes.json"


def cache_path(artifacts_dir: Path) -> Path:
    return Path(artifacts_dir) / CACHE_FILE


def _key(stat: os.stat_result) -> list[int]:
    return [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino]


def _read(path: Path) -> dict:
    try:
        cache = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return {}  # an unreadable cache only costs re-hashing
    return cache if isinstance(cache, dict) else {}


def content_hashes(files: list[Path], artifacts_dir: Path) -> dict[Path, str]:
    """SHA-256 of each file's bytes, re-read only when its (path, size, mtime, ctime, inode) is not in the cache."""
    cache_file = cache_path(artifacts_dir)
    cache = _read(cache_file)
    out: dict[Path, str] = {}
    missing: list[tuple[Path, str, list[int]]] = []
    for path in files:
        resolved = str(Path(path).resolve())
        key = _key(os.stat(resolved))
        entry = cache.get(resolved)
        if isinstance(entry, dict) and entry.get("key") == key and isinstance(entry.get("sha256"), str):
            out[path] = entry["sha256"]
        else:
            missing.append((path, resolved, key))
    if not missing:
        return out
    for path, resolved, key in missing:
        out[path] = file_sha256(Path(resolved))
    with first_time_lock(cache_file, "updating the input hash cache"):
        cache = _read(cache_file)  # another process may have added entries meanwhile
        for path, resolved, key in missing:
            cache[resolved] = {"key": key, "sha256": out[path]}
        cache = {name: entry for name, entry in cache.items() if Path(name).exists()}
        write_json(cache, cache_file)
    return out
