"""The numbers the notebooks' tables are made of (viz.py): statistics, alignment, neighbours, denoising
measures, on small hand-built inputs whose values are worked out by hand in the comments.

(tests/test_notebooks.py checks the notebooks themselves and a few of these helpers.)"""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from m3bsr import viz
from m3bsr.data.schema import Dataset

CLICK, FAVOR = 0, 1
# user, item, level, timestamp, sorted by user then time (clicks first on a tie), as finalize() leaves them
EVENTS = [
    (0, 1, CLICK, 1), (0, 2, CLICK, 2), (0, 1, FAVOR, 3), (0, 3, FAVOR, 4), (0, 5, FAVOR, 5),      # rows 0-4
    (1, 2, CLICK, 1), (1, 4, CLICK, 2), (1, 5, CLICK, 3),                                          # rows 5-7
    (2, 2, FAVOR, 1), (2, 2, CLICK, 3), (2, 2, FAVOR, 5), (2, 4, CLICK, 6), (2, 4, FAVOR, 6),       # rows 8-12
    (2, 5, FAVOR, 7), (2, 3, FAVOR, 8),                                                            # rows 13-14
]


def toy() -> Dataset:
    """3 users, 5 items, 7 clicks and 8 favors; user 1 has no favor, user 0 exactly 3, user 2 five."""
    df = pd.DataFrame(EVENTS, columns=["user", "item", "level", "timestamp"])
    return Dataset("toy", df, ["click", "favor"], n_users=3, n_items=5).validate()


def test_dataset_stats_count_levels_quantiles_and_deep_users():
    """Catches quantiles read at the wrong level, users without a deep event left out of the median,
    '>= 3' counted as '> 3' and the deep level taken off by one."""
    s = viz.dataset_stats(toy())
    # events per user 5, 3, 7: p10 = 3 + 0.2 * (5 - 3), p90 = 5 + 0.8 * (7 - 5) (linear interpolation)
    assert s["len p10"] == pytest.approx(3.4) and s["len p90"] == pytest.approx(6.6) and s["len median"] == 5
    assert (s["shallow events"], s["deep events"], s["events"]) == (7, 8, 15)
    assert s["deep/user median"] == 3  # favors per user 3, 0, 5: user 1's zero counts
    assert s["users with >= 3 deep"] == 2
    assert s["levels"] == "click < favor"


def test_behaviour_counts_name_each_level_by_its_own_count():
    """Catches counts listed by frequency (value_counts' order) instead of by level: more favors than clicks."""
    counts = viz.behaviour_counts(toy())
    assert counts.to_dict() == {"click": 7, "favor": 8}
    assert viz.events_per_behaviour(toy()) == "click 7, favor 8"


def test_favored_later_is_a_deep_event_of_the_same_item_at_the_same_or_a_later_time():
    """Catches the last deep time replaced by the first, and a same-time deep event not counted."""
    fl = viz.favored_later(toy())
    # clicks: row 0 (favored at 3), row 9 (item 2 favored at 1 and again at 5), row 11 (favored at the same time 6)
    assert fl.index.tolist() == [0, 1, 5, 6, 7, 9, 11]
    assert fl.tolist() == [True, False, False, False, False, True, True]


def test_user_overlap_and_alignment_summary():
    """Catches a merge on the user alone, a Jaccard index without its overlap term, users lacking one
    side counted in the means, and the overlap divided by the shallow instead of the deep items."""
    ov = viz.user_overlap(toy())
    # shallow items {1, 2}, {2, 4, 5}, {2, 4}; deep items {1, 3, 5}, {}, {2, 3, 4, 5}
    assert ov["overlap"].tolist() == [1, 0, 2]
    assert ov["jaccard"].tolist() == pytest.approx([1 / 4, 0.0, 2 / 4])
    a = viz.alignment_summary(toy())
    assert a["shallow events"] == 7 and a["P(deep later | shallow)"] == round(3 / 7, 4)
    assert a["users with both"] == 2  # user 1 has no favor
    assert a["jaccard mean"] == pytest.approx((1 / 4 + 2 / 4) / 2)
    assert a["deep items clicked first"] == round((1 / 3 + 2 / 4) / 2, 4)


