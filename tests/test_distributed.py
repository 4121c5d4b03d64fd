"""Data-parallel training under torchrun: 2 CPU processes (gloo) against 1 process (issue #7).

Same seed, same global batch (batch_size rows, split 2 x batch_size/2), dropout=0 (a dropout mask
is drawn per process, so with dropout > 0 the two runs are only statistically alike):

* per-epoch training losses agree to 1e-4 relative (they differ only by float summation order,
  in practice by ~1e-7), after the first few steps and at the end;
* final valid/test metrics agree to 1e-6 absolute (one flipped rank among 150 users would
  move HR by 0.0067, so this means no rank flipped; in practice they are equal);
* evaluating one checkpoint sharded over 2 processes equals the 1-process evaluation exactly.
"""
from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from m3bsr.train import shard_batches

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 150
LOSS_RTOL = 1e-4
METRIC_ATOL = 1e-6
# 3 epochs x 3 steps of 64 rows, validated every 2 steps (inside the epochs); eval batches of 32 rows, so both
# ranks score some of the 150 users
COMMON = ["--dataset", "synthetic", "--model", "sasrec", "--profile", "ci", "--epochs", "3", "--seed", "1",
          "--set", "dropout=0", "--set", "eval_steps=2", "--set", "patience_steps=100", "--set", "eval_batch_size=32",
          "--set", "progress=false"]

pytestmark = pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")


def env() -> dict[str, str]:
    e = {**os.environ, "PYTHONPATH": str(REPO / "lib"), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    if Path("/sys/class/net/lo").exists():  # gloo on loopback, whatever the host name resolves to
        e.setdefault("GLOO_SOCKET_IFNAME", "lo")
    return e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def m3bsr(args: list[str], cwd: Path, nproc: int = 1) -> subprocess.CompletedProcess:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                 "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "m3bsr"]
                if nproc > 1 else [sys.executable, "-m", "m3bsr"])
    r = subprocess.run(launcher + args, capture_output=True, text=True, cwd=cwd, env=env(), timeout=TIMEOUT)
    assert r.returncode == 0, r.stderr[-4000:]
    return r


def history(run: Path) -> list[dict[str, float]]:
    with open(run / "history.csv") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def test_two_gloo_processes_match_one_process(tmp_path):
    cache = ["--set", f"cache_dir={tmp_path / 'cache'}"]
    one, two = tmp_path / "one", tmp_path / "two"
    m3bsr(["train", *COMMON, *cache, "--out", str(one)], tmp_path)
    r = m3bsr(["train", *COMMON, *cache, "--out", str(two)], tmp_path, nproc=2)
    assert r.stdout.count('"valid"') == 1, "only rank 0 prints the result"

    h1, h2 = history(one), history(two)
    assert [a["step"] for a in h1] == [b["step"] for b in h2] == [2, 4, 6, 8, 9]
    for a, b in zip(h1, h2):  # mean loss over the global batches since the previous validation
        assert set(a) == set(b)
        for k in ("loss", "ce"):
            assert b[k] == pytest.approx(a[k], rel=LOSS_RTOL), (k, a["step"])
    m1, m2 = json.loads((one / "metrics.json").read_text()), json.loads((two / "metrics.json").read_text())
    assert m1["best_step"] == m2["best_step"] and m1["n_eval_users"] == m2["n_eval_users"] == 150
    for split in ("valid", "test"):
        assert m2[split] == pytest.approx(m1[split], abs=METRIC_ATOL, rel=0), split

    # rank 0 alone wrote the run folder; its checkpoint holds both ranks' RNG states
    assert sorted(p.name for p in two.iterdir()) == ["best.pt", "config.json", "history.csv", "last.pt", "metrics.json",
                                                    "ranks.npz", "train.log"]
    from m3bsr.train import load_checkpoint
    assert len(load_checkpoint(two / "last.pt")["rng_ranks"]) == 2

    # --resume under torchrun: rank 0 reads last.pt and broadcasts it; nothing left to train
    before = (two / "metrics.json").read_bytes()
    m3bsr(["train", *COMMON, *cache, "--out", str(two), "--resume"], tmp_path, nproc=2)
    assert (two / "metrics.json").read_bytes() == before


def test_sharded_evaluation_equals_single_process_exactly(tmp_path):
    run = tmp_path / "run"
    m3bsr(["train", *COMMON, "--epochs", "1", "--set", f"cache_dir={tmp_path / 'cache'}", "--out", str(run)],
          tmp_path)
    single = json.loads(m3bsr(["evaluate", "--run", str(run), "--device", "cpu"], tmp_path).stdout)
    # the run folder as a positional: torchrun's parser would take --run for an abbreviation of its --run-path
    sharded = json.loads(m3bsr(["evaluate", str(run), "--device", "cpu"], tmp_path, nproc=2).stdout)
    assert sharded == single  # exact: the same 32-row batches, dealt round-robin, ranks all-reduced
    saved = json.loads((run / "metrics.json").read_text())
    assert single == {"valid": saved["valid"], "test": saved["test"]}


@pytest.mark.parametrize("world", [1, 2, 3])
def test_shards_cover_each_global_batch_and_weights_add_up(world):
    n, batch_size = 23, 8
    targets = torch.zeros(n, 4, dtype=torch.long)
    for r in range(n):
        targets[r, : 1 + r % 4] = 1 + r  # 1..4 valid targets per row
    split = {"users": torch.arange(n), "targets": targets}
    single = [idx for idx, w in shard_batches(split, batch_size, torch.Generator().manual_seed(5))]
    shards = [list(shard_batches(split, batch_size, torch.Generator().manual_seed(5), r, world)) for r in range(world)]
    assert all(len(s) == len(single) for s in shards)
    valid = (targets > 0).sum(1)
    for j, idx in enumerate(single):
        parts = [shards[r][j] for r in range(world)]
        real = [p for p in parts if p[1] > 0]
        assert torch.equal(torch.cat([p for p, _ in real]), idx)  # contiguous shards, in rank order
        assert max(len(p) for p, _ in real) <= -(-len(idx) // world)
        assert sum(w for _, w in parts) / world == pytest.approx(1.0)
        for p, w in parts:  # weight = world * share of the global batch's targets
            assert w == pytest.approx(world * valid[p].sum().item() / valid[idx].sum().item()) or w == 0


def test_a_rank_without_rows_still_steps_with_weight_zero():
    split = {"users": torch.arange(3), "targets": torch.ones(3, 1, dtype=torch.long)}
    last = [list(shard_batches(split, 2, torch.Generator().manual_seed(0), r, 2))[-1] for r in range(2)]
    assert [len(idx) for idx, _ in last] == [1, 1] and [w for _, w in last] == [2.0, 0.0]


def test_each_epoch_visits_every_row_once_in_a_seeded_shuffled_order():
    """Catches the training rows taken in file order (no shuffle): the order is randperm of the generator."""
    split = {"users": torch.arange(40), "targets": torch.ones(40, 1, dtype=torch.long)}
    gen = torch.Generator().manual_seed(3)
    epochs = [torch.cat([idx for idx, _ in shard_batches(split, 8, gen)]) for _ in range(2)]
    for order in epochs:
        assert sorted(order.tolist()) == list(range(40)) and not torch.equal(order, torch.arange(40))
    assert not torch.equal(epochs[0], epochs[1])  # a new order every epoch
    assert torch.equal(epochs[0], torch.randperm(40, generator=torch.Generator().manual_seed(3)))
