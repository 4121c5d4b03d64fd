"""The model-agnostic trainer: seeds, validation-only early stopping, atomic resumable checkpoints,
and data-parallel training with ``torchrun``.

``Trainer(cfg).fit()`` loads the data, trains ``cfg.model.model`` with Adam on CE (+ the model's
auxiliary terms), evaluates on validation every ``eval_steps`` optimiser steps, keeps the best
checkpoint by validation NDCG@10, and evaluates test once from it. ``Trainer(cfg, test=False)``
never reads the test split (tuning, docs/tuning.md); ``fit(on_validation=f)`` calls ``f(step,
valid metrics)`` after each validation and stops when it returns True (a tuner's pruner).

**Budget.** Training counts optimiser steps, whatever the dataset's size: it ends after
``max_steps`` (or an ``epochs`` cap, if set), or once ``patience_steps`` steps passed without a new
best validation NDCG@10, never before ``min_steps`` steps. Epochs only order the data: each pass over
the training rows takes them in a fresh shuffled order. ``history.csv`` has one row per validation:
its ``step``, ``epoch`` (passes made, fractional), each loss term's mean over the steps since the
previous validation, the validation metrics and ``seconds`` (training time of those steps,
validation excluded). Each validation also writes a log line (logger ``m3bsr.train``: where the run
stands, the loss terms, NDCG@10, the best so far, the patience left), appended to ``<out>/train.log``.

Everything a run needs to resume exactly (model, optimiser, every RNG state, step count, the
position in the pass in progress, best so far, history) is in ``<out>/last.pt``, written at every
validation.

**Crash safety.** Every file in a run folder (``last.pt``, ``best.pt``, ``history.csv``,
``config.json``, ``metrics.json``) is written to a temporary file in the same folder, fsynced and
renamed over the old one (``os.replace`` is atomic), so a crash or ``kill -9`` at any moment leaves
the previous good version in place. A checkpoint starts with a magic tag and the SHA-256 of its
payload: a truncated or corrupted file raises :class:`CheckpointError` and is never silently
loaded, nor is a checkpoint saved for another config or dataset. Stray temporary files from a
killed run are removed when the run restarts (``train.log``, a log, is appended to line by line).
``--resume`` after a crash gives a ``metrics.json`` byte-identical to an uninterrupted run with the
same seed on the same device (``metrics.json`` holds no timings; ``history.csv`` does, in its
``seconds`` column), also when the crash came in the middle of an epoch.

**Determinism.** The same config and seed on the same device give the same ``metrics.json``;
evaluation is deterministic, so evaluating one checkpoint twice gives the same numbers. On CUDA
the trainer sets ``CUBLAS_WORKSPACE_CONFIG`` and ``torch.use_deterministic_algorithms(True,
warn_only=True)``; kernels with no deterministic version (PyTorch warns about the memory-efficient
attention backward) keep running, so on CUDA bitwise equality is the rule seen, not a guarantee.

**Distributed data parallel.** Under ``torchrun`` (``WORLD_SIZE`` in the environment) every
process joins a process group (gloo on CPU, nccl on CUDA, one GPU per local rank) and trains a
``DistributedDataParallel`` copy of the model. Each epoch's shuffled order is drawn from the same
seeded generator on every rank; each global batch of ``batch_size`` rows is split into ``world``
contiguous shards (``batch_size // world`` rows per rank), and each rank's loss is weighted by its
share of the global batch's targets, so the averaged gradient is the single-process gradient of
the CE term (auxiliary terms are weighted the same way). Evaluation batches are dealt round-robin
to the ranks and the ranks are all-reduced, so metrics equal a single-process evaluation exactly.
Rank 0 alone writes checkpoints, history, metrics and log lines; the others wait at a barrier.
Dropout and other training noise differ per rank (seeded from ``(seed, rank)``), so with dropout > 0
a multi-process run is statistically, not bitwise, equivalent to a single-process one.
"""
from __future__ import annotations

import contextlib
import csv
import ctypes
import functools
import hashlib
import inspect
import io
import json
import logging
import os
import pickle
import platform
import random
import re
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn as nn

from .config import Config, ConfigError, repo_root
from .data.schema import Dataset, DataError
from .data.sequences import SequenceData
from .files import atomic_write_bytes, atomic_write_text, remove_stale_temporaries
from .metrics import metrics_from_ranks, ranks
from .models.base import DataInfo, Recommender
from .models.registry import build_model

SELECT_METRIC = "NDCG@10"
NEGATIVES_SEED = 20250805  # one fixed draw of sampled negatives, shared by every model and seed
_MAGIC = b"M3BSRCK1"
log = logging.getLogger(__name__)  # one line per validation; Trainer.fit also writes them to <out>/train.log


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # mallopt() parameters, from glibc's <malloc.h>
_GLIBC_DEFAULTS = {_M_TRIM_THRESHOLD: 128 * 1024, _M_MMAP_MAX: 65536}
_kept_depth = 0  # how many kept_host_memory() blocks are open


