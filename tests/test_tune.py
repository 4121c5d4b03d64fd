"""``python -m m3bsr tune``: studies that survive restarts, shared storage, pruning, validation only,
and the export that the final runs read (ci profile, sasrec on synthetic, a few seconds a trial)."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna")

from m3bsr import cli, experiments, tune  # noqa: E402
from m3bsr.config import ConfigError, make_config  # noqa: E402
from m3bsr.data.sequences import SequenceData  # noqa: E402
from m3bsr.train import Trainer  # noqa: E402

NAME = "synthetic/sasrec/ci"


@pytest.fixture(autouse=True)
def _cpu(monkeypatch):
    monkeypatch.setenv("CI", "true")  # no progress bars


def paths(tmp_path):
    return {"storage": f"sqlite:///{tmp_path / 'study.db'}", "runs": tmp_path / "runs", "results": tmp_path / "results"}


def states(storage: str) -> list[str]:
    study = optuna.load_study(study_name=NAME, storage=storage)
    return [t.state.name for t in sorted(study.trials, key=lambda t: t.number)]


@pytest.fixture(scope="module")
def two_trials(tmp_path_factory):
    """A study run to 1 trial by one call, then to 2 by a second call (the command line) on the same
    database, as a restarted or second process would."""
    tmp = tmp_path_factory.mktemp("tune")
    p = paths(tmp)
    tune.tune("synthetic", "sasrec", "ci", 1, p["storage"], runs=p["runs"], results=p["results"], device="cpu")
    first = states(p["storage"])
    code = cli.main(["tune", "--dataset", "synthetic", "--model", "sasrec", "--profile", "ci", "--trials", "2",
                     "--storage", p["storage"], "--runs", str(p["runs"]), "--results", str(p["results"]),
                     "--device", "cpu"])
    assert code == 0
    return p, first


def test_restarted_tune_continues_the_study_to_n_finished_trials(two_trials):
    p, first = two_trials
    assert first == ["COMPLETE"]
    assert states(p["storage"]) == ["COMPLETE", "COMPLETE"]  # the second call added one trial, not two
    # the first trial is the profile's own config
    study = optuna.load_study(study_name=NAME, storage=p["storage"])
    assert study.trials[0].params == tune.profile_point("sasrec", "ci")
    assert study.trials[1].params != study.trials[0].params
    # a third call with the same target runs nothing
    tune.tune("synthetic", "sasrec", "ci", 2, p["storage"], runs=p["runs"], results=p["results"], device="cpu")
    assert len(states(p["storage"])) == 2


def test_each_trial_lands_small_files_and_no_checkpoint(two_trials):
    p, _ = two_trials
    for n in (0, 1):
        folder = p["results"] / "synthetic" / "sasrec" / "ci" / f"trial-{n}"
        assert sorted(f.name for f in folder.iterdir()) == ["config.json", "history.csv", "metrics.json", "trial.json"]
        metrics = json.loads((folder / "metrics.json").read_text())
        assert "valid" in metrics and "test" not in metrics
        assert json.loads((folder / "config.json").read_text())["train"]["seed"] == 0
        assert json.loads((folder / "trial.json").read_text())["state"] == "COMPLETE"
    assert not list(p["runs"].rglob("*.pt"))  # finished trials keep no checkpoint


def test_export_writes_best_overrides_that_make_config_accepts(two_trials):
    p, _ = two_trials
    best_json = p["results"] / "best.json"
    assert cli.main(["tune", "--export", "--storage", p["storage"], "--results", str(p["results"])]) == 0
    entry = json.loads(best_json.read_text())[NAME]
    study = optuna.load_study(study_name=NAME, storage=p["storage"])
    assert entry["valid_NDCG@10"] == study.best_value and entry["complete"] and entry["finished_trials"] == 2
    import pandas as pd
    studies = pd.read_csv(p["results"] / "studies.csv").set_index("study")  # written beside best.json
    assert studies.at[NAME, "complete"] + studies.at[NAME, "pruned"] == 2 and studies.at[NAME, "hours"] > 0
    assert studies.at[NAME, "best valid NDCG@10"] == pytest.approx(study.best_value, abs=1e-4)
    over = tune.best_overrides("synthetic", "sasrec", "ci", best_json)
    assert over == study.best_params
    cfg = make_config("ci", {**over, "model": "sasrec"})
    assert cfg.train.lr == over["lr"] and cfg.model.layers == over["layers"]
    assert tune.best_overrides("synthetic", "pop", "ci", best_json) == {}  # nothing to tune
    chosen = tune.tuned("ci", best_json)  # what the final runs train with: the study's choice, under an ablation's flag
    cfg = experiments.config_for("ci", "synthetic", "sasrec", 3, {"layers": 3}, tuned=chosen)
    assert (cfg.train.lr, cfg.model.layers, cfg.train.seed) == (over["lr"], 3, 3)
    pop = {"dataset": "synthetic", "model": "pop", "seed": 0}  # nothing tuned: the profile's config
    assert experiments.config_for("ci", **pop, tuned=chosen).to_dict() == make_config("ci", pop).to_dict()
    with pytest.raises(KeyError, match="no study synthetic/bert4rec/ci"):
        tune.best_overrides("synthetic", "bert4rec", "ci", best_json)
    with pytest.raises(ValueError, match="holds 2 of its 3 trials"):  # an unfinished study is not a choice
        tune.export(p["storage"], best_json, trials=3, log=lambda _: None)
        tune.best_overrides("synthetic", "sasrec", "ci", best_json)


class AlwaysPrune(optuna.pruners.BasePruner):
    def prune(self, study, trial) -> bool:
        return True


def test_a_pruned_trial_stops_at_its_first_validation(tmp_path):
    p = paths(tmp_path)
    tune.tune("synthetic", "sasrec", "ci", 1, p["storage"], runs=p["runs"], results=p["results"], device="cpu",
              pruner=AlwaysPrune())
    assert states(p["storage"]) == ["PRUNED"]
    study = optuna.load_study(study_name=NAME, storage=p["storage"])
    eval_steps = make_config("ci").train.eval_steps
    assert study.trials[0].intermediate_values.keys() == {eval_steps}  # reported at optimiser step 4, then stopped
    folder = p["results"] / "synthetic" / "sasrec" / "ci" / "trial-0"
    assert json.loads((folder / "trial.json").read_text())["state"] == "PRUNED"
    assert len((folder / "history.csv").read_text().splitlines()) == 2  # header + one validation


class Sealed(dict):
    """A split whose rows fail when read (only its user ids, which validation shares, may be counted)."""

    def __getitem__(self, key):
        if key != "users":
            raise AssertionError(f"the test split was read ({key!r})")
        return super().__getitem__(key)

    def items(self):
        raise AssertionError("the test split was read")

    values = items


def test_tuning_never_reads_the_test_split(tmp_path, monkeypatch):
    init = SequenceData.__init__

    def sealed_init(self, *args, **kw):
        init(self, *args, **kw)
        self.test = Sealed(self.test)

    monkeypatch.setattr(SequenceData, "__init__", sealed_init)
    cfg = make_config("ci", {"model": "sasrec", "device": "cpu", "cache_dir": str(tmp_path / "cache")})
    with pytest.raises(AssertionError, match="test split was read"):  # the seal works: a normal trainer trips it
        Trainer(cfg)  # (drawing the test rows' negatives)
    with pytest.raises(ConfigError, match="not 'test'"):
        Trainer(cfg, test=False).evaluate("test")
    p = paths(tmp_path)
    tune.tune("synthetic", "sasrec", "ci", 1, p["storage"], runs=p["runs"], results=p["results"], device="cpu")
    assert states(p["storage"]) == ["COMPLETE"]


def test_a_trial_whose_process_died_is_failed_and_run_again(tmp_path, monkeypatch):
    """A RUNNING trial whose heartbeat stopped (its process was killed) is marked FAIL by the next
    ``tune`` and queued again with the same parameters; the study still reaches N finished trials."""
    monkeypatch.setattr(tune, "HEARTBEAT", 1)
    monkeypatch.setattr(tune, "GRACE", 1)
    p = paths(tmp_path)
    storage = tune.open_storage(p["storage"])
    study = optuna.create_study(study_name=NAME, storage=storage, direction="maximize")
    study.set_user_attr("fixed", {**tune.trial_budget("ci"), "dataset": "synthetic", "model": "sasrec"})
    study.enqueue_trial(tune.profile_point("sasrec", "ci"))
    with pytest.warns(UserWarning, match="Heartbeat"):  # optuna expects heartbeats from Study.optimize
        dead = study.ask()  # a trial that a killed process had started
    storage.record_heartbeat(dead._trial_id)
    time.sleep(2.5)
    tune.tune("synthetic", "sasrec", "ci", 1, p["storage"], runs=p["runs"], results=p["results"], device="cpu")
    trials = sorted(optuna.load_study(study_name=NAME, storage=p["storage"]).trials, key=lambda t: t.number)
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"]
    assert trials[1].params == tune.profile_point("sasrec", "ci")  # the dead trial's (enqueued) parameters
    assert trials[1].system_attrs["failed_trial"] == 0
    summary = json.loads((p["results"] / "synthetic" / "sasrec" / "ci" / "trial-1" / "trial.json").read_text())
    assert summary["run"] == "trial-0"  # the retry trained in (and would resume from) the dead trial's run folder


def test_a_study_refuses_another_trial_budget(tmp_path, monkeypatch):
    p = paths(tmp_path)
    optuna.create_study(study_name=NAME, storage=p["storage"]).set_user_attr("fixed", {"max_steps": 3})
    with pytest.raises(ConfigError, match="trains trials with"):
        tune.tune("synthetic", "sasrec", "ci", 1, p["storage"], runs=p["runs"], results=p["results"], device="cpu")


@pytest.mark.parametrize("model", ["pop", "sasrec", "sasrec-mm", "bert4rec", "mbt", "diffurec", "m3bsr"])
def test_every_draw_of_a_search_space_is_a_valid_config(model):
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        trial = study.ask()
        draw = {k: tune.suggest(trial, k, d) for k, d in tune.space(model).items()}
        cfg = make_config("default", {**tune.trial_budget("default"), **draw, "model": model})
        assert cfg.model.d % cfg.model.heads == 0
    assert set(tune.profile_point(model, "default")) == set(tune.space(model))  # the profile lies in the space


def test_two_processes_share_one_study(tmp_path):
    """Two ``tune`` processes on one SQLite file: every trial is finished once, with its own number,
    and together they reach N (one may run a trial over: export then uses the first N)."""
    p = paths(tmp_path)
    lib = Path(tune.__file__).parents[1]
    env = {**os.environ, "PYTHONPATH": str(lib), "OMP_NUM_THREADS": "1", "CI": "true"}
    cmd = [sys.executable, "-m", "m3bsr", "tune", "--dataset", "synthetic", "--model", "sasrec", "--profile", "ci",
           "--trials", "3", "--storage", p["storage"], "--runs", str(p["runs"]), "--results", str(p["results"]),
           "--device", "cpu"]
    first = subprocess.Popen(cmd, env=env)
    storage = tune.open_storage(p["storage"])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # the second joins once the first has begun its first trial
        try:
            if optuna.load_study(study_name=NAME, storage=storage).get_trials(deepcopy=False):
                break
        except KeyError:  # no study yet
            pass
        time.sleep(0.2)
    second = subprocess.Popen(cmd, env=env)
    assert first.wait(120) == 0 and second.wait(120) == 0
    trials = optuna.load_study(study_name=NAME, storage=p["storage"]).trials
    assert [t.state.name for t in trials].count("COMPLETE") in (3, 4) and len(trials) in (3, 4)
    assert len({json.dumps(t.params, sort_keys=True) for t in trials}) == len(trials)  # no point drawn twice


def test_cost_measures_each_model_and_prices_the_study(tmp_path):
    small = {"syn_users": 60, "syn_items": 120, "syn_events": 30}
    costs = tune.step_costs("ci", small, datasets=("synthetic",), models=["sasrec", "m3bsr"], steps=1,
                            log=lambda _: None)
    assert list(costs["model"]) == ["sasrec", "m3bsr"] and (costs[["step", "validation"]] > 0).all().all()
    eval_steps = make_config("ci").train.eval_steps
    assert costs["per_step"].tolist() == pytest.approx((costs["step"] + costs["validation"] / eval_steps).tolist())
    hours = tune.study_cost(costs, "ci", small)
    total, t = costs["per_step"].sum(), make_config("ci").train
    assert hours["tuning"] == pytest.approx(tune.TRIALS["ci"] * t.max_steps * total / 3600)  # ci: no trial budget
    assert hours["tables_min"] == pytest.approx(5 * t.min_steps * total / 3600)
    assert hours["tables_early"] == pytest.approx(5 * (t.min_steps + t.patience_steps) * total / 3600)
    assert hours["study_max"] == pytest.approx(hours["tuning"] + 5 * t.max_steps * total / 3600)
    md = tune.write_cost(costs, hours, "ci", small, tmp_path).read_text()
    assert "| sasrec |" in md and "| sum |" in md and "study_max" in md


def test_cost_from_the_command_line(tmp_path, capsys):
    assert cli.main(["tune", "--cost", "--profile", "ci", "--dataset", "synthetic", "--model", "sasrec", "--steps", "1",
                 "--set", "syn_users=60", "--results", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "tables_min" in out and len(list(tmp_path.glob("cost-ci-*.md"))) == 1
