"""Is a file we wrote earlier still whole? Manifests, content hashes, and quarantine for damaged caches.

- ``CorruptFileError``: a file that can no longer be read (truncated, overwritten,
  damaged), always named in the message.
- ``quarantine(path)``: rename a damaged cache aside as ``<name>.corrupt-<time>`` (kept
  for inspection, never read again) so it can be rebuilt.
- A manifest (``manifest.json``) records each file's size and SHA-256. Checking sizes
  costs a ``stat`` per file, and catches what crashes and full disks do (truncation,
  a missing file); hashes cost a full read and also catch same-size damage (a file
  overwritten in place, bit rot). See ``verify_manifest`` for when each is checked.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
# Above this many bytes, a folder's hashes are not re-read on every reuse (sizes still are):
# at ~700 MB/s (SHA-256 here) 1 GiB is ~1.5 s, small next to any stage that reuses the folder.
HASH_CHECK_MAX_BYTES = 1 << 30


class CorruptFileError(ValueError):
    """A file written earlier is unreadable or differs from its record; the message names the file."""

    def __init__(self, path: Path | str, problem: str, hint: str = "") -> None:
        self.path = Path(path)
        super().__init__(f"{path}: {problem}" + (f"; {hint}" if hint else ""))


def file_sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def quarantine(path: Path) -> Path:
    """Rename ``path`` (file or folder) to ``<name>.corrupt-<time>`` beside it; returns the new path.

    The caller says why, in a warning naming both paths, and rebuilds what was there.
    """
    path = Path(path)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    aside = path.with_name(f"{path.name}.corrupt-{stamp}")
    suffix = 1
    while aside.exists():
        aside = path.with_name(f"{path.name}.corrupt-{stamp}-{suffix}")
        suffix += 1
    os.replace(path, aside)
    return aside


# ---------------------------------------------------------------------------- manifests


def write_manifest(folder: Path, names: list[str]) -> dict:
    """Size and SHA-256 of each named file in ``folder``, as the manifest to store beside them."""
    folder = Path(folder)
    files = {name: {"size": (folder / name).stat().st_size, "sha256": file_sha256(folder / name)} for name in names}
    return {"format": MANIFEST_FORMAT, "files": files}


def read_manifest(folder: Path) -> dict | None:
    """The folder's manifest, or None when it has none or it is unreadable (then the folder is not complete)."""
    try:
        manifest = json.loads((Path(folder) / MANIFEST).read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT or not isinstance(manifest.get("files"), dict):
        return None
    return manifest


def manifest_problems(folder: Path, manifest: dict, hashes: bool | None = None) -> list[str]:
    """What differs between ``folder`` and its manifest (empty when whole).

    Sizes are always checked. Hashes are checked when ``hashes`` is True, or, when it is
    None, if the folder is at most ``HASH_CHECK_MAX_BYTES`` (then the read is cheap).
    """
    folder = Path(folder)
    problems = []
    total = 0
    for name, record in manifest["files"].items():
        path = folder / name
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            problems.append(f"{path} is missing")
            continue
        total += size
        if size != record.get("size"):
            problems.append(f"{path} has {size} bytes, its manifest says {record.get('size')} (truncated or replaced)")
    if problems:
        return problems
    if hashes is None:
        hashes = total <= HASH_CHECK_MAX_BYTES
    if hashes:
        for name, record in manifest["files"].items():
            if file_sha256(folder / name) != record.get("sha256"):
                problems.append(f"{folder / name} differs from the file recorded in its manifest (SHA-256 mismatch)")
    return problems
