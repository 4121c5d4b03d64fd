"""The RecBole export: every example holds the history our model reads for its target (no RecBole needed)."""
import numpy as np
import pandas as pd
import pytest

from m3bsr.config import make_config
from m3bsr.data.schema import finalize
from m3bsr.data.sequences import SequenceData, history_index
from m3bsr.reference import COLUMNS, SPLITS, export_recbole, recbole_config

L = 5


def one_behaviour(seed=0, users=20, events=30):
    """A single-behaviour log with ties in time (histories hold only strictly earlier events)."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(users):
        t = 0
        for _ in range(int(rng.integers(3, events))):
            t += int(rng.integers(0, 3))
            rows.append((u, int(rng.integers(1, 40)), 0, t, len(rows)))
    ds, _, _ = finalize("toy", pd.DataFrame(rows, columns=["user", "item", "level", "timestamp", "order"]), ["rating"])
    return SequenceData(ds, max_len=L, min_deep=3)


def read(folder, split):
    df = pd.read_csv(folder / f"toy.{split}.inter", sep="\t", dtype=str, keep_default_na=False)
    assert tuple(df.columns) == COLUMNS
    return df.iloc[:, 0].astype(int).tolist(), [[int(i) for i in h.split(" ")] for h in df.iloc[:, 1]], \
        df.iloc[:, 2].astype(int).tolist()


@pytest.fixture
def exported(tmp_path):
    seq = one_behaviour()
    return seq, export_recbole(seq, tmp_path, "toy")


@pytest.mark.parametrize("split", ["valid", "test"])
def test_evaluation_examples_hold_the_evaluation_rows_history(exported, split):
    seq, folder = exported
    users, hist, targets = read(folder, split)
    rows = seq.split(split)
    assert users == rows["users"].tolist() and targets == rows["targets"][:, 0].tolist()
    for r, h in enumerate(hist):
        events = rows["items"][r, 0, 1:]
        assert h == events[events > 0].tolist()  # an evaluation row holds exactly the events the model reads


def test_training_examples_hold_each_training_targets_window(exported):
    seq, folder = exported
    users, hist, targets = read(folder, "train")
    tr = seq.train
    idx = history_index(tr["times"], tr["target_times"])[:, 0]  # (B, K), the single level
    expected = [(int(tr["users"][r]), tr["items"][r, 0, max(1, i - L + 1):i + 1].tolist(), int(tr["targets"][r, k]))
                for r in range(len(tr["users"])) for k in range(tr["targets"].shape[1])
                if tr["targets"][r, k] > 0 for i in [int(idx[r, k])]]
    assert list(zip(users, hist, targets)) == expected
    assert tr["targets"].shape[1] > 1, "toy rows should hold several targets each"


def test_training_examples_are_the_last_L_events_strictly_before_the_target(exported):
    """Against the raw log, not the rows: targets are the events before the validation target with an
    earlier event, each with the (at most L) events of strictly earlier time."""
    seq, folder = exported
    users, hist, targets = read(folder, "train")
    expected = []
    evaluated = set(seq.valid["users"].tolist())
    for u, g in seq.ds.interactions.groupby("user"):
        it, tm = g.item.to_numpy(), g.timestamp.to_numpy()
        n = len(it) - 2 if u in evaluated else len(it)  # the validation and test targets are the last two
        expected += [(u, it[tm < tm[j]][-L:].tolist(), it[j]) for j in range(n) if tm[j] > tm.min()]
    assert list(zip(users, hist, targets)) == expected
    assert any(len(h) == L for h in hist) and any(len(h) < L for h in hist)


def test_files_are_recbole_atomic_files(exported):
    seq, folder = exported
    assert sorted(p.name for p in folder.iterdir()) == sorted([f"toy.{s}.inter" for s in SPLITS] + ["toy.item"])
    for split in SPLITS:
        df = pd.read_csv(folder / f"toy.{split}.inter", sep="\t")
        assert list(df.columns) == list(COLUMNS) and len(df) > 0
    items = pd.read_csv(folder / "toy.item", sep="\t")
    assert list(items.columns) == ["item_id:token"] and items.iloc[:, 0].tolist() == list(range(1, seq.n_items + 1))


def test_empty_history_is_refused(tmp_path):
    raw = pd.DataFrame([(0, i, 0, 7, i) for i in (1, 2, 3)], columns=["user", "item", "level", "timestamp", "order"])
    ds, _, _ = finalize("tied", raw, ["rating"])  # three ratings in one second: nothing precedes the targets
    with pytest.raises(ValueError, match="valid: 1 targets have no earlier deep event"):
        export_recbole(SequenceData(ds, max_len=L, min_deep=3), tmp_path, "tied")


def test_recbole_config_follows_the_profile():
    cfg = make_config("default", {"seed": 3})
    c = recbole_config(cfg, "out", "toy")
    assert (c["hidden_size"], c["n_layers"], c["n_heads"], c["MAX_ITEM_LIST_LENGTH"]) == (32, 1, 2, 20)
    assert (c["train_batch_size"], c["learning_rate"], c["seed"]) == (64, 1e-3, 3)
    assert c["hidden_dropout_prob"] == c["attn_dropout_prob"] == cfg.model.dropout
    assert c["eval_args"]["mode"] == "full" and c["valid_metric"] == "NDCG@10" and c["loss_type"] == "CE"
