"""Building blocks shared by every model: attention, Transformer blocks, item encoders.

Masks are boolean with True = "may attend", shaped to broadcast to ``(B, heads, Lq, Lk)``;
every query row must allow at least one key (BOS positions guarantee it).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import MAX_POSITIONS, ConfigError
from ..data.sequences import TIME_BOS, TIME_PAD


class Attention(nn.Module):
    """Multi-head attention: queries from ``x`` ``(B, Lq, d)``, keys/values from ``c`` ``(B, Lk, d)``."""

    def __init__(self, d: int, heads: int, dropout: float):
        super().__init__()
        if d % heads:
            raise ConfigError(f"d={d} must be divisible by heads={heads}")
        self.h, self.dropout = heads, dropout
        self.q = nn.Linear(d, d)
        self.kv = nn.Linear(d, 2 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, c: torch.Tensor, mask: torch.Tensor | None = None,
                return_weights: bool = False):
        B, Lq, d = x.shape
        q = self.q(x).view(B, Lq, self.h, d // self.h).transpose(1, 2)
        k, v = self.kv(c).view(B, c.shape[1], 2, self.h, d // self.h).permute(2, 0, 3, 1, 4)
        if mask is not None and mask.dim() == 3:
            mask = mask[:, None]
        if return_weights:  # explicit path, for the notebooks' attention maps
            att = (q @ k.transpose(-1, -2)) / math.sqrt(d // self.h)
            if mask is not None:
                att = att.masked_fill(~mask, float("-inf"))
            w = att.softmax(-1)
            y = (w @ v).transpose(1, 2).reshape(B, Lq, d)
            return self.proj(y), w
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(B, Lq, d))


class Block(nn.Module):
    """Pre-LN Transformer block: (cross-)attention then a position-wise feed-forward net."""

    def __init__(self, d: int, heads: int, dropout: float):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.ln_c = nn.LayerNorm(d)
        self.att = Attention(d, heads, dropout)
        self.ff = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d), nn.Dropout(dropout))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, c: torch.Tensor | None = None,
                rows: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, L, d)`` -> ``(B, L, d)``; with ``rows`` ``(B, K)``: only the queries at those positions,
        ``(B, K, d)`` (keys and values still come from every position; ``mask`` is the full one)."""
        h = self.ln1(x)
        kv = h if c is None else self.ln_c(c)
        if rows is not None:
            x, h, mask = gather_positions(x, rows), gather_positions(h, rows), _mask_rows(mask, rows)
        x = x + self.drop(self.att(h, kv, mask))
        return x + self.ff(self.ln2(x))


class Transformer(nn.Module):
    """A stack of self-attention blocks with a final LayerNorm. ``(B, L, d)`` -> ``(B, L, d)``."""

    def __init__(self, d: int, layers: int, heads: int, dropout: float):
        super().__init__()
        self.blocks = nn.ModuleList(Block(d, heads, dropout) for _ in range(layers))
        self.ln = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, rows: torch.Tensor | None = None) -> torch.Tensor:
        """With ``rows`` ``(B, K)``: the outputs at those positions only, ``(B, K, d)``, the same values as
        gathering them from the full output; the last block runs its queries and feed-forward net at
        those positions alone (with K << L, as in evaluation, about a layer's worth of work less)."""
        last = len(self.blocks) - 1
        for i, blk in enumerate(self.blocks):
            x = blk(x, mask, rows=rows if i == last else None)
        if rows is not None and last < 0:
            x = gather_positions(x, rows)
        return self.ln(x)


