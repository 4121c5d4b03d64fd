"""Grids of cached runs and the tables made from them (used by the notebooks and ``make reproduce``).

Every cell of a table is one run: ``python -m m3bsr train --dataset D --model M --profile P --seed S``;
:func:`run_grid` trains each missing run under ``runs/`` (reusing finished ones: a run folder is named
by the config's hash and the version of the code that trains it, ``train.run_dir``) and returns one
row per (dataset, model, seed, split). :func:`train_runs` trains a list of runs
``jobs`` at a time, each in its own process.
"""
from __future__ import annotations

import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import pandas as pd
import torch

from .config import Config, check_jobs, make_config, repo_root
from .data.schema import Dataset
from .metrics import metrics_from_ranks, ndcg_per_row
from .train import (CheckpointError, Trainer, load_data, load_ranks, load_trained, progress_bar, resolve_device, run_dir,
                    train_cached)

TABLE_METRICS = ("HR@5", "HR@10", "HR@20", "NDCG@5", "NDCG@10", "NDCG@20", "MRR")

Tuned = Callable[[str, str], dict[str, Any]]  # (dataset, model) -> its chosen overrides, e.g. m3bsr.tune.tuned()


def config_for(profile: str, dataset: str, model: str, seed: int, overrides: dict[str, Any] | None = None,
               tuned: Tuned | None = None) -> Config:
    """The config of one run: ``profile``, then the (dataset, model)'s tuned values (``tuned``), then
    ``overrides`` (so that an ablation's flag wins over a tuned value), then dataset, model and seed."""
    chosen = tuned(dataset, model) if tuned is not None else {}
    return make_config(profile, {**chosen, **(overrides or {}), "dataset": dataset, "model": model, "seed": seed})


def grid_configs(datasets: Iterable[str], models: Iterable[str], seeds: Iterable[int], profile: str,
                 overrides: dict[str, Any] | None = None, tuned: Tuned | None = None) -> list[Config]:
    """One config per (dataset, model, seed), in that nesting order (:func:`config_for`)."""
    return [config_for(profile, dataset, model, seed, overrides, tuned)
            for dataset in datasets for model in models for seed in seeds]


# Bytes one run may need. M3BSR at the default profile peaks at 8.0 GiB resident (VmHWM) on ml-100k-mm and
# 9.5 GiB on ml-latest-small-mm (its 9.7k items' logits): the bench's 5.6 GiB of train-step growth is not all.
RUN_MEMORY = 11 * 2**30


def runs_that_fit(cores: int) -> int:
    """``cores``, or fewer when the machine's memory holds fewer runs of :data:`RUN_MEMORY`; at least 1."""
    try:
        fit = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // RUN_MEMORY
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows): cores alone
        fit = cores
    return max(1, min(cores, fit))


def default_jobs(device: str = "auto") -> int:
    """Runs trained at once by default: 1 on a GPU; on the CPU one per core (torch's thread count),
    as many as fit in the machine's memory (:func:`runs_that_fit`)."""
    return 1 if resolve_device(device).type == "cuda" else runs_that_fit(torch.get_num_threads())


