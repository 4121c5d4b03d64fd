"""Loaders from raw files to a validated :class:`~m3bsr.data.schema.Dataset`.

``load_dataset(cfg)`` dispatches on ``cfg.dataset``:

========================  =============================  ====================  ===================
dataset                   folder under the data root     levels (shallow->deep) modalities
========================  =============================  ====================  ===================
``ml-100k-mm``            ``ml-100k-mm/``                click, favor          image, text
``ml-latest-small-mm``    ``ml-latest-small-mm/``        click, favor          image, text
``rec-tmall``             ``rec-tmall-sample/``          click, deep           text (TF-IDF + SVD)
``taobao-ub``             ``taobao-userbehavior-sample/`` pv, deep             -
``csv``                   ``cfg.data_file``              shallow, deep         -
``synthetic``             (generated, see synthetic.py)  click, favor          image, text
========================  =============================  ====================  ===================

MovieLens: every rating is a click; a rating >= ``favor_threshold`` is also a favor at the same
timestamp. Logs with named behaviours: an event gets every level whose behaviour group holds its
raw behaviour; by default the deep group is ``cfg.deep`` (or the loader's default) and level 0
holds every other behaviour; ``cfg.levels = "pv|cart|fav,buy"`` builds one level per ``|`` group.
``order`` = the event's row in its file, so time ties resolve by file order, then level.

Bad input raises :class:`DataError` naming the file, the 1-based line (header included) or the
column, and what was expected.
"""
from __future__ import annotations

import codecs
import csv
import io
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from ..config import DataConfig
from . import features as F
from .perturb import perturb_deep
from .schema import Dataset, DataError, finalize
from .synthetic import make_synthetic

ML100K_GENRES = ["genre_unknown", "Action", "Adventure", "Animation", "Children", "Comedy", "Crime",
                 "Documentary", "Drama", "Fantasy", "FilmNoir", "Horror", "Musical", "Mystery", "Romance",
                 "SciFi", "Thriller", "War", "Western"]
TMALL_ACTIONS = ["click", "collect", "cart", "alipay"]
TAOBAO_BEHAVIOURS = ["pv", "fav", "cart", "buy"]
TMALL_LOG = "sam_tianchi_2014002_rec_tmall_log.csv"
TMALL_PRODUCT = "sam_tianchi_2014001_rec_tmall_product.csv"
TAOBAO_LOG = "UserBehavior_sample.csv"
# dataset -> (its folder under the data root, the files its loader reads there; "posters/": the poster folder)
LAYOUT: dict[str, tuple[str, tuple[str, ...]]] = {
    "ml-100k-mm": ("ml-100k-mm", ("u.data", "items.csv", "posters/")),
    "ml-latest-small-mm": ("ml-latest-small-mm", ("ratings.csv", "movies.csv", "tags.csv", "posters/")),
    "rec-tmall": ("rec-tmall-sample", (TMALL_LOG, TMALL_PRODUCT)),
    "taobao-ub": ("taobao-userbehavior-sample", (TAOBAO_LOG,)),
}
GET_DATA = "data/README.md, 'Where to get each dataset'"


# ----------------------------------------------------------------------------- data root

def resolve_data_root(root: str | Path | None = None) -> Path:
    """The folder holding the dataset folders: ``root``, else ``$M3BSR_DATA``, else ``<repo>/../shared/datasets``."""
    for candidate, origin in ((root, "--data-root"), (os.environ.get("M3BSR_DATA"), "M3BSR_DATA")):
        if candidate:
            p = Path(candidate).expanduser()
            if not p.is_dir():
                raise DataError(f"data root given by {origin} is not a folder", file=p)
            return p
    fallback = Path(__file__).resolve().parents[3].parent / "shared" / "datasets"
    if fallback.is_dir():
        return fallback
    raise DataError("no data root: set --data-root (data_root=...) or the M3BSR_DATA environment variable "
                    "to the folder holding the datasets; see data/README.md for downloads and layout")


