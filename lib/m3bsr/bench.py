"""``python -m m3bsr bench``: what M3BSR costs, side by side with its references (issue #6).

Every measurement of a bench run uses the same batch, d, L and T, so the **ratios** are what
to read (absolute timings move with the machine's load). Each timing is the median of
``repeats`` runs after ``warmup`` runs; what a ratio compares is timed in turn within each repeat
(:func:`median_times`), so a change of load hits both sides. A *train step* is forward +
backward + one Adam step. Steps and evaluations run as in the trainer, with the host memory they
free kept for the next one (:func:`m3bsr.train.kept_host_memory`). Order: memory, the side-by-side
and kept-memory processes (fresh processes, first, while this one is small), the naive check,
throughput and FLOP/s, evaluation, the sweeps.

============================  ===================================================================
measurement                   how
============================  ===================================================================
train_throughput_*            valid targets in the batch / median train-step time (M3BSR, SASRec)
peak_memory_*                 CUDA: ``torch.cuda.max_memory_allocated`` growth over model + Adam
                              state + two train steps; CPU: growth of the peak RSS (``VmHWM``,
                              reset first) over the same, in a fresh spawned process
                              (tracemalloc cannot see torch's allocations; ``ru_maxrss``
                              inherits the parent's peak)
naive_max_abs_diff            :class:`NaiveM3BSR` (same weights) vs M3BSR on one batch in eval
                              mode: all targets in one pass, and one forward per target (on the
                              batch's first rows); the bench raises if either differs by > ``TOL``
train_throughput_naive*       the naive reference's train throughput; ratio = fast / naive
train_throughput_*_compiled   with ``--compile``: the same train step with ``torch.compile(model.loss)``
                              (default mode, as ``--set compile=true`` trains), on a second copy of
                              each model; ratio = compiled / eager; the note gives the time of
                              the first (compiling) step, from a cold compile cache
matmul_*                      the machine's dense matmul FLOP/s: median of a 2048 x 2048 matmul
m3bsr_achieved_flops          FLOPs of one M3BSR train step (forward + backward) counted by
                              ``torch.utils.flop_counter.FlopCounterMode`` (matmuls and attention,
                              dense: masked halves counted too; a fused attention kernel's backward
                              with the scores it recomputes, explicit matmuls' without: attention
                              with dropout, explicit on the CPU and fused on CUDA, counts less on
                              the CPU) / median step time
*_time_matmul|random|other    CPU: where one train step's time goes (M3BSR, SASRec): the profiler's
                              self CPU time per operator, as shares of the step (:func:`time_shares`),
                              times the median step time; the matmul row also gives those operators'
                              own FLOP/s and the fraction the step would reach with them at the
                              measured matmul FLOP/s
train_throughput_m3bsr_*x*    CPU: M3BSR train steps in fresh spawned processes, started together:
                              one process with all k cores' threads, then k one-thread processes
                              side by side (throughput summed); how several runs share a machine
                              (``experiments.train_runs``)
host_memory_kept_*            CPU: SASRec's and M3BSR's train throughput with the host memory a step
                              frees kept for the next (:func:`m3bsr.train.kept_host_memory`) over
                              glibc's default allocation, in fresh one-thread processes (page faults
                              a step in the note)
eval_*                        full-ranking evaluation of every test user with inference_steps in
                              {T, T/3, 1} (median time, NDCG@10) after a brief training (or the
                              best checkpoint of ``--run``); ``eval_flops_*``: the same evaluations'
                              FLOPs, counted as above; their ratio is the speed-up that T/3 or 1
                              step would give if every operation ran at the same FLOP/s
step_time_L=* / items=*       M3BSR train step on random full-length batches (every position an
                              event) against L and against the catalogue size (real sizes and
                              feature dims, random features)
============================  ===================================================================

**What "naive" means** (:class:`NaiveM3BSR`): the same equations and parameters, written the
obvious way: item encoders applied per looked-up position; one chain call per (level,
modality), no stacking of levels on the batch axis; every diffusion step recomputes the
condition's keys and values (LN_c, W_k, W_v) and runs the attention explicitly
(``softmax(Q K^T / sqrt(d_h) + mask) V``); one specific-expert Transformer call per (level,
modality). ``train_throughput_naive_loops`` is exactly that, all targets of a row in one pass;
``train_throughput_naive`` adds **one forward + backward per target position**, each row holding
only that target's history padded to L+1 (a straightforward implementation that trains one target
per sequence), timed on a few evenly spaced target positions (each costs the same; throughput =
targets covered / time).

Writes ``<out>/bench-<size>-<device>[-bf16][-compile].csv`` and ``.md``. ``--size small`` is a smoke run (tiny
synthetic data, one repeat, well under a minute on 2 cores; with ``--compile`` a few minutes).
"""
from __future__ import annotations

import contextlib
import copy
import csv
import gc
import io
import math
import multiprocessing
import os
import platform
import queue
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from .config import Config, ConfigError, ModelConfig, make_config, repo_root
from .data.sequences import TIME_BOS, SequenceData, history_index, position_ids
from .models.base import DataInfo, Recommender
from .models.diffusion import ConditionalChain
from .models.layers import before_mask, gather_positions, sinusoidal, window_mask
from .models.m3bsr import M3BSR, level_weights
from .models.registry import build_model
from .files import atomic_write_text
from .train import (Trainer, data_info, evaluate, kept_host_memory, load_data, load_trained, resolve_device,
                    run_config, trim_host_memory)

TOL = 1e-9  # max |naive - fast| on the user vectors, compared in float64 (float32 rounding alone is ~1e-4)
FEATURE_DIMS = {"image": 1280, "text": 384}  # the MovieLens -mm encoders' output sizes


@dataclass(frozen=True)
class Size:
    """One benchmark size: the data and model of the main measurements, repeats, and the sweeps."""

    dataset: str
    profile: str
    batch: int
    repeats: int
    warmup: int
    epochs: int  # brief training before the evaluation measurements
    naive_positions: int  # target positions timed for the one-forward-per-target reference
    equal_rows: int  # rows of the batch checked one forward per target
    sweep_batch: int
    lengths: tuple[int, ...] = (20, 50, 100, 200)
    catalogues: tuple[tuple[str, int], ...] = (("ml-100k-mm", 1682), ("ml-latest-small-mm", 9724),
                                               ("synthetic", 50_000))
    feature_dims: dict[str, int] = field(default_factory=lambda: dict(FEATURE_DIMS))
    sweep_overrides: dict[str, Any] = field(default_factory=dict)
    overrides: dict[str, Any] = field(default_factory=dict)


