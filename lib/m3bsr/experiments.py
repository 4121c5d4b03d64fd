"""Grids of cached runs and the tables made from them (used by the notebooks and ``make reproduce``).

Every cell of a table is one run: ``python -m m3bsr train --dataset D --model M --profile P --seed S``;
:func:`run_grid` trains each missing run under ``runs/`` (reusing finished ones by config hash)
and returns one row per (dataset, model, seed, split).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd

from .config import make_config
from .data.schema import Dataset
from .metrics import ndcg_per_row
from .train import Trainer, load_data, run_dir, train_cached

TABLE_METRICS = ("HR@5", "HR@10", "HR@20", "NDCG@5", "NDCG@10", "NDCG@20", "MRR")


def run_grid(datasets: Iterable[str], models: Iterable[str], seeds: Iterable[int], profile: str,
             runs: str | Path, overrides: dict[str, Any] | None = None, log=print) -> pd.DataFrame:
    """Train (or reuse) every (dataset, model, seed); one row per run and split with all metrics."""
    rows = []
    for dataset in datasets:
        data: Dataset | None = None  # loaded once per dataset, only if some run is missing
        for model in models:
            for seed in seeds:
                cfg = make_config(profile, {**(overrides or {}), "dataset": dataset, "model": model, "seed": seed})
                if not (run_dir(cfg, runs) / "metrics.json").exists() and data is None:
                    data = load_data(cfg)
                result = train_cached(cfg, runs, dataset=data)
                log(f"{dataset:>20} {model:>10} seed {seed}: test NDCG@10 {result['test']['NDCG@10']:.4f}")
                for split in ("valid", "test"):
                    rows.append({"dataset": dataset, "model": model, "seed": seed, "split": split,
                                 "best_epoch": result.get("best_epoch"), **result[split]})
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
            cfg = make_config(profile, {**(overrides or {}), "dataset": dataset, "model": model, "seed": seed})
            data = data if data is not None else load_data(cfg)
            trainer = Trainer(cfg, run_dir(cfg, runs), dataset=data)
            trainer.load_best()
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
