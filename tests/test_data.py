"""Data pipeline: real-data statistics, synthetic ground truth, bad input, feature cache.

Real-data tests (``@pytest.mark.dataset``, tests/conftest.py) skip when their dataset is not under the
data root, and fail instead under M3BSR_REQUIRE_DATA=1. The heavy encoders only run on a handful of
items; full encoding never runs here.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from m3bsr.config import ConfigError, DataConfig, make_config
from m3bsr.data import features as F
from m3bsr.data import sources
from m3bsr.data.schema import DataError, Dataset
from m3bsr.data.sources import load_csv, load_dataset, resolve_data_root
from m3bsr.data.synthetic import make_synthetic


def level_counts(ds) -> dict[str, int]:
    return {name: int((ds.interactions["level"] == k).sum()) for k, name in enumerate(ds.levels)}


def raises_at(fn, file_name: str, line: int | None, *words: str) -> str:
    """fn() must raise DataError whose message names the file, the line and every word."""
    with pytest.raises(DataError) as e:
        fn()
    msg = str(e.value)
    assert file_name in msg, msg
    if line is not None:
        assert f"line {line}:" in msg, msg
    for w in words:
        assert w in msg, msg
    return msg


# ----------------------------------------------------------------------------- real data statistics

@pytest.mark.dataset("ml-100k-mm")
def test_ml_100k_statistics():
    ds = load_dataset(DataConfig(dataset="ml-100k-mm"), features=False)
    assert (ds.n_users, ds.n_items, ds.levels) == (943, 1682, ["click", "favor"])
    assert level_counts(ds) == {"click": 100000, "favor": 55375}
    df = ds.interactions
    fav = df[df.level == 1][["user", "item", "timestamp"]]
    clicks = df[df.level == 0][["user", "item", "timestamp"]]
    assert len(fav.merge(clicks)) == len(fav)  # every favor is also a click at the same time
    posters = resolve_data_root() / "ml-100k-mm" / "posters"
    assert sum((posters / f"{i}.jpg").is_file() for i in ds.item_ids[1:]) == 1663
    assert ds.item_labels[1:].tolist().count(None) == 0 and "Comedy" in set(ds.item_labels[1:])


@pytest.mark.dataset("ml-latest-small-mm")
def test_ml_latest_small_statistics():
    ds = load_dataset(DataConfig(dataset="ml-latest-small-mm"), features=False)
    assert (ds.n_users, ds.n_items) == (610, 9724)
    assert level_counts(ds) == {"click": 100836, "favor": 48580}


@pytest.mark.dataset("rec-tmall")
def test_rec_tmall_statistics_and_text(tmp_path):
    ds = load_dataset(DataConfig(dataset="rec-tmall", cache_dir=str(tmp_path)))
    assert (ds.n_users, ds.n_items) == (836, 554)
    assert level_counts(ds) == {"click": 4474, "deep": 358 + 5 + 7}
    assert ds.features["text"].shape == (555, 64) and ds.feature_mask["text"][1:].all()
    assert set(ds.features) == {"text"}
    ds = load_dataset(DataConfig(dataset="rec-tmall", levels="click|cart|collect,alipay"), features=False)
    assert level_counts(ds) == {"click": 4474, "cart": 358, "collect,alipay": 12}
    ds = load_dataset(DataConfig(dataset="rec-tmall", deep="alipay"), features=False)
    assert level_counts(ds) == {"click": 4474 + 358 + 5, "deep": 7}


@pytest.mark.dataset("taobao-ub")
def test_taobao_statistics():
    ds = load_dataset(DataConfig(dataset="taobao-ub"))
    assert ds.levels == ["pv", "deep"] and level_counts(ds) == {"pv": 3926, "deep": 190 + 128 + 77}
    assert ds.features == {} and ds.item_labels.dtype == np.int64
    ds = load_dataset(DataConfig(dataset="taobao-ub", levels="pv|cart|fav,buy"))
    assert level_counts(ds) == {"pv": 3926, "cart": 190, "fav,buy": 128 + 77}


@pytest.mark.dataset("ml-100k-mm")
def test_real_encoders_on_a_handful(capsys):
    x = F.encode_texts(["Toy Story (1995). Animation, Comedy.", "GoldenEye (1995). Action.", "Heat"])
    assert x.shape == (3, 384) and x.dtype == np.float32 and np.isfinite(x).all()
    F._image_model.cache_clear()  # load it here: its loading message must not reach stdout (the CLI's JSON)
    y = F.encode_images([resolve_data_root() / "ml-100k-mm" / "posters" / f"{i}.jpg" for i in (1, 2)])
    assert y.shape == (2, 1280) and np.isfinite(y).all() and not np.allclose(y[0], y[1])
    assert capsys.readouterr().out == ""


def test_dataset_missing_names_the_dataset_what_is_missing_and_where_to_get_it(tmp_path, monkeypatch):
    monkeypatch.delenv("M3BSR_DATA", raising=False)
    msg = sources.dataset_missing("rec-tmall", tmp_path)
    assert "rec-tmall" in msg and "rec-tmall-sample/ missing" in msg and "data/README.md" in msg and "\n" not in msg
    folder = tmp_path / "rec-tmall-sample"
    folder.mkdir()
    (folder / sources.TMALL_LOG).write_text("x")
    assert f"rec-tmall-sample/{sources.TMALL_PRODUCT} missing" in sources.dataset_missing("rec-tmall", tmp_path)
    (folder / sources.TMALL_PRODUCT).write_text("x")
    assert sources.dataset_missing("rec-tmall", tmp_path) is None
    monkeypatch.setenv("M3BSR_DATA", str(tmp_path))
    assert sources.dataset_missing("rec-tmall") is None, "the data root resolves as loading resolves it"
    assert sources.dataset_missing("synthetic", tmp_path / "nope") is None, "synthetic needs no files"
    assert "not a folder" in sources.dataset_missing("taobao-ub", tmp_path / "nope")
    with pytest.raises(DataError, match="unknown dataset 'movielens'"):
        sources.dataset_missing("movielens")


@pytest.mark.parametrize("require", [False, True])
def test_a_real_data_test_skips_with_its_reason_or_fails_when_data_is_required(require):
    """Catches a real-data test that errors without its data, skips without naming why, or skips under
    M3BSR_REQUIRE_DATA=1 (CI), where a data root gone missing must fail the suite."""
    import os
    import subprocess
    import sys
    env = {**os.environ, "M3BSR_DATA": "/nonexistent", "M3BSR_REQUIRE_DATA": "1" if require else "0"}
    test = f"{__file__}::test_taobao_statistics"
    run = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", test], env=env, capture_output=True,
                         text=True, cwd=Path(__file__).parents[1], timeout=300)
    assert run.returncode == (1 if require else 0), run.stdout + run.stderr
    line = "dataset taobao-ub not available (/nonexistent: data root given by M3BSR_DATA is not a folder); " \
           "see data/README.md, 'Where to get each dataset'"
    assert (f"M3BSR_REQUIRE_DATA=1: {line}" if require else f"SKIPPED [1] tests/test_data.py:") in run.stdout
    assert line in run.stdout


def test_data_root_resolution(tmp_path, monkeypatch):
    assert resolve_data_root(tmp_path) == tmp_path
    monkeypatch.setenv("M3BSR_DATA", str(tmp_path))
    assert resolve_data_root() == tmp_path
    monkeypatch.delenv("M3BSR_DATA")
    monkeypatch.setattr(sources, "__file__", str(tmp_path / "repo" / "lib" / "m3bsr" / "data" / "sources.py"))
    with pytest.raises(DataError, match="M3BSR_DATA"):
        resolve_data_root()
    raises_at(lambda: resolve_data_root(tmp_path / "nope"), "nope", None, "not a folder")


def test_dispatcher_errors(tmp_path):
    raises_at(lambda: load_dataset(DataConfig(dataset="ml-100k-mm", data_root=str(tmp_path))), "ml-100k-mm", None,
              "not found")
    with pytest.raises(DataError, match="unknown dataset"):
        load_dataset(DataConfig(dataset="movielens"))
    with pytest.raises(DataError, match="data_file"):
        load_dataset(DataConfig(dataset="csv"))
    with pytest.raises(DataError, match="fixed levels"):
        load_dataset(DataConfig(dataset="ml-100k-mm", deep="favor", data_root=str(tmp_path)))
    for kw in ({"deep": "favor"}, {"levels": "a|b|c"}):
        with pytest.raises(DataError, match="fixed levels"):
            load_dataset(DataConfig(dataset="synthetic", **kw))


@pytest.mark.parametrize("key, value", [("max_len", 0), ("max_len", 512), ("min_deep", 1), ("batch_size", 0),
                                        ("eval_batch_size", -1), ("eval_steps", 0), ("sampled_negatives", -5),
                                        ("syn_clusters", 0), ("syn_noise", 1.5), ("syn_noise", float("nan")),
                                        ("patience_steps", 0), ("min_steps", -1), ("heads", 0), ("lr", -1),
                                        ("weight_decay", -0.1),
                                        ("lambda_c", -1), ("lambda_b", float("nan")), ("mask_ratio", 1.5),
                                        ("tau", 0), ("tau", float("nan")), ("lr", float("inf")), ("max_steps", 0),
                                        ("inference_steps", 0),
                                        ("lambda_m", float("inf")), ("tau", float("inf"))])
def test_out_of_range_settings_are_config_errors(key, value):
    cfg = make_config("ci")
    with pytest.raises(ConfigError, match=key):
        cfg.set(key, str(value))
    cfg.set("max_len", 511)  # the bounds themselves are fine
    cfg.set("min_deep", 2)


def test_synthetic_needs_an_item_per_cluster():
    with pytest.raises(ConfigError, match="syn_clusters=300 must be at most syn_items=200"):
        make_synthetic(make_config("ci", {"syn_clusters": 300, "syn_items": 200}).data)


# ----------------------------------------------------------------------------- synthetic

def test_synthetic_deterministic():
    cfg = make_config("ci").data
    a = make_synthetic(cfg)
    b = load_dataset(cfg)
    assert a.interactions.equals(b.interactions) and a.fingerprint() == b.fingerprint()
    assert np.array_equal(a.truth["accidental"], b.truth["accidental"])
    cfg.syn_seed = 1
    assert make_synthetic(cfg).fingerprint() != a.fingerprint()


def test_synthetic_planted_truth():
    cfg = make_config("ci").data
    ds = make_synthetic(cfg)
    df, acc, tr = ds.interactions, ds.truth["accidental"], ds.truth
    assert acc.shape == (len(df),) and not acc[df.level.to_numpy() == 1].any()
    assert abs(acc[df.level.to_numpy() == 0].mean() - cfg.syn_noise) < 0.05
    assert ds.features["image"].shape == (ds.n_items + 1, 48) and ds.features["text"].shape == (ds.n_items + 1, 32)
    assert tr["clean_image"].shape == ds.features["image"].shape and tr["item_factors"].shape == (ds.n_items + 1, 16)
    assert np.array_equal(ds.item_labels, tr["item_cluster"]) and tr["item_cluster"][0] == -1
    # every favor follows a genuine click of the same item, inside one of the user's clusters
    genuine = df[(df.level == 0) & ~acc].groupby(["user", "item"])["timestamp"].min()
    fav = df[df.level == 1]
    first_click = genuine.reindex(list(zip(fav.user, fav.item))).to_numpy()
    assert (first_click < fav.timestamp.to_numpy()).all()
    assert all(tr["item_cluster"][i] in tr["user_clusters"][u] for u, i in zip(fav.user, fav.item))
    assert (fav.groupby("user").size().reindex(range(ds.n_users), fill_value=0) >= 3).mean() > 0.9


# ----------------------------------------------------------------------------- bad input

GOOD_UDATA = "1\t10\t5\t100\n1\t20\t3\t101\n2\t10\t4\t102\n2\t30\t1\t103\n"


def ml_folder(tmp_path: Path, udata: str | bytes = GOOD_UDATA, items: str | None = None) -> Path:
    folder = tmp_path / "ml-100k-mm"
    folder.mkdir()
    (folder / "u.data").write_bytes(udata.encode() if isinstance(udata, str) else udata)
    genres = ",".join(sources.ML100K_GENRES)
    if items is None:
        rows = [f"{m},Movie {m},{','.join('1' if j == m % 5 else '0' for j in range(19))},plot {m}" for m in (10, 20, 30)]
        items = f"movie_id,title,{genres},overview\n" + "\n".join(rows) + "\n"
    (folder / "items.csv").write_text(items)
    return folder


def load_ml(folder: Path):
    return load_dataset(DataConfig(dataset="ml-100k-mm", data_root=str(folder.parent)), features=False)


def test_tiny_ml_folder_loads(tmp_path):
    ds = load_ml(ml_folder(tmp_path))
    assert level_counts(ds) == {"click": 4, "favor": 2} and ds.n_items == 3


def test_missing_file(tmp_path):
    folder = ml_folder(tmp_path)
    (folder / "items.csv").unlink()
    raises_at(lambda: load_ml(folder), "items.csv", None, "not found")


def test_wrong_column_count(tmp_path):
    folder = ml_folder(tmp_path, GOOD_UDATA + "3\t10\t4\n")
    raises_at(lambda: load_ml(folder), "u.data", 5, "expected 4")


@pytest.mark.parametrize("row, column", [("x1\t10\t4\t104", "user"), ("3\t10.5\t4\t104", "item"),
                                         ("3\t10\t4\t2020-01-01", "timestamp"), ("3\t10\tgood\t104", "rating"),
                                         ("3\t10\tNaN\t104", "rating"), ("3\t10\t\t104", "rating")])
def test_non_numeric_fields(tmp_path, row, column):
    folder = ml_folder(tmp_path, GOOD_UDATA + row + "\n")
    raises_at(lambda: load_ml(folder), "u.data", 5, repr(column))


def test_empty_file(tmp_path):
    raises_at(lambda: load_ml(ml_folder(tmp_path, "\n")), "u.data", None, "empty")


def test_nul_bytes(tmp_path):
    raises_at(lambda: load_ml(ml_folder(tmp_path, GOOD_UDATA.encode() + b"3\t1\x000\t4\t104\n")), "u.data", 5, "NUL")


def test_bad_genre_value(tmp_path):
    genres = ",".join(sources.ML100K_GENRES)
    items = f"movie_id,title,{genres},overview\n10,A,{','.join(['0'] * 18)},2,plot\n"
    raises_at(lambda: load_ml(ml_folder(tmp_path, items=items)), "items.csv", 2, "0 or 1")


def test_items_header_missing_column(tmp_path):
    raises_at(lambda: load_ml(ml_folder(tmp_path, items="movie_id,title\n10,A\n")), "items.csv", 1, "overview")


def test_no_favor_at_threshold(tmp_path):
    cfg = DataConfig(dataset="ml-100k-mm", data_root=str(ml_folder(tmp_path).parent), favor_threshold=6)
    raises_at(lambda: load_dataset(cfg, features=False), "u.data", None, "favor_threshold")


def write(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


GOOD_CSV = "user_id,item_id,behavior,timestamp\nu1,a,click,1\nu1,b,buy,2\nu2,a,click,3\nu1,c,cart,4\n"


def test_generic_csv_levels_and_users_without_deep(tmp_path):
    ds = load_csv(write(tmp_path / "log.csv", GOOD_CSV), deep="buy")
    assert ds.levels == ["shallow", "deep"] and level_counts(ds) == {"shallow": 3, "deep": 1}
    assert ds.n_users == 2  # u2 has no deep event: kept, just without a target
    ds = load_csv(tmp_path / "log.csv", deep=None, levels="click|cart|buy")
    assert level_counts(ds) == {"click": 2, "cart": 1, "buy": 1}


def test_csv_not_utf8(tmp_path):
    path = write(tmp_path / "log.csv", GOOD_CSV.encode() + "u3,caf\u00e9,click,5\n".encode("latin-1"))
    raises_at(lambda: load_csv(path, deep="buy"), "log.csv", 6, "utf-8")


@pytest.mark.parametrize("newline", ["\n", "\r\n", "\r"])
def test_byte_errors_name_the_line_whatever_the_line_endings(tmp_path, newline):
    good = GOOD_CSV.replace("\n", newline).encode()
    path = write(tmp_path / "log.csv", good + f"u3,caf\u00e9,click,5{newline}".encode("latin-1"))
    raises_at(lambda: load_csv(path, deep="buy"), "log.csv", 6, "utf-8")
    path = write(tmp_path / "nul.csv", good + b"u3,i\x001,click,5" + newline.encode())
    raises_at(lambda: load_csv(path, deep="buy"), "nul.csv", 6, "NUL")


def test_csv_duplicated_header(tmp_path):
    path = write(tmp_path / "log.csv", GOOD_CSV + "user_id,item_id,behavior,timestamp\nu3,a,buy,9\n")
    raises_at(lambda: load_csv(path, deep="buy"), "log.csv", 6, "duplicated header")


def test_csv_header_only_is_empty(tmp_path):
    path = write(tmp_path / "log.csv", "user_id,item_id,behavior,timestamp\n")
    raises_at(lambda: load_csv(path, deep="buy"), "log.csv", None, "no data rows")


def test_csv_deep_required_and_known(tmp_path):
    path = write(tmp_path / "log.csv", GOOD_CSV)
    with pytest.raises(DataError, match="deep"):
        load_dataset(DataConfig(dataset="csv", data_file=str(path)))
    with pytest.raises(DataError, match="click, buy, cart"):
        load_csv(path, deep="purchase")
    with pytest.raises(DataError, match="'like'.*click, buy, cart"):
        load_csv(path, deep=None, levels="click|like")


def test_csv_bad_features(tmp_path):
    path = write(tmp_path / "log.csv", GOOD_CSV)
    ids = np.array(["a", "b", "c"])
    ds = load_csv(path, deep="buy", features={"image": (ids[:2], np.ones((2, 4)))})
    assert ds.features["image"].shape == (4, 4) and ds.feature_mask["image"].sum() == 2
    bad = np.ones((3, 4))
    bad[1, 2] = np.nan
    raises_at(lambda: load_csv(path, deep="buy", features={"image": (ids, bad)}), "log.csv", None, "NaN")
    raises_at(lambda: load_csv(path, deep="buy", features={"text": (ids, np.ones(3))}), "log.csv", None, "shape")
    raises_at(lambda: load_csv(path, deep="buy", features={"text": (ids, np.ones((2, 5)))}), "log.csv", None, "shape")


def tmall_folder(tmp_path: Path, log: bytes) -> Path:
    folder = tmp_path / "rec-tmall-sample"
    folder.mkdir()
    write(folder / sources.TMALL_LOG, log)
    write(folder / sources.TMALL_PRODUCT, "item_id,title,pict_url,category,brand_id,seller_id\n"
                                          "1,\u6253\u5e95\u886b \u5973\u88c5,http://x,1-2,b1,s1\n".encode("gbk"))
    return folder


TMALL_LOG = "item_id,user_id,action,vtime\ni1,u1,click,2014/9/18 15:03\ni1,u1,cart,2014/9/18 15:04\n"


def test_rec_tmall_not_gbk(tmp_path):
    folder = tmall_folder(tmp_path, TMALL_LOG.encode("gbk") + b"i1,u2,click,\xff\xff\n")
    cfg = DataConfig(dataset="rec-tmall", data_root=str(tmp_path))
    raises_at(lambda: load_dataset(cfg, features=False), sources.TMALL_LOG, 4, "gbk")


def test_rec_tmall_saved_as_utf8_with_a_bom_is_named(tmp_path):
    """Catches a UTF-8 BOM decoded as GBK text, which reported a header mismatch instead."""
    tmall_folder(tmp_path, b"\xef\xbb\xbf" + TMALL_LOG.encode("utf-8"))
    cfg = DataConfig(dataset="rec-tmall", data_root=str(tmp_path))
    raises_at(lambda: load_dataset(cfg, features=False), sources.TMALL_LOG, 1, "UTF-8 byte-order mark", "gbk")


def test_rec_tmall_bad_time_and_action(tmp_path):
    cfg = DataConfig(dataset="rec-tmall", data_root=str(tmp_path))
    folder = tmall_folder(tmp_path, (TMALL_LOG + "i1,u2,click,yesterday\n").encode("gbk"))
    raises_at(lambda: load_dataset(cfg, features=False), sources.TMALL_LOG, 4, "vtime")
    write(folder / sources.TMALL_LOG, (TMALL_LOG + "i1,u2,like,2014/9/18 15:03\n").encode("gbk"))
    raises_at(lambda: load_dataset(cfg, features=False), sources.TMALL_LOG, 4, "'like'", "click, collect, cart, alipay")


def taobao_folder(tmp_path: Path, rows: str) -> DataConfig:
    folder = tmp_path / "taobao-userbehavior-sample"
    folder.mkdir()
    write(folder / "UserBehavior_sample.csv", rows)
    return DataConfig(dataset="taobao-ub", data_root=str(tmp_path))


def test_taobao_unknown_deep_names_the_known_ones(tmp_path):
    cfg = taobao_folder(tmp_path, "1,10,5,pv,100\n1,11,5,buy,101\n")
    cfg.deep = "like"
    with pytest.raises(DataError, match="pv, fav, cart, buy"):
        load_dataset(cfg)
    cfg.deep, cfg.levels = None, "pv|cart|purchase"
    with pytest.raises(DataError, match="'purchase'.*pv, fav, cart, buy"):
        load_dataset(cfg)


def test_taobao_deep_matches_no_rows(tmp_path):
    cfg = taobao_folder(tmp_path, "1,10,5,pv,100\n1,11,5,buy,101\n")
    cfg.deep = "cart"
    raises_at(lambda: load_dataset(cfg), "UserBehavior_sample.csv", None, "matches no rows")


def test_taobao_header_line_is_malformed(tmp_path):
    cfg = taobao_folder(tmp_path, "1,10,5,pv,100\nuser_id,item_id,category_id,behavior,timestamp\n")
    raises_at(lambda: load_dataset(cfg), "UserBehavior_sample.csv", 2, "integer")


def test_unreadable_image(tmp_path):
    raises_at(lambda: F.load_image(write(tmp_path / "7.jpg", b"not a jpeg")), "7.jpg", None, "not a readable image")


# ----------------------------------------------------------------------------- feature cache

def test_cache_hit_truncation_and_atomicity(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return {"x": np.arange(12, dtype=np.float32).reshape(3, 4)}

    a = F.cached("demo", ["v1", b"abc"], compute, tmp_path)
    b = F.cached("demo", ["v1", b"abc"], compute, tmp_path)
    assert len(calls) == 1 and np.array_equal(a["x"], b["x"])
    F.cached("demo", ["v1", b"abd"], compute, tmp_path)  # other content, other key
    assert len(calls) == 2
    files = sorted(tmp_path.glob("demo-*.npz"))
    assert len(files) == 2
    for f in files:
        f.write_bytes(f.read_bytes()[:40])  # truncate
    c = F.cached("demo", ["v1", b"abc"], compute, tmp_path)
    assert len(calls) == 3 and np.array_equal(c["x"], a["x"])
    F.cached("demo", ["v1", b"abc"], compute, tmp_path)
    assert len(calls) == 3  # the rewritten file is valid
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*"))


def test_cache_key_part_boundaries():
    assert F.cache_key(["ab", "c"]) != F.cache_key(["a", "bc"])
    assert F.cache_key(["ab", "c"]) == F.cache_key([b"ab", b"c"])


# ---- robustness perturbations of the deep behaviour (data/perturb.py)

def _synthetic(**kw):
    return load_dataset(make_config("ci", {"dataset": "synthetic", **kw}).data)


@pytest.mark.parametrize("kw", [{"deep_noise": 0.4}, {"deep_keep": 0.25}, {"deep_noise": 1.0, "deep_keep": 0.5}])
def test_perturbed_deep_keeps_every_evaluation_target(kw):
    from m3bsr.data.sequences import SequenceData
    clean, perturbed = _synthetic(), _synthetic(**kw)
    a, b = SequenceData(clean, 20, 3), SequenceData(perturbed, 20, 3)
    assert a.n_eval_users == b.n_eval_users
    for split in ("valid", "test"):
        for key in ("users", "targets", "target_times"):
            assert np.array_equal(a.split(split)[key].numpy(), b.split(split)[key].numpy()), (split, key)
    shallow = lambda ds: ds.interactions[ds.interactions["level"] == 0].reset_index(drop=True)
    assert shallow(clean).equals(shallow(perturbed))  # only deep events change
    assert len(perturbed.truth["accidental"]) == len(perturbed.interactions)


def test_perturbed_deep_rates():
    clean = _synthetic()
    deep = clean.interactions["level"] == 1
    n_deep = clean.interactions[deep].groupby("user").size()
    targets = 2 * int((n_deep >= 3).sum())  # never perturbed: each evaluable user's last two deep events
    perturbable = int(deep.sum()) - targets  # about 1200 here: the rates below hold to about +-0.015 (1 sd)
    noisy = _synthetic(deep_noise=0.4)
    changed = int((noisy.interactions["item"] != clean.interactions["item"])[deep].sum()) / perturbable
    assert abs(changed - 0.4 * (1 - 1 / clean.n_items)) < 0.05  # a replacement may draw the same item
    sparse = _synthetic(deep_keep=0.25)
    kept = (int((sparse.interactions["level"] == 1).sum()) - targets) / perturbable
    assert 0.21 < kept < 0.32  # 0.25, plus the events restored so that evaluable users keep 3
    assert _synthetic(deep_noise=0.4).interactions.equals(noisy.interactions)  # one fixed draw


@pytest.mark.parametrize("kw", [{"deep_noise": -0.1}, {"deep_noise": 1.5}, {"deep_keep": 0.0}, {"deep_keep": 2.0}])
def test_perturbation_rejects_out_of_range(kw):
    from m3bsr.config import ConfigError
    with pytest.raises(ConfigError, match=next(iter(kw))):
        _synthetic(**kw)


def test_added_fields_leave_existing_run_hashes_alone():
    """Run folders are named by the config hash (and the code version); a field added later (ADDED_FIELDS)
    changes it only when set. be0432870770 is the default synthetic M3BSR seed-0 run of notebooks 02-06; 03ed7b89e751
    the same run under the paper's reading (docs/results.md's `schedule: cosine, lambda_c: 0.1` commands)."""
    run = {"dataset": "synthetic", "model": "m3bsr", "seed": 0}
    cfg = make_config("default", run)
    assert cfg.hash() == "be0432870770"
    assert make_config("default", {**run, "schedule": "cosine", "lambda_c": 0.1}).hash() == "03ed7b89e751"
    assert make_config("default", {**run, "deep_noise": 0.1}).hash() != cfg.hash()


# ----------------------------------------------------------------------------- gaps found by mutation testing

def test_default_data_root_is_shared_datasets_beside_the_repo(tmp_path, monkeypatch):
    """Catches a fallback data root resolved from the wrong parent of the package (<repo>/../shared/datasets)."""
    monkeypatch.delenv("M3BSR_DATA", raising=False)
    monkeypatch.setattr(sources, "__file__", str(tmp_path / "repo" / "lib" / "m3bsr" / "data" / "sources.py"))
    (tmp_path / "shared" / "datasets").mkdir(parents=True)
    assert resolve_data_root() == tmp_path / "shared" / "datasets"


def test_missing_dataset_folder_is_named_as_a_folder(tmp_path):
    """Catches a dropped dataset-folder check (the error would name a file inside a folder that is not there)."""
    raises_at(lambda: load_ml(tmp_path / "ml-100k-mm"), "ml-100k-mm", None, "dataset folder 'ml-100k-mm' not found",
              "data/README.md")


def test_header_errors_name_the_header_line_after_blank_lines(tmp_path):
    """Catches header errors reported on line 1 when blank lines come before the header."""
    path = write(tmp_path / "log.csv", "\n\nuser_id,user_id,behavior,timestamp\nu1,a,buy,1\n")
    raises_at(lambda: load_csv(path, deep="buy"), "log.csv", 3, "duplicated column")


def test_an_extra_column_in_an_exact_header_is_refused(tmp_path):
    """Catches a header check that accepts columns beyond the expected ones where the layout is exact."""
    path = write(tmp_path / "log.csv", GOOD_CSV.replace("timestamp\n", "timestamp,extra\n", 1)
                 .replace("\nu1,a,click,1\n", "\nu1,a,click,1,x\n"))
    raises_at(lambda: load_csv(path, deep="buy"), "log.csv", 1, "does not match the expected columns")


def test_deep_list_tolerates_a_trailing_comma_and_one_level_is_refused(tmp_path):
    """Catches empty behaviour names kept from "buy," and a levels= spec of a single level accepted."""
    path = write(tmp_path / "log.csv", GOOD_CSV)
    assert level_counts(load_csv(path, deep="buy, ")) == {"shallow": 3, "deep": 1}
    raises_at(lambda: load_csv(path, deep=None, levels="click,cart,buy"), "", None, "at least two")


def test_a_single_behaviour_log_is_one_deep_level(tmp_path):
    """Catches a single-behaviour log split into an empty shallow level (which raises 'matches no rows')."""
    ds = load_csv(write(tmp_path / "log.csv", "user_id,item_id,behavior,timestamp\nu1,a,buy,1\nu1,b,buy,2\n"),
                  deep="buy")
    assert ds.levels == ["deep"] and level_counts(ds) == {"deep": 2}


def test_time_ties_resolve_by_file_order_then_level(tmp_path):
    """Catches time ties ordered by level before file order (the documented order is file order, then level)."""
    path = write(tmp_path / "log.csv", "user_id,item_id,behavior,timestamp\nu1,b,buy,5\nu1,a,click,5\nu1,c,click,4\n")
    ds = load_csv(path, deep=None, levels="click,buy|buy")
    df = ds.interactions
    assert [(ds.item_ids[i], lv) for i, lv in zip(df.item, df.level)] == [("c", 0), ("b", 0), ("b", 1), ("a", 0)]


def test_csv_feature_rows_land_on_their_items(tmp_path):
    """Catches feature rows or mask bits written one index off (row 0 is padding)."""
    path = write(tmp_path / "log.csv", GOOD_CSV)
    ds = load_csv(path, deep="buy", features={"image": (np.array(["c", "a"]), np.array([[3.0, 3.0], [1.0, 1.0]]))})
    index = {raw: k for k, raw in enumerate(ds.item_ids) if k}
    x, mask = ds.features["image"], ds.feature_mask["image"]
    assert x[index["a"]].tolist() == [1.0, 1.0] and x[index["c"]].tolist() == [3.0, 3.0]
    assert not x[0].any() and not x[index["b"]].any()
    assert np.flatnonzero(mask).tolist() == sorted([index["a"], index["c"]])


def test_movie_feature_caches_follow_posters_and_encoder_versions(tmp_path, monkeypatch):
    """Catches feature cache keys that leave out the poster bytes or the encoder version (stale features reused)."""
    calls = {"text": 0, "image": 0}

    def fake_texts(docs):
        calls["text"] += 1
        return np.ones((len(docs), 2), np.float32)

    def fake_images(paths):
        calls["image"] += 1
        return np.ones((len(paths), 3), np.float32)

    monkeypatch.setattr(F, "encode_texts", fake_texts)
    monkeypatch.setattr(F, "encode_images", fake_images)
    folder = ml_folder(tmp_path)
    (folder / "posters").mkdir()
    for m in (10, 20):
        write(folder / "posters" / f"{m}.jpg", f"poster {m}")
    cfg = DataConfig(dataset="ml-100k-mm", data_root=str(tmp_path), cache_dir=str(tmp_path / "cache"))
    ds = load_dataset(cfg)
    assert calls == {"text": 1, "image": 1} and ds.feature_mask["image"].sum() == 2
    load_dataset(cfg)
    assert calls == {"text": 1, "image": 1}  # both cached
    write(folder / "posters" / "20.jpg", "a new poster 20")
    load_dataset(cfg)
    assert calls == {"text": 1, "image": 2}  # a changed poster is encoded again
    monkeypatch.setattr(F, "TEXT_ENCODER", F.TEXT_ENCODER + "-next")
    load_dataset(cfg)
    assert calls == {"text": 2, "image": 2}  # a new text encoder version is not served the old vectors


def test_ml_100k_label_is_the_first_genre(tmp_path):
    """Catches item labels taken from another genre than the first listed."""
    genres = ",".join(sources.ML100K_GENRES)
    two = lambda a, b: ",".join("1" if j in (a, b) else "0" for j in range(19))
    items = f"movie_id,title,{genres},overview\n" + "".join(f"{m},M,{two(2, 7 + k)},p\n" for k, m in enumerate((10, 20, 30)))
    ds = load_ml(ml_folder(tmp_path, items=items))
    assert list(ds.item_labels[1:]) == ["Adventure"] * 3


def test_validate_refuses_each_broken_invariant():
    """Catches a dropped Dataset.validate check (item 0, level out of range, no deep event, bad feature rows)."""
    import pandas as pd

    from m3bsr.data.schema import finalize
    raw = pd.DataFrame({"user": [1, 1, 2], "item": ["a", "b", "a"], "level": [0, 1, 1], "timestamp": [1, 2, 3],
                        "order": [0, 1, 2]})

    def fresh():
        ds, _, _ = finalize("toy", raw, ["click", "favor"])
        ds.features["image"] = np.ones((ds.n_items + 1, 2), np.float32)
        ds.feature_mask["image"] = np.ones(ds.n_items + 1, bool)
        return ds.validate()

    breaks = {"item index outside": lambda ds: ds.interactions.loc.__setitem__((0, "item"), 0),
              "level outside": lambda ds: ds.interactions.loc.__setitem__((0, "level"), 2),
              "no event of the deep": lambda ds: ds.interactions.__setitem__("level", 0),
              "features have shape": lambda ds: ds.features.__setitem__("image", np.ones((ds.n_items, 2))),
              "NaN/inf": lambda ds: ds.features["image"].__setitem__((1, 1), np.inf),
              "mask missing": lambda ds: ds.feature_mask.__setitem__("image", np.ones(ds.n_items, bool))}
    for words, corrupt in breaks.items():
        ds = fresh()
        corrupt(ds)
        with pytest.raises(DataError, match=words):
            ds.validate()


def test_fingerprint_covers_timestamps_level_names_features_and_masks():
    """Catches a dataset fingerprint (negatives cache, checkpoints) blind to timestamps, level names,
    feature values or masks."""
    cfg = make_config("ci", {"syn_users": 20}).data
    base = make_synthetic(cfg).fingerprint()
    for change in (lambda ds: ds.interactions.__setitem__("timestamp", ds.interactions["timestamp"] + 1),
                   lambda ds: setattr(ds, "levels", ["view", "buy"]),
                   lambda ds: ds.features["text"].__setitem__((1, 0), ds.features["text"][1, 0] + 1),
                   lambda ds: ds.feature_mask["image"].__setitem__(1, False)):
        ds = make_synthetic(cfg)
        change(ds)
        assert ds.fingerprint() != base


def test_dataset_stats_by_hand():
    """Catches density over all events instead of distinct (user, item) pairs or over items alone,
    the mean or the minimum given as the median or the maximum, and a level counted with the ones below."""
    events = [(0, 1, 0, 1), (1, 1, 0, 1), (1, 1, 1, 1),  # events per user 1, 2, 6: median 2, mean 3
              (2, 1, 0, 1), (2, 2, 0, 2), (2, 2, 1, 2), (2, 3, 0, 3), (2, 4, 0, 4), (2, 4, 1, 5)]
    df = pd.DataFrame(events, columns=["user", "item", "level", "timestamp"])
    stats = Dataset("toy", df, ["click", "favor"], n_users=3, n_items=4).validate().stats()
    assert stats == {"dataset": "toy", "users": 3, "items": 4, "events": 9, "#click": 6, "#favor": 3,
                     "seq_len_median": 2.0, "seq_len_mean": 3.0, "seq_len_max": 6,
                     "density": 0.5,  # 6 distinct (user, item) pairs of 3 x 4
                     "modalities": "-"}


def test_feature_cache_creates_nested_folders(tmp_path):
    """Catches a cache folder created without its missing parents."""
    out = F.cached("demo", ["k"], lambda: {"x": np.ones(2)}, tmp_path / "a" / "b")
    assert out["x"].tolist() == [1.0, 1.0] and len(list((tmp_path / "a" / "b").glob("demo-*.npz"))) == 1


def test_tfidf_svd_is_deterministic_and_too_few_documents_are_a_data_error():
    """Catches an unseeded SVD, k beyond n - 1, and a rank-0 SVD escaping as a sklearn error."""
    docs = ["red shirt", "blue shirt", "red dress", "blue jeans", "wool coat"]
    a, b = F.tfidf_svd(docs, 64), F.tfidf_svd(docs, 64)
    assert a.shape == (5, 4) and np.array_equal(a, b)  # k = min(dim, n - 1, vocabulary - 1)
    with pytest.raises(DataError, match="too few"):
        F.tfidf_svd(["red shirt"], 3)


def test_load_image_keeps_rows_and_converts_greyscale(tmp_path):
    """Catches an image transposed (rows become columns) and a greyscale poster not converted to RGB."""
    from PIL import Image
    im = Image.new("RGB", (40, 40), (0, 0, 0))
    im.paste((255, 255, 255), (0, 0, 40, 20))  # top half white
    im.save(tmp_path / "1.png")
    x = F.load_image(tmp_path / "1.png")
    assert x[:, 0, :].mean() > x[:, -1, :].mean() + 1.0  # row 0 (top) is the white one
    Image.new("L", (30, 30), 128).save(tmp_path / "2.png")
    assert F.load_image(tmp_path / "2.png").shape == (3, F.IMAGE_SIZE, F.IMAGE_SIZE)


def test_synthetic_generator_honours_its_settings():
    """Catches syn_feature_noise ignored, a user's second cluster equal to its first, fewer than MIN_CLICKS clicks,
    and syn_clusters == syn_items refused."""
    from m3bsr.data import synthetic as Y
    clean = make_synthetic(make_config("ci", {"syn_feature_noise": 0.0}).data)
    for m in ("image", "text"):
        assert np.allclose(clean.features[m], clean.truth[f"clean_{m}"])
    uc = clean.truth["user_clusters"]
    assert (uc[:, 1] >= 0).any() and (uc[:, 1] != uc[:, 0]).all()
    few = make_synthetic(make_config("ci", {"syn_users": 30, "syn_events": 0}).data)
    clicks = few.interactions[few.interactions.level == 0].groupby("user").size()
    assert few.n_users == 30 and (clicks == Y.MIN_CLICKS).all()
    one_each = make_synthetic(make_config("ci", {"syn_users": 30, "syn_items": 20, "syn_clusters": 20}).data)
    assert len(set(one_each.truth["item_cluster"][1:])) == one_each.n_items  # one item per cluster


def test_deep_keep_restores_the_latest_events_down_to_min_deep():
    """Catches load_dataset ignoring min_deep and removal restoring more (or other) deep events than it must."""
    min_deep = 5
    clean = _synthetic(min_deep=min_deep)
    sparse = _synthetic(min_deep=min_deep, deep_keep=1e-9)  # every perturbable deep event is drawn for removal
    deep = lambda ds: ds.interactions[ds.interactions.level == 1]
    for u, rows in deep(clean).groupby("user"):
        kept = deep(sparse)[deep(sparse).user == u]
        expected = rows.iloc[-min_deep:] if len(rows) >= min_deep else rows.iloc[:0]
        assert kept[["item", "timestamp"]].values.tolist() == expected[["item", "timestamp"]].values.tolist(), u


def test_deep_noise_draws_from_the_whole_catalogue():
    """Catches replacement items drawn from 1..n_items-1 (the last item never drawn)."""
    kw = {"syn_items": 20, "syn_clusters": 4}
    clean, noisy = _synthetic(**kw), _synthetic(deep_noise=1.0, **kw)
    changed = (clean.interactions.level == 1) & (clean.interactions.item != noisy.interactions.item)
    assert set(noisy.interactions.item[changed]) == set(range(1, noisy.n_items + 1))


@pytest.mark.parametrize("key, value", [("T", "none"), ("cdbd", "maybe"), ("epochs", "1.5")])
def test_config_strings_must_parse_to_the_field_type(key, value):
    """Catches "none" accepted for a non-optional field, an unparsable bool kept as a string, a float truncated to int."""
    with pytest.raises(ConfigError, match=key):
        make_config("ci").set(key, value)


@pytest.mark.parametrize("key, value", [("T", 2.5), ("T", None), ("T", True), ("cdbd", 1), ("tau", None),
                                        ("model", 5), ("data_root", 3.0), ("seed", True)])
def test_config_values_that_are_not_strings_must_have_the_field_type(key, value):
    """Catches Python and config.json values skipping the type check that strings get (T=2.5 would fail
    later inside torch), for make_config, Config.set and Config.from_dict alike."""
    from m3bsr.config import Config
    with pytest.raises(ConfigError, match=key):
        make_config("ci", {key: value})
    d = make_config("ci").to_dict()
    section = next(s for s in ("data", "model", "train") if key in d[s])
    d[section][key] = value
    with pytest.raises(ConfigError, match=key):
        Config.from_dict(d)


def test_config_accepts_ints_for_floats_and_numpy_scalars_as_python_numbers():
    """An int in a float field stays as given (the run hash is unchanged); numpy scalars become Python
    numbers, so the config still serialises to JSON."""
    cfg = make_config("ci", {"T": np.int64(4), "lr": np.float32(0.5), "lambda_c": 0, "inference_steps": None})
    assert (type(cfg.model.T), type(cfg.train.lr), cfg.model.lambda_c) == (int, float, 0)
    assert cfg.hash() == make_config("ci", {"T": 4, "lr": 0.5, "lambda_c": 0}).hash()


def test_config_from_dict_refuses_a_field_in_the_wrong_section_and_unknown_profiles():
    """Catches from_dict accepting data.lr (set finds lr in train) and make_config raising KeyError on a bad profile."""
    from m3bsr.config import Config
    d = make_config("ci").to_dict()
    d["data"]["lr"] = 0.5
    with pytest.raises(ConfigError, match="data.lr"):
        Config.from_dict(d)
    with pytest.raises(ConfigError, match="unknown profile"):
        make_config("fast")
