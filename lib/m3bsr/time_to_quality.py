"""``python -m m3bsr bench --time-to-quality``: how long each training mode of M3BSR's diffusion
chains takes to reach the validation score of the paper's chain.

One M3BSR run per (dataset, seed, ``train_mode``), trained to its best validation NDCG@10 with
early stopping (cached under ``runs/``, ``experiments.train_runs``; ``jobs`` one-thread runs side
by side on a CPU). Time is **training time**: the sum of ``history.csv``'s ``seconds`` (optimiser
steps only; the validations between them are excluded, since how often one validates is a choice)
up to and including the validation that counts. For each run:

==================  ==========================================================================
column              meaning
==================  ==========================================================================
best_valid          the run's best validation NDCG@10 (early stopping keeps its weights)
test                test NDCG@10 of those weights (full ranking)
best_step           the optimiser step of that validation
s_per_step          training seconds per optimiser step over the whole run
s_to_own_best       training seconds until the run's own best validation
s_to_chain_best     until the first validation at or above the chain's best on the same dataset
                    and seed (NaN: never reached)
s_to_within_sd      until the first validation at or above (the chain's best) - sd, sd = the
                    standard deviation over seeds of the chain's best validation NDCG@10 (NaN
                    with a single seed)
speedup             the chain's ``s_to_own_best`` / this run's ``s_to_within_sd``: how many
                    times less time than the chain this mode needs to come within one seed sd
                    of the chain's best (the target is >= 4)
==================  ==========================================================================

The setting (:data:`SIZES`): the default profile, T = 15 with d = 32, one layer, L = 20 and batch 64,
validated every 10 steps (spelled out, so that the bench keeps its setting if the profile moves). At
the paper's d = 64, L = 50 and batch 256 one chain step costs 12 to 50 CPU-seconds on the 2-core CPU
(docs/tuning.md), so that a chain run to its best validation would take hours; the bench's ``step_time_mode=*`` rows time each mode's step at
this setting (``bench --scaling``).

Writes ``<out>/time-to-quality-<dataset>.{csv,md}`` and, per run, its ``config.json``,
``history.csv`` and ``metrics.json`` under ``<out>/time-to-quality/<run folder>/`` (the table can be
recomputed from those: :func:`table_from_folders`).
"""
from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Callable, Iterable

import pandas as pd
import torch

from .config import Config, ConfigError, make_config, repo_root
from .experiments import default_jobs, train_runs
from .files import atomic_write_bytes, atomic_write_text
from .train import SELECT_METRIC, resolve_device, run_dir

MODES = ("chain", "strided", "random_t")
VALID = f"valid_{SELECT_METRIC}"

# profile and overrides of each size (the bench's --size); "small" is the smoke run of the tests
SIZES: dict[str, tuple[str, dict]] = {
    "small": ("ci", dict(syn_users=60, syn_items=120, syn_events=30, T=3, eval_steps=2, patience_steps=2,
                         min_steps=2, max_steps=4, sampled_negatives=0, progress=False)),
    "full": ("default", dict(max_len=20, d=32, layers=1, batch_size=64, eval_steps=10, patience_steps=150,
                             min_steps=150, max_steps=800, sampled_negatives=0, progress=False)),
}

COLUMNS = ["dataset", "mode", "seed", "best_valid", "test", "best_step", "steps", "s_per_step", "s_to_own_best",
           "s_to_chain_best", "s_to_within_sd", "speedup"]


def configs(datasets: Iterable[str], seeds: Iterable[int], modes: Iterable[str] = MODES,
            size: str = "full") -> list[Config]:
    """One M3BSR config per (dataset, seed, mode), in that nesting order."""
    if size not in SIZES:
        raise ConfigError(f"time to quality: unknown size {size!r}; expected one of {sorted(SIZES)}")
    profile, overrides = SIZES[size]
    modes = list(modes)
    if "chain" not in modes:
        raise ConfigError(f"time to quality: the modes must include 'chain' (the reference), got {modes}")
    return [make_config(profile, {**overrides, "dataset": d, "model": "m3bsr", "seed": s, "train_mode": m})
            for d in datasets for s in seeds for m in modes]


def seconds_to_reach(history: pd.DataFrame, threshold: float) -> float:
    """Training seconds up to the first validation with NDCG@10 >= ``threshold`` (NaN: none)."""
    reached = (history[VALID] >= threshold).to_numpy()
    if not reached.any():
        return math.nan
    return float(history["seconds"].to_numpy()[: reached.argmax() + 1].sum())


def table(runs: pd.DataFrame) -> pd.DataFrame:
    """``runs``: one row per run with ``dataset``, ``mode``, ``seed``, ``history`` (a run's
    history.csv as a DataFrame) and ``test`` (its test NDCG@10). Returns the module docstring's
    columns, one row per run, in the input's order."""
    chain = runs[runs["mode"] == "chain"].set_index(["dataset", "seed"])
    if chain.index.has_duplicates:
        raise ValueError("time to quality: more than one chain run for a (dataset, seed)")
    best = {key: float(h[VALID].max()) for key, h in chain["history"].items()}
    sd = {d: float(pd.Series([b for (dd, _), b in best.items() if dd == d]).std())  # NaN with one seed
          for d in chain.index.get_level_values("dataset")}
    rows = []
    for r in runs.itertuples():
        h, key = r.history, (r.dataset, r.seed)
        if key not in best:
            raise ValueError(f"time to quality: no chain run for {r.dataset}, seed {r.seed}")
        own = float(h[VALID].max())
        chain_s = seconds_to_reach(chain.loc[key, "history"], best[key])
        within = seconds_to_reach(h, best[key] - sd[r.dataset]) if not math.isnan(sd[r.dataset]) else math.nan
        rows.append({"dataset": r.dataset, "mode": r.mode, "seed": r.seed, "best_valid": own, "test": r.test,
                     "best_step": int(h["step"].to_numpy()[h[VALID].to_numpy().argmax()]),
                     "steps": int(h["step"].iloc[-1]), "s_per_step": float(h["seconds"].sum() / h["step"].iloc[-1]),
                     "s_to_own_best": seconds_to_reach(h, own), "s_to_chain_best": seconds_to_reach(h, best[key]),
                     "s_to_within_sd": within, "speedup": chain_s / within})
    return pd.DataFrame(rows, columns=COLUMNS)