SIZES = {
    # smoke test: tiny synthetic data, one repeat; the sweeps keep their L and catalogue sizes with d=16, T=2
    "small": Size(dataset="synthetic", profile="ci", batch=16, repeats=1, warmup=0, epochs=1, naive_positions=2,
                  equal_rows=4, sweep_batch=2, feature_dims={"image": 16, "text": 8},
                  sweep_overrides=dict(d=16, layers=1, heads=2, T=2),
                  overrides=dict(syn_users=60, syn_items=120, syn_events=30)),
    # the setting: d=64, L=50, T=15, batch 256 on ml-100k-mm (the paper's sizes, on the default
    # profile's data; sweeps at batch 32: L=200 at batch 64 peaks above 7 GiB)
    "full": Size(dataset="ml-100k-mm", profile="default", batch=256, repeats=3, warmup=1, epochs=5,
                 naive_positions=5, equal_rows=16, sweep_batch=32, overrides=dict(max_len=50, d=64, layers=2)),
}

# the measurements every run reports (CUDA adds matmul_bf16, --compile adds COMPILED)
MEASUREMENTS = (
    "train_throughput_sasrec", "train_throughput_m3bsr", "peak_memory_sasrec", "peak_memory_m3bsr",
    "naive_max_abs_diff", "train_throughput_naive_loops", "train_throughput_naive",
    "matmul_fp32", "m3bsr_step_flops", "m3bsr_achieved_flops", "sasrec_achieved_flops",
    "eval_train_seconds", "eval_seconds_T", "eval_seconds_T/3", "eval_seconds_1",
    "eval_flops_T", "eval_flops_T/3", "eval_flops_1",
    "eval_ndcg10_T", "eval_ndcg10_T/3", "eval_ndcg10_1",
    "step_time_L=20", "step_time_L=50", "step_time_L=100", "step_time_L=200",
    "step_time_items=1682", "step_time_items=9724", "step_time_items=50000",
)
COMPILED = ("train_throughput_sasrec_compiled", "train_throughput_m3bsr_compiled")
# CPU runs add where each model's step time goes (:func:`time_shares`)
TIME_SHARES = tuple(f"{m}_time_{kind}" for m in ("sasrec", "m3bsr") for kind in ("matmul", "random", "other"))
# and each model's train throughput with freed host memory kept over glibc's default (:func:`_kept_memory`)
HOST_MEMORY = ("host_memory_kept_sasrec", "host_memory_kept_m3bsr")
# the random draws (dropout masks, diffusion noise), one of the kinds :func:`time_shares` sorts operators into
RANDOM_OPS = frozenset({"aten::bernoulli_", "aten::normal_", "aten::uniform_", "aten::random_"})


@dataclass
class Row:
    measurement: str
    value: float
    unit: str
    ratio: float | None = None  # the measurement's ratio (what the target bounds)
    target: str = ""  # e.g. ">= 0.1"; empty when there is none
    note: str = ""

    @property
    def met(self) -> str:
        if not self.target or self.ratio is None:
            return ""
        op, bound = self.target.split()
        return "yes" if {"<=": self.ratio <= float(bound), ">=": self.ratio >= float(bound),
                         "<": self.ratio < float(bound)}[op] else "no"


# ---------------------------------------------------------------------------------------------
# The naive reference
# ---------------------------------------------------------------------------------------------


