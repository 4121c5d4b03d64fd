"""The canonical in-memory dataset and the project's error type.

Every loader returns a :class:`Dataset`:

* ``interactions``: a DataFrame with int64 columns ``user`` (0..n_users-1), ``item``
  (1..n_items; 0 is reserved for padding), ``level`` (0..n_levels-1, the behaviour depth,
  0 = shallowest, n_levels-1 = the deep target behaviour) and ``timestamp``, sorted by
  (user, timestamp, file order, level). One raw event may appear at several levels (a
  MovieLens rating >= 4 is both a click and a favor).
* ``levels``: one name per level, shallow -> deep, e.g. ``["click", "favor"]``.
* ``features``: modality name (``"image"``, ``"text"``) -> float32 array ``(n_items + 1, D_m)``;
  row 0 is padding. ``feature_mask``: modality -> bool array ``(n_items + 1,)``, False where the
  item lacks that modality (its row is zero and must not be trusted).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

MODALITIES = ("image", "text")


class DataError(ValueError):
    """Bad input: names the file, the line or column, and what was expected."""

    def __init__(self, message: str, file: Any = None, line: int | None = None):
        where = ""
        if file is not None:
            where = f"{file}"
            if line is not None:
                where += f", line {line}"
            where += ": "
        super().__init__(where + message)
        self.file, self.line = file, line


@dataclass
class Dataset:
    name: str
    interactions: pd.DataFrame
    levels: list[str]
    n_users: int
    n_items: int
    features: dict[str, np.ndarray] = field(default_factory=dict)
    feature_mask: dict[str, np.ndarray] = field(default_factory=dict)
    item_ids: np.ndarray | None = None  # (n_items + 1,) raw item id per index (index 0: padding)
    user_ids: np.ndarray | None = None  # (n_users,) raw user id per index
    item_labels: np.ndarray | None = None  # (n_items + 1,) a category per item (genre, planted cluster), for plots
    truth: dict[str, Any] = field(default_factory=dict)  # planted ground truth (synthetic data only)

    @property
    def n_levels(self) -> int:
        return len(self.levels)

    def validate(self) -> "Dataset":
        """Check the invariants above; raise DataError naming what is wrong."""
        df = self.interactions
        for col in ("user", "item", "level", "timestamp"):
            if col not in df.columns:
                raise DataError(f"interactions lack column {col!r}", file=self.name)
        if len(df) == 0:
            raise DataError("no interactions left after filtering", file=self.name)
        if df["item"].min() < 1 or df["item"].max() > self.n_items:
            raise DataError(f"item index outside 1..{self.n_items}", file=self.name)
        if df["level"].min() < 0 or df["level"].max() >= self.n_levels:
            raise DataError(f"level outside 0..{self.n_levels - 1}", file=self.name)
        if not (df["level"] == self.n_levels - 1).any():
            raise DataError(f"no event of the deep behaviour {self.levels[-1]!r}", file=self.name)
        for m, x in self.features.items():
            if x.ndim != 2 or x.shape[0] != self.n_items + 1:
                raise DataError(f"{m} features have shape {x.shape}, expected ({self.n_items + 1}, D)",
                                file=self.name)
            if not np.isfinite(x).all():
                row = int(np.argwhere(~np.isfinite(x))[0, 0])
                raise DataError(f"{m} features contain NaN/inf (item index {row})", file=self.name)
            mask = self.feature_mask.get(m)
            if mask is None or mask.shape != (self.n_items + 1,):
                raise DataError(f"{m} feature mask missing or of the wrong shape", file=self.name)
        return self

    def fingerprint(self) -> str:
        """A content hash of interactions and features (goes into checkpoints and caches)."""
        h = hashlib.sha256()
        h.update(np.ascontiguousarray(self.interactions[["user", "item", "level", "timestamp"]].to_numpy()).tobytes())
        h.update(repr(self.levels).encode())
        for m in sorted(self.features):
            h.update(m.encode())
            h.update(np.ascontiguousarray(self.features[m]).tobytes())
            h.update(np.ascontiguousarray(self.feature_mask[m]).tobytes())
        return h.hexdigest()[:16]

    def stats(self) -> dict[str, Any]:
        """Users, items, events per level, sequence lengths and density."""
        df = self.interactions
        per_user = df.groupby("user").size()
        out: dict[str, Any] = {"dataset": self.name, "users": self.n_users, "items": self.n_items,
                               "events": len(df)}
        for lvl, name in enumerate(self.levels):
            out[f"#{name}"] = int((df["level"] == lvl).sum())
        out["seq_len_median"] = float(per_user.median())
        out["seq_len_mean"] = round(float(per_user.mean()), 2)
        out["seq_len_max"] = int(per_user.max())
        pairs = df[["user", "item"]].drop_duplicates()
        out["density"] = round(len(pairs) / (self.n_users * self.n_items), 5)
        out["modalities"] = ",".join(sorted(self.features)) or "-"
        return out


def finalize(name: str, raw: pd.DataFrame, levels: list[str], *, file: Any = None) -> tuple[Dataset, pd.Index, pd.Index]:
    """Turn raw events into a Dataset (features added by the caller).

    raw: columns ``user`` and ``item`` (raw ids, any hashable), ``level`` (int), ``timestamp``
    (int64) and ``order`` (file order). Returns the dataset plus the raw user and item ids in
    index order, so callers can align features with ``item_index.get_indexer(raw_ids) + 1``.
    """
    if len(raw) == 0:
        raise DataError("no interactions left after filtering", file=file)
    users = pd.Index(pd.unique(raw["user"]))
    items = pd.Index(pd.unique(raw["item"]))
    df = pd.DataFrame({
        "user": users.get_indexer(raw["user"]).astype(np.int64),
        "item": (items.get_indexer(raw["item"]) + 1).astype(np.int64),
        "level": raw["level"].to_numpy(np.int64),
        "timestamp": raw["timestamp"].to_numpy(np.int64),
        "order": raw["order"].to_numpy(np.int64),
    })
    df = df.sort_values(["user", "timestamp", "order", "level"], kind="stable").drop(columns="order")
    df = df.reset_index(drop=True)
    ds = Dataset(name=name, interactions=df, levels=list(levels), n_users=len(users), n_items=len(items),
                 item_ids=np.concatenate([[None], items.to_numpy(dtype=object)]),
                 user_ids=users.to_numpy(dtype=object))
    return ds, users, items
