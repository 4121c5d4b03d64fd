"""Model name -> class. ``build_model(cfg, info)`` is the one way the trainer makes a model."""
from __future__ import annotations

from ..config import ConfigError, ModelConfig
from .base import DataInfo, Recommender
from .baselines import Popularity, SASRec, SASRecMM
from .m3bsr import M3BSR
from .sequential import BERT4Rec, DiffuRec, MBT

MODELS: dict[str, type[Recommender]] = {
    "pop": Popularity,
    "sasrec": SASRec,
    "sasrec-mm": SASRecMM,
    "m3bsr": M3BSR,
    "bert4rec": BERT4Rec,
    "mbt": MBT,
    "diffurec": DiffuRec,
}


def build_model(cfg: ModelConfig, info: DataInfo) -> Recommender:
    if cfg.model not in MODELS:
        raise ConfigError(f"unknown model {cfg.model!r}; expected one of {sorted(MODELS)}")
    return MODELS[cfg.model](cfg, info)
