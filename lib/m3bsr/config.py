"""Configuration dataclasses and the ``ci`` / ``default`` / ``paper`` profiles.

A run is fully described by a :class:`Config` (data + model + train). ``--set key=value`` on the
command line overrides any field by its (unique) name, e.g. ``--set cdbd=false --set T=5``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """An unknown profile, model, device or config field, or a value of the wrong type."""


def repo_root() -> Path:
    """The project folder (the one holding ``lib/``)."""
    return Path(__file__).resolve().parents[2]


@dataclass
class DataConfig:
    dataset: str = "synthetic"  # synthetic | ml-100k-mm | ml-latest-small-mm | rec-tmall | taobao-ub | csv
    data_root: str | None = None  # None: $M3BSR_DATA, else ../shared/datasets when it exists
    data_file: str | None = None  # the generic CSV (dataset="csv")
    deep: str | None = None  # comma-separated raw behaviours forming the deep (target) level; None: loader default
    levels: str | None = None  # multi-level order, e.g. "pv|cart|fav,buy" (shallow -> deep, "|" between levels)
    favor_threshold: float = 4.0  # MovieLens: rating >= this is a favor (deep); every rating is a click
    cache_dir: str | None = None  # feature cache; None: <repo>/data/cache
    max_len: int = 50  # L: events kept per behaviour stream (most recent first)
    row_len: int | None = None  # W >= L: events per level in a training row (targets share it); None: 2 * max_len
    min_deep: int = 3  # users with fewer deep events get no valid/test target (their events still train)
    # robustness studies (data/perturb.py): valid/test targets are never perturbed
    deep_noise: float = 0.0  # share of the other deep events whose item is replaced by a random item
    deep_keep: float = 1.0  # share of the other deep events kept (sparse deep behaviour)
    # synthetic generator sizes (the profile sets them)
    syn_users: int = 600
    syn_items: int = 800
    syn_clusters: int = 8
    syn_events: int = 60  # mean events per user
    syn_noise: float = 0.3  # fraction of accidental clicks
    syn_feature_noise: float = 1.0  # std of the planted modality noise (relative to the clean signal)
    syn_seed: int = 0


@dataclass
class ModelConfig:
    model: str = "m3bsr"
    d: int = 64
    layers: int = 2
    heads: int = 2
    dropout: float = 0.2
    # diffusion (M3BSR and DiffuRec)
    T: int = 15  # training diffusion steps (paper: 15)
    train_mode: str = "chain"  # chain: the paper's T-step chain | strided: train_steps strided steps | random_t: DDPM
    train_steps: int | None = None  # strided: steps of the training chain (<= T); None: round(T / 3)
    inference_steps: int | None = None  # <= T, strided; None: as trained (T, train_steps; random_t: 1 DDIM step)
    random_t_eval_from: int | None = None  # random_t: evaluation starts from q(h_t | h_0) at this t; None: round(T / 3)
    schedule: str = "linear"  # linear: beta 1e-4..0.02 (chosen on validation) | cosine: abar_t = cos^2(0.9*pi/2*t/T)
    eval_mode: str = "deterministic"  # deterministic (eps = 0) | stochastic (seeded) | skip
    diffusion_loss: str = "paper"  # paper: ||h~_t - h-_t||^2 | eps: ||eps - eps^_t||^2
    time_embedding: bool = False  # sinusoidal t-embedding added to the CI query (not in the paper; random_t: always)
    predictor_residual: bool = True  # eps^ = LN(h~_t) + attention output | false: the attention output alone
    # M3BSR components (ablation switches)
    cdmd: bool = True  # conditional diffusion modality denoising (ID conditions image/text)
    cdbd: bool = True  # conditional diffusion behaviour denoising (deeper conditions shallower)
    cdbd_condition: str = "same"  # same: favor of the same modality | concat: all favor modalities
    cdbd_deeper: str = "next"  # >2 levels: condition on the next deeper level | all: all deeper levels
    contrastive: bool = True
    contrastive_variant: str = "apart"  # apart: the paper's loss over 7 interests | push: dropout views
    common_expert: bool = True
    router: str = "gate"  # gate: sigmoid gate | softmax: over all experts | mean: no router (plain mean)
    shared_specific: bool = True  # one Transformer per modality shared by all behaviours
    modalities: str = "id,image,text"  # subset for ablations; missing data modalities are skipped
    tau: float = 0.1  # contrastive temperature
    lambda_c: float = 0.001  # chosen on validation (docs/choices.md); the paper gives no value
    lambda_m: float = 0.1
    lambda_b: float = 0.1
    tie_weights: bool = True  # prediction W tied to the ID embedding table (+ bias); chosen on validation
    # baselines
    mask_ratio: float = 0.2  # BERT4Rec
    diffurec_T: int = 32  # DiffuRec's default steps
    diffurec_schedule: str = "trunc_lin"  # DiffuRec's truncated-linear betas | cosine
    compile: bool = False  # torch.compile the model
    cuda_graphs: bool = False  # CUDA: train step and scoring replayed as CUDA graphs (torch.compile "reduce-overhead")


@dataclass
class TrainConfig:
    seed: int = 0
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.0
    # The budget counts optimiser steps (one step = one batch of batch_size training rows), whatever the
    # dataset's size; an epoch (one pass over the training rows, in a fresh shuffled order) is the data order only.
    eval_steps: int = 25  # validate on the validation split every this many steps (and at the end of the budget)
    patience_steps: int = 500  # early stopping: stop once this many steps passed without a new best NDCG@10
    min_steps: int = 500  # early stopping never ends a run before this many steps
    max_steps: int = 5000  # the budget: a run stops after this many steps
    epochs: int | None = None  # optional cap on the passes over the training rows (None: max_steps alone)
    eval_batch_size: int = 512
    device: str = "auto"  # auto: cuda when available
    bf16: bool = False  # bf16 autocast (CUDA)
    sampled_negatives: int = 99  # 1 + 99 sampled metrics next to full ranking (0: off)
    mask_seen: bool = False  # leave every item seen before the target out of the ranking (default: ranked)
    progress: bool = True  # progress bar in a terminal or a Jupyter kernel (never when stderr is a file, or CI=true)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    profile: str = "default"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Config":
        """The inverse of :meth:`to_dict`; each value is checked as :meth:`set` checks it (ConfigError).
        Fields the dict lacks (a config saved before they existed) keep their defaults."""
        cfg = cls(profile=d.get("profile", "default"))
        for section in ("data", "model", "train"):
            known = {f.name for f in dataclasses.fields(getattr(cfg, section))}
            for key, value in d[section].items():
                if key not in known:
                    raise ConfigError(f"unknown config field {section}.{key}{_renamed(key)}")
                cfg.set(key, value)
        return cfg

    def hash(self) -> str:
        """Stable hash of everything that changes results (not the device or progress bar).

        Fields of :data:`ADDED_FIELDS` are left out while they hold their default, so adding an
        option does not orphan the run folders (named by this hash) of configs that do not use it.
        """
        d = self.to_dict()
        for k in ("device", "progress"):
            d["train"].pop(k)
        for section, fields in ADDED_FIELDS.items():
            for k, default in fields.items():
                if d[section][k] == default:
                    d[section].pop(k)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]

    def set(self, key: str, value: Any) -> None:
        """Override one field by name, parsing strings ("false", "5", "none") to the field's type."""
        owners = [s for s in (self.data, self.model, self.train) if key in {f.name for f in dataclasses.fields(s)}]
        if not owners:
            raise ConfigError(f"unknown config field {key!r}{_renamed(key)}")
        sub = owners[0]
        ftype = {f.name: f.type for f in dataclasses.fields(sub)}[key]
        value = _parse(value, str(ftype), key)
        if key in CHOICES and value not in CHOICES[key]:
            raise ConfigError(f"config field {key!r} must be one of {CHOICES[key]}, got {value!r}")
        if key in {**RANGES, **ABOVE} and isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"config field {key!r} must be a finite number, got {value!r}")
        if key in RANGES and value is not None:
            lo, hi = RANGES[key]
            if not (lo <= value and (hi is None or value <= hi)):
                bounds = f"in {lo}..{hi}" if hi is not None else f">= {lo}"
                raise ConfigError(f"config field {key!r} must be {bounds}, got {value!r}")
        if key in ABOVE and not value > ABOVE[key]:
            raise ConfigError(f"config field {key!r} must be > {ABOVE[key]}, got {value!r}")
        setattr(sub, key, value)


