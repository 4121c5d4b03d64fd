"""Command line: ``python -m m3bsr train | evaluate | stats | bench | config | check-data | tune``.

    python -m m3bsr train --dataset ml-100k-mm --model m3bsr --profile default --seed 0 --out runs/x
    python -m m3bsr train --data-file my.csv --deep buy --model sasrec --profile ci --out runs/y
    python -m m3bsr evaluate --run runs/x [--set inference_steps=5]
    python -m m3bsr bench --size full --device cpu --out results/bench   # performance ratios (bench.py)
    python -m m3bsr bench --time-to-quality --datasets synthetic --seeds 0,1,2   # training modes (time_to_quality.py)
    python -m m3bsr bench --scaling --device cpu --threads 1   # step time against L, items; the paper's data size
    python -m m3bsr config --profile ci [--set T=5]   # every config field: value, type, allowed values
    python -m m3bsr check-data [--data-root DIR]      # the datasets' layout and SHA-256 checksums
    python -m m3bsr tune --dataset ml-100k-mm --model sasrec [--trials N] [--timeout S]   # docs/tuning.md
    python -m m3bsr tune --export                     # results/tuning/best.json: each study's best trial
    python -m m3bsr tune --cost [--set d=32]          # each model's step, the study's CPU-hours (docs/tuning.md)
    torchrun --nproc_per_node=2 -m m3bsr train ...   # data-parallel (gloo on CPU, nccl on CUDA)
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import io
import json
import logging
import os
import sys
import tokenize
from pathlib import Path

from .config import ABOVE, CHOICES, PROFILES, RANGES, Config, ConfigError, make_config
from .data.schema import DataError
from .models.registry import MODELS


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="m3bsr", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train one model on one dataset and write <out>/metrics.json")
    _data_arguments(t)
    t.add_argument("--model", required=True, choices=sorted(MODELS))
    t.add_argument("--seed", type=int)
    t.add_argument("--epochs", type=int)
    t.add_argument("--device", help="auto | cpu | cuda[:N]")
    t.add_argument("--out", required=True, help="run folder")
    t.add_argument("--resume", action="store_true",
                   help="continue from <out>/last.pt (exactly: the same metrics as an uninterrupted run)")

    e = sub.add_parser("evaluate", help="recompute metrics from a run's best checkpoint")
    e.add_argument("run_folder", nargs="?", metavar="RUN", help="the run folder (or --run RUN; under torchrun "
                   "use this positional form: torchrun's own parser mistakes --run for its --run-path)")
    e.add_argument("--run")
    e.add_argument("--device", default="auto")
    e.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="evaluate with an evaluation-only field changed, e.g. --set inference_steps=5 "
                        "(inference_steps, eval_mode, eval_batch_size, mask_seen)")

    s = sub.add_parser("stats", help="print a dataset's statistics (its events; features are not loaded)")
    _data_arguments(s)

    b = sub.add_parser("bench", help="M3BSR's throughput, memory, FLOP/s and eval time, side by side (bench.py)")
    b.add_argument("--size", default="full", choices=["small", "full"],
                   help="small: a smoke run (< 60 s without --compile)")
    b.add_argument("--device", default="auto", help="auto | cpu | cuda")
    b.add_argument("--out", help="output folder (default: results/bench)")
    b.add_argument("--run", help="a run folder whose best.pt is evaluated (default: train M3BSR briefly)")
    b.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    b.add_argument("--repeats", type=int, help="timed repeats per measurement (default: the size's)")
    b.add_argument("--epochs", type=int, help="epochs of the brief training before the eval measurements")
    b.add_argument("--batch", type=int, help="rows of the training batch (default: the size's, full: 256)")
    b.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA)")
    b.add_argument("--compile", action="store_true", help="also time torch.compile'd train steps (minutes to compile)")
    b.add_argument("--time-to-quality", action="store_true", help="instead: train M3BSR in each training mode and "
                   "time how long each takes to reach the paper's chain's validation NDCG@10 (time_to_quality.py)")
    b.add_argument("--scaling", action="store_true", help="instead: step time against L and the catalogue size, "
                   "and --steps train steps at the paper profile's data size with a projected run time")
    b.add_argument("--steps", type=int, default=3, help="--scaling: timed train steps at the paper profile")
    b.add_argument("--datasets", default="synthetic", help="--time-to-quality: comma-separated datasets")
    b.add_argument("--seeds", default="0,1,2", help="--time-to-quality: comma-separated seeds")
    b.add_argument("--jobs", type=int, help="--time-to-quality: runs side by side (default: one per core)")

    c = sub.add_parser("config", help="print every config field of a profile: value, type, allowed values, meaning")
    c.add_argument("--profile", default="default", choices=sorted(PROFILES))
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="show the config with this override")

    d = sub.add_parser("check-data", help="check each dataset's files and SHA-256 checksums against the reference "
                       "copies (exit 1 on a mismatch or a file missing from a present dataset)")
    d.add_argument("--data-root", help="folder holding the datasets (else $M3BSR_DATA, else ../shared/datasets)")
    d.add_argument("--all", action="store_true", help="also exit 1 when a dataset is not present at all")

    u = sub.add_parser("tune", help="equal-budget hyperparameter search on validation only (docs/tuning.md)")
    u.add_argument("--dataset", help="the dataset whose study runs (with --model)")
    u.add_argument("--model", choices=sorted(MODELS))
    u.add_argument("--profile", default="default", choices=sorted(PROFILES))
    u.add_argument("--trials", type=int, help="run until the study holds this many finished (complete or pruned) "
                   "trials (default: the profile's, search_spaces.TRIALS)")
    u.add_argument("--storage", help="the study database URL (default: sqlite:///results/tuning/study.db)")
    u.add_argument("--timeout", type=float, help="seconds: start no trial after this (one in progress runs on)")
    u.add_argument("--runs", help="the trials' run folders, checkpoints (default: runs/tuning)")
    u.add_argument("--results", help="where each trial's small files and best.json land (default: results/tuning)")
    u.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    u.add_argument("--export", action="store_true",
                   help="write results/tuning/best.json: each study's best trial as overrides of its profile")
    u.add_argument("--cost", action="store_true", help="instead: measure each model's step on each dataset (or "
                   "the --dataset, --model given) and write the study's CPU-hours to results/tuning/cost-*.md")
    u.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="--cost: price the profile with this override, e.g. --set d=32")
    u.add_argument("--steps", type=int, default=3, help="--cost: timed steps per model and dataset")
    return p


def _data_arguments(p: argparse.ArgumentParser) -> None:
    """The options that name a dataset and its config (``train`` and ``stats``)."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--dataset", help="synthetic | ml-100k-mm | ml-latest-small-mm | rec-tmall | taobao-ub")
    src.add_argument("--data-file", help="a CSV with header user_id,item_id,behavior,timestamp")
    p.add_argument("--deep", help="comma-separated behaviours forming the deep (target) level")
    p.add_argument("--levels", help='multi-level order, shallow -> deep, e.g. "pv|cart|fav,buy"')
    p.add_argument("--profile", default="default", choices=sorted(PROFILES))
    p.add_argument("--data-root", help="folder holding the datasets (else $M3BSR_DATA)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config field, e.g. --set cdbd=false --set T=5")