def naive_chain(chain: ConditionalChain, x: torch.Tensor, cond: torch.Tensor, mask: torch.Tensor,
                weight: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The T-step chain of docs/method.md section 1, straight from the equations, with ``chain``'s weights.

    ``x`` ``(N, Lq, d)``, ``cond`` ``(N, Lc, d)``, ``mask`` (True = may attend) broadcasting to
    ``(N, Lq, Lc)``. Training draws eps from the global generator; eval is deterministic (eps = 0).
    """
    p, training = chain.predictor, chain.training
    if not training and chain.eval_mode == "skip":
        return x, None
    if not training and chain.eval_mode != "deterministic":
        raise NotImplementedError("the naive reference evaluates in the deterministic mode only")
    if chain.train_mode == "random_t":
        raise NotImplementedError("the naive reference runs the chain (train_mode chain or strided) only")
    N, Lq, d = x.shape
    dh = d // p.h
    loss = x.new_zeros((), dtype=torch.float32) if training else None
    h = x
    for t, a_t, abar_t in chain.schedule.steps(chain.train_steps if training else chain.inference_steps):
        eps = torch.randn_like(h) if training else torch.zeros_like(h)
        h_noisy = math.sqrt(a_t) * h + math.sqrt(1 - a_t) * eps  # h~_t
        k, v = p.kv(p.ln_c(cond)).chunk(2, -1)  # the condition's keys/values, recomputed at every step
        u = p.ln_q(h_noisy)
        if p.t_proj is not None:
            u = u + p.t_proj(sinusoidal(torch.full((), t, device=x.device), d).to(u.dtype))
        q = p.q(u)
        y = []
        for i in range(p.h):  # one head at a time
            s = slice(i * dh, (i + 1) * dh)
            att = q[..., s] @ k[..., s].transpose(-1, -2) / math.sqrt(dh)
            att = att.masked_fill(~mask, float("-inf")).softmax(-1)
            y.append(att @ v[..., s])
        eps_hat = p.o(torch.cat(y, -1)) + (u if p.residual else 0)  # eps^_t = CI(h~_t, h^c)
        h_den = (h_noisy - (1 - a_t) / math.sqrt(1 - abar_t) * eps_hat) / math.sqrt(a_t)  # h-_t
        if training:
            diff = h_noisy - h_den if chain.loss_kind == "paper" else eps - eps_hat
            sq = diff.float().pow(2).mean(-1)
            loss = loss + (sq.mean() if weight is None else (sq * weight).sum())
        h = h_den
    return h, loss


class NaiveM3BSR(M3BSR):
    """M3BSR written the obvious way (the module docstring says what "naive" means).

    Same parameters and state dict as :class:`~m3bsr.models.m3bsr.M3BSR`, so
    ``naive.load_state_dict(fast.state_dict())`` gives the same function; only the deterministic
    evaluation mode is supported for comparisons.
    """

    def embed(self, items: torch.Tensor) -> dict[str, torch.Tensor]:
        """Encoders applied to every looked-up position (no encode-the-catalogue-once shortcut)."""
        B, S, _ = items.shape
        h = {}
        for i, m in enumerate(self.modalities):
            x = self.id_embedding(items) if m == "id" else self.proj[m](items)
            bos = self.bos[:, i][None, :, None].expand(B, S, 1, -1).to(x.dtype)
            h[m] = self.drop(self.emb_ln[m](torch.cat([bos, x[:, :, 1:]], 2)))
        return h

    def modality_denoising(self, h, valid, rec=None):
        B, S, L1, d = h["id"].shape
        loss = None
        for m in self.features:
            out = []
            for s in range(S):  # one chain call per (level, modality)
                mask = window_mask(L1, self.window, valid.device)
                o, lo = naive_chain(self.cdmd[m], h[m][:, s], h["id"][:, s], mask,
                                    level_weights(valid[:, s:s + 1])[:, 0])
                out.append(o)
                loss = lo if loss is None else loss + lo
            h[m] = torch.stack(out, 1)
        return loss

    def behaviour_denoising(self, h, times, valid, rec=None):
        B, S, L1, d = h["id"].shape
        same = self.cfg.cdbd_condition == "same"
        new = {m: list(h[m].unbind(1)) for m in self.modalities}
        loss = None
        for s in range(S - 1):
            deeper = self._cdbd_condition_levels(s, S)
            for m in self.modalities:  # one chain call per (level, modality)
                cm = [m] if same else self.modalities
                cond = torch.cat([h[c][:, l] for c in cm for l in deeper], 1)
                c_times = torch.cat([times[:, l] for l in deeper] * len(cm), 1)
                mask = before_mask(times[:, s], c_times, self.window, L1)
                new[m][s], lo = naive_chain(self.cdbd[m], h[m][:, s], cond, mask, level_weights(valid[:, s:s + 1])[:, 0])
                loss = lo if loss is None else loss + lo
        for m in self.modalities:
            h[m] = torch.stack(new[m], 1)
        return loss

    def experts(self, h, times, idx):
        B, S, L1, d = h["id"].shape
        M = len(self.modalities)
        x = {m: h[m] + self.pos(position_ids(times)) for m in self.modalities}
        causal = window_mask(L1, self.window, times.device)
        out = []
        for s in range(S):  # one specific-expert call per (level, modality)
            for m in self.modalities:
                tf = self.specific[m if self.cfg.shared_specific else f"{s}/{m}"]
                out.append(gather_positions(tf(x[m][:, s], causal), idx[:, s]))
        if self.common is not None:
            q = torch.cat([x[m][:, 0] + self.type_emb[i] for i, m in enumerate(self.modalities)], 1)
            k = torch.cat([x[m][:, -1] + self.type_emb[i] for i, m in enumerate(self.modalities)], 1)
            mask = before_mask(times[:, 0].repeat(1, M), times[:, -1].repeat(1, M), self.window, L1)
            share = q + self.drop(self.common_cross(self.ln_cl(q), self.ln_fa(k), mask))
            y = self.common(share, causal.repeat(M, M)).view(B, M, L1, d)
            out.append(torch.stack([gather_positions(y[:, i], idx[:, 0]) for i in range(M)], 1).mean(1))
        return torch.stack(out, 2)


def one_target_batches(batch: dict[str, torch.Tensor], positions: list[int] | None = None):
    """Yield ``(k, sub-batch)``: target position k alone, each row's events at or after the target
    replaced by another item (times, and so positions, unchanged): what a one-target-per-sequence
    implementation feeds, with the later events made into noise that must not reach the target.
    Positions without targets are skipped."""
    K, L1 = batch["targets"].shape[1], batch["items"].shape[-1]
    for k in positions if positions is not None else range(K):
        if not (batch["targets"][:, k] > 0).any():
            continue
        tt = batch["target_times"][:, k:k + 1]
        later = torch.arange(L1, device=tt.device) > history_index(batch["times"], tt)  # (B, S, L+1)
        other = batch["items"] % int(batch["items"].max()) + 1  # every real event becomes another item
        items = torch.where(later & (batch["items"] > 0), other, batch["items"])
        yield k, {"items": items, "times": batch["times"],
                  "targets": batch["targets"][:, k:k + 1], "target_times": tt, "users": batch["users"]}


@torch.no_grad()
def naive_max_abs_diff(fast: M3BSR, naive: NaiveM3BSR, batch: dict[str, torch.Tensor], rows: int) -> tuple[float, float]:
    """Eval-mode max |y_naive - y_fast| over valid targets, on float64 copies of both models (so that
    only a difference in the math shows): (all targets in one pass on ``batch``, one forward per
    target on its first ``rows`` rows)."""
    fast, naive = copy.deepcopy(fast).double().eval(), copy.deepcopy(naive).double().eval()
    valid = batch["targets"] > 0
    y = fast.user_vectors(batch)[0]
    all_pass = (naive.user_vectors(batch)[0] - y)[valid].abs().max().item()
    sub = {k: v[:rows] for k, v in batch.items()}
    per = 0.0
    for k, b in one_target_batches(sub):
        ok = b["targets"][:, 0] > 0
        per = max(per, (naive.user_vectors(b)[0][:, 0] - y[:rows, k])[ok].abs().max().item())
    return all_pass, per


# ---------------------------------------------------------------------------------------------
# Timing, memory, FLOPs
# ---------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_times(fns: dict[str, Callable[[], Any]], device: torch.device, repeats: int,
                 warmup: int) -> dict[str, float]:
    """Median wall time (s) of each function over ``repeats`` runs after ``warmup`` runs. Within a
    repeat the functions run in turn, so a change of load on a shared machine hits them alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def fresh_compile_cache() -> contextlib.AbstractContextManager:
    """torch.compile's in-process caches cleared and its disk cache in a new temporary folder (removed on
    exit): a compile inside is timed from cold, as on a new machine, whatever compiled before."""
    from torch._inductor.utils import fresh_inductor_cache  # noqa: PLC0415 (heavy, and only for --compile)
    return fresh_inductor_cache()


def release_memory(device: torch.device) -> None:
    """Hand freed memory back to the system between phases (glibc keeps freed heap pages)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    trim_host_memory()


def train_step(model: Recommender, opt: torch.optim.Optimizer, batch: dict[str, torch.Tensor], bf16: bool,
               loss_fn: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None) -> None:
    """Forward + backward + one Adam step; ``loss_fn``: ``model.loss`` or a compiled version of it."""
    device = next(model.parameters()).device
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        loss = (loss_fn or model.loss)(batch)["loss"]
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def per_target_train_step(model: Recommender, opt: torch.optim.Optimizer, batch: dict[str, torch.Tensor],
                          positions: list[int], bf16: bool) -> int:
    """One forward + backward per target position (gradients accumulated), then one Adam step.
    Returns the number of valid targets covered."""
    device = next(model.parameters()).device
    subs = list(one_target_batches(batch, positions))
    n = sum(int((b["targets"] > 0).sum()) for _, b in subs)
    opt.zero_grad(set_to_none=True)
    for _, b in subs:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model.loss(b)["loss"] * (int((b["targets"] > 0).sum()) / n)
        loss.backward()
    opt.step()
    return n


def _sdpa_cpu_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count  # noqa: PLC0415
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _sdpa_cpu_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_backward_flop_count  # noqa: PLC0415
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def _cpu_attention_flops() -> dict:
    """FLOP formulas for CPU flash attention (forward, backward), which torch's table lacks."""
    aten = torch.ops.aten
    if not hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        return {}
    return {aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flops,
            aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_cpu_backward_flops}


def counted_ops() -> frozenset[str]:
    """Names of the operators :func:`counted_flops` counts, as the profiler writes them (``aten::mm``)."""
    from torch.utils.flop_counter import flop_registry  # noqa: PLC0415
    return frozenset(getattr(op, "_qualified_op_name", str(op)) for op in [*flop_registry, *_cpu_attention_flops()])


def counted_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of ``fn()`` by ``FlopCounterMode`` (plus CPU flash attention, :func:`_cpu_attention_flops`)."""
    from torch.utils.flop_counter import FlopCounterMode  # noqa: PLC0415
    counter = FlopCounterMode(display=False, custom_mapping=_cpu_attention_flops())
    with counter:
        fn()
    return counter.get_total_flops()


def step_flops(model: Recommender, batch: dict[str, torch.Tensor], bf16: bool) -> int:
    """FLOPs of one forward + backward (:func:`counted_flops`)."""
    device = next(model.parameters()).device
    model.train()

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model.loss(batch)["loss"]
        loss.backward()
    flops = counted_flops(step)
    model.zero_grad(set_to_none=True)
    return flops


def time_shares(step: Callable[[], Any]) -> tuple[dict[str, float], float]:
    """Shares of one CPU ``step()``'s time by kind of operator, and the profiled step's seconds.

    ``torch.profiler``'s self CPU time of every operator is summed into "matmul" (the operators
    whose FLOPs are counted, :func:`counted_ops`: matmuls and attention), "random"
    (:data:`RANDOM_OPS`) and "other" (elementwise, normalisation, softmax, copies, the optimizer),
    over their total. The profiler adds a little time to every operator call, so the many small
    "other" calls weigh somewhat more than they do unprofiled (compare the profiled step's seconds
    with an unprofiled one).
    """
    from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        step()
        seconds = time.perf_counter() - t0
    secs = dict.fromkeys(("matmul", "random", "other"), 0.0)
    matmul = counted_ops()
    for event in prof.key_averages():
        kind = "matmul" if event.key in matmul else "random" if event.key in RANDOM_OPS else "other"
        secs[kind] += event.self_cpu_time_total
    total = sum(secs.values())
    return {kind: t / total for kind, t in secs.items()}, seconds


def matmul_flops(device: torch.device, dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    """Measured dense matmul FLOP/s: median time of an ``n x n @ n x n`` matmul."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n ** 3 / median_times({"mm": lambda: a @ b}, device, repeats, warmup=2)["mm"]


