"""Equal-budget hyperparameter search on validation only: ``python -m m3bsr tune`` (docs/tuning.md).

One Optuna study per (dataset, model, profile), named ``<dataset>/<model>/<profile>``, all in one
database (by default the SQLite file ``results/tuning/study.db``, kept in the repository):

* **Equal budget.** Every study runs to the same number of finished (complete or pruned) trials,
  :data:`~m3bsr.search_spaces.TRIALS` of the profile, each trial training with the profile's config,
  the trial budget :data:`~m3bsr.search_spaces.TRIAL_BUDGET` and the trial's draw from the model's
  search space (:mod:`m3bsr.search_spaces`). Every trial trains with seed 0. :func:`export` picks
  the best of the *first* ``TRIALS`` finished trials, so a study that ran over (two processes
  finishing at once) chooses from as many trials as the others.
* **Validation only.** A trial's :class:`~m3bsr.train.Trainer` is made with ``test=False``: the test
  split is never read (no test negatives drawn, no test metrics). The objective is the best
  validation NDCG@10; a pruner (:class:`optuna.pruners.MedianPruner`) sees it at every validation
  (``trial.report(NDCG@10, optimizer step)``) and stops trials that trail the median of earlier ones.
* **Sampler.** TPE with a fixed seed (:data:`SEED` plus the number of trials the study held when the
  process started, so that a process joining a study draws other startup points; two processes
  started on an empty study at the same moment draw the same ones), its first
  :data:`STARTUP_TRIALS` trials random. The profile's own values are the first trial of each study.
* **Restarts and sharing.** ``tune`` killed at any point and started again continues the study
  (``--trials N`` means "until the study holds N finished trials"). Several processes, or machines
  on one database URL, can share a study. A trial whose process died is found by its heartbeat
  (none for :data:`GRACE` seconds), marked failed and queued again with the same parameters; it
  resumes from its run folder's ``last.pt`` where that folder is still there.
* **Results.** Each trial's ``config.json``, ``history.csv``, ``metrics.json`` (validation only) and
  ``trial.json`` (state, value, parameters) are copied to
  ``results/tuning/<dataset>/<model>/<profile>/trial-<n>/``; its run folder
  ``runs/tuning/<dataset>/<model>/<profile>/trial-<n>/`` (not kept in the repository) holds its
  checkpoints while it runs, and loses them when it ends. :func:`export` writes ``results/tuning/best.json``, and
  :func:`best_overrides` reads it: the config overrides (relative to the profile) that the final
  five-seed runs train with.

Optuna is imported here only (``pip install optuna``); :func:`best_overrides` needs no Optuna.
"""
from __future__ import annotations

import contextlib
import json
import shutil
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from .config import ConfigError, make_config, repo_root
from .search_spaces import MODEL_SPACES, TRIAL_BUDGET, TRIALS, space

if TYPE_CHECKING:
    import optuna

RESULTS = repo_root() / "results" / "tuning"
STORAGE = f"sqlite:///{RESULTS / 'study.db'}"
BEST = RESULTS / "best.json"
RUNS = Path("runs") / "tuning"  # trial run folders (checkpoints): never in the repository
SEED = 0  # the TPE sampler's seed (plus the trials already in the study)
HEARTBEAT, GRACE = 60, 300  # seconds: a running trial writes a heartbeat this often; stale after GRACE
RETRIES = 2  # times a trial whose process died is run again
STARTUP_TRIALS = 5  # TPE draws its first this many trials at random, and the pruner prunes none of them
SELECT = "NDCG@10"


def study_name(dataset: str, model: str, profile: str) -> str:
    return f"{dataset}/{model}/{profile}"


def trial_budget(profile: str) -> dict[str, Any]:
    """The fields a trial of ``profile`` trains with on top of the profile: the trial budget, seed 0."""
    if profile not in TRIAL_BUDGET:
        raise ConfigError(f"no trial budget for profile {profile!r}; expected one of {sorted(TRIAL_BUDGET)}")
    return {**TRIAL_BUDGET[profile], "seed": 0}


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Optuna's heartbeats and retries are marked experimental; say so once here (docs/tuning.md), not per trial."""
    import optuna  # noqa: PLC0415
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


