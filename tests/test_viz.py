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


# ----------------------------------------------------------------------------- make compare

RUNS_HEADER = "dataset,model,seed,split,best_epoch,train_seconds,NDCG@10,main\n"


def write(folder, name, text):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(text)


def test_compare_matches_rows_by_their_keys_and_ignores_timings_and_missing_rows(tmp_path):
    """A quick-plan reproduction: fewer rows, in another order, other timings, the same numbers."""
    committed = RUNS_HEADER + ("synthetic,pop,0,test,-1,,0.065,0.0652 ± 0.0000\n"
                               "synthetic,m3bsr,0,test,28,31.5,0.1847,0.1891 ± 0.0058\n"
                               "ml-100k-mm,m3bsr,0,test,27,900.1,0.0512,0.0532 ± 0.0017\n")
    reproduced = RUNS_HEADER + ("synthetic,m3bsr,0,test,28,40.2,0.1847,0.1891 ± 0.0058\n"
                                "synthetic,pop,0,test,-1,,0.065,0.0652 ± 0.0000\n")
    write(tmp_path / "old", "04_runs.csv", committed)
    write(tmp_path / "new", "04_runs.csv", reproduced)
    write(tmp_path / "new", "04_train_time.csv", "dataset,model,runs,minutes\nsynthetic,m3bsr,1,9.0\n")
    write(tmp_path / "old", "04_train_time.csv", "dataset,model,runs,minutes\nsynthetic,m3bsr,3,5.0\n")
    write(tmp_path / "old", "05_steps.csv", "dataset,T,test NDCG@10\nsynthetic,1,0.19\n")
    lines, agree = viz.compare_results(tmp_path / "new", tmp_path / "old")
    assert agree, lines
    assert "04_runs.csv: 2 rows (1 committed rows not reproduced), all equal" in lines
    assert "04_train_time.csv: training cost, not compared" in lines and "not reproduced: 05_steps.csv" in lines


@pytest.mark.parametrize("row, expected", [
    ("synthetic,m3bsr,0,test,28,31.5,0.1848,0.1891 ± 0.0058", "NDCG@10 0.1848 (committed 0.1847)"),
    ("synthetic,m3bsr,0,test,29,31.5,0.1847,0.1891 ± 0.0058", "best_epoch 29 (committed 28)"),
    ("synthetic,m3bsr,0,test,28,31.5,0.1847,0.1892 ± 0.0058", "main 0.1892 ± 0.0058 (committed 0.1891 ± 0.0058)"),
    ("synthetic,m3bsr,1,test,28,31.5,0.1847,0.1891 ± 0.0058", "seed=1, split=test: not in the committed table"),
])
def test_compare_names_the_table_row_and_column_that_differ(tmp_path, row, expected):
    write(tmp_path / "old", "04_runs.csv", RUNS_HEADER + "synthetic,m3bsr,0,test,28,31.5,0.1847,0.1891 ± 0.0058\n")
    write(tmp_path / "new", "04_runs.csv", RUNS_HEADER + row + "\n")
    lines, agree = viz.compare_results(tmp_path / "new", tmp_path / "old")
    assert not agree and lines[0].startswith("04_runs.csv: 1 rows") and lines[0].endswith(", 1 differ:")
    assert expected in lines[1] and lines[1].startswith("  dataset=synthetic, model=m3bsr")
    assert viz.main(["compare", str(tmp_path / "new"), str(tmp_path / "old")]) == 1


def test_compare_tolerance_is_relative_and_exits_zero_on_agreement(tmp_path, capsys):
    write(tmp_path / "old", "t.csv", "model,NDCG@10\nm3bsr,0.18474947036890305\n")
    write(tmp_path / "new", "t.csv", "model,NDCG@10\nm3bsr,0.18474947036890306\n")
    assert viz.main(["compare", str(tmp_path / "new"), str(tmp_path / "old")]) == 1
    assert viz.main(["compare", str(tmp_path / "new"), str(tmp_path / "old"), "--rtol", "1e-12"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "same numbers as the committed tables"


def test_compare_refuses_a_folder_without_tables(tmp_path):
    with pytest.raises(SystemExit) as err:
        viz.main(["compare", str(tmp_path / "nothing"), str(tmp_path)])
    assert err.value.code == 2


# ----------------------------------------------------------------------------- notebook display helpers

def test_projection_legend_names_every_colour(tmp_path):
    xy = {("id", "input"): np.random.default_rng(0).normal(size=(30, 2))}
    colour = np.arange(30) % 18
    names = [f"genre {g}" for g in range(18)]
    fig = viz.plot_projection_pairs(xy, colour, None, {("id", "input"): ""}, "genre", "t", names=names)
    assert [t.get_text() for t in fig.legends[0].get_texts()] == names
    assert viz.plot_projection_pairs(xy, colour, None, {("id", "input"): ""}, "genre", "t").legends == []


def test_regime_markers_are_filled_only_where_the_paired_test_separates_the_models():
    """Catches every marker filled (or none): a setting's marker is the model's colour where its test
    is significant and white where it is not, one panel per study."""
    df = pd.DataFrame({"study": ["s"] * 4 + ["t"] * 2, "x": [0, 1, 0, 1, 0, 1], "xlabel": "x",
                       "model": ["a", "a", "b", "b", "a", "a"], "test NDCG@10": [.1, .2, .1, .3, .1, .1],
                       "significant": [False, True, False, True, False, False]})
    fig = viz.plot_regimes(df)
    first = fig.axes[0].collections[0].get_facecolors()  # model a's markers in study s
    assert len(fig.axes) == 2 and np.allclose(first[0], [1, 1, 1, 1]) and not np.allclose(first[1], [1, 1, 1, 1])


def test_screen_png_is_a_smaller_png_at_most_the_screen_width(tmp_path):
    from PIL import Image
    fig = viz.plot_projection_pairs({("id", s): np.random.default_rng(1).normal(size=(3000, 2)) for s in viz.STAGES},
                                    np.arange(3000) % 10, None, {("id", s): "" for s in viz.STAGES}, "c", "t")
    png = viz.save_figure(fig, "x", tmp_path, dpi=200)[0]
    small = viz.screen_png(png, width=500)
    assert small[:8] == b"\x89PNG\r\n\x1a\n" and len(small) < png.stat().st_size / 2
    import io
    assert Image.open(io.BytesIO(small)).width == 500


def test_environment_names_versions_and_device():
    import platform
    line = viz.environment("cpu")
    assert line.startswith(f"python {platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}, m3bsr ")
    assert "; device cpu: " in line and line.endswith((" thread", " threads"))