def _rss_kib(field: str) -> int:
    """``VmRSS`` (resident now) or ``VmHWM`` (peak resident) of this process, KiB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"no {field} in /proc/self/status")


@kept_host_memory()  # as the trainer runs its steps
def _memory_child(cfg_dict: dict, info: DataInfo, batch: dict, threads: int) -> float:
    """In a fresh process: peak RSS growth (MiB) over building the model, Adam, two train steps.

    The peak is the kernel's ``VmHWM``, reset first through ``/proc/self/clear_refs`` (``ru_maxrss``
    cannot be used: Linux carries the parent's peak over into a spawned child).
    """
    torch.set_num_threads(threads)
    cfg = Config.from_dict(cfg_dict)
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    except OSError:
        pass
    before = _rss_kib("VmRSS")
    torch.manual_seed(0)
    model = build_model(cfg.model, info)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(2):
        train_step(model, opt, batch, bf16=False)
    return (_rss_kib("VmHWM") - before) / 1024


def peak_memory(cfg: Config, info: DataInfo, batch: dict[str, torch.Tensor], device: torch.device,
                bf16: bool) -> float:
    """MiB: model + Adam state + two train steps (see the module docstring for how, per device)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        torch.manual_seed(0)
        model = build_model(cfg.model, info).to(device)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        model.train()
        for _ in range(2):
            train_step(model, opt, batch, bf16)
        peak = torch.cuda.max_memory_allocated(device) - before
        del model, opt
        return peak / 2 ** 20
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:
        try:
            return pool.apply(_memory_child, (cfg.to_dict(), info, batch, torch.get_num_threads()))
        except OSError:  # no /proc (not Linux): no CPU memory measurement
            return float("nan")


def _steps_child(cfg_dict: dict, info: DataInfo, batch: dict, threads: int, warmup: int, repeats: int,
                 keep: bool, start: Any, out: Any) -> None:
    """In a fresh process with ``threads`` threads: train steps of the config's model; after the
    warm-up it waits at the ``start`` barrier (so side-by-side processes time the same stretch), then
    puts the median step time (s) and the median page faults per step on ``out``. ``keep``: freed
    host memory kept for the next step, as the trainer keeps it
    (:func:`~m3bsr.train.kept_host_memory`); else glibc's default allocation."""
    import resource  # noqa: PLC0415 (Unix only)
    with kept_host_memory() if keep else contextlib.nullcontext():
        torch.set_num_threads(threads)
        cfg = Config.from_dict(cfg_dict)
        torch.manual_seed(0)
        model = build_model(cfg.model, info)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        model.train()
        for _ in range(warmup):
            train_step(model, opt, batch, bf16=False)
        start.wait()
        times, faults = [], []
        for _ in range(repeats):
            f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
            train_step(model, opt, batch, bf16=False)
            times.append(time.perf_counter() - t0)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
        out.put((statistics.median(times), statistics.median(faults)))


def side_by_side_step_times(cfg: Config, info: DataInfo, batch: dict[str, torch.Tensor], processes: int,
                            threads: int, warmup: int, repeats: int,
                            keep: bool = True) -> list[tuple[float, float]]:
    """Median train-step time (s) and page faults per step of ``cfg``'s model in each of
    ``processes`` spawned processes with ``threads`` threads each, running at the same time on the
    CPU (``keep``: see :func:`_steps_child`)."""
    ctx = multiprocessing.get_context("spawn")
    start, out = ctx.Barrier(processes), ctx.Queue()
    procs = [ctx.Process(target=_steps_child,
                         args=(cfg.to_dict(), info, batch, threads, warmup, repeats, keep, start, out))
             for _ in range(processes)]
    for p in procs:
        p.start()
    results: list[tuple[float, float]] = []
    try:
        while len(results) < processes:
            try:
                results.append(out.get(timeout=5))
            except queue.Empty:
                dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"a side-by-side bench process died (exit code {dead[0]})") from None
        return results
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def random_info(n_items: int, feature_dims: dict[str, int], n_levels: int = 2, seed: int = 0) -> DataInfo:
    """A catalogue of ``n_items`` items with random features of the given sizes, ``n_levels`` levels."""
    g = torch.Generator().manual_seed(seed)
    feats = {m: torch.randn(n_items + 1, dim, generator=g) for m, dim in feature_dims.items()}
    masks = {m: torch.arange(n_items + 1) > 0 for m in feature_dims}
    levels = ["click", "favor"] if n_levels == 2 else [f"level{i}" for i in range(n_levels)]
    return DataInfo(n_items=n_items, levels=levels, features=feats, feature_mask=masks)


def random_batch(B: int, L: int, n_items: int, S: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """Training rows in the sequences format with every position an event: BOS, then L events per
    level at sorted random times; every deep event with some history is a target."""
    g = torch.Generator().manual_seed(seed)
    items = torch.randint(1, n_items + 1, (B, S, L + 1), generator=g)
    times = torch.randint(0, 20 * L, (B, S, L + 1), generator=g).sort(-1).values
    items[:, :, 0], times[:, :, 0] = 0, TIME_BOS
    targets, target_times = items[:, -1, 1:].clone(), times[:, -1, 1:].clone()
    targets[target_times <= times[:, :, 1].min(1).values[:, None]] = 0
    return dict(items=items, times=times, targets=targets, target_times=target_times, users=torch.arange(B))


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


# ---------------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------------


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} cores)"