# Fields added after run folders existed: part of the hash only when set away from this default.
ADDED_FIELDS: dict[str, dict[str, Any]] = {
    "data": {"deep_noise": 0.0, "deep_keep": 1.0, "row_len": None},
    "model": {"train_mode": "chain", "train_steps": None, "random_t_eval_from": None, "predictor_residual": True,
              "cuda_graphs": False},
}

# Fields that no longer exist, and what took their place (named when an old config or override uses them).
RENAMED: dict[str, str] = {
    "patience": "patience_steps, which counts optimiser steps since the last new best, not validations",
    "eval_every": "eval_steps, which counts optimiser steps between validations, not epochs",
}


def _renamed(key: str) -> str:
    return f"; it was replaced by {RENAMED[key]}" if key in RENAMED else ""


# The longest stream (BOS + max_len events) a model's positional table holds.
MAX_POSITIONS = 512

# Bounds (inclusive; None: none) of the numeric fields: Config.set rejects values outside them.
RANGES: dict[str, tuple[float, float | None]] = {
    "seed": (0, 2 ** 32 - 1), "syn_seed": (0, 2 ** 32 - 1),  # numpy's seeds
    "max_len": (1, MAX_POSITIONS - 1), "row_len": (1, MAX_POSITIONS - 1),
    "min_deep": (2, None),  # a user's last two deep events are the test and validation targets
    "syn_users": (1, None), "syn_items": (1, None), "syn_clusters": (1, None), "syn_events": (0, None),
    "syn_noise": (0.0, 1.0), "dropout": (0.0, 1.0),
    "d": (1, None), "layers": (0, None), "heads": (1, None), "T": (1, None), "diffurec_T": (1, None),
    # <= T (random_t: inference_steps <= random_t_eval_from) is checked when the model is built
    "inference_steps": (1, None), "train_steps": (1, None), "random_t_eval_from": (1, None),
    "epochs": (0, None), "batch_size": (1, None), "eval_steps": (1, None), "patience_steps": (1, None),
    "min_steps": (0, None), "max_steps": (1, None), "eval_batch_size": (1, None), "sampled_negatives": (0, None),
    "lr": (0.0, None), "weight_decay": (0.0, None), "lambda_c": (0.0, None), "lambda_m": (0.0, None),
    "lambda_b": (0.0, None), "mask_ratio": (0.0, 1.0),
}
# Fields that must lie strictly above a value: a temperature of 0 divides the similarities by zero.
ABOVE: dict[str, float] = {"tau": 0.0}

