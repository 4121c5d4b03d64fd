"""What the notebooks share: parameter checks, output folders, figure/table files, plots; and
``python -m m3bsr.viz compare`` (``make compare``), a reproduction's tables against the committed ones.

Only the notebooks import this module. Every figure goes through :func:`save_figure` (PNG and
PDF with fixed metadata, so re-running a notebook rewrites byte-identical files) and every
table through :func:`save_table` (CSV and markdown). matplotlib is imported inside the
functions that draw.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from .config import CHOICES, PROFILES, check_jobs, repo_root
from .data.schema import Dataset
from .files import atomic_write_bytes

DATASETS = tuple(d for d in CHOICES["dataset"] if d != "csv")  # the named sources a notebook can load
DPI = 110
POSTER_DPI = 92  # the ML posters are 92 px wide thumbnails
PNG_METADATA = {"Software": None}
PDF_METADATA = {"CreationDate": None, "ModDate": None, "Producer": None, "Creator": None}


# ----------------------------------------------------------------------------- parameters and folders

def check_choice(what: str, value: Any, allowed: Iterable[Any]) -> None:
    """Raise ValueError naming ``value`` and the allowed values unless ``value in allowed``."""
    allowed = list(allowed)
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; allowed: {', '.join(map(str, allowed))}")


# A notebook's `plan`: how many runs it trains (the profile sets each run's size). quick: the default
# profile's hour on a 2-core CPU (fewer datasets, variants and sweep points; each notebook says which);
# full: all of them, the committed outputs.
PLANS = ("quick", "full")


def resolve_plan(plan: str | None, profile: str) -> str:
    """``plan`` itself, or for None the profile's: ``quick`` under ``default``, ``full`` under ``ci``
    (tiny runs, every code path) and ``paper`` (the whole study). ValueError on an unknown plan."""
    if plan is None:
        return "quick" if profile == "default" else "full"
    check_choice("plan", plan, PLANS)
    return plan


def check_parameters(profile: str, datasets: Sequence[str], seeds: Sequence[int], device: str,
                     data_root: str | None = None, models: Sequence[str] | None = None, jobs: int | None = None,
                     plan: str | None = None) -> None:
    """The checks every notebook's first cell after ``parameters`` runs; ValueError on a bad value."""
    check_choice("profile", profile, PROFILES)
    resolve_plan(plan, profile)
    check_jobs(jobs)  # ConfigError, a ValueError
    if isinstance(datasets, str) or not len(datasets):
        raise ValueError(f"datasets must be a non-empty list of names, got {datasets!r}; allowed: {', '.join(DATASETS)}")
    for d in datasets:
        check_choice("dataset", d, DATASETS)
    if isinstance(seeds, (str, int)) or not len(seeds) or not all(isinstance(s, int) for s in seeds):
        raise ValueError(f"seeds must be a non-empty list of integers, got {seeds!r}")
    if models is not None:
        from .models.registry import MODELS  # noqa: PLC0415 (imports torch)
        if isinstance(models, str) or not len(models):
            raise ValueError(f"models must be a non-empty list of names, got {models!r}; allowed: {', '.join(MODELS)}")
        for m in models:
            check_choice("model", m, MODELS)
    if not isinstance(device, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
        raise ValueError(f"unknown device {device!r}; allowed: auto, cpu, cuda, cuda:N")
    if device.startswith("cuda"):
        import torch  # noqa: PLC0415
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available; allowed here: auto, cpu")
    if data_root is not None and not resolve_path(data_root).is_dir():
        raise ValueError(f"data_root {data_root!r} is not a folder")


def resolve_path(path: str | Path) -> Path:
    """``path`` itself when absolute, else relative to the repository (not to the working folder)."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else repo_root() / p


def shown(path: str | Path) -> str:
    """``path`` relative to the repository when inside it (for printing without machine paths)."""
    p = Path(path).resolve()
    try:
        return str(p.relative_to(repo_root().resolve()))
    except ValueError:
        return f"<outside the repository>/{p.name}"


def output_dir(path: str | Path | None, default: str) -> Path:
    """The folder ``path`` (or ``<repo>/<default>``), resolved against the repository and created."""
    p = resolve_path(path if path is not None else default)
    p.mkdir(parents=True, exist_ok=True)
    return p


def environment(device: str = "cpu") -> str:
    """One line naming the versions (python, torch, numpy, m3bsr) and the device ``device`` (a notebook's
    parameter: auto | cpu | cuda[:N]) resolves to, e.g. ``python 3.11.7, torch 2.13.0, numpy 2.3.1,
    m3bsr 0.1.0; device cpu: AMD EPYC 7B13 (2 cores), 2 threads``."""
    import platform  # noqa: PLC0415

    import torch  # noqa: PLC0415

    from . import __version__  # noqa: PLC0415
    from .bench import _device_name  # noqa: PLC0415
    from .train import resolve_device  # noqa: PLC0415
    dev = resolve_device(device)
    threads = torch.get_num_threads()
    where = _device_name(dev) + ("" if dev.type == "cuda" else f", {threads} thread{'s' * (threads != 1)}")
    return (f"python {platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}, "
            f"m3bsr {__version__}; device {dev}: {where}")


def save_figure(fig, name: str, folder: str | Path, dpi: int | None = None) -> list[Path]:
    """Write ``<folder>/<name>.png`` (at ``dpi``, default the figure's) and ``.pdf`` with fixed
    metadata, so that re-running a notebook rewrites byte-identical files."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    png, pdf = folder / f"{name}.png", folder / f"{name}.pdf"
    for path, options in ((png, {"dpi": dpi or fig.dpi, "metadata": PNG_METADATA}), (pdf, {"metadata": PDF_METADATA})):
        buf = io.BytesIO()
        fig.savefig(buf, format=path.suffix[1:], bbox_inches="tight", **options)
        atomic_write_bytes(path, buf.getvalue())
    return [png, pdf]


SCREEN_WIDTH = 800  # px: the width of a figure shown inside a notebook (the saved PNG keeps its dpi)


def screen_png(path: str | Path, width: int = SCREEN_WIDTH) -> bytes:
    """The PNG at ``path`` scaled down to at most ``width`` pixels wide and stored with a 256-colour
    palette: a few hundred kB instead of megabytes for a dense scatter plot, for embedding in a notebook."""
    from PIL import Image  # noqa: PLC0415
    with Image.open(path) as im:
        im = im.convert("RGB")
        if im.width > width:
            im = im.resize((width, round(im.height * width / im.width)), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        im.quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def show_figure(fig, paths: Sequence[Path], width: int = SCREEN_WIDTH):
    """Close ``fig`` and return its saved PNG (``paths``, from :func:`save_figure`) as a screen-sized
    image for the notebook to display (see :func:`screen_png`)."""
    from IPython.display import Image  # noqa: PLC0415
    _plt().close(fig)
    return Image(data=screen_png(next(p for p in paths if Path(p).suffix == ".png"), width))


def to_markdown(df: pd.DataFrame, index: bool = True, floatfmt: str = "{:.4g}") -> str:
    """A GitHub-flavoured markdown table (no extra dependency)."""
    frame = df.reset_index() if index and (df.index.name or any(df.index.names)) else df
    def text(v: Any) -> str:
        return str(v).replace("|", "\\|")  # a | inside a cell or header would split it

    def cell(v: Any) -> str:
        return floatfmt.format(v) if isinstance(v, float) else text(v)
    lines = ["| " + " | ".join(map(text, frame.columns)) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def save_table(df: pd.DataFrame, name: str, folder: str | Path, markdown: str | None = None) -> list[Path]:
    """Write ``<folder>/<name>.csv`` and ``<name>.md`` (``markdown`` if given, else :func:`to_markdown`)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    csv, md = folder / f"{name}.csv", folder / f"{name}.md"
    atomic_write_bytes(csv, df.to_csv(index=bool(df.index.name or any(df.index.names))).encode())
    atomic_write_bytes(md, (markdown if markdown is not None else to_markdown(df)).encode())
    return [csv, md]


def save_csv(df: pd.DataFrame, path: str | Path) -> None:
    """Write ``df`` without its index to ``path``, all or nothing (a run list, e.g. ``04_runs.csv``)."""
    atomic_write_bytes(Path(path), df.to_csv(index=False).encode())


def _plt():
    import matplotlib  # noqa: PLC0415
    import matplotlib.pyplot as plt  # noqa: PLC0415
    matplotlib.rcParams.update({"figure.dpi": DPI, "axes.spines.top": False, "axes.spines.right": False,
                                "axes.grid": True, "grid.alpha": 0.3, "font.size": 9})
    return plt


# ----------------------------------------------------------------------------- 01: statistics and alignment

def dataset_stats(ds: Dataset) -> dict[str, Any]:
    """:meth:`Dataset.stats` with level-neutral names and the distribution of events per user."""
    s = ds.stats()
    df = ds.interactions
    per_user = df.groupby("user").size()
    deep_per_user = df[df["level"] == ds.n_levels - 1].groupby("user").size().reindex(range(ds.n_users), fill_value=0)
    return {"dataset": s["dataset"], "users": s["users"], "items": s["items"], "events": s["events"],
            "levels": " < ".join(ds.levels),
            "shallow events": int((df["level"] == 0).sum()), "deep events": int((df["level"] == ds.n_levels - 1).sum()),
            "len p10": float(per_user.quantile(0.1)), "len median": s["seq_len_median"],
            "len mean": s["seq_len_mean"], "len p90": float(per_user.quantile(0.9)), "len max": s["seq_len_max"],
            "deep/user median": float(deep_per_user.median()),
            "users with >= 3 deep": int((deep_per_user >= 3).sum()), "density": s["density"]}


def stats_table(datasets: Iterable[Dataset]) -> pd.DataFrame:
    """One row per dataset (see :func:`dataset_stats`), indexed by name."""
    return pd.DataFrame([dataset_stats(ds) for ds in datasets]).set_index("dataset")


def behaviour_counts(ds: Dataset) -> pd.Series:
    """Events per level name."""
    counts = ds.interactions["level"].value_counts().reindex(range(ds.n_levels), fill_value=0)
    return pd.Series(counts.to_numpy(), index=ds.levels, name=ds.name)


def events_per_behaviour(ds: Dataset) -> str:
    """"click 4474, collect 5, ..." (load with one level per raw behaviour to see every behaviour)."""
    return ", ".join(f"{b} {n}" for b, n in behaviour_counts(ds).items())


def favored_later(ds: Dataset) -> pd.Series:
    """For every shallow (level 0) event: is the same item a deep event of the same user at the
    same or a later time? Indexed like ``ds.interactions`` rows."""
    df = ds.interactions
    deep = df[df["level"] == ds.n_levels - 1].groupby(["user", "item"])["timestamp"].max().rename("last_deep")
    shallow = df[df["level"] == 0]
    joined = shallow.join(deep, on=["user", "item"])
    return (joined["last_deep"] >= joined["timestamp"]).rename("favored_later")


def user_overlap(ds: Dataset) -> pd.DataFrame:
    """Per user: distinct shallow items, distinct deep items, their overlap and Jaccard index."""
    df = ds.interactions
    shallow = df[df["level"] == 0][["user", "item"]].drop_duplicates()
    deep = df[df["level"] == ds.n_levels - 1][["user", "item"]].drop_duplicates()
    both = shallow.merge(deep, on=["user", "item"]).groupby("user").size()
    out = pd.DataFrame({"shallow_items": shallow.groupby("user").size(), "deep_items": deep.groupby("user").size(),
                        "overlap": both}).fillna(0).astype(int)
    out["jaccard"] = out["overlap"] / (out["shallow_items"] + out["deep_items"] - out["overlap"])
    return out


def alignment_summary(ds: Dataset) -> dict[str, Any]:
    """How well the shallow behaviour predicts the deep one, for one dataset."""
    fl = favored_later(ds)
    ov = user_overlap(ds)
    both = ov[(ov["shallow_items"] > 0) & (ov["deep_items"] > 0)]
    return {"dataset": ds.name, "shallow events": len(fl), "P(deep later | shallow)": round(float(fl.mean()), 4),
            "users with both": len(both), "jaccard mean": round(float(both["jaccard"].mean()), 4) if len(both) else np.nan,
            "deep items clicked first": round(float((both["overlap"] / both["deep_items"]).mean()), 4) if len(both) else np.nan}


def plot_sequence_lengths(datasets: Iterable[Dataset]):
    """ECDF of events per user (all levels), one line per dataset, log x axis."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for ds in datasets:
        n = np.sort(ds.interactions.groupby("user").size().to_numpy())
        ax.step(n, np.arange(1, len(n) + 1) / len(n), where="post", label=ds.name)
    ax.set(xscale="log", xlabel="events per user (all behaviours)", ylabel="fraction of users",
           title="Sequence-length distribution")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig



def user_timeline(ds: Dataset, seq: Any, user: int, target: int | None = None) -> dict[str, Any]:
    """One user's events and the histories the models read, as ``SequenceData`` (``seq``) builds them.

    Returns {"events": the user's interactions, "eval": per level the times of the test row's history
    (the last L events strictly before the test target), "valid_time", "test_time", "train_time": the
    chosen training target's time, "train": per level the times of its history, read from the training
    row that holds it (its last L events strictly before it, :func:`~m3bsr.data.sequences.history_index`),
    "row_targets": the times of every target of that row}. ``target``: the index of the training target
    among the user's (None: the middle one).
    """
    from .data.sequences import history_index  # noqa: PLC0415 (imports torch)
    out: dict[str, Any] = {"events": ds.interactions[ds.interactions["user"] == user]}
    for split in ("valid", "test"):
        rows = np.flatnonzero(seq.split(split)["users"].numpy() == user)
        if len(rows):
            out[f"{split}_time"] = int(seq.split(split)["target_times"][rows[0], 0])
        if split == "test" and len(rows):
            b = seq.test
            out["eval"] = [b["times"][rows[0], s, 1:][b["items"][rows[0], s, 1:] > 0].numpy() for s in range(seq.S)]
    tr = seq.train
    rows = np.flatnonzero(tr["users"].numpy() == user)
    slots = [(r, k) for r in rows for k in range(tr["targets"].shape[1]) if tr["targets"][r, k] > 0]
    if slots:
        r, k = slots[len(slots) // 2 if target is None else target]
        last = history_index(tr["times"][r:r + 1], tr["target_times"][r:r + 1])[0, :, k]  # (S,) last event before it
        out["train_time"] = int(tr["target_times"][r, k])
        out["train"] = [tr["times"][r, s, max(1, int(last[s]) - seq.L + 1):int(last[s]) + 1].numpy() for s in range(seq.S)]
        out["row_targets"] = tr["target_times"][r][tr["targets"][r] > 0].numpy()
    return out


def plot_timeline(timeline: dict[str, Any], levels: Sequence[str], title: str = ""):
    """:func:`user_timeline` drawn: one row per behaviour level on one time axis (x: the order of the
    user's distinct timestamps, so events at one timestamp share a position), the validation and test
    targets marked, the test target's evaluation history shaded above each row and the training
    target's history below it, the other targets of its training row ticked."""
    from matplotlib.patches import Patch  # noqa: PLC0415
    plt = _plt()
    ev = timeline["events"]
    stamps = np.unique(ev["timestamp"].to_numpy())
    pos = lambda t: np.searchsorted(stamps, t)  # noqa: E731
    S = len(levels)
    fig, ax = plt.subplots(figsize=(10, 1.2 + 0.8 * S))
    for s, level in enumerate(levels):
        t = ev.loc[ev["level"] == s, "timestamp"].to_numpy()
        ax.scatter(pos(t), np.full(len(t), s), marker="|", s=140, color="0.3", lw=1)
    for key, (lo, hi), colour in (("eval", (0.08, 0.4), "tab:blue"), ("train", (-0.4, -0.08), "tab:green")):
        for s, times in enumerate(timeline.get(key, [])):
            if len(times):
                ax.fill_between([pos(times.min()) - 0.45, pos(times.max()) + 0.45], s + lo, s + hi, color=colour,
                                alpha=0.3, lw=0)
    deep = S - 1
    marks = [("row_targets", "|", "tab:green", 260), ("train_time", "^", "tab:green", 70),
             ("valid_time", "*", "tab:orange", 160), ("test_time", "*", "tab:red", 160)]
    for key, marker, colour, size in marks:
        if key in timeline:
            t = np.atleast_1d(timeline[key])
            ax.scatter(pos(t), np.full(len(t), deep + (0.25 if marker == "|" else 0.0)), marker=marker, s=size,
                       color=colour, zorder=3)
    handles = [Patch(color="tab:blue", alpha=0.3, label="test target's history (evaluation row)"),
               Patch(color="tab:green", alpha=0.3, label="one training target's history"),
               plt.Line2D([], [], marker="^", ls="", color="tab:green", label="that training target"),
               plt.Line2D([], [], marker="|", ls="", ms=10, color="tab:green", label="targets of its training row"),
               plt.Line2D([], [], marker="*", ls="", ms=10, color="tab:orange", label="validation target"),
               plt.Line2D([], [], marker="*", ls="", ms=10, color="tab:red", label="test target")]
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set(yticks=range(S), yticklabels=list(levels), ylim=(-0.6, S - 0.3), xlabel="the user's distinct timestamps, in time order",
           title=title)
    ax.grid(axis="y", alpha=0)
    fig.tight_layout()
    return fig

def plot_alignment(summaries: pd.DataFrame, overlaps: dict[str, pd.DataFrame]):
    """Left: P(deep later | shallow) per dataset. Right: per-user Jaccard(shallow items, deep items)."""
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
    p = summaries["P(deep later | shallow)"]
    a.barh(list(p.index), p.to_numpy(), color="tab:blue")
    for y, v in enumerate(p.to_numpy()):
        a.text(v, y, f" {v:.2f}", va="center", fontsize=8)
    a.set(xlim=(0, 1), xlabel="P(item later deep | shallow event)", title="Shallow events later turned deep")
    a.invert_yaxis()
    bins = np.linspace(0, 1, 21)
    for name, ov in overlaps.items():
        j = ov.loc[(ov["shallow_items"] > 0) & (ov["deep_items"] > 0), "jaccard"]
        if len(j):
            b.hist(j, bins=bins, histtype="step", density=True, linewidth=1.5, label=f"{name} ({len(j)} users)")
    b.set(xlabel="Jaccard(shallow items, deep items) per user", ylabel="density", title="Per-user overlap")
    b.legend(fontsize=7)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------- 01: features

@contextlib.contextmanager
def quiet():
    """Silence stdout/stderr (encoder loading messages and weight-loading bars) inside the block."""
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null), contextlib.redirect_stderr(null):
        yield


def movie_table(folder: str | Path) -> pd.DataFrame:
    """ML-100K-MM ``items.csv`` as one row per movie_id: title, genres, the encoder text
    ("title. genres. overview", as :func:`m3bsr.data.sources.load_ml_100k` builds it) and poster path."""
    from .data.sources import ML100K_GENRES  # noqa: PLC0415
    folder = Path(folder)
    meta = pd.read_csv(folder / "items.csv", keep_default_na=False).drop_duplicates("movie_id")
    names = [g.replace("genre_", "") for g in ML100K_GENRES]
    genres = [[n for g, n in zip(ML100K_GENRES, names) if row[g] == 1] for _, row in meta.iterrows()]
    out = pd.DataFrame({"movie_id": meta["movie_id"].to_numpy(), "title": meta["title"].str.strip().to_numpy(),
                        "genres": [", ".join(g) for g in genres]})
    out["text"] = [f"{t}. {g}. {o.strip()}" for t, g, o in zip(out["title"], out["genres"], meta["overview"])]
    out["poster"] = [folder / "posters" / f"{i}.jpg" for i in out["movie_id"]]
    return out.set_index("movie_id")


def nearest_neighbours(x: np.ndarray, mask: np.ndarray, queries: Sequence[int], k: int = 5,
                       chunk: int = 1024) -> np.ndarray:
    """Cosine top-``k`` neighbours of each query row among rows with ``mask`` (never the query itself).

    x ``(N, D)``, mask ``(N,)`` bool -> ``(len(queries), k)`` row indices, most similar first
    (equal similarities: lower index first among the k returned; of rows tied with the k-th, which
    ones are returned is ``np.argpartition``'s choice). ValueError when a query has fewer than ``k``
    candidates.
    """
    z = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    queries = np.asarray(queries)
    fewest = int(mask.sum()) - (int(mask[queries].max()) if len(queries) else 0)
    if fewest < k:
        raise ValueError(f"nearest_neighbours: k={k}, but a query has only {fewest} candidate rows")
    out = np.zeros((len(queries), k), np.int64)
    for s in range(0, len(queries), chunk):
        q = queries[s:s + chunk]
        sim = z[q] @ z.T  # (q, N)
        sim[:, ~mask] = -np.inf
        sim[np.arange(len(q)), q] = -np.inf
        top = np.argpartition(-sim, k, axis=1)[:, :k]
        order = np.lexsort((top, -np.take_along_axis(sim, top, 1)), axis=1)
        out[s:s + chunk] = np.take_along_axis(top, order, 1)
    return out


def label_agreement_rows(x: np.ndarray, mask: np.ndarray, labels: np.ndarray, k: int = 10) -> np.ndarray:
    """``(mask.sum(),)``: for each item with ``mask``, the fraction of its ``k`` cosine neighbours
    (among the items with ``mask``) that share its label."""
    rows = np.flatnonzero(mask)
    nn = nearest_neighbours(x, mask, rows, k)
    return (labels[nn] == labels[rows][:, None]).mean(1)


def label_agreement(x: np.ndarray, mask: np.ndarray, labels: np.ndarray, k: int = 10) -> float:
    """Mean fraction of each item's ``k`` cosine neighbours that share its label (items with ``mask``):
    the kNN purity, the mean of :func:`label_agreement_rows`."""
    return float(label_agreement_rows(x, mask, labels, k).mean())


def movie_features(movies: pd.DataFrame, ds: Dataset | None = None, n_items: int = 16,
                   first: Sequence[int] = ()) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Raw movie ids ``(n,)`` and image/text features ``(n, D_m)`` with masks ``(n,)`` for the ML-100K-MM look.

    ``ds`` given (loaded with features=True, so through the cache): every item. Otherwise encode only
    ``n_items`` movies with a poster: the ids in ``first``, then the lowest other ids.
    """
    from .data import features as F  # noqa: PLC0415 (loads torch and the encoders)
    if ds is not None:
        ids = np.asarray(ds.item_ids[1:], dtype=np.int64)
        return (ids, {m: ds.features[m][1:] for m in ("image", "text")},
                {m: ds.feature_mask[m][1:] for m in ("image", "text")})
    with_poster = [i for i in movies.index if movies.at[i, "poster"].is_file()]
    ids = np.array(list(first) + [i for i in with_poster if i not in set(first)][:max(n_items - len(first), 0)])
    with quiet():
        x = {"image": F.encode_images(list(movies.loc[ids, "poster"])),
             "text": F.encode_texts(list(movies.loc[ids, "text"]))}
    return ids, x, {m: np.ones(len(ids), bool) for m in x}


def feature_table(datasets: Iterable[Dataset], k: int = 10) -> pd.DataFrame:
    """Per dataset and modality: dimension, coverage, and how often an item's ``k`` cosine neighbours
    share its label (genre / category / planted cluster) next to the chance rate sum_l p_l^2."""
    rows = []
    for ds in datasets:
        labels = np.asarray(ds.item_labels, dtype=object).astype(str)
        for m in sorted(ds.features):
            x, mask = ds.features[m], ds.feature_mask[m]
            rows.append({"dataset": ds.name, "modality": m, "dim": x.shape[1], "items with it": int(mask.sum()),
                         "coverage": round(float(mask[1:].mean()), 4),
                         f"same label in {k}-NN": round(label_agreement(x, mask, labels, k), 4),
                         "chance": round(chance_agreement(labels[mask]), 4)})
    return pd.DataFrame(rows).set_index(["dataset", "modality"])


def poster_grid(paths: Sequence[Sequence[Path | None]], titles: Sequence[Sequence[str]], row_labels: Sequence[str] = ()):
    """A grid of images (``paths[r][c]``; None = blank) with a short title under each.

    One inch per column at ``POSTER_DPI`` = the posters' own width (92 px): no upsampling, small files."""
    from PIL import Image  # noqa: PLC0415
    plt = _plt()
    R, C = len(paths), max(len(r) for r in paths)
    fig, axes = plt.subplots(R, C, figsize=(1.0 * C, 1.75 * R), squeeze=False, dpi=POSTER_DPI)
    for r in range(R):
        for c in range(C):
            ax = axes[r, c]
            ax.set_axis_off()
            p = paths[r][c] if c < len(paths[r]) else None
            if p is not None and Path(p).is_file():
                with Image.open(p) as im:
                    ax.imshow(np.asarray(im.convert("RGB")))
            if c < len(titles[r]):
                ax.set_title(titles[r][c], fontsize=5, y=-0.18)
        if r < len(row_labels):
            axes[r, 0].text(-0.15, 0.5, row_labels[r], transform=axes[r, 0].transAxes, rotation=90,
                            va="center", ha="right", fontsize=7)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------- 03: learning curves

def load_histories(dataset: str, models: Sequence[str], seeds: Sequence[int], profile: str, runs: str | Path,
                   overrides: dict[str, Any] | None = None, tuned=None) -> dict[str, pd.DataFrame]:
    """``history.csv`` of every finished trainable run of the grid for one dataset: label -> DataFrame
    (the runs' configs: ``experiments.config_for``).

    Labels are the model name (plus ``s<seed>`` when there are several seeds).
    """
    from .experiments import config_for  # noqa: PLC0415 (imports torch)
    from .train import run_dir  # noqa: PLC0415
    out = {}
    for model in models:
        for seed in seeds:
            cfg = config_for(profile, dataset, model, seed, overrides, tuned)
            path = run_dir(cfg, runs) / "history.csv"
            if path.exists():
                out[model if len(seeds) == 1 else f"{model} s{seed}"] = pd.read_csv(path)
    return out


def loss_terms(histories: dict[str, pd.DataFrame]) -> list[str]:
    """Training-loss columns found in any history: "loss" and "ce" first, then the auxiliary terms."""
    cols = dict.fromkeys(c for h in histories.values() for c in h.columns
                         if c not in ("step", "epoch", "seconds") and not c.startswith("valid_"))
    return [c for c in ("loss", "ce") if c in cols] + [c for c in cols if c not in ("loss", "ce")]


def plot_learning_curves(histories: dict[str, pd.DataFrame], title: str = "", ncols: int = 3):
    """One panel per training-loss term (each separately), then validation NDCG@10; one line per run.

    ``histories``: run label -> its ``history.csv`` as a DataFrame (one row per validation).
    """
    from matplotlib.ticker import MaxNLocator  # noqa: PLC0415
    plt = _plt()
    panels = loss_terms(histories) + ["valid_NDCG@10"]
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 2.5 * nrows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_axis_off()
    for ax, col in zip(axes.flat, panels):
        for i, (label, h) in enumerate(histories.items()):
            if col in h.columns and h[col].notna().any():
                ax.plot(h["epoch"], h[col], marker=".", color=f"C{i}", label=label)
        ax.set(xlabel="epoch", title="validation NDCG@10" if col == "valid_NDCG@10" else f"train {col}")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.flat[len(panels) - 1].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_metric_bars(results: pd.DataFrame, metric: str = "NDCG@10", split: str = "test"):
    """Mean (± std over seeds) of ``metric`` per model, one panel per dataset."""
    plt = _plt()
    df = results[results["split"] == split]
    names = list(dict.fromkeys(df["dataset"]))
    fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 2.8), squeeze=False)
    for ax, name in zip(axes[0], names):
        g = df[df["dataset"] == name].groupby("model", sort=False)[metric]
        mean, std = g.mean(), g.std(ddof=1).fillna(0.0)
        ax.bar(list(mean.index), mean.to_numpy(), yerr=std.to_numpy() if (std > 0).any() else None,
               color="tab:blue", capsize=3)
        ax.set(title=name, ylabel=f"{split} {metric}")
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    return fig



def plot_training_log(history: pd.DataFrame, weights: dict[str, float]):
    """One run's training log in three panels: each loss term as logged (unweighted), each term times its
    weight in the total (``weights``: term -> weight, 1 for terms it lacks) with the total, and validation
    NDCG@10.

    ``history``: the run's ``history.csv`` as a DataFrame, x = its ``step`` column if it has one, else
    ``epoch``. A loss panel whose values span more than a factor of 10 gets a log scale.
    """
    from matplotlib.ticker import MaxNLocator  # noqa: PLC0415
    plt = _plt()
    x = "step" if "step" in history.columns else "epoch"
    terms = [t for t in loss_terms({"run": history}) if t not in ("loss", "step", "epoch")]
    fig, axes = plt.subplots(1, 3, figsize=(10.5, 2.9))
    for ax, weighted in ((axes[0], False), (axes[1], True)):
        lines = {t: (weights.get(t, 1.0) if weighted else 1.0) * history[t] for t in terms}
        if weighted and "loss" in history.columns:
            lines["total"] = history["loss"]
        for i, (t, v) in enumerate(lines.items()):
            w = weights.get(t, 1.0)
            label = f"{w:g} × {t}" if weighted and t != "total" and w != 1.0 else t
            ax.plot(history[x], v, marker=".", color="k" if t == "total" else f"C{i}", label=label)
        values = pd.concat(lines.values()).dropna()
        if len(values) and values.min() > 0 and values.max() / values.min() > 10:
            ax.set_yscale("log")
        ax.set(xlabel=x, title="loss terms, weighted as in the total" if weighted else "loss terms as logged")
        ax.legend(fontsize=6, loc="best", framealpha=0.8)
    if "valid_NDCG@10" in history.columns:
        v = history[[x, "valid_NDCG@10"]].dropna()
        axes[2].plot(v[x], v["valid_NDCG@10"], marker=".", color="k")
    axes[2].set(xlabel=x, title="validation NDCG@10")
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    return fig

# ----------------------------------------------------------------------------- 02: diffusion internals

def plot_schedules(abar: dict[str, Sequence[float]]):
    """``abar``: schedule name -> abar_t for t = 0..T. Left abar_t, right a_t = abar_t / abar_{t-1}."""
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(8, 3))
    for name, v in abar.items():
        v = np.asarray(v, dtype=np.float64)
        t = np.arange(len(v))
        a.plot(t, v, marker=".", label=name)
        b.plot(t[1:], v[1:] / v[:-1], marker=".", label=name)
    a.set(xlabel="t", ylabel=r"$\bar\alpha_t$", title=r"signal kept after t steps, $\bar\alpha_t$", ylim=(0, 1.05))
    b.set(xlabel="t", ylabel=r"$\alpha_t$", title=r"per-step $\alpha_t = \bar\alpha_t / \bar\alpha_{t-1}$", ylim=(0, 1.05))
    a.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_forward_noising(heat: np.ndarray, cos: dict[str, np.ndarray], theory: dict[str, np.ndarray] | None = None,
                         dims: int = 24):
    """Left: one feature vector (first ``dims`` coordinates) after t forward steps, t = 0..T (rows).
    Right: cosine(h_t, h_0) over many items, mean ± std, per schedule (``cos``: name -> ``(T+1, n)``),
    with ``theory`` (name -> ``(T+1,)``) dashed."""
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2), gridspec_kw={"width_ratios": [1.2, 1]})
    lim = float(np.abs(heat[:, :dims]).max())
    im = a.imshow(heat[:, :dims], aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim)
    a.set(xlabel="feature coordinate", ylabel="step t", title="one item's feature under forward noising")
    a.grid(False)
    fig.colorbar(im, ax=a, fraction=0.04)
    for name, c in cos.items():
        m, s = c.mean(1), c.std(1)
        t = np.arange(len(m))
        b.plot(t, m, marker=".", label=name)
        b.fill_between(t, m - s, m + s, alpha=0.2)
    for i, (name, v) in enumerate((theory or {}).items()):
        b.plot(np.arange(len(v)), v, "--", color=f"C{i}", lw=1, label=f"{name}: theory")
    b.set(xlabel="step t", ylabel=r"cos($h_t$, $h_0$)", title="how much of the item survives", ylim=(-0.1, 1.05))
    b.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_chain_distance(curves: pd.DataFrame):
    """``curves``: columns step, model ("untrained" / "trained"), modality, cosine, rel_l2 (one row each).
    Left: cosine to the planted clean features per step; right: relative L2 distance. Colour =
    modality, dashed = untrained."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    colours = {m: f"C{i}" for i, m in enumerate(dict.fromkeys(curves["modality"]))}
    for (model, modality), g in curves.groupby(["model", "modality"], sort=False):
        style = "-" if model == "trained" else "--"
        for ax, col in zip(axes, ("cosine", "rel_l2")):
            ax.plot(g["step"], g[col], style, marker=".", color=colours[modality], label=f"{modality}, {model}")
    axes[0].set(xlabel="chain step t (0 = input)", ylabel=r"cos($h_t$, clean)", title="similarity to the planted clean features")
    axes[1].set(xlabel="chain step t (0 = input)", ylabel=r"$\|h_t - $clean$\| / \|$clean$\|$", title="relative distance to clean")
    axes[0].legend(fontsize=7)
    for ax in axes:
        ax.xaxis.set_major_locator(_int_locator())
    fig.tight_layout()
    return fig


def _int_locator():
    from matplotlib.ticker import MaxNLocator  # noqa: PLC0415
    return MaxNLocator(integer=True)


def plot_attention(maps: dict[str, np.ndarray], xlabel: str = "condition position", ylabel: str = "query position",
                   ncols: int = 2):
    """One heatmap per entry (``(Lq, Lc)`` attention weights, rows sum to 1), ``ncols`` per row;
    square-root colour scale so that small weights stay visible next to a dominant one."""
    from matplotlib.colors import PowerNorm  # noqa: PLC0415
    plt = _plt()
    nrows = -(-len(maps) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols, 3.3 * nrows), squeeze=False)
    vmax = max(max(float(np.nanmax(w)) for w in maps.values()), 1e-6)
    for ax in axes.flat[len(maps):]:
        ax.set_axis_off()
    for ax, (title, w) in zip(axes.flat, maps.items()):
        im = ax.imshow(w, cmap="viridis", norm=PowerNorm(0.5, vmin=0, vmax=vmax), aspect="auto", interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.xaxis.set_major_locator(_int_locator())
        ax.yaxis.set_major_locator(_int_locator())
        ax.set(xlabel=xlabel, ylabel=ylabel)
        ax.grid(False)
    fig.tight_layout()
    fig.colorbar(im, ax=list(axes.flat), fraction=0.03, label="attention weight (sqrt scale)")
    return fig


def plot_click_denoising(df: pd.DataFrame, value: str, by: str = "click", hue: str = "stage", panel: str = "modality"):
    """Box plots of ``value``: one panel per ``panel`` value, groups by ``by``, one box per ``hue`` value."""
    plt = _plt()
    panels, cats, hues = (list(dict.fromkeys(df[c])) for c in (panel, by, hue))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.3 * len(panels), 3.1), squeeze=False, sharey=True)
    w = 0.8 / len(hues)
    for ax, p in zip(axes[0], panels):
        sub = df[df[panel] == p]
        for j, h in enumerate(hues):
            data = [sub.loc[(sub[by] == c) & (sub[hue] == h), value].to_numpy() for c in cats]
            pos = np.arange(len(cats)) + (j - (len(hues) - 1) / 2) * w
            bp = ax.boxplot(data, positions=pos, widths=w * 0.9, patch_artist=True, showfliers=False,
                            medianprops={"color": "k"})
            for patch in bp["boxes"]:
                patch.set_facecolor(f"C{j}")
                patch.set_alpha(0.6)
            ax.plot([], [], color=f"C{j}", lw=6, alpha=0.6, label=h)
        ax.axhline(0, color="k", lw=0.5)
        ax.set_xticks(range(len(cats)), cats)
        ax.set_title(str(p))
    axes[0, 0].set_ylabel(value)
    axes[0, -1].legend(fontsize=7)
    fig.tight_layout()
    return fig


def stream_event_rows(ds: Dataset, split: dict, level: int, max_len: int) -> np.ndarray:
    """``(B, L+1)``: the ``ds.interactions`` row behind each position of one level's stream in an
    evaluation split of :class:`~m3bsr.data.sequences.SequenceData` (-1 at BOS and padding).

    Mirrors the split: the level's events strictly before the row's target time, the last ``max_len``.
    """
    df = ds.interactions
    users, levels, ts = (df[c].to_numpy() for c in ("user", "level", "timestamp"))
    starts = np.searchsorted(users, np.arange(ds.n_users), side="left")
    ends = np.searchsorted(users, np.arange(ds.n_users), side="right")
    rows_u, target_t = split["users"].numpy(), split["target_times"][:, 0].numpy()
    out = np.full((len(rows_u), max_len + 1), -1, np.int64)
    for b, (u, tt) in enumerate(zip(rows_u, target_t)):
        s, e = starts[u], ends[u]
        rows = s + np.flatnonzero((levels[s:e] == level) & (ts[s:e] < tt))
        rows = rows[-max_len:]
        out[b, 1:1 + len(rows)] = rows
    return out


def click_denoising(rec: dict, accidental: np.ndarray, label: str) -> pd.DataFrame:
    """What CDBD did to every real click of a batch, from ``M3BSR.denoise_outputs`` (``rec``).

    ``accidental`` ``(B, L+1)`` bool per click-stream position (ignored at BOS/padding). One row per
    (click, modality): ``shift`` = ||after - before|| / ||before|| (before = after CDMD, after = after
    CDBD), and the cosine of the click to the user's favor centroid (the mean of the favor stream
    that conditions CDBD) before and after. Cosines are taken after removing each stage's mean
    embedding (over all real events of the batch), so an offset shared by every item does not count.
    """
    import torch  # noqa: PLC0415
    import torch.nn.functional as F  # noqa: PLC0415
    valid = rec["valid"]  # (B, S, L+1)
    fav_valid = valid[:, -1].float()
    sel = valid[:, 0] & (fav_valid.sum(1) > 0)[:, None]  # real clicks of users with some favor
    acc = torch.as_tensor(accidental)[sel].numpy()

    def cos_to_favors(h: torch.Tensor) -> torch.Tensor:
        h = h - h[valid].mean(0)
        centroid = (h[:, -1] * fav_valid[..., None]).sum(1) / fav_valid.sum(1, keepdim=True).clamp(min=1)
        return F.cosine_similarity(h[:, 0], centroid[:, None], dim=-1)

    rows = []
    for m in rec["modalities"]:
        before, after = rec["cdmd"][m], rec["cdbd"][m]  # (B, S, L+1, d)
        shift = (after[:, 0] - before[:, 0]).norm(dim=-1) / before[:, 0].norm(dim=-1).clamp(min=1e-12)
        rows.append(pd.DataFrame({"model": label, "modality": m, "click": np.where(acc, "accidental", "genuine"),
                                  "shift": shift[sel].numpy(), "cos to favors before": cos_to_favors(before)[sel].numpy(),
                                  "cos to favors after": cos_to_favors(after)[sel].numpy()}))
    out = pd.concat(rows, ignore_index=True)
    out["cos gain"] = out["cos to favors after"] - out["cos to favors before"]
    return out


def source_lines(obj: Any, *patterns: str) -> str:
    """The first line of ``obj``'s source containing each pattern, as ``file:line: code`` (file repo-relative)."""
    import inspect  # noqa: PLC0415
    lines, start = inspect.getsourcelines(obj)
    where = shown(inspect.getsourcefile(obj))
    out = []
    for p in patterns:
        hit = next((i for i, line in enumerate(lines) if p in line), None)
        out.append(f"{where}:{start + hit}:  {lines[hit].strip()}" if hit is not None
                   else f"({p!r} not found in {obj.__qualname__})")
    return "\n".join(out)