def open_storage(url: str = STORAGE) -> "optuna.storages.RDBStorage":
    """The study database at ``url`` (an SQLite file's folder is made), with trial heartbeats:
    a trial silent for :data:`GRACE` seconds is failed and queued again (:data:`RETRIES` times)."""
    import optuna  # noqa: PLC0415
    engine: dict[str, Any] = {}
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        engine = {"connect_args": {"timeout": 60}}  # processes sharing the file wait for its lock
    with _quiet():
        if hasattr(optuna.storages, "RetryHeartbeatStaleTrialCallback"):  # optuna >= 5
            retry = {"heartbeat_stale_trial_callback": optuna.storages.RetryHeartbeatStaleTrialCallback(RETRIES)}
        else:  # optuna 4
            retry = {"failed_trial_callback": optuna.storages.RetryFailedTrialCallback(RETRIES)}
    with _quiet():
        return optuna.storages.RDBStorage(url, engine_kwargs=engine, heartbeat_interval=HEARTBEAT,
                                          grace_period=GRACE, **retry)


def suggest(trial: "optuna.Trial", name: str, dist: Any) -> Any:
    """One field's value from its distribution in :mod:`m3bsr.search_spaces`."""
    if isinstance(dist, list):
        return trial.suggest_categorical(name, dist)
    kind, lo, hi = dist
    if kind not in ("log", "float"):
        raise ConfigError(f"search space of {name!r}: unknown kind {kind!r}, expected 'log', 'float' or a list")
    return trial.suggest_float(name, lo, hi, log=kind == "log")


def profile_point(model: str, profile: str) -> dict[str, Any]:
    """The profile's values of ``model``'s searched fields, those that lie in the space."""
    cfg = make_config(profile, {"model": model})
    point = {}
    for name, dist in space(model).items():
        value = getattr(cfg.train if hasattr(cfg.train, name) else cfg.model, name)
        inside = value in dist if isinstance(dist, list) else dist[1] <= value <= dist[2]
        if inside:
            point[name] = value
    return point


def finished(study: "optuna.Study") -> list["optuna.trial.FrozenTrial"]:
    """The study's complete and pruned trials, by trial number."""
    from optuna.trial import TrialState  # noqa: PLC0415
    return sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)),
                  key=lambda t: t.number)