CHOICES: dict[str, tuple] = {
    "dataset": ("synthetic", "ml-100k-mm", "ml-latest-small-mm", "rec-tmall", "taobao-ub", "csv"),
    "schedule": ("cosine", "linear"), "eval_mode": ("deterministic", "stochastic", "skip"),
    "diffusion_loss": ("paper", "eps"), "train_mode": ("chain", "strided", "random_t"),
    "cdbd_condition": ("same", "concat"), "cdbd_deeper": ("next", "all"),
    "contrastive_variant": ("apart", "push"), "router": ("gate", "softmax", "mean"),
    "diffurec_schedule": ("trunc_lin", "cosine"),
}


def _parse(value: Any, ftype: str, key: str) -> Any:
    """``value`` as the field's type: strings are parsed, other values checked (ConfigError)."""
    if not isinstance(value, str):
        return _check_type(value, ftype, key)
    v = value.strip()
    if v.lower() in ("none", "null") and "None" in ftype:
        return None
    try:
        if ftype.startswith("bool"):
            if v.lower() in ("1", "true", "yes", "on"):
                return True
            if v.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(v)
        if ftype.startswith("int"):
            return int(v)
        if ftype.startswith("float"):
            return float(v)
    except ValueError:
        raise ConfigError(f"config field {key!r} expects {ftype}, got {value!r}") from None
    return v


