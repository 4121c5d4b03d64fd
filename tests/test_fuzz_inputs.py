"""Corrupted inputs for every loader (issue #7): each case loads correctly or raises DataError.

A DataError names the file (and the 1-based physical line where one exists), carries no chained
traceback from pandas/numpy/csv, and no cache is left half-written (no temporary file in the cache
folder). Tiny fake dataset folders are built in tmp_path; test_data.py holds the first-line cases
(missing file, wrong field count, non-numeric fields, NUL, latin-1 CSV, duplicated header line, ...);
these extend them.
"""
from __future__ import annotations

import io
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

from m3bsr.config import DataConfig
from m3bsr.data import features as F
from m3bsr.data import sources
from m3bsr.data.schema import DataError
from m3bsr.data.sequences import SequenceData
from m3bsr.data.sources import load_csv, load_dataset
from m3bsr.train import sampled_negatives

GENRES = ",".join(sources.ML100K_GENRES)


def onehot(j: int) -> str:
    return ",".join("1" if k == j else "0" for k in range(len(sources.ML100K_GENRES)))


UDATA = "1\t10\t5\t100\n1\t20\t3\t101\n2\t10\t4\t102\n2\t30\t1\t103\n"
ITEMS = f"movie_id,title,{GENRES},overview\n" + "".join(  # genres Action, Adventure, Animation
    f"{m},Movie {m},{onehot(m // 10)},plot {m}\n" for m in (10, 20, 30))
RATINGS = "userId,movieId,rating,timestamp\n1,10,5.0,100\n1,20,3.0,101\n2,10,4.0,102\n2,30,1.0,103\n"
MOVIES = "movieId,title,genres\n10,A (1995),Comedy|Drama\n20,B (1996),Action\n30,C (1997),(no genres listed)\n"
TAGS = "userId,movieId,tag,timestamp\n1,10,funny,100\n2,10,funny,101\n"
TMALL_LOG = ("item_id,user_id,action,vtime\ni1,u1,click,2014/9/18 15:03\ni2,u1,cart,2014/9/18 15:04\n"
             "i3,u2,click,2014/9/19 10:00\ni4,u2,alipay,2014/9/19 10:05\n")
TMALL_PRODUCT = ("item_id,title,pict_url,category,brand_id,seller_id\n"
                 "1,\u6253\u5e95\u886b \u5973\u88c5,http://x,c1,b1,s1\n"
                 "2,\u8fde\u8863\u88d9 \u590f,http://x,c2,b1,s1\n"
                 "3,\u725b\u4ed4\u88e4 \u7537,http://x,c1,b2,s2\n"
                 "4,\u5916\u5957 \u51ac \u5973\u88c5,http://x,c3,b3,s2\n")
TAOBAO = "1,10,5,pv,100\n1,11,5,buy,101\n2,10,5,pv,102\n2,12,6,cart,103\n"
CSV = "user_id,item_id,behavior,timestamp\nu1,a,click,1\nu1,b,buy,2\nu2,a,click,3\nu1,c,cart,4\n"

FOLDERS = {  # dataset -> (folder, {file: default content}, encoding)
    "ml-100k-mm": ("ml-100k-mm", {"u.data": UDATA, "items.csv": ITEMS}, "utf-8"),
    "ml-latest-small-mm": ("ml-latest-small-mm", {"ratings.csv": RATINGS, "movies.csv": MOVIES, "tags.csv": TAGS},
                           "utf-8"),
    "rec-tmall": ("rec-tmall-sample", {sources.TMALL_LOG: TMALL_LOG, sources.TMALL_PRODUCT: TMALL_PRODUCT}, "gbk"),
    "taobao-ub": ("taobao-userbehavior-sample", {"UserBehavior_sample.csv": TAOBAO}, "utf-8"),
    "csv": ("", {"log.csv": CSV}, "utf-8"),
}


@dataclass
class Case:
    name: str
    dataset: str
    files: dict[str, Any] = field(default_factory=dict)  # file -> str | bytes | None (delete) | callable(default)
    error: tuple[str, int | None, str] | None = None  # (file named, line or None, a word of the message)
    check: Callable[[Any], bool] | None = None  # for cases that load: what must hold
    features: Any = None  # csv: the features= argument; rec-tmall: True to build TF-IDF text features
    cache_is_file: bool = False