def dataset_missing(name: str, data_root: str | Path | None = None) -> str | None:
    """None when every file of dataset ``name`` (:data:`LAYOUT`) is under the data root, else a one-line
    message naming the dataset, what is missing and where to get it (why a test or notebook cell skips).

    ``data_root`` is resolved as :func:`resolve_data_root` does; ``synthetic`` needs no files (None).
    """
    if name == "synthetic":
        return None
    if name not in LAYOUT:
        raise DataError(f"unknown dataset {name!r}; expected synthetic or one of {', '.join(LAYOUT)}")
    try:
        root = resolve_data_root(data_root)
    except DataError as e:
        return f"dataset {name} not available ({e}); see {GET_DATA}"
    folder, files = LAYOUT[name]
    missing = [f for f in files if not (root / folder / f).exists()]
    if not missing:
        return None
    what = f"{folder}/" if not (root / folder).is_dir() else ", ".join(f"{folder}/{f}" for f in missing)
    return f"dataset {name} not available ({what} missing under the data root {root}); see {GET_DATA}"


def _folder(root: Path, name: str) -> Path:
    p = root / name
    if not p.is_dir():
        raise DataError(f"dataset folder {name!r} not found under the data root (see data/README.md)", file=p)
    return p


# ----------------------------------------------------------------------------- robust CSV reading

class Table:
    """A CSV file read as strings: ``df`` (one str column per field) and ``lines`` (1-based line per row)."""

    def __init__(self, path: Path, df: pd.DataFrame, lines: np.ndarray):
        self.path, self.df, self.lines = path, df, lines

    def fail(self, row: int, message: str) -> DataError:
        return DataError(message, file=self.path, line=int(self.lines[row]))

    def ints(self, col: str) -> np.ndarray:
        """Column as int64; the first non-integer value raises DataError with its line."""
        s = self.df[col].str.strip()
        ok = s.str.fullmatch(r"[+-]?\d{1,18}").to_numpy(bool)
        if not ok.all():
            row = int(np.argmin(ok))
            raise self.fail(row, f"column {col!r}: expected an integer, got {self.df[col].iloc[row]!r}")
        return s.astype(np.int64).to_numpy()

    def floats(self, col: str) -> np.ndarray:
        """Column as finite float64; the first non-number, NaN or inf raises DataError with its line."""
        x = pd.to_numeric(self.df[col].str.strip(), errors="coerce").to_numpy(np.float64)
        ok = np.isfinite(x)
        if not ok.all():
            row = int(np.argmin(ok))
            raise self.fail(row, f"column {col!r}: expected a finite number, got {self.df[col].iloc[row]!r}")
        return x

    def nonempty(self, col: str) -> np.ndarray:
        """Column as stripped strings; an empty value raises DataError with its line."""
        s = self.df[col].str.strip()
        ok = (s != "").to_numpy(bool)
        if not ok.all():
            row = int(np.argmin(ok))
            raise self.fail(row, f"column {col!r}: expected a non-empty value")
        return s.to_numpy(dtype=object)


def _line_at(data: bytes, pos: int) -> int:
    """1-based physical line of byte ``pos`` (LF, CR LF and a lone CR each end a line)."""
    head = data[:pos]
    return head.count(b"\n") + head.count(b"\r") - head.count(b"\r\n") + 1


