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
    dropout the fused kernel, whose counted backward recomputes the scores (2.5x). docs/benchmark.md's gap
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
    (dict(train_mode="strided", train_steps=2, predictor_residual=False), 2),
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


# ---------------------------------------------------------------------------------------------
# The derived numbers, from scripted timings (no timing is measured: the clock, the profiler and the
# measuring helpers are replaced by fixed values, so every ratio is known exactly)
# ---------------------------------------------------------------------------------------------

def _run(tmp_path, **size):
    from m3bsr.bench import Size, _Run
    sz = Size(dataset="synthetic", profile="ci", batch=6, repeats=1, warmup=0, epochs=0, naive_positions=2,
              equal_rows=2, sweep_batch=2, **size)
    return _Run(sz, torch.device("cpu"), 1, False, False, 0, lambda *_: None, tmp_path,
                header={"size": "small", "device": "test-cpu"})


def _rows(r):
    return {row.measurement: row for row in r.rows}


@pytest.fixture
def no_release(monkeypatch):
    """release_memory's gc.collect takes ~0.5 s a call in a process holding torch; nothing here needs it."""
    from m3bsr import bench
    monkeypatch.setattr(bench, "release_memory", lambda device: None)


def test_met_decides_on_the_bound_itself_and_the_writers_keep_target_and_met_apart(tmp_path):
    """Catches '<=' and '>=' targets failed at the bound, '<' met at the bound, a missing ratio compared
    anyway, and the target and met columns swapped in the CSV and markdown."""
    from m3bsr.bench import Row, write_results
    rows = [Row("a", 1.0, "s", 0.1, ">= 0.1"), Row("b", 2.0, "s", 0.02, "<= 0.02"), Row("c", 3.0, "s", 10.0, "< 10"),
            Row("d", 4.0, "s", None, ">= 3"), Row("e", 5.0, "x", 2.0)]
    assert [r.met for r in rows] == ["yes", "yes", "no", "", ""]
    csv_path, md_path = write_results(rows, {"size": "small", "device": "test-cpu"}, tmp_path, "b")
    got = list(csv.DictReader(line for line in csv_path.read_text().splitlines() if not line.startswith("#")))
    assert [(g["target"], g["met"], g["ratio"]) for g in got] == [(">= 0.1", "yes", "0.1"), ("<= 0.02", "yes", "0.02"),
                                                                  ("< 10", "no", "10"), (">= 3", "", ""), ("", "", "2")]
    assert "| a | 1 | s | 0.1 | >= 0.1 | yes | test-cpu |  |" in md_path.read_text().splitlines()


def test_median_times_are_medians_and_matmul_flops_count_two_per_multiply_add(monkeypatch):
    """Catches the mean taken for the median (one slow repeat moves it) and n^3 counted for an n x n matmul."""
    import time

    from m3bsr import bench
    clock = [0.0]
    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])
    durations = {"a": iter([100.0, 1.0, 2.0, 10.0]), "b": iter([100.0, 5.0, 5.0, 5.0])}  # a warm-up, then 3 repeats

    def fn(name):
        return lambda: clock.__setitem__(0, clock[0] + next(durations[name]))
    assert bench.median_times({k: fn(k) for k in durations}, torch.device("cpu"), repeats=3, warmup=1) == {"a": 2.0, "b": 5.0}
    monkeypatch.setattr(bench, "median_times", lambda fns, *a, **kw: {"mm": 0.5})
    assert bench.matmul_flops(torch.device("cpu"), torch.float32, n=8) == 2 * 8 ** 3 / 0.5


def test_time_shares_sum_each_operators_own_time(monkeypatch):
    """Catches an operator's inclusive time counted (aten::linear's includes its aten::addmm): shares of self time."""
    import torch.profiler

    from m3bsr.bench import time_shares

    class Event:
        def __init__(self, key, own, inclusive):
            self.key, self.self_cpu_time_total, self.cpu_time_total = key, own, inclusive

    class Profile:
        def __init__(self, *a, **kw):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def key_averages(self):
            return [Event("aten::linear", 1.0, 101.0), Event("aten::addmm", 100.0, 100.0),
                    Event("aten::bernoulli_", 20.0, 20.0), Event("aten::add", 79.0, 79.0)]

    monkeypatch.setattr(torch.profiler, "profile", Profile)
    shares, _ = time_shares(lambda: None)
    assert shares == pytest.approx({"matmul": 0.5, "random": 0.1, "other": 0.4})


