"""A synthetic click/favor log with planted ground truth, deterministic from ``cfg.syn_seed``.

Generative story (C = syn_clusters, I = syn_items, U = syn_users):

* Items fall into C balanced latent clusters; clean item factors ``z = centre[cluster] + 0.3 * N(0, I)``
  ``(I, 16)``. Modalities are fixed random linear views of ``z`` plus Gaussian noise of std
  ``syn_feature_noise`` x the clean part's std: image ``(I, 48)``, text ``(I, 32)``.
* Each user has 1 or 2 interest clusters. Clicks (about ``syn_events / (1 + P_FAVOR * (1 - syn_noise))``
  per user, Poisson, at least ``MIN_CLICKS``) come at increasing timestamps. A click is accidental
  with probability ``syn_noise`` (a uniformly random item), else genuine (an item of one of the
  user's clusters, Zipf-skewed popularity within the cluster). A genuine click is followed by a favor
  of the same item with probability ``P_FAVOR`` at a strictly later time. Accidental clicks are never
  favored, so favors only ever follow the user's interests.

``ds.truth`` (item arrays aligned with the dataset's item index, row 0 = padding):
``item_cluster (n_items+1,)`` (-1 at 0), ``item_factors (n_items+1, 16)``, ``clean_image (n_items+1, 48)``,
``clean_text (n_items+1, 32)``, ``user_clusters (n_users, 2)`` (-1 = no second cluster) and
``accidental (n_events,)`` bool, aligned with ``ds.interactions`` rows.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from ..config import ConfigError, DataConfig
from .schema import Dataset, finalize

FACTOR_DIM, IMAGE_DIM, TEXT_DIM = 16, 48, 32
P_FAVOR = 0.5
MIN_CLICKS = 6
ZIPF_EXPONENT = 0.8
CLUSTER_SPREAD = 0.3


def make_synthetic(cfg: DataConfig) -> Dataset:
    """Generate the dataset described in the module docstring (levels ``["click", "favor"]``)."""
    rng = np.random.default_rng(cfg.syn_seed)
    U, I, C = cfg.syn_users, cfg.syn_items, cfg.syn_clusters
    if C > I:
        raise ConfigError(f"syn_clusters={C} must be at most syn_items={I} (every cluster holds an item)")

    # items: clusters, factors, modality views
    item_cluster = rng.permutation(np.arange(I) % C)
    centres = rng.normal(size=(C, FACTOR_DIM))
    z = centres[item_cluster] + CLUSTER_SPREAD * rng.normal(size=(I, FACTOR_DIM))
    views = {}
    for name, dim in (("image", IMAGE_DIM), ("text", TEXT_DIM)):
        clean = z @ rng.normal(size=(FACTOR_DIM, dim)) / np.sqrt(FACTOR_DIM)
        noisy = clean + cfg.syn_feature_noise * clean.std() * rng.normal(size=clean.shape)
        views[name] = (clean, noisy)

    # users: one or two distinct interest clusters
    c1 = rng.integers(C, size=U)
    c2 = (c1 + rng.integers(1, max(C, 2), size=U)) % C
    two = (rng.random(U) < 0.5) & (C > 1)
    user_clusters = np.stack([c1, np.where(two, c2, -1)], axis=1)

    # clicks
    mean_clicks = cfg.syn_events / (1 + P_FAVOR * (1 - cfg.syn_noise))
    n_clicks = np.maximum(rng.poisson(mean_clicks, size=U), MIN_CLICKS)
    user = np.repeat(np.arange(U), n_clicks)
    n = len(user)
    accidental = rng.random(n) < cfg.syn_noise
    pick = rng.integers(0, 2, size=n) * two[user]  # which of the user's clusters
    cluster = user_clusters[user, pick]
    item = rng.integers(I, size=n)  # accidental: uniform over the catalogue
    u01 = rng.random(n)
    for c in range(C):
        members = rng.permutation(np.flatnonzero(item_cluster == c))  # popularity rank order
        cdf = np.cumsum(1.0 / np.arange(1, len(members) + 1) ** ZIPF_EXPONENT)
        sel = ~accidental & (cluster == c)
        item[sel] = members[np.minimum(np.searchsorted(cdf / cdf[-1], u01[sel]), len(members) - 1)]
    ts = 1_600_000_000 + np.cumsum(rng.integers(0, 600, size=n))  # increasing per user; some ties

    # favors follow genuine clicks
    fav = ~accidental & (rng.random(n) < P_FAVOR)
    fav_ts = ts[fav] + rng.integers(1, 3600, size=int(fav.sum()))

    events = pd.DataFrame({
        "user": np.concatenate([user, user[fav]]),
        "item": np.concatenate([item, item[fav]]) + 1,  # raw item ids 1..I
        "level": np.concatenate([np.zeros(n, np.int64), np.ones(int(fav.sum()), np.int64)]),
        "timestamp": np.concatenate([ts, fav_ts]),
        "accidental": np.concatenate([accidental, np.zeros(int(fav.sum()), bool)]),
    })
    # sort once here with a unique `order`, so finalize's stable sort keeps these rows in place
    events = events.sort_values(["user", "timestamp", "level"], kind="stable").reset_index(drop=True)
    events["order"] = np.arange(len(events))
    ds, _, items = finalize("synthetic", events, ["click", "favor"])

    raw = items.to_numpy(np.int64) - 1  # dataset item index k -> generator item raw[k - 1]
    def aligned(x: np.ndarray, pad) -> np.ndarray:
        return np.concatenate([np.full((1, *x.shape[1:]), pad, dtype=x.dtype), x[raw]])

    for name, (clean, noisy) in views.items():
        ds.features[name] = aligned(noisy, 0).astype(np.float32)
        ds.feature_mask[name] = np.r_[False, np.ones(ds.n_items, bool)]
        ds.truth[f"clean_{name}"] = aligned(clean, 0).astype(np.float32)
    ds.item_labels = aligned(item_cluster, -1)
    ds.truth.update(item_cluster=ds.item_labels, item_factors=aligned(z, 0).astype(np.float32),
                    user_clusters=user_clusters, accidental=events["accidental"].to_numpy())
    return ds.validate()
