"""Baselines: most-popular, SASRec (ID only) and SASRec+MM (ID + image + text)."""
from __future__ import annotations

import torch
import torch.nn as nn

from ..config import ModelConfig
from ..data.sequences import history_index, position_ids
from .base import DataInfo, Recommender
from .layers import FeatureProjection, Positions, Transformer, gather_positions, window_mask


class Popularity(Recommender):
    """Scores every item by how often it is a training target; the same list for every user."""

    trainable = False

    def __init__(self, cfg: ModelConfig, info: DataInfo):
        super().__init__(cfg, info)
        counts = info.item_counts if info.item_counts is not None else torch.zeros(info.n_items + 1)
        self.register_buffer("counts", counts.float())

    def score(self, batch):
        s = self.counts[None].expand(len(batch["users"]), -1).clone()
        s[:, 0] = float("-inf")
        return s


class SASRec(Recommender):
    """SASRec (Kang & McAuley, ICDM 2018) on the deep behaviour's sequence.

    Causal self-attention over item + position embeddings (positions counted back from the newest
    event, as SASRec's left-padded sequences do), within a window of the last L events; the output
    at the last event before each target predicts it, so every target of a row trains in one pass;
    scores are dot products with the (shared) item embedding table, CE over all items.
    """

    def __init__(self, cfg: ModelConfig, info: DataInfo, multimodal: bool = False):
        super().__init__(cfg, info)
        d = cfg.d
        del self.out  # prediction shares the item table
        self.item = nn.Embedding(info.n_items + 1, d, padding_idx=0)
        self.bos = nn.Parameter(torch.randn(d) * 0.02)
        self.pos = Positions(d)
        self.mm = nn.ModuleDict({m: FeatureProjection(info.features[m], info.feature_mask[m], d)
                                 for m in info.features} if multimodal else {})
        self.drop = nn.Dropout(cfg.dropout)
        self.encoder = Transformer(d, cfg.layers, cfg.heads, cfg.dropout)
        nn.init.normal_(self.item.weight, std=0.02)

    def item_table(self, items: torch.Tensor | None = None) -> torch.Tensor:
        """Item representations (ID embedding, plus projected modalities for SASRec+MM)."""
        if items is None:
            items = torch.arange(self.n_items + 1, device=self.item.weight.device)
        h = self.item(items)
        for proj in self.mm.values():
            h = h + proj(items)
        return h

    def user_vectors(self, batch):
        items, times = batch["items"][:, -1], batch["times"][:, -1]  # the deep level (B, L+1)
        B, L1 = items.shape
        h = self.item_table(items)
        h = torch.cat([self.bos.expand(B, 1, -1).to(h.dtype), h[:, 1:]], 1)
        h = self.drop(h + self.pos(position_ids(times)))
        h = self.encoder(h, window_mask(L1, self.info.window, h.device))
        idx = history_index(batch["times"][:, -1:], batch["target_times"])[:, 0]  # (B, K)
        return gather_positions(h, idx), {}

    def item_scores(self, y: torch.Tensor) -> torch.Tensor:
        return y @ self.item_table().T


class SASRecMM(SASRec):
    """SASRec+MM: the same backbone on ID + projected image + text features (summed)."""

    def __init__(self, cfg: ModelConfig, info: DataInfo):
        super().__init__(cfg, info, multimodal=True)
