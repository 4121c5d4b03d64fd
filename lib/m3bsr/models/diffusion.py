"""Conditional diffusion on embedding sequences (M3BSR, docs/method.md sections 1 and 2).

Read top to bottom: the noise schedules, the one-step forward (noising) and reverse (denoising)
updates, the CI noise predictor (a cross-attention from the noisy stream to the condition), and
:class:`ConditionalChain`, the iterative T-step chain that CDMD and CDBD both run:

.. code-block:: text

    h_0 = input
    for t = 1..T:
        eps    ~ N(0, I)                                             (eval default: eps = 0)
        h~_t   = sqrt(a_t) h_{t-1} + sqrt(1 - a_t) eps                  forward step q
        eps^_t = CI(h~_t, h^c)                                          noise predictor
        h-_t   = (h~_t - (1 - a_t) / sqrt(1 - abar_t) eps^_t) / sqrt(a_t)   reverse step p
        L     += || h~_t - h-_t ||^2       (flag diffusion_loss="eps": || eps - eps^_t ||^2)
        h_t    = h-_t
    output h_T

Symbols: ``a_t`` (alpha_t) and ``abar_t`` (alpha-bar_t = prod_{s<=t} a_s). Schedules are computed in
float64 and stored as float32 buffers; the per-step coefficients are plain Python floats computed once
from the float64 values, so the chain does no host-device traffic.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import CHOICES, ConfigError, ModelConfig
from .layers import sinusoidal

# ---------------------------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------------------------


def cosine_schedule(T: int) -> torch.Tensor:
    """``abar_t = cos^2(0.9 * (pi / 2) * t / T)`` for t = 0..T (float64, ``(T+1,)``; abar_0 = 1).

    The 0.9 keeps abar_T = cos^2(0.45 pi) ~ 0.024 away from 0 (as in the sibling Diff-MSIN code).
    """
    t = torch.arange(T + 1, dtype=torch.float64)
    return torch.cos(0.9 * (math.pi / 2) * t / T) ** 2


def linear_schedule(T: int) -> torch.Tensor:
    """DDPM's linear ``beta_t`` from 1e-4 to 0.02; ``abar_t = prod_{s<=t} (1 - beta_s)``, t = 0..T."""
    betas = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
    return torch.cat([torch.ones(1, dtype=torch.float64), torch.cumprod(1 - betas, 0)])


SCHEDULES = {"cosine": cosine_schedule, "linear": linear_schedule}


class Schedule(nn.Module):
    """``a_t = abar_t / abar_{t-1}`` and ``abar_t`` for t = 1..T.

    Buffers ``alphas`` and ``alphas_cumprod`` ``(T,)`` (float32; index t-1 holds step t) are
    non-persistent: they follow from the config, so checkpoints stay free of them.
    """

    def __init__(self, T: int, name: str = "cosine"):
        super().__init__()
        if T < 1:
            raise ConfigError(f"diffusion needs T >= 1, got {T}")
        if name not in SCHEDULES:
            raise ConfigError(f"unknown schedule {name!r}; expected one of {sorted(SCHEDULES)}")
        self.T = T
        abar = SCHEDULES[name](T)  # float64 (T+1,), abar[0] = 1
        self._abar = abar.tolist()  # float64 values for the per-step coefficients
        self.register_buffer("alphas", (abar[1:] / abar[:-1]).float(), persistent=False)
        self.register_buffer("alphas_cumprod", abar[1:].float(), persistent=False)

    def grid(self, n: int | None = None) -> list[int]:
        """The timesteps one chain visits: all of 1..T, or ``n`` <= T strided ones ending at T.

        ``t_i = round(i * T / n)`` for i = 1..n (distinct because T / n >= 1).
        """
        n = self.T if n is None else n
        if not 1 <= n <= self.T:
            raise ConfigError(f"inference_steps must be in 1..T={self.T}, got {n}")
        return [round(i * self.T / n) for i in range(1, n + 1)]

    def steps(self, n: int | None = None) -> list[tuple[int, float, float]]:
        """``(t, a_eff, abar_t)`` per visited step.

        A strided step from t' to t composes the skipped ones: ``a_eff = abar_t / abar_t'``
        (= a_t when nothing is skipped), so the strided chain keeps the same abar_t at each
        visited t and the forward noise of the skipped steps is drawn in one go.
        """
        out, prev = [], 0
        for t in self.grid(n):
            out.append((t, self._abar[t] / self._abar[prev], self._abar[t]))
            prev = t
        return out


# ---------------------------------------------------------------------------------------------
# One forward step and one reverse step
# ---------------------------------------------------------------------------------------------