class Positions(nn.Module):
    """Learned embeddings of positions counted back from a stream's newest event
    (:func:`~m3bsr.data.sequences.position_ids`; 0 = BOS and padding), at N(0, 0.02^2) like the item
    tables (at nn.Embedding's N(0, 1) positions would drown the items).

    Training records the furthest position back it met (``trained``). Evaluation reads a position
    further back than that (the oldest events of a history longer than every training row) as the
    furthest trained one, so no model ever reads an embedding that training never updated.
    """

    def __init__(self, d: int):
        super().__init__()
        self.table = nn.Embedding(MAX_POSITIONS, d)
        nn.init.normal_(self.table.weight, std=0.02)
        self.register_buffer("trained", torch.zeros((), dtype=torch.long))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Position ids ``(...)`` long -> ``(..., d)``."""
        if self.training:
            self.trained.copy_(torch.maximum(self.trained, ids.max()))
        else:
            ids = torch.where(self.trained > 0, ids.clamp(max=self.trained), ids)  # (never trained: as is)
        return self.table(ids)


def causal_mask(L: int, device=None) -> torch.Tensor:
    """``(L, L)`` True on and below the diagonal: position i sees positions j <= i."""
    return torch.ones(L, L, dtype=torch.bool, device=device).tril()


def window_mask(L1: int, window: int | None, device=None) -> torch.Tensor:
    """``(L1, L1)`` causal within a window: position i sees BOS (position 0) and the ``window``
    positions ``i - window < j <= i``, so a target read at i sees exactly its last ``window`` events.

    With ``L1 <= window + 1`` (an evaluation row) or ``window=None`` this is :func:`causal_mask`.
    """
    i = torch.arange(L1, device=device)
    back = i[:, None] - i[None, :]
    return (back >= 0) & ((back < (window or L1)) | (i[None, :] == 0))


def before_mask(q_times: torch.Tensor, k_times: torch.Tensor, window: int | None = None,
                segment: int | None = None) -> torch.Tensor:
    """Time-aware mask ``(B, Lq, Lk)``: a query at time tau sees keys strictly before tau.

    BOS keys are visible to every query (a BOS query included), so no row is empty; padded keys
    are never visible. With ``window``, a query sees only the last ``window`` of those keys in each
    stream of the keys (``segment`` positions each, BOS first; None: one stream).
    """
    k = k_times[:, None, :]
    real = (k < q_times[:, :, None]) & (k != TIME_BOS) & (k < TIME_PAD)
    if window is not None:
        B, Lq, Lk = real.shape
        seg = real.view(B, Lq, Lk // (segment or Lk), segment or Lk)
        newer = seg.flip(-1).cumsum(-1).flip(-1)  # visible keys at this position or later in its stream
        real = real & (newer <= window).view(B, Lq, Lk)
    return real | (k == TIME_BOS)


def gather_positions(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Pick per-target positions: x ``(B, L, d)``, idx ``(B, K)`` -> ``(B, K, d)``."""
    return x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))


def _mask_rows(mask: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor | None:
    """The query rows ``rows`` ``(B, K)`` of a mask ``(Lq, Lk)`` or ``(B, Lq, Lk)`` -> ``(B, K, Lk)``."""
    if mask is None:
        return None
    if mask.dim() == 2:
        return mask[rows]
    return mask.gather(1, rows[..., None].expand(-1, -1, mask.shape[-1]))


class FeatureProjection(nn.Module):
    """Frozen item features of one modality -> d. Items lacking the modality get a learned vector.

    features ``(N+1, D)`` and mask ``(N+1,)`` are buffers (not trained); ``forward(items)`` maps
    item ids of any shape to ``(..., d)``.
    """

    def __init__(self, features: torch.Tensor, mask: torch.Tensor, d: int):
        super().__init__()
        feats = features.float()
        valid = feats[mask]
        mu = valid.mean(0) if len(valid) else torch.zeros(feats.shape[1])
        sd = valid.std(0) + 1e-6 if len(valid) > 1 else torch.ones(feats.shape[1])
        self.register_buffer("features", torch.where(mask[:, None], (feats - mu) / sd, torch.zeros_like(feats)))
        self.register_buffer("mask", mask.bool())
        self.proj = nn.Linear(feats.shape[1], d)
        self.missing = nn.Parameter(torch.zeros(d))

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        h = self.proj(self.features[items])
        return torch.where(self.mask[items][..., None], h, self.missing.to(h.dtype))


def sinusoidal(t: torch.Tensor, d: int) -> torch.Tensor:
    """Sinusoidal embedding of integer steps ``t`` ``(...)`` -> ``(..., d)``."""
    half = d // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    ang = t.float()[..., None] * freqs
    return torch.cat([ang.sin(), ang.cos()], -1)
