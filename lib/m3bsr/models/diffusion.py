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

Training modes (``train_mode``; how each one evaluates: :class:`ConditionalChain`):

.. code-block:: text

    chain     the loop above over t = 1..T (the paper)
    strided   the same loop over n = train_steps strided steps t_i = round(i T / n), a_t -> abar_t_i / abar_t_{i-1}
    random_t  DDPM: per position t ~ U{1..T}, eps ~ N(0, I)
              h_t    = sqrt(abar_t) h_0 + sqrt(1 - abar_t) eps                  closed form of q(h_t | h_0)
              eps^   = CI(h_t, h^c, t)                                          one call, t-embedding on
              L      = || eps - eps^ ||^2
              output h^_0 = (h_t - sqrt(1 - abar_t) eps^) / sqrt(abar_t)        the x0 estimate

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
    non-persistent: they follow from the config, so checkpoints stay free of them. ``abar``: the
    float64 values as Python floats, ``abar[t]`` for t = 0..T (``abar[0] = 1``).
    """

    def __init__(self, T: int, name: str = "cosine"):
        super().__init__()
        if T < 1:
            raise ConfigError(f"diffusion needs T >= 1, got {T}")
        if name not in SCHEDULES:
            raise ConfigError(f"unknown schedule {name!r}; expected one of {sorted(SCHEDULES)}")
        self.T = T
        abar = SCHEDULES[name](T)  # float64 (T+1,), abar[0] = 1
        self.abar = abar.tolist()  # float64 values for the per-step coefficients, abar[t] for t = 0..T
        self.register_buffer("alphas", (abar[1:] / abar[:-1]).float(), persistent=False)
        self.register_buffer("alphas_cumprod", abar[1:].float(), persistent=False)

    def grid(self, n: int | None = None, end: int | None = None) -> list[int]:
        """The timesteps one chain visits: all of 1..end, or ``n`` <= end strided ones ending at end
        (``end``: T unless given).

        ``t_i = round(i * end / n)`` for i = 1..n (distinct because end / n >= 1).
        """
        end = self.T if end is None else end
        n = end if n is None else n
        if not 1 <= n <= end <= self.T:
            raise ConfigError(f"a chain of n steps ending at t={end} needs 1 <= n <= {end} <= T={self.T}, got n={n}")
        return [round(i * end / n) for i in range(1, n + 1)]

    def steps(self, n: int | None = None) -> list[tuple[int, float, float]]:
        """``(t, a_eff, abar_t)`` per visited step.

        A strided step from t' to t composes the skipped ones: ``a_eff = abar_t / abar_t'``
        (= a_t when nothing is skipped), so the strided chain keeps the same abar_t at each
        visited t and the forward noise of the skipped steps is drawn in one go.
        """
        out, prev = [], 0
        for t in self.grid(n):
            out.append((t, self.abar[t] / self.abar[prev], self.abar[t]))
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
# Closed forms of train_mode="random_t" (DDPM training, DDIM evaluation)
# ---------------------------------------------------------------------------------------------
# ``abar_t`` is a float or a tensor broadcasting to ``h`` (one t per position, ``(N, L, 1)``).


def q_sample(h0: torch.Tensor, abar_t: float | torch.Tensor, eps: torch.Tensor | None) -> torch.Tensor:
    """Sample from ``q(h_t | h_0)``: ``h_t = sqrt(abar_t) h_0 + sqrt(1 - abar_t) eps``.

    The T forward steps composed (``prod_s a_s = abar_t``, the variances add up to 1 - abar_t) in
    one draw; ``eps = None``: the mean ``sqrt(abar_t) h_0``.
    """
    mean = abar_t ** 0.5 * h0
    return mean if eps is None else mean + (1 - abar_t) ** 0.5 * eps


def x0_estimate(h_t: torch.Tensor, eps_hat: torch.Tensor, abar_t: float | torch.Tensor) -> torch.Tensor:
    """``h^_0 = (h_t - sqrt(1 - abar_t) eps^) / sqrt(abar_t)``: q_sample solved for h_0 with eps^ for eps."""
    return (h_t - (1 - abar_t) ** 0.5 * eps_hat) / abar_t ** 0.5


def ddim_step(h_t: torch.Tensor, eps_hat: torch.Tensor, abar_t: float, abar_s: float) -> torch.Tensor:
    """Deterministic DDIM step from t down to s < t: ``h_s = sqrt(abar_s) h^_0 + sqrt(1 - abar_s) eps^``
    (``abar_0 = 1``: the last step returns the x0 estimate)."""
    return q_sample(x0_estimate(h_t, eps_hat, abar_t), abar_s, eps_hat)


# ---------------------------------------------------------------------------------------------
# The CI noise predictor
# ---------------------------------------------------------------------------------------------


class NoisePredictor(nn.Module):
    """``eps^_t = CI(h~_t, h^c)``: cross-attention with Q = noisy stream, K = V = condition.

    ``u = LN_q(h~_t) [+ W_t sinusoidal(t)]``; ``eps^_t = [u +] W_o MHA(W_q u, W_k LN_c(h^c), W_v LN_c(h^c))``.

    * The LayerNorms keep the attention logits in range whatever the noise level.
    * The residual ``u`` (``residual=True``, config ``predictor_residual``) lets the prediction
      depend on the noisy input itself: a pure cross-attention output is a mix of condition values
      and could not tell what noise this particular h~_t carries (needed by ``diffusion_loss="eps"``;
      at high noise LN(h~_t) is itself a fair guess of eps). An identity, not a learned W_x, to save
      a matmul per step. Its cost: at low noise LN(h~_t) is mostly signal, so eps^ starts biased
      towards the signal itself; ``residual=False`` keeps the attention output alone (the input
      then only steers the attention weights through the query).
    * No dropout: the chain already injects noise, and dropout on eps^ is amplified by 1/sqrt(a_t).
    * The condition's keys/values do not change along the chain: :meth:`condition` computes them
      once and every step reuses them.
    """

    def __init__(self, d: int, heads: int, time_embedding: bool = False, residual: bool = True):
        super().__init__()
        if d % heads:
            raise ConfigError(f"d={d} must be divisible by heads={heads}")
        self.h, self.residual = heads, residual
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
                causal: bool = False, t: int | torch.Tensor | None = None, return_weights: bool = False):
        """Noisy stream ``x`` ``(N, Lq, d)`` -> eps^ ``(N, Lq, d)`` (and the attention weights
        ``(N, heads, Lq, Lc)`` when ``return_weights``).

        ``mask`` (bool, True = may attend) broadcasts to ``(N, Lq, Lc)``; ``causal=True`` instead
        lets query i see condition positions j <= i (square streams only). ``t``: the step, one int
        for the whole stream or an integer tensor ``(N, Lq)`` (one per position); read only with
        a time embedding.
        """
        N, Lq, d = x.shape
        u = self.ln_q(x)
        if self.t_proj is not None:
            t = t if torch.is_tensor(t) else torch.full((), t, device=x.device)
            u = u + self.t_proj(sinusoidal(t, d).to(u.dtype)).to(u.dtype)
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
            y = self.o((w @ v).transpose(1, 2).reshape(N, Lq, d))
            return (u + y if self.residual else y), w
        if causal:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = self.o(y.transpose(1, 2).reshape(N, Lq, d))
        return u + y if self.residual else y


# ---------------------------------------------------------------------------------------------
# The iterative conditional chain
# ---------------------------------------------------------------------------------------------


class ChainOutput(NamedTuple):
    out: torch.Tensor  # h_n (random_t: the x0 estimate h^_0), same shape as the input: what the experts read
    loss: torch.Tensor | None  # float32 scalar in training, None in eval
    states: list[torch.Tensor] | None  # [h_0, h_1, ..., h_n] (detached; h_n = out), with return_states
    weights: list[torch.Tensor] | None  # per predictor call (N, heads, Lq, Lc) attention weights, with return_states


class ConditionalChain(nn.Module):
    """The conditional denoising chain of docs/method.md section 1 with its own noise predictor.

    Config fields used: ``T``, ``schedule``, ``train_mode``, ``train_steps``, ``inference_steps``,
    ``random_t_eval_from``, ``eval_mode``, ``diffusion_loss``, ``time_embedding``,
    ``predictor_residual``, ``heads``.

    Training, by ``train_mode``:

    * ``chain`` (the paper): the loop of the module docstring over t = 1..T. The loss of one step is
      the mean squared error over d, averaged over the valid positions (``weight``); the chain's
      loss sums the steps (``L += ...`` as in the paper); ``diffusion_loss`` picks the paper's or eps.
    * ``strided``: the same loop over n = ``train_steps`` strided steps (None: round(T / 3), at least
      1), the grid of few-step inference (:meth:`Schedule.steps`): n predictor calls instead of T.
    * ``random_t``: DDPM on the observed stream h_0. Each position draws its own t ~ U{1..T} and eps;
      one predictor call on h_t ~ q(h_t | h_0); the loss ``||eps - eps^||^2`` whatever
      ``diffusion_loss`` says (the paper's loss compares the two ends of one chain step, which a
      closed-form draw does not have); the output is the x0 estimate h^_0, so the experts read it and
      the recommendation loss trains the predictor too. The predictor always gets the time
      embedding, whatever ``time_embedding`` says: one call at an unknown noise level cannot know
      how much of its input is noise.

    Evaluation, by ``eval_mode`` (deterministic: eps = 0 | stochastic: eps from a generator seeded
    with ``seed`` at every call, so a checkpoint scores identically twice | skip: identity):

    * ``chain`` / ``strided``: the loop over ``inference_steps`` strided steps (None: the training
      chain's, T or n).
    * ``random_t``: the chain trained h_0 as the x0 of a DDPM, so it evaluates as one: start at
      t* = ``random_t_eval_from`` (None: round(T / 3), at least 1) from h_{t*} = sqrt(abar_{t*}) h_0
      (the mean of q(h_{t*} | h_0), eps = 0; stochastic: a seeded draw), then ``inference_steps``
      deterministic DDIM steps t_i = round(i t* / n) down to 0 (None: 1, the single-call x0 estimate
      ``h_0 - sqrt((1 - abar_{t*}) / abar_{t*}) eps^`` the experts were trained on). t* says how
      much noise the observed stream is taken to carry: the larger, the further the output moves
      towards what the condition predicts. But the start holds none of the noise the predictor was
      trained to remove at t*, so a large t* asks it to remove noise that is not there, and t* = 1
      barely moves (linear schedule: by 1 % of eps^). T / 3 lies between (validation and
      planted-truth numbers: docs/choices.md).
    """

    def __init__(self, cfg: ModelConfig, d: int, seed: int = 0):
        super().__init__()
        for key in ("eval_mode", "diffusion_loss", "train_mode"):
            if getattr(cfg, key) not in CHOICES[key]:
                raise ConfigError(f"config field {key!r} must be one of {CHOICES[key]}, got {getattr(cfg, key)!r}")
        for key, mode in (("train_steps", "strided"), ("random_t_eval_from", "random_t")):
            if getattr(cfg, key) is not None and cfg.train_mode != mode:
                raise ConfigError(f"config field {key!r} is read by train_mode={mode!r} only, "
                                  f"got train_mode={cfg.train_mode!r}")
        self.schedule = Schedule(cfg.T, cfg.schedule)
        T, self.train_mode = cfg.T, cfg.train_mode
        self.train_steps = None  # steps of the training loop (None: T; random_t: unused)
        if cfg.train_mode == "strided":
            self.train_steps = cfg.train_steps if cfg.train_steps is not None else max(1, round(T / 3))
        self.eval_from = T  # where the evaluation grid ends (random_t: where it starts, t*)
        if cfg.train_mode == "random_t":
            self.eval_from = cfg.random_t_eval_from if cfg.random_t_eval_from is not None else max(1, round(T / 3))
        self.inference_steps = cfg.inference_steps
        if self.inference_steps is None:
            self.inference_steps = {"chain": None, "strided": self.train_steps, "random_t": 1}[cfg.train_mode]
        for key, n, end, bound in (("train_steps", self.train_steps, T, "T"),
                                   ("random_t_eval_from", self.eval_from, T, "T"),
                                   ("inference_steps", self.inference_steps, self.eval_from,
                                    "random_t_eval_from" if cfg.train_mode == "random_t" else "T")):
            if n is not None and not 1 <= n <= end:  # checked now, not at the first evaluation
                raise ConfigError(f"config field {key!r} must be in 1..{bound}={end}, got {n}")
        self.predictor = NoisePredictor(d, cfg.heads, cfg.time_embedding or cfg.train_mode == "random_t",
                                        cfg.predictor_residual)
        self.eval_mode, self.loss_kind, self.seed = cfg.eval_mode, cfg.diffusion_loss, seed

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
        gen = None
        if not self.training and self.eval_mode == "stochastic":
            gen = torch.Generator(device=x.device).manual_seed(self.seed)
        kv = self.predictor.condition(cond)
        if self.train_mode != "random_t":
            return self._chain(x, kv, mask, causal, weight, return_states, gen)
        if self.training:
            return self._ddpm(x, kv, mask, causal, weight, return_states)
        return self._ddim(x, kv, mask, causal, return_states, gen)

    def _chain(self, x, kv, mask, causal, weight, return_states, gen) -> ChainOutput:
        """train_mode chain / strided: the iterative loop of the module docstring."""
        steps = self.schedule.steps(self.train_steps if self.training else self.inference_steps)
        noisy = self.training or gen is not None
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

    def _ddpm(self, x, kv, mask, causal, weight, return_states) -> ChainOutput:
        """train_mode random_t, training: one predictor call at a random t per position."""
        # t ~ U{1..T} and eps ~ N(0, I), per position
        t = torch.randint(1, self.schedule.T + 1, x.shape[:-1], device=x.device)  # (N, Lq)
        abar_t = self.schedule.alphas_cumprod[t - 1].unsqueeze(-1).to(x.dtype)  # (N, Lq, 1)
        eps = torch.randn_like(x)
        # h_t = sqrt(abar_t) h_0 + sqrt(1 - abar_t) eps
        h_t = q_sample(x, abar_t, eps)
        # eps^ = CI(h_t, h^c, t)
        eps_hat = self.predictor(h_t, kv, mask, causal, t, return_weights=return_states)
        if return_states:
            eps_hat, w = eps_hat
        # h^_0 = (h_t - sqrt(1 - abar_t) eps^) / sqrt(abar_t)
        x0 = x0_estimate(h_t, eps_hat, abar_t)
        # L = ||eps - eps^||^2, in float32
        loss = _weighted_mse(eps - eps_hat, weight)
        if not return_states:
            return ChainOutput(x0, loss, None, None)
        return ChainOutput(x0, loss, [x.detach(), x0.detach()], [w.detach()])

    def _ddim(self, x, kv, mask, causal, return_states, gen) -> ChainOutput:
        """train_mode random_t, evaluation: DDIM from t* = eval_from down to 0 (see the class docstring)."""
        abar = self.schedule.abar
        grid = self.schedule.grid(self.inference_steps, self.eval_from)  # t_1 < ... < t_n = t*
        # h_{t*} = sqrt(abar_{t*}) h_0 + sqrt(1 - abar_{t*}) eps   (eps = 0 unless stochastic)
        eps = None if gen is None else torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
        h = q_sample(x, abar[grid[-1]], eps)
        states = [x.detach()] if return_states else None
        weights = [] if return_states else None
        for t, s in zip(reversed(grid), reversed([0] + grid[:-1])):
            # eps^ = CI(h_t, h^c, t)
            eps_hat = self.predictor(h, kv, mask, causal, t, return_weights=return_states)
            if return_states:
                eps_hat, w = eps_hat
                weights.append(w.detach())
            # h_s = sqrt(abar_s) h^_0 + sqrt(1 - abar_s) eps^   (s = 0: h^_0)
            h = ddim_step(h, eps_hat, abar[t], abar[s])
            if return_states:
                states.append(h.detach())
        return ChainOutput(h, None, states, weights)


def _weighted_mse(diff: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """``sum_l weight_l * mean_d diff_{l,d}^2`` in float32 (plain mean when weight is None)."""
    sq = torch.linalg.vector_norm(diff, dim=-1, dtype=torch.float32) ** 2 / diff.shape[-1]
    return sq.mean() if weight is None else (sq * weight).sum()
