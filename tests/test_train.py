"""The trainer: determinism, exact resume, atomic and verified checkpoints, the CLI end to end."""
import csv
import ctypes
import hashlib
import io
import json
import logging
import random
import subprocess
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

from m3bsr import train
from m3bsr.cli import main
from m3bsr.config import ConfigError, make_config
from m3bsr.data.schema import DataError
from m3bsr.data.sequences import SequenceData
from m3bsr.data.sources import load_csv
from m3bsr.models.registry import MODELS
from m3bsr.train import CheckpointError, Trainer, kept_host_memory, load_checkpoint, save_checkpoint

REPO = Path(__file__).resolve().parents[1]


def ci_config(tmp_path, **over):
    return make_config("ci", {"dataset": "synthetic", "cache_dir": str(tmp_path / "cache"), "progress": False,
                              "model": "sasrec", **over})


def test_same_seed_gives_identical_metrics(tmp_path):
    a = Trainer(ci_config(tmp_path), tmp_path / "a").fit()
    b = Trainer(ci_config(tmp_path), tmp_path / "b").fit()
    assert (tmp_path / "a" / "metrics.json").read_text() == (tmp_path / "b" / "metrics.json").read_text()
    assert a["test"] == b["test"]


def _recording_rows(tr: Trainer, rows: list) -> Trainer:
    """``tr`` with each training step's users appended to ``rows``."""
    real = tr.model.loss
    tr.model.loss = lambda batch: rows.append(batch["users"].tolist()) or real(batch)
    return tr


def test_a_run_resumed_in_the_middle_of_an_epoch_equals_the_uninterrupted_run(tmp_path):
    """Validation (and last.pt) every 2 steps, 3 steps per epoch: the run dies after step 4, inside its
    second epoch, and resumes. Catches the data order of that epoch redrawn or restarted at its first
    batch, and any state not restored: the same rows at every step, the same history and metrics.json."""
    def config():
        return ci_config(tmp_path, eval_steps=2, max_steps=10, patience_steps=100)
    full_rows, cut_rows, resumed_rows = [], [], []
    full = _recording_rows(Trainer(config(), tmp_path / "full"), full_rows).fit()
    _die_in_third_stretch(_recording_rows(Trainer(config(), tmp_path / "cut"), cut_rows))
    saved = load_checkpoint(tmp_path / "cut" / "last.pt")
    assert (saved["steps"], saved["epoch"], saved["batch"]) == (4, 1, 1)  # one epoch and one batch done
    resumed = _recording_rows(Trainer(config(), tmp_path / "cut"), resumed_rows).fit(resume=True)
    assert len(full_rows) == 10 and cut_rows + resumed_rows == full_rows
    assert resumed["test"] == full["test"] and resumed["valid"] == full["valid"]
    assert (tmp_path / "cut" / "metrics.json").read_text() == (tmp_path / "full" / "metrics.json").read_text()
    cut_hist, full_hist = (list(csv.DictReader((tmp_path / r / "history.csv").open())) for r in ("cut", "full"))
    assert [{**r, "seconds": 0} for r in cut_hist] == [{**r, "seconds": 0} for r in full_hist]


def test_compiled_training_follows_the_eager_run(tmp_path, monkeypatch):
    """``--set compile=true`` trains through ``torch.compile(model.loss)``: with dropout 0 the same updates as
    eager, up to float rounding (fused kernels round differently)."""
    compiled_fns, real = [], torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, *a, **kw: compiled_fns.append(fn) or real(fn, *a, **kw))
    for c in (False, True):
        Trainer(ci_config(tmp_path, compile=c, dropout=0.0, max_steps=6, eval_steps=3), tmp_path / str(c)).fit()
        assert len(compiled_fns) == int(c)  # only the compiled run goes through torch.compile
    eager, compiled = (list(csv.DictReader((tmp_path / str(c) / "history.csv").open())) for c in (False, True))
    assert len(eager) == len(compiled) == 2
    for a, b in zip(eager, compiled):
        assert float(b["loss"]) == pytest.approx(float(a["loss"]), rel=1e-4)
        assert float(b["valid_NDCG@10"]) == pytest.approx(float(a["valid_NDCG@10"]), abs=0.01)


def test_cuda_graphs_on_the_cpu_train_eagerly_with_one_warning(tmp_path, caplog):
    """``cuda_graphs`` is a CUDA path: on the CPU it warns once and trains and evaluates exactly as eager."""
    compiled = []
    with caplog.at_level(logging.WARNING, logger="m3bsr"):
        runs = []
        for g in (False, True):  # each built and trained in turn (building one seeds the global generator)
            tr = Trainer(ci_config(tmp_path, model="m3bsr", cuda_graphs=g, max_steps=4, eval_steps=2, device="cpu"),
                         tmp_path / str(g))
            real = tr._compiled
            tr._compiled = lambda fn, real=real: compiled.append(fn) or real(fn)
            tr.fit()
            runs.append(tr)
    warned = [r.getMessage() for r in caplog.records if "cuda_graphs" in r.getMessage()]
    assert warned == ["cuda_graphs: cpu is not a CUDA device; training and evaluation run without CUDA graphs"]
    assert [tr.score_fn for tr in runs] == [None, None] and all(not tr.graphs for tr in runs)
    assert [(tmp_path / str(g) / "metrics.json").read_text() for g in (False, True)].count(
        (tmp_path / "False" / "metrics.json").read_text()) == 2  # bit for bit the eager run
    assert len(compiled) == 2 and all(fn == tr.model.loss for fn, tr in zip(compiled, runs))  # eager: fn itself