def test_memory_and_side_by_side_ratios(tmp_path, monkeypatch, no_release):
    """Catches the peak-memory ratio inverted, the side-by-side ratio inverted, and the kept-memory ratio
    taken as default / kept the wrong way round."""
    from m3bsr import bench, experiments
    from m3bsr.config import make_config
    cfg, info = make_config("ci"), random_info(20, {"image": 4})
    batch = random_batch(4, 5, 20, seed=1)
    n = int((batch["targets"] > 0).sum())
    r = _run(tmp_path)
    monkeypatch.setattr(bench, "peak_memory", lambda c, *a: {"sasrec": 100.0, "m3bsr": 250.0}[c.model.model])
    bench._memory(r, cfg, info, batch)
    assert _rows(r)["peak_memory_m3bsr"].ratio == 2.5

    monkeypatch.setattr(experiments, "runs_that_fit", lambda cores: 3)  # k = 3 processes
    monkeypatch.setattr(bench, "side_by_side_step_times", lambda c, i, b, processes, threads, *a, keep=True:
                        [(0.5, 0.0)] if processes == 1 else [(1.0, 0.0), (1.0, 0.0), (2.0, 0.0)])
    bench._side_by_side(r, cfg, info, batch, "")
    one, side = _rows(r)["train_throughput_m3bsr_1x3"], _rows(r)["train_throughput_m3bsr_3x1"]
    assert one.value == n / 0.5 and side.value == pytest.approx(n / 1 + n / 1 + n / 2)
    assert side.ratio == pytest.approx(side.value / one.value)  # 1.25: three one-thread runs over one 3-thread run

    monkeypatch.setattr(bench, "side_by_side_step_times", lambda *a, keep=True: [(1.0, 10.0)] if keep else [(3.0, 40.0)])
    bench._kept_memory(r, cfg, info, batch)
    kept = _rows(r)["host_memory_kept_m3bsr"]
    assert kept.value == n / 1.0 and kept.ratio == 3.0 and "10 kept, 40 default" in kept.note  # 3x the default's


def test_throughput_rows_are_ratios_of_the_scripted_step_times(tmp_path, monkeypatch, no_release):
    """Catches M3BSR / SASRec inverted and the per-target naive reference's throughput counted over the whole
    batch's targets instead of the positions it timed."""
    from m3bsr import bench
    m = ModelConfig(model="m3bsr", d=16, layers=1, heads=2, T=2)
    info, batch = random_info(40, {"image": 12, "text": 8}), random_batch(6, 9, 40, seed=1)
    n = int((batch["targets"] > 0).sum())
    per = int((batch["targets"][:, [0, 8]] > 0).sum())  # naive_positions=2: the first and last of 9
    assert per < n
    secs = {"sasrec": 1.0, "m3bsr": 2.0, "naive_loops": 8.0, "naive": 4.0}
    monkeypatch.setattr(bench, "naive_max_abs_diff", lambda *a: (0.0, 0.0))
    monkeypatch.setattr(bench, "median_times", lambda fns, *a: {k: secs[k] for k in fns})
    monkeypatch.setattr(bench, "time_shares", lambda step: ({"matmul": 0.5, "random": 0.1, "other": 0.4}, 1.0))
    monkeypatch.setattr(bench, "matmul_flops", lambda *a: 1e10)
    monkeypatch.setattr(bench, "step_flops", lambda model, *a: 6e9 if isinstance(model, M3BSR) else 2e9)
    r = _run(tmp_path)
    bench._throughput(r, m, info, batch, "")
    rows = _rows(r)
    assert rows["train_throughput_m3bsr"].value == n / 2 and rows["train_throughput_m3bsr"].ratio == 0.5
    assert rows["train_throughput_naive_loops"].ratio == 4.0
    assert rows["train_throughput_naive"].value == per / 4 and rows["train_throughput_naive"].ratio == pytest.approx((n / 2) / (per / 4))
    assert rows["m3bsr_step_flops"].ratio == 3.0 and rows["m3bsr_achieved_flops"].ratio == pytest.approx(0.3)
    assert rows["m3bsr_time_matmul"].value == 1.0 and rows["m3bsr_time_other"].ratio == 0.4


