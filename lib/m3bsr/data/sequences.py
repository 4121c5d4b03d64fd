"""Leave-one-out split on the deep behaviour and time-causal padded batches.

The split (``docs/protocol.md``): per user, the last deep event is the test target, the one before
is the validation target, earlier deep events are training targets. Users with fewer than
``min_deep`` deep events have no validation/test target; all their deep events train.

History for a target = every event of every level with a timestamp strictly before the
target's timestamp (events at the target's own timestamp are never history).

A batch is a dict of tensors (S = number of levels, L = max_len, K = targets per row):

* ``items``  ``(B, S, W + 1)`` long: per level, position 0 is BOS (item 0, time ``TIME_BOS``),
  positions 1..n hold the row's events of the level in time order, then padding (item 0,
  time ``TIME_PAD``). W = L for evaluation rows; for training rows the longest stream, at most
  ``row_len``.
* ``times``  ``(B, S, W + 1)`` long.
* ``targets`` ``(B, K)`` long: deep-level items to predict (0 = no target).
* ``target_times`` ``(B, K)`` long.
* ``users`` ``(B,)`` long.

Every target, in training as in evaluation, reads per level exactly the history an evaluation row at
its time holds: the last ``L`` events of the level strictly before it. Evaluation rows hold one
target (K = 1) and those events. Training rows hold a run of K consecutive training targets of one
user, so all of them train in one pass: per level, the stream runs from the ``L``-th-last event
before the first target up to the last event before the last target (at most ``row_len`` events,
which caps K), and the models restrict every attention to a window of ``L`` events
(:func:`m3bsr.models.layers.window_mask`), so the readout of target k at its history index
(:func:`history_index`) sees exactly its last ``L`` events of each level (through stacked layers
the keys of that window may carry older events of the row: ``docs/protocol.md``, "Training").
:func:`position_ids` numbers each stream's events back from its newest (1 = newest), the event an
evaluation row reads, and every training row's last target reads it too.

Beside the rows, ``SequenceData.seen_before[split]`` lists, per validation/test row, every item the
user met (any level, any position, not only the last L) strictly before the row's target, for
ranking with already-seen items left out (``mask_seen``).
"""
from __future__ import annotations

import numpy as np
import torch

from ..config import MAX_POSITIONS, ConfigError
from .schema import Dataset

TIME_BOS = -(2 ** 62)
TIME_PAD = 2 ** 62


def history_index(times: torch.Tensor, target_times: torch.Tensor) -> torch.Tensor:
    """Index of the last event strictly before each target, per level.

    times ``(B, S, W+1)``, target_times ``(B, K)`` -> ``(B, S, K)`` long in 0..W (0 = only BOS).
    Valid events are sorted by time and BOS sits at 0, so the count of events at positions
    1..W with time < target time is the index of the last such event.
    """
    return (times[:, :, None, 1:] < target_times[:, None, :, None]).sum(-1)


def position_ids(times: torch.Tensor) -> torch.Tensor:
    """Positions counted back from each stream's newest event: ``(..., W+1)`` times -> ``(..., W+1)``
    long, 0 at BOS and padding, n..1 at the events 1..n (1 = the newest).

    An evaluation row's newest event is the one it reads, and so is a training row's for its last
    target: the position an evaluation row reads is trained in every training row.
    """
    n = (times[..., 1:] < TIME_PAD).sum(-1, keepdim=True)  # events are a prefix after BOS
    j = torch.arange(times.shape[-1], device=times.device)
    return torch.where((j >= 1) & (j <= n), n + 1 - j, 0)