def test_cuda_graphs_on_cuda_compile_the_step_and_the_scorer_for_static_shapes(tmp_path, monkeypatch):
    """Which torch.compile call each setting makes (recorded, not run: this machine may have no GPU);
    under CUDA graphs the scorer's output is copied before the next batch's replay can overwrite it."""
    calls = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: calls.append(kw) or fn)
    tr = Trainer(ci_config(tmp_path, model="sasrec", cuda_graphs=True, device="cpu"))
    tr.graphs = True  # what a CUDA device sets
    tr._compiled(tr.model.loss)
    assert calls == [{"mode": "reduce-overhead", "dynamic": False}]
    outputs = []
    tr.score_fn = None
    real = tr.model.score
    monkeypatch.setattr(tr.model, "score", lambda b: outputs.append(real(b)) or outputs[-1])
    assert tr.evaluate("valid") == Trainer(ci_config(tmp_path, model="sasrec", device="cpu")).evaluate("valid")
    assert calls[-1] == {"mode": "reduce-overhead", "dynamic": False} and len(calls) == 2 and outputs
    tr.graphs = False
    tr.cfg.model.compile = True
    tr._compiled(tr.model.loss)
    assert calls[-1] == {}  # compile=true alone: the default mode


def test_corrupted_or_truncated_checkpoint_is_refused(tmp_path):
    path = tmp_path / "ck.pt"
    save_checkpoint(path, {"x": list(range(1000))})
    assert load_checkpoint(path)["x"][-1] == 999
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        load_checkpoint(path)
    flipped = bytearray(raw)
    flipped[-10] ^= 0xFF
    path.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match="checksum"):
        load_checkpoint(path)
    assert not list(tmp_path.glob(".*tmp*")), "no temporary file left behind"


class _RunsCodeWhenUnpickled:
    """Unpickling this object calls open(marker, "w"): code a checkpoint must never run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_a_checkpoint_carrying_a_pickled_object_is_refused_without_running_it(tmp_path):
    """Catches checkpoints unpickled with weights_only=False: a valid header and checksum over a payload
    that would run code must raise CheckpointError before anything runs."""
    marker = tmp_path / "ran"
    buf = io.BytesIO()
    torch.save({"model": {}, "epoch": 1, "extra": _RunsCodeWhenUnpickled(marker)}, buf)
    payload = buf.getvalue()
    path = tmp_path / "ck.pt"
    path.write_bytes(train._MAGIC + hashlib.sha256(payload).digest() + payload)
    with pytest.raises(CheckpointError, match=r"ck.pt: holds a pickled object .*open.*could run code"):
        load_checkpoint(path)
    assert not marker.exists(), "the pickled call ran"


def test_rng_states_round_trip_through_a_checkpoint(tmp_path):
    """Catches an RNG state (python, numpy with a cached Gaussian, torch, the data generator) lost or
    changed on its way through a weights-only checkpoint."""
    gen = torch.Generator().manual_seed(5)
    random.random(), np.random.standard_normal(), torch.rand(1), torch.rand(1, generator=gen)
    assert np.random.get_state(legacy=False)["has_gauss"] == 1, "a cached Gaussian is part of numpy's state"
    save_checkpoint(tmp_path / "ck.pt", {"rng": train._rng_state(gen)})

    def draws():
        return (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist(),
                torch.rand(3, generator=gen).tolist())
    first = draws()
    train._set_rng_state(load_checkpoint(tmp_path / "ck.pt")["rng"], gen)
    assert draws() == first


def test_checkpoint_of_another_config_is_refused(tmp_path):
    Trainer(ci_config(tmp_path, epochs=1), tmp_path / "run").fit()
    with pytest.raises(CheckpointError, match="another config"):
        Trainer(ci_config(tmp_path, epochs=1, lr=0.5), tmp_path / "run").fit(resume=True)


def test_evaluating_a_checkpoint_twice_is_identical(tmp_path):
    Trainer(ci_config(tmp_path, epochs=2), tmp_path / "run").fit()
    assert main(["evaluate", "--run", str(tmp_path / "run")]) == 0
    from m3bsr.train import evaluate_run
    first, second = evaluate_run(tmp_path / "run"), evaluate_run(tmp_path / "run")
    assert first == second
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert first["test"] == saved["test"]


def test_evaluate_with_fewer_inference_steps(tmp_path):
    """evaluate --set inference_steps=n scores the run's checkpoint with an n-step chain: the same
    metrics as a model built with that field and given the checkpoint's weights."""
    from m3bsr.train import evaluate_run
    run = tmp_path / "run"
    saved = Trainer(ci_config(tmp_path, model="m3bsr", epochs=1), run).fit()  # ci profile: T = 5
    assert evaluate_run(run, "cpu", {"inference_steps": "5"})["test"] == saved["test"]
    short = Trainer(ci_config(tmp_path, model="m3bsr", epochs=1, inference_steps=1))
    short.model.load_state_dict(load_checkpoint(run / "best.pt")["model"])
    one = short.evaluate("test")
    assert one != saved["test"]  # one step scores differently from T...
    assert evaluate_run(run, "cpu", {"inference_steps": "1"})["test"] == one  # ...and evaluate sees that
    with pytest.raises(ConfigError, match="not lr"):
        evaluate_run(run, "cpu", {"lr": "0.5"})
    with pytest.raises(ConfigError, match="eval_batch_size"):
        evaluate_run(run, "cpu", {"eval_batch_size": "0"})
    assert main(["evaluate", "--run", str(run), "--set", "inference_steps=9"]) == 2  # > T


