"""Grids of cached runs, the tables made from them, and the paired significance test."""
from pathlib import Path

import pytest
import torch

from m3bsr import experiments
from m3bsr.config import ConfigError
from m3bsr.train import run_dir

OVER = {"epochs": 2, "progress": False, "device": "cpu"}


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    res = experiments.run_grid(["synthetic"], ["pop", "sasrec"], [0, 1], "ci", runs, OVER, log=lambda *_: None)
    return runs, res


def test_grid_has_one_row_per_run_and_split_and_reuses_finished_runs(grid):
    runs, res = grid
    assert len(res) == 2 * 2 * 2 and set(res["split"]) == {"valid", "test"}
    sasrec, pop = res[res["model"] == "sasrec"], res[res["model"] == "pop"]
    assert (sasrec["epochs"] == OVER["epochs"]).all() and (sasrec["train_seconds"] > 0).all()
    assert (sasrec["steps"] == 6).all() and sasrec["best_step"].isin([4, 6]).all()  # ci: 3 steps per epoch
    assert (pop["steps"] == 0).all() and pop["train_seconds"].isna().all()  # nothing to train
    again = experiments.run_grid(["synthetic"], ["pop", "sasrec"], [0, 1], "ci", runs, OVER, log=lambda *_: None)
    assert again.equals(res)
    cfgs = experiments.grid_configs(["synthetic"], ["pop", "sasrec"], [0, 1], "ci", OVER)
    cost = experiments.run_costs(cfgs + cfgs, runs)  # each run once
    assert len(cost) == 4 and len(experiments.run_costs(cfgs + cfgs, runs, unique=False)) == 8
    assert cost.set_index(["model", "seed"])["train_seconds"].sort_index().equals(
        res[res["split"] == "test"].set_index(["model", "seed"])["train_seconds"].sort_index())


def test_damaged_run_files_are_refused_by_name(grid, tmp_path):
    import shutil

    from m3bsr.train import CheckpointError
    runs, _ = grid
    copy = tmp_path / "runs"
    shutil.copytree(runs, copy)
    cfgs = experiments.grid_configs(["synthetic"], ["sasrec"], [0], "ci", OVER)
    run = run_dir(cfgs[0], copy)
    for damaged in ('{"valid": {}', '{"valid": {}}', '{"valid": {}, "test": {}}', "[]"):  # truncated, empty, a list
        (run / "metrics.json").write_text(damaged)
        with pytest.raises(CheckpointError, match="metrics.json"):
            experiments.run_grid(["synthetic"], ["sasrec"], [0], "ci", copy, OVER, log=lambda *_: None)
    for damaged in ("", "step,epoch,loss\n1,2.0,3.0\n", "step,epoch,seconds\n1,1.0,abc\n",
                    "step,epoch,seconds\n1,1.0,\n", "epoch,seconds\n1,2.0\n", "step,epoch,seconds\n"):
        (run / "history.csv").write_text(damaged)
        with pytest.raises(CheckpointError, match="history.csv"):
            experiments.run_costs(cfgs, copy)


def test_best_baseline_is_chosen_on_validation(grid):
    _, res = grid
    valid = res[res["split"] == "valid"].groupby("model")["NDCG@10"].mean()
    assert experiments.best_baseline(res, "synthetic", model="sasrec") == "pop"
    assert experiments.best_baseline(res, "synthetic", model="none") == valid.idxmax()
    import pandas as pd
    made = pd.DataFrame({"dataset": "d", "model": ["a", "a", "b", "b", "m3bsr", "m3bsr"],
                         "split": ["valid", "test"] * 3, "NDCG@10": [0.2, 0.1, 0.1, 0.3, 0.5, 0.5]})
    assert experiments.best_baseline(made, "d") == "a"  # b wins on test only