def chain_states(rec: dict, key: str) -> tuple:
    """States ``(steps+1, B, S', L+1, d)`` and attention weights ``(steps, B, S', heads, L+1, Lc)``
    of one chain recorded by ``M3BSR.denoise_outputs``."""
    import torch  # noqa: PLC0415
    ch = rec["chains"][key]
    return torch.stack(ch["states"]), torch.stack(ch["weights"])


def projected_clean(model: Any, ds: Dataset, modality: str):
    """The planted clean features of the synthetic data through the model's own projection of the
    (noisy) features: ``(N+1, d)``, comparable to the model's ``modality`` stream before CDMD."""
    import torch  # noqa: PLC0415
    proj = model.proj[modality]
    noisy, mask = torch.from_numpy(ds.features[modality]), torch.from_numpy(ds.feature_mask[modality])
    mu, sd = noisy[mask].mean(0), noisy[mask].std(0) + 1e-6  # the standardisation FeatureProjection fitted
    if not torch.allclose(proj.features[mask], (noisy[mask] - mu) / sd, atol=1e-4):
        raise ValueError("FeatureProjection no longer standardises as assumed here; update projected_clean")
    with torch.no_grad():
        return proj.proj((torch.from_numpy(ds.truth[f"clean_{modality}"]) - mu) / sd)


