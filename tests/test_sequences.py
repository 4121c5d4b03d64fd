"""The split and the batches: leave-one-out on the deep level, strictly-earlier histories, no leakage."""
import numpy as np
import pandas as pd
import pytest
import torch

from m3bsr.data.schema import finalize
from m3bsr.data.sequences import TIME_BOS, TIME_PAD, SequenceData, history_index, position_ids


def toy(seed=0, users=30, events=25):
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(users):
        t = 0
        for _ in range(events):
            t += int(rng.integers(0, 3))  # ties in time happen
            it = int(rng.integers(1, 40))
            rows.append((u, it, 0, t, len(rows)))
            if rng.random() < (0.4 if u % 5 else 0.05):  # every fifth user rarely favors
                rows.append((u, it, 1, t, len(rows)))  # a favor at the click's own timestamp
    return pd.DataFrame(rows, columns=["user", "item", "level", "timestamp", "order"])


def build(raw, L=10):
    ds, _, _ = finalize("toy", raw, ["click", "favor"])
    return ds, SequenceData(ds, max_len=L, min_deep=3)


def effective_inputs(split, row, k, L=10):
    """What target k of a row reads: per level, the last L events up to its history index (the window
    every model's attention keeps)."""
    idx = history_index(split["times"][row:row + 1], split["target_times"][row:row + 1, k:k + 1])[0, :, 0]
    return [(split["items"][row, s, max(1, i - L + 1):i + 1].tolist(), split["times"][row, s, max(1, i - L + 1):i + 1].tolist())
            for s, i in enumerate(idx.tolist())]


def history_mismatches(seq):
    """Training targets whose window (per level, the last L events up to the history index) is not the
    history an evaluation row at the target's time would hold: the level's last L events strictly
    before it, taken from the dataset's events. -> (mismatches, targets checked)."""
    df = seq.ds.interactions
    events = {u: [(g.item.to_numpy()[g.level.to_numpy() == s], g.timestamp.to_numpy()[g.level.to_numpy() == s])
                  for s in range(seq.S)] for u, g in df.groupby("user")}
    tr, L = seq.train, seq.L
    idx = history_index(tr["times"], tr["target_times"])  # (B, S, K)
    bad = checked = 0
    for r, u in enumerate(tr["users"].tolist()):
        for k in np.flatnonzero(tr["targets"][r].numpy() > 0):
            t = int(tr["target_times"][r, k])
            checked += 1
            for s, (items, times) in enumerate(events[u]):
                c = int((times < t).sum())
                i = int(idx[r, s, k])
                if (tr["items"][r, s, max(1, i - L + 1):i + 1].tolist() != items[max(0, c - L):c].tolist()
                        or tr["times"][r, s, max(1, i - L + 1):i + 1].tolist() != times[max(0, c - L):c].tolist()):
                    bad += 1
                    break
    return bad, checked


def read_positions(split, L):
    """{(level, position)} that the targets of a split read: the positions (counted back from the
    row's newest event, :func:`position_ids`) of the last L events up to each target's history index."""
    pos = position_ids(split["times"])
    idx = history_index(split["times"], split["target_times"])
    out = set()
    for r in range(len(split["users"])):
        for k in np.flatnonzero(split["targets"][r].numpy() > 0):
            for s in range(split["items"].shape[1]):
                i = int(idx[r, s, k])
                out |= {(s, p) for p in pos[r, s, max(1, i - L + 1):i + 1].tolist()}
    return out


def test_layout_bos_padding_and_split():
    raw = toy()
    ds, seq = build(raw)
    for split in (seq.train, seq.valid, seq.test):
        assert (split["times"][:, :, 0] == TIME_BOS).all() and (split["items"][:, :, 0] == 0).all()
        pad = split["items"][:, :, 1:] == 0
        assert (split["times"][:, :, 1:][pad] == TIME_PAD).all()
    df = ds.interactions
    for r, u in enumerate(seq.test["users"].tolist()):
        deep = df[(df.user == u) & (df.level == 1)]
        assert seq.test["targets"][r, 0] == deep.item.iloc[-1]
        assert seq.valid["targets"][r, 0] == deep.item.iloc[-2]
        # every history event of an evaluation row is strictly before its target
        t = seq.test["target_times"][r, 0]
        valid = seq.test["items"][r, :, 1:] > 0
        assert (seq.test["times"][r, :, 1:][valid] < t).all()


