"""Noisy and sparse deep behaviour: the data perturbations of the robustness studies (notebook 05).

M3BSR trusts the deep behaviour (favor) to denoise the shallow one, so two questions follow: what
happens when the deep behaviour is itself noisy, and when it is rare?

* ``deep_noise = p``: each perturbable deep event has its item replaced, with probability p, by an
  item drawn uniformly from the catalogue (time and level unchanged).
* ``deep_keep = q``: each perturbable deep event is kept with probability q and otherwise removed.

*Perturbable* means every deep event except, for each user with at least ``min_deep`` deep events,
the last two (the validation and test targets of :class:`~m3bsr.data.sequences.SequenceData`), so
every variant is scored on exactly the same targets with the same evaluable users. Removal never
leaves such a user with fewer than ``min_deep`` deep events (the latest removed ones are restored
first). Removal happens before replacement. One fixed draw (``seed``) per setting, so every model
and seed sees the same perturbed data.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from ..config import ConfigError
from .schema import Dataset


def perturb_deep(ds: Dataset, noise: float = 0.0, keep: float = 1.0, min_deep: int = 3, seed: int = 0) -> Dataset:
    """A copy of ``ds`` with its perturbable deep events thinned (``keep``) and corrupted (``noise``)."""
    if not 0.0 <= noise <= 1.0:
        raise ConfigError(f"deep_noise must be in [0, 1], got {noise}")
    if not 0.0 < keep <= 1.0:
        raise ConfigError(f"deep_keep must be in (0, 1], got {keep}")
    if noise == 0.0 and keep == 1.0:
        return ds
    rng = np.random.default_rng(seed)
    df = ds.interactions
    users = df["user"].to_numpy()
    deep_rows = np.flatnonzero((df["level"] == ds.n_levels - 1).to_numpy())
    n_deep = np.bincount(users[deep_rows], minlength=ds.n_users)
    evaluable = n_deep >= min_deep  # per user
    perturbable = np.zeros(len(df), dtype=bool)
    targets = evaluable[users[deep_rows]] & (_rank_from_end(users[deep_rows]) < 2)
    perturbable[deep_rows[~targets]] = True

    drop = perturbable & (rng.random(len(df)) >= keep)
    # an evaluable user keeps min_deep deep events: restore its latest dropped ones
    drop_rows = np.flatnonzero(drop)
    n_drop = np.bincount(users[drop_rows], minlength=ds.n_users)
    short = np.where(evaluable, np.maximum(min_deep - (n_deep - n_drop), 0), 0)
    drop[drop_rows[_rank_from_end(users[drop_rows]) < short[users[drop_rows]]]] = False
    noisy = perturbable & ~drop & (rng.random(len(df)) < noise)

    out = df.copy()
    out.loc[noisy, "item"] = rng.integers(1, ds.n_items + 1, size=int(noisy.sum()))
    truth = dict(ds.truth)
    if "accidental" in truth:  # per-event ground truth follows the kept rows
        truth["accidental"] = np.asarray(truth["accidental"])[~drop]
    return dataclasses.replace(ds, interactions=out[~drop].reset_index(drop=True), truth=truth).validate()


def _rank_from_end(users: np.ndarray) -> np.ndarray:
    """Sorted user ids of a selection of rows -> each row's rank from its user's last row (0 = last)."""
    return np.searchsorted(users, users, side="right") - 1 - np.arange(len(users))