def read_table(path: str | Path, columns: Sequence[str], *, header: bool = True, sep: str = ",",
               encoding: str = "utf-8", exact: bool = True, multiline: Sequence[str] = ()) -> Table:
    """Read a delimited text file strictly.

    header=True: the first line must name every column of ``columns`` (extra columns allowed unless
    ``exact``); a later line equal to the header is an error. header=False: every line has exactly
    ``len(columns)`` fields, named ``columns``. Blank lines are skipped. Only the columns in
    ``multiline`` may hold a quoted line break: anywhere else one is a quote left open, which would
    swallow the lines after it. Errors (missing, unreadable or empty file, NUL bytes, undecodable
    bytes, duplicated column names, wrong field counts, malformed quoting, an unclosed quote) raise
    DataError with the line where the record starts (physical lines, header included).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError("file not found", file=path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read the file ({e.strerror})", file=path) from None
    if not data.strip():
        raise DataError("file is empty", file=path)
    if b"\x00" in data:
        raise DataError("NUL byte in file (binary or corrupted?)", file=path, line=_line_at(data, data.index(b"\x00")))
    if data.startswith(codecs.BOM_UTF8) and codecs.lookup(encoding).name != "utf-8":  # else the BOM decodes as text
        raise DataError(f"starts with a UTF-8 byte-order mark (a UTF-8 file); expected {encoding}-encoded text",
                        file=path, line=1)
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as e:
        raise DataError(f"bytes not valid {encoding} ({e.reason}); expected {encoding}-encoded text",
                        file=path, line=_line_at(data, e.start)) from None
    reader = csv.reader(io.StringIO(text.lstrip("\ufeff"), newline=""), delimiter=sep)
    rows: list[list[str]] = []
    lines: list[int] = []
    names = list(columns)
    start = 1  # physical line on which the record being read starts
    try:
        if header:
            names = next((r for r in reader if r), None)
            if names is None:
                raise DataError("no header line (only a byte-order mark or blank lines)", file=path)
            hline = reader.line_num
            dupes = sorted({c for c in names if names.count(c) > 1})
            if dupes:
                raise DataError(f"duplicated column name(s) {dupes} in the header", file=path, line=hline)
            missing = [c for c in columns if c not in names]
            if missing or (exact and len(names) != len(columns)):
                raise DataError(f"header {names} does not match the expected columns {list(columns)}",
                                file=path, line=hline)
            start = reader.line_num + 1
        for r in reader:
            line, start = start, reader.line_num + 1
            if not r:
                continue
            spans = (f" (a quoted field opened on it runs to line {reader.line_num}: unclosed '\"'?)"
                     if reader.line_num > line else "")
            if len(r) != len(names):
                raise DataError(f"expected {len(names)} {sep!r}-separated fields ({', '.join(names)}), "
                                f"got {len(r)}{spans}", file=path, line=line)
            broken = [c for c, v in zip(names, r) if c not in multiline and ("\n" in v or "\r" in v)]
            if broken:
                raise DataError(f"column {broken[0]!r} may not span lines{spans}", file=path, line=line)
            if header and r == names:
                raise DataError("duplicated header line", file=path, line=line)
            rows.append(r)
            lines.append(line)
    except csv.Error as e:
        raise DataError(f"malformed CSV ({e}) in the record starting here", file=path, line=start) from None
    if not rows:
        raise DataError("no data rows", file=path)
    return Table(path, pd.DataFrame(rows, columns=names, dtype=str), np.asarray(lines))


# ----------------------------------------------------------------------------- behaviour levels

def behaviour_levels(known: Sequence[str], deep: str | None, levels: str | None, *, default_deep: str | None,
                     shallow_name: str, what: str) -> tuple[list[str], list[set[str]]]:
    """Level names and the raw behaviours of each level, shallow -> deep.

    ``levels="pv|cart|fav,buy"``: one level per ``|`` group, named by the group. Otherwise two
    levels: ``shallow_name`` (every known behaviour not deep) and ``"deep"`` (``deep`` or
    ``default_deep``, comma-separated), or the single level ``"deep"`` when every behaviour is deep. Behaviours in no group are dropped. Unknown names raise
    DataError listing the known ones.
    """
    def parse(group: str, field: str) -> set[str]:
        names = {b.strip() for b in group.split(",") if b.strip()}
        unknown = sorted(names - set(known))
        if not names or unknown:
            raise DataError(f"{field}={group!r}: unknown or empty behaviour {unknown or group!r}; "
                            f"{what} has {', '.join(known)}")
        return names

    if levels:
        groups = [g.strip() for g in levels.split("|")]
        sets = [parse(g, "levels") for g in groups]
        if len(sets) < 2:
            raise DataError(f"levels={levels!r}: need at least two '|'-separated levels (shallow|deep)")
        return groups, sets
    deep_spec = deep or default_deep
    if not deep_spec:
        raise DataError(f"{what}: name the deep (target) behaviours with deep=... (one or more of {', '.join(known)})")
    deep_set = parse(deep_spec, "deep")
    shallow = set(known) - deep_set
    if not shallow:  # a single-behaviour dataset: one level, the target behaviour
        return ["deep"], [deep_set]
    return [shallow_name, "deep"], [shallow, deep_set]


def leveled_events(users: np.ndarray, items: np.ndarray, behaviour: np.ndarray, ts: np.ndarray,
                   level_sets: list[set[str]], level_names: list[str], file: Any) -> pd.DataFrame:
    """Raw event frame for :func:`finalize`: one row per (event, level whose group holds its behaviour)."""
    parts = []
    for lvl, group in enumerate(level_sets):
        sel = np.isin(behaviour, list(group))
        if not sel.any():
            raise DataError(f"level {level_names[lvl]!r} ({', '.join(sorted(group))}) matches no rows", file=file)
        idx = np.flatnonzero(sel)
        parts.append(pd.DataFrame({"user": users[idx], "item": items[idx], "level": lvl,
                                   "timestamp": ts[idx], "order": idx}))
    return pd.concat(parts, ignore_index=True)


def _check_known(table: Table, col: str, known: Sequence[str]) -> np.ndarray:
    vals = table.nonempty(col)
    bad = ~np.isin(vals, list(known))
    if bad.any():
        row = int(np.argmax(bad))
        raise table.fail(row, f"column {col!r}: unknown behaviour {vals[row]!r}; expected one of {', '.join(known)}")
    return vals


# ----------------------------------------------------------------------------- features

def _attach(ds: Dataset, modality: str, item_index: pd.Index, raw_ids: Sequence[Any], matrix: np.ndarray) -> None:
    """Put ``matrix`` rows (one per ``raw_ids``) at the items' dataset indices; others stay zero, mask False."""
    matrix = np.asarray(matrix, dtype=np.float32)
    pos = item_index.get_indexer(pd.Index(raw_ids))
    keep = pos >= 0
    x = np.zeros((ds.n_items + 1, matrix.shape[1]), np.float32)
    mask = np.zeros(ds.n_items + 1, bool)
    x[pos[keep] + 1] = matrix[keep]
    mask[pos[keep] + 1] = True
    ds.features[modality], ds.feature_mask[modality] = x, mask