def test_markdown_and_csv_tables_keep_a_multi_level_index(tmp_path):
    """Catches the (dataset, modality) index of a table dropped because the index has no single name."""
    df = pd.DataFrame({"dataset": ["a", "a"], "modality": ["image", "text"], "dim": [4, 2]}).set_index(["dataset", "modality"])
    md = viz.to_markdown(df)
    assert md.splitlines()[0] == "| dataset | modality | dim |" and md.splitlines()[2] == "| a | image | 4 |"
    csv, _ = viz.save_table(df, "t", tmp_path)
    assert csv.read_text().splitlines()[:2] == ["dataset,modality,dim", "a,image,4"]


def test_nearest_neighbours_rank_by_cosine_most_similar_first_never_the_query():
    """Catches vectors normalised per column instead of per row, neighbours ordered by index instead of
    similarity, a query returned as its own neighbour, and the query counted among its own candidates."""
    x = np.array([[1.0, 0.0], [10.0, 1.0], [0.1, 0.0], [1.0, 1.0], [0.0, 1.0]])
    # cosines to row 0: row 2: 1, row 1: 0.995, row 3: 0.707, row 4: 0
    assert viz.nearest_neighbours(x, np.ones(5, bool), [0], k=3).tolist() == [[2, 1, 3]]
    with pytest.raises(ValueError, match="only 4 candidate rows"):
        viz.nearest_neighbours(x, np.ones(5, bool), [0], k=5)


def test_label_agreement_feature_table_and_chance_rate():
    """Catches each item compared with the label of another row when row 0 (padding) is masked out, coverage
    counting the padding row, and the chance rate taken over items lacking the modality or as a mean."""
    feats = np.array([[0.0, 0.0], [1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.1, 1.0], [5.0, 5.0], [1.0, 0.2]])
    mask = np.array([False, True, True, True, True, False, True])  # item 5 lacks the modality
    labels = np.array([None, "a", "a", "b", "b", "c", "a"], dtype=object)
    # nearest neighbour of items 1, 2, 6 is an "a"; of 3 and 4 a "b"
    assert viz.label_agreement(feats, mask, labels.astype(str), k=1) == 1.0
    assert viz.chance_agreement(np.array(["a", "a", "a", "b"])) == pytest.approx(0.75 ** 2 + 0.25 ** 2)
    ds = Dataset("feat", pd.DataFrame(EVENTS, columns=["user", "item", "level", "timestamp"]), ["click", "favor"], 3, 6,
                 features={"image": feats}, feature_mask={"image": mask}, item_labels=labels).validate()
    row = viz.feature_table([ds], k=1).loc[("feat", "image")]
    assert row["items with it"] == 5 and row["coverage"] == round(5 / 6, 4) and row["same label in 1-NN"] == 1.0
    assert row["chance"] == round(0.6 ** 2 + 0.4 ** 2, 4)  # a, a, b, b, a among the items with the modality


def test_one_event_per_item_returns_an_event_of_each_item_whatever_the_seed():
    """Catches the first index of each item taken in the unshuffled items but read through the shuffle
    (an event of some other item; the 6-event check in test_notebooks.py passes by chance)."""
    items = np.array([5, 1, 1, 2, 5, 5, 3, 1, 4, 4, 2, 5])
    for seed in range(10):
        keep = viz.one_event_per_item(items, seed=seed)
        assert sorted(items[keep].tolist()) == [1, 2, 3, 4, 5]
        assert len(keep) == 5 and list(keep) == sorted(keep)
    picks = {tuple(viz.one_event_per_item(items, seed=s)) for s in range(10)}
    assert len(picks) > 1  # which event of an item is kept changes with the seed


def test_attention_spread_normalises_by_the_visible_positions():
    """Catches the entropy divided by the log of all positions (masked ones too) and rows seeing a single
    position (entropy 0 / log 1) kept in the mean."""
    w = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.25, 0.25, 0.5]])
    h3 = -(2 * 0.25 * np.log(0.25) + 0.5 * np.log(0.5)) / np.log(3)
    assert viz.attention_spread(w) == pytest.approx((1.0 + h3) / 2)