def tune(dataset: str, model: str, profile: str = "default", trials: int | None = None, storage: str = STORAGE,
         timeout: float | None = None, runs: str | Path = RUNS, results: str | Path = RESULTS,
         device: str = "auto", pruner: "optuna.pruners.BasePruner | None" = None,
         log: Callable[[str], None] = print) -> "optuna.Study | None":
    """Run trials of ``dataset``/``model``/``profile``'s study until it holds ``trials`` finished ones
    (default :data:`~m3bsr.search_spaces.TRIALS` of the profile), one at a time in this process.

    ``timeout`` (seconds): start no trial after it (a trial in progress runs to its end). ``runs``:
    the trials' run folders (checkpoints); ``results``: where each trial's small files land.
    ``pruner``: default :class:`optuna.pruners.MedianPruner` (:data:`STARTUP_TRIALS` trials before it
    prunes, none before half the trial's ``min_steps``). A model with nothing to train (pop) has no
    study: 0 trials.
    """
    import optuna  # noqa: PLC0415
    from .train import SELECT_METRIC, Trainer, load_data  # noqa: PLC0415

    sp = space(model)
    n = TRIALS.get(profile, 0) if trials is None else trials
    fixed = {**trial_budget(profile), "dataset": dataset, "model": model}
    base = make_config(profile, fixed)  # checks the dataset, model and budget before any study is made
    if not sp:
        log(f"{model}: nothing to tune (no trainable parameters); no study")
        return None
    if pruner is None:
        pruner = optuna.pruners.MedianPruner(n_startup_trials=STARTUP_TRIALS,
                                             n_warmup_steps=base.train.min_steps // 2)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    name = study_name(dataset, model, profile)
    study = optuna.create_study(study_name=name, storage=open_storage(storage), direction="maximize",
                                pruner=pruner, load_if_exists=True)
    held = study.user_attrs.get("fixed")
    if held is None:
        study.set_user_attr("fixed", fixed)
        study.set_user_attr("space", {k: list(v) if isinstance(v, tuple) else v for k, v in sp.items()})
    elif held != fixed:
        raise ConfigError(f"study {name} in {storage} trains trials with {held}, not {fixed} (the trial budget "
                          "in search_spaces.py changed?): give it another --storage")
    study.sampler = optuna.samplers.TPESampler(n_startup_trials=STARTUP_TRIALS,
                                               seed=SEED + len(study.get_trials(deepcopy=False)))
    study.enqueue_trial(profile_point(model, profile), skip_if_exists=True)
    data = load_data(base)  # once per process: the search changes no data field
    results, runs = Path(results) / dataset / model / profile, Path(runs) / dataset / model / profile

    def objective(trial: optuna.Trial) -> float:
        cfg = make_config(profile, {**fixed, **{k: suggest(trial, k, d) for k, d in sp.items()},
                                    "device": device, "progress": False})
        frozen = next(t for t in study.get_trials(deepcopy=False) if t.number == trial.number)
        origin = frozen.system_attrs.get("failed_trial")  # a retried trial resumes its original's run
        out = runs / f"trial-{trial.number if origin is None else origin}"

        def report(step: int, valid: dict[str, float]) -> bool:
            trial.report(valid[SELECT_METRIC], step)
            return trial.should_prune()

        result = Trainer(cfg, out, dataset=data, test=False).fit(resume=origin is not None, on_validation=report)
        pruned = bool(result.get("stopped_by_callback"))
        save_trial(out, results / f"trial-{trial.number}", {
            "number": trial.number, "state": "PRUNED" if pruned else "COMPLETE", "params": trial.params,
            "value": None if pruned else result["valid"][SELECT_METRIC], "best_step": result["best_step"],
            "run": out.name})
        for checkpoint in out.glob("*.pt"):  # a finished trial is never resumed: its checkpoints go
            checkpoint.unlink()
        if pruned:
            raise optuna.TrialPruned()
        return result["valid"][SELECT_METRIC]

    deadline = time.monotonic() + timeout if timeout is not None else None
    while True:
        with _quiet():
            optuna.storages.fail_stale_trials(study)  # trials of dead processes: failed, queued again
        running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
        done = len(finished(study))
        if done + len(running) >= n:
            break
        if deadline is not None and time.monotonic() >= deadline:
            log(f"{name}: timeout; {done}/{n} trials finished (run tune again to continue)")
            break
        with _quiet():
            study.optimize(objective, n_trials=1, gc_after_trial=True)
        last = finished(study)[-1] if finished(study) else None
        if last is not None:
            shown = "pruned" if last.value is None else f"valid {SELECT_METRIC} {last.value:.4f}"
            log(f"{name}: trial {last.number} {shown} ({len(finished(study))}/{n} finished)")
    return study


def save_trial(run: Path, dest: Path, summary: dict[str, Any]) -> None:
    """The small files of a trial's run folder (config, history, validation metrics) and ``summary``
    as ``trial.json``, in ``dest``; never checkpoints."""
    from .files import atomic_write_text  # noqa: PLC0415
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "history.csv", "metrics.json"):
        if (run / name).exists():
            shutil.copyfile(run / name, dest / name)
    atomic_write_text(dest / "trial.json", json.dumps(summary, indent=2))


def export(storage: str = STORAGE, path: str | Path = BEST, trials: int | None = None,
           log: Callable[[str], None] = print) -> dict[str, Any]:
    """Write ``path`` (``results/tuning/best.json``): for each study in ``storage``, the parameters of
    its best trial among its first ``trials`` finished ones (default: the profile's
    :data:`~m3bsr.search_spaces.TRIALS`) as config overrides relative to the profile, with its
    validation NDCG@10, and whether the study is complete (holds that many finished trials)."""
    import optuna  # noqa: PLC0415
    from .files import atomic_write_text  # noqa: PLC0415
    db = open_storage(storage)
    best: dict[str, Any] = {}
    for summary in sorted(optuna.get_all_study_summaries(db, include_best_trial=False), key=lambda s: s.study_name):
        dataset, model, profile = summary.study_name.split("/")
        n = TRIALS.get(profile, 0) if trials is None else trials
        study = optuna.load_study(study_name=summary.study_name, storage=db)
        first = finished(study)[:n]
        complete = [t for t in first if t.state == optuna.trial.TrialState.COMPLETE]
        if not complete:
            log(f"{summary.study_name}: no complete trial yet; left out")
            continue
        top = max(complete, key=lambda t: (t.value, -t.number))  # ties: the earlier trial
        best[summary.study_name] = {"dataset": dataset, "model": model, "profile": profile,
                                    "overrides": top.params, f"valid_{SELECT}": top.value, "trial": top.number,
                                    "finished_trials": len(first), "trials": n, "complete": len(first) >= n}
        log(f"{summary.study_name}: trial {top.number}, valid {SELECT} {top.value:.4f} "
            f"({len(first)}/{n} finished trials)")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(path), json.dumps(best, indent=2, sort_keys=True) + "\n")
    write_summary(db, Path(path).parent)
    return best