def build(tmp_path: Path, case: Case) -> Callable[[], Any]:
    folder_name, defaults, encoding = FOLDERS[case.dataset]
    folder = tmp_path / "root" / folder_name
    folder.mkdir(parents=True)
    for name, default in defaults.items():
        content = case.files.get(name, default)
        if callable(content):
            content = content(default)
        if content is None:
            continue
        if isinstance(content, str):
            content = content.encode(encoding)
        (folder / name).write_bytes(content)
    for name, content in case.files.items():  # extra paths (e.g. a folder where a file should be)
        if name not in defaults and content == "<dir>":
            (folder / name).mkdir()
    cache = tmp_path / "cache"
    if case.cache_is_file:
        cache.write_text("not a folder")
    if case.dataset == "csv":
        return lambda: load_csv(folder / "log.csv", deep="buy", features=case.features)
    cfg = DataConfig(dataset=case.dataset, data_root=str(tmp_path / "root"), cache_dir=str(cache))
    return lambda: load_dataset(cfg, features=bool(case.features))


def utf16(text: str) -> bytes:
    return text.encode("utf-16")


def levels_of(ds) -> dict[str, int]:
    return {name: int((ds.interactions["level"] == k).sum()) for k, name in enumerate(ds.levels)}


def first_user_items(ds) -> list:
    df = ds.interactions
    return [ds.item_ids[i] for i in df[df.user == 0].item]


ONES = np.ones((3, 4))
IDS = np.array(["a", "b", "c"])

