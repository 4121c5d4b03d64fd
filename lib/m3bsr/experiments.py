"""Grids of cached runs and the tables made from them (used by the notebooks and ``make reproduce``).

Every cell of a table is one run: ``python -m m3bsr train --dataset D --model M --profile P --seed S``;
:func:`run_grid` trains each missing run under ``runs/`` (reusing finished ones by config hash)
and returns one row per (dataset, model, seed, split).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd
import torch

from .config import make_config
from .data.schema import Dataset
from .metrics import metrics_from_ranks, ndcg_per_row
from .train import Trainer, load_checkpoint, load_data, run_dir, train_cached

TABLE_METRICS = ("HR@5", "HR@10", "HR@20", "NDCG@5", "NDCG@10", "NDCG@20", "MRR")


def run_grid(datasets: Iterable[str], models: Iterable[str], seeds: Iterable[int], profile: str,
             runs: str | Path, overrides: dict[str, Any] | None = None, log=print) -> pd.DataFrame:
    """Train (or reuse) every (dataset, model, seed); one row per run and split with all metrics,
    the epochs trained and ``train_seconds`` (the run's training epochs, validation excluded;
    NaN for untrained models such as pop)."""
    rows = []
    for dataset in datasets:
        data: Dataset | None = None  # loaded once per dataset, only if some run is missing
        for model in models:
            for seed in seeds:
                cfg = make_config(profile, {**(overrides or {}), "dataset": dataset, "model": model, "seed": seed})
                run = run_dir(cfg, runs)
                if not (run / "metrics.json").exists() and data is None:
                    data = load_data(cfg)
                result = train_cached(cfg, runs, dataset=data)
                history = run / "history.csv"  # one row per training epoch; absent when nothing trains
                seconds = pd.read_csv(history)["seconds"] if history.exists() else pd.Series([], dtype=float)
                log(f"{dataset:>20} {model:>10} seed {seed}: test NDCG@10 {result['test']['NDCG@10']:.4f}")
                for split in ("valid", "test"):
                    rows.append({"dataset": dataset, "model": model, "seed": seed, "split": split,
                                 "best_epoch": result.get("best_epoch"), "epochs": len(seconds),
                                 "train_seconds": seconds.sum() if len(seconds) else float("nan"), **result[split]})
    return pd.DataFrame(rows)


def summarize(results: pd.DataFrame, metrics=TABLE_METRICS, split: str = "test") -> pd.DataFrame:
    """mean +/- std over seeds: index (dataset, model), columns metric -> "0.1234 ± 0.0056"."""
    df = results[results["split"] == split]
    g = df.groupby(["dataset", "model"], sort=False)[list(metrics)]
    mean, std = g.mean(), g.std(ddof=1).fillna(0.0)
    return mean.combine(std, lambda m, s: m.map("{:.4f}".format) + " ± " + s.map("{:.4f}".format))


def markdown_table(summary: pd.DataFrame, results: pd.DataFrame, split: str = "test") -> str:
    """The summary as markdown, the best mean per dataset and metric in bold."""
    df = results[results["split"] == split]
    means = df.groupby(["dataset", "model"], sort=False)[list(summary.columns)].mean()
    lines = ["| dataset | model | " + " | ".join(summary.columns) + " |",
             "|---|---|" + "---|" * len(summary.columns)]
    for (dataset, model), row in summary.iterrows():
        cells = []
        for col in summary.columns:
            best = means.loc[dataset, col].max()
            cells.append(f"**{row[col]}**" if means.loc[(dataset, model), col] == best else row[col])
        lines.append(f"| {dataset} | {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def best_baseline(results: pd.DataFrame, dataset: str, model: str = "m3bsr", metric: str = "NDCG@10") -> str:
    """The other model with the highest mean *validation* ``metric`` on ``dataset`` (chosen on
    validation, like every other choice here, so the test split does not pick the opponent)."""
    v = results[(results["split"] == "valid") & (results["dataset"] == dataset) & (results["model"] != model)]
    return str(v.groupby("model")[metric].mean().idxmax())


def paired_test(dataset: str, model_a: str, model_b: str, seeds: Iterable[int], profile: str, runs: str | Path,
                overrides: dict[str, Any] | None = None, k: int = 10, sampled: bool = False) -> dict[str, Any]:
    """Paired comparison of two models' test NDCG@k over (seed, user) pairs from their saved runs.

    For each seed both best checkpoints rank the same test rows; the pairs are the per-user
    NDCG@k values (full ranking, or the 1+99 sampled ranking with ``sampled``). Returns the means,
    the mean difference a - b, the Wilcoxon signed-rank p-value (two-sided, zero differences
    dropped) and the paired t-test p-value.
    """
    from scipy import stats  # noqa: PLC0415
    values: dict[str, list] = {model_a: [], model_b: []}
    data: Dataset | None = None
    for seed in seeds:
        for model in (model_a, model_b):
            trainer = trained(dataset, model, seed, profile, runs, overrides, data)
            data = trainer.ds  # loaded once
            full, smp = trainer.ranks("test")
            values[model].append(ndcg_per_row(smp if sampled else full, k).numpy())
    a, b = (np.concatenate(values[m]) for m in (model_a, model_b))
    diff = a - b
    differ = bool(np.any(diff != 0))  # identical values: no evidence of a difference (the tests would give NaN)
    wilcoxon = stats.wilcoxon(a, b).pvalue if differ else 1.0
    t_test = stats.ttest_rel(a, b).pvalue if differ else 1.0
    return {"dataset": dataset, "a": model_a, "b": model_b, "pairs": len(a), f"{model_a} NDCG@{k}": a.mean(),
            f"{model_b} NDCG@{k}": b.mean(), "mean difference": diff.mean(),
            "Wilcoxon p": float(wilcoxon), "paired t p": float(t_test)}


def trained(dataset: str, model: str, seed: int, profile: str, runs: str | Path, overrides: dict[str, Any] | None = None,
            data: Dataset | None = None, **model_fields: Any) -> Trainer:
    """A Trainer holding the best checkpoint of a finished run, optionally rebuilt with some model
    fields changed that leave the weights valid (e.g. ``inference_steps=5``, ``eval_mode="skip"``)."""
    fields = {**(overrides or {}), "dataset": dataset, "model": model, "seed": seed}
    run = run_dir(make_config(profile, fields), runs)
    if not (run / "metrics.json").exists():
        raise FileNotFoundError(f"{run}: no finished run (train it first, e.g. with run_grid)")
    trainer = Trainer(make_config(profile, {**fields, **model_fields}), None, dataset=data)
    trainer.model.load_state_dict(load_checkpoint(run / "best.pt")["model"])
    return trainer


def timed_evaluation(trainer: Trainer, split: str = "test", repeats: int = 3) -> tuple[dict[str, float], float]:
    """(metrics, median wall seconds over ``repeats`` full evaluations of ``split`` after one warm-up)."""
    metrics = trainer.evaluate(split)
    seconds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        trainer.evaluate(split)
        seconds.append(time.perf_counter() - t0)
    return metrics, float(np.median(seconds))


def by_target_popularity(trainer: Trainer, split: str = "test", buckets: int = 3, k: int = 10) -> pd.DataFrame:
    """HR@k / NDCG@k of ``split``'s rows grouped by how often their target item is a *training*
    target (the popularity the models learn from), in ``buckets`` quantile groups of rows (the
    first = the rarest targets; a bucket's range is shown as ``lo-hi`` training targets)."""
    full, _ = trainer.ranks(split)
    pop = trainer.info.item_counts.long()[trainer.seq.split(split)["targets"][:, 0]].numpy()
    group = pd.qcut(pd.Series(pop).rank(method="first"), buckets, labels=False).to_numpy()
    rows = []
    for b in range(buckets):
        sel = group == b
        m = metrics_from_ranks(full[torch.from_numpy(sel)], ks=(k,))
        rows.append({"bucket": b + 1, "training targets": f"{pop[sel].min()}-{pop[sel].max()}", "rows": int(sel.sum()),
                     f"HR@{k}": m[f"HR@{k}"], f"NDCG@{k}": m[f"NDCG@{k}"]})
    return pd.DataFrame(rows)