def write_summary(db: "optuna.storages.BaseStorage", results: Path) -> Path:
    """``<results>/studies.{csv,md}``: per study its trials by state, the profile's own trial (trial 0)
    and the best one's validation NDCG@10, and the hours its trials ran (start to end of each trial,
    summed; a trial's process ran one thread, two processes at a time on the 2-core CPU)."""
    import optuna  # noqa: PLC0415
    import pandas as pd  # noqa: PLC0415
    from .files import atomic_write_text  # noqa: PLC0415
    rows = []
    for summary in sorted(optuna.get_all_study_summaries(db, include_best_trial=False), key=lambda s: s.study_name):
        trials = optuna.load_study(study_name=summary.study_name, storage=db).get_trials(deepcopy=False)
        states = pd.Series([t.state.name for t in trials])
        values = {t.number: t.value for t in trials if t.state == optuna.trial.TrialState.COMPLETE}
        ran = [(t.datetime_complete - t.datetime_start).total_seconds() for t in trials
               if t.datetime_start is not None and t.datetime_complete is not None]
        rows.append({"study": summary.study_name, "complete": int((states == "COMPLETE").sum()),
                     "pruned": int((states == "PRUNED").sum()), "failed or running": int((~states.isin(["COMPLETE", "PRUNED"])).sum()),
                     f"trial 0 valid {SELECT}": values.get(0, float("nan")),
                     f"best valid {SELECT}": max(values.values()) if values else float("nan"),
                     "hours": sum(ran) / 3600})
    table = pd.DataFrame(rows, columns=["study", "complete", "pruned", "failed or running", f"trial 0 valid {SELECT}",
                                        f"best valid {SELECT}", "hours"])
    atomic_write_text(results / "studies.csv", table.to_csv(index=False, float_format="%.4f"))
    total = table["hours"].sum()
    lines = ["| " + " | ".join(table.columns) + " |", "|---|" + "---:|" * (len(table.columns) - 1)]
    lines += ["| " + " | ".join(f"{v:.4f}" if isinstance(v, float) else str(v) for v in row) + " |"
              for row in table.itertuples(index=False)]
    path = results / "studies.md"
    atomic_write_text(path, f"# The tuning studies: {len(table)} studies, {total:.2f} hours of trials\n\n" + "\n".join(lines) + "\n")
    return path


def best_overrides(dataset: str, model: str, profile: str = "default", path: str | Path = BEST,
                   partial: bool = False) -> dict[str, Any]:
    """The chosen configuration of ``dataset``/``model`` as overrides of ``profile`` (for
    ``make_config(profile, overrides)``), from ``path`` (written by :func:`export`). ``{}`` for a
    model with nothing to tune (pop). A study with fewer finished trials than the others' budget
    raises, unless ``partial``."""
    if not space(model):
        return {}
    name = study_name(dataset, model, profile)
    try:
        entry = json.loads(Path(path).read_text())[name]
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no tuning results (python -m m3bsr tune ... then tune --export)") from None
    except KeyError:
        raise KeyError(f"{path}: no study {name} (python -m m3bsr tune --dataset {dataset} --model {model} "
                       f"--profile {profile}, then tune --export)") from None
    if not entry["complete"] and not partial:
        raise ValueError(f"{path}: study {name} holds {entry['finished_trials']} of its {entry['trials']} trials "
                         "(run tune again to finish it, or pass partial=True)")
    return dict(entry["overrides"])


def tuned(profile: str = "default", path: str | Path = BEST, partial: bool = False) -> Callable[[str, str], dict[str, Any]]:
    """(dataset, model) -> that study's chosen configuration (:func:`best_overrides`), for
    ``experiments.run_grid(..., tuned=tuned())``: the final runs train with what the search chose."""
    return lambda dataset, model: best_overrides(dataset, model, profile, path, partial)


# ---------------------------------------------------------------------------------------------
# What the study costs: python -m m3bsr tune --cost [--profile P] [--set KEY=VALUE ...]
# ---------------------------------------------------------------------------------------------

COST_DATASETS = ("synthetic", "ml-100k-mm", "ml-latest-small-mm")  # the datasets of the main table
TABLE_SEEDS = 5  # the five-seed tables