def test_paired_test_pairs_every_test_user_once_and_reproduces_the_saved_means(grid):
    runs, res = grid
    out = experiments.paired_test("synthetic", "sasrec", "pop", [0, 1], "ci", runs, OVER)
    test = res[res["split"] == "test"].groupby("model")["NDCG@10"].mean()
    assert out["pairs"] == 150 and out["seeds"] == 2  # every evaluable user of the ci synthetic data, once
    for side, m in (("a", "sasrec"), ("b", "pop")):  # the mean of the per-user values is the table's mean over seeds
        assert out[f"{side} NDCG@10"] == pytest.approx(test[m], abs=1e-12)
    assert out["mean difference"] == pytest.approx(test["sasrec"] - test["pop"], abs=1e-12)
    assert 0 <= out["Wilcoxon p"] <= 1 and 0 <= out["paired t p"] <= 1
    same = experiments.paired_test("synthetic", "pop", "pop", [0], "ci", runs, OVER)
    assert same["mean difference"] == 0 and same["Wilcoxon p"] == same["paired t p"] == 1.0
    # a seed counted three times is no more evidence than once (pooled (seed, user) pairs would shrink p)
    once = experiments.paired_test("synthetic", "sasrec", "pop", [0], "ci", runs, OVER)
    thrice = experiments.paired_test("synthetic", "sasrec", "pop", [0, 0, 0], "ci", runs, OVER)
    assert once["Wilcoxon p"] < 1 and thrice["pairs"] == once["pairs"] == 150
    for key in ("Wilcoxon p", "paired t p", "mean difference"):
        assert thrice[key] == pytest.approx(once[key], rel=1e-9)


def test_a_finished_run_keeps_its_per_user_ranks_and_paired_tests_need_no_checkpoint(grid, tmp_path):
    """Catches ranks.npz out of step with metrics.json (other rows, another checkpoint), and a paired
    test that still loads checkpoints: the committed study's runs carry none."""
    import shutil

    import numpy as np

    from m3bsr.metrics import metrics_from_ranks
    from m3bsr.train import CheckpointError, load_ranks
    runs, res = grid
    cfg = experiments.grid_configs(["synthetic"], ["sasrec"], [0], "ci", OVER)[0]
    saved = res[(res["model"] == "sasrec") & (res["seed"] == 0)].set_index("split")
    t = experiments.trained("synthetic", "sasrec", 0, "ci", runs, OVER)
    for split in ("valid", "test"):
        r = load_ranks(run_dir(cfg, runs), split)
        assert np.array_equal(r["users"], t.seq.split(split)["users"].numpy())
        full, sampled = t.ranks(split)
        assert np.array_equal(r["full"], full.numpy()) and np.array_equal(r["sampled"], sampled.numpy())
        assert metrics_from_ranks(torch.from_numpy(r["full"]))["NDCG@10"] == pytest.approx(saved.at[split, "NDCG@10"], abs=1e-12)
    bare = tmp_path / "runs"
    shutil.copytree(runs, bare, ignore=shutil.ignore_patterns("*.pt"))
    assert experiments.paired_test("synthetic", "sasrec", "pop", [0, 1], "ci", bare, OVER) == \
        experiments.paired_test("synthetic", "sasrec", "pop", [0, 1], "ci", runs, OVER)
    (run_dir(cfg, bare) / "ranks.npz").write_bytes(b"not an npz")
    with pytest.raises(CheckpointError, match="ranks.npz: not a ranks file"):
        experiments.paired_test("synthetic", "sasrec", "pop", [0], "ci", bare, OVER)
    (run_dir(cfg, bare) / "ranks.npz").unlink()
    with pytest.raises(CheckpointError, match="ranks.npz: missing"):
        experiments.paired_test("synthetic", "sasrec", "pop", [0], "ci", bare, OVER)


def test_a_run_without_its_checkpoint_is_trained_again_once_beside_it(grid, tmp_path):
    """Catches a committed run (no best.pt) that cannot be evaluated again, a retrained checkpoint
    written into the committed folder, and one trained anew on every call."""
    import shutil
    runs, res = grid
    bare, again = tmp_path / "runs", tmp_path / "checkpoints"
    shutil.copytree(runs, bare, ignore=shutil.ignore_patterns("*.pt"))
    said = []
    t = experiments.trained("synthetic", "sasrec", 0, "ci", bare, OVER, checkpoints=again, log=said.append)
    saved = res[(res["model"] == "sasrec") & (res["seed"] == 0)].set_index("split").at["test", "NDCG@10"]
    assert t.evaluate("test")["NDCG@10"] == pytest.approx(saved, abs=1e-12)  # one thread, one device: the same run
    assert len(said) == 1 and "training it again" in said[0] and not list(bare.rglob("*.pt"))
    cfg = experiments.grid_configs(["synthetic"], ["sasrec"], [0], "ci", OVER)[0]
    assert (run_dir(cfg, again) / "best.pt").exists()
    experiments.trained("synthetic", "sasrec", 0, "ci", bare, OVER, checkpoints=again, log=said.append)
    assert len(said) == 1, "trained once"