def test_users_with_few_deep_events_train_but_are_not_evaluated():
    raw = toy()
    # one more such user, whose last event is a favor (it must train too)
    extra = [(99, 5, 0, 1), (99, 6, 0, 2), (99, 7, 1, 3), (99, 8, 0, 4), (99, 9, 1, 5)]
    raw = pd.concat([raw, pd.DataFrame([(*e, len(raw) + i) for i, e in enumerate(extra)], columns=raw.columns)])
    ds, seq = build(raw)
    n_deep = ds.interactions[ds.interactions.level == 1].groupby("user").size()
    assert set(seq.test["users"].tolist()) == set(n_deep[n_deep >= 3].index)
    few = set(n_deep[n_deep < 3].index)
    assert few, "toy data should contain users with fewer than 3 deep events"
    df = ds.interactions
    for u in few:  # all their deep events train, the last one included
        last = df[(df.user == u) & (df.level == 1)].iloc[-1]
        rows = seq.train["users"] == u
        targets = zip(seq.train["targets"][rows].flatten().tolist(), seq.train["target_times"][rows].flatten().tolist())
        assert (last["item"], last["timestamp"]) in set(targets), u


def test_training_targets_never_include_validation_or_test_events():
    raw = toy()
    ds, seq = build(raw)
    deep = ds.interactions[ds.interactions.level == 1]
    for r, u in enumerate(seq.valid["users"].tolist()):
        rows = (seq.train["users"] == u).nonzero()[:, 0]
        vt = seq.valid["target_times"][r, 0]
        has = seq.train["targets"][rows] > 0
        tt, ti = seq.train["target_times"][rows][has].tolist(), seq.train["targets"][rows][has].tolist()
        assert all(t <= vt for t in tt)  # (<=: an earlier deep event may share the validation target's time)
        # the validation and test events never train: a training target with their (item, time) is an
        # earlier deep event with the same item and time
        earlier = list(zip(deep[deep.user == u].item, deep[deep.user == u].timestamp))[:-2]
        for split in (seq.valid, seq.test):
            event = (int(split["targets"][r, 0]), int(split["target_times"][r, 0]))
            assert list(zip(ti, tt)).count(event) <= earlier.count(event)


@pytest.mark.parametrize("split_name", ["valid", "test"])
def test_no_leakage_changing_events_at_or_after_the_target(split_name):
    raw = toy()
    _, seq = build(raw)
    before = seq.split(split_name)
    rng = np.random.default_rng(1)
    for r, u in enumerate(before["users"].tolist()[:10]):
        tgt_t = int(before["target_times"][r, 0])
        changed = raw.copy()
        late = (changed.user == u) & (changed.timestamp >= tgt_t)
        late_not_target = late & ~((changed.item == int(before["targets"][r, 0])) & (changed.level == 1)
                                   & (changed.timestamp == tgt_t))
        changed.loc[late_not_target, "item"] = rng.integers(41, 60, late_not_target.sum())
        _, seq2 = build(changed)
        after = seq2.split(split_name)
        r2 = (after["users"] == u).nonzero()[0, 0]
        assert torch.equal(before["times"][r], after["times"][r2])
        assert _raw(seq, before, r) == _raw(seq2, after, r2)  # index mapping may shift: compare raw ids


def _raw(seq, split, r):
    """The row's history as raw item ids per level (every event of an evaluation row is history)."""
    ids = seq.ds.item_ids
    return [[ids[i] for i in split["items"][r, s, 1:].tolist() if i > 0] for s in range(split["items"].shape[1])]


