"""The prepared data set on disk: its schema, and a reader for the later stages.

Files in ``prepared_dir(config)`` (written by ``tasks/data/prepare.py``):

- ``interactions.parquet``: every rating, dense ids. user_id, item_id (int64),
  rating (double), ts (int64 seconds), seq (int64: the line's position in the
  input, which seeds the tie-break of same-second positives, ``data.tie_break``).
- ``users.parquet`` (user_id, raw_user), ``items.parquet`` (item_id, raw_item, title).
- ``history.parquet``, ``stream.parquet``, ``new_users.parquet``: positives only,
  user_id, item_id, ts, pos (0-based chronological position of the row among
  that user's rows in the same file, same-second rows in the ``data.tie_break``
  order); sorted by (ts, user_id, pos).
  ``stream.parquet`` also has batch (0 .. B-1, time-ordered).
- ``candidates.parquet``: one row per evaluation case. case_id, kind ('new' or
  'stream'), n (new: interactions shown first; stream: -1), batch (stream:
  its batch; new: -1), user_id, item_id (the true next item), pos (its pos in
  its file), negatives (list<int64>, n_negatives items the user never had as
  a positive anywhere in the data set).
- ``user_features.parquet``, ``item_features.parquet``: side features, one row per
  (entity, value): entity_id (the dense user_id / item_id), field_id, field, value,
  code (dense over the (field, value) pairs); empty when the data set has none
  (``tasks/data/features.py``).
- ``stats.json``: rows, users, items and time ranges per part; the feature fields; what
  the input checks found (``input_checks``).
- ``manifest.json``: size and SHA-256 of each file above, written last: a folder
  without it was never completed. ``load_prepared`` checks the sizes (a ``stat``
  each, so every stage can afford it); ``tasks.data.prepare.is_prepared`` also checks the
  hashes before a folder is reused (see ``tasks.runtime.integrity``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from metarec.features import Features, FeatureTable
from metarec.interface import Interactions
from tasks.runtime.atomic import write_json
from tasks.runtime.integrity import MANIFEST, CorruptFileError, manifest_problems, read_manifest, write_manifest

SPLIT_FILES = ("interactions", "users", "items", "history", "stream", "new_users", "candidates")
FEATURE_FILES = ("user_features", "item_features")  # always written by prepare; a folder without them reads as having none
REQUIRED_FILES = (*(f"{name}.parquet" for name in SPLIT_FILES), "stats.json")
PREPARED_FILES = (*REQUIRED_FILES, *(f"{name}.parquet" for name in FEATURE_FILES))


def seal_prepared(root: Path) -> None:
    """Write the manifest of a folder holding the prepared files: from now on it counts as complete."""
    root = Path(root)
    names = [name for name in PREPARED_FILES if name in REQUIRED_FILES or (root / name).is_file()]
    write_json(write_manifest(root, names), root / MANIFEST)


def prepared_problems(root: Path, hashes: bool | None = False, features: bool = False) -> list[str]:
    """Why ``root`` is not a complete, intact prepared folder (empty if it is); see ``integrity.manifest_problems``.

    ``features``: the feature files must be there too (prepare always writes them; a reader does without).
    """
    manifest = read_manifest(root)
    if manifest is None:
        return [f"{Path(root) / MANIFEST} is missing or unreadable (the folder was never completed)"]
    unlisted = [name for name in (PREPARED_FILES if features else REQUIRED_FILES) if name not in manifest["files"]]
    if unlisted:
        return [f"{Path(root) / MANIFEST} does not list {unlisted}"]
    return manifest_problems(root, manifest, hashes)


@dataclass(frozen=True)
class PreparedData:
    root: Path
    history: Interactions
    stream: Interactions
    stream_batch: np.ndarray
    new_users: Interactions
    new_users_pos: np.ndarray
    n_users: int
    n_items: int
    stats: dict
    features: Features = Features()

    def candidates(self, kind: str):
        """The stored candidates of one kind as a pyarrow Table, in the file's order.

        Filtered while reading, a row group at a time: at Netflix scale the stream's cases hold most
        of the file (one case per stream positive, 100 negatives each), and the new-user evaluation
        must not hold them in memory to throw them away.
        """
        return pq.read_table(self.root / "candidates.parquet", filters=[("kind", "=", kind)])


def _interactions(path: Path, extra: str | None = None) -> tuple[Interactions, np.ndarray | None]:
    """The file's (user_id, item_id, ts) as Interactions, and its column ``extra`` (None when not asked for), as int64
    arrays of their own: the Arrow table is gone when this returns."""
    names = ("user_id", "item_id", "ts") + ((extra,) if extra else ())
    table = pq.read_table(path, columns=list(names))
    cols = {name: table.column(name).to_numpy().astype(np.int64) for name in names}
    return Interactions(cols["user_id"], cols["item_id"], cols["ts"]), cols.get(extra)


def load_feature_table(path: Path, n_entities: int) -> FeatureTable | None:
    """One features Parquet as a FeatureTable over dense ids 0..n_entities-1 (None when it has no row or is absent)."""
    if not path.is_file():
        return None
    table = pq.read_table(path)
    if table.num_rows == 0:
        return None
    col = lambda name: table.column(name).to_numpy(zero_copy_only=False)  # noqa: E731
    code, field_id = col("code").astype(np.int64), col("field_id").astype(np.int64)
    field_of_code = np.zeros(int(code.max()) + 1, dtype=np.int64)
    field_of_code[code] = field_id
    names = dict(zip(field_id.tolist(), col("field").tolist()))
    return FeatureTable.from_long(col("entity_id").astype(np.int64), code, field_of_code, tuple(names[i] for i in range(len(names))), n_entities)


def load_prepared(root: Path) -> PreparedData:
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"no prepared data in {root}; run `metarec prepare` first")
    problems = prepared_problems(root)
    if problems:
        raise CorruptFileError(root, f"prepared data is incomplete or damaged: {'; '.join(problems)}",
                               "run `metarec prepare` (or any command) to rebuild the prepared files")
    history, _ = _interactions(root / "history.parquet")
    stream, stream_batch = _interactions(root / "stream.parquet", "batch")
    new_users, new_users_pos = _interactions(root / "new_users.parquet", "pos")
    n_users = pq.read_metadata(root / "users.parquet").num_rows
    n_items = pq.read_metadata(root / "items.parquet").num_rows
    data = PreparedData(
        root=root,
        history=history,
        stream=stream,
        stream_batch=stream_batch,
        new_users=new_users,
        new_users_pos=new_users_pos,
        n_users=n_users,
        n_items=n_items,
        stats=json.loads((root / "stats.json").read_text()),
        features=Features(load_feature_table(root / "user_features.parquet", n_users), load_feature_table(root / "item_features.parquet", n_items)),
    )
    # The Parquet reads' buffers are freed by now, but Arrow's allocator keeps them for reuse: at 100M ratings about
    # 3 GB of a fit's peak memory, held for nothing while the index is built beside it.
    pa.default_memory_pool().release_unused()
    return data