def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc (it has ``mallopt`` and ``malloc_trim``), else None."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def trim_host_memory() -> None:
    """Hand the memory this process has freed back to the system (glibc; elsewhere a no-op)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


@contextlib.contextmanager
def kept_host_memory() -> Iterator[None]:
    """Inside the block, memory freed by the process stays in it for the next allocation; when the
    outermost block ends, it goes back to the system.

    glibc serves each allocation over its mmap threshold (128 KiB, rising to at most 32 MiB) with
    fresh pages from the kernel and unmaps them when the tensor is freed, so every train step and
    every evaluation batch faults its large tensors in anew, a page at a time, and the kernel zeroes
    each page (the bench's ``host_memory_kept_*`` rows count the faults and time the difference).
    Inside, glibc takes every allocation from its heap and never shrinks it (``mallopt``: no mmap,
    no trimming), so a step reuses the previous step's pages, as PyTorch's caching allocator does
    with GPU memory. Only where memory comes from changes, never a number computed. Not glibc
    (macOS, Windows, musl): nothing changes. Blocks nest; ``mallopt`` settings are process-wide.
    After the outermost block glibc's defaults return, and the heap keeps its (handed back) free
    space: a later allocation that fits a free chunk is served from it, as glibc does with any heap
    chunk, and stays in the process after it is freed until the next ``trim_host_memory()``.
    """
    global _kept_depth
    libc = _glibc()
    if libc is None:
        yield
        return
    if _kept_depth == 0:
        libc.mallopt(_M_MMAP_MAX, 0)
        libc.mallopt(_M_TRIM_THRESHOLD, -1)  # -1: never trim (man mallopt)
    _kept_depth += 1
    try:
        yield
    finally:
        _kept_depth -= 1
        if _kept_depth == 0:
            for param, value in _GLIBC_DEFAULTS.items():
                libc.mallopt(param, value)
            libc.malloc_trim(0)


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, truncated, corrupted or from another config/dataset."""


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _seed_noise(seeds: np.ndarray) -> None:
    """Seed the global RNGs (dropout, diffusion noise) from two 32-bit words; the data order has its own."""
    random.seed(int(seeds[0]))
    np.random.seed(int(seeds[1]))
    torch.manual_seed(int(seeds[0]) << 32 | int(seeds[1]))


def resolve_device(name: str, local_rank: int | None = None) -> torch.device:
    """``auto`` -> cuda when available; under torchrun, ``auto``/``cuda`` -> ``cuda:<local_rank>``."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise ConfigError(f"unknown device {name!r}; expected auto, cpu or cuda[:N]")
    if name == "cuda" and local_rank is not None:
        name = f"cuda:{local_rank}"
    return torch.device(name)


# ---------------------------------------------------------------- torch.distributed

@dataclass(frozen=True)
class Dist:
    """This process's place in a torchrun job; ``Dist()`` = a plain single process."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    @contextlib.contextmanager
    def local_main_first(self) -> Iterator[None]:
        """Local rank 0 runs the body first (filling disk caches), then the other local ranks."""
        if self.enabled and self.local_rank != 0:
            self.barrier()
        try:
            yield
        finally:
            if self.enabled and self.local_rank == 0:
                self.barrier()  # also on error, so the others fail the same way instead of hanging


def torchrun_env() -> bool:
    """Whether this process was started by torchrun with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed(device: torch.device) -> Dist:
    """Join the process group described by torchrun's environment (gloo on CPU, nccl on CUDA)."""
    if not torchrun_env():
        return Dist()
    import torch.distributed as dist  # noqa: PLC0415
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def close_distributed() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


class _Loss(nn.Module):
    """``forward(batch) = model.loss(batch)``, so DistributedDataParallel can wrap the loss."""

    def __init__(self, model: Recommender):
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.model.loss(batch)


# ---------------------------------------------------------------- checkpoints

def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Checkpoint file = magic + sha256(payload) + payload, written atomically. ``state`` holds only
    tensors and plain values (dict, list, tuple, str, int, float, bool, None): :func:`load_checkpoint`
    refuses anything else."""
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = buf.getvalue()
    atomic_write_bytes(path, _MAGIC + hashlib.sha256(payload).digest() + payload)


def load_checkpoint(path: Path, map_location="cpu") -> dict[str, Any]:
    """Load and verify a checkpoint; a truncated or corrupted file raises CheckpointError, and so does one
    holding any pickled object other than tensors and plain values (``torch.load(weights_only=True)``:
    unpickling such an object could run code)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no checkpoint there")
    raw = path.read_bytes()
    if len(raw) < len(_MAGIC) + 32 or not raw.startswith(_MAGIC):
        raise CheckpointError(f"{path}: not an m3bsr checkpoint (bad header or truncated)")
    digest, payload = raw[len(_MAGIC):len(_MAGIC) + 32], raw[len(_MAGIC) + 32:]
    if hashlib.sha256(payload).digest() != digest:
        raise CheckpointError(f"{path}: checksum mismatch (truncated or corrupted); refusing to load it")
    try:
        return torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f"it names {found.group(1)}" if found else str(e).splitlines()[0]
        raise CheckpointError(f"{path}: holds a pickled object that is not a tensor or a plain value ({what}); "
                              "refusing to unpickle it, as that could run code (a checkpoint saved before the RNG "
                              "states were stored as plain values holds numpy arrays: train that run again)") from None


def _rng_state(gen: torch.Generator) -> dict[str, Any]:
    """Every RNG state as tensors and plain values (python: [version, 625 ints, gauss]; numpy: the
    MT19937 key as 624 ints, its position and cached Gaussian), so checkpoints load with weights_only."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)
    return {"python": [version, list(internal), gauss],
            "numpy": {"key": np_state["state"]["key"].tolist(), "pos": int(np_state["state"]["pos"]),
                      "has_gauss": int(np_state["has_gauss"]), "gauss": float(np_state["gauss"])},
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "data": gen.get_state()}


def _set_rng_state(s: dict[str, Any], gen: torch.Generator) -> None:
    """The inverse of :func:`_rng_state`."""
    version, internal, gauss = s["python"]
    random.setstate((version, tuple(internal), gauss))
    n = s["numpy"]
    key = np.array(n["key"], dtype=np.uint32)
    np.random.set_state({"bit_generator": "MT19937", "state": {"key": key, "pos": n["pos"]},
                         "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available():  # saved with more GPUs visible: the first ones' states
        torch.cuda.set_rng_state_all(s["cuda"][:torch.cuda.device_count()])
    gen.set_state(s["data"])


# ---------------------------------------------------------------- data -> model inputs

def load_data(cfg: Config) -> Dataset:
    from .data.sources import load_dataset  # noqa: PLC0415 (heavy encoders load lazily inside)
    return load_dataset(cfg.data)


def data_info(ds: Dataset, seq: SequenceData) -> DataInfo:
    counts = torch.bincount(seq.train["targets"].flatten(), minlength=ds.n_items + 1).float()
    counts[0] = 0
    return DataInfo(n_items=ds.n_items, levels=list(ds.levels),
                    features={m: torch.from_numpy(x) for m, x in ds.features.items()},
                    feature_mask={m: torch.from_numpy(x) for m, x in ds.feature_mask.items()},
                    item_counts=counts, window=seq.L)


def sampled_negatives(seq: SequenceData, split: str, n: int, cache_dir: Path) -> torch.Tensor:
    """``(rows, n)`` items the row's user never interacted with, drawn once and saved to disk.

    A user who has seen every item gets negatives from all items but the target."""
    rows = seq.split(split)["users"].numpy()
    path = Path(cache_dir) / f"negatives-{seq.ds.fingerprint()}-{split}-n{n}-seed{NEGATIVES_SEED}.npy"
    if path.exists():
        try:
            neg = np.load(path)
            if neg.shape == (len(rows), n) and (n == 0 or 1 <= neg.min() and neg.max() <= seq.n_items):
                return torch.from_numpy(neg)
        except (OSError, ValueError, EOFError):
            pass  # unreadable (truncated, corrupted: wrong shape, ids outside 1..n_items): draw again below
    rng = np.random.default_rng(NEGATIVES_SEED)
    neg = np.zeros((len(rows), n), np.int64)
    targets = seq.split(split)["targets"][:, 0].numpy()
    catalogue = np.arange(1, seq.n_items + 1)
    for r, u in enumerate(rows):
        pool = np.setdiff1d(catalogue, seq.seen[int(u)], assume_unique=True)
        if len(pool) == 0:  # the user has seen every item: any item but the target
            pool = np.setdiff1d(catalogue, targets[r:r + 1])
        if len(pool) == 0:
            raise DataError("a catalogue of one item: no negatives to sample (set sampled_negatives=0)",
                            file=seq.ds.name)
        neg[r] = rng.choice(pool, size=n, replace=len(pool) < n)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # e.g. cache_dir names a file
        raise DataError(f"cannot use it as the cache folder ({e.strerror})", file=path.parent) from None
    buf = io.BytesIO()
    np.save(buf, neg)
    atomic_write_bytes(path, buf.getvalue())
    return torch.from_numpy(neg)


@torch.no_grad()
@kept_host_memory()
def split_ranks(model: Recommender, split: dict[str, torch.Tensor], device: torch.device, *,
                batch_size: int = 512, negatives: torch.Tensor | None = None,
                seen: tuple[torch.Tensor, torch.Tensor] | None = None, bf16: bool = False,
                dist: Dist | None = None, score: Callable[[dict[str, torch.Tensor]], torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """1-based rank of each row's target: among all items ``(n,)``, and among the target + its fixed
    ``negatives`` ``(n,)`` (None without negatives). Pessimistic ties (:func:`m3bsr.metrics.ranks`).

    ``seen``: (``ptr``, ``items``), row i's items ``items[ptr[i]:ptr[i+1]]`` are left out of the
    full ranking, never the target itself (``mask_seen``: :attr:`SequenceData.seen_before`).

    Rows are scored in batches of ``batch_size``. With ``dist`` (torchrun), batch ``c`` is scored
    by rank ``c % world`` and the per-row ranks are all-reduced: every rank gets the ranks of a
    single-process evaluation, bit for bit (the same batches, so the same scores).

    ``score``: what scores a batch (default ``model.score``); the trainer passes a compiled one
    under ``cuda_graphs``, whose output buffer the next batch's replay reuses (so it is copied here).
    """
    if batch_size < 1:
        raise ConfigError(f"eval_batch_size must be a positive integer, got {batch_size}")
    model.eval()
    rank, world = (dist.rank, dist.world) if dist is not None else (0, 1)
    n = len(split["users"])
    full = torch.zeros(n, dtype=torch.long, device=device)  # 1-based rank per row; 0 = scored elsewhere
    sampled = torch.zeros(n, dtype=torch.long, device=device) if negatives is not None else None
    for c, start in enumerate(range(0, n, batch_size)):
        if c % world != rank:
            continue
        stop = min(start + batch_size, n)
        b = {k: v[start:stop].to(device) for k, v in split.items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            s = model.score(b).float() if score is None else score(b).float().clone()  # (B, N+1)
        target = b["targets"][:, 0]
        if seen is not None:  # every item seen strictly before the target is removed, never the target
            ptr, items = seen
            lo, hi = int(ptr[start]), int(ptr[stop])
            row = torch.repeat_interleave(torch.arange(stop - start), ptr[start + 1:stop + 1] - ptr[start:stop])
            keep = s.gather(1, target[:, None])
            s[row.to(device), items[lo:hi].to(device)] = float("-inf")
            s.scatter_(1, target[:, None], keep)
        full[start:stop] = ranks(s[:, 1:], target - 1)
        if sampled is not None:
            cand = torch.cat([target[:, None], negatives[start:stop].to(device)], 1)
            sampled[start:stop] = ranks(s.gather(1, cand), torch.zeros_like(target))
    if world > 1:
        torch.distributed.all_reduce(full)
        if sampled is not None:
            torch.distributed.all_reduce(sampled)
    return full.cpu(), (sampled.cpu() if sampled is not None else None)


def evaluate(model: Recommender, split: dict[str, torch.Tensor], device: torch.device, **kw: Any) -> dict[str, float]:
    """Full-ranking metrics (and sampled 1+N metrics when ``negatives`` is given) on one split;
    keyword arguments as :func:`split_ranks`."""
    return rank_metrics(*split_ranks(model, split, device, **kw))


def rank_metrics(full: torch.Tensor, sampled: torch.Tensor | None) -> dict[str, float]:
    """The metrics of :func:`split_ranks`'s per-row ranks: full ranking, and ``sampled_*`` (1+N) with ``sampled``."""
    out = metrics_from_ranks(full)
    if sampled is not None:
        out.update({f"sampled_{k}": v for k, v in metrics_from_ranks(sampled).items()})
    return out


def shard_batches(split: dict[str, torch.Tensor], batch_size: int, generator: torch.Generator,
                  rank: int = 0, world: int = 1) -> Iterator[tuple[torch.Tensor, float]]:
    """This rank's rows of each shuffled global batch, and the weight of its loss.

    The order is ``randperm(n, generator)`` (the same on every rank); global batch ``j`` is
    ``order[j*batch_size:(j+1)*batch_size]``, split into ``world`` contiguous shards. weight =
    ``world * (targets in the shard) / (targets in the global batch)``: DDP averages gradients over
    ranks, so the weighted mean-CE gradients add up to the global batch's mean-CE gradient. A
    rank whose shard is empty (last global batch smaller than ``world``) gets the batch's first
    row with weight 0, so it still takes part in the gradient all-reduce. ``world=1``: weight 1.
    """
    n = len(split["users"])
    order = torch.randperm(n, generator=generator)
    valid = (split["targets"] > 0).sum(1) if world > 1 else None
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        if world == 1:
            yield idx, 1.0
            continue
        mine = torch.tensor_split(idx, world)[rank]
        if len(mine) == 0:
            yield idx[:1], 0.0
            continue
        yield mine, world * valid[mine].sum().item() / max(valid[idx].sum().item(), 1)


# ---------------------------------------------------------------- the trainer

class Trainer:
    """Train one model on one dataset. ``out`` holds config.json, history.csv, checkpoints, metrics.json,
    train.log."""

    def __init__(self, cfg: Config, out: str | Path | None = None, dataset: Dataset | None = None,
                 test: bool = True):
        """``test=False`` (tuning): the test split is never read, neither its negatives drawn nor
        its metrics computed; :meth:`evaluate` and :meth:`ranks` refuse it."""
        self.cfg = cfg
        self.splits = ("valid", "test") if test else ("valid",)  # the evaluation splits this trainer reads
        self.out = Path(out) if out is not None else None
        if self.out is not None and self.out.exists() and not self.out.is_dir():
            raise ConfigError(f"{self.out}: exists and is not a folder (the run folder)")
        local_rank = int(os.environ.get("LOCAL_RANK", "0")) if torchrun_env() else None
        self.device = resolve_device(cfg.train.device, local_rank)
        if self.device.type == "cuda":  # same seed, same GPU -> same numbers
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
        self.dist = init_distributed(self.device)
        cache = Path(cfg.data.cache_dir) if cfg.data.cache_dir else repo_root() / "data" / "cache"
        n = cfg.train.sampled_negatives
        with self.dist.local_main_first():  # one process per machine fills the feature/negatives caches
            self.ds = dataset if dataset is not None else load_data(cfg)
            self.seq = SequenceData(self.ds, cfg.data.max_len, cfg.data.min_deep, cfg.data.row_len)
            if self.seq.n_eval_users == 0:
                df = self.ds.interactions
                most = int((df["level"] == self.ds.n_levels - 1).groupby(df["user"]).sum().max())
                hint = f" (--set min_deep={most} evaluates the users who have {most})" if most >= 2 else ""
                raise DataError(f"no user has {cfg.data.min_deep} or more events of the deep level "
                                f"{self.ds.levels[-1]!r}, the most any user has is {most}: nothing to evaluate{hint}",
                                file=self.ds.name)
            self.negatives = {s: sampled_negatives(self.seq, s, n, cache) for s in self.splits} if n else {}
        set_seed(cfg.train.seed)
        self.info = data_info(self.ds, self.seq)
        self.model = build_model(cfg.model, self.info).to(self.device)
        self.gen = torch.Generator().manual_seed(cfg.train.seed)  # the data order: the same on every rank
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.graphs = cfg.model.cuda_graphs and self.device.type == "cuda"  # see _compiled
        if cfg.model.cuda_graphs and not self.graphs:
            log.warning("cuda_graphs: %s is not a CUDA device; training and evaluation run without CUDA graphs%s",
                        self.device, " (torch.compile's default mode: compile=true)" if cfg.model.compile else "")
        self.opt = (torch.optim.Adam(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay,
                                     **({"fused": True} if self.graphs else {}))  # one kernel per step, not per tensor
                    if params else None)
        if self.dist.enabled:  # per-rank training noise (dropout, diffusion steps)
            _seed_noise(np.random.SeedSequence([cfg.train.seed, self.dist.rank]).generate_state(2))
        self.loss_fn: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None  # see _wrap
        self.score_fn: Callable[[dict[str, torch.Tensor]], torch.Tensor] | None = None  # under cuda_graphs
        self.steps_per_epoch = -(-len(self.seq.train["users"]) // cfg.train.batch_size)  # global batches in a pass
        # Where training stands: optimiser steps taken, passes over the training rows done, global batches
        # done of the pass in progress, and the data order's generator state from before that pass drew its order.
        self.steps, self.epoch, self.batch, self.epoch_rng = 0, 0, 0, self.gen.get_state()
        self.best, self.best_step, self.history = -1.0, -1, []  # best validation NDCG@10 and its step
        self._batches: list[tuple[torch.Tensor, float]] | None = None  # the pass in progress (see _next_batch)

    # -- checkpoints
    def _state(self) -> dict[str, Any]:
        """The checkpoint dict (a collective under torchrun: every rank must call it)."""
        rng = {**_rng_state(self.gen), "data": self.epoch_rng}  # a resumed pass draws its order again
        state = {"model": self.model.state_dict(), "opt": self.opt.state_dict() if self.opt else None,
                 "rng": rng, "steps": self.steps, "epoch": self.epoch, "batch": self.batch, "best": self.best,
                 "best_step": self.best_step, "history": self.history,
                 "config": self.cfg.to_dict(), "config_hash": self.cfg.hash(), "data_hash": self.ds.fingerprint()}
        if self.dist.enabled:
            every = [None] * self.dist.world
            torch.distributed.all_gather_object(every, rng)
            state["rng_ranks"] = every
        return state

    def _check(self, state: dict[str, Any], path: Path) -> None:
        if state.get("data_hash") != self.ds.fingerprint():
            raise CheckpointError(f"{path}: saved for another dataset (data hash {state.get('data_hash')})")
        if state.get("config_hash") != self.cfg.hash():
            raise CheckpointError(f"{path}: saved with another config (hash {state.get('config_hash')}, "
                                  f"this run {self.cfg.hash()})")

    def _read(self, path: Path, missing_ok: bool = False) -> dict[str, Any] | None:
        """Rank 0 reads and verifies ``path``; every rank gets its state or the same CheckpointError."""
        state, err = None, None
        if self.dist.main:
            try:
                if not (missing_ok and not path.exists()):
                    state = load_checkpoint(path, "cpu")
                    self._check(state, path)
            except CheckpointError as e:
                state, err = None, str(e)
        if self.dist.enabled:
            box = [state, err]
            torch.distributed.broadcast_object_list(box, src=0)
            state, err = box
        if err is not None:
            raise CheckpointError(err)
        return state

    def resume(self) -> bool:
        """Restore ``<out>/last.pt`` if present; returns whether a checkpoint was restored.

        A truncated or corrupted ``last.pt`` raises CheckpointError (it is never skipped silently:
        delete it to start over, or keep ``best.pt`` for evaluation).
        """
        path = self.out / "last.pt"
        state = self._read(path, missing_ok=True)
        if state is None:
            return False
        self.model.load_state_dict(state["model"])
        if self.opt:
            self.opt.load_state_dict(state["opt"])
        every = state.get("rng_ranks") or [state["rng"]]
        same_world = len(every) == self.dist.world
        _set_rng_state(every[self.dist.rank] if same_world else state["rng"], self.gen)  # data order: rank 0's
        if not same_world:
            warnings.warn(f"{path}: saved by {len(every)} process(es), resumed by {self.dist.world}; the data "
                          "order continues exactly, per-rank training noise is reseeded", stacklevel=2)
            if self.dist.rank > 0:
                seeds = np.random.SeedSequence([self.cfg.train.seed, self.dist.rank, state["steps"]]).generate_state(2)
                _seed_noise(seeds)
        for k in ("steps", "epoch", "batch", "best", "best_step", "history"):
            setattr(self, k, state[k])
        self.epoch_rng, self._batches = self.gen.get_state(), None
        return True

    def load_best(self) -> None:
        self.model.load_state_dict(self._read(self.out / "best.pt")["model"])

    # -- loop
    def _wrap(self) -> Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
        """The training loss, built on first use: under torchrun a DistributedDataParallel that takes the
        weights from rank 0 (evaluation alone never wraps), then ``torch.compile`` if configured."""
        if self.loss_fn is None:
            loss = self.model.loss
            if self.dist.enabled and self.opt is not None:  # (a model without parameters has nothing to sync)
                from torch.nn.parallel import DistributedDataParallel  # noqa: PLC0415
                # buffers are constants (features, schedules): synced once at wrapping, not every step
                newer = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                loss = DistributedDataParallel(
                    _Loss(self.model), device_ids=[self.device] if self.device.type == "cuda" else None,
                    find_unused_parameters=True,  # ablations may leave parameters out of the loss
                    **{"forward_sync_buffers" if newer else "broadcast_buffers": False})
            self.loss_fn = self._compiled(loss)
        return self.loss_fn

    def _compiled(self, fn: Callable) -> Callable:
        """``fn`` as it runs: under ``cuda_graphs`` on CUDA, ``torch.compile(mode="reduce-overhead",
        dynamic=False)``, which records one CUDA graph per input shape (a pass has two: full batches
        and the last one) and replays it, one launch instead of hundreds of small kernels; under
        ``compile``, torch.compile's default mode; else ``fn`` itself (eager)."""
        if self.graphs:
            return torch.compile(fn, mode="reduce-overhead", dynamic=False)
        return torch.compile(fn) if self.cfg.model.compile else fn

    def _eval_args(self, split: str) -> tuple:
        if split not in self.splits:
            raise ConfigError(f"this trainer evaluates {', '.join(self.splits)} only (made with test=False), not {split!r}")
        t = self.cfg.train
        if self.graphs and self.score_fn is None:
            self.score_fn = torch.compile(self.model.score, mode="reduce-overhead", dynamic=False)
        return (self.model, self.seq.split(split), self.device), dict(
            batch_size=t.eval_batch_size, negatives=self.negatives.get(split),
            seen=self.seq.seen_before[split] if t.mask_seen else None, bf16=t.bf16, dist=self.dist,
            score=self.score_fn)

    def ranks(self, split: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The current model's per-row target ranks on ``split`` (full, sampled): see :func:`split_ranks`."""
        args, kw = self._eval_args(split)
        return split_ranks(*args, **kw)

    def evaluate(self, split: str) -> dict[str, float]:
        args, kw = self._eval_args(split)
        return evaluate(*args, **kw)

    def budget(self) -> int:
        """The most optimiser steps this run takes: ``max_steps``, or fewer under an ``epochs`` cap."""
        t = self.cfg.train
        return t.max_steps if t.epochs is None else min(t.max_steps, t.epochs * self.steps_per_epoch)

    def _next_batch(self) -> tuple[torch.Tensor, float]:
        """This rank's rows of the next global batch and its loss weight (:func:`shard_batches`).

        A pass over the training rows draws its order from the generator as it stood when the pass
        began (``epoch_rng``, saved in checkpoints), so a run resumed in the middle of a pass draws
        the same order again and goes on at the same batch."""
        if self._batches is None:
            self.gen.set_state(self.epoch_rng)
            self._batches = list(shard_batches(self.seq.train, self.cfg.train.batch_size, self.gen,
                                               self.dist.rank, self.dist.world))
        batch = self._batches[self.batch]
        self.batch += 1
        if self.batch == len(self._batches):  # the pass is done: the next one draws a new order
            self.epoch, self.batch, self.epoch_rng, self._batches = self.epoch + 1, 0, self.gen.get_state(), None
        return batch

    @kept_host_memory()  # each step reuses the memory the step before freed
    def train_steps(self, n: int, bar=None) -> dict[str, float]:
        """``n`` optimiser steps, the data order going on where the last step left it (a new shuffled
        order at each pass); returns each loss term's mean over the ``n`` steps (under torchrun: of
        the global batches, the same on every rank). ``bar``: a progress bar advanced per step."""
        t, dev, world = self.cfg.train, self.device, self.dist.world
        loss_fn = self._wrap()
        self.model.train()
        sums: dict[str, torch.Tensor] = {}
        rows = self.seq.train
        for _ in range(n):
            idx, weight = self._next_batch()
            b = {k: v[idx].to(dev, non_blocking=True) for k, v in rows.items()}
            if self.graphs:  # the last step's outputs (its loss terms) may be overwritten from here on
                torch.compiler.cudagraph_mark_step_begin()
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=t.bf16):
                terms = loss_fn(b)
            loss = terms["loss"] if world == 1 else terms["loss"] * weight
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            for k, v in terms.items():  # sum over ranks of weight/world * term = the global batch's term
                v = v.detach().float()
                sums[k] = sums.get(k, 0) + (v if world == 1 else v * (weight / world))
            self.steps += 1
            if bar is not None:
                bar.update(1)
        if world > 1 and sums:
            keys = list(sums)  # the same insertion order on every rank
            total = torch.stack([sums[k] for k in keys])
            torch.distributed.all_reduce(total)
            sums = dict(zip(keys, total))
        return {k: (v / max(n, 1)).item() for k, v in sums.items()}  # one sync per call

    def train_epoch(self) -> dict[str, float]:
        """The rest of the pass in progress (a whole pass from its start): :meth:`train_steps`."""
        return self.train_steps(self.steps_per_epoch - self.batch)

    def _stopped(self) -> bool:
        """The budget is spent, or early stopping: ``patience_steps`` without a new best, past ``min_steps``."""
        t = self.cfg.train
        waited = self.steps - self.best_step
        return self.steps >= self.budget() or (self.best_step >= 0 and self.steps >= t.min_steps
                                               and waited >= t.patience_steps)

    def fit(self, resume: bool = False,
            on_validation: Callable[[int, dict[str, float]], bool] | None = None) -> dict[str, Any]:
        """Train (:meth:`train`), then evaluate valid and test (valid only with ``test=False``) once with
        the best validation weights; writes ``<out>/metrics.json`` and returns its dict. Progress goes to
        the logger ``m3bsr.train`` and, with a run folder, to ``<out>/train.log`` (appended to).
        ``on_validation(step, valid metrics)`` is called after each validation; True stops training
        there (a tuner's pruner), ``stopped_by_callback`` in the result says so."""
        main = self.dist.main
        handler = _log_to(self.out / "train.log") if self.out is not None and main else None
        try:
            resumed = False
            if self.out is not None:
                if main:
                    self.out.mkdir(parents=True, exist_ok=True)
                    remove_stale_temporaries(self.out)
                resumed = resume and self.resume()
                if resumed and main:
                    self._write_history()  # a crash may have come between last.pt and history.csv
                elif main:  # a fresh start: no earlier run's results next to this run's config
                    for name in ("metrics.json", "history.csv"):
                        (self.out / name).unlink(missing_ok=True)
                if main:
                    atomic_write_text(self.out / "config.json", json.dumps(self.cfg.to_dict(), indent=2))
            stopped = False
            if self.model.trainable:
                stopped = self.train(resumed, on_validation)
            else:
                if main:
                    log.info("%s on %s: nothing to train", self.cfg.model.model, self.ds.name)
                if self.out is not None:
                    state = self._state()
                    if main:
                        save_checkpoint(self.out / "best.pt", state)
                    self.dist.barrier()
            ranked = {s: self.ranks(s) for s in self.splits}  # (full, sampled) per-row ranks of each split
            result = {**{s: rank_metrics(*ranked[s]) for s in self.splits}, "best_step": self.best_step,
                      "best_epoch": self._epochs(self.best_step) if self.best_step >= 0 else -1,
                      "model": self.cfg.model.model, "dataset": self.ds.name, "n_eval_users": self.seq.n_eval_users}
            if stopped:
                result["stopped_by_callback"] = True
            if self.out is not None:
                if main:  # ranks.npz first: a run with metrics.json is finished, its ranks with it
                    save_ranks(self.out / RANKS, {s: (self.seq.split(s)["users"], *ranked[s]) for s in self.splits})
                    atomic_write_text(self.out / "metrics.json", json.dumps(result, indent=2))
                self.dist.barrier()
            if main:
                where = f"; {self.out / 'metrics.json'}" if self.out else ""
                if "test" in result:
                    log.info("test %s %.4f (valid %.4f)%s", SELECT_METRIC, result["test"][SELECT_METRIC],
                             result["valid"][SELECT_METRIC], where)
                else:
                    log.info("valid %s %.4f (test not read)%s", SELECT_METRIC, result["valid"][SELECT_METRIC], where)
            return result
        finally:
            if handler is not None:
                log.removeHandler(handler)
                handler.close()

    def train(self, resumed: bool = False,
              on_validation: Callable[[int, dict[str, float]], bool] | None = None) -> bool:
        """Train until the budget is spent or early stopping ends the run (:meth:`_stopped`), validating
        every ``eval_steps`` steps and at the end of the budget; a checkpoint (``last.pt``, and
        ``best.pt`` at a new best) and a history row follow each validation, then
        ``on_validation(step, valid metrics)``, whose True ends training there. Ends holding the weights
        of the best validation; returns whether ``on_validation`` ended it."""
        t, main = self.cfg.train, self.dist.main
        if not self.steps_per_epoch:
            raise DataError("no training rows: no user has a deep event before their validation target",
                            file=self.ds.name)
        budget = self.budget()
        if main:
            log.info("%s on %s: %d training rows, %d steps of batch %d per epoch; budget %d steps, validation "
                     "every %d, patience %d steps, no early stop before step %d%s%s", self.cfg.model.model,
                     self.ds.name, len(self.seq.train["users"]), self.steps_per_epoch, t.batch_size, budget,
                     t.eval_steps, t.patience_steps, t.min_steps, f"; run folder {self.out}" if self.out else "",
                     f"; resumed at step {self.steps}" if resumed else "")
        self.best_model = None
        bar = progress_bar(budget, self.steps, f"{self.cfg.model.model} {self.ds.name}", t.progress and main)
        stopped = False
        with bar, _logging_beside(bar):
            while not stopped and not self._stopped():
                t0 = time.perf_counter()
                losses = self.train_steps(min(t.eval_steps - self.steps % t.eval_steps, budget - self.steps), bar)
                seconds = time.perf_counter() - t0
                valid = self.evaluate("valid")  # the same numbers on every rank: the same decisions
                better = valid[SELECT_METRIC] > self.best
                if better:
                    self.best, self.best_step = valid[SELECT_METRIC], self.steps
                    self.best_model = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
                self.history.append({"step": self.steps, "epoch": self._epochs(self.steps), **losses,
                                     **{f"valid_{k}": v for k, v in valid.items()}, "seconds": round(seconds, 3)})
                if self.out is not None:
                    state = self._state()
                    if main:
                        if better:
                            save_checkpoint(self.out / "best.pt", state)
                        save_checkpoint(self.out / "last.pt", state)  # after best.pt: a resume redoes these steps
                        self._write_history()
                    self.dist.barrier()
                if main:
                    if not bar.disable:
                        bar.set_postfix(valid=f"{valid[SELECT_METRIC]:.4f}", best=f"{self.best:.4f}", refresh=False)
                    log.info(self._report(losses, valid[SELECT_METRIC], seconds))
                stopped = on_validation is not None and bool(on_validation(self.steps, valid))
        if main:
            why = ("stopped by on_validation" if stopped else f"budget of {budget} steps spent"
                   if self.steps >= budget else f"early stop: {self.steps - self.best_step} steps without a new best")
            log.info("stopped at step %d (%s); best valid %s %.4f at step %d", self.steps, why, SELECT_METRIC,
                     self.best, self.best_step)
        if self.best_model is not None:
            self.model.load_state_dict(self.best_model)
        elif self.out is not None and self.best_step > 0:  # resumed after the best validation
            self.load_best()
        return stopped

    def _epochs(self, steps: int) -> float:
        """Passes over the training rows that ``steps`` steps make (3 decimals)."""
        return round(steps / self.steps_per_epoch, 3)

    def _report(self, losses: dict[str, float], valid: float, seconds: float) -> str:
        """The log line of a validation: where training stands, the loss terms' means since the last
        validation, validation NDCG@10, the best so far and the patience left."""
        t = self.cfg.train
        left = max(t.patience_steps - (self.steps - self.best_step), 0)
        floor = f", no stop before step {t.min_steps}" if self.steps < t.min_steps else ""
        terms = " ".join(f"{k} {v:.4f}" for k, v in losses.items())
        return (f"step {self.steps}/{self.budget()} epoch {self._epochs(self.steps):.2f} | {terms} | valid "
                f"{SELECT_METRIC} {valid:.4f} | best {self.best:.4f} at step {self.best_step} | patience "
                f"{left}/{t.patience_steps} steps left{floor} | {seconds:.1f} s")

    def _write_history(self) -> None:
        keys = list(dict.fromkeys(k for row in self.history for k in row))
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=keys)
        w.writeheader()
        w.writerows(self.history)
        atomic_write_text(self.out / "history.csv", buf.getvalue())


def _log_to(path: Path) -> logging.Handler:
    """A handler appending this module's records to ``path`` (the caller removes it when done). The
    logger takes INFO records unless its level was set."""
    handler = logging.FileHandler(path, mode="a", encoding="utf-8", delay=True)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    if log.level == logging.NOTSET:
        log.setLevel(logging.INFO)
    log.addHandler(handler)
    return handler


def _in_jupyter() -> bool:
    """Whether this process is a Jupyter kernel (IPython's IPKernelApp, as tqdm.auto tells it)."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    return shell is not None and "IPKernelApp" in shell.config


def progress_bar(total: int, initial: int, desc: str, enabled: bool, unit: str = "step"):
    """A ``tqdm.auto`` bar (a widget in Jupyter, text in a terminal). Shown where someone watches:
    stderr a terminal, or a Jupyter kernel; never with ``CI=true`` (tests, CI logs)."""
    from tqdm.auto import tqdm  # noqa: PLC0415
    show = (enabled and os.environ.get("CI", "").lower() not in ("1", "true")
            and (sys.stderr.isatty() or _in_jupyter()))
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=False, disable=not show)


def _logging_beside(bar) -> contextlib.AbstractContextManager:
    """While ``bar`` is shown, console log lines are written above it instead of through it."""
    if bar.disable:
        return contextlib.nullcontext()
    from tqdm.contrib.logging import logging_redirect_tqdm  # noqa: PLC0415
    return logging_redirect_tqdm(tqdm_class=type(bar))


# Config fields `evaluate` may change: they leave the trained weights valid.
EVAL_FIELDS = ("inference_steps", "random_t_eval_from", "eval_mode", "eval_batch_size", "mask_seen")


def load_trained(cfg: Config, run: str | Path, overrides: dict[str, Any] | None = None,
                 dataset: Dataset | None = None) -> Trainer:
    """A Trainer (writing nothing) holding ``<run>/best.pt``, checked against ``cfg`` and the data.

    ``overrides`` (field -> value, e.g. ``{"inference_steps": 5}``) changes fields of
    :data:`EVAL_FIELDS` only (others raise ConfigError): the checkpoint is checked against ``cfg``
    as trained, then loaded into a model rebuilt with the changed fields.
    """
    bad = sorted(set(overrides or {}) - set(EVAL_FIELDS))
    if bad:
        raise ConfigError(f"evaluation can change {', '.join(EVAL_FIELDS)} (they leave the trained weights valid), "
                          f"not {', '.join(bad)}")
    trainer = Trainer(cfg, dataset=dataset)
    state = trainer._read(Path(run) / "best.pt")
    if overrides:
        for k, v in overrides.items():
            cfg.set(k, v)  # trainer.cfg: eval_batch_size and mask_seen are read from it at evaluation
        trainer.model = build_model(cfg.model, trainer.info).to(trainer.device)  # validates inference_steps <= T
    trainer.model.load_state_dict(state["model"])
    return trainer


def run_config(run: str | Path) -> Config:
    """A run folder's ``config.json``; CheckpointError when it is missing or not an m3bsr config."""
    path = Path(run) / "config.json"
    if not path.exists():
        raise CheckpointError(f"{run}: no config.json (is this a run folder?)")
    try:
        return Config.from_dict(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: not an m3bsr run config ({type(e).__name__}: {e})") from None


def evaluate_run(run: str | Path, device: str = "auto", overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Recompute valid/test metrics from ``<run>/best.pt`` with the run's own config, the
    :data:`EVAL_FIELDS` in ``overrides`` changed (:func:`load_trained`)."""
    cfg = run_config(run)
    cfg.train.device = device
    trainer = load_trained(cfg, run, overrides)
    return {"valid": trainer.evaluate("valid"), "test": trainer.evaluate("test")}


RANKS = "ranks.npz"  # a finished run's per-row ranks of each split (:func:`save_ranks`)


def save_ranks(path: Path, ranked: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]) -> None:
    """Write ``{split: (users, full, sampled)}`` (each ``(n,)``, one entry per evaluation row; ``sampled``
    None without negatives) to ``path`` as ``<split>_users``, ``<split>_full``, ``<split>_sampled`` arrays:
    the best checkpoint's per-user ranks, which paired tests read without the checkpoint."""
    arrays = {f"{split}_{name}": t.numpy() for split, row in ranked.items()
              for name, t in zip(("users", "full", "sampled"), row) if t is not None}
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def load_ranks(run: str | Path, split: str = "test") -> dict[str, np.ndarray]:
    """A finished run's per-row ranks of ``split`` (:func:`save_ranks`): ``users``, ``full`` and, with
    sampled negatives, ``sampled``, each ``(n,)``."""
    path = Path(run) / RANKS
    try:
        with np.load(path) as f:
            out = {name: f[f"{split}_{name}"] for name in ("users", "full", "sampled") if f"{split}_{name}" in f}
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (a finished run writes it with metrics.json; train the run again)") from None
    except (ValueError, OSError, EOFError) as e:
        raise CheckpointError(f"{path}: not a ranks file ({type(e).__name__}: {e})") from None
    if "full" not in out:
        raise CheckpointError(f"{path}: no {split!r} ranks (expected arrays {split}_users, {split}_full)")
    return out


# The code a run's numbers come from (relative to the package folder): it names run folders with the config.
RUN_SOURCES = ("config.py", "data", "metrics.py", "models", "train.py")


def source_hash(package: str | Path = Path(__file__).parent) -> str:
    """SHA-256 over the ``.py`` files of :data:`RUN_SOURCES` under ``package``: each file's path
    (relative to ``package``) and the SHA-256 of its bytes, in path order."""
    package = Path(package)
    files = sorted(f for name in RUN_SOURCES
                   for f in ([package / name] if (package / name).is_file() else (package / name).rglob("*.py")))
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.relative_to(package).as_posix()} {hashlib.sha256(f.read_bytes()).hexdigest()}\n".encode())
    return h.hexdigest()


@functools.cache
def code_version() -> str:
    """This package's :func:`source_hash`, 8 hex digits (computed once per process)."""
    return source_hash()[:8]


def run_dir(cfg: Config, runs: str | Path) -> Path:
    """``<runs>/<dataset>-<model>-s<seed>-<config hash>-<code version>``: one folder per distinct
    config and code. Any change to the code that trains and scores a run (:data:`RUN_SOURCES`) names
    new folders, so a cached run is never one that older code trained."""
    name = cfg.data.dataset if cfg.data.dataset != "csv" else Path(cfg.data.data_file or "csv").stem
    return Path(runs) / f"{name}-{cfg.model.model}-s{cfg.train.seed}-{cfg.hash()}-{code_version()}"


def train_cached(cfg: Config, runs: str | Path, dataset: Dataset | None = None) -> dict[str, Any]:
    """Train unless ``run_dir(cfg, runs)/metrics.json`` exists; resumes an interrupted run."""
    out = run_dir(cfg, runs)
    done = out / "metrics.json"
    if done.exists():
        try:
            result = json.loads(done.read_text())
            if all("NDCG@10" in result.get(split, {}) for split in ("valid", "test")):
                return result
        except (ValueError, AttributeError, TypeError):  # not JSON (UnicodeDecodeError is a ValueError), not dicts
            pass
        raise CheckpointError(f"{done}: expected a finished run's metrics, {{'valid': {{'NDCG@10': ...}}, "
                              f"'test': {{...}}}}; delete the file to train the run again")
    return Trainer(cfg, out, dataset=dataset).fit(resume=True)
