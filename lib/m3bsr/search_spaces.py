"""The search spaces of ``python -m m3bsr tune`` (docs/tuning.md), one place for every model.

A space maps a config field to one of:

* ``("log", lo, hi)``: a float drawn on a log scale in [lo, hi];
* ``("float", lo, hi)``: a float drawn uniformly in [lo, hi];
* a list: one of these values (categorical; numbers, strings or booleans).

Every model gets :data:`COMMON` and its own entry of :data:`MODEL_SPACES`. The width ``d`` stays at
the profile's value (32 in ``default``) for every model, so that no model wins by being larger.
The profile's own values are the first trial of every study (where they lie in the space), so a
tuned configuration is never worse on validation than the profile's.
"""
from __future__ import annotations

from typing import Any

Space = dict[str, Any]

COMMON: Space = {
    "lr": ("log", 1e-4, 1e-2),
    "batch_size": [32, 64, 128],  # half, once and twice the default profile's 64
    "dropout": ("float", 0.0, 0.5),
    "weight_decay": [0.0, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2],  # 0 (the profile's) or a log grid
}

TRANSFORMER: Space = {"layers": [1, 2, 3], "heads": [1, 2, 4]}

MODEL_SPACES: dict[str, Space] = {
    "pop": {},  # nothing to train: not tuned (0 trials)
    "sasrec": TRANSFORMER,
    "sasrec-mm": TRANSFORMER,
    "mbt": TRANSFORMER,
    "bert4rec": {**TRANSFORMER, "mask_ratio": ("float", 0.1, 0.4)},
    "diffurec": {**TRANSFORMER, "diffurec_T": [16, 32, 64]},
    "m3bsr": {
        **TRANSFORMER,
        # the choices the paper is silent on
        "schedule": ["linear", "cosine"],
        "lambda_c": ("log", 1e-4, 1e-1),
        "lambda_m": ("log", 1e-3, 1.0),
        "lambda_b": ("log", 1e-3, 1.0),
        "router": ["gate", "softmax", "mean"],
        "T": [3, 5, 10, 15],
        "predictor_residual": [True, False],
        "train_mode": ["chain", "strided", "random_t"],
    },
}

# The training budget of a tuning trial (on top of the profile); the final runs (the five-seed tables)
# train with the profile's own. default: at most 250 steps (the profile's final runs: 150 to 800), at
# least 100 and 100 of patience, so that all seven models' studies on the three datasets fit about
# 5 CPU-hours on 2 cores and the costliest trial (M3BSR, 3 layers, batch 128, T = 15) an estimated 20 minutes
# (docs/tuning.md has the arithmetic).
TRIAL_BUDGET: dict[str, dict[str, Any]] = {
    "ci": {},
    "default": {"max_steps": 250, "min_steps": 100, "patience_steps": 100},
    "paper": {},
}

# Finished (complete or pruned) trials per (dataset, model) study: the same for every model.
TRIALS: dict[str, int] = {"ci": 2, "default": 12, "paper": 12}


def space(model: str) -> Space:
    """Field -> distribution of ``model``'s search (:data:`COMMON` and its own); ``{}`` for a model
    with nothing to train."""
    if model not in MODEL_SPACES:
        raise KeyError(f"no search space for model {model!r}; expected one of {sorted(MODEL_SPACES)}")
    own = MODEL_SPACES[model]
    return {} if model == "pop" else {**COMMON, **own}
