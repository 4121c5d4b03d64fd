"""Crash safety and determinism at the command line (issue #7).

* ``kill -9`` at a random moment of training, then ``--resume``: ``metrics.json`` is byte-identical
  to an uninterrupted run with the same seed.
* A crash while a checkpoint is being written leaves the previous one in place; a truncated
  ``last.pt`` is refused with a clear error, never loaded; ``best.pt`` survives.
* The same command twice gives the same ``metrics.json``; evaluating one checkpoint twice gives
  the same numbers.

Subprocesses run with one thread (OMP_NUM_THREADS=1): the box is small and shared.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from m3bsr.cli import main
from m3bsr.config import make_config
from m3bsr.models.registry import MODELS
from m3bsr.train import Trainer, load_checkpoint, remove_stale_temporaries

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 180


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO / "lib"), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def train_cmd(out: Path, cache: Path, model: str = "sasrec", epochs: int = 2, *extra: str) -> list[str]:
    return [sys.executable, "-m", "m3bsr", "train", "--dataset", "synthetic", "--model", model, "--profile", "ci",
            "--epochs", str(epochs), "--seed", "3", "--out", str(out), "--set", f"cache_dir={cache}", *extra]


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env(), timeout=TIMEOUT)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def wait_for(condition, what: str, proc: subprocess.Popen, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"training ended (rc {proc.returncode}) before {what}: {proc.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.005)


def kill_at_random_moment(cmd: list[str], out: Path, rng: random.Random, tmp_path: Path) -> float:
    """Start ``cmd``, wait until it saves a (new) last.pt, sleep a random delay, SIGKILL it."""
    last = out / "last.pt"
    before = last.stat().st_mtime_ns if last.exists() else None
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                            env=env())
    try:
        wait_for(lambda: last.exists() and last.stat().st_mtime_ns != before, "a new last.pt", proc)
        delay = rng.uniform(0.0, 0.5)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL, "the run finished before the kill: make it longer"
    assert not (out / "metrics.json").exists()
    return delay


def test_sigkill_at_a_random_moment_then_resume_gives_identical_metrics(tmp_path):
    # 40 epochs of 3 steps, long enough that a kill always lands mid-training; validation (and last.pt)
    # every 2 steps, so most checkpoints fall inside an epoch
    epochs, steps = 40, 120
    extra = ("--set", f"max_steps={steps}", "--set", "patience_steps=1000", "--set", "eval_steps=2")
    cache = tmp_path / "cache"
    run(train_cmd(tmp_path / "full", cache, "sasrec", epochs, *extra), tmp_path)

    cut = tmp_path / "cut"
    cmd = train_cmd(cut, cache, "sasrec", epochs, *extra)
    seed = random.randrange(2 ** 32)
    rng = random.Random(seed)
    delays = [kill_at_random_moment(cmd, cut, rng, tmp_path)]  # killed in the first run
    first_step = load_checkpoint(cut / "last.pt")["steps"]
    delays.append(kill_at_random_moment([*cmd, "--resume"], cut, rng, tmp_path))  # and again while resuming
    assert 2 <= first_step <= load_checkpoint(cut / "last.pt")["steps"] < steps, (seed, delays)
    run([*cmd, "--resume"], tmp_path)

    same = (cut / "metrics.json").read_bytes() == (tmp_path / "full" / "metrics.json").read_bytes()
    assert same, f"resumed metrics differ (kill rng seed {seed}, delays {delays})"
    assert "seconds" not in (cut / "metrics.json").read_text()
    full_hist = (tmp_path / "full" / "history.csv").read_text().splitlines()
    cut_hist = (cut / "history.csv").read_text().splitlines()
    assert len(cut_hist) == len(full_hist) == steps // 2 + 1
    assert [r.rsplit(",", 1)[0] for r in cut_hist] == [r.rsplit(",", 1)[0] for r in full_hist]  # all but seconds
    assert not [p for p in cut.iterdir() if ".tmp" in p.name], "no temporary file left behind"


def ci_config(tmp_path: Path, **over):
    return make_config("ci", {"dataset": "synthetic", "cache_dir": str(tmp_path / "cache"), "progress": False,
                              "model": "sasrec", "patience_steps": 100, **over})


def test_crash_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    full = Trainer(ci_config(tmp_path, max_steps=9, eval_steps=2), tmp_path / "full").fit()
    out2 = tmp_path / "run"
    tr = Trainer(ci_config(tmp_path, max_steps=9, eval_steps=2), out2)
    import m3bsr.files as files_mod
    real_replace, saves = os.replace, []

    def dying_replace(src, dst):  # the process dies in the middle of the 3rd validation's last.pt write
        if Path(dst).name == "last.pt":
            saves.append(dst)
            if len(saves) == 3:
                raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(files_mod.os, "replace", dying_replace)
    with pytest.raises(KeyboardInterrupt):
        tr.fit()
    monkeypatch.setattr(files_mod.os, "replace", real_replace)
    assert load_checkpoint(out2 / "last.pt")["steps"] == 4, "the previous good last.pt is still there"
    assert not list(out2.glob(".*.tmp*")), "an interrupted write removes its temporary file"
    # a SIGKILL leaves the temporary file behind: plant one, half written, next to the real checkpoint
    stray = out2 / f".last.pt.tmp{os.getpid() + 1}"
    stray.write_bytes((out2 / "last.pt").read_bytes()[:1000])
    resumed = Trainer(ci_config(tmp_path, max_steps=9, eval_steps=2), out2).fit(resume=True)
    assert not stray.exists(), "stale temporaries are removed on restart"
    assert resumed == full
    assert (out2 / "metrics.json").read_bytes() == (tmp_path / "full" / "metrics.json").read_bytes()


def test_truncated_last_checkpoint_is_refused_and_best_survives(tmp_path, capsys):
    out = tmp_path / "run"
    Trainer(ci_config(tmp_path, epochs=2), out).fit()
    metrics = (out / "metrics.json").read_bytes()
    raw = (out / "last.pt").read_bytes()
    (out / "last.pt").write_bytes(raw[: len(raw) // 3])  # e.g. a non-atomic copy, a full disk
    (out / f".last.pt.tmp{os.getpid() + 7}").write_bytes(raw[:100])  # and a writer's leftover
    args = ["train", "--dataset", "synthetic", "--model", "sasrec", "--profile", "ci", "--epochs", "2",
            "--out", str(out), "--set", f"cache_dir={tmp_path / 'cache'}",
            "--set", "progress=false", "--resume"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "last.pt" in err and "truncated or corrupted" in err and "Traceback" not in err
    assert (out / "metrics.json").read_bytes() == metrics, "nothing was trained from the bad checkpoint"
    assert load_checkpoint(out / "best.pt")["steps"] >= 1, "best.pt survives and verifies"
    assert main(["evaluate", "--run", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["test"] == json.loads(metrics)["test"]
    # a checkpoint with a bad header is refused the same way
    (out / "last.pt").write_bytes(b"PK\x03\x04" + raw[8:200])
    assert main(args) == 2 and "not an m3bsr checkpoint" in capsys.readouterr().err


def test_remove_stale_temporaries_only_touches_our_temporaries(tmp_path):
    for name in (".last.pt.tmp123", ".history.csv.tmp9", "last.pt", ".hidden", "notes.tmp1"):
        (tmp_path / name).write_text("x")
    assert sorted(p.name for p in remove_stale_temporaries(tmp_path)) == [".history.csv.tmp9", ".last.pt.tmp123"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hidden", "last.pt", "notes.tmp1"]


def test_a_failed_write_names_its_file_and_keeps_the_old_one(tmp_path, monkeypatch, capsys):
    import errno

    import pandas as pd

    import m3bsr.data.features as features_mod
    import m3bsr.files as files_mod
    from m3bsr import viz
    from m3bsr.data.schema import DataError

    def full_disk(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    old = pd.DataFrame({"a": [1.0, 2.0]})
    viz.save_table(old, "t", tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    monkeypatch.setattr(files_mod.os, "replace", full_disk)
    with pytest.raises(OSError, match="cannot write .*t.csv .No space left"):
        viz.save_table(pd.DataFrame({"a": [3.0] * 1000}), "t", tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before, "old tables kept, no temporary left"
    args = ["train", "--dataset", "synthetic", "--model", "pop", "--profile", "ci", "--out", str(tmp_path / "run"),
            "--set", f"cache_dir={tmp_path / 'cache'}"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "m3bsr: error: " in err and "No space left" in err and "Traceback" not in err, err
    with pytest.raises(DataError, match="feature cache"):  # os.replace is still the full disk
        features_mod.cached("x", ["key"], lambda: {"x": [1.0]}, tmp_path / "cache")
    assert not list((tmp_path / "cache").iterdir()), "no temporary left in the cache folder"


@pytest.mark.parametrize("model", [m for m in ("sasrec", "m3bsr") if m in MODELS])
def test_same_command_twice_gives_identical_metrics(tmp_path, model, capsys):
    cache = tmp_path / "cache"
    a, b = tmp_path / "a", tmp_path / "b"
    run(train_cmd(a, cache, model, 2), tmp_path)
    run(train_cmd(b, cache, model, 2), tmp_path)
    assert (a / "metrics.json").read_bytes() == (b / "metrics.json").read_bytes()
    # and one checkpoint evaluated twice gives the same numbers as the training process reported
    assert main(["evaluate", "--run", str(a), "--device", "cpu"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert main(["evaluate", "--run", str(a), "--device", "cpu"]) == 0
    second = json.loads(capsys.readouterr().out)
    saved = json.loads((a / "metrics.json").read_text())
    assert first == second == {"valid": saved["valid"], "test": saved["test"]}


def test_atomic_write_temporaries_are_named_for_remove_stale_temporaries(tmp_path, monkeypatch):
    """Catches a temporary name that remove_stale_temporaries would not recognise (a killed writer's file stays)."""
    import m3bsr.files as files_mod
    seen, real = [], files_mod.os.replace
    monkeypatch.setattr(files_mod.os, "replace", lambda src, dst: (seen.append(Path(src).name), real(src, dst)))
    files_mod.atomic_write_bytes(tmp_path / "last.pt", b"x")
    assert seen == [f".last.pt.tmp{os.getpid()}"] and (tmp_path / "last.pt").read_bytes() == b"x"
    (tmp_path / seen[0]).write_bytes(b"half")  # as a kill between write and rename would leave it
    assert [p.name for p in remove_stale_temporaries(tmp_path)] == seen


def test_remove_stale_temporaries_leaves_folders_alone(tmp_path):
    """Catches a folder named like a temporary being unlinked (IsADirectoryError at run start)."""
    (tmp_path / ".cache.tmp1").mkdir()
    assert remove_stale_temporaries(tmp_path) == [] and (tmp_path / ".cache.tmp1").is_dir()