def test_leakage_check_detects_a_leaky_change():
    """The check above is not vacuous: changing an event before the target changes the row."""
    raw = toy()
    _, seq = build(raw)
    u, t = int(seq.test["users"][0]), int(seq.test["target_times"][0, 0])
    changed = raw.copy()
    early = changed.index[(changed.user == u) & (changed.timestamp < t)][-1]
    changed.loc[early, "item"] = 999
    _, seq2 = build(changed)
    r2 = (seq2.test["users"] == u).nonzero()[0, 0]
    assert _raw(seq, seq.test, 0) != _raw(seq2, seq2.test, r2)


def test_no_leakage_for_training_targets():
    raw = toy()
    _, seq = build(raw)
    tr = seq.train
    for r in range(5):
        for k in np.flatnonzero(tr["targets"][r].numpy() > 0):
            t = tr["target_times"][r, k]
            for items, times in effective_inputs(tr, r, k):
                assert all(x < t for x in times)
        # the row's streams hold nothing at or after its last target
        last = tr["target_times"][r][tr["targets"][r] > 0].max()
        assert (tr["times"][r, :, 1:][tr["items"][r, :, 1:] > 0] < last).all()


def test_history_index_counts_strictly_earlier_events():
    times = torch.tensor([[[TIME_BOS, 1, 2, 2, 5, TIME_PAD]]])
    idx = history_index(times, torch.tensor([[0, 1, 2, 3, 5, 6]]))
    assert idx[0, 0].tolist() == [0, 0, 1, 3, 3, 4]


def test_seen_before_lists_the_items_met_strictly_before_the_target():
    """seen_before (for mask_seen) holds every item of any level with a timestamp strictly before
    the row's target: not the target's own click, nor any other event at the target's timestamp."""
    ds, seq = build(toy())
    df = ds.interactions
    for name in ("valid", "test"):
        split, (ptr, items) = seq.split(name), seq.seen_before[name]
        for r, u in enumerate(split["users"].tolist()):
            t = int(split["target_times"][r, 0])
            expected = sorted(set(df.item[(df.user == u) & (df.timestamp < t)].tolist()))
            assert items[ptr[r]:ptr[r + 1]].tolist() == expected, (name, u)


def test_evaluation_history_is_the_last_max_len_events_before_the_target():
    """Per level, an evaluation row holds the L most recent events strictly before its target, in time order."""
    L = 4
    ds, seq = build(toy(), L=L)
    df = ds.interactions
    for name in ("valid", "test"):
        split = seq.split(name)
        for r, u in enumerate(split["users"].tolist()):
            t = int(split["target_times"][r, 0])
            for s in range(2):
                ev = df[(df.user == u) & (df.level == s) & (df.timestamp < t)].tail(L)
                n = len(ev)
                assert split["items"][r, s, 1:n + 1].tolist() == ev.item.tolist(), (name, u, s)
                assert split["times"][r, s, 1:n + 1].tolist() == ev.timestamp.tolist()
                assert (split["items"][r, s, n + 1:] == 0).all()


def test_every_deep_event_before_the_validation_target_trains_exactly_once():
    """Windows of L deep events tile the training part: with a click before every favor, each
    favor before the validation target is a training target once, across several windows."""
    rows = []
    for u, n in ((0, 12), (1, 8)):
        for i in range(n):  # click at 2i, favor of the same item at 2i + 1
            rows += [(u, 10 * u + i + 1, 0, 2 * i, len(rows)), (u, 10 * u + i + 1, 1, 2 * i + 1, len(rows) + 1)]
    ds, seq = build(pd.DataFrame(rows, columns=["user", "item", "level", "timestamp", "order"]), L=3)
    tr = seq.train
    for u, n in ((0, 12), (1, 8)):
        mine = tr["users"] == u
        has = tr["targets"][mine] > 0
        assert sorted(tr["target_times"][mine][has].tolist()) == [2 * i + 1 for i in range(n - 2)], u
    assert len(tr["users"]) > 2  # several windows per user


def test_every_training_target_has_an_earlier_event_in_its_row():
    """A deep event is a training target only when its window holds an event strictly before it: no
    target is trained from the BOS token alone (as the first event of a SASRec sequence)."""
    _, seq = build(toy())
    tr = seq.train
    for r in range(len(tr["users"])):
        for k in np.flatnonzero(tr["targets"][r].numpy() > 0):
            assert any(items for items, _ in effective_inputs(tr, r, k)), (r, k)