def test_paired_test_compares_a_variant_of_one_model_by_its_flags(grid):
    """An ablation is a model against itself with a flag: b's side trains and reads its own run."""
    runs, _ = grid
    variant = {**OVER, "dropout": 0.4}
    alone = experiments.run_grid(["synthetic"], ["sasrec"], [0], "ci", runs, variant, log=lambda *_: None)
    out = experiments.paired_test("synthetic", "sasrec", "sasrec", [0], "ci", runs, OVER, flags_b={"dropout": 0.4})
    assert out["b NDCG@10"] == pytest.approx(alone.set_index("split").at["test", "NDCG@10"], abs=1e-12)
    assert out["a NDCG@10"] != out["b NDCG@10"]


def test_trained_reloads_the_best_checkpoint_and_can_change_inference_fields(grid):
    runs, res = grid
    t = experiments.trained("synthetic", "sasrec", 0, "ci", runs, OVER)
    saved = res[(res["model"] == "sasrec") & (res["seed"] == 0) & (res["split"] == "test")].iloc[0]
    assert t.evaluate("test")["NDCG@10"] == pytest.approx(saved["NDCG@10"], abs=1e-12)
    metrics, seconds = experiments.timed_evaluation(t, repeats=2)
    assert metrics == t.evaluate("test") and seconds > 0
    with pytest.raises(FileNotFoundError):
        experiments.trained("synthetic", "bert4rec", 0, "ci", runs, OVER)
    with pytest.raises(ConfigError, match="not max_len"):  # other weights or data: not the same run
        experiments.trained("synthetic", "sasrec", 0, "ci", runs, OVER, max_len=5)


def test_popularity_buckets_partition_the_rows_and_average_back(grid):
    runs, res = grid
    t = experiments.trained("synthetic", "sasrec", 1, "ci", runs, OVER)
    b = experiments.by_target_popularity(t, buckets=3)
    assert b["rows"].sum() == 150 and b["rows"].max() - b["rows"].min() <= 1
    overall = t.evaluate("test")
    assert (b["NDCG@10"] * b["rows"]).sum() / 150 == pytest.approx(overall["NDCG@10"], abs=1e-12)
    lo = [int(r.split("-")[0]) for r in b["training targets"]]
    assert lo == sorted(lo)  # bucket 1 holds the rarest targets


def test_parallel_training_gives_the_numbers_of_one_process(tmp_path):
    """jobs=2: two worker processes with half the threads each; every run's metrics.json is the one
    training it here with that thread count gives, byte for byte."""
    cfgs = experiments.grid_configs(["synthetic"], ["sasrec"], [0, 1], "ci", OVER)
    lines = []
    experiments.train_runs(cfgs, tmp_path / "pool", jobs=2, log=lines.append)
    assert lines[0].startswith("training 2 runs, 2 at a time") and len(lines) == 3
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads // 2))
    try:
        experiments.train_runs(cfgs, tmp_path / "here", jobs=1)
    finally:
        torch.set_num_threads(threads)
    for cfg in cfgs:
        pooled, here = (run_dir(cfg, tmp_path / where) / "metrics.json" for where in ("pool", "here"))
        assert pooled.read_bytes() == here.read_bytes()
    experiments.train_runs(cfgs, tmp_path / "pool", jobs=2, log=lines.append)  # all finished: nothing to do
    assert len(lines) == 3


@pytest.mark.parametrize("jobs", [0, -1, 1.5, True])
def test_jobs_must_be_a_positive_integer(tmp_path, jobs):
    with pytest.raises(ConfigError, match="jobs must be a positive integer"):
        experiments.train_runs([], tmp_path, jobs=jobs)


def test_a_failing_parallel_run_raises_here(tmp_path):
    cfgs = experiments.grid_configs(["synthetic"], ["sasrec"], [0, 1], "ci", {**OVER, "heads": 3})  # d=32
    with pytest.raises(ConfigError, match="divisible by heads=3"):
        experiments.train_runs(cfgs, tmp_path, jobs=2, log=lambda *_: None)