def q_step(h_prev: torch.Tensor, a_t: float, eps: torch.Tensor | None, scaled: bool = False) -> torch.Tensor:
    """Forward (noising) step ``h~_t = sqrt(a_t) h_{t-1} + sqrt(1 - a_t) eps``.

    ``eps = None`` means eps = 0 (the deterministic evaluation mode); ``scaled=True``: ``eps`` already
    holds ``sqrt(1 - a_t) eps`` (drawn that way in one kernel).
    """
    if eps is None:
        return h_prev * math.sqrt(a_t)
    return torch.add(eps if scaled else eps * math.sqrt(1 - a_t), h_prev, alpha=math.sqrt(a_t))


def p_step(h_noisy: torch.Tensor, eps_hat: torch.Tensor, a_t: float, abar_t: float) -> torch.Tensor:
    """Reverse (denoising) step ``h-_t = (h~_t - (1 - a_t) / sqrt(1 - abar_t) eps^_t) / sqrt(a_t)``."""
    c = (1 - a_t) / math.sqrt(1 - abar_t)
    return torch.add(h_noisy * (1 / math.sqrt(a_t)), eps_hat, alpha=-c / math.sqrt(a_t))


# ---------------------------------------------------------------------------------------------
# The CI noise predictor
# ---------------------------------------------------------------------------------------------