@dataclass
class _Run:
    """One benchmark run: its device, repeats and the rows measured so far (saved after every row,
    so an interrupted run keeps what it measured)."""

    size: Size
    device: torch.device
    repeats: int
    bf16: bool
    compile: bool  # also time torch.compile'd train steps
    epochs: int  # brief training before the evaluation measurements
    log: Callable[[str], None]
    out: Path
    header: dict[str, Any] = field(default_factory=dict)
    rows: list[Row] = field(default_factory=list)
    t0: float = field(default_factory=time.perf_counter)

    def add(self, row: Row) -> None:
        self.rows.append(row)
        ratio = f"  ratio {row.ratio:.4g}" if row.ratio is not None else ""
        target = f"  (target {row.target}: {row.met})" if row.target else ""
        self.log(f"[{time.perf_counter() - self.t0:6.0f}s] {row.measurement:28s} {row.value:.4g} {row.unit}{ratio}{target}")
        self.save()

    def save(self) -> tuple[Path, Path]:
        self.header["seconds"] = round(time.perf_counter() - self.t0)
        suffix = ("-bf16" if self.bf16 else "") + ("-compile" if self.compile else "")
        stem = f"bench-{self.header['size']}-{self.device.type}{suffix}"
        return write_results(self.rows, self.header, self.out, stem)

    def times(self, fns: dict[str, Callable[[], Any]]) -> dict[str, float]:
        return median_times(fns, self.device, self.repeats, self.size.warmup)

    def step(self, model: Recommender, batch: dict[str, torch.Tensor], compiled: bool = False) -> Callable[[], None]:
        """A train-step closure with its own Adam (``compiled``: through ``torch.compile(model.loss)``)."""
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        model.train()
        loss_fn = torch.compile(model.loss) if compiled else None
        return lambda: train_step(model, opt, batch, self.bf16, loss_fn)


@kept_host_memory()  # every step and evaluation as the trainer runs them
def run_bench(size: str = "full", device: str = "auto", out: str | Path | None = None, run: str | Path | None = None,
              threads: int | None = None, repeats: int | None = None, epochs: int | None = None,
              batch_size: int | None = None, bf16: bool = False, compile: bool = False,
              log: Callable[[str], None] = print) -> list[Row]:
    """Run every measurement, write ``<out>/bench-<size>-<device>[-bf16][-compile].{csv,md}``, return the rows."""
    sz = SIZES[size]
    for name, value, least in (("threads", threads, 1), ("repeats", repeats, 1), ("batch", batch_size, 1),
                               ("epochs", epochs, 0)):
        if value is not None and value < least:
            raise ConfigError(f"bench: --{name} must be at least {least}, got {value}")
    if run is not None and not all((Path(run) / f).is_file() for f in ("config.json", "best.pt")):
        raise ConfigError(f"bench: --run {run}: no config.json and best.pt there (is it a finished run folder?)")
    dev = resolve_device(device)
    if threads is not None:
        torch.set_num_threads(threads)
    if bf16 and dev.type != "cuda":
        raise ConfigError("--bf16 is for CUDA (CPU bf16 matmuls are emulated on most CPUs)")
    r = _Run(sz, dev, repeats if repeats is not None else sz.repeats, bf16, compile,
             epochs if epochs is not None else sz.epochs, log,
             Path(out) if out is not None else repo_root() / "results" / "bench")

    # the same batch, d, L and T for every model
    cfg = make_config(sz.profile, {"dataset": sz.dataset, **sz.overrides, "device": str(dev), "bf16": bf16,
                                   "sampled_negatives": 0, "progress": False})
    ds = load_data(cfg)
    seq = SequenceData(ds, cfg.data.max_len, cfg.data.min_deep, cfg.data.row_len)
    info = data_info(ds, seq)
    n = len(seq.train["users"])
    rows = batch_size if batch_size is not None else sz.batch
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:rows]
    cpu_batch = {k: v[order] for k, v in seq.train.items()}
    n_targets = int((cpu_batch["targets"] > 0).sum())
    m = cfg.model
    setting = f"{ds.name}, batch {len(order)} ({n_targets} targets), d={m.d}, L={cfg.data.max_len}, T={m.T}"
    log(f"bench {size} on {_device_name(dev)}, {torch.get_num_threads()} threads: {setting}")
    r.header.update({"device": _device_name(dev), "torch": torch.__version__, "threads": torch.get_num_threads(),
                     "bf16": "on" if bf16 else "off", "compile": "on" if compile else "off", "size": size,
                     "setting": setting,
                     "repeats": f"median of {r.repeats} after {sz.warmup} warm-up"})

    _memory(r, cfg, info, cpu_batch)  # first, while this process is small
    if dev.type == "cpu":
        _side_by_side(r, cfg, info, cpu_batch, setting)
        _kept_memory(r, cfg, info, cpu_batch)
    batch = _to(cpu_batch, dev)
    _throughput(r, m, info, batch, setting)
    release_memory(dev)
    _evaluation(r, cfg, ds, run)
    release_memory(dev)
    _sweeps(r, m, cfg.data.max_len if size == "full" else sz.lengths[0])

    paths = r.save()
    log(f"wrote {paths[0]} and {paths[1]} ({r.header['seconds']} s)")
    return r.rows


def _build(cfg: ModelConfig, info: DataInfo, device: torch.device, name: str = "m3bsr",
           cls: type[Recommender] | None = None) -> Recommender:
    c = copy.deepcopy(cfg)
    c.model = name
    torch.manual_seed(0)
    return (cls(c, info) if cls is not None else build_model(c, info)).to(device)


def _memory(r: _Run, cfg: Config, info: DataInfo, batch: dict[str, torch.Tensor]) -> None:
    mem = {}
    for name in ("sasrec", "m3bsr"):
        c = copy.deepcopy(cfg)
        c.model.model = name
        mem[name] = peak_memory(c, info, _to(batch, r.device), r.device, r.bf16)
        release_memory(r.device)
    how = "cuda max_memory_allocated growth" if r.device.type == "cuda" else "peak RSS (VmHWM) growth, fresh process"
    r.add(Row("peak_memory_sasrec", mem["sasrec"], "MiB", note=f"{how}: model + Adam + 2 train steps"))
    r.add(Row("peak_memory_m3bsr", mem["m3bsr"], "MiB", mem["m3bsr"] / mem["sasrec"] if mem["sasrec"] >= 1 else None,
              note=f"{how}; ratio = M3BSR / SASRec (none when SASRec's is below 1 MiB, the resolution)"))


