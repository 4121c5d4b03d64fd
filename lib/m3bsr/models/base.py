"""The interface every model implements, and what a model knows about the data.

A model maps a batch (see :mod:`m3bsr.data.sequences`) to one user vector per target and scores
every item. The trainer only calls :meth:`Recommender.loss` and :meth:`Recommender.score`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ModelConfig


@dataclass
class DataInfo:
    n_items: int  # N; item ids are 1..N, 0 is padding
    levels: list[str]  # behaviour levels, shallow -> deep (the last one is the target behaviour)
    features: dict[str, torch.Tensor] = field(default_factory=dict)  # modality -> (N+1, D_m)
    feature_mask: dict[str, torch.Tensor] = field(default_factory=dict)  # modality -> (N+1,) bool
    item_counts: torch.Tensor | None = None  # (N+1,) training-target counts (popularity)
    window: int | None = None  # L: events of each level a target reads (data.max_len); None: all in the row

    @property
    def n_levels(self) -> int:
        return len(self.levels)


class Recommender(nn.Module):
    """Base class. Subclasses implement :meth:`user_vectors`; override loss/score when needed.

    The default prediction layer is ``p(i | y) = softmax(W y + b)`` over all items; a model with
    another head (e.g. tied to its item table) overrides :meth:`item_scores`, and :meth:`logits`
    masks the padding item for all of them.
    """

    trainable = True

    def __init__(self, cfg: ModelConfig, info: DataInfo):
        super().__init__()
        self.cfg, self.info = cfg, info
        self.n_items = info.n_items
        self.out = nn.Linear(cfg.d, info.n_items + 1)

    def user_vectors(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """-> (y ``(B, K, d)``, auxiliary losses {name: scalar})."""
        raise NotImplementedError

    def item_scores(self, y: torch.Tensor) -> torch.Tensor:
        """``(..., d)`` -> a new ``(..., N+1)`` tensor of raw scores (subclasses override the head)."""
        return self.out(y)

    def logits(self, y: torch.Tensor) -> torch.Tensor:
        """``(..., d)`` -> ``(..., N+1)``; the padding item 0 can never win."""
        z = self.item_scores(y)
        z[..., 0] = float("-inf")  # in place: no second (targets, N+1) tensor
        return z

    def loss(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """CE over all items at every target, plus the model's weighted auxiliary terms.

        Returns {"loss": total, "ce": ..., <aux>: ...} (all scalars, aux unweighted).
        """
        y, aux = self.user_vectors(batch)
        valid = batch["targets"] > 0
        ce = F.cross_entropy(self.logits(y[valid]).float(), batch["targets"][valid])
        total = ce
        for name, value in aux.items():
            total = total + self.aux_weight(name) * value
        return {"loss": total, "ce": ce, **aux}

    def aux_weight(self, name: str) -> float:
        return {"contrast": self.cfg.lambda_c, "modality": self.cfg.lambda_m,
                "behaviour": self.cfg.lambda_b}.get(name, 1.0)

    def score(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Scores of all items for each row's first target: ``(B, N+1)`` (column 0 = padding)."""
        y, _ = self.user_vectors(batch)
        return self.logits(y[:, 0]).float()