CASES = [
    # ---- ml-100k-mm (u.data tab-separated, no header; items.csv)
    Case("udata truncated mid-row", "ml-100k-mm", {"u.data": UDATA + "3\t10"}, ("u.data", 5, "expected 4")),
    Case("udata user id beyond int64", "ml-100k-mm", {"u.data": UDATA + "99999999999999999999\t10\t4\t104\n"},
         ("u.data", 5, "'user'")),
    Case("udata negative timestamp loads (sorted first)", "ml-100k-mm", {"u.data": UDATA + "1\t30\t4\t-5\n"},
         check=lambda ds: first_user_items(ds)[:2] == [30, 30]),
    Case("udata float timestamp", "ml-100k-mm", {"u.data": UDATA + "3\t10\t4\t104.5\n"}, ("u.data", 5, "'timestamp'")),
    Case("udata infinite rating", "ml-100k-mm", {"u.data": UDATA + "3\t10\tinf\t104\n"}, ("u.data", 5, "'rating'")),
    Case("udata UTF-16 encoded", "ml-100k-mm", {"u.data": utf16(UDATA)}, ("u.data", 1, "NUL")),
    Case("udata random high bytes", "ml-100k-mm",
         {"u.data": UDATA.encode() + bytes(random.Random(7).randrange(128, 256) for _ in range(64))},
         ("u.data", 5, "utf-8")),
    Case("udata CRLF line endings and BOM load", "ml-100k-mm", {"u.data": "\ufeff" + UDATA.replace("\n", "\r\n")},
         check=lambda ds: levels_of(ds) == {"click": 4, "favor": 2}),
    Case("udata blank lines and padded fields load", "ml-100k-mm",
         {"u.data": "\n" + UDATA.replace("\t5\t", "\t 5 \t") + "\n\n"},
         check=lambda ds: levels_of(ds) == {"click": 4, "favor": 2}),
    Case("udata is a folder", "ml-100k-mm", {"u.data": None, "u.data/": "<dir>"}, ("u.data", None, "not found")),
    Case("items duplicated column name", "ml-100k-mm",
         {"items.csv": ITEMS.replace("movie_id,title,", "movie_id,title,title,", 1)
          .replace("\n10,", "\n10,x,").replace("\n20,", "\n20,x,").replace("\n30,", "\n30,x,")},
         ("items.csv", 1, "duplicated column")),
    Case("items latin-1 title", "ml-100k-mm",
         {"items.csv": lambda d: d.encode() + f"40,Caf\u00e9,{onehot(1)},x\n".encode("latin-1")},
         ("items.csv", 5, "utf-8")),
    Case("items unclosed quote", "ml-100k-mm", {"items.csv": ITEMS + f'40,"Movie 40,{onehot(1)},plot\n'},
         ("items.csv", 5, "expected")),
    Case("items overview over two lines; later line numbers stay physical", "ml-100k-mm",
         {"items.csv": ITEMS + f'40,M,{onehot(1)},"two\nlines"\nx41,M,{onehot(1)},plot\n'},
         ("items.csv", 7, "'movie_id'")),
    Case("items field over the csv size limit", "ml-100k-mm",
         {"items.csv": ITEMS + f"40,M,{onehot(1)},{'x' * 200_000}\n"},
         ("items.csv", 5, "malformed CSV")),
    Case("items byte-order mark only", "ml-100k-mm", {"items.csv": "\ufeff"}, ("items.csv", None, "no header")),
    Case("items duplicated movie row keeps the first", "ml-100k-mm",
         {"items.csv": ITEMS + f"10,Other,{onehot(3)},other\n"},
         check=lambda ds: list(ds.item_labels[1:]) == ["Action", "Adventure", "Animation"]),
    Case("items of another dataset (no logged movie)", "ml-100k-mm", {"items.csv": ITEMS.replace("\n10,", "\n910,")
         .replace("\n20,", "\n920,").replace("\n30,", "\n930,")}, ("items.csv", None, "none of the 3 logged item ids")),
    Case("movies of another dataset (no logged movie)", "ml-latest-small-mm",
         {"movies.csv": MOVIES.replace("\n10,", "\n910,").replace("\n20,", "\n920,").replace("\n30,", "\n930,")},
         ("movies.csv", None, "none of the 3 logged item ids")),
    Case("items missing a logged movie -> label unknown", "ml-100k-mm",
         {"items.csv": ITEMS.split("\n30,")[0] + "\n"},
         check=lambda ds: ds.item_labels[-1] == "unknown"),
    Case("items genre 1.0 instead of 1", "ml-100k-mm", {"items.csv": ITEMS.replace(",1,", ",1.0,", 1)},
         ("items.csv", 2, "integer")),
    # ---- ml-latest-small-mm (headers; tags)
    Case("ratings columns reordered load", "ml-latest-small-mm",
         {"ratings.csv": "timestamp,rating,movieId,userId\n100,5.0,10,1\n101,3.0,20,1\n102,4.0,10,2\n"},
         check=lambda ds: levels_of(ds) == {"click": 3, "favor": 2}),
    Case("ratings decimal comma", "ml-latest-small-mm", {"ratings.csv": RATINGS + '3,10,"4,5",104\n'},
         ("ratings.csv", 6, "'rating'")),
    Case("ratings header missing", "ml-latest-small-mm", {"ratings.csv": RATINGS.split("\n", 1)[1]},
         ("ratings.csv", 1, "header")),
    Case("ratings zero bytes", "ml-latest-small-mm", {"ratings.csv": b""}, ("ratings.csv", None, "empty")),
    Case("ratings header only", "ml-latest-small-mm", {"ratings.csv": "userId,movieId,rating,timestamp\n"},
         ("ratings.csv", None, "no data rows")),
    Case("ratings NaN timestamp", "ml-latest-small-mm", {"ratings.csv": RATINGS + "3,10,4.0,nan\n"},
         ("ratings.csv", 6, "'timestamp'")),
    Case("tags missing", "ml-latest-small-mm", {"tags.csv": None}, ("tags.csv", None, "not found")),
    Case("tags non-numeric movieId", "ml-latest-small-mm", {"tags.csv": TAGS + "1,ten,fun,100\n"},
         ("tags.csv", 4, "'movieId'")),
    Case("movies quoted newline in a title", "ml-latest-small-mm",
         {"movies.csv": MOVIES + '40,"Two\nLines",Drama\n'}, ("movies.csv", 5, "'title' may not span lines")),
    Case("tags unclosed quote would swallow the rows after it", "ml-latest-small-mm",
         {"tags.csv": TAGS.replace("1,10,funny,100", '1,10,"funny,100') + "2,20,good,102\n2,30,bad,103\n"},
         ("tags.csv", 2, "runs to line 5")),
    Case("tags quote closed lines later, field count right", "ml-latest-small-mm",
         {"tags.csv": TAGS.replace("1,10,funny,100\n2,10,funny,101", '1,10,"funny,100\n2,10,funny",101')},
         ("tags.csv", 2, "'tag' may not span lines")),
    # ---- rec-tmall (GBK)
    Case("tmall vtime with seconds", "rec-tmall", {sources.TMALL_LOG: TMALL_LOG + "i1,u3,click,2014/9/18 15:03:22\n"},
         (sources.TMALL_LOG, 6, "vtime")),
    Case("tmall vtime in year 9999 loads", "rec-tmall", {sources.TMALL_LOG: TMALL_LOG + "i1,u3,click,9999/1/1 00:00\n"},
         check=lambda ds: ds.interactions.timestamp.max() == 253370764800),
    Case("tmall vtime with a 5-digit year", "rec-tmall",
         {sources.TMALL_LOG: TMALL_LOG + "i1,u3,click,10000/1/1 00:00\n"},
         (sources.TMALL_LOG, 6, "vtime")),
    Case("tmall empty user id", "rec-tmall", {sources.TMALL_LOG: TMALL_LOG + "i1, ,click,2014/9/18 15:03\n"},
         (sources.TMALL_LOG, 6, "'user_id'")),
    Case("tmall product not GBK", "rec-tmall",
         {sources.TMALL_PRODUCT: lambda d: d.encode("gbk") + b"5,\xff\xfe,u,c,b,s\n"},
         (sources.TMALL_PRODUCT, 6, "gbk")),
    Case("tmall product without category column", "rec-tmall",
         {sources.TMALL_PRODUCT: "item_id,title,pict_url\n1,t,u\n"}, (sources.TMALL_PRODUCT, 1, "category")),
    Case("tmall text features: too few titles, cache untouched", "rec-tmall",
         {sources.TMALL_PRODUCT: "item_id,title,category\n1,a b,c\n2,,c\n"}, (sources.TMALL_PRODUCT, None, "title"),
         features=True),
    Case("tmall text features load and are cached", "rec-tmall", {}, features=True,
         check=lambda ds: ds.features["text"].shape[0] == 5 and ds.feature_mask["text"][1:].all()),
    Case("tmall cache_dir is a file", "rec-tmall", {}, ("cache", None, "cache folder"), features=True,
         cache_is_file=True),
    # ---- taobao-ub (no header)
    Case("taobao timestamp of 19 digits", "taobao-ub",
         {"UserBehavior_sample.csv": TAOBAO + "3,10,5,pv,9999999999999999999\n"},
         ("UserBehavior_sample.csv", 5, "'timestamp'")),
    Case("taobao 18-digit and negative timestamps load", "taobao-ub",
         {"UserBehavior_sample.csv": TAOBAO + "1,13,5,pv,999999999999999999\n1,14,5,buy,-7\n"},
         check=lambda ds: ds.interactions.timestamp.agg(["min", "max"]).tolist() == [-7, 999999999999999999]),
    Case("taobao non-numeric category", "taobao-ub", {"UserBehavior_sample.csv": TAOBAO + "3,10,cat,pv,104\n"},
         ("UserBehavior_sample.csv", 5, "'category_id'")),
    Case("taobao semicolon-separated", "taobao-ub", {"UserBehavior_sample.csv": TAOBAO.replace(",", ";")},
         ("UserBehavior_sample.csv", 1, "expected 5")),
    Case("taobao behaviour padded with spaces loads", "taobao-ub",
         {"UserBehavior_sample.csv": TAOBAO.replace(",buy,", ", buy ,")},
         check=lambda ds: levels_of(ds) == {"pv": 2, "deep": 2}),
    Case("taobao unknown behaviour", "taobao-ub", {"UserBehavior_sample.csv": TAOBAO + "3,10,5,PV,104\n"},
         ("UserBehavior_sample.csv", 5, "'PV'")),
    # ---- generic CSV
    Case("csv duplicated column in header", "csv",
         {"log.csv": "user_id,item_id,behavior,timestamp,timestamp\nu1,a,buy,1,1\n"},
         ("log.csv", 1, "duplicated column")),
    Case("csv header in upper case", "csv", {"log.csv": CSV.upper()}, ("log.csv", 1, "header")),
    Case("csv timestamp in scientific notation", "csv", {"log.csv": CSV + "u2,b,buy,1e9\n"},
         ("log.csv", 6, "'timestamp'")),
    Case("csv blank behaviour", "csv", {"log.csv": CSV + "u2,b,  ,5\n"}, ("log.csv", 6, "'behavior'")),
    Case("csv old-Mac CR line endings load", "csv", {"log.csv": CSV.replace("\n", "\r")},
         check=lambda ds: levels_of(ds) == {"shallow": 3, "deep": 1}),
    Case("csv byte-order mark only", "csv", {"log.csv": "\ufeff"}, ("log.csv", None, "no header")),
    Case("csv whitespace only", "csv", {"log.csv": " \n\t\n\n"}, ("log.csv", None, "empty")),
    Case("csv 10k-character ids load", "csv", {"log.csv": CSV + f"{'u' * 10_000},{'i' * 10_000},buy,5\n"},
         check=lambda ds: ds.n_users == 3),
    # ---- feature arrays (generic CSV, features=)
    Case("features ragged rows", "csv", features={"image": (IDS, [[1.0, 2.0], [1.0], [1.0, 2.0]])},
         error=("log.csv", None, "pair")),
    Case("features complex numbers", "csv", features={"image": (IDS, ONES + 1j)}, error=("log.csv", None, "real")),
    Case("features strings", "csv", features={"text": (IDS, np.full((3, 2), "x"))}, error=("log.csv", None, "real")),
    Case("features inf", "csv", features={"image": (IDS, np.where(np.eye(3, 4) > 0, np.inf, 1.0))},
         error=("log.csv", None, "NaN/inf")),
    Case("features beyond float32", "csv", features={"image": (IDS, ONES * 1e300)}, error=("log.csv", None, "float32")),
    Case("features duplicated id", "csv", features={"image": (np.array(["a", "b", "a"]), ONES)},
         error=("log.csv", None, "'a'")),
    Case("features 2-D ids", "csv", features={"image": (IDS[:, None], ONES)}, error=("log.csv", None, "ids of shape")),
    Case("features zero width", "csv", features={"image": (IDS, np.ones((3, 0)))}, error=("log.csv", None, "D >= 1")),
    Case("features 3-D", "csv", features={"image": (IDS, np.ones((3, 2, 2)))}, error=("log.csv", None, "shape")),
    Case("features not an (ids, matrix) pair", "csv", features={"image": ONES}, error=("log.csv", None, "pair")),
    Case("features integer matrix and unknown ids load", "csv",
         features={"image": (np.array(["a", "zz"]), np.arange(6).reshape(2, 3))},
         check=lambda ds: ds.features["image"].dtype == np.float32 and ds.feature_mask["image"].sum() == 1),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_corrupted_input_loads_or_raises_data_error(tmp_path, case):
    load = build(tmp_path, case)
    if case.error is None:
        ds = load()
        assert ds.validate() is ds
        if case.check is not None:
            assert case.check(ds), f"{case.name}: loaded, but not as expected"
    else:
        file_name, line, word = case.error
        with pytest.raises(Exception) as info:
            load()
        err = info.value
        assert type(err) is DataError, f"{type(err).__name__} escaped: {err}"
        msg = str(err)
        assert file_name in msg and word in msg, msg
        if line is not None:
            assert f"line {line}:" in msg, msg
        assert err.__cause__ is None and (err.__context__ is None or err.__suppress_context__), \
            "the error chains a traceback from a library"
    cache = tmp_path / "cache"
    if cache.is_dir():
        assert not [p.name for p in cache.iterdir() if p.name.startswith(".") or p.name.endswith(".tmp")]


def test_at_least_twenty_distinct_cases():
    assert len({c.name for c in CASES}) == len(CASES) >= 20


TRUNCATED = [("ml-100k-mm", "u.data"), ("ml-latest-small-mm", "ratings.csv"), ("taobao-ub", "UserBehavior_sample.csv"),
             ("csv", "log.csv"), ("rec-tmall", sources.TMALL_LOG)]


@pytest.mark.parametrize("dataset, name", TRUNCATED, ids=[d for d, _ in TRUNCATED])
def test_truncated_at_every_byte(tmp_path, dataset, name):
    """A file cut at any byte (a copy interrupted mid-way) loads what is there or raises DataError."""
    full = FOLDERS[dataset][1][name].encode(FOLDERS[dataset][2])
    outcomes = {"loaded": 0, "DataError": 0}
    for cut in range(len(full)):
        sub = tmp_path / str(cut)
        load = build(sub, Case(f"cut {cut}", dataset, {name: full[:cut]}))
        try:
            load()
            outcomes["loaded"] += 1
        except DataError as e:
            assert name in str(e) or "no event" in str(e) or "matches no rows" in str(e), (cut, str(e))
            outcomes["DataError"] += 1
    assert outcomes["loaded"] >= 1 and outcomes["DataError"] >= 1, outcomes


def test_corrupted_negatives_cache_is_redrawn_atomically(tmp_path):
    ds = load_csv(_write(tmp_path / "log.csv", CSV + "u1,d,buy,5\nu1,e,buy,6\n"), deep="buy")
    seq = SequenceData(ds, max_len=5, min_deep=3)
    first = sampled_negatives(seq, "test", 2, tmp_path / "cache")
    [path] = list((tmp_path / "cache").iterdir())
    out_of_range, wrong_shape = io.BytesIO(), io.BytesIO()
    np.save(out_of_range, first.numpy() + 2 ** 31)  # well-formed, but no such items
    np.save(wrong_shape, first.numpy()[:, :1])  # well-formed, but one negative per row, not 2
    for corrupted in (path.read_bytes()[:20], b"", b"\x93NUMPY garbage", out_of_range.getvalue(),
                      wrong_shape.getvalue()):
        path.write_bytes(corrupted)
        assert np.array_equal(sampled_negatives(seq, "test", 2, tmp_path / "cache"), first)
        assert [p.name for p in (tmp_path / "cache").iterdir()] == [path.name]  # rewritten, no temporary left
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match="cache folder"):
        sampled_negatives(seq, "valid", 2, tmp_path / "file")