def table_from_folders(folders: Iterable[Path]) -> pd.DataFrame:
    """:func:`table` of finished run folders (each with config.json, history.csv, metrics.json)."""
    rows = []
    for f in folders:
        cfg = Config.from_dict(json.loads((f / "config.json").read_text()))
        rows.append({"dataset": cfg.data.dataset, "mode": cfg.model.train_mode, "seed": cfg.train.seed,
                     "history": pd.read_csv(f / "history.csv"),
                     "test": float(json.loads((f / "metrics.json").read_text())["test"][SELECT_METRIC])})
    return table(pd.DataFrame(rows))


def markdown(t: pd.DataFrame, header: dict[str, str]) -> str:
    """The table, then the mean over seeds per (dataset, mode), as Markdown."""
    def fmt(v, digits):
        return "" if isinstance(v, float) and math.isnan(v) else f"{v:.{digits}f}" if isinstance(v, float) else str(v)

    digits = {"best_valid": 4, "test": 4, "s_per_step": 3, "s_to_own_best": 0, "s_to_chain_best": 0,
              "s_to_within_sd": 0, "speedup": 2}
    lines = ["# Time to quality: M3BSR's training modes against the paper's chain", ""]
    lines += [f"- **{k}**: {v}" for k, v in header.items()]
    lines += ["", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in t.to_dict("records"):
        lines.append("| " + " | ".join(fmt(r[c], digits.get(c, 0)) for c in COLUMNS) + " |")
    means = t.groupby(["dataset", "mode"], sort=False)[["best_valid", "test", "s_per_step", "s_to_own_best",
                                                        "s_to_within_sd", "speedup"]].mean()
    lines += ["", f"Mean over seeds ({t['seed'].nunique()} seeds; NaN times: a seed that never reached the "
              "threshold is left out of the mean, and the 'reached' column counts them):", "",
              "| dataset | mode | best_valid | test | s_per_step | s_to_own_best | s_to_within_sd | speedup | reached |",
              "|---|---|---|---|---|---|---|---|---|"]
    for (d, m), r in means.iterrows():
        sub = t[(t["dataset"] == d) & (t["mode"] == m)]
        reached = f"{int(sub['s_to_within_sd'].notna().sum())}/{len(sub)}"
        lines.append(f"| {d} | {m} | " + " | ".join(fmt(float(r[c]), digits[c]) for c in r.index) + f" | {reached} |")
    return "\n".join(lines) + "\n"


def run_time_to_quality(datasets: Iterable[str], seeds: Iterable[int], modes: Iterable[str] = MODES,
                        size: str = "full", runs: str | Path | None = None, out: str | Path | None = None,
                        jobs: int | None = None, device: str = "auto", threads: int | None = None,
                        log: Callable[[str], None] = print) -> pd.DataFrame:
    """Train (or reuse) every run of :func:`configs`, copy each run's small files under
    ``<out>/time-to-quality/`` and write ``<out>/time-to-quality-<dataset>.{csv,md}``; returns the table."""
    dev = resolve_device(device)
    if threads is not None:
        torch.set_num_threads(threads)  # in all: each of the jobs runs gets threads // jobs
    runs = Path(runs) if runs is not None else repo_root() / "runs"
    cfgs = configs(datasets, seeds, modes, size)
    for c in cfgs:
        c.set("device", str(dev))
    out = Path(out) if out is not None else repo_root() / "results" / "bench"
    jobs = jobs if jobs is not None else default_jobs(str(dev))
    log(f"time to quality: {len(cfgs)} runs ({size}), {torch.get_num_threads()} threads in all")
    train_runs(cfgs, runs, jobs, log)
    kept = []
    for c in cfgs:
        src = run_dir(c, runs)
        dst = out / "time-to-quality" / src.name
        dst.mkdir(parents=True, exist_ok=True)
        for name in ("config.json", "history.csv", "metrics.json"):
            atomic_write_bytes(dst / name, (src / name).read_bytes())
        kept.append(dst)
    t = table_from_folders(kept)
    profile, overrides = SIZES[size]
    from .bench import _device_name  # noqa: PLC0415 (the bench module loads the models' reference code)
    header = {"device": _device_name(dev), "torch": torch.__version__,
              "runs side by side": str(jobs), "setting": f"profile {profile} with {overrides}",
              "time": "training seconds (optimiser steps; validations excluded)"}
    for d in dict.fromkeys(t["dataset"]):
        sub = t[t["dataset"] == d]
        buf = io.StringIO()
        buf.write("".join(f"# {k}: {v}\n" for k, v in header.items()))
        sub.to_csv(buf, index=False, float_format="%.6g")
        atomic_write_text(out / f"time-to-quality-{d}.csv", buf.getvalue())
        atomic_write_text(out / f"time-to-quality-{d}.md", markdown(sub, header))
        log(f"wrote {out / f'time-to-quality-{d}.md'}")
    return t