def step_costs(profile: str = "default", overrides: dict[str, Any] | None = None,
               datasets: tuple[str, ...] = COST_DATASETS, models: list[str] | None = None, steps: int = 3,
               log: Callable[[str], None] = print) -> "pd.DataFrame":
    """CPU-seconds (process time, one torch thread) of one training step of every model with something
    to tune, on each dataset, at ``profile`` with ``overrides``: the mean of ``steps`` steps after one
    warm-up step (``step``), one full-ranking validation (``validation``), and ``per_step`` = step +
    validation / ``eval_steps`` (a validation every ``eval_steps`` steps)."""
    import pandas as pd  # noqa: PLC0415
    import torch  # noqa: PLC0415
    from .train import Trainer  # noqa: PLC0415

    if steps < 1:
        raise ConfigError(f"tune --cost: steps must be at least 1, got {steps}")
    models = models if models is not None else [m for m in MODEL_SPACES if space(m)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rows = []
    try:
        for dataset in datasets:
            data = None
            for model in models:
                cfg = make_config(profile, {**(overrides or {}), "dataset": dataset, "model": model, "progress": False})
                tr = Trainer(cfg, dataset=data, test=False)
                data = tr.ds  # loaded once per dataset
                tr.train_steps(1)
                t0 = time.process_time()
                tr.train_steps(steps)
                step = (time.process_time() - t0) / steps
                t0 = time.process_time()
                tr.evaluate("valid")
                valid = time.process_time() - t0
                rows.append({"dataset": dataset, "model": model, "step": step, "validation": valid,
                             "per_step": step + valid / cfg.train.eval_steps})
                log(f"{dataset:>20} {model:>10}: {step:.3f} CPU-s a step, {valid:.2f} a validation")
    finally:
        torch.set_num_threads(threads)
    return pd.DataFrame(rows, columns=["dataset", "model", "step", "validation", "per_step"])


def study_cost(costs: "pd.DataFrame", profile: str = "default", overrides: dict[str, Any] | None = None,
               seeds: int = TABLE_SEEDS) -> dict[str, float]:
    """CPU-hours of the study from :func:`step_costs`: ``tuning`` (:data:`TRIALS` trials per (model,
    dataset), each at its trial budget's ``max_steps`` at the measured step: no pruning, the profile's
    own values), and the ``seeds`` final runs per (model, dataset): ``tables_min`` at ``min_steps``
    steps each, ``tables_early`` at ``min_steps + patience_steps`` (every run's best by ``min_steps``),
    ``tables_max`` at the budget, ``max_steps``; ``study_min`` and ``study_max`` add the tuning."""
    t = make_config(profile, overrides).train
    trial = make_config(profile, {**(overrides or {}), **trial_budget(profile)}).train.max_steps
    total = float(costs["per_step"].sum())  # one step of every model on every dataset
    hours = {"tuning": TRIALS.get(profile, 0) * trial * total / 3600,
             "tables_min": seeds * t.min_steps * total / 3600,
             "tables_early": seeds * (t.min_steps + t.patience_steps) * total / 3600,
             "tables_max": seeds * t.max_steps * total / 3600}
    hours["study_min"], hours["study_max"] = hours["tuning"] + hours["tables_min"], hours["tuning"] + hours["tables_max"]
    return hours


def write_cost(costs: "pd.DataFrame", hours: dict[str, float], profile: str, overrides: dict[str, Any] | None,
               results: str | Path = RESULTS) -> Path:
    """``<results>/cost-<profile>[-<hash of the overrides>].{csv,md}``; returns the markdown's path."""
    import hashlib  # noqa: PLC0415
    from .files import atomic_write_text  # noqa: PLC0415
    label = profile + (f"-{hashlib.sha256(json.dumps(overrides, sort_keys=True).encode()).hexdigest()[:8]}"
                       if overrides else "")
    out = Path(results)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / f"cost-{label}.csv", costs.to_csv(index=False, float_format="%.4g"))
    wide = costs.pivot(index="model", columns="dataset", values="per_step")[list(dict.fromkeys(costs["dataset"]))]
    wide.loc["sum"] = wide.sum()
    lines = [f"# What the study costs: profile {profile}" + (f" with {overrides}" if overrides else ""), "",
             "CPU-seconds of one training step (process time, one thread) plus its share of a validation:", "",
             "| model | " + " | ".join(wide.columns) + " |", "|---|" + "---:|" * len(wide.columns)]
    lines += [f"| {m} | " + " | ".join(f"{v:.3f}" for v in r) + " |" for m, r in wide.iterrows()]
    lines += ["", "CPU-hours (`m3bsr.tune.study_cost`):", ""]
    lines += [f"- {k}: {v:.1f}" for k, v in hours.items()]
    path = out / f"cost-{label}.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