def _rss_mib() -> float:
    from m3bsr.bench import _rss_kib
    return _rss_kib("VmRSS") / 1024


class _Mallinfo2(ctypes.Structure):  # glibc's struct mallinfo2 (<malloc.h>, glibc >= 2.33)
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _heap_free_mib() -> float:
    """Free memory inside glibc's heaps (every arena), resident or not: a block larger than this
    cannot reuse any of it."""
    libc = train._glibc()
    libc.mallinfo2.restype = _Mallinfo2
    return libc.mallinfo2().fordblks / 2 ** 20


def _freed_mib(mib: float) -> float:
    """What freeing a touched tensor of ``mib`` MiB gives back to the system."""
    x = torch.ones(int(mib * 2 ** 18))
    before = _rss_mib()
    del x
    return before - _rss_mib()


@pytest.mark.skipif(not hasattr(train._glibc(), "mallinfo2"),
                    reason="kept_host_memory changes glibc's malloc only; the test reads glibc >= 2.33's mallinfo2")
def test_kept_host_memory_keeps_freed_memory_until_the_outermost_block_ends():
    # Outside a block, glibc maps a large allocation afresh and unmaps it when freed, unless a free
    # chunk of its heap fits it (earlier tests leave some): so the outside checks ask for more than that.
    assert _freed_mib(_heap_free_mib() + 64) > 48
    with kept_host_memory():
        with kept_host_memory():
            assert _freed_mib(64) < 8  # kept in the process for the next allocation
        assert _freed_mib(64) < 8  # an inner block's end changes nothing
        x = torch.ones(64 * 2 ** 18)
        del x
        before = _rss_mib()
    assert before - _rss_mib() > 48  # the outermost end hands it back
    assert _freed_mib(_heap_free_mib() + 64) > 48  # and glibc maps and unmaps large blocks again


@pytest.mark.parametrize("model", [m for m in MODELS if MODELS[m].trainable])
def test_kept_host_memory_changes_no_number(tmp_path, monkeypatch, model):
    """Reused memory is not zeroed as fresh pages are: a train epoch or an evaluation that read memory
    it never wrote would differ here. One thread, as two split some reductions differently from run
    to run."""
    def epoch_and_ranks():
        tr = Trainer(ci_config(tmp_path, model=model))
        losses = tr.train_epoch()
        return losses, tr.ranks("valid")[0], [p.detach().clone() for p in tr.model.parameters()]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        kept = epoch_and_ranks()
        monkeypatch.setattr(train, "_glibc", lambda: None)  # kept_host_memory does nothing
        plain = epoch_and_ranks()
    finally:
        torch.set_num_threads(threads)
    assert kept[0] == plain[0] and kept[1].equal(plain[1])
    assert all(a.equal(b) for a, b in zip(kept[2], plain[2]))


def test_all_items_scored_equal_gives_zero_hits(tmp_path):
    """The popularity model with no training targets scores everything 0: pessimistic ties -> HR = 0."""
    tr = Trainer(ci_config(tmp_path, model="pop"))
    tr.model.counts.zero_()
    m = tr.evaluate("test")
    assert m["HR@10"] == 0.0 and m["sampled_HR@10"] == 0.0


@pytest.mark.parametrize("eval_batch_size", [512, 7])
def test_mask_seen_leaves_out_every_item_seen_before_the_target(tmp_path, eval_batch_size):
    """A stub scores every item the user met before the target (in any behaviour, also before the
    max_len window) 10 and the target 5: with mask_seen every target ranks first, even one the user
    met before; without it the seen items rank above it. Batches of 7 rows: each evaluation batch
    masks its own rows' seen items."""
    tr = Trainer(ci_config(tmp_path, model="pop", max_len=3, mask_seen=True, eval_batch_size=eval_batch_size))
    test, df, n = tr.seq.split("test"), tr.ds.interactions, tr.ds.n_items
    seen = torch.zeros(len(test["users"]), n + 1)
    for r, (u, t) in enumerate(zip(test["users"].tolist(), test["target_times"][:, 0].tolist())):
        seen[r, df.item[(df.user == u) & (df.timestamp < t)].tolist()] = 10.0
    row = {u: r for r, u in enumerate(test["users"].tolist())}  # one test row per user

    class Stub(torch.nn.Module):
        def score(self, b):
            s = seen[[row[u] for u in b["users"].tolist()]].clone()
            return s.scatter_(1, b["targets"][:, :1], 5.0)

    tr.model = Stub()
    assert len(test["users"]) > 7  # several batches of 7
    assert (seen[range(len(seen)), test["targets"][:, 0]] > 0).any()  # some targets were met before
    assert tr.ranks("test")[0].eq(1).all()
    tr.cfg.train.mask_seen = False
    assert tr.ranks("test")[0].gt(4).all()  # ci users met more items than the 3-event windows hold