def _overrides(pairs: list[str]) -> dict[str, object]:
    """``--set KEY=VALUE`` pairs -> {KEY: VALUE} (values parsed later, by the field's type)."""
    over: dict[str, object] = {}
    for kv in pairs:
        if "=" not in kv:
            raise ConfigError(f"--set expects KEY=VALUE, got {kv!r}")
        k, v = kv.split("=", 1)
        over[k.strip()] = v
    return over


def _config(a: argparse.Namespace):
    over = _overrides(a.set)
    for field in ("dataset", "data_file", "deep", "levels", "model", "seed", "epochs", "device", "data_root"):
        value = getattr(a, field, None)  # stats has no model, seed, epochs or device
        if value is not None:
            over[field] = value
    if a.data_file:
        over["dataset"] = "csv"
    return make_config(a.profile, over)


def _allowed(name: str, ftype: str) -> str:
    """The values config field ``name`` accepts (config.CHOICES / RANGES / ABOVE, the model registry)."""
    if name == "model":
        allowed = "one of " + ", ".join(sorted(MODELS))
    elif name in CHOICES:
        allowed = "one of " + ", ".join(CHOICES[name])
    elif name in RANGES:
        lo, hi = RANGES[name]
        allowed = f"{lo}..{hi}" if hi is not None else f">= {lo}"
    elif name in ABOVE:
        allowed = f"> {ABOVE[name]}"
    elif ftype.startswith("bool"):
        allowed = "true | false"
    else:
        allowed = "-"  # not range-checked by the config
    return allowed + (" | none" if "None" in ftype else "")


def _notes(cls: type) -> dict[str, str]:
    """Field name -> the comment beside it in config.py (its description there; '' when it has none)."""
    first: dict[int, str] = {}
    notes: dict[str, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(inspect.getsource(cls)).readline):
        if tok.type == tokenize.NAME:
            first.setdefault(tok.start[0], tok.string)
        elif tok.type == tokenize.COMMENT and tok.start[0] in first:
            notes[first[tok.start[0]]] = tok.string.lstrip("#").strip()
    return notes