def _check_type(value: Any, ftype: str, key: str) -> Any:
    """A value that is not a string (a Python override, a config.json): it must already have the
    field's type. Integers pass where a float is expected; numpy scalars become Python numbers."""
    if value is None and "None" in ftype:
        return None
    base = ftype.split("|")[0].strip()
    number = not isinstance(value, bool) and isinstance(value, numbers.Real)
    if base == "bool" and isinstance(value, bool):
        return value
    if base == "int" and number and isinstance(value, numbers.Integral):
        return int(value)
    if base == "float" and number:
        return int(value) if isinstance(value, numbers.Integral) else float(value)
    raise ConfigError(f"config field {key!r} expects {ftype}, got {value!r}")


# Profiles: ci = seconds to minutes on 2 CPU cores; default = the CPU study of docs/results.md; paper = GPU scale.
# Training budgets, in optimiser steps. ci: a smoke run, 16 steps validated every 4. default: the size at
# which the whole study (every model tuned, then five seeds per table) fits about 10 CPU-hours on 2 cores
# (docs/tuning.md; `tune --cost` priced it): width 32, one layer, windows of L = 20 events, batch 64,
# validated every 10 steps, at least 150 steps and 150 steps of patience, a budget of 800 (M3BSR's runs
# of `bench --time-to-quality` at this size reached their best within 140 to 790 steps). At the paper's
# L = 50, d = 64, two layers and batch 256 one M3BSR step costs 12 to 50 CPU-seconds, and the study
# 190 to 990 CPU-hours. paper (a GPU, larger data): validated every 100 steps, at least 2000 steps,
# patience 1000, a budget of 20000.
PROFILES: dict[str, dict[str, Any]] = {
    "ci": dict(syn_users=150, syn_items=200, syn_events=40, max_len=20, d=32, layers=1, heads=2, T=5,
               batch_size=64, eval_steps=4, patience_steps=8, min_steps=8, max_steps=16, diffurec_T=8,
               sampled_negatives=99),
    "default": dict(syn_users=600, syn_items=800, syn_events=60, max_len=20, d=32, layers=1, heads=2,
                    T=15, batch_size=64, eval_steps=10, patience_steps=150, min_steps=150, max_steps=800,
                    diffurec_T=32),
    "paper": dict(syn_users=5000, syn_items=50000, syn_events=100, max_len=50, d=64, layers=2, heads=2,
                  T=15, batch_size=256, eval_steps=100, patience_steps=1000, min_steps=2000, max_steps=20000,
                  diffurec_T=32),
}


def make_config(profile: str = "default", overrides: dict[str, Any] | None = None) -> Config:
    """The profile's config with ``overrides`` (field name -> value) applied."""
    if profile not in PROFILES:
        raise ConfigError(f"unknown profile {profile!r}; expected one of {sorted(PROFILES)}")
    cfg = Config(profile=profile)
    for k, v in {**PROFILES[profile], **(overrides or {})}.items():
        cfg.set(k, v)
    return cfg


def check_jobs(jobs: Any) -> None:
    """``jobs`` (runs trained at once) must be None or a positive integer; ConfigError otherwise."""
    if jobs is not None and (isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1):
        raise ConfigError(f"jobs must be a positive integer (runs trained at once) or None, got {jobs!r}")
