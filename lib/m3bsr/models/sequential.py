"""Sequential baselines beyond SASRec: BERT4Rec, a behaviour-aware Transformer (MBT) and DiffuRec.

Each class says what it is, which hyperparameters come from its paper and where it departs from
it. All three score every item with the (tied) item embedding table; column 0 (padding) is -inf.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import MAX_POSITIONS, ConfigError, ModelConfig
from ..data.sequences import TIME_BOS, history_index, position_ids
from .base import DataInfo, Recommender
from .layers import Block, Positions, Transformer, gather_positions, sinusoidal, window_mask


class BERT4Rec(Recommender):
    """BERT4Rec (Sun et al., CIKM 2019): a bidirectional Transformer trained by the Cloze task.

    Input: the deep behaviour's sequence (positions 1..n of the stream, no BOS), item + learned
    position embeddings. Item ids: 0 = padding, 1..N = items, N+1 = [MASK].

    * Training (Cloze task): in each row, round(mask_ratio * n) (at least one) of its n events,
      chosen uniformly, are replaced by [MASK] (always [MASK]: the official code's mask_prob = 1)
      and predicted; with probability ``mask_last_prob`` a row instead masks only its last event
      (the paper's extra samples matching prediction; the official code makes 1 such copy per 10
      random-mask copies). Masks use torch's global RNG. The batch's ``targets`` are not used.
    * Prediction: the deep history strictly before the target (its L-1 most recent events at
      most, so every position was seen in training) followed by one [MASK]; the output at [MASK]
      scores the items.
    * Output: ``P(v) = softmax(GELU(h W_P + b_P) E^T + b_O)`` with E the input item table (tied)
      and a LayerNorm after the GELU as in the official code; CE over the real items only (never
      padding or [MASK]).

    From the paper / official code: mask proportion rho (``mask_ratio``, 0.2 as for ML-1m),
    mask-last samples, [MASK] appended at prediction, tied output with bias, GELU. From ``cfg``:
    d, layers, heads, dropout. Departure: pre-LN blocks (shared with SASRec) instead of BERT's
    post-LN.
    """

    mask_last_prob = 1 / 11  # official code: dupe_factor = 10 random-mask copies + 1 mask-last copy

    def __init__(self, cfg: ModelConfig, info: DataInfo):
        super().__init__(cfg, info)
        d = cfg.d
        del self.out  # prediction shares the item table
        self.mask_id = info.n_items + 1
        self.item = nn.Embedding(info.n_items + 2, d, padding_idx=0)
        self.pos = Positions(d)
        self.drop = nn.Dropout(cfg.dropout)
        self.encoder = Transformer(d, cfg.layers, cfg.heads, cfg.dropout)
        self.head = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.LayerNorm(d))  # W_P, b_P
        self.bias = nn.Parameter(torch.zeros(info.n_items + 1))  # b_O
        nn.init.normal_(self.item.weight, std=0.02)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Bidirectional encoding of ids ``x`` ``(B, W)`` (0 = padding) -> ``(B, W, d)``.

        Positions count back from the newest token (1 = newest); a token attends the tokens less
        than L positions away on either side (all of them in an evaluation input of L tokens)."""
        keys = x > 0
        n = keys.sum(-1, keepdim=True)
        j = torch.arange(x.shape[1], device=x.device)
        h = self.drop(self.item(x) + self.pos(torch.where(keys, n - j, 0)))
        window = self.info.window or x.shape[1]
        near = (j[:, None] - j[None, :]).abs() < window  # (W, W)
        keys = near & keys[:, None, :]
        keys = keys | ~keys.any(-1, keepdim=True)  # a query without keys attends anywhere (its output is unused)
        return self.encoder(h, keys)

    def item_scores(self, y: torch.Tensor) -> torch.Tensor:
        """``(..., d)`` -> ``(..., N+1)``: GELU transform, tied item table, output bias."""
        return self.head(y) @ self.item.weight[:self.n_items + 1].T + self.bias

    def mask_items(self, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cloze masking. items ``(B, L)`` (0 = padding) -> (inputs ``(B, L)``, labels ``(B, L)``, 0 = not masked)."""
        valid = items > 0
        n_mask = (valid.sum(-1, keepdim=True) * self.cfg.mask_ratio).round().clamp(min=1)
        r = torch.rand(items.shape, device=items.device).masked_fill(~valid, 2.0)
        masked = valid & (r.argsort(-1).argsort(-1) < n_mask)  # the n_mask valid events with the smallest r
        last = torch.arange(items.shape[1], device=items.device) == valid.sum(-1, keepdim=True) - 1
        masked = torch.where(torch.rand(len(items), 1, device=items.device) < self.mask_last_prob, last, masked)
        return items.masked_fill(masked, self.mask_id), items.masked_fill(~masked, 0)

    def loss(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        inputs, labels = self.mask_items(batch["items"][:, -1, 1:])
        h = self.encode(inputs)
        m = labels > 0
        ce = F.cross_entropy(self.logits(h[m]).float(), labels[m])
        return {"loss": ce, "ce": ce}

    def eval_input(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prediction input for each row's first target -> (x ``(B, L)``, position of [MASK] ``(B,)``).

        x = the last min(n, L-1) deep events with time < target time, then [MASK], then padding.
        """
        items, times = batch["items"][:, -1, 1:], batch["times"][:, -1, 1:]  # (B, L)
        L = items.shape[1]
        n = (times < batch["target_times"][:, :1]).sum(-1)  # the events before the target are a prefix
        shift = (n - (L - 1)).clamp(min=0)  # drop the oldest when the stream is full, to make room for [MASK]
        at = n - shift
        j = torch.arange(L, device=items.device)
        x = items.gather(1, (j + shift[:, None]).clamp(max=L - 1)).masked_fill(j >= at[:, None], 0)
        return x.scatter(1, at[:, None], self.mask_id), at

    def score(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        x, at = self.eval_input(batch)
        h = self.encode(x)
        return self.logits(h[torch.arange(len(x), device=x.device), at]).float()


class BehaviourBlock(nn.Module):
    """Pre-LN Transformer block whose attention logits get a learned per-head bias for each
    (query behaviour, key behaviour) pair: ``softmax(q k^T / sqrt(d_h) + B[h, b_q, b_k])``."""

    def __init__(self, d: int, heads: int, dropout: float, n_types: int):
        super().__init__()
        self.h, self.dropout = heads, dropout
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.pair = nn.Parameter(torch.zeros(heads, n_types, n_types))
        self.ff = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d), nn.Dropout(dropout))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, types: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """x ``(B, M, d)``, types ``(B, M, n_types)`` one-hot, allowed ``(B, 1, M, M)`` bool -> ``(B, M, d)``."""
        B, M, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, M, 3, self.h, d // self.h).permute(2, 0, 3, 1, 4)
        types = types[:, None].to(q.dtype)
        bias = types @ self.pair.to(q.dtype) @ types.transpose(-1, -2)  # (B, heads, M, M): pair[h, b_q, b_k]
        bias = bias.masked_fill(~allowed, float("-inf"))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias,
                                           dropout_p=self.dropout if self.training else 0.0)
        x = x + self.drop(self.proj(y.transpose(1, 2).reshape(B, M, d)))
        return x + self.ff(self.ln2(x))