def test_evaluation_rows_compare_each_step_count_with_T(tmp_path, monkeypatch):
    """Catches T/3 rounded down (ci: T=5 -> 2 steps, not 1), the speed-up and FLOP ratios inverted, and the
    relative NDCG loss divided by the fewer-step NDCG instead of T's."""
    from m3bsr import bench
    from m3bsr.config import make_config
    cfg = make_config("ci", {"dataset": "synthetic", "model": "m3bsr", "sampled_negatives": 0, "progress": False,
                             "cache_dir": str(tmp_path / "cache")})
    ndcg, hr, called = {5: 0.2, 2: 0.199, 1: 0.1}, {5: 0.3, 2: 0.3, 1: 0.2}, []

    def fake_evaluate(model, split, device, **kw):
        called.append(model.cfg.inference_steps)
        return {"NDCG@10": ndcg[called[-1]], "HR@10": hr[called[-1]]}

    def fake_times(fns, *a):
        for fn in fns.values():
            fn()
        return {"T": 6.0, "T/3": 2.0, "1": 1.0}

    def fake_flops(fn):
        fn()
        return 10e9 * called[-1]

    monkeypatch.setattr(bench, "evaluate", fake_evaluate)
    monkeypatch.setattr(bench, "median_times", fake_times)
    monkeypatch.setattr(bench, "counted_flops", fake_flops)
    r = _run(tmp_path)
    bench._evaluation(r, cfg, None, None)
    rows = _rows(r)
    assert [rows[f"eval_seconds_{s}"].ratio for s in ("T", "T/3", "1")] == [6.0, 3.0, 6.0]
    assert rows["eval_seconds_T/3"].met == "yes" and "inference_steps=2" in rows["eval_seconds_T/3"].note
    assert [rows[f"eval_flops_{s}"].ratio for s in ("T", "T/3", "1")] == [1.0, 2.5, 5.0]
    assert rows["eval_ndcg10_T"].ratio is None and rows["eval_ndcg10_T/3"].value == 0.199
    assert rows["eval_ndcg10_T/3"].ratio == pytest.approx(0.005) and rows["eval_ndcg10_1"].ratio == pytest.approx(0.5)


def test_sweep_ratios_are_against_the_first_setting_of_their_own_sweep(tmp_path, monkeypatch, no_release):
    """Catches the catalogue sweep's ratios taken against the length sweep's first time."""
    from m3bsr import bench
    times = iter([1.0, 2.0, 3.0, 6.0])
    monkeypatch.setattr(bench, "median_times", lambda fns, *a: {"step": next(times)})
    r = _run(tmp_path, lengths=(4, 8), catalogues=(("a", 10), ("b", 20)), feature_dims={"image": 4},
             sweep_overrides=dict(d=8, layers=1, heads=2, T=2))
    bench._sweeps(r, ModelConfig(model="m3bsr", d=16, layers=1, heads=2, T=2), 4)
    rows = _rows(r)
    assert [rows[k].ratio for k in ("step_time_L=4", "step_time_L=8", "step_time_items=10", "step_time_items=20")] == [1, 2, 1, 2]
    assert rows["step_time_items=20"].value == 6000.0  # ms


def test_sweeps_time_rows_shaped_as_the_trainers(tmp_path, monkeypatch, no_release):
    """The sweeps' batches hold 2 L events per level (the default row_len) and the model reads a window of L."""
    from m3bsr import bench
    seen = []
    monkeypatch.setattr(bench, "median_times", lambda fns, *a: {"step": 1.0})
    real_step = bench._Run.step
    monkeypatch.setattr(bench._Run, "step", lambda self, model, batch, compiled=False: seen.append(
        (model.info.window, batch["items"].shape[-1] - 1)) or real_step(self, model, batch, compiled))
    r = _run(tmp_path, lengths=(4, 8), catalogues=(("a", 10),), feature_dims={"image": 4},
             sweep_overrides=dict(d=8, layers=1, heads=2, T=2))
    bench._sweeps(r, ModelConfig(model="m3bsr", d=16, layers=1, heads=2, T=2), 4)
    assert seen == [(4, 8), (8, 16), (4, 8)]


def test_small_scaling_writes_the_sweeps_and_the_projected_run(tmp_path, capsys):
    from m3bsr.config import make_config
    assert main(["bench", "--scaling", "--size", "small", "--device", "cpu", "--repeats", "1", "--steps", "1",
                 "--out", str(tmp_path)]) == 0
    rows = {r["measurement"]: r for r in csv.DictReader(l for l in (tmp_path / "bench-scaling-small-cpu.csv").open()
                                                         if not l.startswith("#"))}
    assert [k for k in rows if k.startswith("step_time_L=")] == [f"step_time_L={L}" for L in (20, 50, 100, 200)]
    assert {"paper_step_time", "paper_validation_time", "paper_peak_memory"} <= set(rows)
    modes = [k for k in rows if k.startswith("step_time_mode=")]
    assert modes == [f"step_time_mode={m}" for m in ("chain", "strided", "random_t", "no_chains")]
    assert float(rows["step_time_mode=chain"]["ratio"]) == 1
    step, valid = float(rows["paper_step_time"]["value"]), float(rows["paper_validation_time"]["value"])
    t = make_config("ci").train  # the small size's run: the ci profile
    for name, n in (("min", t.min_steps), ("max", t.max_steps)):
        expected = (n * step + n // t.eval_steps * valid) / 3600
        assert float(rows[f"paper_run_hours_{name}_steps"]["value"]) == pytest.approx(expected, rel=1e-3)
    assert float(rows["paper_peak_memory"]["value"]) > 0


def test_scaling_and_time_to_quality_are_separate_runs(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--scaling", "--time-to-quality"])
    assert "not both" in capsys.readouterr().err
