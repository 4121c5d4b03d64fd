"""Command line: ``python -m m3bsr train | evaluate | stats | bench``.

    python -m m3bsr train --dataset ml-100k-mm --model m3bsr --profile default --seed 0 --out runs/x
    python -m m3bsr train --data-file my.csv --deep buy --model sasrec --profile ci --out runs/y
    python -m m3bsr evaluate --run runs/x [--set inference_steps=5]
    python -m m3bsr bench --size full --device cpu --out results/bench   # performance ratios (bench.py)
    torchrun --nproc_per_node=2 -m m3bsr train ...   # data-parallel (gloo on CPU, nccl on CUDA)
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from .config import PROFILES, ConfigError, make_config
from .data.schema import DataError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="m3bsr", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train one model on one dataset and write <out>/metrics.json")
    _data_arguments(t)
    t.add_argument("--model", required=True)
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


def main(argv: list[str] | None = None) -> int:
    p = _parser()
    a = p.parse_args(argv)
    if a.command == "evaluate":
        if (a.run is None) == (a.run_folder is None):
            p.error("evaluate: give the run folder once, as RUN or --run RUN")
        a.run = a.run or a.run_folder
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
        elif a.command == "bench":
            from .bench import run_bench  # noqa: PLC0415
            run_bench(a.size, a.device, a.out, run=a.run, threads=a.threads, repeats=a.repeats, epochs=a.epochs,
                      batch_size=a.batch, bf16=a.bf16, compile=a.compile)
        elif a.command == "stats":
            from .data.sources import load_dataset  # noqa: PLC0415
            stats = load_dataset(_config(a).data, features=False).stats()
            stats.pop("modalities")  # features are not loaded here (README, "Data", lists each dataset's)
            print(json.dumps(stats, indent=2))
    except (DataError, CheckpointError, ConfigError, OSError) as err:  # OSError: e.g. a full disk, a read-only folder
        who = f"m3bsr[rank {os.environ['RANK']}]" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "m3bsr"
        print(f"{who}: error: {err}", file=sys.stderr)
        return 2
    finally:
        close_distributed()
    return 0