@pytest.mark.parametrize("L, row_len", [(4, None), (4, 4), (10, 13)])
def test_every_training_target_reads_the_history_an_evaluation_row_would_hold(L, row_len):
    """Per level, each training target's window is the last L events strictly before it, however
    far back they lie (clicks included) and whichever row holds the target."""
    ds, _ = build(toy(users=40, events=40))
    seq = SequenceData(ds, max_len=L, min_deep=3, row_len=row_len)
    bad, checked = history_mismatches(seq)
    assert bad == 0 and checked > 200
    assert seq.train["items"].shape[-1] <= seq.W + 1 and seq.W == (row_len or 2 * L)


def test_the_history_check_finds_a_wrong_history():
    """The check above can fail: one event moved out of a training row is found."""
    ds, seq = build(toy())
    r = int((seq.train["items"][:, 0, 1:] > 0).sum(-1).argmax())
    seq.train["items"][r, 0, 1] = 39 if seq.train["items"][r, 0, 1] != 39 else 38
    assert history_mismatches(seq)[0] > 0


def test_every_position_an_evaluation_row_reads_is_trained():
    """Positions count back from a row's newest event: every (level, position) that a validation or
    test target reads is read by some training target too (the newest, 1, by every row's last target)."""
    ds, seq = build(toy(users=40, events=60), L=5)
    trained = read_positions(seq.train, seq.L)
    for name in ("valid", "test"):
        read = read_positions(seq.split(name), seq.L)
        assert read and read <= trained, sorted(read - trained)
    assert {(s, 1) for s in range(2)} <= trained


def test_training_rows_hold_several_targets_within_row_len():
    """Consecutive targets share a row while every level fits in row_len events: fewer rows than targets."""
    ds, seq = build(toy(users=40, events=60), L=5)
    tr = seq.train
    n_targets = int((tr["targets"] > 0).sum())
    assert len(tr["users"]) < n_targets / 2
    assert ((tr["items"][:, :, 1:] > 0).sum(-1) <= seq.W).all()


def test_position_ids_count_back_from_the_newest_event():
    times = torch.tensor([[TIME_BOS, 1, 2, 2, 5, TIME_PAD, TIME_PAD], [TIME_BOS] + [TIME_PAD] * 6])
    assert position_ids(times).tolist() == [[0, 4, 3, 2, 1, 0, 0], [0] * 7]


@pytest.mark.parametrize("name", ["synthetic"] + [pytest.param(n, marks=pytest.mark.dataset(n))
                                                  for n in ("ml-100k-mm", "ml-latest-small-mm", "rec-tmall", "taobao-ub")])
def test_real_datasets_train_on_evaluation_histories(name, capsys):
    """On each dataset at the default profile: no training target reads another history than its
    evaluation-style one, and every (level, position) an evaluation row reads is trained, or lies
    further back than any training row of that level reaches (layers.Positions reads it as the
    furthest trained one: on synthetic, the oldest favors of the longest histories)."""
    from m3bsr.config import make_config
    from m3bsr.data.sources import load_dataset
    cfg = make_config("default", {"dataset": name})
    seq = SequenceData(load_dataset(cfg.data, features=False), cfg.data.max_len, cfg.data.min_deep, cfg.data.row_len)
    bad, checked = history_mismatches(seq)
    trained = read_positions(seq.train, seq.L)
    furthest = {s: max(p for l, p in trained if l == s) for s in range(seq.S)}
    untrained = set().union(*(read_positions(seq.split(n), seq.L) - trained for n in ("valid", "test")))
    with capsys.disabled():
        print(f"\n{name}: {bad} of {checked} training targets read another history than an evaluation row would; "
              f"(level, position) pairs read in evaluation and never in training: {sorted(untrained)}")
    assert bad == 0 and checked > 0
    assert all(p > furthest[s] for s, p in untrained)