def test_loss_terms_lists_each_training_term_once():
    """Catches loss and ce listed twice and validation columns taken for training terms."""
    h = pd.DataFrame({"step": [4], "epoch": [1], "contrast": [0.1], "ce": [2.0], "loss": [2.1], "valid_NDCG@10": [0.3],
                      "seconds": [1.0]})
    assert viz.loss_terms({"a": h, "b": h[["epoch", "loss", "ce"]]}) == ["loss", "ce", "contrast"]


def test_chain_distance_averages_real_events_relative_to_the_clean_norm():
    """Catches padding positions averaged in and the distance divided by the state's norm, not the clean one's."""
    clean = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    items, valid = torch.tensor([[[0, 1]]]), torch.tensor([[[False, True]]])
    states = torch.tensor([[[[[9.0, 9.0], [3.0, 4.0]]]], [[[[9.0, 9.0], [6.0, 8.0]]]]])  # (steps+1, B, S, L+1, d)
    out = viz.chain_distance(states, items, clean, valid)
    assert out["cosine"].tolist() == pytest.approx([1.0, 1.0])
    assert out["rel_l2"].tolist() == pytest.approx([0.0, 1.0])  # ||(6, 8) - (3, 4)|| / ||(3, 4)||


def test_stream_event_rows_are_the_last_events_strictly_before_the_target():
    """Catches an event at the target's own time kept, and the first max_len events kept instead of the last."""
    split = {"users": torch.tensor([2, 0]), "target_times": torch.tensor([[7], [5]])}
    out = viz.stream_event_rows(toy(), split, level=FAVOR, max_len=2)
    # user 2's favors before time 7: rows 8, 10, 12 (row 13 is at 7); user 0's before 5: rows 2, 3
    assert out.tolist() == [[-1, 10, 12], [-1, 2, 3]]


def test_click_denoising_measures_against_the_favor_centroid():
    """Catches the centroid summed over padding, no centring on the stage's mean, the shift divided by the
    wrong norm, and clicks of users without any favor kept."""
    valid = torch.tensor([[[False, True, True], [False, True, True]],
                          [[False, True, False], [False, False, False]]])  # row 1 has no favor
    before = torch.zeros(2, 2, 3, 2)
    before[0, 0, 1], before[0, 0, 2] = torch.tensor([3.0, 4.0]), torch.tensor([1.0, 0.0])  # clicks
    before[0, 1, 1], before[0, 1, 2] = torch.tensor([2.0, 1.0]), torch.tensor([0.0, 3.0])  # favors
    before[0, 1, 0] = torch.tensor([50.0, -50.0])  # BOS, not an event
    before[1, 0, 1] = torch.tensor([7.0, 7.0])
    after = before.clone()
    after[0, 0, 1] += torch.tensor([0.0, 5.0])  # shift 5 / ||(3, 4)|| = 1
    rec = {"valid": valid, "modalities": ["id"], "cdmd": {"id": before}, "cdbd": {"id": after}}
    out = viz.click_denoising(rec, np.zeros((2, 3), bool), "m")
    assert len(out) == 2 and out["shift"].tolist() == pytest.approx([1.0, 0.0])

    def cos(h, i):  # by hand: centre on the mean of the 5 real events, centroid of row 0's two favors
        real = torch.stack([h[0, 0, 1], h[0, 0, 2], h[0, 1, 1], h[0, 1, 2], h[1, 0, 1]])
        mu = real.mean(0)
        centroid = (h[0, 1, 1] + h[0, 1, 2]) / 2 - mu
        return float(torch.nn.functional.cosine_similarity(h[0, 0, i] - mu, centroid, dim=0))
    assert out["cos to favors before"].tolist() == pytest.approx([cos(before, 1), cos(before, 2)])
    assert out["cos gain"].tolist() == pytest.approx([cos(after, 1) - cos(before, 1), cos(after, 2) - cos(before, 2)])