class MBT(Recommender):
    """Behaviour-aware Transformer, MB-STR / PBAT style (a simplified multi-behaviour baseline).

    All levels are merged into one timeline per row (events sorted by time, ties by level,
    shallow first; padding last), BOS first. Input = item + behaviour-type + position
    embeddings; behaviour types are the S levels plus one BOS/padding type. Each block adds a
    learned per-head bias for every (query behaviour, key behaviour) pair to the attention logits
    (after the behaviour-pair-specific attention terms of MB-STR, Yuan et al., SIGIR 2022; PBAT,
    Su et al., ACM MM 2023, also models behaviour relations inside attention). Attention is causal over the merged
    timeline (each behaviour within a window of its last L events; positions counted back from the
    newest event) and trained left to right like SASRec: the output at the last merged event before a
    target (of any behaviour) predicts the target deep item, so every target of a row trains in one
    pass. Output: tied item embedding, CE over all items.

    Not a reproduction of either paper: MB-STR is bidirectional (Cloze training) with
    behaviour-specific projections and a behaviour-aware MMoE head, PBAT adds personalised
    behaviour patterns with distribution-based representations. From ``cfg``: d, layers, heads,
    dropout; no paper-specific hyperparameter.
    """

    def __init__(self, cfg: ModelConfig, info: DataInfo):
        super().__init__(cfg, info)
        d, S = cfg.d, info.n_levels
        del self.out  # prediction shares the item table
        self.item = nn.Embedding(info.n_items + 1, d, padding_idx=0)
        self.behaviour = nn.Embedding(S + 1, d)  # levels 0..S-1, S = BOS / padding
        self.pos = Positions(d)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(BehaviourBlock(d, cfg.heads, cfg.dropout, S + 1) for _ in range(cfg.layers))
        self.ln = nn.LayerNorm(d)
        for table in (self.item, self.behaviour):  # one scale (Positions' too), so no input drowns the others
            nn.init.normal_(table.weight, std=0.02)

    @staticmethod
    def merge(items: torch.Tensor, times: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-level streams ``(B, S, L+1)`` -> one timeline: items, times, behaviours ``(B, 1 + S*L)``.

        Position 0 is BOS (item 0, time TIME_BOS, behaviour S); events follow sorted by (time,
        level), stream order within a level; padding (item 0, behaviour S) comes last.
        """
        B, S, L1 = items.shape
        it, tm = items[:, :, 1:].reshape(B, -1), times[:, :, 1:].reshape(B, -1)
        lv = torch.arange(S, device=items.device).repeat_interleave(L1 - 1).expand(B, -1)
        rank = torch.unique(tm, return_inverse=True)[1]  # dense time rank keeps the composite key small
        order = (rank * S + lv).sort(stable=True).indices
        it, tm, lv = (x.gather(1, order) for x in (it, tm, lv))
        lv = lv.masked_fill(it == 0, S)
        first = torch.zeros(B, 1, dtype=torch.long, device=items.device)
        return (torch.cat([first, it], 1), torch.cat([first + TIME_BOS, tm], 1), torch.cat([first + S, lv], 1))

    def window_mask(self, bh: torch.Tensor) -> torch.Tensor:
        """Behaviours of a merged timeline ``(B, M)`` -> ``(B, M, M)``: slot i sees BOS and, of each
        behaviour, its last L events at slots j <= i (every slot j <= i in an evaluation row)."""
        B, M = bh.shape
        S = self.info.n_levels
        count = F.one_hot(bh, S + 1)[..., :S].cumsum(1)  # (B, M, S): events of each level at slots <= i
        level = bh.clamp(max=S - 1)  # BOS / padding: any level (BOS is always visible, padding never read)
        at_i = count.gather(2, level[:, None, :].expand(-1, M, -1))  # (B, i, j): count[i, level of j]
        at_j = count.gather(2, level[..., None])[..., 0]  # (B, j): count[j, level of j]
        j = torch.arange(M, device=bh.device)
        causal = j[None, :] <= j[:, None]
        return causal & ((at_i - at_j[:, None, :] < (self.info.window or M)) | (j == 0))

    def user_vectors(self, batch):
        it, tm, bh = self.merge(batch["items"], batch["times"])
        M = it.shape[1]
        if M > MAX_POSITIONS:
            raise ConfigError(f"MBT: a merged timeline of {M} slots exceeds MAX_POSITIONS={MAX_POSITIONS}")
        h = self.drop(self.item(it) + self.behaviour(bh) + self.pos(position_ids(tm)))
        allowed, types = self.window_mask(bh)[:, None], F.one_hot(bh, self.behaviour.num_embeddings)
        for blk in self.blocks:
            h = blk(h, types, allowed)
        h = self.ln(h)
        idx = (tm[:, None, 1:] < batch["target_times"][:, :, None]).sum(-1)  # (B, K): last merged event before
        return gather_positions(h, idx), {}

    def item_scores(self, y: torch.Tensor) -> torch.Tensor:
        return y @ self.item.weight.T


def diffurec_betas(name: str, T: int) -> torch.Tensor:
    """DiffuRec's named beta schedules ``(T,)`` float64 (its code: ``get_named_beta_schedule``).

    trunc_lin (DiffuRec's default): beta linear from 1000/T * 1e-4 + 0.01 to 1000/T * 0.02 + 0.01,
    and when that end exceeds 1 (T < 20), to 1000/T * 1e-3 + 0.01 instead.
    cosine: abar(s) = cos^2((s + 0.008) / 1.008 * pi / 2), beta_t = 1 - abar(t/T) / abar((t-1)/T) <= 0.999.
    """
    if name == "trunc_lin":
        scale = 1000 / T
        end = scale * 0.02 + 0.01
        if end > 1:
            end = scale * 0.001 + 0.01
        return torch.linspace(scale * 1e-4 + 0.01, end, T, dtype=torch.float64)
    if name == "cosine":
        s = torch.arange(T + 1, dtype=torch.float64) / T
        abar = torch.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
        return (1 - abar[1:] / abar[:-1]).clamp(max=0.999)
    raise ConfigError(f"unknown DiffuRec schedule {name!r}; expected trunc_lin or cosine")


class DiffuRec(Recommender):
    """DiffuRec (Li, Sun & Li, TOIS 2023): the target item embedding is diffused and denoised.

    #### Forward process, training
    x0 = E[target] (the item embedding), t ~ U{1..T}, eps ~ N(0, I):
    ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``.

    #### Approximator (x0-prediction)
    DiffuRec adds ``lambda * (x_t + e(t))`` to every history representation, lambda ~ N(delta, delta)
    elementwise, and reads x0_hat at the last position of a Transformer. Here all targets of a
    row train in one pass, as in SASRec: a causal Transformer encodes the deep history once
    (z_i = LayerNorm(Dropout(E[s_i])), no position embedding, as in the official code; BOS at
    position 0; every attention within a window of the last L events), and for target k the query
    ``h_{idx_k} + lambda * (x_t + e(t))`` at its history position idx_k attends to BOS and its last
    L history states ``h_{idx_k-L+1}..h_{idx_k}`` in one denoising block:
    ``x0_hat = LayerNorm(Dropout(Block(query, h_{<=idx_k})))``. e(t) = MLP(sinusoidal(t * 1000 / T)).
    With delta = 0.001 the noised target enters at about a thousandth of the history state's
    scale, as in the official code.

    #### Objective
    ``CE(softmax(x0_hat E^T), target)`` over all real items (DiffuRec's ``loss_diffu_ce``).

    #### Reverse process, prediction
    x_T ~ N(0, I) from a ``torch.Generator`` seeded with ``sample_seed`` at every call (drawn for the
    whole batch, so a row's scores depend slightly on the rows scored with it), then for
    the strided steps t > s (``inference_steps`` of T; None or more than T: all) the posterior mean
    ``x_s = mu(x_t, x0_hat)`` of ``q(x_s | x_t, x0)``; with ``eval_mode="stochastic"`` the posterior
    std times noise from the same generator is added (s > 0; DiffuRec's own sampler adds noise,
    with variance beta_t). At prediction lambda = delta (its mean). Scores = x0_hat E^T at the
    last step. The history is encoded once per call.

    From the paper / official code: T (``diffurec_T``, 32), truncated-linear schedule
    (``diffurec_schedule``: trunc_lin, or cosine for DiffuRec's cosine; ``schedule`` is M3BSR's),
    delta = 0.001 (``delta``), x0-prediction, CE objective, tied scoring. From ``cfg``: d, layers,
    heads, dropout (also for DiffuRec's separate embedding dropout). Departures: uniform t (the
    official code defaults to a loss-aware sampler); the one-pass causal approximator above;
    padding never scored; the item table starts at N(0, 0.02^2) like SASRec's here, not at
    PyTorch's N(0, 1) that the official code keeps: with N(0, 1) logits start at scale sqrt(d),
    and on the synthetic ``default`` profile valid NDCG@10 after 20 epochs was 0.02 against 0.20.
    """

    delta = 0.001  # lambda ~ N(delta, delta): DiffuRec's uncertainty weight (official default)
    sample_seed = 0  # seed of the reverse process' generator

    def __init__(self, cfg: ModelConfig, info: DataInfo):
        super().__init__(cfg, info)
        if cfg.eval_mode not in ("deterministic", "stochastic"):
            raise ConfigError(f"DiffuRec supports eval_mode deterministic or stochastic, not {cfg.eval_mode!r}")
        d, T = cfg.d, cfg.diffurec_T
        del self.out  # prediction shares the item table
        self.T = T
        self.item = nn.Embedding(info.n_items + 1, d, padding_idx=0)
        self.bos = nn.Parameter(torch.randn(d) * 0.02)
        self.drop = nn.Dropout(cfg.dropout)
        self.emb_ln = nn.LayerNorm(d)
        self.encoder = Transformer(d, cfg.layers, cfg.heads, cfg.dropout)
        self.t_embed = nn.Sequential(nn.Linear(d, 4 * d), nn.SiLU(), nn.Linear(4 * d, d))
        self.denoiser = Block(d, cfg.heads, cfg.dropout)
        self.out_ln = nn.LayerNorm(d)
        nn.init.normal_(self.item.weight, std=0.02)
        abar = torch.cumprod(1 - diffurec_betas(cfg.diffurec_schedule, T), 0)
        self.register_buffer("abar", torch.cat([torch.ones(1, dtype=torch.float64), abar]).float())  # abar_0 = 1
        n = min(cfg.inference_steps or T, T)
        self.steps = torch.linspace(T, 1, n).add(0.5).floor().long().tolist()  # descending, e.g. T..1

    def encode(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Deep history -> causal states h ``(B, L+1, d)`` and each target's history position idx ``(B, K)``."""
        items = batch["items"][:, -1]
        B, L1 = items.shape
        z = self.item(items)
        z = self.emb_ln(self.drop(torch.cat([self.bos.expand(B, 1, -1).to(z.dtype), z[:, 1:]], 1)))
        h = self.encoder(z, window_mask(L1, self.info.window, z.device))
        return h, history_index(batch["times"][:, -1:], batch["target_times"])[:, 0]

    def denoise(self, h: torch.Tensor, idx: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x0_hat = f(h_{<=idx}, x_t, t).

        h ``(B, L+1, d)``, idx ``(B, K)``, x_t ``(B, K, d)``, t ``(B, K)`` -> ``(B, K, d)``.
        """
        c = x_t + self.t_embed(sinusoidal(t * (1000 / self.T), x_t.shape[-1]))  # x_t + e(t)
        lam = torch.normal(self.delta, self.delta, c.shape, device=c.device) if self.training else self.delta
        q = gather_positions(h, idx) + lam * c
        j = torch.arange(h.shape[1], device=h.device)
        back = idx[..., None] - j  # (B, K, L+1): how far before the query each position lies
        visible = (back >= 0) & ((back < (self.info.window or h.shape[1])) | (j == 0))  # the last L, and BOS
        return self.out_ln(self.drop(self.denoiser(q, visible, h)))

    def item_scores(self, y: torch.Tensor) -> torch.Tensor:
        return y @ self.item.weight.T

    def loss(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        h, idx = self.encode(batch)
        targets = batch["targets"]
        x0 = self.item(targets)  # (B, K, d)
        t = torch.randint(1, self.T + 1, targets.shape, device=targets.device)
        ab = self.abar[t][..., None]
        x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * torch.randn_like(x0)  # q(x_t | x0)
        x0_hat = self.denoise(h, idx, x_t, t)
        valid = targets > 0
        ce = F.cross_entropy(self.logits(x0_hat[valid]).float(), targets[valid])
        return {"loss": ce, "ce": ce}

    def score(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        h, idx = self.encode(batch)
        idx = idx[:, :1]  # (B, 1): the first target
        gen = torch.Generator(device=h.device).manual_seed(self.sample_seed)
        x = torch.randn(len(h), 1, h.shape[-1], generator=gen, device=h.device, dtype=h.dtype)  # x_T
        for t, s in zip(self.steps, self.steps[1:] + [0]):
            x0_hat = self.denoise(h, idx, x, torch.full_like(idx, t))
            ab_t, ab_s = self.abar[t], self.abar[s]
            beta = 1 - ab_t / ab_s  # beta_{t|s}
            # posterior q(x_s | x_t, x0) has mean
            # (sqrt(abar_s) beta x0 + sqrt(1 - beta) (1 - abar_s) x_t) / (1 - abar_t)
            x = (ab_s.sqrt() * beta * x0_hat + (1 - beta).sqrt() * (1 - ab_s) * x) / (1 - ab_t)
            if self.cfg.eval_mode == "stochastic" and s > 0:
                var = beta * (1 - ab_s) / (1 - ab_t)
                x = x + var.sqrt() * torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
        return self.logits(x[:, 0]).float()  # at s = 0 the mean is x0_hat