def test_validation_every_eval_steps_and_at_the_end_of_the_budget(tmp_path):
    """eval_steps=4 and a budget of 10 steps (3 steps per epoch) validate after steps 4, 8 and 10: one
    history row each, with the epochs made and the seconds the steps took. An epochs cap of 2 ends the
    budget at step 6. Catches the last steps left unvalidated and the epoch cap ignored."""
    res = Trainer(ci_config(tmp_path, max_steps=10, eval_steps=4), tmp_path / "run").fit()
    rows = list(csv.DictReader((tmp_path / "run" / "history.csv").open()))
    assert [(r["step"], r["epoch"]) for r in rows] == [("4", "1.333"), ("8", "2.667"), ("10", "3.333")]
    assert all(r["valid_NDCG@10"] and float(r["seconds"]) > 0 for r in rows)
    assert res["best_step"] in (4, 8, 10) and res["best_epoch"] == round(res["best_step"] / 3, 3)
    capped = Trainer(ci_config(tmp_path, epochs=2, max_steps=10, eval_steps=4))
    capped.fit()
    assert (capped.steps, capped.epoch, capped.batch) == (6, 2, 0) and [r["step"] for r in capped.history] == [4, 6]


def test_a_fresh_run_leaves_no_earlier_results_beside_its_config(tmp_path):
    run = tmp_path / "run"
    Trainer(ci_config(tmp_path, epochs=1), run).fit()
    again = Trainer(ci_config(tmp_path, epochs=1, lr=0.01), run)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    again.train_steps = crash
    with pytest.raises(KeyboardInterrupt):
        again.fit()
    assert json.loads((run / "config.json").read_text())["train"]["lr"] == 0.01
    assert not (run / "metrics.json").exists() and not (run / "history.csv").exists()


def test_cli_end_to_end_on_synthetic(tmp_path):
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "m3bsr", "train", "--dataset", "synthetic", "--model", "sasrec",
                        "--profile", "ci", "--epochs", "2", "--out", str(out),
                        "--set", f"cache_dir={tmp_path / 'cache'}"],
                       capture_output=True, text=True, cwd=tmp_path, env=_env())
    assert r.returncode == 0, r.stderr
    m = json.loads((out / "metrics.json").read_text())
    assert set(m) >= {"valid", "test"}
    for k in ("HR@5", "HR@10", "HR@20", "NDCG@5", "NDCG@10", "NDCG@20", "MRR"):
        assert 0.0 <= m["test"][k] <= 1.0
    assert m["test"]["HR@10"] > 10 / 200  # above chance on the ci profile's 200 items
    assert (out / "config.json").exists() and (out / "best.pt").exists() and (out / "history.csv").exists()
    validations = [line for line in r.stderr.splitlines() if "| valid NDCG@10" in line]  # the trainer's log lines
    assert len(validations) == 2 and "step 6/6 epoch 2.00 | loss " in validations[-1], r.stderr
    assert (out / "train.log").read_text().count("| valid NDCG@10") == 2


def test_cli_end_to_end_on_a_generic_csv(tmp_path):
    from m3bsr.config import DataConfig
    from m3bsr.data.synthetic import make_synthetic
    ds = make_synthetic(DataConfig(syn_users=80, syn_items=60, syn_events=30))
    df = ds.interactions
    csv = tmp_path / "events.csv"
    with open(csv, "w") as f:
        f.write("user_id,item_id,behavior,timestamp\n")
        for u, i, lv, t in df[["user", "item", "level", "timestamp"]].itertuples(index=False):
            f.write(f"u{u},i{i},{'view' if lv == 0 else 'buy'},{t}\n")
    out = tmp_path / "run"
    assert main(["train", "--data-file", str(csv), "--deep", "buy", "--model", "sasrec-mm", "--profile", "ci",
                 "--epochs", "1", "--out", str(out), "--set", f"cache_dir={tmp_path / 'cache'}"]) == 0
    assert json.loads((out / "metrics.json").read_text())["test"]["HR@20"] > 20 / 60  # above chance (60 items)


