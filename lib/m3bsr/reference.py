"""Our split, run through RecBole's SASRec: a single-behaviour sanity check of our SASRec.

:func:`export_recbole` writes the examples our trainer trains and evaluates on as RecBole's pre-split
"benchmark files" for sequential models (one row per target: user, history, target); RecBole reads
them as they are, with no filtering, re-splitting or augmentation of its own. :func:`recbole_config`
sets RecBole's SASRec to our profile's size and training, :func:`run_recbole` trains it and
returns its test metrics. RecBole is imported only there, so it can live in a virtual environment of
its own (docs/results.md, "Single-behaviour sanity check"):

    python -m m3bsr.reference --data-file ml100k-ratings.csv --deep rating --profile default --seed 0 --out runs/recbole
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .config import Config, ConfigError, make_config
from .data.sequences import SequenceData, history_index

SPLITS = ("train", "valid", "test")  # RecBole's benchmark_filename: <name>.<split>.inter
COLUMNS = ("user_id:token", "item_id_list:token_seq", "item_id:token")  # RecBole's atomic-file header


def deep_examples(split: dict, L: int) -> tuple[list[int], list[list[int]], list[int]]:
    """Every target of a split with the deep-level history our models read for it.

    split: a :class:`SequenceData` split (``items``/``times`` ``(B, S, W+1)``, ``targets`` ``(B, K)``).
    Target k of row b reads the last ``L`` deep events up to its history index (all the events an
    evaluation row holds, a window of a training row) -> (users, histories oldest first, targets),
    one entry per target, in row order.
    """
    items = split["items"][:, -1].numpy()  # (B, W+1), the deep level
    idx = history_index(split["times"][:, -1:], split["target_times"])[:, 0].numpy()  # (B, K)
    targets, users = split["targets"].numpy(), split["users"].numpy()
    rows, ks = np.nonzero(targets > 0)
    hist = [items[b, max(1, i - L + 1):i + 1].tolist() for b, i in zip(rows, idx[rows, ks])]
    return users[rows].tolist(), hist, targets[rows, ks].tolist()


def export_recbole(seq: SequenceData, out_dir: str | Path, name: str) -> Path:
    """Write ``<out_dir>/<name>/<name>.{train,valid,test}.inter`` and ``<name>.item``; return the folder.

    Each ``.inter`` row is one example: ``user_id:token`` (our user index), ``item_id_list:token_seq``
    (the deep history our model reads for the target: at most L item indices, space-separated,
    oldest first) and ``item_id:token`` (the target). ``train`` holds one row per training target of
    ``seq.train``, ``valid``/``test`` one per evaluation row. ``<name>.item`` lists all N items, so
    RecBole ranks the same N items we rank (also those no example names). RecBole's SASRec reads the
    output at the last history position and cannot take an empty history: ValueError names the first.
    """
    if name == "ml-100k":
        raise ValueError("RecBole reads a dataset named 'ml-100k' from its own bundled copy; choose another name")
    folder = Path(out_dir) / name
    folder.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        users, hist, targets = deep_examples(seq.split(split), seq.L)
        empty = [u for u, h in zip(users, hist) if not h]
        if empty:
            raise ValueError(f"{split}: {len(empty)} targets have no earlier deep event (first: user index "
                             f"{empty[0]}); RecBole's SASRec cannot score an empty history")
        pd.DataFrame(dict(zip(COLUMNS, (users, [" ".join(map(str, h)) for h in hist], targets)))).to_csv(
            folder / f"{name}.{split}.inter", sep="\t", index=False)
    pd.DataFrame({"item_id:token": np.arange(1, seq.n_items + 1)}).to_csv(folder / f"{name}.item", sep="\t", index=False)
    return folder


def recbole_config(cfg: Config, out_dir: str | Path, name: str, epochs: int = 300,
                   stopping_step: int = 10) -> dict[str, Any]:
    """RecBole's config for SASRec on the exported files, sized and trained as our ``cfg``.

    RecBole counts its budget in epochs (``epochs``, validating after each one, stopping after
    ``stopping_step`` validations without a new best NDCG@10); ours counts optimiser steps, each over
    ``batch_size`` rows of several targets, where RecBole's batch holds ``batch_size`` single targets.
    """
    m, t = cfg.model, cfg.train
    if t.mask_seen:
        raise ConfigError("mask_seen=true has no RecBole counterpart for sequential models (they rank seen items)")
    return {
        "model": "SASRec", "dataset": name,
        "data_path": str(Path(out_dir).resolve()),  # <data_path>/<name>/<name>.<split>.inter
        # the exported examples, read as they are
        "benchmark_filename": list(SPLITS),
        "load_col": {"inter": ["user_id", "item_id_list", "item_id"], "item": ["item_id"]},
        "alias_of_item_id": ["item_id_list"],  # histories and targets share one item vocabulary
        "LIST_SUFFIX": "_list", "ITEM_LIST_LENGTH_FIELD": "item_length",
        "MAX_ITEM_LIST_LENGTH": cfg.data.max_len,  # L
        # the model: our SASRec's width, depth, heads and dropout
        "hidden_size": m.d, "n_layers": m.layers, "n_heads": m.heads,
        "inner_size": 4 * m.d,  # our Block's feed-forward width
        "hidden_dropout_prob": m.dropout, "attn_dropout_prob": m.dropout,
        "hidden_act": "gelu", "initializer_range": 0.02,  # our item table's std
        "loss_type": "CE", "train_neg_sample_args": None,  # CE over all items, no sampled negatives
        # training: Adam, lr, weight_decay, batch_size, seed
        "learner": "adam", "learning_rate": t.lr, "weight_decay": t.weight_decay,
        "train_batch_size": t.batch_size, "seed": t.seed, "reproducibility": True,
        "epochs": epochs, "eval_step": 1, "stopping_step": stopping_step,
        # evaluation: full ranking, seen items ranked (mask_seen=false), selection on validation NDCG@10
        "eval_args": {"order": "TO", "mode": "full"},
        "metrics": ["NDCG", "Hit"], "topk": [10], "valid_metric": "NDCG@10",
        "eval_batch_size": t.eval_batch_size,
        "use_gpu": t.device != "cpu", "show_progress": False,
        "checkpoint_dir": str(Path(out_dir).resolve() / "saved"),
    }


def run_recbole(config: dict[str, Any]) -> dict[str, float]:
    """Train and test RecBole's SASRec with ``config`` (:func:`recbole_config`) -> test ``HR@10``,
    ``NDCG@10`` and the best validation ``valid_NDCG@10``.

    RecBole writes its logs under ``./log`` and ``./log_tensorboard``: this runs in ``data_path``.
    Its best checkpoint (a file it has just written itself) holds its config object, which torch.load's
    weights_only default (torch >= 2.6) refuses: TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 lets it load.
    """
    from recbole.quick_start import run_recbole as quick_start  # noqa: PLC0415 (an optional dependency)

    os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    cwd = os.getcwd()
    os.chdir(config["data_path"])
    try:
        result = quick_start(config_dict=config, saved=True)
    finally:
        os.chdir(cwd)
    test, valid = result["test_result"], result["best_valid_result"]
    return {"HR@10": float(test["hit@10"]), "NDCG@10": float(test["ndcg@10"]),
            "valid_NDCG@10": float(valid["ndcg@10"])}


def main(argv: list[str] | None = None) -> int:
    """Export a generic CSV's split (as ``python -m m3bsr train --data-file`` builds it) and run RecBole's
    SASRec on it; write ``<out>/metrics.json``."""
    p = argparse.ArgumentParser(prog="python -m m3bsr.reference", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-file", required=True, help="a CSV with header user_id,item_id,behavior,timestamp")
    p.add_argument("--deep", required=True, help="comma-separated behaviours forming the deep (target) level")
    p.add_argument("--profile", default="default")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    p.add_argument("--out", required=True, help="folder for the exported files, RecBole's logs and metrics.json")
    p.add_argument("--epochs", type=int, default=300, help="RecBole's cap on epochs")
    p.add_argument("--stopping-step", type=int, default=10, help="RecBole's patience, in validations (epochs)")
    p.add_argument("--export-only", action="store_true", help="write the files, do not run RecBole")
    a = p.parse_args(argv)
    over = dict(kv.split("=", 1) for kv in a.set)
    cfg = make_config(a.profile, {**over, "dataset": "csv", "data_file": a.data_file, "deep": a.deep, "seed": a.seed})
    from .train import load_data  # noqa: PLC0415 (the loaders import the data stack)
    ds = load_data(cfg)
    seq = SequenceData(ds, cfg.data.max_len, cfg.data.min_deep, cfg.data.row_len)  # as Trainer builds it
    folder = export_recbole(seq, a.out, ds.name)
    print(f"wrote {folder}: {len(deep_examples(seq.train, seq.L)[2])} training targets, "
          f"{seq.n_eval_users} validation and test rows, {seq.n_items} items")
    if a.export_only:
        return 0
    metrics = run_recbole(recbole_config(cfg, a.out, ds.name, a.epochs, a.stopping_step))
    (Path(a.out) / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(json.dumps(metrics))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