def _side_by_side(r: _Run, cfg: Config, info: DataInfo, batch: dict[str, torch.Tensor], setting: str) -> None:
    """k = the CPU cores (at least 2; fewer when memory holds fewer runs): one M3BSR process with k
    threads, then k one-thread ones."""
    from .experiments import runs_that_fit  # noqa: PLC0415 (experiments imports the trainer)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 2
    k = max(2, runs_that_fit(cores))
    n_targets = int((batch["targets"] > 0).sum())
    c = copy.deepcopy(cfg)
    c.model.model = "m3bsr"
    one = side_by_side_step_times(c, info, batch, 1, k, r.size.warmup, r.repeats)[0][0]
    many = [t for t, _ in side_by_side_step_times(c, info, batch, k, 1, r.size.warmup, r.repeats)]
    r.add(Row(f"train_throughput_m3bsr_1x{k}", n_targets / one, "targets/s",
              note=f"one process with {k} threads (fresh, spawned); {setting}"))
    side = sum(n_targets / t for t in many)
    r.add(Row(f"train_throughput_m3bsr_{k}x1", side, "targets/s", side * one / n_targets,
              note=f"{k} one-thread processes side by side, throughput summed (step times "
                   f"{', '.join(f'{t:.3g}' for t in many)} s); ratio = over one {k}-thread process"))


def _kept_memory(r: _Run, cfg: Config, info: DataInfo, batch: dict[str, torch.Tensor]) -> None:
    """SASRec's and M3BSR's train steps with freed host memory kept (as the trainer keeps it) and with
    glibc's default allocation, each in a fresh one-thread process, in the order kept, default,
    default, kept (a drift of the machine's speed hits both)."""
    n_targets = int((batch["targets"] > 0).sum())
    for name in ("sasrec", "m3bsr"):
        c = copy.deepcopy(cfg)
        c.model.model = name
        res: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
        for keep in (True, False, False, True):
            res[keep] += side_by_side_step_times(c, info, batch, 1, 1, r.size.warmup, r.repeats, keep=keep)
        secs = {k: statistics.mean(t for t, _ in v) for k, v in res.items()}
        faults = {k: statistics.mean(f for _, f in v) for k, v in res.items()}
        r.add(Row(f"host_memory_kept_{name}", n_targets / secs[True], "targets/s", secs[False] / secs[True],
                  note=f"one-thread processes; with glibc's default allocation {n_targets / secs[False]:.4g} "
                       f"targets/s; page faults a step {faults[True]:.0f} kept, {faults[False]:.0f} default; "
                       "ratio = kept / default"))


def _throughput(r: _Run, m: ModelConfig, info: DataInfo, batch: dict[str, torch.Tensor], setting: str) -> None:
    """Train throughput of SASRec, M3BSR and the naive reference (timed in turn), FLOP/s."""
    dev, sz = r.device, r.size
    n_targets = int((batch["targets"] > 0).sum())
    sasrec, fast = _build(m, info, dev, "sasrec"), _build(m, info, dev)
    naive = _build(m, info, dev, cls=NaiveM3BSR)
    naive.load_state_dict(fast.state_dict())
    d_all, d_per = naive_max_abs_diff(fast, naive, batch, sz.equal_rows)
    diff = max(d_all, d_per)
    r.add(Row("naive_max_abs_diff", diff, "abs", diff, f"<= {TOL}",
              f"float64, eval mode; all targets in one pass: {d_all:.2g}; one forward per target "
              f"(first {sz.equal_rows} rows): {d_per:.2g}"))
    if not diff <= TOL:
        raise AssertionError(f"the naive reference differs from M3BSR by {diff:.3g} > {TOL}")
    release_memory(dev)

    K = batch["targets"].shape[1]
    positions = sorted({round(i) for i in torch.linspace(0, K - 1, sz.naive_positions).tolist()})
    positions = [k for k in positions if (batch["targets"][:, k] > 0).any()]
    per_target = sum(int((batch["targets"][:, k] > 0).sum()) for k in positions)
    opt = torch.optim.Adam(naive.parameters(), lr=1e-3)
    steps = {"sasrec": r.step(sasrec, batch), "m3bsr": r.step(fast, batch), "naive_loops": r.step(naive, batch),
             "naive": lambda: per_target_train_step(naive.train(), opt, batch, positions, r.bf16)}
    first = {}  # the first compiled step: tracing and compiling from cold caches, then the step
    with fresh_compile_cache() if r.compile else contextlib.nullcontext():
        for name in ("sasrec", "m3bsr") if r.compile else ():
            steps[f"{name}_compiled"] = r.step(_build(m, info, dev, name), batch, compiled=True)
            t0 = time.perf_counter()
            steps[f"{name}_compiled"]()
            _sync(dev)
            first[name] = time.perf_counter() - t0
        secs = r.times(steps)
    shares = {name: time_shares(steps[name]) for name in ("sasrec", "m3bsr")} if dev.type == "cpu" else {}
    thr = {k: n_targets / v for k, v in secs.items()}
    thr["naive"] = per_target / secs["naive"]
    r.add(Row("train_throughput_sasrec", thr["sasrec"], "targets/s", note=setting))
    r.add(Row("train_throughput_m3bsr", thr["m3bsr"], "targets/s", thr["m3bsr"] / thr["sasrec"], ">= 0.1",
              "ratio = M3BSR / SASRec"))
    r.add(Row("train_throughput_naive_loops", thr["naive_loops"], "targets/s", thr["m3bsr"] / thr["naive_loops"],
              note="naive: per-(level, modality) chains, per-step K/V, explicit attention; all targets in one pass; "
                   "ratio = fast / naive"))
    r.add(Row("train_throughput_naive", thr["naive"], "targets/s", thr["m3bsr"] / thr["naive"], ">= 3",
              f"naive as above, one forward+backward per target position on its history (L+1 long), timed on "
              f"positions {positions} of {K} ({per_target} targets); ratio = fast / naive"))
    for name in first:
        both = (f"; M3BSR / SASRec, both compiled: {thr['m3bsr_compiled'] / thr['sasrec_compiled']:.3g}"
                if name == "m3bsr" else "")
        r.add(Row(f"train_throughput_{name}_compiled", thr[f"{name}_compiled"], "targets/s",
                  thr[f"{name}_compiled"] / thr[name],
                  note=f"torch.compile(model.loss), default mode; first step (compiling from a cold cache) "
                       f"{first[name]:.0f} s; ratio = compiled / eager{both}"))
    del naive, opt, steps
    release_memory(dev)

    peak = {"fp32": matmul_flops(dev, torch.float32)}
    r.add(Row("matmul_fp32", peak["fp32"] / 1e9, "GFLOP/s", note="2048x2048 fp32 matmul, median of 5"))
    if dev.type == "cuda":
        peak["bf16"] = matmul_flops(dev, torch.bfloat16)
        r.add(Row("matmul_bf16", peak["bf16"] / 1e9, "GFLOP/s", note="2048x2048 bf16 matmul, median of 5"))
    ref = peak["bf16" if r.bf16 else "fp32"]
    flops = {"m3bsr": step_flops(fast, batch, r.bf16), "sasrec": step_flops(sasrec, batch, r.bf16)}
    r.add(Row("m3bsr_step_flops", flops["m3bsr"] / 1e9, "GFLOP", flops["m3bsr"] / flops["sasrec"],
              note="FlopCounterMode, one forward+backward; ratio = M3BSR / SASRec FLOPs"))
    for name in ("m3bsr", "sasrec"):
        ach = flops[name] / secs[name]
        r.add(Row(f"{name}_achieved_flops", ach / 1e9, "GFLOP/s", ach / ref, ">= 0.25" if name == "m3bsr" else "",
                  f"counted FLOPs / train-step time; ratio = fraction of the measured {'bf16' if r.bf16 else 'fp32'} "
                  "matmul FLOP/s"))
    for name, (share, profiled) in shares.items():
        t_mm = share["matmul"] * secs[name]
        ceiling = flops[name] / (flops[name] / ref + secs[name] - t_mm) / ref
        r.add(Row(f"{name}_time_matmul", t_mm, "s", share["matmul"],
                  note=f"matmuls and attention (the operators whose FLOPs are counted): share of one step's "
                       f"profiled self CPU time (that step: {profiled:.3g} s) x median step time "
                       f"({secs[name]:.3g} s); they run at {flops[name] / t_mm / 1e9:.3g} GFLOP/s "
                       f"= {flops[name] / t_mm / ref:.2f} of the measured matmul FLOP/s; at that FLOP/s, with the "
                       f"rest of the step unchanged, the step would reach {ceiling:.2f} of it; ratio = share"))
        r.add(Row(f"{name}_time_random", share["random"] * secs[name], "s", share["random"],
                  note="random draws: dropout masks" + (" and diffusion noise" if name == "m3bsr" else "")
                       + "; ratio = share of the step, as above"))
        r.add(Row(f"{name}_time_other", share["other"] * secs[name], "s", share["other"],
                  note="every other operator: elementwise, normalisation, softmax, copies, gathers, Adam; "
                       "ratio = share of the step, as above"))