class SequenceData:
    """Precomputed padded arrays for training, validation and test rows of one dataset."""

    def __init__(self, ds: Dataset, max_len: int = 50, min_deep: int = 3, row_len: int | None = None):
        """``row_len`` (W): events per level in a training row, >= ``max_len``; None: 2 * max_len
        (at most MAX_POSITIONS - 1)."""
        self.ds, self.L, self.S = ds, max_len, ds.n_levels
        self.W = min(2 * max_len, MAX_POSITIONS - 1) if row_len is None else row_len
        if self.W < max_len:
            raise ConfigError(f"row_len={row_len} must be >= max_len={max_len}")
        self.n_items = ds.n_items
        deep = ds.n_levels - 1
        df = ds.interactions
        users = df["user"].to_numpy()
        bounds = np.flatnonzero(np.diff(users)) + 1
        starts = np.concatenate([[0], bounds])
        ends = np.concatenate([bounds, [len(df)]])
        item_a, level_a, time_a = (df[c].to_numpy() for c in ("item", "level", "timestamp"))

        train_rows, eval_rows, seen_before = [], {"valid": [], "test": []}, {"valid": [], "test": []}
        self.seen: dict[int, np.ndarray] = {}
        for s, e in zip(starts, ends):
            u = int(users[s])
            it, lv, tm = item_a[s:e], level_a[s:e], time_a[s:e]
            self.seen[u] = np.unique(it)
            deep_pos = np.flatnonzero(lv == deep)
            if len(deep_pos) >= min_deep:
                v, t = deep_pos[-2], deep_pos[-1]
                eval_rows["valid"].append(self._eval_row(u, it, lv, tm, v))
                eval_rows["test"].append(self._eval_row(u, it, lv, tm, t))
                for name, pos in (("valid", v), ("test", t)):
                    seen_before[name].append(np.unique(it[tm < tm[pos]]))
                cut = v  # training window: events before the validation target in time/file order
            else:
                cut = e - s
            train_rows += self._train_rows(u, it[:cut], lv[:cut], tm[:cut])
        width = max((len(t) for r in train_rows for _, t in r[1]), default=1)  # <= W: no all-padding columns
        self.train = _stack(train_rows, self.S, width, max((len(r[2]) for r in train_rows), default=1))
        self.valid = _stack(eval_rows["valid"], self.S, max_len, 1)
        self.test = _stack(eval_rows["test"], self.S, max_len, 1)
        self.seen_before = {name: _ragged(rows) for name, rows in seen_before.items()}

    def _window(self, it, lv, tm):
        """Per level, the last L events -> lists of (items, times)."""
        return [(it[lv == s][-self.L:], tm[lv == s][-self.L:]) for s in range(self.S)]

    def _eval_row(self, u, it, lv, tm, pos):
        before = tm < tm[pos]  # strictly before the target's timestamp
        return u, self._window(it[before], lv[before], tm[before]), [it[pos]], [tm[pos]]

    def _train_rows(self, u, it, lv, tm):
        """Rows of consecutive training targets, built from the last target back.

        A deep event is a target when some event precedes it in time. Target k's history of level s
        is ``events_s[c_s(k) - L : c_s(k)]``, with c_s(k) the number of level-s events strictly before
        it; a row of targets a..b holds ``events_s[c_s(a) - L : c_s(b)]``, and grows while every
        level fits in W events.
        """
        events = [(it[lv == s], tm[lv == s]) for s in range(self.S)]
        deep = np.flatnonzero(lv == self.S - 1)
        deep = deep[tm[deep] > tm.min()] if len(tm) else deep
        # c[s, k]: level-s events strictly before target k (each level's times are sorted)
        c = np.array([np.searchsorted(t, tm[deep], side="left") for _, t in events]).reshape(self.S, -1)
        lo = np.maximum(c - self.L, 0)
        rows = []
        b = len(deep) - 1
        while b >= 0:
            a = b
            while a > 0 and (c[:, b] - lo[:, a - 1]).max() <= self.W:
                a -= 1
            streams = [(e_it[lo[s, a]:c[s, b]], e_tm[lo[s, a]:c[s, b]]) for s, (e_it, e_tm) in enumerate(events)]
            rows.append((u, streams, it[deep[a:b + 1]], tm[deep[a:b + 1]]))
            b = a - 1
        return rows[::-1]

    def split(self, name: str) -> dict[str, torch.Tensor]:
        return {"train": self.train, "valid": self.valid, "test": self.test}[name]

    @property
    def n_eval_users(self) -> int:
        return len(self.test["users"])


def _stack(rows, S: int, L: int, K: int) -> dict[str, torch.Tensor]:
    B = len(rows)
    items = np.zeros((B, S, L + 1), np.int64)
    times = np.full((B, S, L + 1), TIME_PAD, np.int64)
    times[:, :, 0] = TIME_BOS
    targets = np.zeros((B, K), np.int64)
    target_times = np.full((B, K), TIME_PAD, np.int64)
    users = np.zeros(B, np.int64)
    for b, (u, streams, tg, tt) in enumerate(rows):
        users[b] = u
        for s, (si, st) in enumerate(streams):
            items[b, s, 1:1 + len(si)] = si
            times[b, s, 1:1 + len(st)] = st
        targets[b, :len(tg)] = tg
        target_times[b, :len(tt)] = tt
    return {k: torch.from_numpy(v) for k, v in
            dict(items=items, times=times, targets=targets, target_times=target_times, users=users).items()}


def _ragged(rows: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of different lengths -> (``ptr`` ``(n+1,)``, ``values``) long: row i is ``values[ptr[i]:ptr[i+1]]``."""
    ptr = np.zeros(len(rows) + 1, np.int64)
    np.cumsum([len(r) for r in rows], out=ptr[1:])
    values = np.concatenate(rows).astype(np.int64) if rows else np.zeros(0, np.int64)
    return torch.from_numpy(ptr), torch.from_numpy(values)