def chain_distance(states, items, clean, valid) -> pd.DataFrame:
    """Per chain step: mean cosine and relative L2 distance of the states to the clean embeddings.

    states ``(steps+1, B, S, L+1, d)``, items / valid ``(B, S, L+1)``, clean ``(N+1, d)``.
    """
    import torch.nn.functional as F  # noqa: PLC0415
    target = clean[items]
    rows = []
    for t, h in enumerate(states):
        cos = F.cosine_similarity(h, target, dim=-1)[valid]
        rel = ((h - target).norm(dim=-1) / target.norm(dim=-1).clamp(min=1e-12))[valid]
        rows.append({"step": t, "cosine": float(cos.mean()), "rel_l2": float(rel.mean())})
    return pd.DataFrame(rows)


def attention_spread(w) -> float:
    """Mean normalised entropy of attention rows ``(..., Lq, Lc)``: H(row) / log(#positions it may see),
    over rows that see at least two positions (masked positions have weight exactly 0).
    1 = uniform over everything visible, 0 = all weight on one position."""
    import torch  # noqa: PLC0415
    w = torch.as_tensor(w).flatten(0, -2).double()
    k = (w > 0).sum(-1)
    h = -(w * w.clamp(min=1e-300).log()).sum(-1)
    keep = k >= 2
    return float((h[keep] / k[keep].double().log()).mean())


