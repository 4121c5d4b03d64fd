"""The benchmark: the smoke run writes every measurement, and its naive reference is the same function."""
from __future__ import annotations

import csv

import pytest
import torch

from m3bsr.bench import (COMPILED, HOST_MEMORY, MEASUREMENTS, TIME_SHARES, TOL, NaiveM3BSR, counted_flops,
                         naive_max_abs_diff, random_batch, random_info, time_shares, trained_run)
from m3bsr.cli import main
from m3bsr.config import ModelConfig
from m3bsr.models.layers import Attention
from m3bsr.models.m3bsr import M3BSR


@pytest.fixture(autouse=True)
def one_thread():
    """Small tensors on a shared machine: one thread avoids stalls (the bench takes --threads too)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("args, words", [(["--threads", "0"], "--threads must be at least 1"),
                                         (["--batch", "-5"], "--batch must be at least 1"),
                                         (["--run", "."], "no config.json and best.pt")])
def test_bench_refuses_bad_arguments_before_measuring(tmp_path, capsys, args, words):
    assert main(["bench", "--size", "small", "--device", "cpu", "--out", str(tmp_path)] + args) == 2
    assert words in capsys.readouterr().err and not list(tmp_path.iterdir())


def test_bench_loads_a_finished_run_as_trained(tmp_path):
    """``bench --run``: the run's best checkpoint, passing the checks against its own config."""
    from m3bsr.config import make_config
    from m3bsr.train import Trainer, load_checkpoint
    run = tmp_path / "run"
    Trainer(make_config("ci", {"dataset": "synthetic", "model": "m3bsr", "epochs": 1, "progress": False,
                               "cache_dir": str(tmp_path / "cache")}), run).fit()
    trainer = trained_run(run, torch.device("cpu"))
    saved = load_checkpoint(run / "best.pt")["model"]
    assert all(v.equal(saved[k]) for k, v in trainer.model.state_dict().items())


def test_small_bench_writes_csv_and_markdown_with_every_measurement(tmp_path):
    args = ["bench", "--size", "small", "--device", "cpu", "--threads", "1", "--compile", "--out", str(tmp_path)]
    assert main(args) == 0
    csv_path, md_path = tmp_path / "bench-small-cpu-compile.csv", tmp_path / "bench-small-cpu-compile.md"
    lines = [line for line in csv_path.read_text().splitlines() if not line.startswith("#")]
    rows = {r["measurement"]: r for r in csv.DictReader(lines)}
    md = md_path.read_text()
    for name in MEASUREMENTS + COMPILED + TIME_SHARES + HOST_MEMORY:  # a CPU run
        assert name in rows, name
        assert f"| {name} |" in md, name
        float(rows[name]["value"])  # a number, not an error string
    assert float(rows["naive_max_abs_diff"]["value"]) <= TOL
    k = next(n for n in rows if n.startswith("train_throughput_m3bsr_1x")).rsplit("x", 1)[1]  # CPU: the cores
    assert float(rows[f"train_throughput_m3bsr_{k}x1"]["ratio"]) > 0 and int(k) >= 2
    assert all(float(rows[name]["ratio"]) > 0 for name in HOST_MEMORY)  # kept / glibc's default, timed in turn
    assert float(rows["train_throughput_m3bsr_compiled"]["ratio"]) > 0  # compiled / eager, timed in turn
    assert "torch" in md and "threads" in md and "bf16" in md and "- **compile**: on" in md
    for model in ("sasrec", "m3bsr"):
        shares = [float(rows[f"{model}_time_{kind}"]["ratio"]) for kind in ("matmul", "random", "other")]
        assert shares[0] > 0 and shares[1] > 0 and sum(shares) == pytest.approx(1, abs=1e-3)  # dropout: both draw


def test_time_shares_sort_operators_by_kind():
    a = torch.randn(64, 64)
    mm, seconds = time_shares(lambda: a @ a)
    assert mm["matmul"] > 0 and mm["random"] == 0 and seconds > 0
    draw, _ = time_shares(lambda: torch.empty(1000).normal_())
    assert draw["random"] > 0 and draw["matmul"] == 0
    assert sum(draw.values()) == pytest.approx(1)


def test_attention_with_dropout_counts_its_backward_without_recomputed_scores():
    """CPU attention with dropout runs as explicit matmuls (backward: 2x the forward's FLOPs); without
    dropout the fused kernel, whose counted backward recomputes the scores (2.5x). The README's gap
    between the CPU's and CUDA's step FLOPs is this difference on the Transformers' attention."""
    B, L, d, heads = 4, 7, 8, 2
    x = torch.randn(B, L, d, requires_grad=True)
    fwd = 2 * (2 * B * L * L * d)  # Q K^T and P V over all heads
    linears = 3 * (2 * B * L * d * (d + 2 * d + d))  # q, kv, proj: forward, grad input, grad weight
    for p, backward in ((0.5, 2 * fwd), (0.0, 5 * fwd // 2)):
        att = Attention(d, heads, p).train()
        assert counted_flops(lambda: att(x, x).sum().backward()) == linears + fwd + backward, p


@pytest.mark.parametrize("kw, levels", [
    ({}, 2),
    (dict(cdbd_condition="concat", cdbd_deeper="all", shared_specific=False, time_embedding=True), 3),
    (dict(modalities="id", router="softmax"), 2),
])
def test_naive_reference_equals_the_fast_model(kw, levels):
    cfg = ModelConfig(model="m3bsr", d=16, layers=1, heads=2, dropout=0.1, T=4, inference_steps=3, **kw)
    info = random_info(40, {"image": 12, "text": 8}, n_levels=levels)
    batch = random_batch(5, 9, 40, S=levels, seed=1)
    batch["items"][1, :, 6:] = 0  # a shorter row: padding at the end of every level
    batch["times"][1, :, 6:] = 2 ** 62
    batch["targets"][1, 5:] = 0
    torch.manual_seed(0)
    fast = M3BSR(cfg, info)
    naive = NaiveM3BSR(cfg, info)
    naive.load_state_dict(fast.state_dict())
    all_pass, per_target = naive_max_abs_diff(fast, naive, batch, rows=5)
    assert all_pass <= TOL and per_target <= TOL
    # and the naive model trains (its own loss, gradients to the shared parameters)
    naive.train()
    naive.loss(batch)["loss"].backward()
    assert naive.cdmd is None or naive.cdmd["image"].predictor.kv.weight.grad is not None
