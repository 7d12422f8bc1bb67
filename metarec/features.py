"""Side features of users and items, keyed by dense id, as the models receive them (no file I/O here).

The prepare stage (``tasks/data/prepare.py``, SQL in ``sql/features_*.sql``) turns each
data set's profile files into long tables, one row per (entity, field, value),
where ``code`` numbers the distinct (field, value) pairs 0..C-1. ``FeatureTable``
is the same information as dense arrays:

- ``codes`` (n, S): the codes of entity row n (its dense id), left-aligned,
  -1 = padding. S is the most values any entity has (a film with 6 genres
  has 6 genre codes; a user has one code per single-valued field);
- ``code_field`` (C,): the field each code belongs to;
- ``fields``: the field names, in field-index order.

A model embeds every code and averages the codes of each field, so a
multi-valued field (genres) and a single-valued one (age) look alike, and a
missing value is a zero vector for that field. ``Features`` holds the user and
the item table; either may be absent (the data set has none).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class FeatureTable:
    """Categorical fields of one kind of entity: codes (n, S) (-1 = padding), code_field (C,), field names."""

    codes: np.ndarray
    code_field: np.ndarray
    fields: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.codes.ndim != 2:
            raise ValueError(f"FeatureTable.codes must be (entities, slots), got shape {self.codes.shape}")
        if self.codes.size and self.codes.max() >= len(self.code_field):
            raise ValueError(f"FeatureTable: code {int(self.codes.max())} has no field ({len(self.code_field)} codes)")
        if len(self.code_field) and (self.code_field.min() < 0 or self.code_field.max() >= len(self.fields)):
            raise ValueError(f"FeatureTable.code_field must index the {len(self.fields)} fields")

    @property
    def n_entities(self) -> int:
        return int(self.codes.shape[0])

    @property
    def n_codes(self) -> int:
        return int(len(self.code_field))

    @property
    def n_fields(self) -> int:
        return len(self.fields)

    def slot_fields(self) -> np.ndarray:
        """(n, S) the field of each slot; padding slots get n_fields (a bucket models drop)."""
        return np.where(self.codes >= 0, self.code_field[np.maximum(self.codes, 0)] if self.n_codes else 0, self.n_fields)

    @classmethod
    def from_long(cls, entity: np.ndarray, code: np.ndarray, field_of_code: np.ndarray, fields: tuple[str, ...], n_entities: int) -> "FeatureTable":
        """From long rows (entity id, code), with field_of_code (C,) and the field names.

        Entities with no row (ids up to ``n_entities``) get no codes: every field missing.
        """
        entity = np.asarray(entity, dtype=np.int64)
        code = np.asarray(code, dtype=np.int64)
        n_entities = max(int(n_entities), int(entity.max()) + 1 if len(entity) else 0)
        order = np.lexsort((code, entity))
        entity, code = entity[order], code[order]
        counts = np.bincount(entity, minlength=n_entities)
        width = int(counts.max()) if len(counts) and counts.max() > 0 else 1
        starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
        slot = np.arange(len(entity)) - np.repeat(starts, counts)
        codes = np.full((n_entities, width), -1, dtype=np.int64)
        codes[entity, slot] = code
        return cls(codes, np.asarray(field_of_code, dtype=np.int64), tuple(fields))

    def to_arrays(self, prefix: str) -> dict[str, np.ndarray]:
        """Numeric and unicode arrays only (saved in a model's state without pickle)."""
        return {f"{prefix}.codes": self.codes, f"{prefix}.code_field": self.code_field, f"{prefix}.fields": np.asarray(self.fields, dtype=str)}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], prefix: str) -> "FeatureTable | None":
        if f"{prefix}.codes" not in arrays:
            return None
        return cls(np.asarray(arrays[f"{prefix}.codes"], dtype=np.int64), np.asarray(arrays[f"{prefix}.code_field"], dtype=np.int64),
                   tuple(str(f) for f in np.asarray(arrays[f"{prefix}.fields"]).tolist()))


@dataclass(frozen=True)
class Features:
    """The side features a data set has: users and items, each a FeatureTable or None."""

    users: FeatureTable | None = None
    items: FeatureTable | None = None

    def describe(self) -> dict:
        """Which fields there are, for records and summaries."""
        return {"user_fields": list(self.users.fields) if self.users else [], "item_fields": list(self.items.fields) if self.items else []}

    def to_arrays(self) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for prefix, table in (("features.users", self.users), ("features.items", self.items)):
            if table is not None:
                out.update(table.to_arrays(prefix))
        return out

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> "Features":
        return cls(FeatureTable.from_arrays(arrays, "features.users"), FeatureTable.from_arrays(arrays, "features.items"))


NO_FEATURES = Features()