def trained_run(run: str | Path, device: torch.device) -> Trainer:
    """``<run>/best.pt`` in a Trainer on ``device``, checked against the run's config as trained (so
    only fields outside the config hash, device and progress, change)."""
    cfg = run_config(run)
    cfg.train.device, cfg.train.progress = str(device), False
    return load_trained(cfg, run)


def _evaluation(r: _Run, cfg: Config, ds, run: str | Path | None) -> None:
    """Full-ranking evaluation of every test user with inference_steps T, T/3, 1 (timed in turn)."""
    dev = r.device
    deterministic = torch.are_deterministic_algorithms_enabled()
    if run is not None:
        trainer = trained_run(run, dev)
        train_s, how = 0.0, f"loaded {run}/best.pt"
    else:
        trainer = Trainer(cfg, dataset=ds)
        t0 = time.perf_counter()
        for _ in range(r.epochs):
            trainer.train_epoch()
        train_s = time.perf_counter() - t0
        how = f"trained here: {r.epochs} epoch(s) = {trainer.steps} steps of batch {cfg.train.batch_size}"
    torch.use_deterministic_algorithms(deterministic)  # the Trainer turns them on under CUDA
    ecfg = trainer.cfg
    r.add(Row("eval_train_seconds", train_s, "s", note=f"{ecfg.data.dataset} M3BSR {how}"))
    T = ecfg.model.T
    test = trainer.seq.split("test")
    steps = {"T": T, "T/3": max(1, round(T / 3)), "1": 1}
    ndcg: dict[str, float] = {}
    hr: dict[str, float] = {}

    def scorer(label: str, n: int) -> Callable[[], None]:
        c = copy.deepcopy(ecfg.model)
        c.inference_steps = n
        model = build_model(c, trainer.info).to(dev)
        model.load_state_dict(trainer.model.state_dict())

        def score() -> None:
            res = evaluate(model, test, dev, batch_size=ecfg.train.eval_batch_size, bf16=r.bf16,
                           seen=trainer.seq.seen_before["test"] if ecfg.train.mask_seen else None)
            ndcg[label], hr[label] = res["NDCG@10"], res["HR@10"]
        return score

    scorers = {label: scorer(label, n) for label, n in steps.items()}
    secs = r.times(scorers)
    flops = {label: counted_flops(score) for label, score in scorers.items()}
    n_users = len(test["users"])
    users = f"{n_users} test users, batches of {ecfg.train.eval_batch_size}"
    for label, n in steps.items():
        first = label == "T"
        r.add(Row(f"eval_seconds_{label}", secs[label], "s", secs[label] if first else secs["T"] / secs[label],
                  {"T": "< 10", "T/3": ">= 2.5"}.get(label, ""),
                  f"{users}, inference_steps={n}" + ("" if first else "; ratio = speed-up over T")))
    for label, n in steps.items():
        r.add(Row(f"eval_flops_{label}", flops[label] / 1e9, "GFLOP", flops["T"] / flops[label],
                  note=f"FlopCounterMode, the whole evaluation at inference_steps={n}; ratio = FLOPs at T / "
                       "FLOPs here (the speed-up over T if every operation ran at the same FLOP/s)"))
    for label, n in steps.items():
        loss = (ndcg["T"] - ndcg[label]) / ndcg["T"] if label != "T" and ndcg["T"] > 0 else None
        se = math.sqrt(max(hr[label] - ndcg[label] ** 2, 0.0) / n_users)  # per-user NDCG@10 in [0, 1], 0 unless a hit
        r.add(Row(f"eval_ndcg10_{label}", ndcg[label], "NDCG@10", loss, "<= 0.02" if label == "T/3" else "",
                  f"inference_steps={n}, standard error <= {se:.2g} (sqrt((HR@10 - NDCG@10^2) / users))"
                  + ("" if label == "T" else "; ratio = relative loss vs T")))


def _sweeps(r: _Run, m: ModelConfig, L_items: int) -> None:
    """M3BSR train-step time against L and against the catalogue size, random batches shaped as the
    trainer's rows: 2 L events per level (the default ``row_len``), each target reading its last L."""
    sz, dev = r.size, r.device
    sweep = copy.deepcopy(m)
    for k, v in sz.sweep_overrides.items():
        setattr(sweep, k, v)

    def step_time(info: DataInfo, L: int) -> float:
        info.window = L
        model = _build(sweep, info, dev)
        s = r.times({"step": r.step(model, _to(random_batch(sz.sweep_batch, 2 * L, info.n_items), dev))})["step"]
        del model
        release_memory(dev)
        return s

    what = f"M3BSR train step, random batch {sz.sweep_batch} x 2 L events per level, window L, d={sweep.d}, T={sweep.T}"
    n0 = sz.catalogues[0][1]
    info = random_info(n0, sz.feature_dims)
    first = None
    for L in sz.lengths:
        s = step_time(info, L)
        first = first or s
        r.add(Row(f"step_time_L={L}", s * 1e3, "ms", s / first, note=f"{what}, {n0} items; ratio vs L={sz.lengths[0]}"))
    first = None
    for name, n_items in sz.catalogues:
        s = step_time(random_info(n_items, sz.feature_dims), L_items)
        first = first or s
        r.add(Row(f"step_time_items={n_items}", s * 1e3, "ms", s / first,
                  note=f"{what}, L={L_items}, {name}-sized catalogue, random features {sz.feature_dims}; "
                       f"ratio vs {n0} items"))