def _movie_features(ds: Dataset, items: pd.Index, name: str, texts: dict[Any, str], posters: Path,
                    cache_dir: str | None) -> None:
    """MiniLM text features and EfficientNet poster features (``posters/<raw id>.jpg``), through the disk cache."""
    ids = [i for i in items if i in texts]
    docs = [texts[i] for i in ids]
    text = F.cached(f"{name}-text", [F.TEXT_ENCODER, *docs], lambda: {"x": F.encode_texts(docs)}, cache_dir)["x"]
    _attach(ds, "text", items, ids, text)
    with_poster = [i for i in items if (posters / f"{i}.jpg").is_file()]
    if not with_poster:  # no poster at all: no image modality
        return
    paths = [posters / f"{i}.jpg" for i in with_poster]
    key = [F.IMAGE_ENCODER, *(part for i, p in zip(with_poster, paths) for part in (str(i), p.read_bytes()))]
    image = F.cached(f"{name}-image", key, lambda: {"x": F.encode_images(paths)}, cache_dir)["x"]
    _attach(ds, "image", items, with_poster, image)


def _check_covers(table: Table, described: Sequence[Any], items: pd.Index) -> None:
    """A metadata file must describe at least one logged item (it catches, e.g., another dataset's file
    whose ids are all different; a file of overlapping ids passes, its missing items get ``missing``)."""
    if not pd.Index(items).isin(list(described)).any():
        raise DataError(f"describes none of the {len(items)} logged item ids (e.g. {', '.join(map(str, items[:3]))}); "
                        f"expected the metadata of this log", file=table.path)


def _labels(items: pd.Index, label_of: dict[Any, Any], missing: Any = "unknown") -> np.ndarray:
    return np.array([None] + [label_of.get(i, missing) for i in items], dtype=object)


# ----------------------------------------------------------------------------- loaders