def test_cli_reports_bad_input_clearly(tmp_path, capsys):
    csv = tmp_path / "bad.csv"
    csv.write_text("user_id,item_id,behavior,timestamp\nu1,i1,view,4\nu1,i1,buy,5\nu1,i1,buy,notatime\n")
    assert main(["train", "--data-file", str(csv), "--deep", "buy", "--model", "sasrec", "--profile", "ci",
                 "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "bad.csv" in err and "line" in err
    with pytest.raises(SystemExit) as exited:  # argparse: --model takes the registry's names only
        main(["train", "--dataset", "synthetic", "--model", "nope", "--profile", "ci", "--out", str(tmp_path / "run2")])
    assert exited.value.code == 2 and "invalid choice: 'nope'" in capsys.readouterr().err
    syn = ["train", "--dataset", "synthetic", "--model", "sasrec", "--profile", "ci"]
    for args, words in ((["--set", "cdbd", "--out", str(tmp_path / "r")], "KEY=VALUE"),
                        (["--seed", "-1", "--out", str(tmp_path / "r")], "'seed' must be in 0..4294967295"),
                        (["--out", str(csv)], "exists and is not a folder")):
        assert main(syn + args) == 2
        assert "m3bsr: error: " in (err := capsys.readouterr().err) and words in err, err
    (tmp_path / "notarun").mkdir()
    (tmp_path / "notarun" / "config.json").write_text("{}")
    assert main(["evaluate", str(tmp_path / "notarun")]) == 2
    assert "not an m3bsr run config" in capsys.readouterr().err


@pytest.mark.parametrize("section, key, value, words", [("model", "T", 0, "'T' must be >= 1"),
                                                        ("model", "schedule", "cosin", "'schedule' must be one of"),
                                                        ("train", "lr", -0.1, "'lr' must be >= 0.0"),
                                                        ("train", "learning_rate", 0.1, "unknown config field")])
def test_an_edited_run_config_is_checked_like_set(tmp_path, section, key, value, words):
    """A hand-edited config.json is refused by name and field, not read as a config it never was."""
    cfg = make_config("ci")
    assert train.Config.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    d = cfg.to_dict()
    d[section][key] = value
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(CheckpointError, match=f"config.json: not an m3bsr run config .*{words}"):
        train.run_config(tmp_path)


def test_best_checkpoint_is_the_argmax_of_validation(tmp_path):
    run = tmp_path / "run"
    res = Trainer(ci_config(tmp_path, max_steps=12, eval_steps=3, lr=0.005), run).fit()
    rows = list(csv.DictReader((run / "history.csv").open()))
    vals = [float(r["valid_NDCG@10"]) for r in rows]
    assert res["valid"]["NDCG@10"] == max(vals) and res["best_step"] == int(rows[vals.index(max(vals))]["step"])


def test_test_is_evaluated_once_from_the_best_checkpoint(tmp_path, monkeypatch):
    """Validation, scripted to peak at step 3 while training goes on, picks the checkpoint; test is read once."""
    calls, real = [], Trainer.evaluate

    def scripted(self, split):
        calls.append(split)
        out = real(self, split)
        if split == "valid" and len(calls) <= 4:  # the 4 validations of training, not the final evaluation
            out["NDCG@10"] = 1.0 / self.steps
        return out

    real_ranks = Trainer.ranks

    def ranks(self, split):  # the final evaluation: the ranks behind metrics.json and ranks.npz
        calls.append(split)
        return real_ranks(self, split)

    monkeypatch.setattr(Trainer, "evaluate", scripted)
    monkeypatch.setattr(Trainer, "ranks", ranks)
    tr = Trainer(ci_config(tmp_path, max_steps=12, eval_steps=3), tmp_path / "run")
    res = tr.fit()
    assert calls.count("test") == 1 and calls[-1] == "test" and res["best_step"] == 3
    best = train.load_checkpoint(tmp_path / "run" / "best.pt")["model"]
    assert all(torch.equal(v, best[k]) for k, v in tr.model.state_dict().items()), "test read from best.pt's weights"


def test_negatives_are_unseen_items_shared_by_models_and_popularity_counts_training_targets(tmp_path):
    # b draws its own (another cache folder): the same items, from the fixed negatives seed
    a = Trainer(ci_config(tmp_path, model="pop"))
    b = Trainer(ci_config(tmp_path, seed=3, cache_dir=str(tmp_path / "b")))
    for split in ("valid", "test"):
        neg, rows = a.negatives[split], a.seq.split(split)
        assert torch.equal(neg, b.negatives[split])
        for r, u in enumerate(rows["users"].tolist()):
            assert not set(neg[r].tolist()) & set(a.seq.seen[u].tolist())  # never an item the user met
            assert int(rows["targets"][r, 0]) not in neg[r].tolist()
    assert torch.equal(a.negatives["valid"], a.negatives["test"])  # per user: the same for both rows
    expected = torch.bincount(a.seq.train["targets"].flatten(), minlength=a.ds.n_items + 1).float()
    expected[0] = 0
    assert torch.equal(a.info.item_counts, expected), "item statistics count training targets only"


def test_cli_stats_reads_the_same_data_options_as_train(tmp_path, capsys):
    csv = tmp_path / "log.csv"
    csv.write_text("user_id,item_id,behavior,timestamp\nu1,i1,view,1\nu1,i2,cart,2\nu1,i3,buy,3\nu2,i1,buy,4\n")
    assert main(["stats", "--data-file", str(csv), "--levels", "view|cart|buy"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["users"], out["items"], out["#view"], out["#cart"], out["#buy"]) == (2, 3, 1, 1, 2)
    assert "modalities" not in out  # stats loads no features
    assert main(["stats", "--dataset", "synthetic", "--profile", "ci", "--set", "syn_users=40"]) == 0
    assert json.loads(capsys.readouterr().out)["users"] == 40


def _env():
    import os
    return {**os.environ, "PYTHONPATH": str(REPO / "lib")}


def test_negatives_avoid_items_met_in_any_behaviour_and_never_repeat(tmp_path):
    """Sampled negatives are items the user never met at any level (read from the interactions, not
    from seq.seen), and n distinct items per row when the user left at least n unseen."""
    tr = Trainer(ci_config(tmp_path, model="pop"))
    met = tr.ds.interactions.groupby("user").item.agg(set)
    for split in ("valid", "test"):
        neg = tr.negatives[split]
        for r, u in enumerate(tr.seq.split(split)["users"].tolist()):
            assert not set(neg[r].tolist()) & met[u]
            if tr.ds.n_items - len(met[u]) >= neg.shape[1]:
                assert len(set(neg[r].tolist())) == neg.shape[1]


def test_a_user_who_met_every_item_gets_negatives_other_than_the_target(tmp_path):
    csv = tmp_path / "log.csv"
    csv.write_text("user_id,item_id,behavior,timestamp\nu1,a,buy,1\nu1,b,buy,2\nu1,c,buy,3\nu1,d,buy,4\n")
    seq = SequenceData(load_csv(csv, deep="buy"), max_len=5, min_deep=3)
    neg, target = train.sampled_negatives(seq, "test", 20, tmp_path / "cache"), int(seq.test["targets"][0, 0])
    assert neg.shape == (1, 20) and set(neg[0].tolist()) == {1, 2, 3, 4} - {target}


@pytest.mark.parametrize("buys, hint", [(2, True), (1, False)])
def test_no_evaluable_user_names_the_most_deep_events_any_user_has(tmp_path, buys, hint):
    """Catches the error saying only that nobody reaches min_deep: it must give the best user's count of deep events,
    and point at min_deep=<that count> when it is at least 2 (which then evaluates those users)."""
    rows = [f"u{u},i{k},{'buy' if k < buys else 'pv'},{k}" for u in range(3) for k in range(4)]
    (tmp_path / "log.csv").write_text("user_id,item_id,behavior,timestamp\n" + "\n".join(rows) + "\n")
    cfg = ci_config(tmp_path, dataset="csv", data_file=str(tmp_path / "log.csv"), deep="buy", sampled_negatives=0)
    expected = f"no user has 3 or more events of the deep level 'deep', the most any user has is {buys}:"
    with pytest.raises(DataError, match=expected) as err:
        Trainer(cfg)
    assert ("min_deep=2" in str(err.value)) == hint
    if hint:
        cfg.set("min_deep", 2)
        assert Trainer(cfg).seq.n_eval_users == 3


def _target_stub(n_items: int, value: float) -> torch.nn.Module:
    """A model scoring each row's target ``value`` and every other item 0."""
    class Stub(torch.nn.Module):
        def score(self, b):
            return torch.zeros(len(b["users"]), n_items + 1).scatter_(1, b["targets"][:, :1], value)
    return Stub()


def test_sampled_ranks_rank_the_target_among_its_negatives(tmp_path):
    """1 + n sampled ranking ranks the row's target: scored above everything it is first, scored
    below everything it is last (1 + n), in the full and the sampled ranking alike."""
    tr = Trainer(ci_config(tmp_path, model="pop"))
    n = tr.negatives["test"].shape[1]
    tr.model = _target_stub(tr.ds.n_items, 1.0)
    full, sampled = tr.ranks("test")
    assert full.eq(1).all() and sampled.eq(1).all()
    tr.model = _target_stub(tr.ds.n_items, -1.0)
    full, sampled = tr.ranks("test")
    assert full.eq(tr.ds.n_items).all() and sampled.eq(1 + n).all()


def test_evaluation_builds_no_autograd_graph(tmp_path):
    """split_ranks scores under torch.no_grad: evaluation never keeps activations for a backward pass."""
    tr = Trainer(ci_config(tmp_path, model="pop"))
    grad = []

    class Stub(torch.nn.Module):
        def score(self, b):
            grad.append(torch.is_grad_enabled())
            return torch.zeros(len(b["users"]), tr.ds.n_items + 1)

    tr.model = Stub()
    tr.ranks("valid")
    assert grad and not any(grad)


def _scripted_validation(monkeypatch, values: Callable[[int], float]):
    """Validation NDCG@10 after step s is values(s) (the rest of the metrics as measured)."""
    real = Trainer.evaluate

    def scripted(self, split):
        out = real(self, split)
        if split == "valid" and self.steps:
            out["NDCG@10"] = values(self.steps)
        return out
    monkeypatch.setattr(Trainer, "evaluate", scripted)


def _die_in_third_stretch(tr: Trainer) -> None:
    """Run ``tr.fit()`` until the process dies (KeyboardInterrupt) as it starts its third stretch of steps
    between validations: last.pt holds the second validation."""
    real, calls = tr.train_steps, []

    def crash_in_third_stretch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)
    tr.train_steps = crash_in_third_stretch
    with pytest.raises(KeyboardInterrupt):
        tr.fit()


def test_a_run_resumed_after_its_best_validation_ends_with_the_best_weights(tmp_path, monkeypatch):
    """Validation every 3 steps, scripted to peak at step 3; the run dies after step 6 and is resumed:
    the weights test is read from are best.pt's (step 3), not the last step's."""
    _scripted_validation(monkeypatch, lambda step: 1.0 / step)
    _die_in_third_stretch(Trainer(ci_config(tmp_path, max_steps=12, eval_steps=3), tmp_path / "run"))
    tr = Trainer(ci_config(tmp_path, max_steps=12, eval_steps=3), tmp_path / "run")
    res = tr.fit(resume=True)
    assert res["best_step"] == 3 and tr.steps == 12
    best = load_checkpoint(tmp_path / "run" / "best.pt")["model"]
    assert all(torch.equal(v, best[k]) for k, v in tr.model.state_dict().items()), "test read from best.pt's weights"


def test_cli_data_root_and_set_values_holding_an_equals_sign(tmp_path, capsys):
    """Catches --data-root dropped on the way to the config and --set values cut at a second '='."""
    folder = tmp_path / "root" / "taobao-userbehavior-sample"
    folder.mkdir(parents=True)
    (folder / "UserBehavior_sample.csv").write_text("1,10,5,pv,100\n1,11,5,buy,101\n2,10,5,pv,102\n")
    assert main(["stats", "--dataset", "taobao-ub", "--data-root", str(tmp_path / "root")]) == 0
    assert json.loads(capsys.readouterr().out)["users"] == 2
    csv = tmp_path / "a=b.csv"
    csv.write_text("user_id,item_id,behavior,timestamp\nu1,i1,view,1\nu1,i2,buy,2\n")
    assert main(["stats", "--dataset", "csv", "--deep", "buy", "--set", f"data_file={csv}"]) == 0
    assert json.loads(capsys.readouterr().out)["#deep"] == 1


def test_cli_evaluate_refuses_a_run_given_twice(tmp_path):
    """Catches evaluate accepting both RUN and --run (and silently using one of them)."""
    with pytest.raises(SystemExit):
        main(["evaluate", str(tmp_path / "a"), "--run", str(tmp_path / "b")])


def test_the_seed_sets_the_initial_weights_and_the_data_order(tmp_path):
    """Catches the weights initialised, or the training rows shuffled, the same whatever the seed."""
    a, b, again = (Trainer(ci_config(tmp_path, seed=s)) for s in (0, 1, 0))

    def weights(tr):
        return list(tr.model.state_dict().values())

    def first_batch(tr):
        return next(train.shard_batches(tr.seq.train, 8, tr.gen))[0]
    assert all(torch.equal(x, y) for x, y in zip(weights(a), weights(again)))
    assert not all(torch.equal(x, y) for x, y in zip(weights(a), weights(b)))
    order_a, order_again, order_b = (first_batch(tr) for tr in (a, again, b))
    assert torch.equal(order_a, order_again) and not torch.equal(order_a, order_b)


def test_the_optimiser_takes_the_configured_lr_and_weight_decay(tmp_path):
    """Catches Adam built with a fixed learning rate or without the weight decay of the config."""
    group = Trainer(ci_config(tmp_path, lr=0.004, weight_decay=0.01)).opt.param_groups[0]
    assert (group["lr"], group["weight_decay"]) == (0.004, 0.01)


def test_loss_terms_are_the_means_over_the_steps(tmp_path):
    """Five steps across an epoch's end (3 steps per epoch). Catches the history's loss terms reported as
    sums over the steps instead of means, or over the epoch's steps only."""
    tr = Trainer(ci_config(tmp_path))
    steps, real = [], tr.model.loss

    def recording(batch):
        out = real(batch)
        steps.append({k: v.item() for k, v in out.items()})
        return out
    tr.model.loss = recording
    means = tr.train_steps(5)
    assert len(steps) == 5 and tr.epoch == 1 and means.keys() == steps[0].keys()
    for k in means:
        assert means[k] == pytest.approx(sum(s[k] for s in steps) / len(steps), rel=1e-5)


def test_bf16_trains_under_autocast(tmp_path):
    """Catches the bf16 setting ignored by the training step (it ran in float32)."""
    tr = Trainer(ci_config(tmp_path, bf16=True))
    seen, real = [], tr.model.loss
    tr.model.loss = lambda batch: seen.append(torch.is_autocast_enabled("cpu")) or real(batch)
    tr.train_steps(1)
    assert seen == [True]


def test_max_steps_stops_after_exactly_that_many_steps(tmp_path):
    """Catches one optimiser step more than max_steps, a budget that waits for the epoch's end, and the
    last steps left unvalidated because eval_steps does not divide the budget."""
    tr = Trainer(ci_config(tmp_path, max_steps=3, batch_size=16, eval_steps=2))
    assert tr.steps_per_epoch > 3  # an epoch is longer than the budget
    tr.fit()
    assert (tr.steps, tr.epoch, tr.batch) == (3, 0, 3)
    assert [r["step"] for r in tr.history] == [2, 3] and tr.best_step in (2, 3)


@pytest.mark.parametrize("eval_steps, min_steps, values, stop, best", [
    (2, 0, {2: 0.1, 4: 0.2, 6: 0.15, 8: 0.3, 10: 0.25, 12: 0.2}, 12, 8),
    (2, 16, {2: 0.1, 4: 0.2, 6: 0.15, 8: 0.3, 10: 0.25, 12: 0.2}, 16, 8),
    (3, 0, {3: 0.2}, 9, 3),
])
def test_early_stopping_counts_steps_since_the_last_improvement(tmp_path, monkeypatch, eval_steps, min_steps,
                                                                 values, stop, best):
    """patience_steps=4: training stops at the first validation 4 or more steps after the best one, never
    before min_steps (unlisted steps validate at 0.05). Catches the count not reset by an improvement,
    counted in validations, a validation too many or too few, and min_steps ignored."""
    _scripted_validation(monkeypatch, lambda step: values.get(step, 0.05))
    tr = Trainer(ci_config(tmp_path, eval_steps=eval_steps, patience_steps=4, min_steps=min_steps, max_steps=40),
                 tmp_path / "run")
    res = tr.fit()
    assert tr.steps == stop and res["best_step"] == best


def test_a_resumed_run_keeps_its_patience_count_and_step_count(tmp_path, monkeypatch):
    """Validation every 3 steps peaks at step 3; the run dies after step 6 and is resumed. Patience 6:
    it stops at step 9. Catches the steps since the best, or the optimiser steps, counted from zero again."""
    _scripted_validation(monkeypatch, lambda step: 1.0 / step)

    def config():
        return ci_config(tmp_path, eval_steps=3, patience_steps=6, min_steps=0, max_steps=30)
    _die_in_third_stretch(Trainer(config(), tmp_path / "run"))
    tr = Trainer(config(), tmp_path / "run")
    tr.fit(resume=True)
    assert tr.steps == 9 and [r["step"] for r in tr.history] == [3, 6, 9]


def test_a_checkpoint_of_other_data_under_the_same_config_is_refused(tmp_path):
    """Catches the data hash not checked: the same config over changed data (a timestamp moved) resumes."""
    import dataclasses

    from m3bsr.train import load_data
    cfg = ci_config(tmp_path, epochs=1)
    Trainer(cfg, tmp_path / "run").fit()
    ds = load_data(cfg)
    df = ds.interactions.copy()
    df.loc[df.index[-1], "timestamp"] += 1
    with pytest.raises(CheckpointError, match="another dataset"):
        Trainer(cfg, tmp_path / "run", dataset=dataclasses.replace(ds, interactions=df)).resume()


def test_metrics_json_without_test_metrics_is_not_a_finished_run(tmp_path):
    """Catches a metrics.json with validation metrics alone taken for a finished run."""
    cfg = ci_config(tmp_path)
    out = train.run_dir(cfg, tmp_path / "runs")
    out.mkdir(parents=True)
    (out / "metrics.json").write_text(json.dumps({"valid": {"NDCG@10": 0.1}, "test": {}}))
    with pytest.raises(CheckpointError, match="metrics.json"):
        train.train_cached(cfg, tmp_path / "runs")


def test_resume_rewrites_the_history_of_the_checkpointed_validations(tmp_path):
    """A crash between last.pt and history.csv leaves the history a validation short; resuming a run whose
    last validation is checkpointed trains nothing more. Catches the history not rewritten from the checkpoint."""
    run = tmp_path / "run"
    Trainer(ci_config(tmp_path, max_steps=8, eval_steps=4), run).fit()
    lines = (run / "history.csv").read_text().splitlines()
    assert len(lines) == 3
    (run / "history.csv").write_text("\n".join(lines[:2]) + "\n")  # the last validation's row never written
    Trainer(ci_config(tmp_path, max_steps=8, eval_steps=4), run).fit(resume=True)
    assert (run / "history.csv").read_text().splitlines() == lines


def test_each_validation_logs_one_line_to_the_logger_and_to_train_log(tmp_path, caplog):
    """One ``m3bsr.train`` record per validation: step, epoch, the loss terms' means since the last
    validation, validation NDCG@10, the best so far and the patience left; the same lines are appended to
    <run>/train.log (a resumed run adds its own), and the trainer's file handler is gone after the run."""
    import logging
    run = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="m3bsr.train"):
        tr = Trainer(ci_config(tmp_path, model="m3bsr", max_steps=8, eval_steps=4, patience_steps=6), run)
        tr.fit()
    lines = [r.getMessage() for r in caplog.records if r.name == "m3bsr.train" and "| valid NDCG@10" in r.getMessage()]
    assert len(lines) == 2
    row = tr.history[0]
    assert lines[0].startswith(f"step 4/8 epoch 1.33 | loss {row['loss']:.4f} ce {row['ce']:.4f} modality ")
    assert f"valid NDCG@10 {row['valid_NDCG@10']:.4f} | best {row['valid_NDCG@10']:.4f} at step 4 | " in lines[0]
    assert "patience 6/6 steps left, no stop before step 8 |" in lines[0]  # ci profile: min_steps 8
    logged = (run / "train.log").read_text()
    assert all(line in logged for line in lines) and "stopped at step 8 (budget of 8 steps spent)" in logged
    assert not logging.getLogger("m3bsr.train").handlers
    Trainer(ci_config(tmp_path, model="m3bsr", max_steps=8, eval_steps=4, patience_steps=6), run).fit(resume=True)
    again = (run / "train.log").read_text()
    assert again.startswith(logged) and "resumed at step 8" in again[len(logged):]


def test_the_progress_bar_shows_in_a_terminal_or_a_notebook_but_not_under_ci(monkeypatch):
    """Catches the bar hidden in Jupyter (stderr is not a terminal there), drawn into a log file, or drawn
    under CI=true or progress=False."""
    monkeypatch.setattr(train, "_in_jupyter", lambda: True)
    monkeypatch.delenv("CI", raising=False)
    assert not train.progress_bar(10, 0, "x", True).disable
    assert train.progress_bar(10, 0, "x", False).disable
    monkeypatch.setenv("CI", "true")
    assert train.progress_bar(10, 0, "x", True).disable
    monkeypatch.delenv("CI")
    monkeypatch.setattr(train, "_in_jupyter", lambda: False)  # pytest's stderr: captured, not a terminal
    assert train.progress_bar(10, 0, "x", True).disable


def test_a_renamed_field_names_its_replacement():
    """Catches an old override (patience counted validations, eval_every epochs) failing without saying
    what replaced it, or being taken with its old meaning."""
    with pytest.raises(ConfigError, match="'patience'; it was replaced by patience_steps"):
        make_config("ci", {"patience": 10})
    d = make_config("ci").to_dict()
    d["train"]["eval_every"] = 1
    with pytest.raises(ConfigError, match="train.eval_every; it was replaced by eval_steps"):
        train.Config.from_dict(d)