def test_default_jobs_one_per_core_as_memory_allows(monkeypatch):
    assert 1 <= experiments.default_jobs("cpu") <= torch.get_num_threads()
    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)
    pages = {"SC_PAGE_SIZE": 4096, "SC_PHYS_PAGES": (2 * experiments.RUN_MEMORY + 2**30) // 4096}  # two runs fit
    monkeypatch.setattr(experiments.os, "sysconf", pages.__getitem__)
    assert experiments.default_jobs("cpu") == 2
    pages["SC_PHYS_PAGES"] *= 8
    assert experiments.default_jobs("cpu") == 8  # the cores


def _results():
    """Two datasets' results, by hand: on d1 'a' wins validation (0.9 vs 0.75) and 'b' test (0.35 vs 0.3,
    though 'a' has the best single seed, 0.5); d2 has one seed per model."""
    import pandas as pd
    rows = [("d1", "a", 0, "test", 0.1), ("d1", "a", 1, "test", 0.5), ("d1", "b", 0, "test", 0.35),
            ("d1", "b", 1, "test", 0.35), ("d1", "a", 0, "valid", 0.9), ("d1", "a", 1, "valid", 0.9),
            ("d1", "b", 0, "valid", 0.5), ("d1", "b", 1, "valid", 1.0),
            ("d2", "a", 0, "test", 0.01), ("d2", "b", 0, "test", 0.02), ("d2", "a", 0, "valid", 0.5),
            ("d2", "b", 0, "valid", 0.5)]
    return pd.DataFrame(rows, columns=["dataset", "model", "seed", "split", "NDCG@10"])


def test_summary_is_the_test_mean_and_sample_std_over_seeds():
    """Catches the population std (ddof=0), NaN for a single seed, validation rows averaged in, and the
    mean and std swapped."""
    s = experiments.summarize(_results(), metrics=("NDCG@10",))
    assert s["NDCG@10"].tolist() == ["0.3000 ± 0.2828", "0.3500 ± 0.0000", "0.0100 ± 0.0000", "0.0200 ± 0.0000"]


def test_markdown_table_bolds_the_best_test_mean_of_each_dataset():
    """Catches the best chosen by the best seed, across all datasets at once, or over validation and test together."""
    res = _results()
    lines = experiments.markdown_table(experiments.summarize(res, metrics=("NDCG@10",)), res).splitlines()
    assert lines[:2] == ["| dataset | model | NDCG@10 |", "|---|---|---|"]
    assert lines[2:] == ["| d1 | a | 0.3000 ± 0.2828 |", "| d1 | b | **0.3500 ± 0.0000** |",
                         "| d2 | a | 0.0100 ± 0.0000 |", "| d2 | b | **0.0200 ± 0.0000** |"]


def test_best_baseline_is_the_best_validation_mean_not_the_best_seed():
    """Catches the opponent picked by its best single validation seed (b's 1.0) instead of its mean."""
    assert experiments.best_baseline(_results(), "d1", model="none") == "a"


def test_paired_test_formulas_on_known_ranks(monkeypatch):
    """Catches an unpaired t-test, zero differences split instead of dropped, 'no difference' declared when
    some pairs tie, and k ignored: the p-values against the formulas, on ten users' fixed ranks."""
    import numpy as np
    from scipy import stats

    from m3bsr.metrics import ndcg_per_row
    rank = {"a": torch.tensor([1, 2, 3, 7, 20, 1, 4, 100, 2, 9]), "b": torch.tensor([2, 2, 5, 1, 20, 3, 1, 50, 1, 3])}

    users = np.arange(10)
    monkeypatch.setattr(experiments, "run_ranks",
                        lambda dataset, model, *a, **kw: {"users": users, "full": rank[model].numpy()})
    out = experiments.paired_test("d", "a", "b", [0], "ci", "runs")
    a, b = (ndcg_per_row(rank[m], 10).numpy() for m in ("a", "b"))
    d = a - b  # three users tie (d = 0)
    t = d.mean() / (d.std(ddof=1) / np.sqrt(len(d)))
    assert out["pairs"] == 10 and out["mean difference"] == pytest.approx(d.mean())
    assert out["paired t p"] == pytest.approx(2 * stats.t.sf(abs(t), len(d) - 1), rel=1e-9)
    assert out["Wilcoxon p"] == pytest.approx(stats.wilcoxon(d[d != 0]).pvalue, rel=1e-9)  # zeros dropped
    at5 = experiments.paired_test("d", "a", "b", [0], "ci", "runs", k=5)
    assert at5["a NDCG@5"] == pytest.approx(ndcg_per_row(rank["a"], 5).mean().item())  # rank 7 and 9: 0 at k=5


def test_holm_adjusts_step_down_in_the_input_order():
    """Catches Bonferroni (every p times m), a sequence left non-monotone, no cap at 1 and values
    returned in sorted instead of input order: three p-values against Holm's definition by hand."""
    import numpy as np
    # sorted 0.01, 0.03, 0.04 -> 3 x 0.01, 2 x 0.03, max(0.06, 1 x 0.04) = 0.03, 0.06, 0.06
    assert np.allclose(experiments.holm([0.01, 0.04, 0.03]), [0.03, 0.06, 0.06])
    assert np.allclose(experiments.holm([0.6, 0.02]), [0.6, 0.04])
    assert np.allclose(experiments.holm([0.9, 0.8]), [1.0, 1.0])  # 2 x 0.8 capped at 1; 0.9 raised to it
    assert experiments.holm([0.05]).tolist() == [0.05]


def _finished_run(cfg, runs, seconds):
    """A run folder as a finished run leaves it: metrics.json and a history of validations every 4 steps
    (3 steps per epoch), each with the seconds its steps took."""
    import json
    run = run_dir(cfg, runs)
    run.mkdir(parents=True, exist_ok=True)
    metrics = {"NDCG@10": 0.1, "HR@10": 0.2}
    result = {"valid": metrics, "test": metrics, "best_step": 4, "best_epoch": 1.333}
    (run / "metrics.json").write_text(json.dumps(result))
    (run / "history.csv").write_text("step,epoch,loss,seconds\n" + "".join(
        f"{4 * i},{round(4 * i / 3, 3)},1.0,{s}\n" for i, s in enumerate(seconds, 1)))


def test_train_seconds_are_the_sum_over_the_history_for_every_row_of_the_grid(tmp_path):
    """Catches train_seconds averaged over the validations, steps and epochs counted as history rows, and a
    grid listing a run twice (seed 0 twice) losing rows when its run costs are listed once per distinct run."""
    cfg = experiments.grid_configs(["synthetic"], ["sasrec"], [0], "ci", OVER)[0]
    _finished_run(cfg, tmp_path, [1.5, 2.5])
    cost = experiments.run_costs([cfg], tmp_path)
    assert cost[["steps", "epochs", "train_seconds"]].values.tolist() == [[8, 2.667, 4.0]]
    res = experiments.run_grid(["synthetic"], ["sasrec"], [0, 0], "ci", tmp_path, OVER, log=lambda *_: None)
    assert len(res) == 4 and res["train_seconds"].tolist() == [4.0] * 4 and res["steps"].tolist() == [8] * 4
    assert res["best_step"].tolist() == [4] * 4 and res["best_epoch"].tolist() == [1.333] * 4


def test_a_change_to_the_code_that_trains_a_run_names_a_new_run_folder(tmp_path, monkeypatch):
    """A run folder is named by the config and the code version (the sources that train and score runs):
    editing a model's source changes the version, editing a file outside them (viz.py) does not, and a
    new version names another folder, so a finished run of older code is not reused. Its metrics.json
    holds no code version: identical runs of any code write identical files."""
    import shutil

    from m3bsr import train
    package = tmp_path / "m3bsr"
    shutil.copytree(Path(train.__file__).parent, package, ignore=shutil.ignore_patterns("__pycache__"))
    before = train.source_hash(package)
    assert before == train.source_hash(Path(train.__file__).parent) and before.startswith(train.code_version())
    (package / "viz.py").write_text((package / "viz.py").read_text() + "\n# a figure tweak\n")
    assert train.source_hash(package) == before
    sasrec = package / "models" / "sequential.py"
    sasrec.write_text(sasrec.read_text().replace("import torch", "import torch  # edited", 1))
    assert train.source_hash(package) != before
    cfg = experiments.grid_configs(["synthetic"], ["sasrec"], [0], "ci", OVER)[0]
    _finished_run(cfg, tmp_path / "runs", [1.0])
    assert run_dir(cfg, tmp_path / "runs").name.endswith(f"{cfg.hash()}-{train.code_version()}")
    monkeypatch.setattr(train, "code_version", lambda: "0ther000")
    assert not (run_dir(cfg, tmp_path / "runs") / "metrics.json").exists()  # the old run is not found
    assert run_dir(cfg, tmp_path / "runs").name.endswith(f"{cfg.hash()}-0ther000")


def test_popularity_buckets_on_known_counts():
    """Catches buckets numbered from 0 (the table's first bucket is 1, the rarest targets): six rows whose
    targets were trained on 5, 1, 3, 9, 2 and 7 times, in three buckets of two."""
    import math
    from types import SimpleNamespace
    stub = SimpleNamespace(info=SimpleNamespace(item_counts=torch.tensor([0.0, 5, 1, 3, 9, 2, 7])),
                           seq=SimpleNamespace(split=lambda s: {"targets": torch.arange(1, 7)[:, None]}),
                           ranks=lambda split: (torch.tensor([1, 20, 3, 11, 2, 5]), None))
    b = experiments.by_target_popularity(stub, buckets=3)
    assert b["bucket"].tolist() == [1, 2, 3] and b["training targets"].tolist() == ["1-2", "3-5", "7-9"]
    assert b["rows"].tolist() == [2, 2, 2] and b["HR@10"].tolist() == [0.5, 1.0, 0.5]  # ranks (20, 2), (3, 1), (5, 11)
    assert b["NDCG@10"].tolist() == pytest.approx([1 / math.log2(3) / 2, (1 / 2 + 1) / 2, 1 / math.log2(6) / 2])


def test_verdict_needs_a_p_value_below_alpha_and_takes_the_sign_of_the_difference():
    assert experiments.verdict(0.01, 0.049) == "held" and experiments.verdict(-0.01, 0.001) == "not held"
    assert experiments.verdict(0.5, 0.05) == experiments.verdict(0.5, float("nan")) == "inconclusive"


def test_verdicts_read_each_claim_from_its_table_and_leave_out_a_missing_one(tmp_path):
    """Catches the sampled ranking read as the main one, a component's verdict from its unadjusted p,
    and a noise study 'held' where M3BSR is ahead at the noisiest setting but no further than at the cleanest."""
    import pandas as pd
    pd.DataFrame({"dataset": ["d1", "d2", "d1"], "ranking": ["full", "full", "1+99 sampled"],
                  "best baseline": ["mbt", "sasrec", "mbt"], "M3BSR NDCG@10": [.2, .1, .1], "baseline NDCG@10": [.1, .2, .2],
                  "difference": [.1, -.1, -.1], "Wilcoxon p (Holm)": [.01, .01, .001]}).to_csv(tmp_path / "04_significance.csv", index=False)
    pd.DataFrame({"dataset": "d1", "variant": ["w/o CDMD", "T = 1"], "full NDCG@10": [.2, .2], "variant NDCG@10": [.18, .15],
                  "difference": [.02, .05], "Wilcoxon p": [.01, .0005], "Wilcoxon p (Holm)": [.2, .001]}
                 ).to_csv(tmp_path / "05_ablation_tests.csv", index=False)
    pd.DataFrame({"study": ["1. noisy favors"] * 2 + ["3. accidental clicks"] * 2, "dataset": "synthetic",
                  "field": ["deep_noise"] * 2 + ["syn_noise"] * 2, "value": [0.4, 0.0, 0.0, 0.5],
                  "difference": [.03, .01, .05, .02], "Wilcoxon p (Holm)": [.01, .5, .01, .01]}
                 ).to_csv(tmp_path / "07_regimes.csv", index=False)
    v = experiments.verdicts(tmp_path)
    assert list(v["verdict"]) == ["held", "not held", "inconclusive", "held", "held", "inconclusive"]
    assert v["claim"].str.contains("more diffusion steps").sum() == 1 and not v["claim"].str.contains("separate").any()
    assert "+0.0100 at 0, +0.0300 at 0.4" in v.at[4, "number"]  # sorted by setting: the cleanest first