def load_ml_100k(folder: str | Path, favor_threshold: float = 4.0, features: bool = True,
                 cache_dir: str | None = None) -> Dataset:
    """MovieLens-100K + TMDB metadata: ``u.data`` (user, item, rating, ts; tab-separated),
    ``items.csv`` (movie_id, title, genre one-hots, overview) and ``posters/<movie_id>.jpg``.

    Text = "title. genres. overview" (MiniLM, 384-d); image = poster (EfficientNet-Lite0, 1280-d).
    item_labels = first genre.
    """
    folder = Path(folder)
    t = read_table(folder / "u.data", ["user", "item", "rating", "timestamp"], header=False, sep="\t")
    ds, items = _ratings_dataset("ml-100k-mm", t, t.ints("user"), t.ints("item"), t.floats("rating"),
                                 t.ints("timestamp"), favor_threshold)
    meta = read_table(folder / "items.csv", ["movie_id", "title", "overview", *ML100K_GENRES], exact=False,
                      multiline=["overview"])
    ids = meta.ints("movie_id")
    first = ~pd.Series(ids).duplicated().to_numpy()
    onehot = np.stack([meta.ints(g) for g in ML100K_GENRES], axis=1)
    bad = ~np.isin(onehot, (0, 1)).all(axis=1)
    if bad.any():
        raise meta.fail(int(np.argmax(bad)), f"genre columns {ML100K_GENRES}: expected 0 or 1")
    genre_names = [g.replace("genre_", "") for g in ML100K_GENRES]
    texts, label_of = {}, {}
    for row in np.flatnonzero(first):
        genres = [genre_names[j] for j in np.flatnonzero(onehot[row])]
        texts[ids[row]] = f"{meta.df['title'].iat[row].strip()}. {', '.join(genres)}. {meta.df['overview'].iat[row].strip()}"
        label_of[ids[row]] = genres[0] if genres else "unknown"
    _check_covers(meta, texts, items)
    ds.item_labels = _labels(items, label_of)
    if features:
        _movie_features(ds, items, "ml-100k-mm", texts, folder / "posters", cache_dir)
    return ds.validate()


def load_ml_latest_small(folder: str | Path, favor_threshold: float = 4.0, features: bool = True,
                         cache_dir: str | None = None) -> Dataset:
    """MovieLens latest-small: ``ratings.csv``, ``movies.csv`` (title, "|"-separated genres),
    ``tags.csv`` and ``posters/<movieId>.jpg``.

    Text = "title. genres. tags" (the movie's distinct tags in file order); image = poster.
    item_labels = first genre.
    """
    folder = Path(folder)
    t = read_table(folder / "ratings.csv", ["userId", "movieId", "rating", "timestamp"])
    ds, items = _ratings_dataset("ml-latest-small-mm", t, t.ints("userId"), t.ints("movieId"),
                                 t.floats("rating"), t.ints("timestamp"), favor_threshold)
    movies = read_table(folder / "movies.csv", ["movieId", "title", "genres"])
    tags = read_table(folder / "tags.csv", ["userId", "movieId", "tag", "timestamp"])
    tag_ids = tags.ints("movieId")
    tags_of: dict[int, list[str]] = {}
    for mid, tag in zip(tag_ids, tags.df["tag"].str.strip()):
        if tag and tag not in tags_of.setdefault(mid, []):
            tags_of[mid].append(tag)
    texts, label_of = {}, {}
    for mid, title, genres in zip(movies.ints("movieId"), movies.df["title"], movies.df["genres"]):
        g = [x for x in genres.split("|") if x and x != "(no genres listed)"]
        texts.setdefault(mid, f"{title.strip()}. {', '.join(g)}. {', '.join(tags_of.get(mid, []))}")
        label_of.setdefault(mid, g[0] if g else "unknown")
    _check_covers(movies, texts, items)
    ds.item_labels = _labels(items, label_of)
    if features:
        _movie_features(ds, items, "ml-latest-small-mm", texts, folder / "posters", cache_dir)
    return ds.validate()


def _ratings_dataset(name: str, t: Table, user: np.ndarray, item: np.ndarray, rating: np.ndarray,
                     ts: np.ndarray, favor_threshold: float) -> tuple[Dataset, pd.Index]:
    """Every rating -> click (level 0); rating >= favor_threshold -> also favor (level 1)."""
    behaviour = np.where(rating >= favor_threshold, "favor", "click")
    if not (behaviour == "favor").any():
        raise DataError(f"no rating >= favor_threshold={favor_threshold}: no favor (deep) events", file=t.path)
    raw = leveled_events(user, item, behaviour, ts, [{"click", "favor"}, {"favor"}], ["click", "favor"], t.path)
    ds, _, items = finalize(name, raw, ["click", "favor"], file=t.path)
    return ds, items