def test_truncated_poster_is_a_data_error(tmp_path):
    from PIL import Image
    Image.new("RGB", (32, 32), (200, 10, 10)).save(tmp_path / "1.jpg")
    raw = (tmp_path / "1.jpg").read_bytes()
    (tmp_path / "2.jpg").write_bytes(raw[: len(raw) // 2])
    assert F.load_image(tmp_path / "1.jpg").shape == (3, F.IMAGE_SIZE, F.IMAGE_SIZE)
    with pytest.raises(DataError, match="2.jpg.*not a readable image"):
        F.load_image(tmp_path / "2.jpg")


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ---- gaps found by mutation testing: what loads must also be right

def test_ml_latest_labels_first_genre_of_the_first_row_else_unknown(tmp_path):
    """Catches "(no genres listed)" used as a label and a duplicated movie row overriding the first one."""
    ds = build(tmp_path, Case("labels", "ml-latest-small-mm", {"movies.csv": MOVIES + "10,A again,Horror\n"}))()
    assert list(ds.item_labels[1:]) == ["Comedy", "Action", "unknown"]


def test_taobao_label_is_the_category_of_the_items_first_row(tmp_path):
    """Catches item categories taken from a later row of the same item."""
    ds = build(tmp_path, Case("labels", "taobao-ub", {"UserBehavior_sample.csv": TAOBAO + "3,10,9,pv,104\n"}))()
    assert ds.item_labels.tolist() == [-1, 5, 5, 6]


def test_tmall_labels_are_categories_and_untitled_items_have_no_text(tmp_path):
    """Catches labels read from another column and an empty title encoded as a document (mask True)."""
    product = TMALL_PRODUCT.replace("\n2,\u8fde\u8863\u88d9 \u590f,", "\n2,,")
    ds = build(tmp_path, Case("text", "rec-tmall", {sources.TMALL_PRODUCT: product}, features=True))()
    ids = list(ds.item_ids[1:])
    assert dict(zip(ids, ds.item_labels[1:])) == {"i1": "c1", "i2": "c2", "i3": "c1", "i4": "c3"}
    mask = dict(zip(ids, ds.feature_mask["text"][1:]))
    assert mask == {"i1": True, "i2": False, "i3": True, "i4": True} and not ds.features["text"][1 + ids.index("i2")].any()


def test_tmall_text_cache_key_holds_the_encoder_version(tmp_path, monkeypatch):
    """Catches a TF-IDF cache key without the encoder version (old vectors served after an encoder change)."""
    load = build(tmp_path, Case("text", "rec-tmall", {}, features=True))
    load()
    monkeypatch.setattr(F, "TFIDF_ENCODER", F.TFIDF_ENCODER + "-next")
    load()
    assert len(list((tmp_path / "cache").glob("rec-tmall-text-*.npz"))) == 2