def _mode_steps(r: _Run, size: str) -> None:
    """M3BSR's train step in each ``train_mode``, and with both chains off (cdmd and cdbd false: the
    floor of any mode that keeps the rest of the model), at the time-to-quality setting on its first
    training batch of synthetic data, timed in turn; ratio = the chain's step / this one."""
    from .time_to_quality import SIZES as TTQ  # noqa: PLC0415 (the time-to-quality setting)
    profile, overrides = TTQ[size]
    variants = {"chain": {}, "strided": {"train_mode": "strided"}, "random_t": {"train_mode": "random_t"},
                "no_chains": {"cdmd": False, "cdbd": False}}
    steps = {}
    for name, flags in variants.items():
        tr = Trainer(make_config(profile, {**overrides, "dataset": "synthetic", "model": "m3bsr",
                                           "device": str(r.device), **flags}), test=False)
        batch = _to({k: v[:tr.cfg.train.batch_size] for k, v in tr.seq.train.items()}, r.device)
        steps[name] = r.step(tr.model, batch)
    t = r.times(steps)
    for name, s in t.items():
        r.add(Row(f"step_time_mode={name}", s * 1e3, "ms", t["chain"] / s,
                  note=f"M3BSR train step, {variants[name] or 'train_mode=chain'}, the time-to-quality setting "
                       f"(profile {profile} with {overrides}); ratio = the chain's step / this one"))


# ---------------------------------------------------------------------------------------------
# Scaling: the sweeps, and the paper profile's data size (python -m m3bsr bench --scaling)
# ---------------------------------------------------------------------------------------------


def run_scaling(device: str = "auto", out: str | Path | None = None, threads: int | None = None,
                repeats: int | None = None, steps: int = 3, size: str = "full",
                log: Callable[[str], None] = print) -> list[Row]:
    """The sweeps of :func:`run_bench` (step time against L and the catalogue size, the default
    profile's model), M3BSR's step in each training mode (:func:`_mode_steps`), then ``steps`` train steps of M3BSR at the ``paper`` profile on its synthetic
    data (5,000 users, 50,000 items; ``small``: the ci profile's), as the trainer runs them: time per
    step, one validation, the process's peak memory, and the projected time of a paper-profile run
    (``min_steps`` and ``max_steps`` steps, a validation every ``eval_steps``). Writes
    ``<out>/bench-scaling-<size>-<device>.{csv,md}``."""
    if steps < 1:
        raise ConfigError(f"bench --scaling: --steps must be at least 1, got {steps}")
    sz, dev = SIZES[size], resolve_device(device)
    if threads is not None:
        torch.set_num_threads(threads)
    r = _Run(sz, dev, repeats if repeats is not None else sz.repeats, False, False, 0, log,
             Path(out) if out is not None else repo_root() / "results" / "bench")
    r.header.update({"device": _device_name(dev), "torch": torch.__version__, "threads": torch.get_num_threads(),
                     "size": f"scaling-{size}", "repeats": f"median of {r.repeats} after {sz.warmup} warm-up"})
    base = make_config(sz.profile, sz.overrides)
    _sweeps(r, base.model, base.data.max_len if size == "full" else sz.lengths[0])
    release_memory(dev)
    _mode_steps(r, size)
    release_memory(dev)

    profile = "paper" if size == "full" else "ci"
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    else:
        with contextlib.suppress(OSError):  # reset VmHWM to the current RSS: the peak of what follows
            Path("/proc/self/clear_refs").write_text("5")
    cfg = make_config(profile, {"dataset": "synthetic", "model": "m3bsr", "device": str(dev), "progress": False,
                                "sampled_negatives": 0})
    t0 = time.perf_counter()
    tr = Trainer(cfg, test=False)
    setup = time.perf_counter() - t0
    t = cfg.train
    what = (f"M3BSR, {profile} profile on its synthetic data ({cfg.data.syn_users} users, {cfg.data.syn_items} "
            f"items, {len(tr.seq.train['users'])} training rows of up to {tr.seq.train['items'].shape[-1] - 1} "
            f"events per level), batch {t.batch_size}, d={cfg.model.d}, L={cfg.data.max_len}, T={cfg.model.T}")
    log(f"scaling: {what}; data and model built in {setup:.0f} s")
    tr.train_steps(1)  # warm-up
    _sync(dev)
    t0 = time.perf_counter()
    tr.train_steps(steps)
    _sync(dev)
    step = (time.perf_counter() - t0) / steps
    r.add(Row("paper_step_time", step, "s", note=f"{what}; mean of {steps} steps after one"))
    t0 = time.perf_counter()
    tr.evaluate("valid")
    _sync(dev)
    valid = time.perf_counter() - t0
    r.add(Row("paper_validation_time", valid, "s", note=f"full ranking of {tr.seq.n_eval_users} validation users"))
    peak = (torch.cuda.max_memory_allocated(dev) / 2 ** 20 if dev.type == "cuda"
            else _rss_kib("VmHWM") / 1024)
    r.add(Row("paper_peak_memory", peak, "MiB", note="CUDA: max_memory_allocated; CPU: the process's peak RSS "
                                                     "(VmHWM, reset after the sweeps: data, model, Adam, steps, "
                                                     "validation)"))
    for name, n in (("min", t.min_steps), ("max", t.max_steps)):
        hours = (n * step + (n // t.eval_steps) * valid) / 3600
        r.add(Row(f"paper_run_hours_{name}_steps", hours, "h",
                  note=f"projected: {n} steps ({name}_steps) x step time + a validation every {t.eval_steps} steps"))
    paths = r.save()
    log(f"wrote {paths[0]} and {paths[1]} ({r.header['seconds']} s)")
    return r.rows


def write_results(rows: list[Row], header: dict[str, Any], out: Path, stem: str) -> tuple[Path, Path]:
    """``<out>/<stem>.csv`` (one line per row, header fields as ``#`` comments) and ``<stem>.md``."""
    out.mkdir(parents=True, exist_ok=True)
    device = header["device"]
    buf = io.StringIO()
    for k, v in header.items():
        buf.write(f"# {k}: {v}\n")
    w = csv.writer(buf)
    w.writerow(["measurement", "value", "unit", "ratio", "target", "met", "device", "note"])
    for r in rows:
        w.writerow([r.measurement, f"{r.value:.6g}", r.unit, "" if r.ratio is None else f"{r.ratio:.4g}",
                    r.target, r.met, device, r.note])
    csv_path = out / f"{stem}.csv"
    atomic_write_text(csv_path, buf.getvalue())
    lines = [f"# M3BSR benchmark ({header['size']})", ""]
    lines += [f"- **{k}**: {v}" for k, v in header.items() if k != "size"]
    lines += ["", "| measurement | value | unit | ratio | target | met | device | note |",
              "|---|---:|---|---:|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.measurement} | {r.value:.4g} | {r.unit} | {'' if r.ratio is None else f'{r.ratio:.3g}'} | "
                     f"{r.target} | {r.met} | {device} | {r.note} |")
    md_path = out / f"{stem}.md"
    atomic_write_text(md_path, "\n".join(lines) + "\n")
    return csv_path, md_path