def train_runs(cfgs: Iterable[Config], runs: str | Path, jobs: int | None = 1, log=print) -> None:
    """Train every config whose run under ``runs`` is not finished (interrupted ones resume).

    ``jobs`` = 1: one after another in this process (each dataset loaded once). ``jobs`` > 1: that
    many worker processes, each with ``torch.get_num_threads() // jobs`` threads (at least 1), take
    the runs (M3BSR's first); the datasets are loaded here first so that the workers find their feature
    caches filled. On a CPU, small models use several threads poorly, so k one-thread runs side by
    side beat k-thread runs one after another (docs/running-time.md). A run's numbers depend on
    its config, seed and device, not on the process that trains it. ``jobs=None``: :func:`default_jobs`.
    The workers draw no progress bars; a bar here counts the finished runs (with the first run's
    ``progress``). The first failure (or an interrupt) stops every worker and is raised here.
    """
    check_jobs(jobs)
    runs = Path(os.path.relpath(runs))  # train.log names the run folder: no machine path in committed runs
    todo: dict[Path, Config] = {}
    for cfg in cfgs:
        out = run_dir(cfg, runs)
        if not (out / "metrics.json").exists():
            todo.setdefault(out, cfg)
    if not todo:
        return
    jobs = jobs if jobs is not None else default_jobs(next(iter(todo.values())).train.device)
    data: dict[str, Dataset] = {}
    for cfg in todo.values():  # loads (and caches the features of) each dataset once
        key = repr(cfg.data)
        if key not in data:
            data[key] = load_data(cfg)
    if jobs <= 1:
        for cfg in todo.values():
            train_cached(cfg, runs, dataset=data[repr(cfg.data)])
        return
    threads = max(1, torch.get_num_threads() // jobs)  # from jobs alone, however many runs are left
    log(f"training {len(todo)} runs, {jobs} at a time ({threads} thread(s) each)")
    # spawn: no fork of a process holding torch's threads (a calling script needs the usual
    # `if __name__ == "__main__":` guard; without it the workers die at start and this raises)
    pool = ProcessPoolExecutor(min(jobs, len(todo)), mp_context=multiprocessing.get_context("spawn"))
    try:
        # M3BSR runs first (the longest, results/04_train_time.md): short runs fill the last gaps
        order = sorted(todo.items(), key=lambda item: item[1].model.model != "m3bsr")
        futures = {pool.submit(_train_worker, cfg.to_dict(), str(runs), threads): out.name for out, cfg in order}
        with progress_bar(len(futures), 0, "runs", order[0][1].train.progress, "run") as bar:
            for i, done in enumerate(as_completed(futures), 1):
                done.result()  # a worker's exception is raised here
                log(f"  {i}/{len(futures)} {futures[done]}")
                bar.update(1)
    except BaseException:  # a failure or an interrupt stops every worker; their runs resume next time
        for process in list(pool._processes.values()):  # no public way before Python 3.14's terminate_workers
            process.terminate()
        raise
    finally:
        pool.shutdown(cancel_futures=True)


def _train_worker(cfg: dict[str, Any], runs: str, threads: int) -> None:
    torch.set_num_threads(threads)
    config = Config.from_dict(cfg)
    config.train.progress = False  # workers share one console: no bars drawn over each other
    train_cached(config, runs)


def run_grid(datasets: Iterable[str], models: Iterable[str], seeds: Iterable[int], profile: str,
             runs: str | Path, overrides: dict[str, Any] | None = None, log=print, jobs: int | None = 1,
             tuned: Tuned | None = None) -> pd.DataFrame:
    """Train (or reuse) every (dataset, model, seed), ``jobs`` at a time (see :func:`train_runs`),
    each with its (dataset, model)'s ``tuned`` values under ``overrides`` (:func:`config_for`);
    one row per run and split with all metrics, the step and epoch of the best validation
    (``best_step``, ``best_epoch``), the ``steps`` and ``epochs`` trained and ``train_seconds``
    (validation excluded; NaN for untrained models such as pop)."""
    cfgs = grid_configs(datasets, models, seeds, profile, overrides, tuned)
    train_runs(cfgs, runs, jobs, log)
    rows = []
    for cfg, cost in zip(cfgs, run_costs(cfgs, runs, unique=False).itertuples()):
        result = train_cached(cfg, runs)  # finished: read from metrics.json
        dataset, model, seed = cfg.data.dataset, cfg.model.model, cfg.train.seed
        log(f"{dataset:>20} {model:>10} seed {seed}: test NDCG@10 {result['test']['NDCG@10']:.4f}")
        for split in ("valid", "test"):
            rows.append({"dataset": dataset, "model": model, "seed": seed, "split": split,
                         "best_step": result.get("best_step"), "best_epoch": result.get("best_epoch"),
                         "steps": cost.steps, "epochs": cost.epochs, "train_seconds": cost.train_seconds,
                         **result[split]})
    return pd.DataFrame(rows)


def run_costs(cfgs: Iterable[Config], runs: str | Path, unique: bool = True) -> pd.DataFrame:
    """One row per run (per distinct run with ``unique``): its folder name, dataset, model, seed, the
    ``steps`` and ``epochs`` trained and ``train_seconds`` (the sum of ``history.csv``'s ``seconds``,
    validation excluded; 0 steps and NaN seconds when nothing trains, e.g. pop)."""
    rows, seen = [], set()
    for cfg in cfgs:
        run = run_dir(cfg, runs)
        if unique and run in seen:
            continue
        seen.add(run)
        history = run / "history.csv"  # one row per validation; absent when nothing trains
        steps, epochs, seconds = _history_totals(history) if history.exists() else (0, 0.0, float("nan"))
        rows.append({"run": run.name, "dataset": cfg.data.dataset, "model": cfg.model.model, "seed": cfg.train.seed,
                     "steps": steps, "epochs": epochs, "train_seconds": seconds})
    return pd.DataFrame(rows, columns=["run", "dataset", "model", "seed", "steps", "epochs", "train_seconds"])


def _history_totals(path: Path) -> tuple[int, float, float]:
    """(steps, epochs, training seconds) of a run: its ``history.csv``'s last ``step`` and ``epoch`` and
    the sum of its ``seconds``; a history without them raises CheckpointError naming it."""
    try:
        h = pd.read_csv(path)[["step", "epoch", "seconds"]].apply(pd.to_numeric)
        if h.empty or h.isna().any().any():
            raise ValueError("no rows, or an empty value")
    except (ValueError, KeyError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise CheckpointError(f"{path}: expected a run's history with numeric 'step', 'epoch' and 'seconds' "
                              f"columns ({e!r})") from None
    return int(h["step"].iloc[-1]), float(h["epoch"].iloc[-1]), float(h["seconds"].sum())


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


def headline(results: str | Path, metric: str = "NDCG@10") -> str:
    """The README's result table: notebook 04's full-ranking test ``metric`` (``<results>/04_main_full.csv``),
    one row per model and one column per dataset, mean ± std over the seeds, the best of each column in bold."""
    table = pd.read_csv(Path(results) / "04_main_full.csv")
    cells = table.pivot(index="model", columns="dataset", values=metric).loc[table["model"].unique(), table["dataset"].unique()]
    means = cells.map(lambda cell: float(cell.split(" ± ")[0]))
    lines = ["| model | " + " | ".join(cells.columns) + " |", "|---|" + "---|" * len(cells.columns)]
    for model, row in cells.iterrows():
        lines.append(f"| {model} | " + " | ".join(f"**{c}**" if means.at[model, d] == means[d].max() else c
                                                   for d, c in row.items()) + " |")
    return "\n".join(lines) + "\n"


def best_baseline(results: pd.DataFrame, dataset: str, model: str = "m3bsr", metric: str = "NDCG@10") -> str:
    """The other model with the highest mean *validation* ``metric`` on ``dataset`` (chosen on
    validation, like every other choice here, so the test split does not pick the opponent)."""
    v = results[(results["split"] == "valid") & (results["dataset"] == dataset) & (results["model"] != model)]
    return str(v.groupby("model")[metric].mean().idxmax())


BASELINES = ("sasrec", "sasrec-mm", "bert4rec", "mbt", "diffurec")  # the trained baselines of the main table
MAIN_SEEDS = {"ci": [0, 1], "default": [0, 1, 2, 3, 4], "paper": [0, 1, 2, 3, 4]}  # the main table's seeds per profile


def best_baselines(datasets: Iterable[str], profile: str, runs: str | Path, overrides: dict[str, Any] | None = None,
                   tuned: Tuned | None = None, jobs: int | None = 1) -> dict[str, str]:
    """Dataset -> the main table's best baseline (:func:`best_baseline`, on validation), from the runs
    of :data:`BASELINES` at :data:`MAIN_SEEDS` of ``profile`` (notebook 04's, reused from ``runs``;
    trained where missing)."""
    datasets = list(datasets)
    main = run_grid(datasets, BASELINES, MAIN_SEEDS[profile], profile, runs, overrides, log=lambda *_: None,
                    jobs=jobs, tuned=tuned)
    return {dataset: best_baseline(main, dataset, "m3bsr") for dataset in datasets}


def paired_test(dataset: str, model_a: str, model_b: str, seeds: Iterable[int], profile: str, runs: str | Path,
                overrides: dict[str, Any] | None = None, k: int = 10, sampled: bool = False,
                tuned: Tuned | None = None, flags_a: dict[str, Any] | None = None,
                flags_b: dict[str, Any] | None = None) -> dict[str, Any]:
    """Paired comparison of two runs' test NDCG@k over the test users, from their saved runs: a =
    ``model_a`` with ``flags_a`` over ``overrides``, b likewise (e.g. ``"m3bsr"`` against itself with
    ``flags_b={"cdmd": False}`` for an ablation); configs by :func:`config_for`.

    For each seed both runs' best checkpoints ranked the same test rows (one per user; their
    ``ranks.npz``, so no checkpoint is needed); a user's value is
    their NDCG@k (full ranking, or the 1+99 sampled ranking with ``sampled``) averaged over the
    seeds, so each user is one pair however many seeds there are (the seeds' values of one user
    are not independent pairs). Returns the number of pairs (users) and seeds, a's and b's means
    (``"a NDCG@k"``, ``"b NDCG@k"``), the mean difference a - b, the Wilcoxon signed-rank p-value
    (two-sided, zero differences dropped) and the paired t-test p-value.
    """
    seeds = list(seeds)
    sides = {"a": (model_a, {**(overrides or {}), **(flags_a or {})}),
             "b": (model_b, {**(overrides or {}), **(flags_b or {})})}
    values: dict[str, list] = {"a": [], "b": []}
    users = None
    for seed in seeds:
        for side, (model, flags) in sides.items():
            r = run_ranks(dataset, model, seed, profile, runs, flags, tuned)
            if users is None:
                users = r["users"]
            elif not np.array_equal(r["users"], users):
                raise ValueError(f"paired_test: {dataset} {model} seed {seed} ranked other test users than "
                                 f"{sides['a'][0]} seed {seeds[0]}: the runs' data differ, no pairs to form")
            values[side].append(ndcg_per_row(torch.from_numpy(r["sampled" if sampled else "full"]), k).numpy())
    a, b = (np.stack(values[side]).mean(0) for side in ("a", "b"))  # (users,): mean over the seeds
    return {"dataset": dataset, "a": model_a, "b": model_b, "pairs": len(a), "seeds": len(seeds),
            f"a NDCG@{k}": a.mean(), f"b NDCG@{k}": b.mean(), **paired_stats(a, b)}


def paired_stats(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Two paired samples ``(n,)``: the mean difference a - b, the Wilcoxon signed-rank p-value
    (two-sided, zero differences dropped) and the paired t-test p-value; both p are 1 when every
    pair ties (no evidence of a difference; the tests themselves would give NaN)."""
    from scipy import stats  # noqa: PLC0415
    diff = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    differ = bool(np.any(diff != 0))
    return {"mean difference": float(diff.mean()),
            "Wilcoxon p": float(stats.wilcoxon(a, b).pvalue) if differ else 1.0,
            "paired t p": float(stats.ttest_rel(a, b).pvalue) if differ else 1.0}


def holm(pvalues: Iterable[float]) -> np.ndarray:
    """Holm's step-down adjustment of ``pvalues`` (one family of tests, e.g. one per dataset), in their
    order: the i-th smallest of m is multiplied by m - i + 1 (i from 1), made non-decreasing in that
    order and capped at 1. Rejecting where the adjusted p < alpha keeps the family-wise error <= alpha."""
    p = np.asarray(list(pvalues), dtype=float)
    order = np.argsort(p, kind="stable")
    m = len(p)
    adjusted = np.minimum(np.maximum.accumulate((m - np.arange(m)) * p[order]), 1.0)
    out = np.empty(m)
    out[order] = adjusted
    return out


def run_ranks(dataset: str, model: str, seed: int, profile: str, runs: str | Path,
              overrides: dict[str, Any] | None = None, tuned: Tuned | None = None, split: str = "test") -> dict[str, np.ndarray]:
    """A finished run's per-row ranks of ``split`` (``users``, ``full``, ``sampled``; :func:`m3bsr.train.load_ranks`),
    the run's config by :func:`config_for`."""
    run = run_dir(config_for(profile, dataset, model, seed, overrides, tuned), runs)
    if not (run / "metrics.json").exists():
        raise FileNotFoundError(f"{run}: no finished run (train it first, e.g. with run_grid)")
    return load_ranks(run, split)


def trained(dataset: str, model: str, seed: int, profile: str, runs: str | Path, overrides: dict[str, Any] | None = None,
            data: Dataset | None = None, tuned: Tuned | None = None, checkpoints: str | Path | None = None,
            log: Callable[[str], None] = print, **model_fields: Any) -> Trainer:
    """A Trainer holding the best checkpoint of a finished run (:func:`config_for`), checked against
    its config and the data, optionally with evaluation fields changed (``train.EVAL_FIELDS``, e.g.
    ``inference_steps=5``, ``eval_mode="skip"``; any other field raises ConfigError).

    A finished run without its ``best.pt`` (the committed study's runs in ``results/runs`` carry
    none) is trained again under ``checkpoints`` (default ``<repo>/runs/checkpoints``, git-ignored),
    once, and its checkpoint used; ``log`` says so, with both test NDCG@10 values when they differ
    (another device or thread count can change the last digits)."""
    cfg = config_for(profile, dataset, model, seed, overrides, tuned)
    run = run_dir(cfg, runs)
    if not (run / "metrics.json").exists():
        raise FileNotFoundError(f"{run}: no finished run (train it first, e.g. with run_grid)")
    if not (run / "best.pt").exists():
        committed = train_cached(cfg, runs)["test"]["NDCG@10"]
        checkpoints = Path(checkpoints) if checkpoints is not None else repo_root() / "runs" / "checkpoints"
        again = run_dir(cfg, checkpoints)
        if not (again / "best.pt").exists():
            log(f"{run.name}: no best.pt beside its metrics (committed runs carry no checkpoint); "
                f"training it again in {again}")
        retrained = train_cached(cfg, checkpoints, dataset=data)["test"]["NDCG@10"]
        if retrained != committed:
            log(f"{run.name}: retrained test NDCG@10 {retrained:.6f}, the run's own {committed:.6f}")
        run = again
    return load_trained(cfg, run, model_fields, dataset=data)


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


# ----------------------------------------------------------------------------- the verdict on the paper's claims

ALPHA = 0.05  # a claim is decided where its (Holm-adjusted) p-value is below this
COMPONENT_CLAIMS = {"w/o CDMD": "CDMD helps", "w/o CDBD": "CDBD helps",
                    "w/o contrastive loss": "the contrastive loss helps", "w/o common expert": "the common expert helps",
                    "router = mean": "routing the experts helps (against their mean)",
                    "T = 1": "more diffusion steps help (the tuned T against T = 1)"}


def verdict(difference: float, p: float, alpha: float = ALPHA) -> str:
    """A claim that one side is better, from the mean difference (positive: the claim's direction) and
    its p-value: "held" (p < alpha, difference > 0), "not held" (p < alpha, difference < 0) or
    "inconclusive" (p >= alpha: the data cannot tell)."""
    if not p < alpha:
        return "inconclusive"
    return "held" if difference > 0 else "not held"


def verdicts(results: str | Path) -> pd.DataFrame:
    """Each claim of the paper, from the tables the notebooks wrote under ``results``: claim, where,
    the number behind it, its Holm-adjusted Wilcoxon p-value and the verdict (:func:`verdict`).

    * M3BSR beats the best baseline: ``04_significance.csv`` (full ranking), per dataset;
    * each component helps: ``05_ablation_tests.csv``, the full model against each variant;
    * denoising helps under noise: ``07_regimes.csv``, per study: held where M3BSR is significantly
      ahead at the noisiest setting and further ahead than at the cleanest, not held where it is
      significantly behind there;
    * denoised representations separate: ``06_separation_tests.csv``, CDMD's change of kNN purity
      (image, text) and CDBD's change of the accidental clicks' interest agreement.

    A table that is missing leaves its claims out."""
    results = Path(results)
    rows = []

    def read(name: str) -> pd.DataFrame | None:
        return pd.read_csv(results / name) if (results / name).exists() else None

    if (sig := read("04_significance.csv")) is not None:
        for _, r in sig[sig["ranking"] == "full"].iterrows():
            rows.append(("M3BSR beats the best baseline", f"{r['dataset']}, against {r['best baseline']}",
                         f"NDCG@10 {r['M3BSR NDCG@10']:.4f} vs {r['baseline NDCG@10']:.4f}", r["Wilcoxon p (Holm)"],
                         verdict(r["difference"], r["Wilcoxon p (Holm)"])))
    if (abl := read("05_ablation_tests.csv")) is not None:
        for _, r in abl.iterrows():
            rows.append((f"each component helps: {COMPONENT_CLAIMS.get(r['variant'], r['variant'])}",
                         f"{r['dataset']}, full vs {r['variant']}",
                         f"NDCG@10 {r['full NDCG@10']:.4f} vs {r['variant NDCG@10']:.4f}", r["Wilcoxon p (Holm)"],
                         verdict(r["difference"], r["Wilcoxon p (Holm)"])))
    if (reg := read("07_regimes.csv")) is not None:
        for (study, dataset), g in reg.groupby(["study", "dataset"], sort=False):
            g = g.sort_values("value")
            clean, noisy = g.iloc[0], g.iloc[-1]
            held = verdict(noisy["difference"], noisy["Wilcoxon p (Holm)"])
            if held == "held" and not noisy["difference"] > clean["difference"]:
                held = "inconclusive"  # ahead at the noisiest setting, but no further ahead than at the cleanest
            rows.append((f"denoising helps under noise: {study.split('. ', 1)[-1]}", f"{dataset}, {noisy['field']}",
                         f"M3BSR - best baseline: {clean['difference']:+.4f} at {clean['value']:g}, "
                         f"{noisy['difference']:+.4f} at {noisy['value']:g}", noisy["Wilcoxon p (Holm)"], held))
    if (sep := read("06_separation_tests.csv")) is not None:
        keep = (((sep["chain"] == "CDMD") & (sep["measure"] == "kNN purity"))
                | ((sep["chain"] == "CDBD") & (sep["measure"] == "interest agreement, accidental")))
        for _, r in sep[keep].iterrows():
            claim = ("denoised representations separate: CDMD raises kNN purity" if r["chain"] == "CDMD" else
                     "denoised representations separate: CDBD pulls accidental clicks towards the user's interests")
            rows.append((claim, f"synthetic, {r['modality']} stream", f"{r['measure']} {r['before']:.3f} -> {r['after']:.3f}",
                         r["Wilcoxon p (Holm)"], verdict(r["mean difference"], r["Wilcoxon p (Holm)"])))
    return pd.DataFrame(rows, columns=["claim", "where", "number", "p (Holm)", "verdict"])