class NoisePredictor(nn.Module):
    """``eps^_t = CI(h~_t, h^c)``: cross-attention with Q = noisy stream, K = V = condition.

    ``u = LN_q(h~_t) [+ W_t sinusoidal(t)]``; ``eps^_t = u + W_o MHA(W_q u, W_k LN_c(h^c), W_v LN_c(h^c))``.

    * The LayerNorms keep the attention logits in range whatever the noise level.
    * The residual ``u`` lets the prediction depend on the noisy input itself: a pure
      cross-attention output is a mix of condition values and could not tell what noise this
      particular h~_t carries (needed by ``diffusion_loss="eps"``; at high noise LN(h~_t) is
      itself a fair guess of eps). An identity, not a learned W_x, to save a matmul per step.
    * No dropout: the chain already injects noise, and dropout on eps^ is amplified by 1/sqrt(a_t).
    * The condition's keys/values do not change along the chain: :meth:`condition` computes them
      once and every step reuses them.
    """

    def __init__(self, d: int, heads: int, time_embedding: bool = False):
        super().__init__()
        if d % heads:
            raise ConfigError(f"d={d} must be divisible by heads={heads}")
        self.h = heads
        self.ln_q, self.ln_c = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q = nn.Linear(d, d)
        self.kv = nn.Linear(d, 2 * d)
        self.o = nn.Linear(d, d)
        self.t_proj = nn.Linear(d, d) if time_embedding else None

    def condition(self, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Condition ``(N, Lc, d)`` -> keys and values ``(N, heads, Lc, d/heads)`` each."""
        N, Lc, d = c.shape
        k, v = self.kv(self.ln_c(c)).view(N, Lc, 2, self.h, d // self.h).permute(2, 0, 3, 1, 4)
        return k, v

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None = None,
                causal: bool = False, t: int | None = None, return_weights: bool = False):
        """Noisy stream ``x`` ``(N, Lq, d)`` -> eps^ ``(N, Lq, d)`` (and the attention weights
        ``(N, heads, Lq, Lc)`` when ``return_weights``).

        ``mask`` (bool, True = may attend) broadcasts to ``(N, Lq, Lc)``; ``causal=True`` instead
        lets query i see condition positions j <= i (square streams only).
        """
        N, Lq, d = x.shape
        u = self.ln_q(x)
        if self.t_proj is not None:
            u = u + self.t_proj(sinusoidal(torch.full((), t, device=x.device), d).to(u.dtype)).to(u.dtype)
        q = self.q(u).view(N, Lq, self.h, d // self.h).transpose(1, 2)
        k, v = kv
        if mask is not None and mask.dim() == 3:
            mask = mask[:, None]
        if return_weights:  # explicit path, for the notebooks' attention maps
            if causal:
                mask = torch.ones(Lq, k.shape[2], dtype=torch.bool, device=x.device).tril()
            att = (q @ k.transpose(-1, -2)) / math.sqrt(d // self.h)
            if mask is not None:
                att = att.masked_fill(~mask, float("-inf"))
            w = att.softmax(-1)
            y = (w @ v).transpose(1, 2).reshape(N, Lq, d)
            return u + self.o(y), w
        if causal:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return u + self.o(y.transpose(1, 2).reshape(N, Lq, d))


# ---------------------------------------------------------------------------------------------
# The iterative conditional chain
# ---------------------------------------------------------------------------------------------


class ChainOutput(NamedTuple):
    out: torch.Tensor  # h_T, same shape as the input
    loss: torch.Tensor | None  # float32 scalar in training, None in eval
    states: list[torch.Tensor] | None  # [h_0, h_1, ..., h_n] (detached), with return_states
    weights: list[torch.Tensor] | None  # per step (N, heads, Lq, Lc) attention weights, with return_states


class ConditionalChain(nn.Module):
    """The T-step conditional denoising chain of docs/method.md section 1 with its own noise predictor.

    Config fields used: ``T``, ``schedule``, ``inference_steps`` (eval only, strided, <= T),
    ``eval_mode`` (deterministic: eps = 0 | stochastic: eps from a generator seeded with ``seed``
    at every call, so a checkpoint scores identically twice | skip: identity), ``diffusion_loss``
    (paper: ``||h~_t - h-_t||^2`` | eps: ``||eps - eps^_t||^2``), ``time_embedding``, ``heads``.

    The loss of one step is the mean squared error over d, averaged over the valid positions
    (``weight``); the chain's loss sums the steps (``L += ...`` as in the paper).
    """

    def __init__(self, cfg: ModelConfig, d: int, seed: int = 0):
        super().__init__()
        for key in ("eval_mode", "diffusion_loss"):
            if getattr(cfg, key) not in CHOICES[key]:
                raise ConfigError(f"config field {key!r} must be one of {CHOICES[key]}, got {getattr(cfg, key)!r}")
        self.schedule = Schedule(cfg.T, cfg.schedule)
        self.schedule.grid(cfg.inference_steps)  # validates inference_steps <= T now, not at eval
        self.predictor = NoisePredictor(d, cfg.heads, cfg.time_embedding)
        self.eval_mode, self.loss_kind = cfg.eval_mode, cfg.diffusion_loss
        self.inference_steps, self.seed = cfg.inference_steps, seed

    def forward(self, x: torch.Tensor, cond: torch.Tensor, mask: torch.Tensor | None = None,
                causal: bool = False, weight: torch.Tensor | None = None,
                return_states: bool = False) -> ChainOutput:
        """Denoise ``x`` ``(N, Lq, d)`` conditioned on ``cond`` ``(N, Lc, d)``.

        ``mask``/``causal``: what each query position may see of the condition (see
        :class:`NoisePredictor`). ``weight`` ``(N, Lq)``: per-position loss weights, e.g.
        ``valid / valid.sum()`` to average over the non-padding positions (None: plain mean).
        """
        if not self.training and self.eval_mode == "skip":
            return ChainOutput(x, None, [x.detach()] if return_states else None, [] if return_states else None)
        steps = self.schedule.steps(None if self.training else self.inference_steps)
        gen = None
        if not self.training and self.eval_mode == "stochastic":
            gen = torch.Generator(device=x.device).manual_seed(self.seed)
        noisy = self.training or gen is not None
        kv = self.predictor.condition(cond)
        loss = x.new_zeros((), dtype=torch.float32) if self.training else None
        states = [x.detach()] if return_states else None
        weights = [] if return_states else None
        h = x
        for t, a_t, abar_t in steps:
            # eps ~ N(0, I), drawn as noise = sqrt(1 - a_t) eps ~ N(0, (1 - a_t) I)
            noise = None
            if noisy:
                noise = torch.normal(0.0, math.sqrt(1 - a_t), h.shape, generator=gen, device=h.device, dtype=h.dtype)
            # h~_t = sqrt(a_t) h_{t-1} + sqrt(1 - a_t) eps
            h_noisy = q_step(h, a_t, noise, scaled=True)
            # eps^_t = CI(h~_t, h^c)
            eps_hat = self.predictor(h_noisy, kv, mask, causal, t, return_weights=return_states)
            if return_states:
                eps_hat, w = eps_hat
                weights.append(w.detach())
            # h-_t = (h~_t - (1 - a_t) / sqrt(1 - abar_t) eps^_t) / sqrt(a_t)
            h_den = p_step(h_noisy, eps_hat, a_t, abar_t)
            if self.training:
                # L += ||h~_t - h-_t||^2   (or ||eps - eps^_t||^2), in float32
                diff = h_noisy - h_den if self.loss_kind == "paper" else noise / math.sqrt(1 - a_t) - eps_hat
                loss = loss + _weighted_mse(diff, weight)
            # h_t = h-_t
            h = h_den
            if return_states:
                states.append(h.detach())
        return ChainOutput(h, loss, states, weights)


def _weighted_mse(diff: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """``sum_l weight_l * mean_d diff_{l,d}^2`` in float32 (plain mean when weight is None)."""
    sq = torch.linalg.vector_norm(diff, dim=-1, dtype=torch.float32) ** 2 / diff.shape[-1]
    return sq.mean() if weight is None else (sq * weight).sum()
