"""Time to quality (time_to_quality.py): each column from scripted histories, and a smoke run."""
import math

import pandas as pd
import pytest

from m3bsr.cli import main
from m3bsr.config import ConfigError
from m3bsr.time_to_quality import COLUMNS, configs, run_time_to_quality, seconds_to_reach, table, table_from_folders


def history(valid, seconds, every=10):
    """A history.csv's columns: one validation every ``every`` steps."""
    return pd.DataFrame({"step": [every * (i + 1) for i in range(len(valid))], "valid_NDCG@10": valid,
                         "seconds": seconds})


def test_seconds_to_reach_sums_training_seconds_up_to_the_first_validation_at_the_threshold():
    h = history([0.1, 0.3, 0.2, 0.4], [1.0, 2.0, 4.0, 8.0])
    assert seconds_to_reach(h, 0.3) == 3.0  # the second validation, not the fourth
    assert seconds_to_reach(h, 0.05) == 1.0
    assert seconds_to_reach(h, 0.4) == 15.0
    assert math.isnan(seconds_to_reach(h, 0.41))


def test_table_measures_each_mode_against_the_chain_of_its_own_seed():
    runs = pd.DataFrame([
        # chain bests 0.30 (seed 0) and 0.20 (seed 1): sd over seeds = 0.0707
        dict(dataset="d", mode="chain", seed=0, test=0.25, history=history([0.1, 0.3, 0.2], [10.0, 10.0, 10.0])),
        dict(dataset="d", mode="random_t", seed=0, test=0.24, history=history([0.24, 0.29, 0.31], [2.0, 2.0, 2.0])),
        dict(dataset="d", mode="chain", seed=1, test=0.15, history=history([0.2, 0.1], [6.0, 6.0])),
        dict(dataset="d", mode="random_t", seed=1, test=0.14, history=history([0.05, 0.1], [1.0, 1.0])),
    ])
    t = table(runs).set_index(["mode", "seed"])
    assert list(t.reset_index().columns) == ["mode", "seed"] + [c for c in COLUMNS if c not in ("mode", "seed")]
    sd = pd.Series([0.3, 0.2]).std()
    c0, r0, r1 = t.loc[("chain", 0)], t.loc[("random_t", 0)], t.loc[("random_t", 1)]
    assert (c0["best_valid"], c0["best_step"], c0["steps"], c0["s_to_own_best"]) == (0.3, 20, 30, 20.0)
    assert c0["s_per_step"] == 1.0 and c0["speedup"] == 20.0 / seconds_to_reach(runs.history[0], 0.3 - sd)
    # random_t, seed 0: 0.24 >= 0.3 - sd on its first validation; 0.31 >= 0.3 on its third
    assert (r0["s_to_within_sd"], r0["s_to_chain_best"], r0["s_to_own_best"]) == (2.0, 6.0, 6.0)
    assert r0["speedup"] == 10.0 and r0["test"] == 0.24 and r0["s_per_step"] == 0.2
    # seed 1: the chain's best 0.2 at 6 s; random_t never comes within sd of it
    assert math.isnan(r1["s_to_within_sd"]) and math.isnan(r1["speedup"]) and math.isnan(r1["s_to_chain_best"])
    one_seed = table(runs[runs["seed"] == 0])
    assert one_seed["s_to_within_sd"].isna().all()  # no sd from one seed: no threshold, no speed-up


def test_table_and_configs_refuse_a_study_without_the_chain():
    runs = pd.DataFrame([dict(dataset="d", mode="random_t", seed=0, test=0.1, history=history([0.1], [1.0]))])
    with pytest.raises(ValueError, match="no chain run for d, seed 0"):
        table(runs)
    with pytest.raises(ConfigError, match="must include 'chain'"):
        configs(["synthetic"], [0], ["random_t"])
    with pytest.raises(ConfigError, match="unknown size"):
        configs(["synthetic"], [0], size="huge")


def test_configs_differ_only_in_dataset_seed_and_mode():
    cfgs = configs(["synthetic"], [0, 1])
    assert [(c.train.seed, c.model.train_mode) for c in cfgs] == [(s, m) for s in (0, 1)
                                                                   for m in ("chain", "strided", "random_t")]
    assert {(c.model.T, c.model.d, c.data.max_len, c.train.batch_size, c.train.eval_steps) for c in cfgs} == \
        {(15, 32, 20, 64, 10)}


def test_small_time_to_quality_trains_each_mode_and_writes_the_table(tmp_path, one_thread):
    out = tmp_path / "out"
    run_time_to_quality(["synthetic"], [0, 1], size="small", runs=tmp_path / "runs", out=out, jobs=1, device="cpu",
                        log=lambda _: None)
    md = (out / "time-to-quality-synthetic.md").read_text()
    csv = pd.read_csv(out / "time-to-quality-synthetic.csv", comment="#")
    assert list(csv.columns) == COLUMNS and len(csv) == 6
    assert set(csv["mode"]) == {"chain", "strided", "random_t"}
    assert (csv["steps"] == 4).all() and (csv["s_per_step"] > 0).all()
    assert "| synthetic | random_t |" in md and "runs side by side" in md
    folders = sorted((out / "time-to-quality").iterdir())
    assert len(folders) == 6  # each run's config, history and metrics: the table again from them
    again = table_from_folders(folders).sort_values(["seed", "mode"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(again[["seed", "mode", "best_valid", "steps"]],
                                  csv.sort_values(["seed", "mode"]).reset_index(drop=True)[["seed", "mode",
                                                                                           "best_valid", "steps"]],
                                  check_dtype=False)


def test_time_to_quality_seeds_must_be_integers(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--time-to-quality", "--seeds", "0,x"])
    assert "--seeds expects comma-separated integers" in capsys.readouterr().err