def load_rec_tmall(folder: str | Path, deep: str | None = None, levels: str | None = None,
                   features: bool = True, cache_dir: str | None = None) -> Dataset:
    """Rec-Tmall sample (GBK CSV). Log: item_id (``i161``), user_id, action in {click, collect, cart,
    alipay}, vtime (``2014/9/18 15:03``). Product: item_id (``161``, no ``i``), title keywords.

    Levels default to click | deep = collect,cart,alipay. Text = TF-IDF over the title keywords
    -> TruncatedSVD (<= 64-d); items without a title have mask False. item_labels = category.
    """
    folder = Path(folder)
    t = read_table(folder / TMALL_LOG, ["item_id", "user_id", "action", "vtime"], encoding="gbk")
    names, sets = behaviour_levels(TMALL_ACTIONS, deep, levels, default_deep="collect,cart,alipay",
                                   shallow_name="click", what="Rec-Tmall")
    item = t.nonempty("item_id")
    user = t.nonempty("user_id")
    action = _check_known(t, "action", TMALL_ACTIONS)
    when = pd.to_datetime(t.df["vtime"].str.strip(), format="%Y/%m/%d %H:%M", errors="coerce")
    if when.isna().any():
        row = int(np.argmax(when.isna().to_numpy()))
        raise t.fail(row, f"column 'vtime': expected a time like 2014/9/18 15:03, got {t.df['vtime'].iat[row]!r}")
    ts = ((when - pd.Timestamp("1970-01-01")) // pd.Timedelta(seconds=1)).to_numpy(np.int64)
    raw = leveled_events(user, item, action, ts, sets, names, t.path)
    ds, _, items = finalize("rec-tmall", raw, names, file=t.path)

    prod = read_table(folder / TMALL_PRODUCT, ["item_id", "title", "category"], encoding="gbk", exact=False)
    pid = np.array(["i" + s.removeprefix("i") for s in prod.nonempty("item_id")], dtype=object)
    first = ~pd.Series(pid).duplicated().to_numpy()
    titles = prod.df["title"].str.strip().to_numpy(dtype=object)
    ds.item_labels = _labels(items, dict(zip(pid[first], prod.df["category"].to_numpy(dtype=object)[first])))
    if features:
        has = first & (titles != "") & pd.Index(pid).isin(items)
        if has.sum() < 3:
            raise DataError(f"only {int(has.sum())} logged items have a title; cannot build text features",
                            file=prod.path)
        docs = list(titles[has])
        x = F.cached("rec-tmall-text", [F.TFIDF_ENCODER, *pid[has], *docs], lambda: {"x": F.tfidf_svd(docs, 64)},
                     cache_dir)["x"]
        _attach(ds, "text", items, pid[has], x)
    return ds.validate()


def load_taobao(folder: str | Path, deep: str | None = None, levels: str | None = None) -> Dataset:
    """Taobao UserBehavior (no header): user_id, item_id, category_id, behavior in {pv, fav, cart,
    buy}, unix_ts. Levels default to pv | deep = fav,cart,buy. item_labels = category id. No modalities."""
    t = read_table(Path(folder) / TAOBAO_LOG, ["user_id", "item_id", "category_id", "behavior", "timestamp"],
                   header=False)
    names, sets = behaviour_levels(TAOBAO_BEHAVIOURS, deep, levels, default_deep="fav,cart,buy",
                                   shallow_name="pv", what="Taobao UserBehavior")
    user, item, cat, ts = t.ints("user_id"), t.ints("item_id"), t.ints("category_id"), t.ints("timestamp")
    behaviour = _check_known(t, "behavior", TAOBAO_BEHAVIOURS)
    raw = leveled_events(user, item, behaviour, ts, sets, names, t.path)
    ds, _, items = finalize("taobao-ub", raw, names, file=t.path)
    first = ~pd.Series(item).duplicated().to_numpy()
    label_of = dict(zip(item[first], cat[first]))
    ds.item_labels = np.array([-1] + [label_of[i] for i in items], dtype=np.int64)
    return ds.validate()


def load_csv(path: str | Path, deep: str | None, levels: str | None = None,
             features: dict[str, tuple[np.ndarray, np.ndarray]] | None = None) -> Dataset:
    """Generic log: UTF-8 CSV with header ``user_id,item_id,behavior,timestamp`` (ids: any
    non-empty string; timestamp: integer, e.g. unix seconds).

    ``deep``: comma-separated deep behaviours (required unless ``levels``); every other behaviour
    is level 0 ``"shallow"``. ``features``: modality -> (raw item ids ``(n,)``, matrix ``(n, D)``);
    ids unique, the matrix real and finite as float32 (else DataError); logged items missing from
    ``ids`` get a zero row and mask False.
    """
    path = Path(path)
    t = read_table(path, ["user_id", "item_id", "behavior", "timestamp"])
    behaviour = t.nonempty("behavior")
    known = list(pd.unique(behaviour))
    names, sets = behaviour_levels(known, deep, levels, default_deep=None, shallow_name="shallow",
                                   what=f"{path.name} (column behavior)")
    raw = leveled_events(t.nonempty("user_id"), t.nonempty("item_id"), behaviour, t.ints("timestamp"), sets, names, path)
    ds, _, items = finalize(path.stem, raw, names, file=path)
    for modality, pair in (features or {}).items():
        ids, matrix = _feature_pair(modality, pair, path)
        _attach(ds, modality, items, ids, matrix)
    return ds.validate()


def _feature_pair(modality: str, pair: Any, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Check one ``(ids (n,), matrix (n, D))`` pair -> (str ids, float32 matrix), else DataError."""
    what = f"{modality} features"
    try:
        ids, matrix = pair
        ids, matrix = np.asarray(ids), np.asarray(matrix)
    except (TypeError, ValueError) as e:  # not a pair, or a ragged matrix
        raise DataError(f"{what}: expected a pair (ids (n,), matrix (n, D)) of arrays ({e})", file=path) from None
    if ids.ndim != 1:
        raise DataError(f"{what}: expected ids of shape (n,), got shape {ids.shape}", file=path)
    if matrix.ndim != 2 or matrix.shape[0] != len(ids) or matrix.shape[1] == 0:
        raise DataError(f"{what}: expected a matrix of shape (n_ids={len(ids)}, D >= 1), got shape {matrix.shape}",
                        file=path)
    if not (np.issubdtype(matrix.dtype, np.integer) or np.issubdtype(matrix.dtype, np.floating)):
        raise DataError(f"{what}: expected real numbers, got dtype {matrix.dtype}", file=path)
    with np.errstate(over="ignore"):
        x = matrix.astype(np.float32)
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        row = int(np.argmax(bad))
        raise DataError(f"{what}: NaN/inf (or beyond float32) in row {row} (id {str(ids[row])!r}); expected finite numbers",
                        file=path)
    ids = ids.astype(str)
    dup = pd.Index(ids).duplicated()
    if dup.any():
        raise DataError(f"{what}: item id {str(ids[int(np.argmax(dup))])!r} has two rows", file=path)
    return ids, x


def load_dataset(cfg: DataConfig, features: bool = True) -> Dataset:
    """The dataset named by ``cfg.dataset``, from ``cfg``'s data root / file, with its deep events
    perturbed when ``cfg.deep_noise`` / ``cfg.deep_keep`` ask for it (:mod:`~m3bsr.data.perturb`).

    features=False skips the image/text encoders (fast; for statistics and tests).
    """
    return perturb_deep(_load(cfg, features), cfg.deep_noise, cfg.deep_keep, cfg.min_deep)


def _load(cfg: DataConfig, features: bool) -> Dataset:
    name = cfg.dataset
    if name in ("synthetic", "ml-100k-mm", "ml-latest-small-mm") and (cfg.deep or cfg.levels):
        raise DataError(f"{name} has fixed levels click|favor" + (" (favor = rating >= favor_threshold)"
                        if name.startswith("ml-") else "") + "; deep/levels do not apply")
    if name == "synthetic":
        return make_synthetic(cfg)
    if name == "csv":
        if not cfg.data_file:
            raise DataError("dataset=csv needs data_file=<path to a CSV with user_id,item_id,behavior,timestamp>")
        return load_csv(cfg.data_file, cfg.deep, cfg.levels)
    loaders = {
        "ml-100k-mm": lambda folder: load_ml_100k(folder, cfg.favor_threshold, features, cfg.cache_dir),
        "ml-latest-small-mm": lambda folder: load_ml_latest_small(folder, cfg.favor_threshold, features, cfg.cache_dir),
        "rec-tmall": lambda folder: load_rec_tmall(folder, cfg.deep, cfg.levels, features, cfg.cache_dir),
        "taobao-ub": lambda folder: load_taobao(folder, cfg.deep, cfg.levels),
    }
    if name not in loaders:
        raise DataError(f"unknown dataset {name!r}; expected one of synthetic, csv, {', '.join(loaders)}")
    return loaders[name](_folder(resolve_data_root(cfg.data_root), LAYOUT[name][0]))