# ----------------------------------------------------------------------------- 06: denoising figures

STAGES = ("input", "cdmd", "cdbd")  # the streams before CDMD, after CDMD, after CDBD


def click_embeddings(model: Any, split: dict, level: int = 0, batch_size: int = 32) -> dict[str, Any]:
    """Every real event of one level in an evaluation split, at each stage of M3BSR's denoising.

    -> {"row": ``(N,)`` split row, "pos": ``(N,)`` stream position, "item": ``(N,)``,
    "<stage>/<modality>": ``(N, d)`` float32 for stage in :data:`STAGES`}. ``model`` in eval mode;
    ``denoise_outputs`` runs on ``batch_size`` rows at a time (it keeps every chain state).
    """
    import torch  # noqa: PLC0415
    out: dict[str, list] = {}
    n = len(split["users"])
    for s in range(0, n, batch_size):
        batch = {k: v[s:s + batch_size] for k, v in split.items()}
        rec = model.denoise_outputs(batch)
        sel = rec["valid"][:, level]  # (b, L+1)
        b, p = torch.nonzero(sel, as_tuple=True)
        out.setdefault("row", []).append((b + s).numpy())
        out.setdefault("pos", []).append(p.numpy())
        out.setdefault("item", []).append(batch["items"][:, level][sel].numpy())
        for stage in STAGES:
            for m, h in rec[stage].items():
                out.setdefault(f"{stage}/{m}", []).append(h[:, level][sel].float().numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


def denoising_embeddings(model: Any, split: dict, path: str | Path, seed: int = 0,
                         methods: Sequence[str] = ("t-SNE", "UMAP")) -> dict[str, np.ndarray]:
    """The clicks of ``split`` (one per distinct item) at each denoising stage, with their 2-D projections.

    -> :func:`click_embeddings`' keys for the kept clicks plus ``"<method>:<stage>/<modality>"`` ``(N, 2)``.
    Computed once and saved to ``path`` (``.npz`` appended when missing; written atomically), then read
    back, so a notebook re-renders in seconds; a saved file that cannot be read or lacks one of
    ``methods`` is computed again. The ID stream is the condition of CDMD, not changed by it:
    ``cdmd/id`` reuses ``input/id``'s projection.
    """
    path = Path(path)
    path = path if path.suffix == ".npz" else path.with_name(path.name + ".npz")
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as z:
                saved = {k: z[k] for k in z.files}
            if all(f"{method}:input/id" in saved for method in methods):
                return saved
        except Exception:  # unreadable (e.g. truncated): computed again below
            pass
    E = click_embeddings(model.eval(), split)
    keep = one_event_per_item(E["item"], seed=seed)
    E = {k: v[keep] for k, v in E.items()}
    for key in [k for k in E if k.split("/")[0] in STAGES]:
        for method in methods:
            E[f"{method}:{key}"] = (E[f"{method}:input/id"] if key == "cdmd/id"
                                    else project_2d(E[key], method, seed=seed))
    buf = io.BytesIO()
    np.savez_compressed(buf, **E)
    atomic_write_bytes(path, buf.getvalue())
    return E


def chance_agreement(labels: np.ndarray) -> float:
    """``sum_l p_l^2``: the share of same-label neighbours expected when neighbours are random."""
    p = pd.Series(labels).value_counts(normalize=True).to_numpy()
    return float((p ** 2).sum())


def one_event_per_item(items: np.ndarray, seed: int = 0) -> np.ndarray:
    """Indices of one randomly chosen event per distinct item (sorted), so that no point of a
    neighbourhood statistic has a copy of itself: before CDMD all events of an item coincide."""
    order = np.random.default_rng(seed).permutation(len(items))
    _, first = np.unique(items[order], return_index=True)
    return np.sort(order[first])


def interest_agreement(x: np.ndarray, item_cluster: np.ndarray, user_clusters: np.ndarray, k: int = 10) -> np.ndarray:
    """Per event: the fraction of its ``k`` cosine neighbours whose item lies in one of the event's
    user's interest clusters. x ``(N, D)``, item_cluster ``(N,)``, user_clusters ``(N, 2)`` (-1 = none)."""
    nn = nearest_neighbours(x, np.ones(len(x), bool), np.arange(len(x)), k)
    c = item_cluster[nn]  # (N, k)
    return ((c == user_clusters[:, :1]) | (c == user_clusters[:, 1:])).mean(1)


def project_2d(x: np.ndarray, method: str, seed: int = 0) -> np.ndarray:
    """``(N, D)`` -> ``(N, 2)`` by t-SNE (scikit-learn, PCA start) or UMAP (umap-learn), both on cosine
    distances and seeded (UMAP is then single-threaded, so the picture is reproducible)."""
    if method == "t-SNE":
        from sklearn.manifold import TSNE  # noqa: PLC0415
        return TSNE(2, perplexity=min(30.0, (len(x) - 1) / 3), metric="cosine", init="pca",
                    random_state=seed).fit_transform(x).astype(np.float32)
    if method == "UMAP":
        import warnings  # noqa: PLC0415
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*n_jobs value.*")  # seeded UMAP runs in one thread
            import umap  # noqa: PLC0415
            return umap.UMAP(n_neighbors=15, metric="cosine", random_state=seed).fit_transform(x).astype(np.float32)
    raise ValueError(f"unknown projection {method!r}; allowed: 't-SNE', 'UMAP'")


def plot_projection_pairs(xy: dict[tuple[str, str], np.ndarray], colour: np.ndarray, marker: np.ndarray | None,
                          scores: dict[tuple[str, str], str], colour_label: str, title: str,
                          names: Sequence[str] | None = None):
    """One row per representation, one column per stage: ``xy[(row, stage)]`` ``(N, 2)``; points
    coloured by the integer label ``colour`` ``(N,)``; where ``marker`` ``(N,)`` is True the point is
    drawn as a cross (e.g. accidental clicks). ``scores[(row, stage)]`` goes under each panel's title.
    ``names[c]`` names colour ``c`` in a legend under the panels (none without ``names``)."""
    plt = _plt()
    rows, stages = list(dict.fromkeys(r for r, _ in xy)), list(dict.fromkeys(s for _, s in xy))
    fig, axes = plt.subplots(len(rows), len(stages), figsize=(3.3 * len(stages), 3.1 * len(rows)), squeeze=False)
    cmap = plt.get_cmap("tab10" if colour.max() < 10 else "tab20")
    marker = np.zeros(len(colour), bool) if marker is None else marker
    for i, r in enumerate(rows):
        for j, s in enumerate(stages):
            ax, p = axes[i, j], xy[(r, s)]
            ax.scatter(*p[~marker].T, c=cmap(colour[~marker] % cmap.N), s=6, lw=0, alpha=0.8)
            if marker.any():
                ax.scatter(*p[marker].T, c=cmap(colour[marker] % cmap.N), s=14, marker="x", lw=0.7)
            ax.set_title(f"{r}, {s}\n{scores[(r, s)]}", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.grid(False)
    fig.suptitle(f"{title} (colour: {colour_label}" + (", x: accidental click)" if marker.any() else ")"), fontsize=9)
    fig.tight_layout()
    if names is not None:
        from matplotlib.lines import Line2D  # noqa: PLC0415
        handles = [Line2D([], [], ls="", marker="o", ms=5, mec="none", mfc=cmap(c % cmap.N)) for c in range(len(names))]
        fig.legend(handles, names, loc="upper center", bbox_to_anchor=(0.5, 0), ncol=min(len(names), 6),
                   fontsize=8, frameon=False)
    return fig


# ----------------------------------------------------------------------------- 05: ablations

def plot_variant_bars(table: pd.DataFrame, column: str, reference: str | None = None):
    """Horizontal bars of ``table[column]`` per variant (index (dataset, variant)), one panel per
    dataset; the ``reference`` variant is drawn in grey and as a dashed line."""
    plt = _plt()
    names = list(dict.fromkeys(table.index.get_level_values(0)))
    fig, axes = plt.subplots(1, len(names), figsize=(4.6 * len(names), 0.32 * len(table) / len(names) + 1.2),
                             squeeze=False)
    for ax, name in zip(axes[0], names):
        s = table.loc[name, column][::-1]
        ax.barh(list(s.index), s.to_numpy(), color=["tab:grey" if v == reference else "tab:blue" for v in s.index])
        if reference in s.index:
            ax.axvline(s[reference], color="tab:grey", ls="--", lw=0.8)
        ax.set(title=name, xlabel=column)
    fig.tight_layout()
    return fig


def plot_steps(df: pd.DataFrame, x: str, panels: Sequence[str]):
    """One panel per column in ``panels`` against ``x`` (a line per dataset)."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 2.7), squeeze=False)
    for ax, col in zip(axes[0], panels):
        for name, g in df.groupby("dataset", sort=False):
            ax.plot(g[x], g[col], marker="o", label=name)
        ax.set(xlabel=x, ylabel=col)
        ax.xaxis.set_major_locator(_int_locator())
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_regimes(df: pd.DataFrame, value: str = "test NDCG@10"):
    """One panel per study of notebook 07: ``value`` of each model against the study's setting, a line
    per model, the marker filled where that setting's paired test separates the two models
    (``significant``) and hollow where it does not. ``df``: columns study, x (the setting's value on
    the panel's axis), xlabel, model, ``value`` and significant (bool)."""
    plt = _plt()
    studies = list(dict.fromkeys(df["study"]))
    fig, axes = plt.subplots(1, len(studies), figsize=(3.6 * len(studies), 3.0), squeeze=False)
    for ax, study in zip(axes[0], studies):
        panel = df[df["study"] == study]
        for k, (model, g) in enumerate(panel.groupby("model", sort=False)):
            g = g.sort_values("x")
            colour = f"C{k}"
            ax.plot(g["x"], g[value], color=colour, label=model)
            ax.scatter(g["x"], g[value], s=30, zorder=3, edgecolors=colour,
                       facecolors=[colour if sig else "white" for sig in g["significant"]])
        ax.set(xlabel=panel["xlabel"].iloc[0], ylabel=value, title=study)
    axes[0, 0].legend(fontsize=7, title="filled: paired test p < 0.05 (Holm)", title_fontsize=7)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------- reproduction: make compare

# Columns that name a row rather than measure it, besides the text columns (dataset, model, split, ...).
KEY_COLUMNS = ("seed", "step", "T", "lambda_c", "value", "bucket", "inference steps", "n levels")
# Timings differ from machine to machine and run to run: columns so named are not compared, nor are
# the training-cost tables (whose run counts follow the plan).
TIMING = re.compile(r"second|time|minute|speed-up|(^|\s)s(\s|$)")
COST_TABLES = re.compile(r"train_time")
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?|nan|NaN|-?inf|")
_MEAN_STD = re.compile(r"[-+]?\d+\.?\d*( ± \d+\.?\d*)?")


def _is_value_column(values: pd.Series) -> bool:
    return bool(values.map(lambda v: bool(_NUMBER.fullmatch(v) or _MEAN_STD.fullmatch(v))).all())


def _same(a: str, b: str, rtol: float) -> bool:
    if a == b:
        return True
    try:
        x, y = float(a or "nan"), float(b or "nan")
    except ValueError:
        return False  # text, or "mean ± std" written differently
    return bool(np.isclose(x, y, rtol=rtol, atol=0.0, equal_nan=True))


def compare_table(reproduced: str | Path, committed: str | Path, rtol: float = 0.0) -> tuple[list[str], bool]:
    """Compare two CSV tables row by row: rows are matched on their key columns (text columns that are
    not ``mean ± std`` values, and :data:`KEY_COLUMNS`), every other column but the timings
    (:data:`TIMING`) must hold the same number (``rtol``: relative tolerance). A reproduced row
    without a committed match is a difference; committed rows the reproduction lacks (a quick plan)
    are only counted. Returns (lines to print, whether the tables agree)."""
    new = pd.read_csv(reproduced, dtype=str, keep_default_na=False)
    old = pd.read_csv(committed, dtype=str, keep_default_na=False)
    name = Path(reproduced).name
    if list(new.columns) != list(old.columns):
        return [f"{name}: columns differ: {list(new.columns)} against the committed {list(old.columns)}"], False
    keys = [c for c in new.columns if c in KEY_COLUMNS or not _is_value_column(pd.concat([new[c], old[c]]))]
    values = [c for c in new.columns if c not in keys and not TIMING.search(c)]
    committed_rows = {tuple(r[keys]): r for _, r in old.iterrows()}
    lines, agree, matched = [], True, 0
    for i, row in new.iterrows():
        key = tuple(row[keys])
        label = ", ".join(f"{k}={v}" for k, v in zip(keys, key)) or f"row {i + 1}"
        if key not in committed_rows:
            lines.append(f"  {label}: not in the committed table")
            agree = False
            continue
        matched += 1
        ref = committed_rows[key]
        diffs = [f"{c} {row[c]} (committed {ref[c]})" for c in values if not _same(row[c], ref[c], rtol)]
        if diffs:
            lines.append(f"  {label}: " + "; ".join(diffs))
            agree = False
    left = len(old) - matched
    head = (f"{name}: {len(new)} rows" + (f" ({left} committed rows not reproduced)" if left else "")
            + (", all equal" if agree else f", {len(lines)} differ:"))
    return [head] + lines, agree


def compare_results(reproduced: str | Path, committed: str | Path, rtol: float = 0.0) -> tuple[list[str], bool]:
    """:func:`compare_table` for every ``*.csv`` in the folder ``reproduced`` that ``committed`` also
    holds (training-cost tables excepted). FileNotFoundError when ``reproduced`` holds no table."""
    tables = sorted(resolve_path(reproduced).glob("*.csv"))
    if not tables:
        raise FileNotFoundError(f"{reproduced}: no *.csv table to compare (run `make reproduce` first)")
    committed = resolve_path(committed)
    lines, agree = [], True
    for path in tables:
        if COST_TABLES.search(path.stem):
            lines.append(f"{path.name}: training cost, not compared")
        elif not (committed / path.name).is_file():
            lines.append(f"{path.name}: no committed table of that name, not compared")
        else:
            out, ok = compare_table(path, committed / path.name, rtol)
            lines += out
            agree &= ok
    missing = sorted({p.name for p in committed.glob("*.csv")} - {p.name for p in tables})
    if missing:
        lines.append(f"not reproduced: {', '.join(missing)}")
    lines.append("same numbers as the committed tables" if agree else "DIFFERENT from the committed tables")
    return lines, agree


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m m3bsr.viz compare REPRODUCED COMMITTED [--rtol R]`` (``make compare``): print the
    per-table differences; exit status 1 when the tables differ."""
    import argparse  # noqa: PLC0415
    parser = argparse.ArgumentParser(prog="python -m m3bsr.viz")
    sub = parser.add_subparsers(dest="command", required=True)
    cmp = sub.add_parser("compare", help="compare a reproduction's tables with the committed ones")
    cmp.add_argument("reproduced", help="folder of the reproduction's tables, e.g. reproduce/results")
    cmp.add_argument("committed", help="folder of the committed tables, e.g. results")
    cmp.add_argument("--rtol", type=float, default=0.0, help="relative tolerance on numbers (default 0: equal)")
    args = parser.parse_args(argv)
    try:
        lines, agree = compare_results(args.reproduced, args.committed, args.rtol)
    except FileNotFoundError as err:
        parser.exit(2, f"error: {err}\n")
    print("\n".join(lines))
    return 0 if agree else 1


if __name__ == "__main__":
    raise SystemExit(main())