def config_table(cfg: Config) -> str:
    """A table of every field of ``cfg``: ``section.name``, value, type, allowed values, description."""
    rows = [("field", "value", "type", "allowed", "description")]
    for section in ("data", "model", "train"):
        sub = getattr(cfg, section)
        notes = _notes(type(sub))
        for f in dataclasses.fields(sub):
            value = getattr(sub, f.name)
            shown = "none" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
            ftype = str(f.type)
            rows.append((f"{section}.{f.name}", shown, ftype, _allowed(f.name, ftype), notes.get(f.name, "")))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [f"profile: {cfg.profile}"]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(r[:4], widths)) + "  " + r[4] for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def main(argv: list[str] | None = None) -> int:
    p = _parser()
    a = p.parse_args(argv)
    try:
        if a.command == "config":
            print(config_table(make_config(a.profile, _overrides(a.set))))
            return 0
        if a.command == "check-data":
            from .data.checks import check_data, report  # noqa: PLC0415
            from .data.sources import resolve_data_root  # noqa: PLC0415
            root = resolve_data_root(a.data_root)
            checks, code = check_data(root, require_all=a.all)
            print(report(checks, root, code))
            return code
    except (DataError, ConfigError) as err:
        print(f"m3bsr: error: {err}", file=sys.stderr)
        return 2
    if a.command == "evaluate":
        if (a.run is None) == (a.run_folder is None):
            p.error("evaluate: give the run folder once, as RUN or --run RUN")
        a.run = a.run or a.run_folder
    if a.command == "bench" and a.scaling and a.time_to_quality:
        p.error("bench: give --scaling or --time-to-quality, not both")
    from .train import CheckpointError, Trainer, close_distributed, evaluate_run  # noqa: PLC0415 (torch loads here)
    main_rank = int(os.environ.get("RANK", "0")) == 0  # under torchrun only rank 0 prints results
    try:
        if a.command == "train":
            logging.basicConfig(format="%(asctime)s %(message)s", datefmt="%H:%M:%S")  # unless already configured
            cfg = _config(a)
            result = Trainer(cfg, a.out).fit(resume=a.resume)
            if main_rank:
                print(json.dumps({"valid": result["valid"], "test": result["test"]}, indent=2))
        elif a.command == "evaluate":
            result = evaluate_run(a.run, a.device, _overrides(a.set))
            if main_rank:
                print(json.dumps(result, indent=2))
        elif a.command == "bench" and a.time_to_quality:
            from .time_to_quality import run_time_to_quality  # noqa: PLC0415
            try:
                seeds = [int(s) for s in a.seeds.split(",")]
            except ValueError:
                p.error(f"--seeds expects comma-separated integers, got {a.seeds!r}")
            run_time_to_quality(a.datasets.split(","), seeds, size=a.size, out=a.out, jobs=a.jobs,
                                device=a.device, threads=a.threads)
        elif a.command == "bench" and a.scaling:
            from .bench import run_scaling  # noqa: PLC0415
            run_scaling(a.device, a.out, threads=a.threads, repeats=a.repeats, steps=a.steps, size=a.size)
        elif a.command == "bench":
            from .bench import run_bench  # noqa: PLC0415
            run_bench(a.size, a.device, a.out, run=a.run, threads=a.threads, repeats=a.repeats, epochs=a.epochs,
                      batch_size=a.batch, bf16=a.bf16, compile=a.compile)
        elif a.command == "tune" and a.cost:
            from . import tune  # noqa: PLC0415
            over = _overrides(a.set)
            costs = tune.step_costs(a.profile, over, (a.dataset,) if a.dataset else tune.COST_DATASETS,
                                    [a.model] if a.model else None, a.steps)
            hours = tune.study_cost(costs, a.profile, over)
            print(f"wrote {tune.write_cost(costs, hours, a.profile, over, a.results or tune.RESULTS)}")
            print(json.dumps({k: round(v, 2) for k, v in hours.items()}, indent=2))
        elif a.command == "tune":
            from . import tune  # noqa: PLC0415 (optuna loads here)
            if (a.dataset is None) != (a.model is None) or (a.dataset is None and not a.export):
                p.error("tune: give --dataset and --model (a study to run), --export, or both")
            storage, results = a.storage or tune.STORAGE, a.results or tune.RESULTS
            if a.dataset is not None:
                tune.tune(a.dataset, a.model, a.profile, a.trials, storage, a.timeout, a.runs or tune.RUNS,
                          results, a.device)
            if a.export:
                tune.export(storage, Path(results) / "best.json")
        elif a.command == "stats":
            from .data.sources import load_dataset  # noqa: PLC0415
            stats = load_dataset(_config(a).data, features=False).stats()
            stats.pop("modalities")  # features are not loaded here (docs/data.md lists each dataset's)
            print(json.dumps(stats, indent=2))
    except (DataError, CheckpointError, ConfigError, OSError) as err:  # OSError: e.g. a full disk, a read-only folder
        who = f"m3bsr[rank {os.environ['RANK']}]" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "m3bsr"
        print(f"{who}: error: {err}", file=sys.stderr)
        return 2
    finally:
        close_distributed()
    return 0
